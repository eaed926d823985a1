"""Per-layer inputs of the sequential pass, and v_proj's attention-weighted moment in the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import tiny_llama, token_batches
from torchao_eora import Calibration, EoRAConfig, GPTQConfig, PruneConfig, RTNConfig, calibrate, compress_sequential
from torchao_eora.attention_moments import mixed_value_moment, value_output_error
from torchao_eora.sequential import _capture_layer_inputs, find_decoder_layers
from torchao_eora.solver import LowRankFactors, eora_factors, weighted_error
from torchao_eora.transform import residual_stats


def tiny_gemma3(layers: int = 4):
    """A small random Gemma 3: sliding-window layers (window 4) alternating with global ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
    )
    return Gemma3ForCausalLM(cfg).eval()


@torch.inference_mode()
def test_every_layer_gets_its_own_keyword_arguments():
    """Gemma 3's global layers need their own mask and rotary table: run layer by layer with the captured
    arguments, every layer reproduces the model's own hidden states; with layer 0's arguments they do not."""
    model = tiny_gemma3()
    batch = token_batches(1, batch=2, seq=16)[0]
    expected = model(**batch, output_hidden_states=True).hidden_states
    _, layers = find_decoder_layers(model)
    hidden, kwargs = _capture_layer_inputs(model, layers, [batch], torch.device("cpu"))
    assert torch.equal(hidden[0], expected[0])
    own = layer0s = hidden[0]
    for i, layer in enumerate(layers[:-1]):  # the last entry of hidden_states has the final norm applied
        own, layer0s = layer(own, **kwargs[i][0]), layer(layer0s, **kwargs[0][0])
        torch.testing.assert_close(own, expected[i + 1], rtol=0, atol=0)
    assert not torch.allclose(layer0s, expected[len(layers) - 1], atol=1e-2)


@torch.inference_mode()
def test_capture_reads_no_layer_weight():
    """Capturing runs no decoder layer: it works with every layer's weights on the meta device (streaming)."""
    model = tiny_llama(layers=3)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        layer.to("meta")
    hidden, kwargs = _capture_layer_inputs(model, layers, token_batches(2), torch.device("cpu"))
    assert len(hidden) == 2 and [len(k) for k in kwargs] == [2, 2, 2]
    assert all("forward" not in layer.__dict__ for layer in layers)  # recorders removed


def _reference_value_moment(model, batches):
    """Layer 0's v_proj attention-weighted moment, from the uncompressed model run with eager attention."""
    model.set_attn_implementation("eager")
    attn = model.model.layers[0].self_attn
    total, count = None, 0
    seen = {}
    handle = attn.v_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.inference_mode():
            for b in batches:
                probs = model(**b, output_attentions=True).attentions[0]
                t, c = mixed_value_moment(seen["x"], probs, b["attention_mask"], num_kv_heads=attn.config.num_key_value_heads)
                total, count = (t if total is None else total + t), count + c
    finally:
        handle.remove()
        model.set_attn_implementation("sdpa")
    return total, count


def test_engine_value_moment_is_the_attention_weighted_moment():
    model = tiny_llama(layers=2)
    batches = token_batches(2, pad_first=5)
    expected, count = _reference_value_moment(model, batches)
    calib = compress_sequential(model, batches, EoRAConfig(rank=4, base=GPTQConfig(3, 32)), progress=False)
    name = "model.layers.0.self_attn.v_proj"
    moment = calib.groups[calib.value_group_of[name]]
    assert moment.total.shape == (2, 64, 64) and moment.n_tokens == count
    torch.testing.assert_close(moment.total, expected, rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"  # restored after the pass
    assert calib.stats_of(name).compressor_moment is moment
    assert calib.stats_of("model.layers.0.self_attn.q_proj").compressor_moment is None


def test_plain_value_moment_and_data_free_bases_collect_none():
    batches = token_batches(1)
    for config in (EoRAConfig(rank=4, base=GPTQConfig(3, 32), value_moment="plain"),
                   EoRAConfig(rank=4, base=RTNConfig(3, 32))):
        calib = compress_sequential(tiny_llama(), batches, config, progress=False)
        assert calib.value_group_of == {} and all(m.total.dim() == 2 for m in calib.groups.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_with_the_attention_moment_lowers_the_attention_output_error(seed):
    """The attention-weighted moment is the statistic of the attention-output error v_proj causes: GPTQ that
    minimises it beats GPTQ on the plain moment in that error (layer 0, whose inputs are the model's own)."""
    model = tiny_llama(seed=seed)
    batches = token_batches(2, seed=seed)
    calib = compress_sequential(model, batches, EoRAConfig(rank=1, base=GPTQConfig(3, 16), compensation="none"),
                                in_place=False, progress=False)
    name = "model.layers.0.self_attn.v_proj"
    stats = calib.stats_of(name)
    w = model.get_submodule(name).weight.detach().float()
    mixed = stats.compressor_moment.mean()
    gptq = GPTQConfig(3, 16)
    err_attention = value_output_error(w - gptq.compress(w, mixed).dequantize(), mixed)
    err_plain = value_output_error(w - gptq.compress(w, stats.moment.mean()).dequantize(), mixed)
    assert err_attention < err_plain
    # what the engine installed is the attention-weighted compression
    installed = calib.results[name].dequantize() - calib.results[name].B @ calib.results[name].A
    torch.testing.assert_close(installed, gptq.compress(w, mixed).dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("base", [GPTQConfig(3, 16), GPTQConfig(4, 16, act_order=False),
                                  PruneConfig("sparsegpt", "2:4"), PruneConfig("wanda", "2:4", quantizer=GPTQConfig(4, 16))])
def test_a_stack_of_moments_compresses_each_row_block_with_its_own(base):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    xs = [torch.randn(200, 64, generator=g) * torch.linspace(0.1, 3, 64) for _ in range(2)]
    stack = torch.stack([(x.T @ x / 200).double() for x in xs])
    whole = base.compress(w, stack)
    assert whole.dequantize().shape == w.shape
    for block, rows in enumerate(w.split(16)):
        part = base.compress(rows, stack[block]).dequantize()
        torch.testing.assert_close(whole.dequantize()[16 * block:16 * (block + 1)], part, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not split"):
        base.compress(w[:31], stack)


def test_saved_calibration_keeps_the_value_moments(tmp_path):
    model = tiny_llama()
    calib = compress_sequential(model, token_batches(1), EoRAConfig(rank=4, base=GPTQConfig(3, 32)),
                                in_place=False, progress=False)
    calib.save(tmp_path / "c.safetensors")
    loaded = Calibration.load(tmp_path / "c.safetensors")
    assert loaded.value_group_of == calib.value_group_of
    name = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(loaded.stats_of(name).compressor_moment.total,
                               calib.stats_of(name).compressor_moment.total, rtol=0, atol=0)


def test_eora_residual_of_v_proj_is_weighted_with_the_attention_moment():
    """Over a calibrated compressor, EoRA's v_proj residual is the exact optimum for the attention-weighted moment
    (summed over kv heads), not for the plain one: it beats the plain-moment residual in that norm. Other modules
    and RTN keep the plain moment."""
    model = tiny_llama(layers=2)
    batches = token_batches(2, pad_first=5)
    config = EoRAConfig(rank=4, base=PruneConfig("sparsegpt", "2:4"), shrinkage=0)
    assert config.attention_value_residual and not config.attention_value_moment  # SparseGPT's compressor: plain
    calib = compress_sequential(model, batches, config, in_place=False, progress=False)
    name = "model.layers.0.self_attn.v_proj"
    stats = calib.stats_of(name)
    summed = stats.attention_moment.mean()
    assert summed.shape == (64, 64)  # summed over kv heads as collected: SparseGPT's compressor needs no stack
    w = model.get_submodule(name).weight.detach().float()
    installed = calib.results[name]
    delta = w - installed.dequantize_base(torch.float32)
    torch.testing.assert_close(delta, w - config.base.compress(w, stats.moment.mean()).dequantize(), rtol=0, atol=0)
    expected = eora_factors(delta, summed, 4)
    torch.testing.assert_close(installed.B @ installed.A, expected.B @ expected.A, rtol=1e-4, atol=1e-6)
    plain = eora_factors(delta, stats.moment.mean(), 4)
    ours = LowRankFactors(installed.A.float(), installed.B.float())
    assert weighted_error(delta, ours, summed) < 0.99 * weighted_error(delta, plain, summed)
    q = "model.layers.0.self_attn.q_proj"  # reads the same input, keeps the plain moment
    dq = model.get_submodule(q).weight.detach().float() - calib.results[q].dequantize_base(torch.float32)
    fq = eora_factors(dq, calib.stats_of(q).moment.mean(), 4)
    torch.testing.assert_close(calib.results[q].B @ calib.results[q].A, fq.B @ fq.A, rtol=1e-4, atol=1e-6)


def test_which_configs_weight_the_value_residual_with_attention():
    assert EoRAConfig(base=GPTQConfig(3)).attention_value_residual
    assert EoRAConfig(base=PruneConfig("wanda", "2:4")).attention_value_residual
    assert not EoRAConfig(base=RTNConfig(3)).attention_value_residual  # not measured for RTN: plain by default
    assert EoRAConfig(base=RTNConfig(3), value_moment="attention").attention_value_residual
    assert not EoRAConfig(base=GPTQConfig(3), value_moment="plain").attention_value_residual
    assert not EoRAConfig(base=GPTQConfig(3), compensation="svd").attention_value_residual


def test_one_shot_collects_the_summed_attention_moment_for_the_residual_alone():
    model = tiny_llama(layers=2)
    batches = token_batches(2, pad_first=5)
    expected, _ = _reference_value_moment(model, batches)
    calib = calibrate(model, batches, mode="one-shot", progress=False)  # no config: every moment a config may read
    name = "model.layers.0.self_attn.v_proj"
    stats = calib.stats_of(name)
    assert stats.compressor_moment is None  # one-shot GPTQ keeps the plain moment
    assert stats.attention_moment.total.shape == (64, 64) and stats.attention_moment.n_tokens > 0
    torch.testing.assert_close(stats.attention_moment.total, expected.sum(0), rtol=1e-5, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored after the pass
    rtn = calibrate(model, batches, EoRAConfig(rank=4, base=RTNConfig(3, 32)), mode="one-shot", progress=False)
    assert rtn.value_group_of == {}


def test_attention_weighted_stats_sum_a_stack_over_kv_heads():
    from torchao_eora.calibration import ModuleStats, SecondMoment

    stack = torch.randn(3, 8, 8, dtype=torch.float64)
    stack = stack @ stack.transpose(1, 2)
    plain = SecondMoment(torch.eye(8, dtype=torch.float64), 5)
    weighted = ModuleStats(plain, lambda: None, attention_moment=SecondMoment(stack, 7)).attention_weighted()
    torch.testing.assert_close(weighted.moment.mean(), stack.sum(0) / 7)
    eigen = weighted.eigen()
    torch.testing.assert_close(eigen.vectors @ torch.diag(eigen.values) @ eigen.vectors.T, stack.sum(0) / 7)
    with pytest.raises(ValueError, match="only a v_proj"):
        ModuleStats(plain, lambda: None).attention_weighted()


def test_auto_keeps_the_plain_residual_where_gptq_minimised_the_attention_error():
    """Sequential GPTQ fits v_proj to the attention-weighted moment itself: under ``"auto"`` EoRA's residual is
    then weighted with the plain moment (measured: no gain there), under ``"attention"`` with the attention one;
    one-shot GPTQ (plain compressor moment) gets the attention-weighted residual under ``"auto"``."""
    model = tiny_llama(layers=1)
    batches = token_batches(2, pad_first=5)
    name = "model.layers.0.self_attn.v_proj"
    auto = EoRAConfig(rank=4, base=GPTQConfig(3, 32))
    sequential = compress_sequential(model, batches, auto, in_place=False, progress=False).stats_of(name)
    assert sequential.compressor_moment is not None and sequential.attention_moment is not None
    assert residual_stats(sequential, auto) is sequential
    attention = replace(auto, value_moment="attention")
    torch.testing.assert_close(residual_stats(sequential, attention).moment.total,
                               sequential.attention_moment.total.sum(0), rtol=0, atol=0)
    one_shot = calibrate(model, batches, auto, mode="one-shot", progress=False).stats_of(name)
    assert one_shot.compressor_moment is None
    torch.testing.assert_close(residual_stats(one_shot, auto).moment.total, one_shot.attention_moment.total,
                               rtol=0, atol=0)
