"""Preserve, then quantize: spend ``k`` of the residual's ranks on the top of the weight itself, before compressing.

The best rank-``k`` approximation of ``W`` in the activation-weighted norm ``||(W - L) X^T||`` is ``L = P W``, with
``P`` the projector on the top-``k`` eigenvectors of ``W C W^T`` (``C = X^T X``): EoRA's own closed form applied to
``W`` instead of an error, so ``solver.eora_factors(W, C, k)`` computes it, as ``B = U S^1/2``, ``A = S^-1/2 U^T W``
in descending order (its first ``k' < k`` ranks are the top-``k'`` ones). ``L`` is an output-side projection of
``W`` and needs no inverse of ``C``, however ill-conditioned. The compressor then sees only ``W - L``, whose
largest directions (those that set a quantization group's range) are gone, and the other ``rank - k`` ranks fit
what compressing it leaves. SRR (ICML 2026) proposes the split; here ``k`` is chosen per module by the residual's
own activation-weighted error.
"""

from __future__ import annotations

import torch

from .solver import LowRankFactors, eora_factors, svd_factors

__all__ = ["preserve_candidates", "preserved_factors", "joined"]


def preserved_factors(weight: torch.Tensor, moment: torch.Tensor | None, k: int) -> LowRankFactors:
    """The rank-``k`` ``B @ A = P W`` closest to ``weight`` under ``moment`` (the plain SVD without one)."""
    w = weight.detach().float()
    return eora_factors(w, moment, k) if moment is not None else svd_factors(w, k)


def preserve_candidates(preserve: int | str, rank: int, step: int) -> list[int]:
    """The ``k`` tried for a module of residual rank ``rank``: the config's integer, or for ``"auto"`` 0, ``rank/4``
    and ``rank/2`` rounded down to multiples of ``step`` (the adapter group size with quantized adapters)."""
    if preserve != "auto":
        return [min(int(preserve), rank - 1) // step * step]
    return sorted({k // step * step for k in (0, rank // 4, rank // 2)})


def joined(first: LowRankFactors, second: LowRankFactors) -> LowRankFactors:
    """``first.B @ first.A + second.B @ second.A`` as one factor pair of the summed rank."""
    return LowRankFactors(torch.cat([first.A, second.A.to(first.A)]), torch.cat([first.B, second.B.to(first.B)], 1))
