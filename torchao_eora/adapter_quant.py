"""Quantized low-rank adapters: ``A`` and ``B`` as torchao intx values (the same portable layout as the base).

Each factor is quantized like a weight of its own linear map, in groups of ``group_size`` along its input
dimension: ``A`` (r x in) along ``in``, ``B`` (out x r) along ``r``. The mapping is asymmetric (min/max, int8 zero
point), as for the base: measured on 21 SmolLM2 layers (rank 64 EoRA on a 3-bit base), symmetric 4-bit adapters
lost about 1.7x as much of EoRA's activation-weighted error reduction (3.1% vs 1.8% at g64; 3 bits: 12.9% vs 7.8%):
a grid centred on zero wastes levels on groups whose values are not.

Quantization-aware (``resolve=True``, the default), in the residual's own norm (activation-weighted for EoRA):

* The factors are first turned by a fixed orthogonal ``R`` (r x r): ``B A = (B R^T)(R A)``. The solver's balanced
  split gives rank direction ``i`` the scale ``sqrt(s_i)`` in both factors, so a group of ``B``'s row (along the
  rank) mixes a few large values with many small ones and its grid is set by the large ones; the rotation spreads
  every direction over all of them.
* Each group's range is its ``[min, max]`` shrunk by the ratio of :data:`CLIP_RATIOS` that rounds the group with
  the least squared error (1.0 is torchao's min/max RTN).
* Quantize ``A``; re-solve ``B`` in closed form against the quantized ``A`` (:func:`~torchao_eora.solver.resolve_B`),
  so ``B`` absorbs ``A``'s rounding error; quantize ``B``. Then :data:`ROUNDS` times: the ``A`` that best fits the
  quantized ``B`` (least squares, where the activation moment cancels), quantized, and ``B`` again. The round with
  the lowest error is kept, so the rounds never do worse than the first.

On 21 SmolLM2 modules (3-bit g64 base, one-shot moments of 8 x 512 tokens) the rounding of int3 g64 rank-256 factors
raised the activation-weighted error from 12.10 to 14.98 with the re-solve alone and to 13.69 with all three
(``benchmarks/adapter_quantization.py``); int4 g32 rank 192: 15.28 -> 15.67 and 15.52.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import (
    _DTYPE_TO_QVALUE_BOUNDS,
    MappingType,
    choose_qparams_affine_with_min_max,
    quantize_affine,
)

from .compressors import CompressedWeight, RTNConfig
from .intx import dequantize_intx
from .solver import LowRankFactors, normal_equations_B, psd_pinv

# Least-squares rounds after the first quantization (A for the quantized B, then B again); the best round is kept.
ROUNDS = 3
# Shrink factors of a group's [min, max] tried by the clip search (1.0: plain min/max RTN).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
_ROTATION_SEED = 0

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


def _quantize(
    t: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype, *, clip: bool = False
) -> CompressedWeight:
    t = t.float()
    q = _clipped(t, bits, group_size) if clip else RTNConfig(bits, group_size, symmetric=False).compress(t)
    q.scale = q.scale.to(dtype).contiguous()  # stored (and dequantized) in the compute dtype, like the base's
    return q


def _clipped(t: torch.Tensor, bits: int, group_size: int) -> CompressedWeight:
    """Asymmetric RTN in torchao's layout with each group's range the ``[min, max]`` shrunk by the ratio of
    :data:`CLIP_RATIOS` that rounds it with the least squared error."""
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[getattr(torch, f"int{bits}")]
    block = (1, group_size)
    groups = t.reshape(t.shape[0], -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    best = None
    for ratio in CLIP_RATIOS:
        scale, zero = choose_qparams_affine_with_min_max(low * ratio, high * ratio, MappingType.ASYMMETRIC, block,
                                                         torch.int8, qmin, qmax, zero_point_dtype=torch.int8)
        qdata = quantize_affine(t, block, scale, zero, torch.int8, qmin, qmax)
        error = (dequantize_intx(qdata, scale, zero, group_size, torch.float32) - t).square().reshape_as(groups).sum(-1)
        if best is None:
            best = [qdata, scale, zero, error]
            continue
        take = error < best[3]
        wide = take.repeat_interleave(group_size, 1)
        best = [torch.where(wide, qdata, best[0]), torch.where(take, scale, best[1]), torch.where(take, zero, best[2]),
                torch.where(take, error, best[3])]
    return CompressedWeight(best[0], best[1], best[2], bits, group_size)


def _rotation(rank: int) -> torch.Tensor:
    """A fixed (seeded) Haar-random orthogonal r x r matrix, fp64."""
    gaussian = torch.randn(rank, rank, generator=torch.Generator().manual_seed(_ROTATION_SEED), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes Q Haar-distributed, not biased by QR's convention


def _fit_A(delta: torch.Tensor, B: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """The ``A`` minimising ``||diag(row_scale) (delta - B A) X^T||`` for a fixed ``B``: ``(B^T B)^+ B^T delta`` with
    the rows scaled; the activation moment cancels (it multiplies the normal equations from the right)."""
    b, d = B.double(), delta.double()
    if row_scale is not None:
        b, d = row_scale.double() * b, row_scale.double() * d
    return (psd_pinv(b.T @ b) @ (b.T @ d)).float()


def _error_terms(B: torch.Tensor, p: torch.Tensor, gram: torch.Tensor, row_scale: torch.Tensor | None) -> float:
    """The squared error of ``B`` for the ``A`` of the normal equations ``(p, gram)``, less its constant part."""
    b = B.double()
    per_row = ((b @ gram) * b).sum(1) - 2 * (b * p).sum(1)
    return float(per_row.sum() if row_scale is None else (row_scale.double().reshape(-1).square() * per_row).sum())


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
    row_scale: torch.Tensor | None = None,
) -> QuantizedFactors:
    """Quantize balanced EoRA/SVD factors to ``bits`` (2..8) in groups of ``group_size``.

    Args:
        delta: the compression error ``W - W_c`` the factors approximate (out x in).
        factors: full-precision factors from :func:`~torchao_eora.solver.eora_factors` or ``svd_factors``.
        bits: adapter bit width.
        group_size: values per scale along each factor's input dimension (divides the rank and ``in``).
        second_moment: ``C = X^T X / n`` of the residual's norm; None for the plain (``C = I``) norm of SVD.
        resolve: quantization-aware (the module docstring: rotation, clip search, closed-form re-solves, best
            round kept); False rounds the factors as solved, min/max RTN.
        dtype: the compute dtype; scales are stored in it and the re-solves see the factors exactly as the layer
            will.
        shrinkage: the amount the compensation shrank ``second_moment`` by (``solver.shrink``).
        row_scale: ``sqrt(d)`` per output row when the residual was fitted under an output-side weighting
            (``output_weights.py``): the re-solve of ``A`` and the choice of round use it (``B``'s re-solve is
            separable by rows, so it needs none).
    """
    check_adapter_group_size(group_size, factors.rank, factors.A.shape[1])
    if not resolve:
        return QuantizedFactors(_quantize(factors.A, bits, group_size, dtype),
                                _quantize(factors.B, bits, group_size, dtype))
    if second_moment is not None:  # converted once, not in every round (in x in: 1.6 GB in fp64 at in = 14336)
        second_moment = second_moment.to(torch.float64)
    rotation = _rotation(factors.rank).to(factors.A.device)
    A = (rotation @ factors.A.double()).float()
    best, best_error = None, float("inf")
    for round_ in range(1 + ROUNDS):
        if round_:
            A = _fit_A(delta, b_q, row_scale)
        qa = _quantize(A, bits, group_size, dtype, clip=True)
        p, gram = normal_equations_B(delta, qa.dequantize(dtype), second_moment, shrinkage=shrinkage)
        qb = _quantize((p @ psd_pinv(gram)).float(), bits, group_size, dtype, clip=True)
        b_q = qb.dequantize(dtype)
        error = _error_terms(b_q, p, gram, row_scale)
        if error < best_error:
            best, best_error = QuantizedFactors(qa, qb), error
    return best
