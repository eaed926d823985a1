"""The Optimal Brain Surgeon column sweep shared by GPTQ (``gptq.py``) and SparseGPT (``pruning.py``).

With ``H = X^T X / n`` (GPTQ's Hessian ``2 X^T X / n`` up to a factor that cancels), the OBS update for fixing
column ``i`` to ``q`` is ``W[:, i:] -= (w - q) / U_ii * U[i, i:]`` where ``U`` is the upper Cholesky factor of
``H^-1``. Updates inside a block of columns are applied eagerly, to the rest of the matrix once per block ("lazy
batch" updates). Fixing a column means rounding it (GPTQ), zeroing its pruned entries (SparseGPT), or both.

Group parameters come from torchao's ``choose_qparams_affine`` with the arguments ``RTNConfig`` (torchao's
``IntxWeightOnlyConfig``) uses, and columns are rounded with ``quantize_affine``'s exact arithmetic, so the output
is torchao's intx layout, bit for bit: with an identity ``H`` (no error to propagate) GPTQ *is* RTN (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, choose_qparams_affine

from ..checks import check_fraction, check_int
from ..solver import one_cpu_thread
from .base import check_group_size

__all__ = ["GroupQuantizer", "MaskPicker", "SweepResult", "check_second_moment", "check_sweep_args", "obs_sweep"]


def check_sweep_args(percdamp: float, block_size: int) -> None:
    check_fraction("percdamp", percdamp)
    check_int("block_size", block_size, 1)


def check_second_moment(second_moment: Optional[torch.Tensor], in_features: int, who: str) -> torch.Tensor:
    """The calibration statistic a data-aware compressor cannot run without, with a message saying how to get it."""
    if second_moment is None:
        raise ValueError(
            f"{who} needs calibration statistics (the input second moment X^T X / n): run "
            "torchao_eora.calibrate(model, batches, config) and quantize with eora_config(calib)"
        )
    if second_moment.shape != (in_features, in_features):
        raise ValueError(
            f"second moment has shape {tuple(second_moment.shape)}, expected ({in_features}, {in_features})"
        )
    if not torch.isfinite(second_moment).all():
        raise ValueError("second moment has non-finite entries: the calibration activations contained NaN/inf")
    return second_moment


@dataclass(frozen=True)
class GroupQuantizer:
    """Group-wise affine intN quantization with torchao's primitives, one group or one column at a time."""

    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def bounds(self) -> tuple[int, int]:
        return _DTYPE_TO_QVALUE_BOUNDS[getattr(torch, f"int{self.bits}")]

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (out x w.shape[1] / group_size) of ``w``: exactly RTN's (torchao's ``from_hp``)."""
        qmin, qmax = self.bounds
        mapping = MappingType.SYMMETRIC if self.symmetric else MappingType.ASYMMETRIC
        return choose_qparams_affine(
            w, mapping, [1, self.group_size], target_dtype=torch.int8, quant_min=qmin, quant_max=qmax,
            zero_point_dtype=torch.int8, keepdim=True,
        )

    def grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One group's per-row constants for :meth:`round`: ``(1 / scale, zero point as float, scale)``."""
        scale = scale.reshape(-1)
        return 1.0 / scale, zero_point.reshape(-1).to(scale.dtype), scale

    def round(self, w: torch.Tensor, grid: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Round a column onto a group's grid: ``(int8 q, fp32 dequantized q)``.

        The exact op sequence of torchao's ``quantize_affine`` / ``dequantize_affine`` (so results are bit for bit
        theirs; tests check it), inlined because calling them per column costs 10x more than the arithmetic.
        """
        inv_scale, zero, scale = grid
        qmin, qmax = self.bounds
        q = torch.clamp(torch.round(w * inv_scale) + zero, qmin, qmax)
        return q.to(torch.int8), (q - zero) * scale


class MaskPicker(Protocol):
    """Chooses pruned weights during the sweep, from the current (already updated) weights (SparseGPT).

    ``pick`` is called before column ``i`` of a block that starts at column ``start``; it may set entries of
    ``mask`` (out x block, True = pruned) for columns ``>= i`` of the block. ``align``: blocks must start at
    multiples of it (M for N:M patterns).
    """

    align: int

    def pick(self, w: torch.Tensor, hinv_diag: torch.Tensor, start: int, i: int, mask: torch.Tensor) -> None: ...


@dataclass
class SweepResult:
    """What the sweep produced, in natural column order."""

    weight: torch.Tensor  # (out x in) fp32: the dequantized (and/or pruned) weight
    mask: Optional[torch.Tensor] = None  # (out x in) bool, True = pruned
    qdata: Optional[torch.Tensor] = None  # (out x in) int8 intN values
    scale: Optional[torch.Tensor] = None  # (out x in/group_size)
    zero_point: Optional[torch.Tensor] = None


def _upper_cholesky_of_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``U`` with ``U^T U = (H + damp I)^-1``, in fp64 (the inverse of a badly conditioned ``H`` loses digits);
    bit-identical for any CPU thread count."""
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        with one_cpu_thread(h.device):
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"the calibration second moment is not positive definite even after damping (percdamp={percdamp}); "
            "use more calibration tokens or a larger percdamp"
        ) from e


def _act_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing ``H_ii``; ties in index order (a stable sort: the unstable one orders ties in an
    implementation-defined way that differs between CPU and CUDA)."""
    return torch.argsort(h.diagonal(), descending=True, stable=True)


@torch.no_grad()
def obs_sweep(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    quantizer: Optional[GroupQuantizer] = None,
    act_order: bool = False,
    mask: Optional[torch.Tensor] = None,
    picker: Optional[MaskPicker] = None,
) -> SweepResult:
    """The GPTQ / SparseGPT column sweep: fix each column (round it, and/or zero its pruned entries) and push
    the error onto the columns not yet fixed, weighted by the inverse Hessian.

    Args:
        weight: (out x in); runs on its device, in fp32.
        second_moment: ``X^T X / n`` (in x in).
        quantizer: round to this group-wise intN grid (None: prune only).
        act_order: process columns by decreasing ``H_ii``; group parameters then come from the original weight.
        mask: a fixed pruning mask (True = pruned), e.g. Wanda's. Pruned entries stay exactly zero: the sweep
            re-zeroes them before rounding, so propagated updates can never resurrect them.
        picker: choose the mask during the sweep instead (SparseGPT); natural column order only.
    """
    w = weight.detach().to(torch.float32).clone()
    out_features, n = w.shape
    device = w.device
    h = second_moment.detach().to(device=device, dtype=torch.float64).clone()
    h = 0.5 * (h + h.T)  # accumulated sums are symmetric only up to round-off
    dead = h.diagonal() == 0  # inputs that were always zero: any weight there is free, so make it 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    pruned = None if mask is None and picker is None else torch.zeros_like(w, dtype=torch.bool)
    if mask is not None:
        pruned.copy_(mask.to(device))
        w.masked_fill_(pruned, 0.0)
    if picker is not None and act_order:
        raise ValueError("mask selection during the sweep (SparseGPT) needs natural column order: act_order=False")

    group = quantizer.group_size if quantizer is not None else 0
    scale = zero_point = qdata = None
    if quantizer is not None:
        check_group_size(group, n)
        qdata = torch.empty(out_features, n, dtype=torch.int8, device=device)
        if act_order:  # static groups: contiguous in natural order, so the layout is unchanged
            scale, zero_point = quantizer.qparams(w)
        else:
            scale = torch.empty(out_features, n // group, dtype=torch.float32, device=device)
            zero_point = torch.empty(out_features, n // group, dtype=torch.int8, device=device)

    perm = None
    if act_order:
        perm = _act_order(h)
        w, h = w[:, perm], h[perm][:, perm]
        if pruned is not None:
            pruned = pruned[:, perm]
    hinv = _upper_cholesky_of_inverse(h, percdamp).to(torch.float32)
    del h

    # A group computed at its first column must lie inside one block; N:M groups too.
    align = math.lcm(group if quantizer is not None and not act_order else 1, picker.align if picker else 1)
    block_size = max(block_size // align, 1) * align
    group_of_col = None if quantizer is None else ((perm if act_order else torch.arange(n)) // group).tolist()
    grids = {}  # group index -> grid constants
    result = torch.empty_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, u1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d1 = u1.diagonal()
        d = d1.tolist()  # python floats: no tiny device tensor per column
        m1 = None if pruned is None else pruned[:, i1:i2]  # a view: picks land in `pruned`
        q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
        qint1 = None if quantizer is None else torch.empty_like(w1, dtype=torch.int8)
        for i in range(i2 - i1):
            col = i1 + i
            if picker is not None:
                picker.pick(w1, d1, i1, i, m1)
            if quantizer is not None and not act_order and col % group == 0:
                g = w1[:, i : i + group]
                g = g if m1 is None else g.masked_fill(m1[:, i : i + group], 0.0)
                k = col // group
                scale[:, k : k + 1], zero_point[:, k : k + 1] = quantizer.qparams(g)
            w_i = w1[:, i]
            q = w_i if m1 is None else w_i.masked_fill(m1[:, i], 0.0)
            if quantizer is not None:
                k = group_of_col[col]
                if k not in grids:
                    grids[k] = quantizer.grid(scale[:, k], zero_point[:, k])
                qint1[:, i], q = quantizer.round(q, grids[k])
            q1[:, i] = q
            e = (w_i - q).div_(d[i])
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)  # OBS update of the columns not yet fixed
            err1[:, i] = e
        result[:, i1:i2] = q1
        if qdata is not None:
            qdata[:, i1:i2] = qint1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the block's lazy update of everything after it

    if perm is not None:
        inverse = torch.argsort(perm)
        result = result[:, inverse]
        qdata = None if qdata is None else qdata[:, inverse]
        pruned = None if pruned is None else pruned[:, inverse]
    return SweepResult(result, pruned, qdata, scale, zero_point)
