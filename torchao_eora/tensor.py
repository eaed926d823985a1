"""``QuantWithLowRank``: a compressed weight plus a residual low-rank path, ``y = W_c x + B (A x)``.

The base weight uses torchao's portable intx fields (``qdata`` holding intN values, per-group ``scale`` and
``zero_point``, as in ``IntxUnpackedToInt8Tensor``), or a dense pruned ``qdata`` with no scale. ``A`` (r x in) and
``B`` (out x r) are plain tensors in the compute dtype, or, quantized (``adapter_dtype`` set), tensors holding
intN values with their own per-group ``A_scale`` / ``A_zero_point`` and ``B_scale`` / ``B_zero_point`` (the same
layout as the base; ``A`` grouped along ``in``, ``B`` along the rank). intN values of 2, 3 or 4 bits are held
bit-packed in uint8, row by row (``packing.py``; see the class docstring), wider ones one per int8. Every inner
tensor is a plain contiguous tensor so the subclass flattens one level deep (torch.compile, state_dict, safetensors).
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from .adapter_quant import QuantizedFactors
from .compressors import CompressedWeight
from .intx import dequantize_weight
from .ops import compiled_cpu_token, deinterleave, matvec, packed_unit, quant_linear, quant_matvec
from .packing import can_pack, pack_intx, packed_cols, packing_unit, unpack_intx
from .solver import LowRankFactors

__all__ = ["Field", "QuantWithLowRank"]

_ADAPTER_QPARAMS = ("A_scale", "A_zero_point", "B_scale", "B_zero_point")
# What an instance holds (and torch.compile sees): the checkpoint fields, with the four above joined in one tensor.
_HELD = ("qdata", "A", "B", "scale", "zero_point", "adapter_qparams")

aten = torch.ops.aten
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


class Field(NamedTuple):
    """One tensor field of ``QuantWithLowRank``: its shape in the layer's dimensions, what it holds, and its part.

    ``rows`` / ``cols`` name dimensions (``"out"``, ``"in"``, ``"rank"``); a scale or zero point has one column
    per group of ``cols`` (its part's group size). ``role``: ``"values"`` are intN values when the part's dtype
    attribute is set (int8, or uint8 bit-packed along ``cols``: see ``QuantWithLowRank``), else floating; a
    ``"scale"`` is floating; a ``"zero_point"`` is int8. ``part``:
    ``"base"`` (``target_dtype``, ``group_size``) or ``"adapters"`` (``adapter_dtype``, ``adapter_group_size``).
    """

    rows: str
    cols: str
    role: str
    part: str

    @property
    def dtype_attribute(self) -> str:
        """The attribute holding this field's part's intN dtype (None: floating values)."""
        return "target_dtype" if self.part == "base" else "adapter_dtype"

    @property
    def group_attribute(self) -> str:
        """The attribute holding this field's part's group size."""
        return "group_size" if self.part == "base" else "adapter_group_size"

    def is_floating(self, part_dtype) -> bool:
        """Whether this field is floating point, given its part's intN dtype (None, or empty: floating values)."""
        return self.role == "scale" or (self.role == "values" and not part_dtype)

    def shape(
        self, dims: Mapping[str, Optional[int]], group: Optional[int], packed_bits: Optional[int] = None
    ) -> Optional[tuple[int, int]]:
        """``(rows, cols)`` given the layer's dimensions and the part's group size; None where one is unknown
        (or, for a scale or zero point, without a group size). ``packed_bits``: values stored bit-packed at that
        width (``cols * bits / 8`` bytes a row; None where the row length does not pack)."""
        rows, cols = dims.get(self.rows), dims.get(self.cols)
        if self.role != "values":
            cols = cols // group if group and cols is not None else None
        elif packed_bits is not None and cols is not None:
            cols = packed_cols(packed_bits, cols) if can_pack(packed_bits, cols) else None
        return None if rows is None or cols is None else (rows, cols)


class QuantWithLowRank(TorchAOBaseTensor):
    """A compressed linear weight with an EoRA residual: behaves as the dense ``W_c + B @ A`` in ``F.linear``.

    The layout is declared once, in ``fields`` (the tensors) and the attribute lists below it; torchao's
    ``tensor_data_names`` / ``optional_tensor_data_names`` are derived from ``fields``, and the checkpoint
    checks (``hf``), the size count (``size``) and the ops here (``.to``, slices, splits) all read it.
    Tensor fields: ``qdata`` (out x in; intN values, or floating point for a pruned-only base), ``A``
    (rank x in), ``B`` (out x rank), and optional ``scale`` / ``zero_point`` (out x in/group_size).
    Quantized adapters add ``A_scale`` / ``A_zero_point`` (rank x in/adapter_group_size) and ``B_scale`` /
    ``B_zero_point`` (out x rank/adapter_group_size); ``A`` and ``B`` then hold intN values too.
    Attributes: ``target_dtype`` (``torch.int2`` .. ``torch.int8``, or None for a dense base), ``group_size``,
    ``dtype`` (the compute / dequantized dtype), ``adapter_dtype`` (``torch.int2`` .. ``torch.int8``, or None for
    full-precision adapters) and ``adapter_group_size``.
    Build it by keyword; the scale, zero point and adapter fields are keyword-only.

    Packed storage (in memory and in checkpoints): intN values (``qdata`` of an intx base; ``A`` and ``B`` of
    quantized adapters) of 2, 3 or 4 bits are held bit-packed along their columns, row by row, as uint8
    ``(rows, cols * N / 8)``: each row a little-endian bit stream, int4 two values a byte (column ``2j`` in the
    low nibble), int2 four a byte, int3 eight in three bytes (``packing.py``). A reader tells the two layouts
    apart by the dtype: **uint8 is packed**, its width N the part's ``target_dtype`` / ``adapter_dtype``; **int8
    is one value a byte**: widths 5 to 8, rows whose length is not a multiple of the packing unit (4 values for
    int2, 8 for int3, 2 for int4), and checkpoints written before packing existed. The constructor packs int8
    values whenever their width and row length allow, so a ``QuantWithLowRank`` always has the one canonical
    layout (an old checkpoint is packed as it loads); ``values(name)`` gives a field's values one per int8.

    Held in memory, quantized adapters' four scale and zero point fields are one flat tensor, ``adapter_qparams``
    (``A_scale``, ``A_zero_point``, ``B_scale``, ``B_zero_point`` in that order, each row-major, zero points in the
    compute dtype, exact), and ``A_scale`` ... are copies made from it on access (checkpoints keep the four fields,
    int8 zero points). Why: torch.compile makes each inner tensor a graph input, paid for on every call (a guard,
    an unwrap, a size assert: about 2.4 us each, measured on CPU decode), and four a layer were what made int4
    adapters slower than fp32 ones. The compute paths read views of it (``adapter_qparams_of``).
    """

    fields = {
        "qdata": Field("out", "in", "values", "base"),
        "A": Field("rank", "in", "values", "adapters"),
        "B": Field("out", "rank", "values", "adapters"),
        "scale": Field("out", "in", "scale", "base"),
        "zero_point": Field("out", "in", "zero_point", "base"),
        "A_scale": Field("rank", "in", "scale", "adapters"),
        "A_zero_point": Field("rank", "in", "zero_point", "adapters"),
        "B_scale": Field("out", "rank", "scale", "adapters"),
        "B_zero_point": Field("out", "rank", "zero_point", "adapters"),
    }
    # Values are always present; scales and zero points only for an intx part. (These orders are torchao's
    # constructor and serialization orders: checkpoints list the names in them.)
    tensor_data_names = [name for name, field in fields.items() if field.role == "values"]
    optional_tensor_data_names = [name for name, field in fields.items() if field.role != "values"]
    tensor_attribute_names = ["target_dtype", "group_size", "dtype"]
    optional_tensor_attribute_names = ["adapter_dtype", "adapter_group_size"]

    def __new__(cls, qdata: torch.Tensor, A: torch.Tensor, B: torch.Tensor, target_dtype, group_size, dtype, **_):
        shape = (qdata.shape[0], _cols(qdata, _bits_of(target_dtype))) if qdata.dim() == 2 else qdata.shape
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(
        self,
        qdata: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        target_dtype: Optional[torch.dtype],
        group_size: Optional[int],
        dtype: torch.dtype,
        *,
        scale: Optional[torch.Tensor] = None,
        zero_point: Optional[torch.Tensor] = None,
        A_scale: Optional[torch.Tensor] = None,
        A_zero_point: Optional[torch.Tensor] = None,
        B_scale: Optional[torch.Tensor] = None,
        B_zero_point: Optional[torch.Tensor] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        adapter_group_size: Optional[int] = None,
        adapter_qparams: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        bits, adapter_bits = _bits_of(target_dtype), _bits_of(adapter_dtype)
        if target_dtype is not None and (scale is None or zero_point is None or not _holds_intx(qdata, bits)):
            raise ValueError("an intx base needs int8 (or uint8 bit-packed) qdata plus scale and zero_point")
        adapter_fields = (A_scale, A_zero_point, B_scale, B_zero_point)
        if adapter_dtype is not None and (
            (adapter_qparams is None and any(t is None for t in adapter_fields)) or not _holds_intx(A, adapter_bits)
            or not _holds_intx(B, adapter_bits) or not adapter_group_size
        ):
            raise ValueError(
                "intx adapters need int8 (or uint8 bit-packed) A and B, A/B scale and zero_point, and "
                "adapter_group_size"
            )
        qdata, A, B = _packed(qdata, bits), _packed(A, adapter_bits), _packed(B, adapter_bits)
        out_features, in_features = qdata.shape[0], _cols(qdata, bits)
        if _cols(A, adapter_bits) != in_features or B.shape[0] != out_features or A.shape[0] != _cols(B, adapter_bits):
            raise ValueError(
                f"low-rank factors do not fit a {out_features}x{in_features} weight: A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}; expected A (r x {in_features}) and B ({out_features} x r)"
                + (" (packed: uint8, columns x bits / 8)" if A.dtype == torch.uint8 else "")
            )
        if adapter_dtype is None and any(t is not None for t in (*adapter_fields, adapter_qparams)):
            raise ValueError("adapter scales or zero points given without adapter_dtype")
        if adapter_dtype is not None:
            shapes = _qparam_shapes(A, B, in_features, adapter_group_size)
            if adapter_qparams is None:
                adapter_qparams = _join_qparams(adapter_fields, shapes, dtype)
            elif tuple(adapter_qparams.shape) != (sum(rows * cols for rows, cols in shapes),):
                raise ValueError(f"adapter_qparams has shape {tuple(adapter_qparams.shape)}; expected {shapes} joined")
        self.qdata, self.A, self.B, self.scale, self.zero_point = qdata, A, B, scale, zero_point
        self.adapter_qparams = adapter_qparams
        self.target_dtype, self.group_size = target_dtype, group_size
        self.adapter_dtype, self.adapter_group_size = adapter_dtype, adapter_group_size
        self.compute_dtype = dtype  # self.dtype, read without the 1.4 us __torch_function__ round trip (measured)

    def __tensor_flatten__(self) -> tuple[list[str], dict]:
        """torchao's flatten, written out: the present held tensors (``_HELD``: the ``fields``, the adapter scales
        and zero points as the one ``adapter_qparams``) and every attribute. A compiled step's guards call it twice
        per weight per call; torchao's generic version took 3 us (measured), a millisecond a token over SmolLM2's 210
        weights."""
        d = self.__dict__
        names = [name for name in _HELD if d[name] is not None]
        dtype = d.get("compute_dtype") or self.dtype  # a weight pickled before compute_dtype existed has none
        return names, {"target_dtype": d["target_dtype"], "group_size": d["group_size"], "dtype": dtype,
                       "adapter_dtype": d["adapter_dtype"], "adapter_group_size": d["adapter_group_size"]}

    @classmethod
    def __tensor_unflatten__(cls, tensors: dict, attributes: dict, outer_size, outer_stride) -> "QuantWithLowRank":
        """Either form: the held tensors (what ``__tensor_flatten__`` gives) or the checkpoint ``fields``."""
        return cls(**tensors, **attributes)

    # ---- adapter scales and zero points: one tensor in memory, four fields in checkpoints -----------------------

    def adapter_qparams_of(self, factor: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of quantized factor ``"A"`` or ``"B"`` as views of ``adapter_qparams``, the zero
        point in the compute dtype (exact: intN zero points are small integers). What the compute paths read."""
        shapes = _qparam_shapes(self.A, self.B, self.shape[1], self.adapter_group_size)
        offset, views = 0, {}
        for name, shape in zip(_ADAPTER_QPARAMS, shapes):
            n = shape[0] * shape[1]
            views[name] = self.adapter_qparams[offset : offset + n].view(shape)
            offset += n
        return views[f"{factor}_scale"], views[f"{factor}_zero_point"]

    def _adapter_field(self, name: str) -> Optional[torch.Tensor]:
        """A checkpoint field (``A_scale`` ...) as a tensor of its own: a copy, so that no two saved tensors share
        memory (safetensors refuses that), zero points as int8."""
        if self.adapter_qparams is None:
            return None
        factor, what = name.split("_", 1)
        scale, zero_point = self.adapter_qparams_of(factor)
        return scale.clone() if what == "scale" else zero_point.to(torch.int8)

    A_scale = property(lambda self: self._adapter_field("A_scale"), doc="``A``'s per-group scales (a copy).")
    A_zero_point = property(lambda self: self._adapter_field("A_zero_point"), doc="``A``'s zero points (int8 copy).")
    B_scale = property(lambda self: self._adapter_field("B_scale"), doc="``B``'s per-group scales (a copy).")
    B_zero_point = property(lambda self: self._adapter_field("B_zero_point"), doc="``B``'s zero points (int8 copy).")

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
        base_fields = dict(
            qdata=qdata,
            target_dtype=base.target_dtype,
            group_size=base.group_size,
            dtype=dtype,
            scale=None if base.scale is None else base.scale.to(dtype).contiguous(),
            zero_point=None if base.zero_point is None else base.zero_point.contiguous(),
        )
        if isinstance(factors, QuantizedFactors):
            qa, qb = factors.A, factors.B
            return cls(
                **base_fields,
                A=qa.qdata.contiguous(),
                B=qb.qdata.contiguous(),
                A_scale=qa.scale.to(dtype).contiguous(),
                A_zero_point=qa.zero_point.contiguous(),
                B_scale=qb.scale.to(dtype).contiguous(),
                B_zero_point=qb.zero_point.contiguous(),
                adapter_dtype=qa.target_dtype,
                adapter_group_size=factors.group_size,
            )
        return cls(**base_fields, A=factors.A.to(dtype).contiguous(), B=factors.B.to(dtype).contiguous())

    def with_factors(self, A: torch.Tensor, B: torch.Tensor) -> "QuantWithLowRank":
        """The same compressed base with new full-precision factors (rank may change, even to 0); quantized
        adapters are replaced too (the result has full-precision ones)."""
        return QuantWithLowRank(
            qdata=self.qdata,
            A=A.to(self.dtype).contiguous(),
            B=B.to(self.dtype).contiguous(),
            target_dtype=self.target_dtype,
            group_size=self.group_size,
            dtype=self.dtype,
            scale=self.scale,
            zero_point=self.zero_point,
        )

    def _rebuild(self, fn: Callable[[Field, torch.Tensor], torch.Tensor], **attributes) -> "QuantWithLowRank":
        """A new ``QuantWithLowRank`` whose present tensor fields are ``fn(field, tensor)`` of these, with the
        given attributes changed (the others kept): the one way ``.to``, slices and splits rebuild."""
        tensors = {name: getattr(self, name) for name in self.fields}
        tensors = {name: None if t is None else fn(self.fields[name], t) for name, t in tensors.items()}
        kept = self.tensor_attribute_names + self.optional_tensor_attribute_names
        kept = {name: getattr(self, name) for name in kept}
        return QuantWithLowRank(**tensors, **(kept | attributes))

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

    def value_bits(self, name: str) -> Optional[int]:
        """Bits per value of tensor field ``name`` if it holds intN values (packed or in int8), else None."""
        field = self.fields[name]
        return _bits_of(getattr(self, field.dtype_attribute)) if field.role == "values" else None

    def is_packed(self, name: str) -> bool:
        """Whether tensor field ``name`` holds bit-packed intN values (uint8; see the class docstring)."""
        t = getattr(self, name)
        return self.value_bits(name) is not None and t is not None and t.dtype == torch.uint8

    def values(self, name: str) -> Optional[torch.Tensor]:
        """Tensor field ``name`` with intN values one per int8 (unpacked if packed); any other field as it is."""
        t = getattr(self, name)
        return unpack_intx(t, self.value_bits(name)) if self.is_packed(name) else t

    def base(self) -> CompressedWeight:
        """The compressed base as a ``CompressedWeight`` (int8 values, unpacked)."""
        return CompressedWeight(self.values("qdata"), self.scale, self.zero_point, self.bits, self.group_size)

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
            self.A, *self.adapter_qparams_of("A"), self.adapter_dtype, self.adapter_group_size, dtype or self.dtype
        )

    def dequantize_B(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The up-projection ``B`` (out x rank) in a floating dtype; every consumer of B goes through here."""
        if self.adapter_dtype is None:
            return self.B.to(dtype or self.dtype)
        return dequantize_weight(
            self.B, *self.adapter_qparams_of("B"), self.adapter_dtype, self.adapter_group_size, dtype or self.dtype
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


def _cols(t: torch.Tensor, bits: Optional[int]) -> int:
    """Values per row of a values field: its columns, or for bit-packed uint8 ``bytes * 8 / bits``."""
    return t.shape[1] * 8 // bits if bits is not None and t.dtype == torch.uint8 else t.shape[1]


def _holds_intx(t: torch.Tensor, bits: Optional[int]) -> bool:
    """int8 values, or uint8 packed at a packed width in whole packing units (2-D either way)."""
    if t.dim() != 2:
        return False
    if t.dtype == torch.int8:
        return True
    unit = packing_unit(bits)
    return t.dtype == torch.uint8 and unit is not None and t.shape[1] % (unit * bits // 8) == 0


def _qparam_shapes(A: torch.Tensor, B: torch.Tensor, in_features: int, group: int) -> list[tuple[int, int]]:
    """Shapes of ``A_scale``, ``A_zero_point``, ``B_scale``, ``B_zero_point``, as ``fields`` declares them
    (``A.shape[0]`` is the rank, packed or not)."""
    dims = {"out": B.shape[0], "in": in_features, "rank": A.shape[0]}
    return [QuantWithLowRank.fields[name].shape(dims, group) for name in _ADAPTER_QPARAMS]


def _join_qparams(fields: tuple, shapes: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """The four adapter scale / zero point tensors as one flat tensor in ``dtype`` (see ``adapter_qparams``)."""
    for name, t, shape in zip(_ADAPTER_QPARAMS, fields, shapes):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; these factors and group size need {shape}")
    return torch.cat([t.reshape(-1).to(dtype) for t in fields]).contiguous()


def _packed(t: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """The canonical storage of a values field: int8 intN values bit-packed when width and row length allow."""
    if bits is not None and t.dtype == torch.int8 and can_pack(bits, t.shape[1]):
        return pack_intx(t, bits)
    return t


implements = QuantWithLowRank.implements
implements_torch_function = QuantWithLowRank.implements_torch_function


def _low_rank_linear(x: torch.Tensor, weight: QuantWithLowRank, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Flatten to 2-D once so 2-D and 3-D inputs give the same graph (the fusion pass matches one pattern).
    x2 = x.reshape(-1, x.shape[-1])
    if weight.rank and weight.adapter_dtype is not None and compiled_cpu_token(x2):
        return _quantized_adapters_token(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    y = _base_linear(x2, weight, bias)
    if weight.rank and compiled_cpu_token(x2):
        # Decode on CPU: both products as reductions Inductor fuses with the layer, not two GEMV calls.
        y = y + matvec(matvec(x2, weight.dequantize_A(x.dtype)), weight.dequantize_B(x.dtype))
    elif weight.rank:
        y = y + (x2 @ weight.dequantize_A(x.dtype).t()) @ weight.dequantize_B(x.dtype).t()
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _base_linear(x: torch.Tensor, weight: QuantWithLowRank, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W_c^T + bias`` for 2-D ``x``: the compressed base alone."""
    if weight.target_dtype is None:  # a dense (pruned-only) base
        return F.linear(x, weight.qdata.to(x.dtype), bias)
    return quant_linear(x, weight.qdata, weight.scale, weight.zero_point, weight.group_size, bias)


def _quantized_adapters_token(x: torch.Tensor, weight: QuantWithLowRank, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One token on CPU under torch.compile with intx adapters: every product a reduction Inductor fuses with the
    layer, ``A`` and ``B`` read packed and dequantized on the fly (never written out as dequantized copies), and no
    copy beyond the base's: ``A`` reads an intx base's de-interleaved ``x`` (same packing unit), and ``A x`` is written
    de-interleaved, as ``B`` reads it (two buffers and two passes fewer a module a token; measured on SmolLM2: +1.3%
    tokens/s)."""
    in_features, rank, group = x.shape[1], weight.rank, weight.adapter_group_size
    unit = packed_unit(weight.qdata, in_features, weight.group_size)  # None for a dense base
    xs = deinterleave(x, unit) if unit and unit == packed_unit(weight.A, in_features, group) else None
    if xs is None:
        y = _base_linear(x, weight, bias)
    else:
        y = quant_matvec(x, weight.qdata, weight.scale, weight.zero_point, weight.group_size, xs=xs)
        y = y if bias is None else y + bias
    t_unit = packed_unit(weight.B, rank, group)
    t = quant_matvec(x, weight.A, *weight.adapter_qparams_of("A"), group, xs=xs, out_unit=t_unit)
    ts = t if t_unit else None
    t = t.t().reshape(1, rank) if t_unit else t  # A x in column order; read only where B is not packed
    return y + quant_matvec(t, weight.B, *weight.adapter_qparams_of("B"), group, xs=ts)


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
    """``.to(device)`` moves every field; ``.to(dtype)`` recasts the floating fields (intN values stay as
    they are, packed or not)."""
    self: QuantWithLowRank = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = to["device"], to["dtype"]
    if dtype not in _FLOAT_TYPES:
        raise TypeError(f"QuantWithLowRank computes in a floating dtype ({_FLOAT_TYPES}), got {dtype}")

    def cast(field: Field, t: torch.Tensor) -> torch.Tensor:
        floating = field.is_floating(getattr(self, field.dtype_attribute))
        return t.to(device=device, dtype=dtype) if floating else t.to(device)

    new = self._rebuild(cast, dtype=dtype)
    return return_and_correct_aliasing(func, args, kwargs, new)


def _piece(self: QuantWithLowRank, dim: int, start: int, end: int) -> QuantWithLowRank:
    """Rows or columns ``[start:end]`` of ``self`` as a ``QuantWithLowRank`` that owns its tensors (tensor
    parallelism). Row and column pieces alike are copies: a column piece of bit-packed values cannot be a view,
    and inner tensors stay contiguous (the subclass flattens one level deep), so no piece aliases ``self``.

    Rows cut ``qdata`` and ``B`` (with ``B``'s per-row groups); columns cut ``qdata`` and ``A`` (with ``A``'s
    groups along ``in``), so column bounds must align with ``group_size`` and ``adapter_group_size``: a group's
    scale cannot be shared by two shards.
    """
    if not -2 <= dim < 2:
        raise IndexError(f"QuantWithLowRank is 2-D; cannot slice dim {dim}")
    dim %= 2

    if dim == 0:

        def cut(field: Field, t: torch.Tensor) -> torch.Tensor:
            return t[start:end] if field.rows == "out" else t

    else:
        for what in ("group_size", "adapter_group_size"):
            size = getattr(self, what) or 1
            if start % size or end % size:
                raise ValueError(f"column slice [{start}:{end}] must align with {what} {size}")

        def cut(field: Field, t: torch.Tensor) -> torch.Tensor:
            if field.cols != "in":
                return t
            if field.role == "values" and t.dtype == torch.uint8:  # bit-packed intN values
                bits = _bits_of(getattr(self, field.dtype_attribute))
                unit = packing_unit(bits)
                if start % unit == 0 and end % unit == 0:  # whole packing units: cut the bytes
                    return t[:, packed_cols(bits, start) : packed_cols(bits, end)]
                t = unpack_intx(t, bits)  # the constructor packs the piece again if its width allows
            per = 1 if field.role == "values" else getattr(self, field.group_attribute) or 1
            return t[:, start // per : end // per]

    return self._rebuild(lambda field, t: cut(field, t).clone(memory_format=torch.contiguous_format))


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
