"""``EoRAConfig``: the torchao workflow config, and the ``quantize_`` handler that builds ``QuantWithLowRank``."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal, Optional, Union

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .adapter_quant import QuantizedFactors, check_adapter_group_size, quantize_factors
from .calibration import Calibration
from .gptq import GPTQConfig
from .pruning import PruneConfig
from .rtn import RTNConfig
from .solver import LowRankFactors, eora_factors, svd_factors
from .tensor import QuantWithLowRank

__all__ = ["EoRAConfig", "eora_config"]

log = logging.getLogger(__name__)
Method = Literal["eora", "svd", "none"]


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
        if self.method not in ("eora", "svd", "none"):
            raise ValueError(f"method must be 'eora', 'svd' or 'none', got {self.method!r}")
        if self.method != "none" and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r} (use method='none' for no residual)")
        if self.adapter_bits is not None:
            if isinstance(self.adapter_bits, bool) or self.adapter_bits not in range(2, 9):
                raise ValueError(
                    f"adapter_bits must be None (adapters in the model dtype) or an integer in 2..8, got "
                    f"{self.adapter_bits!r}; 4 bits is the paper's recommendation"
                )
            if not isinstance(self.adapter_group_size, int) or isinstance(self.adapter_group_size, bool):
                raise ValueError(f"adapter_group_size must be an integer, got {self.adapter_group_size!r}")
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


def _solve(module_name: Optional[str], delta: torch.Tensor, config: EoRAConfig) -> LowRankFactors:
    if config.method == "none":
        return LowRankFactors(delta.new_zeros(0, delta.shape[1]), delta.new_zeros(delta.shape[0], 0))
    if _data_free(config):
        return svd_factors(delta, config.rank)
    calib, (out_features, in_features) = config.calibration, delta.shape
    form = config.form
    if form == "auto":  # the eigen form's in x in eigendecomposition is shared by modules reading the same input
        form = "eigen" if in_features <= out_features else "inverse_free"
    if form == "eigen":
        return eora_factors(delta, rank=config.rank, form="eigen", eigen=calib.eigen(module_name))
    return eora_factors(delta, calib.second_moment(module_name).mean(), config.rank, form=form)


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
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"EoRAConfig applies to torch.nn.Linear modules, got {type(module).__name__}")
    if isinstance(module.weight, QuantWithLowRank):
        raise TypeError("this linear layer is already compressed with EoRA; reload the original weights first")
    calib = config.calibration
    name = None
    if calib is not None:
        name = calib.name_of(module)
        if name is None:
            return module  # not a calibrated layer (lm_head, vision tower, ...): leave it alone
    elif config.method == "eora" and not getattr(config, "_warned_data_free", False):
        log.warning("EoRAConfig(method='eora') without calibration statistics: falling back to data-free SVD")
        config._warned_data_free = True  # once per quantize_ call, not once per layer

    weight = module.weight.detach()
    w32 = weight.float()
    moment = None
    if getattr(config.base, "needs_calibration", False):
        if calib is None:
            raise ValueError(f"{config.base.describe()} needs calibration statistics: run calibrate() first")
        moment = calib.second_moment(name).mean()
    compressed = config.base.compress(w32, moment)
    delta = w32 - compressed.dequantize(torch.float32)  # in fp32: the error underflows in fp16/bf16
    factors = _quantize_adapters(name, delta, _solve(name, delta, config), config, weight.dtype)
    new = QuantWithLowRank.from_parts(compressed, factors, dtype=weight.dtype)
    module.weight = torch.nn.Parameter(new, requires_grad=False)
    module.extra_repr = types.MethodType(partial(_extra_repr, original=module.extra_repr), module)
    return module


def _extra_repr(self, original) -> str:
    return f"{original()}, weight={self.weight._quantization_type()}"
