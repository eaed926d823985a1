"""Bit-packed intN storage: the packer itself, and QuantWithLowRank holding packed values (in memory and in
checkpoints) computing exactly what the unpacked int8 layout computed."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torchao.quantization import quantize_

import torchao_eora.tensor as tensor_module
from helpers import edited_copy, tiny_llama, token_batches
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, model_bytes, svd_factors
from torchao_eora.adapter_quant import quantize_factors
from torchao_eora.hf import load_pretrained, save_pretrained
from torchao_eora.merge import merge_low_rank
from torchao_eora.ops import kernel_qdata
from torchao_eora.packing import PACKED_BITS, as_int8, can_pack, pack_intx, unpack_intx

Q_PROJ = "model.layers.0.self_attn.q_proj"


# ---- the packer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_is_exact_including_the_extremes(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(lo, hi + 1, (6, 64), generator=g, dtype=torch.int8)
    values[0], values[1] = lo, hi  # whole rows of each extreme
    values[2, ::2], values[2, 1::2] = lo, hi  # alternating, so neighbours in one byte differ
    packed = pack_intx(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 64 * bits // 8)
    assert torch.equal(unpack_intx(packed, bits), values)
    assert torch.equal(as_int8(packed, 64), values)  # width read from the row length
    assert as_int8(values, 64) is values  # int8 passes through


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_byte_pattern_is_a_valid_packing(bits):
    """Unpack then pack is the identity on arbitrary bytes: the format has no invalid or redundant encodings."""
    n_bytes = PACKED_BITS[bits] * bits // 8
    every = torch.arange(256, dtype=torch.uint8).repeat_interleave(n_bytes).reshape(-1, 8 * n_bytes)
    values = unpack_intx(every, bits)
    assert int(values.min()) == -(1 << (bits - 1)) and int(values.max()) == (1 << (bits - 1)) - 1
    assert torch.equal(pack_intx(values, bits), every)


def test_the_layout_is_a_little_endian_bit_stream_per_row():
    from torchao_eora.kernels.dequant_gemm import pack_int4

    q4 = torch.randint(-8, 8, (5, 18), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(pack_intx(q4, 4), pack_int4(q4))  # the Triton kernel's convention
    assert pack_intx(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8), 4).tolist() == [[0xF1, 0x78]]
    assert pack_intx(torch.tensor([[1, -1, -2, 0, 1, 1, 1, 1]], dtype=torch.int8), 2).tolist() == [[0x2D, 0x55]]
    # 1, -1, -4, 3, 0, 2, -2, 1 as 3-bit fields 0b001, 0b111, 0b100, ... in one 24-bit little-endian word
    word = sum(f << (3 * i) for i, f in enumerate([1, 7, 4, 3, 0, 2, 6, 1]))
    three = pack_intx(torch.tensor([[1, -1, -4, 3, 0, 2, -2, 1]], dtype=torch.int8), 3)
    assert three.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    # rows are independent: packing a slice of rows is the slice of the packing
    q3 = torch.randint(-4, 4, (7, 24), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(pack_intx(q3[2:5], 3), pack_intx(q3, 3)[2:5])


@pytest.mark.parametrize(
    "values, bits, message",
    [
        (torch.zeros(2, 8, dtype=torch.int8), 5, "not bit-packed"),
        (torch.zeros(2, 12, dtype=torch.int8), 3, "8 values at a time"),
        (torch.zeros(2, 6, dtype=torch.int8), 2, "4 values at a time"),
        (torch.full((2, 8), 2, dtype=torch.int8), 2, r"\[-2, 1\]"),
        (torch.full((2, 8), -5, dtype=torch.int8), 3, r"\[-4, 3\]"),
        (torch.zeros(2, 8, dtype=torch.int32), 4, "int8"),
    ],
)
def test_pack_refuses_what_it_cannot_store(values, bits, message):
    with pytest.raises(ValueError, match=message):
        pack_intx(values, bits)


def test_unpack_refuses_a_width_that_does_not_fit():
    with pytest.raises(ValueError, match="does not hold 64 int2, int3 or int4 values"):
        as_int8(torch.zeros(2, 20, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="units of 3 bytes"):
        unpack_intx(torch.zeros(2, 4, dtype=torch.uint8), 3)


def test_packing_compiles_and_fuses():
    q = torch.randint(-4, 4, (16, 64), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    fn = torch.compile(lambda p, s: unpack_intx(p, 3).to(torch.float32) * s, fullgraph=True)
    s = torch.rand(16, 1)
    assert torch.equal(fn(pack_intx(q, 3), s), q.float() * s)


# ---- QuantWithLowRank: packed == unpacked ------------------------------------------------------------------------


@contextlib.contextmanager
def unpacked_layout():
    """Build (and trace) QuantWithLowRank as before packing existed: intN values one per int8."""
    original = tensor_module._packed
    tensor_module._packed = lambda t, bits: t
    try:
        yield
    finally:
        tensor_module._packed = original


def _pair(bits, adapter_bits, out_features=48, in_features=96, rank=16, group=32, dtype=torch.bfloat16, seed=0,
          adapter_group=8):
    """The same weight as packed (today) and as int8 containers (before)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    base = RTNConfig(bits=bits, group_size=group).compress(w)
    delta = w - base.dequantize()
    factors = svd_factors(delta, rank)
    if adapter_bits is not None:
        factors = quantize_factors(delta, factors, adapter_bits, adapter_group)
    packed = QuantWithLowRank.from_parts(base, factors, dtype=dtype)
    with unpacked_layout():
        unpacked = QuantWithLowRank.from_parts(base, factors, dtype=dtype)
    return packed, unpacked


CASES = [(2, None), (3, 3), (4, 4), (4, 2), (2, 3), (5, 4), (8, None)]


@pytest.mark.parametrize("bits, adapter_bits", CASES)
def test_fields_are_packed_where_the_width_allows(bits, adapter_bits):
    packed, unpacked = _pair(bits, adapter_bits)
    assert packed.qdata.dtype == (torch.uint8 if bits in PACKED_BITS else torch.int8)
    assert unpacked.qdata.dtype == torch.int8 and packed.shape == unpacked.shape == (48, 96)
    for name in ("qdata", "A", "B"):
        bits_of = packed.value_bits(name)
        held = getattr(packed, name)
        assert packed.is_packed(name) == (bits_of in PACKED_BITS)
        assert held.is_contiguous() and type(held) is torch.Tensor
        if packed.is_packed(name):
            assert held.shape[1] == getattr(unpacked, name).shape[1] * bits_of // 8
        assert torch.equal(packed.values(name), getattr(unpacked, name))
    assert torch.equal(packed.base().qdata, unpacked.qdata)


@pytest.mark.parametrize("bits, adapter_bits", CASES)
def test_packed_computes_exactly_what_unpacked_computed(bits, adapter_bits):
    packed, unpacked = _pair(bits, adapter_bits)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    bias = torch.randn(48, dtype=torch.bfloat16)
    for method in ("dequantize", "dequantize_base", "dequantize_A", "dequantize_B"):
        assert torch.equal(getattr(packed, method)(), getattr(unpacked, method)()), method
        assert torch.equal(getattr(packed, method)(torch.float32), getattr(unpacked, method)(torch.float32)), method
    assert torch.equal(F.linear(x, packed, bias), F.linear(x, unpacked, bias))
    assert torch.equal(F.linear(x[0, :1], packed), F.linear(x[0, :1], unpacked))  # one token
    wide = packed.to(torch.float32)
    assert wide.qdata.dtype == packed.qdata.dtype and torch.equal(wide.dequantize(),
                                                                  unpacked.to(torch.float32).dequantize())
    for piece, ref in ((packed[8:24], unpacked[8:24]), (packed[:, 32:64], unpacked[:, 32:64])):
        assert piece.qdata.dtype == packed.qdata.dtype and piece.shape == ref.shape
        assert torch.equal(piece.dequantize(), ref.dequantize())
        assert torch.equal(F.linear(x[..., : piece.shape[1]], piece), F.linear(x[..., : ref.shape[1]], ref))
    for p, u in zip(packed.chunk(3, dim=1), unpacked.chunk(3, dim=1)):
        assert torch.equal(p.dequantize(), u.dequantize())


def test_a_column_slice_off_the_packing_unit_repacks_or_stays_int8():
    packed, unpacked = _pair(3, None, in_features=96, group=4)  # groups of 4 columns; int3 packs 8 at a time
    piece = packed[:, 4:36]  # starts mid-unit, 32 columns: unpacked, cut, packed again
    assert piece.qdata.dtype == torch.uint8 and piece.qdata.shape == (48, 12)
    assert torch.equal(piece.values("qdata"), unpacked.qdata[:, 4:36])
    odd = packed[:, 4:16]  # 12 columns: not a whole number of units, kept one value per int8
    assert odd.qdata.dtype == torch.int8 and torch.equal(odd.qdata, unpacked.qdata[:, 4:16])
    assert torch.equal(odd.dequantize(), unpacked[:, 4:16].dequantize())


def test_rows_of_unaligned_length_stay_int8_without_error():
    packed, unpacked = _pair(3, 3, in_features=36, group=12, rank=12, seed=1, adapter_group=4)  # 36, 12: not % 8
    for name in ("qdata", "A", "B"):
        assert getattr(packed, name).dtype == torch.int8
        assert torch.equal(getattr(packed, name), getattr(unpacked, name))
    assert torch.equal(packed.dequantize(), unpacked.dequantize())


@pytest.mark.parametrize("bits, adapter_bits", [(3, None), (2, 4), (4, 3)])
def test_compiled_packed_equals_compiled_unpacked(bits, adapter_bits):
    packed, unpacked = _pair(bits, adapter_bits)
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    outs = []
    for weight, layout in ((packed, contextlib.nullcontext), (unpacked, unpacked_layout)):
        torch._dynamo.reset()
        with layout():  # the unpacked weight must be traced as it was built
            outs.append(torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)(x, weight))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], F.linear(x, packed), rtol=2e-2, atol=2e-2)  # bf16: another summation order


def test_constructor_accepts_int8_or_packed_and_refuses_other_bytes():
    packed, unpacked = _pair(3, 4)
    fields = {n: getattr(packed, n) for n in QuantWithLowRank.fields}
    attrs = dict(target_dtype=packed.target_dtype, group_size=32, dtype=packed.dtype, adapter_dtype=torch.int4,
                 adapter_group_size=8)
    again = QuantWithLowRank(**fields, **attrs)
    assert again.qdata is packed.qdata and again.shape == (48, 96)
    from_int8 = QuantWithLowRank(**(fields | {"qdata": unpacked.qdata, "A": unpacked.A}), **attrs)
    assert torch.equal(from_int8.qdata, packed.qdata) and torch.equal(from_int8.A, packed.A)
    with pytest.raises(ValueError, match="int8 \\(or uint8 bit-packed\\) qdata"):
        QuantWithLowRank(**(fields | {"qdata": packed.qdata[:, :35]}), **attrs)  # not whole 3-byte units
    with pytest.raises(ValueError, match="do not fit"):
        QuantWithLowRank(**(fields | {"qdata": packed.qdata[:, :33]}), **attrs)  # whole units, wrong length


# ---- models, checkpoints, sizes ----------------------------------------------------------------------------------

CONFIG = EoRAConfig(rank=8, base=RTNConfig(3, 32), compensation="svd", adapter_bits=4, adapter_group_size=8)


def _quantized(config=CONFIG, packed=True):
    model = tiny_llama()
    with contextlib.nullcontext() if packed else unpacked_layout():
        quantize_(model, config)
    return model


def _logits(model):
    with torch.no_grad():
        return model(**token_batches(1, seed=5)[0]).logits


def _layers(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), QuantWithLowRank)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _quantized()
    return model, save_pretrained(model, tmp_path_factory.mktemp("packed") / "eora", CONFIG)


def test_checkpoint_holds_packed_uint8_and_reloads_exactly(saved):
    model, out = saved
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        qdata, A, B = (f.get_slice(f"{Q_PROJ}._weight_{n}") for n in ("qdata", "A", "B"))
        assert (qdata.get_dtype(), qdata.get_shape()) == ("U8", [64, 64 * 3 // 8])
        assert (A.get_dtype(), A.get_shape()) == ("U8", [8, 64 // 2])
        assert (B.get_dtype(), B.get_shape()) == ("U8", [64, 8 // 2])
    loaded = load_pretrained(out)
    assert torch.equal(_logits(loaded), _logits(model))
    for (name, w), (_, v) in zip(_layers(model).items(), _layers(loaded).items()):
        for field in QuantWithLowRank.fields:
            a, b = getattr(w, field), getattr(v, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, field)


def test_old_int8_checkpoints_still_load_and_are_packed(tmp_path):
    old = _quantized(packed=False)
    with unpacked_layout():
        out = save_pretrained(old, tmp_path / "old", CONFIG)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_slice(f"{Q_PROJ}._weight_qdata").get_dtype() == "I8"
    loaded = load_pretrained(out)
    assert all(w.qdata.dtype == w.A.dtype == torch.uint8 for w in _layers(loaded).values())
    assert torch.equal(_logits(loaded), _logits(old))


def _replace(key, make):
    return lambda t: t.__setitem__(key, make(t[key]))


TAMPERED = {  # the edit, and what the one-line error must say
    "packed qdata a byte short": (
        _replace(f"{Q_PROJ}._weight_qdata", lambda t: t[:, :-3].contiguous()),
        rf"{Q_PROJ}\._weight_qdata has shape \(64, 21\), expected \(64, 24\) \(int3 values bit-packed, 8 in 3 bytes\)",
    ),
    "packed A too wide": (
        _replace(f"{Q_PROJ}._weight_A", lambda t: torch.cat([t, t[:, :2]], 1)),
        rf"{Q_PROJ}\._weight_A has shape \(8, 34\), expected \(8, 32\) \(int4 values bit-packed, 2 in 1 byte\)",
    ),
    "packed values as int16": (
        _replace(f"{Q_PROJ}._weight_B", lambda t: t.to(torch.int16)),
        rf"{Q_PROJ}\._weight_B is stored as int16, expected uint8 \(int4 values bit-packed\) or int8",
    ),
    "zero point as uint8": (
        _replace(f"{Q_PROJ}._weight_zero_point", lambda t: t.to(torch.uint8)),
        rf"{Q_PROJ}\._weight_zero_point is stored as uint8, expected int8",
    ),
    "unpacked int8 with a packed shape": (
        _replace(f"{Q_PROJ}._weight_qdata", lambda t: t.view(torch.int8)),
        rf"{Q_PROJ}\._weight_qdata has shape \(64, 24\), expected \(64, 64\)",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_packed_tensors_are_refused_with_one_clear_line(saved, tmp_path, case):
    from transformers import AutoModelForCausalLM

    edit, pattern = TAMPERED[case]
    broken = edited_copy(saved[1], tmp_path / "broken", edit)
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=pattern) as err:
            load(broken)
        assert "\n" not in str(err.value) and "re-save" in str(err.value)


def test_uint8_for_a_width_kept_in_int8_is_refused(tmp_path):
    config = EoRAConfig(rank=8, base=RTNConfig(5, 32), compensation="svd")
    out = save_pretrained(_quantized(config), tmp_path / "int5", config)
    broken = edited_copy(out, tmp_path / "broken", _replace(f"{Q_PROJ}._weight_qdata", lambda t: t.view(torch.uint8)))
    with pytest.raises(ValueError, match=r"_weight_qdata is stored as uint8, expected int8 \(holding int5 values\)"):
        load_pretrained(broken)


@pytest.mark.parametrize("bits, adapter_bits", [(2, None), (3, 4), (4, 2), (4, 4)])
def test_stored_bytes_equal_packed_bytes_and_the_file(tmp_path, bits, adapter_bits):
    adapters = dict(adapter_bits=adapter_bits, adapter_group_size=8) if adapter_bits else {}
    config = EoRAConfig(rank=8, base=RTNConfig(bits, 32), compensation="svd", **adapters)
    model = _quantized(config)
    sizes = model_bytes(model)
    assert sizes["stored"] == sizes["packed"] and sizes["base"] == sizes["packed_base"]
    assert sizes["adapters"] == sizes["packed_adapters"]
    with unpacked_layout():  # before packing: values in int8 cost 8 / bits times their packed size
        old = model_bytes(_quantized(config, packed=False))
    values = sum(w.qdata.numel() for w in _layers(model).values())
    assert old["packed"] == sizes["packed"] and old["stored"] - sizes["stored"] >= values * (8 // bits - 1)
    path = save_pretrained(model, tmp_path / "m", config) / "model.safetensors"
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    assert sizes["stored"] == os.path.getsize(path) - 8 - header


def test_merge_and_peft_export_see_the_same_values(tmp_path):
    from safetensors.torch import load_file

    from torchao_eora import export_peft

    packed, unpacked = _quantized(), _quantized(packed=False)
    outs = [export_peft(m, tmp_path / name, config=CONFIG) for m, name in ((packed, "p"), (unpacked, "u"))]
    a, b = (load_file(str(o / "adapter_model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = [merge_low_rank(m) for m in (packed, unpacked)]
    for (n, p), (_, q) in zip(merged[0].named_parameters(), merged[1].named_parameters()):
        assert torch.equal(p, q), n


# ---- the Triton kernel path --------------------------------------------------------------------------------------


def test_packed_int4_goes_to_the_kernel_as_is_other_widths_are_unpacked():
    p4, u4 = _pair(4, None)
    assert kernel_qdata(p4.qdata, 96, 32) is p4.qdata  # the kernel reads pack_int4's nibbles itself
    p3, u3 = _pair(3, None)
    assert torch.equal(kernel_qdata(p3.qdata, 96, 32), u3.qdata)
    p2, u2 = _pair(2, None)
    assert torch.equal(kernel_qdata(p2.qdata, 96, 32), u2.qdata)
    assert kernel_qdata(u3.qdata, 96, 32) is u3.qdata
    assert can_pack(4, 96) and not can_pack(5, 96)
