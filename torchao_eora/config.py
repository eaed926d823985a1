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
    """

    rank: int = 64
    base: Union[RTNConfig, GPTQConfig, PruneConfig] = field(default_factory=RTNConfig)
    method: Method = "eora"
    calibration: Optional[Calibration] = field(default=None, repr=False, compare=False)
    form: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("eora", "svd", "none"):
            raise ValueError(f"method must be 'eora', 'svd' or 'none', got {self.method!r}")
        if self.method != "none" and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r} (use method='none' for no residual)")

    def describe(self) -> str:
        residual = "no residual" if self.method == "none" else f"{self.method} r{self.rank}"
        return f"{self.base.describe()} + {residual}"


def eora_config(calibration: Calibration, **overrides) -> EoRAConfig:
    """The config a sequential calibration compressed with, carrying its statistics: ``quantize_(m, eora_config(c))``."""
    if calibration.config is None:
        raise ValueError("this calibration carries no config (one-shot mode): use EoRAConfig(..., calibration=calib)")
    return replace(calibration.config, calibration=calibration, **overrides)


def _solve(module_name: Optional[str], delta: torch.Tensor, config: EoRAConfig) -> LowRankFactors:
    if config.method == "none":
        return LowRankFactors(delta.new_zeros(0, delta.shape[1]), delta.new_zeros(delta.shape[0], 0))
    if config.method == "svd" or config.calibration is None:
        return svd_factors(delta, config.rank)
    calib, (out_features, in_features) = config.calibration, delta.shape
    form = config.form
    if form == "auto":  # the eigen form's in x in eigendecomposition is shared by modules reading the same input
        form = "eigen" if in_features <= out_features else "inverse_free"
    if form == "eigen":
        return eora_factors(delta, rank=config.rank, form="eigen", eigen=calib.eigen(module_name))
    return eora_factors(delta, calib.second_moment(module_name).mean(), config.rank, form=form)


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
    factors = _solve(name, delta, config)
    new = QuantWithLowRank.from_parts(compressed, factors, dtype=weight.dtype)
    module.weight = torch.nn.Parameter(new, requires_grad=False)
    module.extra_repr = types.MethodType(partial(_extra_repr, original=module.extra_repr), module)
    return module


def _extra_repr(self, original) -> str:
    return f"{original()}, weight={self.weight._quantization_type()}"
