"""What a base compressor produces, and the interface every compressor (RTN, GPTQ, pruning) implements.

A compressed weight is stored in torchao's portable "unpacked to int8" intx layout (the fields of
``torchao``'s ``IntxUnpackedToInt8Tensor``): ``qdata`` int8 holding values in ``[qmin, qmax]`` of an intN type,
per-group ``scale`` and ``zero_point``, dequantized as ``(qdata - zero_point) * scale``. A compressor that only
prunes returns a dense ``qdata`` in floating point with no scale (bits is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..intx import dequantize_weight

__all__ = ["CompressedWeight", "Compressor", "by_row_blocks", "check_group_size"]


@dataclass
class CompressedWeight:
    """A compressed (out x in) weight: intx values with per-group affine parameters, or a dense pruned weight."""

    qdata: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    bits: int | None = None
    group_size: int | None = None

    @property
    def target_dtype(self) -> torch.dtype | None:
        return None if self.bits is None else getattr(torch, f"int{self.bits}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense compressed weight ``W_c``."""
        return dequantize_weight(self.qdata, self.scale, self.zero_point, self.target_dtype, self.group_size, dtype)


@runtime_checkable
class Compressor(Protocol):
    """A base compression method: ``compress(W, C)`` -> ``CompressedWeight``.

    ``second_moment`` is the calibration ``X^T X / n`` of the layer's inputs (GPTQ's Hessian up to a factor 2),
    or None when the caller has none; compressors that need it set ``needs_calibration = True``. It may also be a
    stack of ``k`` moments, (k, in, in), one per block of ``out / k`` consecutive rows (v_proj's attention-weighted
    moment, one per kv head): :func:`by_row_blocks` handles that case for a compressor.
    """

    needs_calibration: bool

    def compress(self, weight: torch.Tensor, second_moment: torch.Tensor | None = None) -> CompressedWeight: ...

    def describe(self) -> str: ...


def by_row_blocks(
    compress: Callable[[torch.Tensor, torch.Tensor | None], CompressedWeight],
    weight: torch.Tensor,
    second_moment: torch.Tensor | None,
) -> CompressedWeight:
    """``compress(weight, second_moment)``, or, for a (k, in, in) stack of moments, each of ``weight``'s ``k`` row
    blocks compressed with its own moment and the parts stacked back in row order (rows are independent given a
    moment, in GPTQ, SparseGPT and Wanda alike)."""
    if second_moment is None or second_moment.dim() == 2:
        return compress(weight, second_moment)
    k = second_moment.shape[0]
    if second_moment.dim() != 3 or weight.shape[0] % k:
        raise ValueError(f"a stack of {k} moments {tuple(second_moment.shape)} does not split {weight.shape[0]} rows")
    parts = [compress(w, c) for w, c in zip(weight.split(weight.shape[0] // k), second_moment)]

    def stacked(field: str) -> torch.Tensor | None:
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return CompressedWeight(stacked("qdata"), stacked("scale"), stacked("zero_point"), parts[0].bits,
                            parts[0].group_size)


def check_group_size(group_size: int, in_features: int) -> None:
    """Groups run along the input dimension and must tile it exactly."""
    if group_size < 1 or in_features % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size {group_size} does not divide in_features={in_features}; "
            f"use one that does, e.g. {divisors or [in_features]}"
        )
