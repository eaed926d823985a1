"""Bit packing of signed intN values along the input (column) dimension, row by row, in plain PyTorch.

The packed layout: each row of a ``(rows, cols)`` tensor of intN values becomes ``cols * N / 8`` bytes (uint8),
read as one little-endian bit stream: value ``k`` of a row, in N-bit two's complement, occupies bits
``[k * N, (k + 1) * N)`` of the row, bit ``b`` being bit ``b % 8`` of byte ``b // 8``. So

* int4: two values a byte, column ``2j`` in the low nibble of byte ``j`` (the convention the Triton kernel reads,
  ``torchao_eora.kernels.dequant_gemm.pack_int4``);
* int2: four values a byte, column ``4j + i`` in bits ``2i .. 2i+1`` of byte ``j``;
* int3: eight values in three bytes, columns ``8j .. 8j+7`` as a 24-bit little-endian word in bytes ``3j .. 3j+2``.

Rows stay independent (slicing rows, e.g. for tensor parallelism, slices the bytes) and a packing unit (2, 4 or 8
values) never straddles two rows, so a row length must be a multiple of the unit; :func:`can_pack` says whether
it is (callers keep such a tensor unpacked, one value per int8). Widths 5 to 8 are not packed. A packed tensor is
told apart from an unpacked one by its dtype alone (uint8 vs int8); its bit width comes from its owner (the part's
``intN`` dtype), or from the unpacked row length (:func:`as_int8`).

Why not torchao's packer: torchao 0.18's generic one, ``torchao.prototype.dtypes.uintx.bitpacking.pack``, is a
prototype API, requires the packed dimension to be a multiple of 8, interleaves values ``n / scale`` apart
(value ``i`` shares a byte with value ``i + cols / 2`` for int4: not the kernel's adjacent pairs, and a quant group
is scattered over the row) and returns int3 as two tensors (a 2-bit and a 1-bit plane). One rule for every width,
with int4 identical to the kernel's, fits a one-level-deep checkpoint better. Everything here is shifts, masks
and reshapes, which torch.compile fuses into the dequantize that follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PACKED_BITS", "as_int8", "can_pack", "pack_intx", "packed_bits", "packed_cols", "packing_unit", "unpack_intx",
]

# bit width -> values per packing unit (the fewest values that fill whole bytes)
PACKED_BITS = {2: 4, 3: 8, 4: 2}


def packing_unit(bits: int | None) -> int | None:
    """Values per packing unit for ``bits`` (2 -> 4, 3 -> 8, 4 -> 2), or None for a width kept one per int8."""
    return PACKED_BITS.get(bits) if bits is not None else None


def can_pack(bits: int | None, cols: int) -> bool:
    """Whether rows of ``cols`` intN values of this width are stored packed (else one per int8)."""
    unit = packing_unit(bits)
    return unit is not None and cols % unit == 0


def packed_cols(bits: int, cols: int) -> int:
    """Bytes per packed row of ``cols`` values."""
    return cols * bits // 8


def _is_real(t: Tensor) -> bool:
    """A tensor whose values can be read (not meta, not a fake tensor being traced)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def pack_intx(values: Tensor, bits: int) -> Tensor:
    """int8 ``(rows, cols)`` holding intN values -> uint8 ``(rows, cols * bits / 8)`` (layout: module docstring).

    Raises ``ValueError`` for a width that is not packed, a row length that is not a multiple of the packing unit,
    or a value outside ``[-2**(bits-1), 2**(bits-1) - 1]``.
    """
    unit = packing_unit(bits)
    if unit is None:
        raise ValueError(f"int{bits} values are not bit-packed (packed widths: {sorted(PACKED_BITS)})")
    if values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError(f"pack_intx expects a 2-D int8 tensor, got {values.dtype} {tuple(values.shape)}")
    rows, cols = values.shape
    if cols % unit:
        raise ValueError(f"int{bits} rows pack {unit} values at a time; a row of {cols} values does not")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.numel() and _is_real(values) and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(f"int{bits} values must lie in [{lo}, {hi}]")
    n_bytes = unit * bits // 8
    # Python-int shifts only (no constant tensors): the same code runs eagerly, traced, and on fake tensors.
    fields = (values.to(torch.int32) & ((1 << bits) - 1)).reshape(rows, cols // unit, unit)
    word = fields[..., 0]
    for i in range(1, unit):
        word = word | (fields[..., i] << (bits * i))
    packed = torch.stack([(word >> (8 * j)) & 0xFF for j in range(n_bytes)], dim=-1)
    return packed.to(torch.uint8).reshape(rows, cols // unit * n_bytes)


def unpack_intx(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_intx`: uint8 ``(rows, cols * bits / 8)`` -> int8 ``(rows, cols)``, sign-extended."""
    unit = packing_unit(bits)
    if unit is None:
        raise ValueError(f"int{bits} values are not bit-packed (packed widths: {sorted(PACKED_BITS)})")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_intx expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n_bytes = unit * bits // 8
    rows, width = packed.shape
    if width % n_bytes:
        raise ValueError(f"packed int{bits} rows come in units of {n_bytes} bytes; got rows of {width} bytes")
    if n_bytes == 1:
        word = packed.to(torch.int32).unsqueeze(-1)  # (rows, width, 1): one unit per byte
    else:
        chunks = packed.reshape(rows, width // n_bytes, n_bytes).to(torch.int32)
        word = chunks[..., 0]
        for j in range(1, n_bytes):
            word = word | (chunks[..., j] << (8 * j))
        word = word.unsqueeze(-1)
    fields = torch.cat([(word >> (bits * i)) & ((1 << bits) - 1) for i in range(unit)], dim=-1)
    signed = fields - ((fields >> (bits - 1)) << bits)  # two's complement sign extension
    return signed.to(torch.int8).reshape(rows, width // n_bytes * unit)


def packed_bits(packed_width: int, cols: int) -> int:
    """The bit width of a packed row of ``packed_width`` bytes holding ``cols`` values (ValueError if none fits)."""
    for bits, unit in PACKED_BITS.items():
        if cols % unit == 0 and packed_width == packed_cols(bits, cols):
            return bits
    raise ValueError(
        f"a packed (uint8) row of {packed_width} bytes does not hold {cols} int2, int3 or int4 values "
        f"(expected {', '.join(str(packed_cols(b, cols)) for b in PACKED_BITS if cols % PACKED_BITS[b] == 0)} bytes)"
    )


def as_int8(qdata: Tensor, cols: int) -> Tensor:
    """intN values one per int8: ``qdata`` itself if int8, else (uint8, packed) unpacked, its width read from the
    ratio of ``cols`` (the unpacked row length) to its bytes per row. What every dequantize goes through."""
    if qdata.dtype != torch.uint8:
        return qdata
    return unpack_intx(qdata, packed_bits(qdata.shape[1], cols))
