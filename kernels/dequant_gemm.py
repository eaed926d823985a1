"""Fused dequantizing GEMM with the EoRA low-rank residual in the epilogue (Triton).

Computes ``y = x @ W_c^T + (x @ A^T) @ B^T + bias`` where ``W_c = (q - zero_point) * scale`` is stored as
int8 (one signed intN value per byte) or as packed int4 (two nibbles per byte), with one scale/zero point
per ``group_size`` consecutive input channels. Weights are dequantized in registers; nothing of size N x K
is materialized. ``t = x @ A^T`` (M x R, fp32) is computed first with one small torch matmul; the kernel adds
``t @ B^T`` and the bias to its fp32 accumulator before the single store.

One kernel, two launch shapes:
- M > 16: tiled GEMM, grid over (M, N) tiles (grouped ordering for L2 reuse), whole K per program.
- M <= 16 (decode): BLOCK_M = 16 (the smallest legal ``tl.dot``) and split-K: K is cut across programs
  so that a skinny GEMM still fills the GPU; each split writes an fp32 partial and a deterministic
  ``sum`` over the splits reduces them. Only split 0 adds the low-rank term and the bias.

Pure torch + triton. On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1``, set before this
module is imported (``triton.jit`` picks compile or interpret then) and still set at launch (the
interpreter reads it again).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

__all__ = ["quant_linear_triton", "pack_int4", "unpack_int4", "is_interpreted"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, t_ptr, b_ptr, out_ptr,
    M, N, K, R, group_size, tiles_per_split,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_tm, stride_bn, stride_om, stride_osplit,
    PACKED: tl.constexpr, GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)

    # Grouped ordering: GROUP_M row-tiles share each column of weight tiles while it is hot in L2.
    # Builtins only (no tl.cdiv / tl.zeros / tl.sum): triton.language's own @jit helpers fail under the
    # interpreter when triton was imported before TRITON_INTERPRET was set, as in a pytest run.
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: N * K can exceed 2**31 for large layers.
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_first = pid_k * tiles_per_split * BLOCK_K
    for i in range(tiles_per_split):
        k0 = k_first + i * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_tile = tl.load(x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        if PACKED:
            # Even column in the low nibble; sign-extend the 4-bit two's complement value.
            byte = tl.load(q_ptr + rows_n[:, None] * stride_qn + (offs_k // 2)[None, :],
                           mask=w_mask, other=0).to(tl.int32)
            nib = (byte >> ((offs_k % 2) * 4)[None, :]) & 0xF
            q = nib - ((nib & 8) << 1)
        else:
            q = tl.load(q_ptr + rows_n[:, None] * stride_qn + offs_k[None, :],
                        mask=w_mask, other=0).to(tl.int32)
        if GROUP_ALIGNED:
            # group_size % BLOCK_K == 0: the whole tile lies in one group, one scale per row.
            # Clamped so a tile past K (short last split) stays in bounds; its x and q are masked to 0.
            g = tl.minimum(k0, K - 1) // group_size
            s = tl.load(s_ptr + rows_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + rows_n * stride_zn + g, mask=mask_n, other=0).to(tl.int32)[:, None]
        else:
            # Groups smaller than (or straddling) the tile: per-element group index.
            g = (offs_k // group_size)[None, :]
            s = tl.load(s_ptr + rows_n[:, None] * stride_sn + g, mask=w_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rows_n[:, None] * stride_zn + g, mask=w_mask, other=0).to(tl.int32)
        # Round the dequantized weight to the activation dtype, as a dequantize-then-matmul would.
        w = ((q - z).to(tl.float32) * s).to(x_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            # Interpreter only: its tl.dot multiplies bf16 bit patterns. bf16 x bf16 products are exact
            # in fp32, so this matches a tensor-core bf16 dot with fp32 accumulation.
            acc = tl.dot(x_tile.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, tl.trans(w), acc, input_precision=PRECISION)

    # Epilogue: only split 0 adds the low-rank term and the bias; other splits see empty ranges.
    is_first = pid_k == 0
    if HAS_LOWRANK:
        # Masked loads pad the rank to BLOCK_R (a multiple of 16) with zeros, which keeps tl.dot legal.
        for r0 in range(0, tl.where(is_first, R, 0), BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t_tile = tl.load(t_ptr + rows_m[:, None] * stride_tm + offs_r[None, :],
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b_tile = tl.load(b_ptr + rows_n[:, None] * stride_bn + offs_r[None, :],
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(t_tile, tl.trans(b_tile), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < tl.where(is_first, N, 0), other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + pid_k.to(tl.int64) * stride_osplit + rows_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def is_interpreted() -> bool:
    """True when the kernels were built under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return not isinstance(_dequant_gemm_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class _Config:
    """Launch parameters; ``split_k > 1`` only for the decode path (``block_m == 16``)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


def _pow2_factor(n: int) -> int:
    return n & -n


def _block_k_for(group_size: int, cap: int) -> int:
    """Largest power of two <= cap dividing group_size (one scale per tile), else cap (per-element scales)."""
    aligned = min(cap, _pow2_factor(group_size))
    return aligned if aligned >= 16 else cap


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_config(M: int, N: int, K: int, group_size: int, dtype: torch.dtype, device: torch.device) -> _Config:
    """Simple shape heuristics. The interpreter gets small fixed tiles so tests stay fast and masked."""
    if device.type != "cuda":
        bk = _block_k_for(group_size, 32)
        return _Config(32, 32, bk) if M > 16 else _Config(16, 32, bk, split_k=min(4, triton.cdiv(K, bk)))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if M > 16:
        bm = 128 if M > 64 else 64
        # fp32 tiles are twice the bytes: a shorter K tile keeps 3 stages within shared memory.
        bk = _block_k_for(group_size, 32 if dtype == torch.float32 else 64)
        bn = 128 if triton.cdiv(M, bm) * triton.cdiv(N, 128) >= sms else 64  # fill the SMs first
        stages = 3 if group_size % bk == 0 else 2  # per-element scale tiles also take shared memory
        return _Config(bm, bn, bk, num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=stages)
    # Decode: weight streaming dominates; split K until there are about two programs per SM.
    bk = _block_k_for(group_size, 128)
    bn = 64
    split = max(1, min(triton.cdiv(K, bk), 32, triton.cdiv(2 * sms, triton.cdiv(N, bn))))
    return _Config(16, bn, bk, split_k=split, num_warps=4, num_stages=4 if group_size % bk == 0 else 2)


def pack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """Pack int8 ``(N, K)`` values in ``[-8, 7]`` into uint8 ``(N, K // 2)``; column 2j in the low nibble."""
    if qdata.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 values, got {qdata.dtype}")
    if qdata.dim() != 2 or qdata.shape[1] % 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor with an even number of columns, got {tuple(qdata.shape)}")
    if qdata.numel() and (int(qdata.min()) < -8 or int(qdata.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    nib = qdata.to(torch.uint8) & 0xF  # two's complement low nibble
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(N, K // 2)`` -> int8 ``(N, K)`` in ``[-8, 7]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).to(torch.int16)
    vals = nib - ((nib & 8) << 1)
    return vals.reshape(packed.shape[0], -1).to(torch.int8)


def _validate(x, qdata, scale, zero_point, group_size, bias, A, B) -> tuple[int, int, int, bool, int]:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be 2-D float32/float16/bfloat16, got {x.dtype} {tuple(x.shape)}")
    M, K = x.shape
    if qdata.dim() != 2:
        raise ValueError(f"qdata must be 2-D, got {tuple(qdata.shape)}")
    N = qdata.shape[0]
    if qdata.dtype == torch.int8:
        packed = False
        if qdata.shape[1] != K:
            raise ValueError(f"int8 qdata must be (N, K={K}), got {tuple(qdata.shape)}")
    elif qdata.dtype == torch.uint8:
        packed = True
        if 2 * qdata.shape[1] != K:
            raise ValueError(f"packed int4 qdata must be (N, K // 2 = {K / 2}), got {tuple(qdata.shape)}")
    else:
        raise ValueError(f"qdata must be int8 (unpacked) or uint8 (packed int4), got {qdata.dtype}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if K == 0 or K % group_size:
        raise ValueError(f"K={K} must be a positive multiple of group_size={group_size}")
    if packed and group_size % 2:
        raise ValueError(f"packed int4 needs an even group_size (a byte must not straddle groups), got {group_size}")
    groups = K // group_size
    if tuple(scale.shape) != (N, groups) or not scale.is_floating_point():
        raise ValueError(f"scale must be float (N, K // group_size) = {(N, groups)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if tuple(zero_point.shape) != (N, groups) or zero_point.dtype != torch.int8:
        raise ValueError(f"zero_point must be int8 {(N, groups)}, got {zero_point.dtype} {tuple(zero_point.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be float ({N},), got {bias.dtype} {tuple(bias.shape)}")
    if (A is None) != (B is None):
        raise ValueError("A and B must be given together")
    R = 0
    if A is not None:
        if A.dim() != 2 or A.shape[1] != K or not A.is_floating_point():
            raise ValueError(f"A must be float (R, K={K}), got {A.dtype} {tuple(A.shape)}")
        R = A.shape[0]
        if tuple(B.shape) != (N, R) or not B.is_floating_point():
            raise ValueError(f"B must be float (N, R) = {(N, R)}, got {B.dtype} {tuple(B.shape)}")
    for name, t in (("qdata", qdata), ("scale", scale), ("zero_point", zero_point), ("bias", bias), ("A", A), ("B", B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not is_interpreted():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before importing torchao_eora.kernels.dequant_gemm")
    return M, N, K, packed, R


def quant_linear_triton(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W_c^T + (x @ A^T) @ B^T + bias`` with ``W_c = (qdata - zero_point) * scale`` per group.

    Args:
        x: ``(M, K)`` float32 / float16 / bfloat16 activations.
        qdata: ``(N, K)`` int8 signed intN values, or ``(N, K // 2)`` uint8 packed int4 (see :func:`pack_int4`).
        scale: ``(N, K // group_size)`` float, any float dtype.
        zero_point: ``(N, K // group_size)`` int8.
        group_size: input channels per scale/zero point; must divide K (and be even when packed).
        bias: optional ``(N,)`` float.
        A, B: optional low-rank factors ``(R, K)`` and ``(N, R)``; R may be 0.

    Returns:
        ``(M, N)`` in ``x.dtype``; accumulation is fp32 throughout.
    """
    return _quant_linear(x, qdata, scale, zero_point, group_size, bias, A, B)


def _quant_linear(x, qdata, scale, zero_point, group_size, bias=None, A=None, B=None, config: _Config | None = None):
    """:func:`quant_linear_triton` with an optional forced launch config (tests use it to reach every branch)."""
    M, N, K, packed, R = _validate(x, qdata, scale, zero_point, group_size, bias, A, B)
    if M == 0:
        return x.new_empty((0, N))
    cfg = config or _pick_config(M, N, K, group_size, x.dtype, x.device)
    x, qdata, scale, zero_point = (t.contiguous() for t in (x, qdata, scale, zero_point))

    has_lowrank = R > 0
    if has_lowrank:
        # t stays fp32: rounding it to bf16 would cost the adapter most of its precision.
        t = torch.mm(x.float(), A.float().t())
        B = B.contiguous()
    else:
        t = B = x  # dummies, never read
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else x

    k_tiles = triton.cdiv(K, cfg.block_k)
    tiles_per_split = triton.cdiv(k_tiles, max(1, cfg.split_k))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    if split == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)

    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _dequant_gemm_kernel[grid](
        x, qdata, scale, zero_point, bias_arg, t, B, out,
        M, N, K, R, group_size, tiles_per_split,
        x.stride(0), qdata.stride(0), scale.stride(0), zero_point.stride(0), t.stride(0), B.stride(0),
        N, M * N,
        PACKED=packed, GROUP_ALIGNED=group_size % cfg.block_k == 0, HAS_BIAS=has_bias, HAS_LOWRANK=has_lowrank,
        DOT_IN_FP32=is_interpreted() and x.dtype == torch.bfloat16,
        # fp32 x: exact fp32 products (tf32 would cost ~1e-3 relative). Half x: only the epilogue's fp32
        # t @ B^T sees it, and tf32 there stays below the output's own rounding.
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=min(64, max(16, triton.next_power_of_2(R))),
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split == 1:
        return out
    return out.sum(dim=0).to(x.dtype)
