"""Tiny random models of architectures whose checkpoints are not the in-memory state dict (per-expert keys fused at
load, renamed heads): streamed from their hub layout, they give the in-memory pass's model, every decoder weight
compressed."""

from __future__ import annotations

import pytest
import torch

from helpers import char_tokenizer, tiny_causal_lm, token_batches
from torchao_eora import EoRAConfig, RTNConfig, cli, compress_sequential, load_pretrained
from torchao_eora.streaming import quantize_checkpoint

CONFIG = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), adapter_bits=4, adapter_group_size=4)


def _checkpoint(path, architecture):
    tiny_causal_lm(architecture).save_pretrained(path, max_shard_size="100KB")  # the hub layout, sharded
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_neox"])
def test_a_hub_layout_checkpoint_streams_to_the_in_memory_result(tmp_path, architecture):
    source = _checkpoint(tmp_path / "src", architecture)
    batches = token_batches(2, seed=2, pad_first=3)
    calib = quantize_checkpoint(source, tmp_path / "out", CONFIG, batches, device="cpu", progress=False)

    in_memory = load_pretrained(source)
    decoder = {n: p for n, p in in_memory.named_parameters() if ".layers." in n and p.dim() >= 2}
    routers = {n for n in decoder if n.endswith("mlp.gate.weight")}
    assert calib.coverage.compressed == sum(p.numel() for n, p in decoder.items() if n not in routers)
    assert not calib.coverage.left_alone
    compress_sequential(in_memory, batches, CONFIG, progress=False)
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "out")(**batch).logits, in_memory(**batch).logits)


def test_the_cli_streams_a_moe_checkpoint_and_reports_coverage_and_experts(tmp_path, capsys):
    source = _checkpoint(tmp_path / "src", "qwen3_moe")
    argv = ["quantize", "--model", str(source), "--out", str(tmp_path / "out"), "--rank", "4", "--group-size", "16",
            "--adapter-group-size", "4", "--calib-samples", "4", "--seq-len", "32", "--eval-tokens", "0",
            "--tasks", ""]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "compressed 87.35% of the model's weights" in printed  # every decoder weight but the routers
    assert "least-seen experts (calibration tokens): model.layers." in printed
    assert load_pretrained(tmp_path / "out").config._experts_implementation == "eager"
