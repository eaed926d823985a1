"""QuantWithLowRank behaves exactly like the dense W_c + B A it stands for, eagerly and compiled."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from torchao_eora import QuantWithLowRank, RTNConfig, svd_factors
from torchao_eora.adapter_quant import quantize_factors
from torchao_eora.compressors import CompressedWeight


def _weight(out_features=48, in_features=64, rank=8, bits=3, dtype=torch.float32, dense=False, seed=0,
            adapter_bits=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    if dense:  # a pruned-only base keeps a floating qdata and no scale
        base = CompressedWeight(w * (torch.rand(w.shape, generator=g) > 0.5))
    else:
        base = RTNConfig(bits=bits, group_size=32).compress(w)
    factors = svd_factors(w - base.dequantize(), rank)
    if adapter_bits is not None:  # intx adapters in groups of 8 (what EoRAConfig(adapter_bits=...) builds)
        factors = quantize_factors(w - base.dequantize(), factors, adapter_bits, 8)
    return w, QuantWithLowRank.from_parts(base, factors, dtype=dtype)


@pytest.mark.parametrize("kwargs", [{}, {"dense": True}, {"adapter_bits": 4}, {"dtype": torch.bfloat16},
                                    {"bits": 8, "adapter_bits": 2}], ids=str)
def test_flatten_is_torchaos_and_unflattens_to_the_same_weight(kwargs):
    """Our hand-written ``__tensor_flatten__`` (torchao's generic one cost 3 us, twice per weight per compiled call)
    gives torchao's names and attributes, but for quantized adapters' four scale / zero point fields, which it gives
    as the one tensor held (``adapter_qparams``: three graph inputs a layer fewer); ``__tensor_unflatten__`` of it
    rebuilds an equal weight, every checkpoint field equal."""
    from torchao.utils import TorchAOBaseTensor

    _, q = _weight(**kwargs)
    names, attributes = q.__tensor_flatten__()
    torchao_names, torchao_attributes = TorchAOBaseTensor.__tensor_flatten__(q)
    joined = ["A_scale", "A_zero_point", "B_scale", "B_zero_point"]
    if q.adapter_dtype is not None:
        assert set(joined) <= set(torchao_names)
        torchao_names = [n for n in torchao_names if n not in joined] + ["adapter_qparams"]
    assert (names, attributes) == (torchao_names, torchao_attributes)
    assert attributes["dtype"] is q.dtype
    rebuilt = QuantWithLowRank.__tensor_unflatten__({n: getattr(q, n) for n in names}, attributes, q.shape, q.stride())
    assert rebuilt.__tensor_flatten__() == (names, attributes)
    torch.testing.assert_close(rebuilt.dequantize(), q.dequantize(), rtol=0, atol=0)
    for name in QuantWithLowRank.fields:
        a, b = getattr(rebuilt, name), getattr(q, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    del q.__dict__["compute_dtype"]  # as a weight pickled before that attribute existed
    assert q.__tensor_flatten__() == (names, attributes)


def test_the_declared_layout_is_the_constructor_and_the_shapes():
    """``QuantWithLowRank.fields`` is the one declaration: the constructor takes exactly its fields and the
    attributes (torchao's order), and every field a weight holds has the shape and dtype it declares."""
    cls = QuantWithLowRank
    names = cls.tensor_data_names + cls.tensor_attribute_names
    names += cls.optional_tensor_data_names + cls.optional_tensor_attribute_names
    # ... and, last, the held form of the adapter scales and zero points (what __tensor_flatten__ gives)
    assert list(inspect.signature(cls.__init__).parameters)[1:] == [*names, "adapter_qparams"]
    assert set(cls.tensor_data_names + cls.optional_tensor_data_names) == set(cls.fields)
    for kwargs in ({}, {"dense": True}, {"adapter_bits": 4}):
        _, q = _weight(**kwargs)
        dims = {"out": 48, "in": 64, "rank": 8}
        for name, field in cls.fields.items():
            t = getattr(q, name)
            if t is None:
                continue
            packed_bits = q.value_bits(name) if q.is_packed(name) else None  # uint8, bits / 8 bytes a value
            assert tuple(t.shape) == field.shape(dims, getattr(q, field.group_attribute), packed_bits), (kwargs, name)
            assert t.is_floating_point() == field.is_floating(getattr(q, field.dtype_attribute)), (kwargs, name)
        bits = {"qdata": q.bits, "A": q.adapter_bits, "B": q.adapter_bits}
        assert {name: q.value_bits(name) for name in cls.fields} == {name: bits.get(name) for name in cls.fields}


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_linear_matches_dense_reference(shape, bias, dense):
    _, q = _weight(dense=dense)
    x = torch.randn(shape)
    b = torch.randn(48) if bias else None
    ref = F.linear(x.double(), q.dequantize(torch.float64), None if b is None else b.double())
    out = F.linear(x, q, b)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_low_rank_path_reduces_error_and_rank0_is_base():
    w, q = _weight(rank=16)
    base_err = (w - q.dequantize_base()).norm()
    assert (w - q.dequantize()).norm() < base_err
    q0 = QuantWithLowRank.from_parts(q.base(), type(svd_factors(w, 1))(q.A[:0], q.B[:, :0]))
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, q0), F.linear(x, q.dequantize_base()))


@pytest.mark.parametrize("bias", [False, True])
def test_compile_fullgraph_matches_eager(bias):
    _, q = _weight()
    lin = torch.nn.Linear(64, 48, bias=bias)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_is_exact():
    _, q = _weight()
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    sd = lin.state_dict()
    other = torch.nn.Linear(64, 48, bias=False)
    other.weight = torch.nn.Parameter(_weight(seed=1)[1], requires_grad=False)
    other.load_state_dict(sd, assign=True)
    for name in ("qdata", "A", "B", "scale", "zero_point"):
        assert torch.equal(getattr(other.weight, name), getattr(q, name))
    x = torch.randn(4, 64)
    assert torch.equal(other(x), lin(x))


def test_to_dtype_casts_floating_fields_and_keeps_int_values():
    _, q = _weight()
    h = q.to(torch.bfloat16)
    assert isinstance(h, QuantWithLowRank) and h.dtype == torch.bfloat16
    assert h.A.dtype == h.B.dtype == h.scale.dtype == torch.bfloat16
    assert torch.equal(h.qdata, q.qdata) and h.qdata.dtype == torch.uint8  # int3 values, bit-packed
    x = torch.randn(4, 64)
    torch.testing.assert_close(F.linear(x.bfloat16(), h).float(), F.linear(x, q), rtol=3e-2, atol=3e-1)
    with pytest.raises(TypeError, match="floating"):
        q.to(torch.int32)


def test_to_device_and_detach_keep_subclass():
    _, q = _weight()
    moved = q.to("cpu")
    assert isinstance(moved, QuantWithLowRank)
    assert isinstance(q.detach(), QuantWithLowRank)


def test_dequantize_and_repr():
    w, q = _weight(rank=8, bits=3)
    assert q.dequantize().shape == w.shape
    r = repr(q)
    assert "rank=8" in r and "int3 g32" in r


def test_slices_for_tensor_parallel():
    _, q = _weight()
    x = torch.randn(3, 64)
    dense = q.dequantize()
    rows = q[8:24]
    assert isinstance(rows, QuantWithLowRank)
    torch.testing.assert_close(F.linear(x, rows), x @ dense[8:24].T, rtol=1e-5, atol=1e-5)
    cols = torch.ops.aten.slice.Tensor(q, 1, 32, 64)
    torch.testing.assert_close(F.linear(x[:, 32:], cols), x[:, 32:] @ dense[:, 32:].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="align"):
        torch.ops.aten.slice.Tensor(q, 1, 16, 64)


@pytest.mark.parametrize("adapter_bits", [None, 4], ids=["fp-adapters", "int4-adapters"])
@pytest.mark.parametrize(
    "dim, split",
    [
        (0, lambda q: q.chunk(2, dim=0)),
        (0, lambda q: q.split(20, dim=0)),  # uneven: 20, 20, 8
        (0, lambda q: q.split([8, 40], dim=0)),
        (1, lambda q: q.chunk(2, dim=1)),
        (1, lambda q: q.split(32, dim=-1)),
        (1, lambda q: q.split([32, 32], dim=1)),
    ],
    ids=["chunk0", "split0", "sizes0", "chunk1", "split-1", "sizes1"],
)
def test_chunk_and_split_for_tensor_parallel(dim, split, adapter_bits):
    """Tensor-parallel sharding: every piece is a QuantWithLowRank equal to the matching slice of the dense weight,
    and the shards' outputs recombine into the full layer's output."""
    _, q = _weight(adapter_bits=adapter_bits)
    assert (q.adapter_dtype is not None) == (adapter_bits is not None)
    pieces = split(q)
    dense = q.dequantize()
    assert all(isinstance(p, QuantWithLowRank) for p in pieces)
    assert all(p.adapter_dtype == q.adapter_dtype for p in pieces)
    assert torch.equal(torch.cat([p.dequantize() for p in pieces], dim=dim), dense)
    x = torch.randn(3, 64)
    if dim == 0:  # column-parallel: outputs concatenate (up to the GEMM's rounding: MKL picks a kernel per width)
        torch.testing.assert_close(torch.cat([F.linear(x, p) for p in pieces], dim=-1), F.linear(x, q),
                                   rtol=1e-5, atol=1e-5)
    else:  # row-parallel: each shard sees its input columns, partial outputs add up
        xs = x.split([p.shape[1] for p in pieces], dim=-1)
        total = sum(F.linear(xi, p) for xi, p in zip(xs, pieces))
        torch.testing.assert_close(total, F.linear(x, q), rtol=1e-5, atol=1e-5)


def test_split_not_aligned_to_groups_is_rejected():
    _, q = _weight()
    with pytest.raises(ValueError, match="align with group_size 32"):
        q.chunk(4, dim=1)  # 16 columns: half a quantization group
    _, d = _weight(dense=True, adapter_bits=4)  # no base groups; the adapters' groups of 8 still bind
    with pytest.raises(ValueError, match="align with adapter_group_size 8"):
        d.split([4, 60], dim=1)
    assert torch.equal(torch.cat([p.dequantize() for p in d.split(24, dim=1)], dim=1), d.dequantize())


def test_matmul_paths_use_effective_weight():
    _, q = _weight()
    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.mm(x, q.t()), x @ q.dequantize().T)
    torch.testing.assert_close(torch.addmm(torch.ones(48), x, q.t()), 1 + x @ q.dequantize().T)


def test_mismatched_factors_are_rejected():
    _, q = _weight()
    with pytest.raises(ValueError, match="do not fit"):
        QuantWithLowRank(
            qdata=q.qdata, A=q.A[:, :32], B=q.B, target_dtype=q.target_dtype, group_size=q.group_size, dtype=q.dtype,
            scale=q.scale, zero_point=q.zero_point,
        )


def test_evaluation_reuses_each_dequantized_weight_with_identical_outputs(monkeypatch):
    """``ops.reuse_dequantized`` (what evaluation runs under): one dequantize per weight over many forwards, and the
    logits are bit-identical to dequantizing on every call."""
    from torchao.quantization import quantize_

    from helpers import tiny_llama
    from torchao_eora import EoRAConfig, ops

    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=32), compensation="svd"))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    real = ops.dequantize_intx
    monkeypatch.setattr(ops, "dequantize_intx", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        every_call = [model(ids).logits for _ in range(2)]
        per_forward = len(calls) // 2
        calls.clear()
        with ops.reuse_dequantized():
            reused = [model(ids).logits for _ in range(2)]
    assert per_forward == 14 and len(calls) == 14  # 7 linears x 2 layers: once each, not once per forward
    assert all(torch.equal(a, b) for a, b in zip(every_call, reused))
