"""Output-side weighting: the residual's error weighted by the loss gradient's second moment at the layer's output."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import quantize_

from helpers import FromDisk, anisotropic_moment, tiny_causal_lm, tiny_llama, token_batches
from torchao_eora import EoRAConfig, RTNConfig, calibrate, compress_sequential
from torchao_eora.calibration import ModuleStats, SecondMoment
from torchao_eora.layerwise_gradients import layerwise_output_gradient_moments
from torchao_eora.output_weights import FLOOR, output_gradient_moments, output_weighting
from torchao_eora.sequential import _linears, find_decoder_layers
from torchao_eora.solver import eigen_of
from torchao_eora.transform import eora_quantize_tensor

BASE = RTNConfig(bits=2, group_size=32)


def test_the_diagonal_is_the_squared_loss_gradient_at_the_output():
    model = tiny_llama()
    batches = token_batches(n_batches=2, pad_first=5)
    prefix, layers = find_decoder_layers(model)
    linears = _linears(layers, prefix + ".")
    d = output_gradient_moments(model, batches, linears)
    assert set(d) == set(linears) and all(v.shape == (linears[n].out_features,) for n, v in d.items())
    weights = {n: output_weighting(v) for n, v in d.items()}
    assert all(w.min() >= FLOOR and abs(float(w.mean()) - 1) < 1e-5 for w in weights.values())
    assert all(p.grad is None for p in model.parameters())  # only the activations carried a gradient

    # the same for one module by hand: retain its output's gradient
    name = f"{prefix}.1.self_attn.v_proj"
    outputs = []
    handle = linears[name].register_forward_hook(lambda m, a, out: outputs.append(out) or out.retain_grad())
    total, tokens = 0, 0
    for b in batches:
        mask = b["attention_mask"]
        labels = b["input_ids"].masked_fill(mask == 0, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=mask, labels=labels).loss
        predicted = (labels[:, 1:] != -100).sum()
        (loss * predicted).backward()  # each predicted token's loss counts once
        total, tokens = total + outputs[-1].grad.square().sum((0, 1)), tokens + int(predicted)
    handle.remove()
    torch.testing.assert_close(d[name], total / tokens, rtol=1e-4, atol=1e-10)


def _output_weighted_error(w, q, c, d) -> float:
    e = (w - q.dequantize_base(torch.float32) - q.B @ q.A).double()
    return float(torch.trace(d.double()[:, None] * e @ c @ e.T))


def test_the_weighted_residual_minimises_the_weighted_error():
    torch.manual_seed(0)
    c = anisotropic_moment(128)
    stats = ModuleStats(SecondMoment(c.float(), 1), lambda: eigen_of(c))
    w = torch.randn(96, 128)
    d = torch.rand(96) ** 4 * 10 + 0.01  # a few output channels matter far more than the rest
    config = EoRAConfig(rank=16, base=BASE, shrinkage=0.0)
    plain = eora_quantize_tensor(w, config, stats)
    weighted = eora_quantize_tensor(w, config, stats, output_weight=d)
    assert _output_weighted_error(w, weighted, c, d) < 0.9 * _output_weighted_error(w, plain, c, d)
    # refinement rounds are kept only when they lower the weighted error
    refined = eora_quantize_tensor(w, EoRAConfig(rank=16, base=BASE, shrinkage=0.0, refine_rounds=3), stats,
                                   output_weight=d)
    assert _output_weighted_error(w, refined, c, d) <= _output_weighted_error(w, weighted, c, d) * (1 + 1e-6)
    # a uniform weight changes nothing
    same = eora_quantize_tensor(w, config, stats, output_weight=torch.full((96,), 3.0))
    torch.testing.assert_close(same.B @ same.A, plain.B @ plain.A, rtol=1e-4, atol=1e-5)


def test_sequential_pass_and_refusals():
    config = EoRAConfig(rank=8, base=BASE, output_weighting="gradient", adapter_bits=4, adapter_group_size=8)
    model = tiny_llama()
    compress_sequential(model, token_batches(), config, progress=False)
    assert torch.isfinite(model(token_batches()[0]["input_ids"]).logits).all()
    assert "gradient-weighted outputs" in config.describe()

    with pytest.raises(ValueError, match="needs compensation='eora'"):
        EoRAConfig(rank=8, compensation="svd", output_weighting="gradient")
    with pytest.raises(ValueError, match="use mode='sequential'"):
        calibrate(tiny_llama(), token_batches(), config, mode="one-shot", progress=False)
    one_shot = calibrate(tiny_llama(), token_batches(), mode="one-shot", progress=False)
    with pytest.raises(ValueError, match="solved during sequential calibration"):
        quantize_(tiny_llama(), EoRAConfig(rank=8, base=BASE, output_weighting="gradient", calibration=one_shot))

    with pytest.raises(ValueError, match="in memory"):
        compress_sequential(tiny_llama(), token_batches(), config, layer_io=FromDisk(), progress=False)


def test_the_loss_aware_budget_computes_the_gradients_once(monkeypatch):
    """``rank_budget="global"`` under output weighting spends ranks by the loss-weighted error: other ranks than the
    activation-weighted budget's, and the gradient pass is shared by the budget's first pass."""
    from torchao_eora import sequential

    calls = []
    real = sequential.output_gradient_moments
    monkeypatch.setattr(sequential, "output_gradient_moments", lambda *a: calls.append(1) or real(*a))
    config = EoRAConfig(rank=8, base=BASE, rank_budget="global")
    plain = calibrate(tiny_llama(), token_batches(), config, progress=False).ranks
    loss = calibrate(tiny_llama(), token_batches(), EoRAConfig(rank=8, base=BASE, rank_budget="global",
                                                              output_weighting="gradient"), progress=False).ranks
    assert len(calls) == 1 and loss != plain and set(loss) == set(plain)


@pytest.mark.parametrize("architecture", ["llama", "qwen3_moe"])
def test_layer_by_layer_gradients_equal_the_whole_model_pass(tmp_path, architecture):
    """The streamed form (forward storing each layer's inputs, head, then backward one layer at a time) gives the
    whole-model backward's diagonals, and removes the inputs it spilled to disk."""
    model = tiny_llama(layers=3) if architecture == "llama" else tiny_causal_lm(architecture, layers=3)
    batches = token_batches(n_batches=2, pad_first=5)
    prefix, layers = find_decoder_layers(model)
    whole = output_gradient_moments(model, batches, _linears(layers, prefix + "."))
    loaded, released = [], []
    spill = tmp_path / "spill"
    streamed = layerwise_output_gradient_moments(
        model, batches, load=lambda i, layer: loaded.append(i), release=lambda i, layer: released.append(i),
        device=torch.device("cpu"), spill_dir=spill, progress=False)
    assert set(streamed) == set(whole)
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-4, atol=1e-12)
    assert loaded == released == [0, 1, 2, 2, 1, 0] and not spill.exists()
    assert all(p.grad is None for p in model.parameters())


def test_layer_by_layer_gradients_storing_every_other_layer_recompute_the_rest(tmp_path):
    """With the inputs of layers 0 and 2 stored, the backward recomputes layer 1's from layer 0's (layer 0 read
    once more) and gets the same diagonals."""
    model = tiny_llama(layers=3)
    batches = token_batches(n_batches=2, pad_first=5)
    prefix, layers = find_decoder_layers(model)
    whole = output_gradient_moments(model, batches, _linears(layers, prefix + "."))
    loaded = []
    spill = tmp_path / "spill"
    streamed = layerwise_output_gradient_moments(
        model, batches, load=lambda i, layer: loaded.append(i), release=lambda i, layer: None,
        device=torch.device("cpu"), spill_dir=spill, every=2, progress=False)
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-4, atol=1e-12)
    assert loaded == [0, 1, 2, 2, 0, 1, 0] and not spill.exists()


def test_layer_by_layer_gradients_fit_the_free_disk(tmp_path, monkeypatch):
    """Four layers' inputs do not fit, three do: every other layer's are stored (2 checkpoints + 1 recomputed);
    with room for two, a one-line error says how much disk is needed, before any layer runs."""
    import shutil
    from collections import namedtuple

    import torchao_eora.layerwise_gradients as lg

    model = tiny_llama(layers=4)
    batches = token_batches(n_batches=2, pad_first=5)
    per_layer = sum(b["input_ids"].numel() for b in batches) * model.config.hidden_size * 4  # fp32 hidden states
    usage = namedtuple("usage", "total used free")
    loaded = []

    def run(free_layers: float):
        loaded.clear()
        monkeypatch.setattr(lg.shutil, "disk_usage",
                            lambda path: usage(0, 0, int(free_layers * per_layer / lg.DISK_SHARE)))
        shutil.rmtree(tmp_path / "spill", ignore_errors=True)
        return layerwise_output_gradient_moments(
            model, batches, load=lambda i, layer: loaded.append(i), release=lambda i, layer: None,
            device=torch.device("cpu"), spill_dir=tmp_path / "spill", progress=False)

    everything = run(4.01)  # (int bytes: a hair above four layers)
    assert loaded == [0, 1, 2, 3, 3, 2, 1, 0]
    spaced = run(3.5)
    assert loaded == [0, 1, 2, 3, 2, 3, 2, 0, 1, 0]
    for name in everything:
        torch.testing.assert_close(spaced[name], everything[name], rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match=r"needs \d+\.\d GiB of disk"):
        run(2)
    assert loaded == [] and not (tmp_path / "spill").exists()


def test_layer_by_layer_gradients_of_a_model_built_in_inference_mode():
    """Weights made under inference mode (as a streamed model's are) cannot be saved for the backward: the pass
    works on normal copies meanwhile, and leaves the model as it was, its tied head still tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()

    batches = token_batches(n_batches=1, pad_first=5)
    reference = build()
    prefix, layers = find_decoder_layers(reference)
    whole = output_gradient_moments(reference, batches, _linears(layers, prefix + "."))
    with torch.inference_mode():
        model = build()
    head = model.lm_head.weight
    streamed = layerwise_output_gradient_moments(model, batches, load=lambda i, layer: None,
                                                 release=lambda i, layer: None, device=torch.device("cpu"),
                                                 progress=False)
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-4, atol=1e-12)
    assert model.lm_head.weight is head is model.model.embed_tokens.weight and head.is_inference()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_by_layer_gradients_on_cuda():
    """Layers moved to the GPU one at a time, the embeddings and head there for the head pass, then back."""
    model = tiny_llama(layers=3)
    batches = token_batches(n_batches=2, pad_first=5)
    prefix, layers = find_decoder_layers(model)
    whole = output_gradient_moments(model, batches, _linears(layers, prefix + "."))
    streamed = layerwise_output_gradient_moments(
        model, batches, load=lambda i, layer: layer.to("cuda"), release=lambda i, layer: layer.to("cpu"),
        device=torch.device("cuda"), progress=False)
    for name in whole:
        torch.testing.assert_close(streamed[name].cpu(), whole[name], rtol=1e-3, atol=1e-10)
    assert all(p.device.type == "cpu" for p in model.parameters())
