"""Mixture-of-experts models (transformers 5 fused experts): every expert compressed and compensated from the tokens
routed to it, the model's own forward kept, saved and reloaded bit-identically."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_causal_lm, token_batches
from torchao_eora import EoRAConfig, RTNConfig, compress_sequential, load_pretrained, save_pretrained
from torchao_eora.experts import find_experts
from torchao_eora.experts_tensor import QuantExperts
from torchao_eora.solver import svd_factors
from torchao_eora.tensor import QuantWithLowRank

CONFIG = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), adapter_bits=4, adapter_group_size=4)
MOE = ["qwen3_moe", "mixtral", "deepseek_v3"]


def _decoder_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.model.layers.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("architecture", MOE)
def test_every_expert_is_compressed_and_the_model_reloads_bit_identically(tmp_path, architecture):
    model = tiny_causal_lm(architecture)
    calib = compress_sequential(model, token_batches(2), CONFIG, progress=False)
    weights = _decoder_weights(model)
    routers = {n for n in weights if n.endswith("mlp.gate.weight")}
    assert routers and all(type(weights[n]) is torch.nn.Parameter for n in routers)  # the router is untouched
    experts = {n for n in weights if ".experts." in n}
    assert experts and all(isinstance(weights[n], QuantExperts) for n in experts)
    assert all(isinstance(weights[n], QuantWithLowRank) for n in set(weights) - routers - experts)
    assert calib.coverage.compressed == sum(w.numel() for n, w in weights.items() if n not in routers)
    assert not calib.coverage.left_alone
    tokens_per_layer = 2 * 4 * 32 * model.config.num_experts_per_tok
    assert all(sum(counts) == tokens_per_layer for counts in calib.expert_tokens.values())

    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        save_pretrained(model, tmp_path / "out", CONFIG)
        assert torch.equal(load_pretrained(tmp_path / "out")(**batch).logits, expected)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert reloaded.config._experts_implementation == "eager"
        assert torch.equal(reloaded(**batch).logits, expected)


def test_an_expert_no_token_reached_gets_the_plain_svd_residual():
    model = tiny_causal_lm("qwen3_moe", layers=1)
    dense = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    config = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), adapter_bits=None)
    calib = compress_sequential(model, [token_batches(1, batch=1, seq=3)[0]], config, progress=False)
    counts = calib.expert_tokens["model.layers.0.mlp.experts"]
    unseen = counts.index(0)
    weight = model.model.layers[0].mlp.experts.down_proj[unseen]
    error = dense[unseen] - weight.dequantize_base(torch.float32)
    plain = svd_factors(error, 4)
    assert torch.isfinite(weight.A).all() and torch.isfinite(weight.B).all()
    torch.testing.assert_close(weight.B @ weight.A, plain.B @ plain.A, rtol=1e-4, atol=1e-5)


def test_experts_are_found_in_moe_layers_only():
    model = tiny_causal_lm("deepseek_v3")  # layer 0 dense, layer 1 routed + shared experts
    found = find_experts(model.model.layers, "model.layers.")
    assert list(found) == ["model.layers.1.mlp.experts"]


@pytest.mark.parametrize("base_format", ["torchao", "eora"])
@pytest.mark.parametrize("architecture", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_peft_export_of_experts_loads_and_computes_the_same(tmp_path, architecture, base_format):
    from peft import PeftModel

    from torchao_eora import export_peft

    model = tiny_causal_lm(architecture)
    compress_sequential(model, token_batches(1), CONFIG, progress=False)
    export_peft(model, tmp_path / "adapter", config=CONFIG, base_format=base_format)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_peft_export_says_which_linears_peft_will_not_adapt(tmp_path, caplog):
    """DeepSeek-V3's shared experts are linears named gate_proj / up_proj / down_proj: PEFT with transformers 5
    takes them for a transformers 4 per-expert adapter and drops them, so the export says so."""
    from peft import PeftModel

    from torchao_eora import export_peft

    model = tiny_causal_lm("deepseek_v3")
    compress_sequential(model, token_batches(1), CONFIG, progress=False)
    export_peft(model, tmp_path / "adapter", config=CONFIG)
    assert "will not apply the adapters of 6 linears" in caplog.text  # dense layer 0 and the shared experts
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    PeftModel.from_pretrained(base, tmp_path / "adapter")  # loads: keys and shapes of the experts' factors fit


def test_calibrate_then_quantize_installs_the_experts_too():
    """The two-step flow: sequential calibration compresses the experts on layer copies, quantize_ installs them
    with the linears (quantize_ itself visits linears only)."""
    from torchao.quantization import quantize_

    from torchao_eora import calibrate, eora_config

    model = tiny_causal_lm("mixtral")
    reference = tiny_causal_lm("mixtral")
    calib = calibrate(model, token_batches(1), CONFIG, progress=False)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # calibrate changes nothing
    quantize_(model, eora_config(calib))
    compress_sequential(reference, token_batches(1), CONFIG, progress=False)
    assert all(isinstance(layer.mlp.experts.down_proj, QuantExperts) for layer in model.model.layers)
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_the_data_free_path_compresses_the_experts_too():
    from torchao_eora.coverage import measured_coverage
    from torchao_eora.pipeline import compress_model

    model = tiny_causal_lm("qwen3_moe")
    config = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), compensation="svd", adapter_bits=None)
    compress_model(model, None, config, progress=False)
    assert all(isinstance(layer.mlp.experts.gate_up_proj, QuantExperts) for layer in model.model.layers)
    assert abs(measured_coverage(model).share - 0.8735) < 1e-3
