"""The two operators of the residual path, as ``torch.library`` custom ops usable eagerly and under torch.compile.

- ``torchao_eora::quant_linear(x, qdata, scale, zero_point, group_size, bias)``: ``x @ W_c^T + bias`` for an intx
  base in torchao's portable layout (``W_c = (qdata - zero_point) * scale`` per group along the input dim).
- ``torchao_eora::eora_linear(x, qdata, scale, zero_point, group_size, A, B, bias)``: the same plus
  ``(x @ A^T) @ B^T``, the residual path fused into the base matmul.

``qdata`` is int8 (one intN value each) or uint8 holding bit-packed int2/int3/int4 values (``packing.py``; the
width follows from the row length ``x`` has). ``x`` is 2-D (callers flatten once). CPU runs a plain-PyTorch
implementation eagerly and lowers to its decomposition under torch.compile (see the end of this file); CUDA runs
the Triton kernels in ``torchao_eora.kernels`` and stays opaque, and the Inductor pass in
``torchao_eora.inductor_passes`` rewrites ``quant_linear + mm(mm(x, A^T), B^T)`` into ``eora_linear``.
Both ops are differentiable in ``x`` (and ``eora_linear`` in ``A`` and ``B``); the base stays frozen.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch._inductor.decomposition import register_decomposition

from .intx import dequantize_intx
from .packing import as_int8, packed_bits, packing_unit

__all__ = ["quant_linear", "eora_linear"]


def _check(x: Tensor, qdata: Tensor, scale: Tensor, group_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"quant_linear takes a 2-D input (tokens x in_features); got shape {tuple(x.shape)}")
    in_features = x.shape[1]
    fits = scale.shape[1] * group_size == in_features and qdata.dim() == 2
    if fits and qdata.dtype == torch.uint8:  # bit-packed: its row must hold in_features values of 2, 3 or 4 bits
        try:
            packed_bits(qdata.shape[1], in_features)
        except ValueError:
            fits = False
    elif fits:
        fits = qdata.shape[1] == in_features
    if not fits:
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, qdata {tuple(qdata.shape)}, scale {tuple(scale.shape)}, "
            f"group_size {group_size}"
        )


# ---- dequantized weights reused across calls (evaluation) -------------------------------------------------------

_REUSED: Optional[dict] = None  # id(qdata), dtype -> (qdata, weight), while reuse_dequantized() is active


@contextlib.contextmanager
def reuse_dequantized() -> Iterator[None]:
    """Inside, the reference paths dequantize each compressed weight once and reuse it on later calls: the same
    arithmetic on the same values, so the same outputs, for the memory of a dense copy of every weight used.
    Evaluation loops (many forwards of fixed weights) use it; training and compiled graphs never see it."""
    global _REUSED
    previous, _REUSED = _REUSED, {}
    try:
        yield
    finally:
        _REUSED = previous


def _dequantized(qdata: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    if _REUSED is None or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return dequantize_intx(qdata, scale, zero_point, group_size, dtype)
    key = (id(qdata), dtype)
    if key not in _REUSED:  # qdata is held with its weight, so its id stays its own
        _REUSED[key] = (qdata, dequantize_intx(qdata, scale, zero_point, group_size, dtype))
    return _REUSED[key][1]


# ---- base quantized linear --------------------------------------------------------------------------------------


@torch.library.custom_op("torchao_eora::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, bias: Optional[Tensor] = None
) -> Tensor:
    """``x @ W_c^T + bias`` (reference implementation: dequantize, then one matmul)."""
    _check(x, qdata, scale, group_size)
    w = _dequantized(qdata, scale, zero_point, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@quant_linear.register_fake
def _(x, qdata, scale, zero_point, group_size, bias=None):
    return x.new_empty(x.shape[0], qdata.shape[0])


def kernel_qdata(qdata: Tensor, in_features: int, group_size: int) -> Tensor:
    """``qdata`` as the Triton kernel reads it: int8 values, or packed int4 (two a byte, ``pack_int4``'s layout,
    which is ``packing.py``'s) as they are. Packed int2 / int3 are unpacked to int8 first, and so is packed int4
    with an odd group size (a byte would straddle two groups): the kernel decodes int4 nibbles only."""
    if qdata.dtype == torch.uint8 and (2 * qdata.shape[1] != in_features or group_size % 2):
        return as_int8(qdata, in_features)
    return qdata


# From this many rows on (prefill), a dequantized copy of the weight plus cuBLAS beats any fused kernel of ours:
# torchao's stock "dequantize, then cuBLAS" layer ran at 0.9x bf16 at M = 2048 on an H200, our tiled kernel at 1/16.
PREFILL_M = 128


def cuda_quant_linear(x, qdata, scale, zero_point, group_size, bias=None, A=None, B=None) -> Tensor:
    """The CUDA dispatch by batch size ``M``: prefill (``M >= PREFILL_M``) dequantizes the weight into a workspace
    and calls cuBLAS, the residual as two skinny GEMMs beside it (``W_c`` is not merged with ``B A``: no extra
    rounding of the weight); decode (``M <= gemv.MAX_M``) of bit-packed int2/3/4 reads the packed words as they
    lie (``kernels/gemv.py``); the sizes between go to the tiled dequantizing GEMM (``dequant_gemm``)."""
    from .kernels.dequant_gemm import quant_linear_triton
    from .kernels.gemv import gemv_supported, packed_gemv

    if x.shape[0] >= PREFILL_M:
        w = dequantize_intx(qdata, scale, zero_point, group_size, x.dtype)
        y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
        if A is None or A.shape[0] == 0:
            return y
        t = x.float() @ A.t().float()  # fp32, as in the kernels: a bf16 t costs the adapter most of its precision
        return y.add_((t @ B.t().float()).to(y.dtype))
    if qdata.dtype == torch.uint8:
        bits = packed_bits(qdata.shape[1], x.shape[1])
        if gemv_supported(x, qdata, bits, group_size):
            return packed_gemv(x, qdata, bits, scale, zero_point, group_size, bias, A, B)
    qdata = kernel_qdata(qdata, x.shape[1], group_size)
    return quant_linear_triton(x, qdata, scale, zero_point, group_size, bias, A, B)


@quant_linear.register_kernel("cuda")
def _(x, qdata, scale, zero_point, group_size, bias=None):
    return cuda_quant_linear(x, qdata, scale, zero_point, group_size, bias)


def _quant_linear_setup(ctx, inputs, output):
    x, qdata, scale, zero_point, group_size, bias = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.group_size = group_size
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _quant_linear_backward(ctx, grad):
    qdata, scale, zero_point = ctx.saved_tensors
    w = dequantize_intx(qdata, scale, zero_point, ctx.group_size, grad.dtype)
    grad_bias = grad.sum(0) if ctx.bias_needs_grad else None
    return grad @ w, None, None, None, None, grad_bias


quant_linear.register_autograd(_quant_linear_backward, setup_context=_quant_linear_setup)


# ---- fused base + residual -------------------------------------------------------------------------------------


@torch.library.custom_op("torchao_eora::eora_linear", mutates_args=())
def eora_linear(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    group_size: int,
    A: Tensor,
    B: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``x @ W_c^T + (x @ A^T) @ B^T + bias`` (reference implementation; CUDA fuses it into one kernel)."""
    _check(x, qdata, scale, group_size)
    w = _dequantized(qdata, scale, zero_point, group_size, x.dtype)
    y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    return torch.addmm(y, x @ A.t(), B.t())


@eora_linear.register_fake
def _(x, qdata, scale, zero_point, group_size, A, B, bias=None):
    return x.new_empty(x.shape[0], qdata.shape[0])


@eora_linear.register_kernel("cuda")
def _(x, qdata, scale, zero_point, group_size, A, B, bias=None):
    return cuda_quant_linear(x, qdata, scale, zero_point, group_size, bias, A, B)


def _eora_linear_setup(ctx, inputs, output):
    x, qdata, scale, zero_point, group_size, A, B, bias = inputs
    ctx.save_for_backward(x, qdata, scale, zero_point, A, B)
    ctx.group_size = group_size
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _eora_linear_backward(ctx, grad):
    x, qdata, scale, zero_point, A, B = ctx.saved_tensors
    w = dequantize_intx(qdata, scale, zero_point, ctx.group_size, grad.dtype)
    grad_t = grad @ B  # d/d(x A^T)
    grad_x = grad @ w + grad_t @ A
    grad_A = grad_t.t() @ x if A.requires_grad else None
    grad_B = grad.t() @ (x @ A.t()) if B.requires_grad else None
    grad_bias = grad.sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, None, None, grad_A, grad_B, grad_bias


eora_linear.register_autograd(_eora_linear_backward, setup_context=_eora_linear_setup)


# ---- CPU lowering under torch.compile ----------------------------------------------------------------------------
# On CPU there is no hand-written kernel that beats Inductor's own C++ codegen of "dequantize + matmul", so under
# torch.compile both ops lower to their decomposition there; for one token (decode) the base becomes a reduction that
# Inductor fuses with the dequantize. On CUDA (returning NotImplemented keeps the op) they stay opaque and run the
# Triton kernels. A single CPU token therefore never reaches the fusion pass: there is nothing left to fuse.


def compiled_cpu_token(x: Tensor) -> bool:
    """Whether ``x`` is one token on CPU inside torch.compile: where a matmul is best written as :func:`matvec`."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and _one_token(x)


def _one_token(x: Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(x.shape[0] == 1)


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for one token as multiply + sum, which Inductor fuses with whatever produced ``w`` (the
    dequantize): one pass over the int8 weight instead of writing an fp32 copy and calling a GEMV."""
    return (w * x).sum(-1, dtype=torch.float32).to(x.dtype).unsqueeze(0)


def _contiguous_copy(t: Tensor) -> Tensor:
    """``t.contiguous()`` that Inductor must write to a buffer of its own: a plain ``contiguous`` is inlined into the
    consumer, whose strided loads of ``x`` then keep the whole reduction scalar (8 ms instead of 0.2 ms measured)."""
    force = getattr(torch.ops.prims, "inductor_force_stride_order", None)  # registered by torch._inductor
    if force is None or not torch.compiler.is_compiling():
        return t.contiguous()
    from torch._prims_common import make_contiguous_strides_for

    return force(t, make_contiguous_strides_for(t.shape))


def packed_unit(qdata: Tensor, in_features: int, group_size: int) -> Optional[int]:
    """Values per packing unit of bit-packed ``qdata`` (rows of ``in_features`` values), or None where
    :func:`quant_matvec` dequantizes instead (int8 values, or a quantization group that splits a unit)."""
    unit = packing_unit(packed_bits(qdata.shape[1], in_features)) if qdata.dtype == torch.uint8 else None
    return None if unit is None or group_size % unit else unit


def deinterleave(x: Tensor, unit: int) -> Tensor:
    """One token ``x`` as ``(unit, n / unit)``: row ``i`` holds value ``i`` of every packing unit, in a buffer of its
    own, so :func:`quant_matvec` loads it contiguously. Layers that read the same ``x`` share one copy."""
    return _contiguous_copy(x.reshape(-1, unit).t())


def quant_matvec(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    group_size: int,
    xs: Optional[Tensor] = None,
    out_unit: Optional[int] = None,
) -> Tensor:
    """``x @ W^T`` for one token, ``W = dequantize_intx(qdata, ...)``, as reductions Inductor fuses with the
    dequantize (:func:`matvec`). Bit-packed values are read where they lie: value ``i`` of every packing unit
    (columns ``unit * k + i``) is multiplied with a de-interleaved copy of ``x``, so every load is contiguous, and
    the products of a unit are summed in one reduction; the bit fields are cut with float arithmetic (a unit's bytes
    as one exact signed float32 below 2**24, ``floor`` of power-of-two divisions), which Inductor's C++ backend
    vectorizes where it leaves integer shifts scalar (measured: unpacking into column order with shifts made decode
    4-9x slower than int8 values).

    ``xs``: ``deinterleave(x, unit)`` made already (shared with another product of ``x``; ``unit`` is
    ``packed_unit(qdata, ...)``); ``x`` is then read only where that unit is None. ``out_unit``: return the result
    de-interleaved, ``(out_unit, out / out_unit)``, ready as the ``xs`` of a product that reads it packed (written so
    by the reduction itself: no copy)."""
    unit = packed_unit(qdata, x.shape[-1], group_size)
    if unit is None:
        y = matvec(x, dequantize_intx(qdata, scale, zero_point, group_size, x.dtype))
        return y if out_unit is None else deinterleave(y, out_unit)
    bits = packed_bits(qdata.shape[1], x.shape[-1])
    n_bytes, groups = unit * bits // 8, scale.shape[1]
    rows, per_group = qdata.shape[0], group_size // unit  # packing units per quantization group
    # the unit's bytes as planes (int3: a de-interleaved copy, for contiguous loads as with x below)
    planes = qdata.reshape(rows * groups * per_group, n_bytes).t()
    planes = (planes if n_bytes == 1 else _contiguous_copy(planes)).reshape(n_bytes, rows, groups, per_group)
    # The unit as one signed integer (its last byte read as int8): then its top value needs no sign fix-up
    word = planes[n_bytes - 1].view(torch.int8).to(torch.float32)
    for j in range(n_bytes - 2, -1, -1):
        word = word * 256.0 + planes[j].to(torch.float32)  # exact: at most 24 bits
    s, z = scale.reshape(rows, groups, 1).to(x.dtype), zero_point.reshape(rows, groups, 1).to(x.dtype)
    xs = (deinterleave(x, unit) if xs is None else xs).reshape(unit, groups, per_group)
    half, full = float(1 << (bits - 1)), float(1 << bits)
    products = None
    for i in range(unit):
        shifted = torch.floor(word * (1.0 / (1 << (bits * i)))) if i else word  # word >> bits*i, arithmetic
        # value i, signed: shifted - full * round-half-up(shifted / full); the top value is shifted itself
        signed = shifted if i == unit - 1 else shifted - full * torch.floor((shifted + half) * (1.0 / full))
        w = (signed.to(x.dtype) - z) * s  # dequantize_intx's arithmetic
        term = w.to(torch.float32) * xs[i].to(torch.float32)  # fp32 products: half inputs add no rounding here
        products = term if products is None else products + term
    if out_unit is not None:  # output (i, r) is row r * out_unit + i: de-interleaved as the reduction writes it
        products = products.reshape(rows // out_unit, out_unit, groups, per_group).transpose(0, 1)
    # one reduction over the bytes, not one per value of a unit: short rows (B's) pay a horizontal sum per reduction
    y = products.sum((-2, -1), dtype=torch.float32).to(x.dtype)
    return y.unsqueeze(0) if out_unit is None else y


def register_kernel_fallbacks() -> None:
    """Lower both ops to themselves (their Triton kernels) where the decompositions below decline (off CPU).
    Inductor would make this fallback implicitly, but torch 2.11 refuses that for an op that has a decomposition
    ("both a fallback and a decomp for same op", seen on an H200). Called from inside a compile (the decompositions,
    the fusion pass), where torch._inductor.lowering is already imported: importing it with the package cost 1 s."""
    from torch._inductor.lowering import constrain_to_fake_tensors, lowerings, make_fallback

    for op in (torch.ops.torchao_eora.quant_linear.default, torch.ops.torchao_eora.eora_linear.default):
        if op not in lowerings:
            make_fallback(op, layout_constraint=constrain_to_fake_tensors, override_decomp=True)


@register_decomposition([torch.ops.torchao_eora.quant_linear.default])
def _quant_linear_cpu_lowering(x, qdata, scale, zero_point, group_size, bias=None):
    if x.device.type != "cpu":
        register_kernel_fallbacks()
        return NotImplemented
    if _one_token(x):
        y = quant_matvec(x, qdata, scale, zero_point, group_size)
        return y if bias is None else y + bias
    w = dequantize_intx(qdata, scale, zero_point, group_size, x.dtype)
    return torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())


@register_decomposition([torch.ops.torchao_eora.eora_linear.default])
def _eora_linear_cpu_lowering(x, qdata, scale, zero_point, group_size, A, B, bias=None):
    if x.device.type != "cpu":
        register_kernel_fallbacks()
        return NotImplemented
    y = _quant_linear_cpu_lowering(x, qdata, scale, zero_point, group_size, bias)
    if _one_token(x):  # reductions Inductor fuses with the layer, not two GEMV calls: decode 0.73 -> 0.92 of the base
        return y + matvec(matvec(x, A), B)
    return y + torch.mm(torch.mm(x, A.t()), B.t())
