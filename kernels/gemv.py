"""Decode GEMV for bit-packed int2 / int3 / int4 weights with the EoRA residual in the epilogue (Triton).

Computes ``y = x @ W_c^T + t @ B^T + bias`` for a few rows of ``x`` (decode: M <= ``MAX_M``), with
``W_c = (q - zero_point) * scale`` in ``packing.py``'s layout (each row one little-endian bit stream) and
``t = x @ A^T`` computed once per call in fp32.

At M = 1 the weight's bytes are the whole cost, so the kernel is built around reading them once, contiguously, in
32-bit words: 32 values of a row are exactly ``bits`` words (a 96-bit chunk for int3), whatever the width, so value
``i`` of every chunk sits at the same bit offset and is cut with two constant shifts (a left shift to the top, an
arithmetic right shift that also sign-extends). ``x`` is de-interleaved once per call instead (``(M, 32, K / 32)``:
row ``i`` holds value ``i`` of every chunk), so its loads are contiguous too. The scale and zero point are applied
once per group and row: ``sum_k (q - z) s x = s (sum_k q x - z sum_k x)``. Programs cover ``BLOCK_N`` output rows
and, for narrow layers, a slice of K (split-K, the fp32 partials summed in a fixed order: deterministic).

Pure torch + triton; on CPU tensors it runs under ``TRITON_INTERPRET=1`` (numerics tests), as ``dequant_gemm`` does.
Reductions use ``tl.reduce`` with this module's own combine function: triton.language's ``tl.sum`` is a ``@jit``
helper that fails under the interpreter when triton was imported before ``TRITON_INTERPRET`` was set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant_gemm import is_interpreted

__all__ = ["MAX_M", "gemv_supported", "packed_gemv"]

MAX_M = 4  # rows of x this kernel is for; larger batches go to the tiled GEMM
_CHUNK = 32  # values a chunk: `bits` whole 32-bit words for every packed width


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _packed_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, t_ptr, b_ptr, out_ptr,
    N, K, R, groups_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_tm, stride_bn, stride_om, stride_osplit,
    BITS: tl.constexpr, GROUP_CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    chunks = tl.arange(0, GROUP_CHUNKS)
    n_chunks = K // 32
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    first_group = pid_k * groups_per_split
    for gi in range(groups_per_split):
        g = first_group + gi
        c0 = g * GROUP_CHUNKS
        w_mask = mask_n[:, None]  # splits hold whole groups (the wrapper picks a divisor): no K mask
        # The group's words: chunk c of a row is words [c * BITS, (c + 1) * BITS) (one load per word of a chunk).
        word_ptrs = w_ptr + rows[:, None] * stride_wn + ((c0 + chunks) * BITS)[None, :]
        partial = tl.full((BLOCK_N, GROUP_CHUNKS), 0.0, tl.float32)
        x_sum = tl.full((GROUP_CHUNKS,), 0.0, tl.float32)
        for i in tl.static_range(32):
            # value i of each chunk: bits [i * BITS, (i + 1) * BITS) of its words (constant offsets; a word loaded
            # for several values is one load after the compiler's CSE)
            lo = tl.load(word_ptrs + (i * BITS) // 32, mask=w_mask, other=0)
            shift = (i * BITS) % 32
            if shift + BITS <= 32:
                q = (lo << (32 - shift - BITS)) >> (32 - BITS)  # arithmetic shift: sign-extended
            else:  # int3 values 10 and 21 straddle two words: low bits end `lo`, high bits start the next word
                hi = tl.load(word_ptrs + (i * BITS) // 32 + 1, mask=w_mask, other=0)
                spill = shift + BITS - 32
                u = ((lo >> shift) & ((1 << (32 - shift)) - 1)) | ((hi & ((1 << spill) - 1)) << (32 - shift))
                q = (u << (32 - BITS)) >> (32 - BITS)
            xv = tl.load(x_row + i * n_chunks + c0 + chunks).to(tl.float32)
            partial += q.to(tl.float32) * xv[None, :]
            x_sum += xv
        s = tl.load(s_ptr + rows * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
        acc += s * (tl.reduce(partial, 1, _add) - z * tl.reduce(x_sum, 0, _add))

    is_first = pid_k == 0
    if HAS_LOWRANK:
        for r0 in range(0, tl.where(is_first, R, 0), BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.load(t_ptr + m.to(tl.int64) * stride_tm + offs_r, mask=mask_r, other=0.0)
            b = tl.load(b_ptr + rows[:, None] * stride_bn + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.reduce(b * t[None, :], 1, _add)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < tl.where(is_first, N, 0), other=0.0).to(tl.float32)
    out = out_ptr + pid_k.to(tl.int64) * stride_osplit + m.to(tl.int64) * stride_om + offs_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv_supported(x: torch.Tensor, qdata: torch.Tensor, bits: int | None, group_size: int) -> bool:
    """Whether :func:`packed_gemv` takes this product: a few rows, bit-packed int2/3/4 in 32-bit aligned rows,
    groups of a power-of-two number of 32-value chunks (32, 64, 128, 256, ...)."""
    chunks = group_size // _CHUNK
    return (bits in (2, 3, 4) and qdata.dtype == torch.uint8 and x.dim() == 2 and 0 < x.shape[0] <= MAX_M
            and group_size % _CHUNK == 0 and chunks & (chunks - 1) == 0 and x.shape[1] % group_size == 0 and qdata.is_contiguous()
            and qdata.data_ptr() % 4 == 0 and qdata.shape[1] * 8 == x.shape[1] * bits)


def packed_gemv(
    x: torch.Tensor, qdata: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
    *, block_n: int | None = None, split_k: int | None = None,
) -> torch.Tensor:
    """``x @ W_c^T + (x @ A^T) @ B^T + bias`` for ``x`` of ``M <= MAX_M`` rows and bit-packed ``qdata`` (uint8
    ``(N, K * bits / 8)``, ``packing.pack_intx``'s layout), one fp32 scale and int8 zero point per ``group_size``
    values (``(N, K / group_size)``). Returns ``(M, N)`` in ``x.dtype``; accumulation is fp32. ``block_n`` and
    ``split_k`` override the launch heuristics (tests)."""
    if not gemv_supported(x, qdata, bits, group_size):
        raise ValueError(f"packed_gemv takes M <= {MAX_M} rows, int2/3/4 packed rows of whole 32-bit words and groups "
                         f"of 32 x 2^k values; got x {tuple(x.shape)}, qdata {qdata.dtype} "
                         f"{tuple(qdata.shape)}, int{bits}, group {group_size}")
    if x.device.type != "cuda" and not is_interpreted():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before importing torchao_eora.kernels")
    M, K = x.shape
    N = qdata.shape[0]
    groups = K // group_size
    # value i of every 32-value chunk in row i: contiguous loads of x for the kernel's value-by-value loop
    xd = x.reshape(M, K // _CHUNK, _CHUNK).transpose(1, 2).contiguous()
    words = qdata.view(torch.int32)
    R = 0 if A is None else A.shape[0]
    if R:
        # t stays fp32 (rounding it to bf16 would cost the adapter most of its precision); on CUDA without an fp32
        # copy of A
        t = torch.mm(x, A.t(), out_dtype=torch.float32) if x.is_cuda and x.dtype != torch.float32 \
            else torch.mm(x.float(), A.float().t())
        B = B.contiguous()
    else:
        t = B = xd  # never read
    if block_n is None:
        block_n = 64 if x.is_cuda else 8
    if split_k is None:  # narrow layers: more programs than rows of blocks so every SM streams weights
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = max(1, min(groups, (2 * sms) // max(1, triton.cdiv(N, block_n) * M)))
    split = max(d for d in range(1, min(split_k, groups) + 1) if groups % d == 0)  # whole groups per split
    per_split = groups // split
    out = torch.empty((split, M, N), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n), M, split)
    _packed_gemv_kernel[grid](
        xd, words, scale.contiguous(), zero_point.contiguous(), x if bias is None else bias.contiguous(), t, B, out,
        N, K, R, per_split,
        K, words.stride(0), scale.stride(0), zero_point.stride(0), t.stride(0), B.stride(0), N, M * N,
        BITS=bits, GROUP_CHUNKS=group_size // _CHUNK, HAS_BIAS=bias is not None, HAS_LOWRANK=R > 0,
        BLOCK_N=block_n, BLOCK_R=min(64, max(16, triton.next_power_of_2(max(R, 1)))),
        num_warps=4,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
