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
