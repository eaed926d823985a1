"""``EoRAConfig``: the torchao workflow config, and the ``quantize_`` handler that builds ``QuantWithLowRank``."""

from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, Literal, Optional, Union

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .adapter_quant import QuantizedFactors, check_adapter_group_size, quantize_factors
from .calibration import Calibration
from .checks import check_bool, check_choice, check_int
from .compression import Compressor
from .gptq import GPTQConfig
from .pruning import PruneConfig
from .rtn import RTNConfig
from .solver import LowRankFactors, eora_factors, svd_factors
from .targets import check_targets, module_rank, quantize_call_targets, warn_once
from .tensor import QuantWithLowRank

__all__ = ["EoRAConfig", "config_from_json", "eora_config"]

log = logging.getLogger(__name__)
Method = Literal["eora", "svd", "none"]
METHODS = ("eora", "svd", "none")
FORMS = ("auto", "eigen", "inverse_free")


@dataclass
class EoRAConfig(AOBaseConfig):
    """Compress every linear weight with ``base`` and add a rank-``rank`` residual ``B @ A``.

    Args:
        rank: rank of the residual path (``1 <= rank < min(out, in)``).
        base: the compressor for ``W_c``: ``RTNConfig``, ``GPTQConfig`` or ``PruneConfig`` (any ``Compressor``).
        method: ``"eora"`` (activation-weighted, needs ``calibration``), ``"svd"`` (plain SVD of the error,
            data-free) or ``"none"`` (compression only: a rank-0 residual, for baselines).
        calibration: a ``Calibration`` from ``calibrate()``. Modules it did not see (e.g. ``lm_head``) are left
            unchanged. Without one, ``method="eora"`` falls back to data-free SVD and says so.
        form: solver form, ``"auto"`` / ``"eigen"`` / ``"inverse_free"`` (same optimum, different cost).
        adapter_bits: quantize ``A`` and ``B`` to this many bits (2..8; 4 is the paper's recommendation) in
            torchao's intx layout, or None (default) for adapters in the model dtype. Ignored by ``method="none"``.
        adapter_group_size: values per scale along each factor's input dimension (``A``: in_features, ``B``: the
            rank); must divide the rank and every in_features (default 32).
        adapter_resolve: with ``adapter_bits``, re-solve ``B`` in closed form against the quantized ``A`` before
            quantizing ``B``, so ``B`` absorbs ``A``'s rounding error (default True; same norm as the method:
            activation-weighted for EoRA, plain for SVD).
    """

    rank: int = 64
    base: Union[RTNConfig, GPTQConfig, PruneConfig] = field(default_factory=RTNConfig)
    method: Method = "eora"
    calibration: Optional[Calibration] = field(default=None, repr=False, compare=False)
    form: str = "auto"
    adapter_bits: Optional[int] = None
    adapter_group_size: int = 32
    adapter_resolve: bool = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < (self.method != "none"):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r} (use method='none' for no residual)")
        if not isinstance(self.base, Compressor) or isinstance(self.base, type):
            raise ValueError(
                f"base must be a compressor config such as RTNConfig(bits=3), GPTQConfig(bits=3) or "
                f"PruneConfig('sparsegpt', '2:4'), got {self.base!r}"
            )
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            kind = type(self.calibration).__name__
            raise ValueError(f"calibration must be a Calibration from calibrate() or None, got a {kind}")
        check_choice("form", self.form, FORMS)
        check_bool("adapter_resolve", self.adapter_resolve)
        check_int("adapter_group_size", self.adapter_group_size, 1)
        if self.adapter_bits is not None:
            if isinstance(self.adapter_bits, bool) or self.adapter_bits not in range(2, 9):
                raise ValueError(
                    f"adapter_bits must be None (adapters in the model dtype) or an integer in 2..8, got "
                    f"{self.adapter_bits!r}; 4 bits is the paper's recommendation"
                )
            if self.method != "none":
                check_adapter_group_size(self.adapter_group_size, self.rank)  # in_features: checked per layer

    def describe(self) -> str:
        residual = "no residual" if self.method == "none" else f"{self.method} r{self.rank}"
        if self.method != "none" and self.adapter_bits is not None:
            resolve = "" if self.adapter_resolve else ", no re-solve"
            residual += f" (int{self.adapter_bits} g{self.adapter_group_size} adapters{resolve})"
        return f"{self.base.describe()} + {residual}"


def eora_config(calibration: Calibration, **overrides) -> EoRAConfig:
    """The config a sequential calibration compressed with, carrying its statistics: ``quantize_(m, eora_config(c))``."""
    if calibration.config is None:
        raise ValueError("this calibration carries no config (one-shot mode): use EoRAConfig(..., calibration=calib)")
    return replace(calibration.config, calibration=calibration, **overrides)


def config_from_json(data: Any, where: str = "config") -> EoRAConfig:
    """Rebuild an ``EoRAConfig`` from ``config_to_dict`` JSON, strictly: only our four config classes, known
    fields, plain values. Anything else (another class or function name, a nested object where a value belongs) is
    refused before anything is built, so a crafted ``config.json`` or calibration file cannot call code.
    ``where`` names the file in the error."""
    config = _build_from_json(data, where)
    if not isinstance(config, EoRAConfig):
        raise ValueError(f"{where}: expected an EoRAConfig, got {type(config).__name__}")
    return config


def _build_from_json(data: Any, where: str):
    classes = {cls.__name__: cls for cls in (EoRAConfig, RTNConfig, GPTQConfig, PruneConfig)}
    if not isinstance(data, dict) or not isinstance(data.get("_data"), dict) or data.get("_type") not in classes:
        kind = data.get("_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{where}: refusing to build {kind!r} from JSON (only {', '.join(classes)} are allowed); "
            "the file was not written by torchao-eora or was tampered with"
        )
    cls = classes[data["_type"]]
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data["_data"].items():
        if key not in names:
            raise ValueError(f"{where}: {cls.__name__} has no field {key!r}")
        if isinstance(value, dict):
            value = _build_from_json(value, where)  # a nested config (EoRAConfig.base, PruneConfig.quantizer)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise ValueError(f"{where}: {cls.__name__}.{key} must be a plain value, got {type(value).__name__}")
        kwargs[key] = value
    return cls(**kwargs)  # __post_init__ checks every field's type and range


def _solve(module_name: Optional[str], delta: torch.Tensor, config: EoRAConfig, rank: int) -> LowRankFactors:
    if config.method == "none" or rank == 0:
        return LowRankFactors(delta.new_zeros(0, delta.shape[1]), delta.new_zeros(delta.shape[0], 0))
    if _data_free(config):
        return svd_factors(delta, rank)
    calib, (out_features, in_features) = config.calibration, delta.shape
    form = config.form
    if form == "auto":  # the eigen form's in x in eigendecomposition is shared by modules reading the same input
        form = "eigen" if in_features <= out_features else "inverse_free"
    if form == "eigen":
        return eora_factors(delta, rank=rank, form="eigen", eigen=calib.eigen(module_name))
    return eora_factors(delta, calib.second_moment(module_name).mean(), rank, form=form)


def _data_free(config: EoRAConfig) -> bool:
    return config.method == "svd" or config.calibration is None


def _quantize_adapters(
    module_name: Optional[str], delta: torch.Tensor, factors: LowRankFactors, config: EoRAConfig, dtype: torch.dtype
) -> Union[LowRankFactors, QuantizedFactors]:
    """intx adapters when the config asks for them; the re-solve of B uses the method's own norm."""
    if config.adapter_bits is None or factors.rank == 0:
        return factors
    moment = None if _data_free(config) else config.calibration.second_moment(module_name).mean()
    return quantize_factors(
        delta, factors, config.adapter_bits, config.adapter_group_size, moment,
        resolve=config.adapter_resolve, dtype=dtype,
    )


@register_quantize_module_handler(EoRAConfig)
def _eora_transform(module: torch.nn.Module, config: EoRAConfig, **kwargs) -> torch.nn.Module:
    calib = config.calibration
    name = None
    if calib is not None:
        name = calib.name_of(module)
        if name is None:
            return module  # not a calibrated layer (lm_head, vision tower, ...): leave it alone
        _check_all_once(calib, {n: m for m, n in list(calib._names.items())}, config)
        check_targets({name: module}, config, warn=False)
    else:
        call = quantize_call_targets(module)
        if call is not None:
            targets, root = call
            head = _output_embeddings(root)
            if module is head:
                warn_once(config, "leaving lm_head (the output embeddings) uncompressed, as the calibrated path does; "
                          "quantize_(model.lm_head, config) compresses it")
                return module
            _check_all_once(root, {n: m for n, m in targets.items() if m is not head}, config)
            name = next(n for n, m in targets.items() if m is module)
        shape = "x".join(map(str, getattr(getattr(module, "weight", None), "shape", ())))
        check_targets({name or f"a {shape} {type(module).__name__} layer": module}, config, warn=call is None)
        if config.method == "eora":
            warn_once(config, "EoRAConfig(method='eora') without calibration statistics: falling back to data-free SVD")

    weight = module.weight.detach()
    w32 = weight.float()
    moment = None
    if getattr(config.base, "needs_calibration", False):
        if calib is None:
            raise ValueError(f"{config.base.describe()} needs calibration statistics: run calibrate() first")
        moment = calib.second_moment(name).mean()
    compressed = config.base.compress(w32, moment)
    delta = w32 - compressed.dequantize(torch.float32)  # in fp32: the error underflows in fp16/bf16
    rank = module_rank(config, *delta.shape)
    factors = _quantize_adapters(name, delta, _solve(name, delta, config, rank), config, weight.dtype)
    new = QuantWithLowRank.from_parts(compressed, factors, dtype=weight.dtype)
    module.weight = torch.nn.Parameter(new, requires_grad=False)
    module.extra_repr = types.MethodType(partial(_extra_repr, original=module.extra_repr), module)
    return module


# The targets of a quantize_ call already checked, per root (a Calibration or the model) and config: the first
# handler call checks them all, so a problem anywhere fails before any layer is changed.
_checked: "weakref.WeakKeyDictionary[object, tuple[str, weakref.WeakSet]]" = weakref.WeakKeyDictionary()


def _check_all_once(key: object, targets: dict[str, torch.nn.Module], config: EoRAConfig) -> None:
    seen = _checked.get(key)
    if seen is None or seen[0] != repr(config):
        seen = _checked[key] = (repr(config), weakref.WeakSet())
    todo = {name: m for name, m in targets.items() if m not in seen[1]}
    if todo:
        check_targets(todo, config)
        seen[1].update(todo.values())


def _output_embeddings(root: torch.nn.Module) -> Optional[torch.nn.Module]:
    get = getattr(root, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _extra_repr(self, original) -> str:
    return f"{original()}, weight={self.weight._quantization_type()}"
