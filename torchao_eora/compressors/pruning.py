"""Pruning to N:M (e.g. 2:4) or unstructured sparsity: magnitude, Wanda and SparseGPT, optionally followed by
quantization (the paper's "GPTQ 4-bit + SparseGPT 2:4").

* magnitude: prune the smallest ``|W|`` (N:M groups, or layer-wide for unstructured sparsity).
* Wanda (arXiv 2306.11695): prune the smallest ``|W_ij| * ||X_j||``, compared within each output row.
* SparseGPT (arXiv 2301.00774): choose the mask during GPTQ's column sweep by ``w^2 / U_ii^2`` (per group of M
  columns, or per block for unstructured sparsity) and let the surviving weights absorb the error. With a
  ``GPTQConfig`` quantizer, pruning and rounding happen in that one sweep, as the SparseGPT paper does.

Pruned weights are exactly zero in the result: a pruned-only weight is stored dense (``bits=None``); a quantized
one keeps zeros exact because both torchao mappings represent 0 exactly (asymmetric: ``q = zero_point``;
symmetric: ``q = 0``) and the sweep re-zeroes pruned entries before rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from ..checks import check_choice, check_fraction
from .base import CompressedWeight, by_row_blocks, check_group_size
from .gptq import GPTQConfig
from .rtn import RTNConfig
from .sweep import GroupQuantizer, check_second_moment, check_sweep_args, obs_sweep

__all__ = ["PruneConfig", "parse_pattern", "prune_mask"]

_CRITERIA = ("magnitude", "wanda", "sparsegpt")
_NAMES = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)``: keep at most N weights in every M consecutive input channels (``0 < N < M``)."""
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r} needs 0 < N < M (keep N of every M weights)")
    return n, m


def _count(total: int, ratio: float) -> int:
    return math.floor(total * ratio + 0.5)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries along the last dim (exactly k, whatever the ties)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, True)
    return mask


def prune_mask(
    scores: torch.Tensor, nm: Optional[tuple[int, int]], ratio: Optional[float], per_row: bool
) -> torch.Tensor:
    """True where pruned: the M-N smallest scores of every M consecutive columns, or a ``ratio`` of the scores
    (per output row, or over the whole matrix)."""
    out_features, in_features = scores.shape
    if nm is not None:
        n, m = nm
        if in_features % m:
            raise ValueError(f"in_features={in_features} is not a multiple of M={m} for the {n}:{m} pattern")
        return _smallest(scores.reshape(out_features, in_features // m, m), m - n).reshape(out_features, in_features)
    if per_row:
        return _smallest(scores, _count(in_features, ratio))
    return _smallest(scores.reshape(-1), _count(scores.numel(), ratio)).reshape(scores.shape)


@dataclass
class _SparseGPTPicker:
    """SparseGPT's mask choice, made from the weights as updated so far: prune the smallest ``w^2 / U_ii^2``."""

    nm: Optional[tuple[int, int]]
    ratio: Optional[float]
    out_features: int

    @property
    def align(self) -> int:
        return self.nm[1] if self.nm else 1

    def pick(self, w: torch.Tensor, hinv_diag: torch.Tensor, start: int, i: int, mask: torch.Tensor) -> None:
        if self.nm is not None:
            n, m = self.nm
            if i % m == 0:
                scores = w[:, i : i + m] ** 2 / hinv_diag[i : i + m] ** 2
                mask[:, i : i + m] |= _smallest(scores, m - n)
        elif i == 0:  # one choice per block; counts allocated cumulatively so the layer total is exact
            width = w.shape[1]
            k = _count((start + width) * self.out_features, self.ratio) - _count(start * self.out_features, self.ratio)
            scores = (w**2 / hinv_diag**2).reshape(-1)
            mask |= _smallest(scores, k).reshape(mask.shape)


@dataclass
class PruneConfig:
    """Prune to an N:M pattern or an unstructured ratio, then optionally quantize.

    Args:
        criterion: how pruned weights are chosen: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        pattern: ``"N:M"`` (keep N of every M consecutive input weights; ``"2:4"`` when neither this nor
            ``ratio`` is given).
        ratio: fraction of weights to prune, unstructured (per output row for Wanda, per layer for magnitude, per
            layer with per-block choices for SparseGPT). Give ``pattern`` or ``ratio``, not both.
        quantizer: quantize the pruned weight: ``RTNConfig`` (round the pruned weight) or ``GPTQConfig`` (one
            joint sweep with SparseGPT; for magnitude/Wanda, GPTQ on the pruned weight with the mask held fixed).
            The sweep uses this config's ``percdamp`` and ``block_size``, not the quantizer's.
        percdamp: Hessian damping of the sweep, as a fraction of the mean diagonal.
        block_size: columns per lazy-batch update of the sweep.
    """

    criterion: str = "sparsegpt"
    pattern: Optional[str] = None
    ratio: Optional[float] = None
    quantizer: Union[RTNConfig, GPTQConfig, None] = None
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        check_choice("pruning criterion", self.criterion, _CRITERIA)
        if self.pattern is None and self.ratio is None:
            self.pattern = "2:4"
        if self.pattern is not None and self.ratio is not None:
            raise ValueError("give either an N:M pattern or an unstructured ratio, not both")
        if self.pattern is not None:
            if not isinstance(self.pattern, str):
                raise ValueError(f"sparsity pattern must be a string 'N:M' (e.g. '2:4'), got {self.pattern!r}")
            parse_pattern(self.pattern)
        else:
            check_fraction("sparsity ratio", self.ratio, closed_low=False)
        if self.quantizer is not None and not isinstance(self.quantizer, (RTNConfig, GPTQConfig)):
            kind = type(self.quantizer).__name__
            raise TypeError(f"quantizer must be an RTNConfig, a GPTQConfig or None, got {kind}")
        if self.criterion == "sparsegpt" and isinstance(self.quantizer, GPTQConfig) and self.quantizer.act_order is True:
            raise ValueError("SparseGPT picks its N:M mask in natural column order: use GPTQConfig(act_order=False)")
        check_sweep_args(self.percdamp, self.block_size)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude" or bool(getattr(self.quantizer, "needs_calibration", False))

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return None if self.pattern is None else parse_pattern(self.pattern)

    def describe(self) -> str:
        sparsity = self.pattern if self.pattern is not None else f"{self.ratio:.0%}"
        text = f"{_NAMES[self.criterion]} {sparsity}"
        quantizer = self.quantizer
        if self.criterion == "sparsegpt" and isinstance(quantizer, GPTQConfig):  # one joint sweep, natural order
            quantizer = replace(quantizer, act_order=False)
        return text if quantizer is None else f"{text} + {quantizer.describe()}"

    def mask(self, weight: torch.Tensor, second_moment: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The magnitude or Wanda mask (True = pruned), chosen once from the original weight."""
        scores = weight.detach().float().abs()
        if self.criterion == "wanda":
            h = check_second_moment(second_moment, weight.shape[1], self.describe())
            scores = scores * h.diagonal().clamp_min(0).sqrt().to(scores)[None, :]  # ||X_j|| / sqrt(n)
        elif self.criterion != "magnitude":
            raise ValueError("SparseGPT's mask is chosen during its sweep, not up front")
        return prune_mask(scores, self.nm, self.ratio, per_row=self.criterion == "wanda")

    def compress(self, weight: torch.Tensor, second_moment: Optional[torch.Tensor] = None) -> CompressedWeight:
        """Prune (and quantize) ``weight``; a stack of moments, one per row block, prunes each block with its own
        (an unstructured ``ratio`` then holds per block)."""
        return by_row_blocks(self._compress, weight, second_moment)

    def _compress(self, weight: torch.Tensor, second_moment: Optional[torch.Tensor]) -> CompressedWeight:
        w = weight.detach().float()
        out_features, in_features = w.shape
        if self.nm is not None and in_features % self.nm[1]:
            raise ValueError(f"in_features={in_features} is not a multiple of M={self.nm[1]} for {self.pattern}")
        if self.quantizer is not None:
            check_group_size(self.quantizer.group_size, in_features)
        if self.needs_calibration:
            check_second_moment(second_moment, in_features, self.describe())
        gptq = self.quantizer if isinstance(self.quantizer, GPTQConfig) else None
        sweep = dict(percdamp=self.percdamp, block_size=self.block_size)
        if gptq is not None:
            sweep.update(quantizer=GroupQuantizer(gptq.bits, gptq.group_size, gptq.symmetric),
                         act_order=gptq.act_order_on and self.criterion != "sparsegpt")

        if self.criterion == "sparsegpt":
            picker = _SparseGPTPicker(self.nm, self.ratio, out_features)
            result = obs_sweep(w, second_moment, picker=picker, **sweep)
        elif gptq is not None:  # Wanda / magnitude mask held fixed while GPTQ rounds the pruned weight
            result = obs_sweep(w, second_moment, mask=self.mask(w, second_moment), **sweep)
        else:
            result = None
            pruned = w.masked_fill(self.mask(w, second_moment), 0.0)

        if gptq is not None:
            return CompressedWeight(result.qdata, result.scale, result.zero_point, gptq.bits, gptq.group_size)
        if result is not None:
            pruned = result.weight
        if isinstance(self.quantizer, RTNConfig):
            return self.quantizer.compress(pruned)  # 0 maps to the zero point: pruned weights stay exactly 0
        return CompressedWeight(pruned)
