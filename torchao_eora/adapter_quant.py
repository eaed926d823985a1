"""Quantized low-rank adapters: ``A`` and ``B`` as torchao intx values (the same portable layout as the base).

Each factor is quantized like a weight of its own linear map, in groups of ``group_size`` along its input
dimension: ``A`` (r x in) along ``in``, ``B`` (out x r) along ``r``. The mapping is asymmetric (min/max, int8 zero
point), as for the base: measured on 21 SmolLM2 layers (rank 64 EoRA on a 3-bit base), symmetric 4-bit adapters
lost about 1.7x as much of EoRA's activation-weighted error reduction (3.1% vs 1.8% at g64; 3 bits: 12.9% vs 7.8%):
a grid centred on zero wastes levels on groups whose values are not.

Order (quantization-aware): quantize ``A``; re-solve ``B`` in closed form against the quantized ``A`` (same
activation-weighted norm, :func:`~torchao_eora.solver.resolve_B`), so ``B`` absorbs ``A``'s rounding error; then
quantize ``B``. The solver's balanced split (``sqrt(S)`` in each factor) gives both factors the same scale first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compressors import CompressedWeight, RTNConfig
from .solver import LowRankFactors, resolve_B

__all__ = ["QuantizedFactors", "check_adapter_group_size", "quantize_factors"]


@dataclass(frozen=True)
class QuantizedFactors:
    """``A`` (r x in) and ``B`` (out x r) as intx ``CompressedWeight``s (int8 qdata, per-group scale/zero point)."""

    A: CompressedWeight
    B: CompressedWeight

    @property
    def rank(self) -> int:
        return self.A.qdata.shape[0]

    @property
    def bits(self) -> int:
        return self.A.bits

    @property
    def group_size(self) -> int:
        return self.A.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> LowRankFactors:
        """The factors the layer computes with."""
        return LowRankFactors(A=self.A.dequantize(dtype), B=self.B.dequantize(dtype))


def _divisors(n: int) -> list[int]:
    return [g for g in (8, 16, 32, 64, 128) if n % g == 0]


def check_adapter_group_size(group_size: int, rank: int, in_features: int | None = None) -> None:
    """Adapter groups must tile ``A``'s rows (``in_features``) and ``B``'s rows (``rank``) exactly."""
    for what, n in (("rank", rank), ("in_features", in_features)):
        if n is not None and (group_size < 1 or n % group_size):
            fits = [g for g in _divisors(rank) if in_features is None or in_features % g == 0]
            raise ValueError(
                f"adapter_group_size {group_size} does not divide {what}={n}: A (rank x in_features) is grouped "
                f"along in_features and B (out_features x rank) along the rank; use a group size dividing both, "
                f"e.g. {fits or [1]}"
            )


def _quantize(t: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> CompressedWeight:
    q = RTNConfig(bits, group_size, symmetric=False).compress(t.float())
    q.scale = q.scale.to(dtype).contiguous()  # stored (and dequantized) in the compute dtype, like the base's
    return q


def quantize_factors(
    delta: torch.Tensor,
    factors: LowRankFactors,
    bits: int,
    group_size: int,
    second_moment: torch.Tensor | None = None,
    *,
    resolve: bool = True,
    dtype: torch.dtype = torch.float32,
    shrinkage: float = 0.0,
) -> QuantizedFactors:
    """Quantize balanced EoRA/SVD factors to ``bits`` (2..8) in groups of ``group_size``.

    Args:
        delta: the compression error ``W - W_c`` the factors approximate (out x in).
        factors: full-precision factors from :func:`~torchao_eora.solver.eora_factors` or ``svd_factors``.
        bits: adapter bit width.
        group_size: values per scale along each factor's input dimension (divides the rank and ``in``).
        second_moment: ``C = X^T X / n`` for the re-solve of ``B``; None for the plain (``C = I``) norm of SVD.
        resolve: re-solve ``B`` against the quantized ``A`` before quantizing ``B`` (recommended).
        dtype: the compute dtype; scales are stored in it and the re-solve sees ``A`` exactly as the layer will.
        shrinkage: the amount the compensation shrank ``second_moment`` by (``solver.shrink``).
    """
    check_adapter_group_size(group_size, factors.rank, factors.A.shape[1])
    qa = _quantize(factors.A, bits, group_size, dtype)
    B = factors.B
    if resolve:
        B = resolve_B(delta, qa.dequantize(dtype), second_moment, shrinkage=shrinkage)
    return QuantizedFactors(qa, _quantize(B, bits, group_size, dtype))
