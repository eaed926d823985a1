"""Quantized adapters: intx A and B in QuantWithLowRank, the quantization-aware re-solve of B, config
validation, bit-exact reloads, eager == compiled, tensor-parallel slices, and exact model size accounting."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict, unflatten_tensor_state_dict
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

from helpers import anisotropic_moment, tiny_llama, token_batches
from torchao_eora import (
    EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config, eora_factors, export_peft, model_bytes,
    resolve_B, weighted_error,
)
from torchao_eora import adapter_quant
from torchao_eora.adapter_quant import quantize_factors
from torchao_eora.hf import load_pretrained, save_pretrained
from torchao_eora.solver import LowRankFactors, normal_equations_B

BASE = RTNConfig(bits=3, group_size=32)
ADAPTERS = dict(adapter_bits=4, adapter_group_size=8)


def _decoder_linears(module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _low_rank_weights(model) -> dict[str, QuantWithLowRank]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, QuantWithLowRank)}


def _problem(out_features=48, in_features=64, rank=16, seed=0):
    """A compression error, its calibration second moment and EoRA factors (random, LLM-like anisotropy)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    base = RTNConfig(3, 16).compress(weight)
    delta = weight - base.dequantize()
    moment = anisotropic_moment(in_features, seed=seed)
    return weight, base, delta, moment, eora_factors(delta, moment, rank)


# ---- the quantization-aware re-solve of B -------------------------------------------------------------------------


def test_resolve_B_is_the_least_squares_optimum():
    _, _, delta, moment, factors = _problem()
    a_q = quantize_factors(delta, factors, 3, 8, moment, resolve=False).A.dequantize()
    b = resolve_B(delta, a_q, moment).double()
    d, a, c = delta.double(), a_q.double(), moment.double()
    # Gradient of ||(dW - B A_q) X^T||^2 in B is -2 (dW - B A_q) C A_q^T: zero at the optimum.
    gradient = (d - b @ a) @ c @ a.T
    assert gradient.norm() < 1e-5 * (d @ c @ a.T).norm()
    # ... and it beats the B the eigen-solve gave for the unquantized A, on the same quantized A.
    resolved = weighted_error(delta, LowRankFactors(a_q, b.float()), moment)
    assert resolved < weighted_error(delta, LowRankFactors(a_q, factors.B), moment)


def test_resolve_B_without_moment_is_plain_least_squares_and_survives_zero_rows():
    _, _, delta, _, factors = _problem(rank=8)
    a = factors.A.clone()
    a[3] = 0  # a null direction (rank-deficient error): no division by zero, its column of B is (numerically) zero
    b = resolve_B(delta, a)
    assert torch.isfinite(b).all() and b[:, 3].abs().max() < 1e-12 * b.abs().max()
    keep = [i for i in range(8) if i != 3]
    expected = torch.linalg.lstsq(a[keep].double().T, delta.double().T).solution.T
    torch.testing.assert_close(b[:, keep].double(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_resolve_lowers_the_activation_weighted_error_of_quantized_adapters(bits):
    errors = {}
    for seed in range(3):
        _, _, delta, moment, factors = _problem(seed=seed)
        for resolve in (False, True):
            q = quantize_factors(delta, factors, bits, 8, moment, resolve=resolve)
            errors.setdefault(resolve, []).append(weighted_error(delta, q.dequantize(), moment))
        full = weighted_error(delta, factors, moment)
        assert full < min(errors[True][-1], errors[False][-1])  # quantizing costs something...
    assert sum(errors[True]) < sum(errors[False])  # ... and the re-solve gives part of it back


def _resolve_only(delta, factors, bits, group, moment):
    """Quantize A (min/max RTN), re-solve B for it, quantize B: the first step of the quantization-aware path."""
    qa = adapter_quant._quantize(factors.A, bits, group, torch.float32)
    b = resolve_B(delta, qa.dequantize(), moment)
    return LowRankFactors(qa.dequantize(), adapter_quant._quantize(b, bits, group, torch.float32).dequantize())


@pytest.mark.parametrize("bits", [4, 3])
def test_rotation_clipping_and_rounds_lower_the_error_of_resolving_alone(bits):
    """Over a few problems, the whole quantization-aware path leaves less activation-weighted error than quantizing
    A, re-solving B and quantizing B alone; without its rounds it is never better than with them (best kept)."""
    ours, alone = 0.0, 0.0
    for seed in range(4):
        _, _, delta, moment, factors = _problem(rank=32, seed=seed)
        full = quantize_factors(delta, factors, bits, 8, moment).dequantize()
        ours += weighted_error(delta, full, moment) ** 2
        alone += weighted_error(delta, _resolve_only(delta, factors, bits, 8, moment), moment) ** 2
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(adapter_quant, "ROUNDS", 0)
            first = quantize_factors(delta, factors, bits, 8, moment).dequantize()
        assert weighted_error(delta, full, moment) <= weighted_error(delta, first, moment) * (1 + 1e-12)
    assert ours < 0.8 * alone


def test_clip_search_rounds_each_group_no_worse_than_min_max_and_is_min_max_without_ratios(monkeypatch):
    t = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    t[0, 5] = 9.0  # an outlier the clip search should cut
    rtn = RTNConfig(3, 16, symmetric=False).compress(t)
    clipped = adapter_quant._clipped(t, 3, 16)
    per_group = [(q.dequantize() - t).square().reshape(6, 4, 16).sum(-1) for q in (rtn, clipped)]
    assert (per_group[1] <= per_group[0] * (1 + 1e-6)).all() and (per_group[1] < 0.9 * per_group[0]).any()
    monkeypatch.setattr(adapter_quant, "CLIP_RATIOS", (1.0,))
    plain = adapter_quant._clipped(t, 3, 16)
    assert all(torch.equal(getattr(plain, f), getattr(rtn, f)) for f in ("qdata", "scale", "zero_point"))


def test_fit_A_is_the_least_squares_optimum_under_row_weights():
    _, _, delta, moment, factors = _problem()
    b = factors.B + 0.01 * torch.randn_like(factors.B)
    rows = torch.rand(delta.shape[0], 1, generator=torch.Generator().manual_seed(1)) + 0.1
    a = adapter_quant._fit_A(delta, b, rows).double()
    d, bb, c, w = delta.double(), b.double(), moment.double(), rows.double().square()
    # Gradient in A of ||diag(rows) (dW - B A) X^T||^2: -2 B^T diag(w) (dW - B A) C, zero at the optimum.
    assert (bb.T @ (w * (d - bb @ a)) @ c).norm() < 1e-6 * (bb.T @ (w * d) @ c).norm()


def test_normal_equations_give_the_error_of_any_B_up_to_a_constant():
    _, _, delta, moment, factors = _problem()
    p, gram = normal_equations_B(delta, factors.A, moment)
    constant = weighted_error(delta, None, moment) ** 2
    for b in (factors.B, 2 * factors.B, torch.randn_like(factors.B)):
        terms = adapter_quant._error_terms(b, p, gram, None)
        exact = weighted_error(delta, LowRankFactors(factors.A, b), moment) ** 2
        assert abs(constant + terms - exact) < 1e-6 * constant


def test_output_weighting_steers_the_quantized_adapters_to_the_weighted_rows():
    """With a row weighting, the rounds fit A and choose the round in the weighted norm: less weighted error than
    quantizing for the plain norm, over a few problems."""
    weighted, plain = 0.0, 0.0
    for seed in range(4):
        _, _, delta, moment, factors = _problem(rank=32, seed=seed)
        rows = torch.ones(delta.shape[0], 1)
        rows[: delta.shape[0] // 4] = 5.0  # a quarter of the outputs matter 25x more
        for scale, total in ((rows, "weighted"), (None, "plain")):
            q = quantize_factors(delta, factors, 3, 8, moment, row_scale=scale).dequantize()
            error = weighted_error(rows * delta, LowRankFactors(q.A, rows * q.B), moment) ** 2
            weighted, plain = (weighted + error, plain) if total == "weighted" else (weighted, plain + error)
    assert weighted < 0.97 * plain


# ---- the layer: dequantization and an output bound derived from the quantization step -------------------------


def _step(scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """The per-element rounding bound of asymmetric min/max rounding: half a quantization step of its group."""
    return 0.5 * scale.repeat_interleave(group_size, dim=1) * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantized_adapter_output_is_within_the_rounding_bound(bits):
    """``|y_q - y| <= |x| (S_B |A_q| + |B| S_A)^T`` elementwise, where ``S`` holds half a step per element: exact
    algebra, since ``B_q A_q - B A = (B_q - B) A_q + B (A_q - A)``, for factors rounded as solved (min/max RTN)."""
    _, base, delta, moment, factors = _problem()
    group = 8
    q = quantize_factors(delta, factors, bits, group, moment, resolve=False)
    weight = QuantWithLowRank.from_parts(base, q)
    held = torch.uint8 if bits in (2, 3, 4) else torch.int8  # bit-packed where the width packs
    assert (weight.adapter_dtype, weight.adapter_group_size, weight.A.dtype) == (getattr(torch, f"int{bits}"), group,
                                                                                 held)
    a, b = factors.A, factors.B
    s_a, s_b = _step(weight.A_scale, group), _step(weight.B_scale, group)
    assert ((weight.dequantize_A() - a).abs() <= s_a).all()
    assert ((weight.dequantize_B() - b).abs() <= s_b).all()

    x = torch.randn(5, 7, 64)
    reference = QuantWithLowRank.from_parts(base, LowRankFactors(a, b))
    error = (F.linear(x, weight) - F.linear(x, reference)).abs()
    bound = x.abs() @ (s_b @ weight.dequantize_A().abs() + b.abs() @ s_a).T
    assert (error <= bound + 1e-6).all()
    assert error.max() > 0.01 * bound.max()  # quantization really happened: the bound is not vacuous

    # The checks have teeth: int values used as they are break the output bound; scales applied to the wrong
    # groups break the per-element one (the output bound, a worst case over signs, is too loose to see that).
    raw = x @ weight.values("A").float().T @ weight.values("B").float().T - x @ a.T @ b.T
    assert (raw.abs() > bound + 1e-6).any()
    misgrouped = QuantWithLowRank(
        qdata=weight.qdata, A=weight.A, B=weight.B, target_dtype=weight.target_dtype, group_size=weight.group_size,
        dtype=weight.dtype, scale=weight.scale, zero_point=weight.zero_point,
        A_scale=weight.A_scale.roll(1, dims=1), A_zero_point=weight.A_zero_point.roll(1, dims=1),
        B_scale=weight.B_scale.roll(1, dims=0), B_zero_point=weight.B_zero_point.roll(1, dims=0),
        adapter_dtype=weight.adapter_dtype, adapter_group_size=weight.adapter_group_size,
    )
    assert ((misgrouped.dequantize_A() - a).abs() > s_a).any()
    assert ((misgrouped.dequantize_B() - b).abs() > s_b).any()


def test_with_factors_gives_full_precision_adapters_and_dequantize_uses_the_intx_ones():
    _, base, delta, moment, factors = _problem()
    weight = QuantWithLowRank.from_parts(base, quantize_factors(delta, factors, 4, 8, moment))
    assert "adapters=int4 g8" in repr(weight)
    dense = weight.dequantize()
    torch.testing.assert_close(dense, base.dequantize() + weight.dequantize_B() @ weight.dequantize_A())
    plain = weight.with_factors(weight.dequantize_A(), weight.dequantize_B())
    assert plain.adapter_dtype is None and plain.A.dtype == torch.float32 and plain.A_scale is None
    assert torch.equal(plain.dequantize(), dense)


def test_to_dtype_and_tensor_parallel_slices_keep_intx_adapters():
    _, base, delta, moment, factors = _problem()
    weight = QuantWithLowRank.from_parts(base, quantize_factors(delta, factors, 4, 8, moment))
    half = weight.to(torch.bfloat16)
    assert half.A.dtype == torch.uint8 and half.A_scale.dtype == torch.bfloat16 and half.adapter_dtype == torch.int4
    torch.testing.assert_close(half.dequantize().float(), weight.dequantize(), rtol=0.02, atol=0.02)

    dense = weight.dequantize()
    rows = weight[8:24]
    assert torch.equal(rows.dequantize(), dense[8:24]) and rows.B_scale.shape == (16, 2)
    cols = weight[:, 16:48]  # aligned with both the base's groups (16) and the adapters' (8)
    assert torch.equal(cols.dequantize(), dense[:, 16:48]) and cols.A_scale.shape == (16, 4)
    with pytest.raises(ValueError, match="adapter_group_size 8"):
        QuantWithLowRank.from_parts(RTNConfig(3, 4).compress(torch.randn(48, 64)),
                                    quantize_factors(delta, factors, 4, 8, moment))[:, 4:12]


# ---- through quantize_: eager == compiled, bit-exact reloads ------------------------------------------------------


@pytest.fixture(scope="module")
def int4_model():
    model, config = tiny_llama(), EoRAConfig(rank=8, base=BASE, **ADAPTERS)
    quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    return model, config


@pytest.mark.slow  # compiles a whole model
def test_quantize_gives_int4_adapters_and_eager_equals_compiled(int4_model):
    model, _ = int4_model
    weights = _low_rank_weights(model)
    assert len(weights) == 14 and all(w.adapter_dtype == torch.int4 and w.A.dtype == torch.uint8
                                      for w in weights.values())  # int4 values bit-packed, two a byte
    batch = token_batches(1, seed=11)[0]
    compiled = _logits(torch.compile(model, fullgraph=True), batch)
    torch.testing.assert_close(compiled, _logits(model, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiles two whole models, twice
def test_int4_adapters_reload_bit_exactly(int4_model, tmp_path):
    model, config = int4_model
    out = save_pretrained(model, tmp_path / "int4", config)
    batch = token_batches(1, seed=12)[0]
    fields = ["qdata", "A", "B", "scale", "zero_point", "A_scale", "A_zero_point", "B_scale", "B_zero_point"]
    for reloaded in (AutoModelForCausalLM.from_pretrained(out), load_pretrained(out)):
        original, loaded = _low_rank_weights(model), _low_rank_weights(reloaded)
        assert set(loaded) == set(original)
        for name, w in original.items():
            for field in fields:
                assert torch.equal(getattr(loaded[name], field), getattr(w, field)), (name, field)
            assert (loaded[name].adapter_dtype, loaded[name].adapter_group_size) == (torch.int4, 8)
        assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
        assert torch.equal(_logits(torch.compile(reloaded, fullgraph=True), batch),
                           _logits(torch.compile(model, fullgraph=True), batch))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_type"]["default"][
        "_data"]["adapter_bits"] == 4


def test_int4_adapters_round_trip_through_torchao_safetensors(int4_model, tmp_path):
    model, _ = int4_model
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, QuantWithLowRank)}
    tensors, metadata = flatten_tensor_state_dict(state)
    assert "model.layers.0.self_attn.q_proj._weight_A_scale" in tensors
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata=metadata)
    restored, leftover = unflatten_tensor_state_dict(load_file(str(tmp_path / "w.safetensors")), metadata)
    assert not leftover and set(restored) == set(state)
    for name, w in state.items():
        r = restored[name]
        assert r.adapter_dtype == torch.int4 and r.adapter_group_size == 8
        for field in w.tensor_data_names + w.optional_tensor_data_names:
            assert torch.equal(getattr(r, field), getattr(w, field)), (name, field)


def test_missing_adapter_scale_is_named(int4_model, tmp_path):
    model, config = int4_model
    out = save_pretrained(model, tmp_path / "int4", config)
    weights = str(out / "model.safetensors")
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    key = "model.layers.0.self_attn.q_proj._weight_A_scale"
    tensors[key] = torch.zeros(8, 3)
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" has shape \(8, 3\), expected \(8, 8\)"):
        load_pretrained(out)
    del tensors[key]
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " is missing"):
        AutoModelForCausalLM.from_pretrained(out)


def test_peft_export_writes_the_dequantized_adapters(int4_model, tmp_path):
    model, config = int4_model
    out = export_peft(model, tmp_path / "adapter", save_base=False, config=config)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], w.dequantize_A())
    assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], w.dequantize_B())


def test_svd_method_quantizes_its_adapters_too():
    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=8, base=BASE, compensation="svd", **ADAPTERS), filter_fn=_decoder_linears)
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.adapter_dtype == torch.int4 and w.B.dtype == torch.uint8


# ---- config validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter_bits=16), r"adapter_bits must be None .* or an integer in 2\.\.8, got 16"),
    (dict(adapter_bits=1), r"integer in 2\.\.8, got 1"),
    (dict(adapter_bits=True), r"integer in 2\.\.8, got True"),
    (dict(adapter_bits=4, rank=48, adapter_group_size=32), r"adapter_group_size 32 does not divide rank=48.*\[8, 16\]"),
    (dict(adapter_bits=4, adapter_group_size=0), r"adapter_group_size must be an integer >= 1, got 0"),
    (dict(adapter_bits=4, adapter_group_size=2.5), r"adapter_group_size must be an integer"),
])
def test_config_rejects_bad_adapter_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EoRAConfig(**kwargs)


def test_adapter_group_size_must_divide_in_features():
    layer = torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False))
    with pytest.raises(ValueError, match=r"does not divide in_features=48.*e\.g\. \[8, 16\]"):
        quantize_(layer, EoRAConfig(rank=32, base=RTNConfig(4, 16), compensation="svd", adapter_bits=4,
                                    adapter_group_size=32))


def test_method_none_ignores_adapter_bits():
    config = EoRAConfig(rank=48, compensation="none", adapter_bits=4)  # no residual: nothing to quantize or validate
    assert config.describe().endswith("no residual")
    assert "int4 g32 adapters" in EoRAConfig(rank=64, adapter_bits=4).describe()


# ---- model size -----------------------------------------------------------------------------------------------


def _by_hand(model, rank, bits, group, adapter_bits, adapter_group):
    """Stored and packed bytes of a tiny Llama after quantize_, from its layer shapes alone: intN values are held
    bit-packed (every row length here is a multiple of the packing unit), so both are the packed count."""
    stored = packed = 0
    for name, p in model.named_parameters():
        if not isinstance(p, QuantWithLowRank):
            stored += p.numel() * 4
            packed += p.numel() * 4
            continue
        out_f, in_f = p.shape
        scales = out_f * in_f // group * (4 + 1)  # fp32 scale + int8 zero point per group
        adapter_scales = (rank * in_f + out_f * rank) // adapter_group * (4 + 1)
        stored += out_f * in_f * bits // 8 + scales + rank * (in_f + out_f) * adapter_bits // 8 + adapter_scales
        packed += out_f * in_f * bits // 8 + scales + rank * (in_f + out_f) * adapter_bits // 8 + adapter_scales
    return stored, packed


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_bytes_counts_every_byte(tmp_path, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )).eval()
    dense = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied weight once
    assert model_bytes(model) == {"stored": dense, "packed": dense, "base": 0, "adapters": 0, "other": dense,
                                  "packed_base": 0, "packed_adapters": 0}
    config = EoRAConfig(rank=8, base=BASE, compensation="svd", **ADAPTERS)
    quantize_(model, config, filter_fn=_decoder_linears)
    sizes = model_bytes(model)
    assert (sizes["stored"], sizes["packed"]) == _by_hand(model, 8, 3, 32, 4, 8)
    assert sizes["stored"] == sizes["base"] + sizes["adapters"] + sizes["other"]
    # Exactly what the safetensors file holds beyond its header (8-byte length + JSON).
    path = save_pretrained(model, tmp_path / "m", config) / "model.safetensors"
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    assert sizes["stored"] == os.path.getsize(path) - 8 - header


def test_cli_flags_build_the_adapter_config():
    from torchao_eora import cli

    args = cli.build_parser().parse_args(["quantize", "--rank", "64", "--adapter-bits", "4", "--adapter-group-size",
                                          "16", "--no-adapter-resolve", "--out", "x"])
    config = cli._config_from_args(args)
    assert (config.adapter_bits, config.adapter_group_size, config.adapter_resolve) == (4, 16, False)
    args = cli.build_parser().parse_args(["quantize", "--rank", "48", "--adapter-bits", "4", "--out", "x"])
    assert cli._config_from_args(args).adapter_group_size == 16  # the default group divides the rank
    args = cli.build_parser().parse_args(["quantize", "--rank", "48", "--adapter-bits", "4", "--adapter-group-size",
                                          "32", "--out", "x"])
    with pytest.raises(ValueError, match="adapter_group_size 32 does not divide rank=48"):
        cli._config_from_args(args)


def test_adapter_scales_and_zero_points_are_held_as_one_tensor_and_given_back_exactly():
    """In memory the four adapter scale / zero point fields are one tensor (a compiled call pays per inner tensor);
    read back, each is its own exact tensor (zero points int8, also from a bf16 weight), sharing no memory (so a
    checkpoint of them can be written), and a field of the wrong shape is refused rather than joined."""
    _, base, delta, moment, factors = _problem()
    q = quantize_factors(delta, factors, 4, 8, moment)
    for dtype in (torch.float32, torch.bfloat16):
        weight = QuantWithLowRank.from_parts(base, q, dtype=dtype)
        names, _ = weight.__tensor_flatten__()
        assert "adapter_qparams" in names and not {"A_scale", "A_zero_point", "B_scale", "B_zero_point"} & set(names)
        given = {"A_scale": q.A.scale.to(dtype), "A_zero_point": q.A.zero_point,
                 "B_scale": q.B.scale.to(dtype), "B_zero_point": q.B.zero_point}
        held = {name: getattr(weight, name) for name in given}
        for name, t in given.items():
            assert held[name].dtype == t.dtype and torch.equal(held[name], t), name
        pointers = {t.untyped_storage().data_ptr() for t in held.values()}
        assert len(pointers) == 4 and weight.adapter_qparams.untyped_storage().data_ptr() not in pointers
    with pytest.raises(ValueError, match=r"A_scale has shape \(16, 7\)"):
        QuantWithLowRank(
            qdata=weight.qdata, A=weight.A, B=weight.B, target_dtype=weight.target_dtype, group_size=weight.group_size,
            dtype=weight.dtype, scale=weight.scale, zero_point=weight.zero_point, A_scale=given["A_scale"][:, 1:],
            A_zero_point=given["A_zero_point"], B_scale=given["B_scale"], B_zero_point=given["B_zero_point"],
            adapter_dtype=weight.adapter_dtype, adapter_group_size=weight.adapter_group_size,
        )


def test_load_state_dict_copies_the_held_adapter_scales_and_zero_points():
    """``load_state_dict`` into an existing module copies every held tensor, ``adapter_qparams`` included (torchao's
    ``copy_`` walks ``__tensor_flatten__``): the loaded weight equals the source, not a mix of the two."""
    layers = []
    for seed in (0, 1):
        _, base, delta, moment, factors = _problem(seed=seed)
        layer = torch.nn.Linear(64, 48, bias=False)
        weight = QuantWithLowRank.from_parts(base, quantize_factors(delta, factors, 4, 8, moment))
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layers.append(layer)
    target, source = layers
    assert not torch.equal(target.weight.A_scale, source.weight.A_scale)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight.dequantize(), source.weight.dequantize())
    for name in ("A_scale", "A_zero_point", "B_scale", "B_zero_point"):
        assert torch.equal(getattr(target.weight, name), getattr(source.weight, name)), name
