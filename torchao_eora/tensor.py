"""``QuantWithLowRank``: a compressed weight plus a residual low-rank path, ``y = W_c x + B (A x)``.

The base weight uses torchao's portable intx fields (``qdata`` int8 holding intN values, per-group ``scale`` and
``zero_point``, as in ``IntxUnpackedToInt8Tensor``), or a dense pruned ``qdata`` with no scale. ``A`` (r x in) and
``B`` (out x r) are plain tensors in the compute dtype, or, quantized (``adapter_dtype`` set), int8 tensors holding
intN values with their own per-group ``A_scale`` / ``A_zero_point`` and ``B_scale`` / ``B_zero_point`` (the same
layout as the base; ``A`` grouped along ``in``, ``B`` along the rank). Every inner tensor is a plain contiguous
tensor so the subclass flattens one level deep (torch.compile, state_dict, safetensors).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from .adapter_quant import QuantizedFactors
from .compression import CompressedWeight, dequantize_weight
from .ops import quant_linear
from .solver import LowRankFactors

__all__ = ["QuantWithLowRank"]

aten = torch.ops.aten
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantWithLowRank(TorchAOBaseTensor):
    """A compressed linear weight with an EoRA residual: behaves as the dense ``W_c + B @ A`` in ``F.linear``.

    Tensor fields: ``qdata`` (out x in; int8 intN values, or floating point for a pruned-only base), ``A``
    (rank x in), ``B`` (out x rank), and optional ``scale`` / ``zero_point`` (out x in/group_size).
    Quantized adapters add ``A_scale`` / ``A_zero_point`` (rank x in/adapter_group_size) and ``B_scale`` /
    ``B_zero_point`` (out x rank/adapter_group_size); ``A`` and ``B`` are then int8.
    Attributes: ``target_dtype`` (``torch.int2`` .. ``torch.int8``, or None for a dense base), ``group_size``,
    ``dtype`` (the compute / dequantized dtype), ``adapter_dtype`` (``torch.int2`` .. ``torch.int8``, or None for
    full-precision adapters) and ``adapter_group_size``.
    """

    tensor_data_names = ["qdata", "A", "B"]
    tensor_attribute_names = ["target_dtype", "group_size", "dtype"]
    # New fields go at the end (constructor order = these lists): other code builds this class positionally.
    optional_tensor_data_names = ["scale", "zero_point", "A_scale", "A_zero_point", "B_scale", "B_zero_point"]
    optional_tensor_attribute_names = ["adapter_dtype", "adapter_group_size"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        target_dtype: Optional[torch.dtype],
        group_size: Optional[int],
        dtype: torch.dtype,
        scale: Optional[torch.Tensor] = None,
        zero_point: Optional[torch.Tensor] = None,
        A_scale: Optional[torch.Tensor] = None,
        A_zero_point: Optional[torch.Tensor] = None,
        B_scale: Optional[torch.Tensor] = None,
        B_zero_point: Optional[torch.Tensor] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        adapter_group_size: Optional[int] = None,
    ):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        target_dtype: Optional[torch.dtype],
        group_size: Optional[int],
        dtype: torch.dtype,
        scale: Optional[torch.Tensor] = None,
        zero_point: Optional[torch.Tensor] = None,
        A_scale: Optional[torch.Tensor] = None,
        A_zero_point: Optional[torch.Tensor] = None,
        B_scale: Optional[torch.Tensor] = None,
        B_zero_point: Optional[torch.Tensor] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        adapter_group_size: Optional[int] = None,
    ):
        super().__init__()
        out_features, in_features = qdata.shape
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"low-rank factors do not fit a {out_features}x{in_features} weight: A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}; expected A (r x {in_features}) and B ({out_features} x r)"
            )
        if target_dtype is not None and (scale is None or zero_point is None or qdata.dtype != torch.int8):
            raise ValueError("an intx base needs int8 qdata plus scale and zero_point")
        adapter_fields = (A_scale, A_zero_point, B_scale, B_zero_point)
        if adapter_dtype is not None and (
            any(t is None for t in adapter_fields) or A.dtype != torch.int8 or B.dtype != torch.int8
            or not adapter_group_size
        ):
            raise ValueError("intx adapters need int8 A and B, A/B scale and zero_point, and adapter_group_size")
        if adapter_dtype is None and any(t is not None for t in adapter_fields):
            raise ValueError("adapter scales or zero points given without adapter_dtype")
        self.qdata = qdata
        self.A = A
        self.B = B
        self.target_dtype = target_dtype
        self.group_size = group_size
        self.scale = scale
        self.zero_point = zero_point
        self.A_scale = A_scale
        self.A_zero_point = A_zero_point
        self.B_scale = B_scale
        self.B_zero_point = B_zero_point
        self.adapter_dtype = adapter_dtype
        self.adapter_group_size = adapter_group_size

    # ---- construction and views -------------------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        base: CompressedWeight,
        factors: LowRankFactors | QuantizedFactors,
        dtype: torch.dtype = torch.float32,
    ) -> "QuantWithLowRank":
        """Assemble from a compressed base and low-rank factors (full precision, or intx ``QuantizedFactors``);
        floating fields are cast to ``dtype``."""
        qdata = base.qdata.contiguous() if base.bits is not None else base.qdata.to(dtype).contiguous()
        base_fields = (
            base.target_dtype,
            base.group_size,
            dtype,
            None if base.scale is None else base.scale.to(dtype).contiguous(),
            None if base.zero_point is None else base.zero_point.contiguous(),
        )
        if isinstance(factors, QuantizedFactors):
            qa, qb = factors.A, factors.B
            return cls(
                qdata, qa.qdata.contiguous(), qb.qdata.contiguous(), *base_fields,
                qa.scale.to(dtype).contiguous(), qa.zero_point.contiguous(),
                qb.scale.to(dtype).contiguous(), qb.zero_point.contiguous(),
                qa.target_dtype, factors.group_size,
            )
        return cls(qdata, factors.A.to(dtype).contiguous(), factors.B.to(dtype).contiguous(), *base_fields)

    def with_factors(self, A: torch.Tensor, B: torch.Tensor) -> "QuantWithLowRank":
        """The same compressed base with new full-precision factors (rank may change, even to 0); quantized
        adapters are replaced too (the result has full-precision ones)."""
        return QuantWithLowRank(
            self.qdata, A.to(self.dtype).contiguous(), B.to(self.dtype).contiguous(), self.target_dtype,
            self.group_size, self.dtype, self.scale, self.zero_point,
        )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def bits(self) -> Optional[int]:
        return _bits_of(self.target_dtype)

    @property
    def adapter_bits(self) -> Optional[int]:
        """Bit width of quantized adapters, or None for full-precision ``A`` and ``B``."""
        return _bits_of(self.adapter_dtype)

    def base(self) -> CompressedWeight:
        return CompressedWeight(self.qdata, self.scale, self.zero_point, self.bits, self.group_size)

    def dequantize_base(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The compressed weight ``W_c`` alone."""
        return dequantize_weight(
            self.qdata, self.scale, self.zero_point, self.target_dtype, self.group_size, dtype or self.dtype
        )

    def dequantize_A(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The down-projection ``A`` (rank x in) in a floating dtype; every consumer of A goes through here."""
        if self.adapter_dtype is None:
            return self.A.to(dtype or self.dtype)
        return dequantize_weight(
            self.A, self.A_scale, self.A_zero_point, self.adapter_dtype, self.adapter_group_size, dtype or self.dtype
        )

    def dequantize_B(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The up-projection ``B`` (out x rank) in a floating dtype; every consumer of B goes through here."""
        if self.adapter_dtype is None:
            return self.B.to(dtype or self.dtype)
        return dequantize_weight(
            self.B, self.B_scale, self.B_zero_point, self.adapter_dtype, self.adapter_group_size, dtype or self.dtype
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense effective weight ``W_c + B @ A`` (what a merged, plain checkpoint would hold)."""
        dtype = dtype or self.dtype
        return self.dequantize_base(dtype) + (self.dequantize_B(dtype) @ self.dequantize_A(dtype))

    def describe_base(self) -> str:
        if self.target_dtype is None:
            return f"dense {self.qdata.dtype}".replace("torch.", "")
        return f"int{self.bits} g{self.group_size}"

    def describe_adapters(self) -> str:
        if self.adapter_dtype is None:
            return str(self.dtype).replace("torch.", "")
        return f"int{self.adapter_bits} g{self.adapter_group_size}"

    def _quantization_type(self) -> str:
        return (
            f"base={self.describe_base()}, rank={self.rank}, adapters={self.describe_adapters()}, "
            f"shape={tuple(self.shape)}, dtype={self.dtype}"
        )

    def __repr__(self) -> str:
        return f"QuantWithLowRank({self._quantization_type()}, device={self.device})"


def _bits_of(dtype: Optional[torch.dtype]) -> Optional[int]:
    return None if dtype is None else int(str(dtype).removeprefix("torch.int"))


def _register_with_torchao_safetensors() -> None:
    """torchao (and transformers through it) only (de)serializes tensor subclasses it has been told about."""
    from torchao.prototype.safetensors import safetensors_utils

    if "QuantWithLowRank" not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append("QuantWithLowRank")
    safetensors_utils.ALLOWED_CLASSES["QuantWithLowRank"] = QuantWithLowRank


_register_with_torchao_safetensors()

implements = QuantWithLowRank.implements
implements_torch_function = QuantWithLowRank.implements_torch_function


def _low_rank_linear(x: torch.Tensor, weight: QuantWithLowRank, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Flatten to 2-D once so 2-D and 3-D inputs give the same graph (the fusion pass matches one pattern).
    x2 = x.reshape(-1, x.shape[-1])
    if weight.target_dtype is None:  # a dense (pruned-only) base
        y = F.linear(x2, weight.qdata.to(x.dtype), bias)
    else:
        y = quant_linear(x2, weight.qdata, weight.scale, weight.zero_point, weight.group_size, bias)
    if weight.rank:
        y = y + (x2 @ weight.dequantize_A(x.dtype).t()) @ weight.dequantize_B(x.dtype).t()
    return y.reshape(*x.shape[:-1], y.shape[-1])


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, weight, bias = fill_defaults(args, 3, [None])
    return _low_rank_linear(x, weight, bias)


# Paths that reach the weight outside F.linear (decompositions, user code) see the dense effective weight:
# always correct, never the fast path.
@implements(aten.t.default)
def _(func, types, args, kwargs):
    return args[0].dequantize().t()


@implements([aten.mm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    a, b = args[0], args[1]
    a = a.dequantize() if isinstance(a, QuantWithLowRank) else a
    b = b.dequantize() if isinstance(b, QuantWithLowRank) else b
    return func(a, b)


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    a = a.dequantize() if isinstance(a, QuantWithLowRank) else a
    b = b.dequantize() if isinstance(b, QuantWithLowRank) else b
    return func(bias, a, b, **kwargs)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """``.to(device)`` moves every field; ``.to(dtype)`` recasts the floating fields (int values stay int8)."""
    self: QuantWithLowRank = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = to["device"], to["dtype"]
    if dtype not in _FLOAT_TYPES:
        raise TypeError(f"QuantWithLowRank computes in a floating dtype ({_FLOAT_TYPES}), got {dtype}")

    def floating(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    def moved(t):
        return None if t is None else t.to(device)

    qdata = self.qdata.to(device) if self.target_dtype is not None else floating(self.qdata)
    quantized_adapters = self.adapter_dtype is not None
    A, B = (moved(self.A), moved(self.B)) if quantized_adapters else (floating(self.A), floating(self.B))
    new = QuantWithLowRank(
        qdata, A, B, self.target_dtype, self.group_size, dtype, floating(self.scale), moved(self.zero_point),
        floating(self.A_scale), moved(self.A_zero_point), floating(self.B_scale), moved(self.B_zero_point),
        self.adapter_dtype, self.adapter_group_size,
    )
    return return_and_correct_aliasing(func, args, kwargs, new)


def _piece(self: QuantWithLowRank, dim: int, start: int, end: int) -> QuantWithLowRank:
    """Rows or columns ``[start:end]`` of ``self`` as a contiguous ``QuantWithLowRank`` (tensor parallelism).

    Rows cut ``qdata`` and ``B`` (with ``B``'s per-row groups); columns cut ``qdata`` and ``A`` (with ``A``'s
    groups along ``in``), so column bounds must align with ``group_size`` and ``adapter_group_size``: a group's
    scale cannot be shared by two shards.
    """
    if not -2 <= dim < 2:
        raise IndexError(f"QuantWithLowRank is 2-D; cannot slice dim {dim}")
    dim %= 2

    def cut(t, index):
        return None if t is None else t[index]

    if dim == 0:
        rows = slice(start, end)
        new = QuantWithLowRank(
            self.qdata[rows], self.A, self.B[rows], self.target_dtype, self.group_size, self.dtype,
            cut(self.scale, rows), cut(self.zero_point, rows), self.A_scale, self.A_zero_point,
            cut(self.B_scale, rows), cut(self.B_zero_point, rows), self.adapter_dtype, self.adapter_group_size,
        )
    else:
        g, ag = self.group_size or 1, self.adapter_group_size or 1
        for what, size in (("group_size", g), ("adapter_group_size", ag)):
            if start % size or end % size:
                raise ValueError(f"column slice [{start}:{end}] must align with {what} {size}")
        cols, groups, adapter_groups = slice(start, end), slice(start // g, end // g), slice(start // ag, end // ag)
        new = QuantWithLowRank(
            self.qdata[:, cols], self.A[:, cols], self.B, self.target_dtype, self.group_size, self.dtype,
            cut(self.scale, (slice(None), groups)), cut(self.zero_point, (slice(None), groups)),
            cut(self.A_scale, (slice(None), adapter_groups)), cut(self.A_zero_point, (slice(None), adapter_groups)),
            self.B_scale, self.B_zero_point, self.adapter_dtype, self.adapter_group_size,
        )
    return new._apply_fn_to_data(torch.Tensor.contiguous)


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    """Row (output) or column (input) slices for tensor parallelism; columns must align with quant groups."""
    self: QuantWithLowRank = args[0]
    _, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    if step != 1:
        raise NotImplementedError("QuantWithLowRank only supports contiguous slices (step 1)")
    size = self.shape[dim]
    start, end = (start or 0), min(size if end is None else end, size)
    return return_and_correct_aliasing(func, args, kwargs, _piece(self, dim, start, end))


@implements([aten.split.Tensor, aten.split_with_sizes.default])
def _(func, types, args, kwargs):
    """``split`` / ``chunk`` (which decomposes to ``split``) into row or column shards, via :func:`_piece`."""
    self: QuantWithLowRank = args[0]
    _, sizes, dim = fill_defaults(args, 3, [0])
    total = self.shape[dim]
    if isinstance(sizes, int):  # split_size: equal pieces, the last one possibly shorter
        if sizes <= 0:
            raise ValueError(f"split size must be positive, got {sizes}")
        sizes = [min(sizes, total - start) for start in range(0, total, sizes)]
    if sum(sizes) != total:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {total} (dim {dim})")
    bounds = [0, *itertools.accumulate(sizes)]
    pieces = [_piece(self, dim, start, end) for start, end in zip(bounds, bounds[1:])]
    return return_and_correct_aliasing(func, args, kwargs, pieces)
