"""Experts' residuals on held-out routed activations: EoRA vs plain SVD per expert, and down_proj's moment weighted by
the routing weights vs plain, measured on a random Qwen3-MoE layer (no pretrained MoE is available offline).

For each calibration size: layer 0's MoE block of a random Qwen3-MoE (hidden 128, 16 experts of 64, top 2) is
compressed (3-bit g32 RTN, rank 8) with the experts' statistics from the calibration windows, then scored on other
windows: per expert the residual's error on its held-out routed inputs relative to no residual (gate_up: ``x``;
down: the routing-weighted ``w h``, how its error reaches the block output), and the block's output error.

    python benchmarks/moe_study.py [--windows 4 16 64] [--json benchmarks/results/moe_study.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from torchao_eora import EoRAConfig, RTNConfig
from torchao_eora import experts as experts_module
from torchao_eora.calibration import Calibration
from torchao_eora.experts import compress_experts
from torchao_eora.moments import MomentCollector, _apply_gate

CONFIG = EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32), adapter_bits=None)
SEQ = 64


def tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                         max_position_embeddings=SEQ)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.set_experts_implementation("eager")
    return model


def block_inputs(model, windows: int, seed: int) -> list[torch.Tensor]:
    """The MoE block's inputs (tokens, hidden) for ``windows`` random windows, one batch of 4 windows at a time."""
    g = torch.Generator().manual_seed(seed)
    block, seen = model.model.layers[0].mlp, []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for _ in range(windows // 4):
            model(input_ids=torch.randint(0, 256, (4, SEQ), generator=g))
    handle.remove()
    return seen


def routed(block, hidden: torch.Tensor):
    """Per expert: (held-out inputs x, routing-weighted gated activations w h) of the tokens routed to it."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = block.gate(flat)
    experts, out = block.experts, []
    for e in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.nonzero(index == e, as_tuple=True)
        x = flat[token]
        h = _apply_gate(experts, torch.nn.functional.linear(x, experts.gate_up_proj[e]))
        out.append((x, h * weights[token, slot][:, None]))
    return out


def compressed_block(model, inputs, config: EoRAConfig, weighted_down: bool):
    block = model.model.layers[0].mlp
    dense = {p: getattr(block.experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    name = "model.layers.0.mlp.experts"
    with torch.no_grad(), MomentCollector({}, experts={name: block.experts}, weighted_down=weighted_down,
                                          split=config.shrinkage == "auto") as collector:
        for h in inputs:
            collector.start_batch(None, h.shape[0])
            block(h)
    stats = Calibration(collector.groups, collector.group_of, "sequential")
    compress_experts(name, block.experts, config, stats)
    counts = experts_module.expert_token_counts(stats, name, dense["gate_up_proj"].shape[0])
    weights = {p: getattr(block.experts, p) for p in dense}
    for p, w in dense.items():  # the model keeps its dense experts for the next variant
        setattr(block.experts, p, torch.nn.Parameter(w, requires_grad=False))
    return weights, counts


def errors(dense, weights, held_out):
    """Per expert and parameter: ||(W - W_c - B A) X^T||^2 on the held-out routed inputs."""
    out = []
    for e, (x, wh) in enumerate(held_out):
        row = {}
        for p, inputs in (("gate_up_proj", x), ("down_proj", wh)):
            residual_error = dense[p][e].double() - weights[p].expert(e).dequantize(torch.float32).double()
            row[p] = float((inputs.double() @ residual_error.T).pow(2).sum())
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = tiny_moe()
    block = model.model.layers[0].mlp
    dense = {p: getattr(block.experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    held_out_inputs = block_inputs(model, 32, seed=1)
    with torch.no_grad():
        held_out = routed(block, torch.cat(held_out_inputs))
        reference = [block(h) for h in held_out_inputs]
    results = []
    for windows in args.windows:
        calibration = block_inputs(model, windows, seed=2)
        variants = {
            "none": (replace(CONFIG, compensation="none"), True),
            "svd": (replace(CONFIG, compensation="svd"), True),
            "eora plain down": (CONFIG, False),
            "eora weighted down": (CONFIG, True),
        }
        per_variant, counts = {}, None
        for label, (config, weighted) in variants.items():
            weights, counts = compressed_block(model, calibration, config, weighted)
            per_expert = errors(dense, weights, held_out)
            saved = {p: getattr(block.experts, p) for p in dense}
            for p, w in weights.items():
                setattr(block.experts, p, torch.nn.Parameter(w, requires_grad=False))
            with torch.no_grad():
                block_error = sum(float((block(h) - r).pow(2).sum()) for h, r in zip(held_out_inputs, reference))
            for p, w in saved.items():
                setattr(block.experts, p, w)
            per_variant[label] = {"experts": per_expert, "block": block_error}
        none = per_variant["none"]
        row = {"windows": windows, "tokens per expert": counts}
        for label, v in per_variant.items():
            if label == "none":
                continue
            row[label] = {
                p: sum(e[p] for e in v["experts"]) / sum(e[p] for e in none["experts"]) for p in dense
            } | {"block": v["block"] / none["block"]}
        well_seen = [e for e, n in enumerate(counts) if n >= 128]
        row["experts with >= 128 tokens"] = len(well_seen)
        row["eora beats svd (gate_up, down), experts"] = [
            sum(per_variant["eora weighted down"]["experts"][e][p] < per_variant["svd"]["experts"][e][p]
                for e in range(len(counts))) for p in dense]
        row["eora worse than svd by > 1% (gate_up, down), experts"] = [
            sum(per_variant["eora weighted down"]["experts"][e][p] > 1.01 * per_variant["svd"]["experts"][e][p]
                for e in range(len(counts))) for p in dense]
        row["worst eora / svd (gate_up, down)"] = [
            max(per_variant["eora weighted down"]["experts"][e][p] / per_variant["svd"]["experts"][e][p]
                for e in range(len(counts))) for p in dense]
        results.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": CONFIG.describe(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
