"""The sequential pass compresses and solves every module exactly once, in place or for quantize_ to install."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torchao.quantization import quantize_

import torchao_eora.transform as transform
from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, GPTQConfig, RTNConfig, calibrate, compress_sequential, eora_config
from torchao_eora.timing import Timer


@dataclass
class CountingCompressor:
    """A compressor that records which weight (by its first values) it was asked to compress."""

    inner: object
    calls: Counter

    @property
    def needs_calibration(self) -> bool:
        return self.inner.needs_calibration

    def describe(self) -> str:
        return self.inner.describe()

    def compress(self, weight, second_moment=None):
        self.calls[tuple(weight[0, :6].tolist())] += 1
        return self.inner.compress(weight, second_moment)


def _names_by_key(model) -> dict[tuple, str]:
    return {tuple(m.weight[0, :6].float().tolist()): n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


@pytest.fixture
def counted(monkeypatch):
    solves = Counter()
    solve = transform._solve

    def counting_solve(delta, config, rank, *args):
        solves[tuple(delta.shape)] += 1
        return solve(delta, config, rank, *args)

    monkeypatch.setattr(transform, "_solve", counting_solve)
    return solves


@pytest.mark.parametrize("base", [RTNConfig(bits=3, group_size=32), GPTQConfig(bits=3, group_size=32)])
@pytest.mark.parametrize("flow", ["in place", "calibrate + quantize_"])
def test_every_module_is_compressed_and_solved_exactly_once(counted, base, flow):
    model = tiny_llama()
    names = _names_by_key(model)
    calls = Counter()
    config = EoRAConfig(rank=4, base=CountingCompressor(base, calls))
    if flow == "in place":
        compress_sequential(model, token_batches(), config, progress=False)
    else:
        quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    # once each; a calibrated compressor twice more, on each half, to cross-validate shrinkage="auto" leak-free,
    # except for v_proj, whose residual is then weighted by the attention moment (not split: nothing to validate)
    cross_validated = {name: base.needs_calibration and not name.endswith("v_proj") for name in names.values()}
    assert {names[k]: n for k, n in calls.items()} == {name: 3 if cv else 1 for name, cv in cross_validated.items()}
    assert sum(counted.values()) == len(names) == 14  # one solve per module


def test_the_two_flows_give_the_same_model_and_calibrate_leaves_the_model_alone():
    config = EoRAConfig(rank=4, base=GPTQConfig(bits=3, group_size=32))
    a, b = tiny_llama(), tiny_llama()
    before = {n: p.clone() for n, p in b.named_parameters()}
    calib = calibrate(b, token_batches(), config, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in b.named_parameters())  # statistics only, until quantize_
    quantize_(b, eora_config(calib))
    compress_sequential(a, token_batches(), config, progress=False)
    batch = token_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)


def test_quantize_with_another_config_recompresses_from_the_statistics():
    model = tiny_llama()
    calib = calibrate(model, token_batches(), EoRAConfig(rank=4, base=RTNConfig(3, 32)), progress=False)
    quantize_(model, eora_config(calib, rank=8))  # not what calibration compressed: solved again from statistics
    assert model.model.layers[1].mlp.down_proj.weight.rank == 8


def test_the_timer_splits_forward_moments_compress_shrinkage_and_solve():
    timer = Timer()
    compress_sequential(tiny_llama(), token_batches(), EoRAConfig(rank=4, base=RTNConfig(3, 32)), progress=False,
                        timer=timer)
    assert set(timer.seconds) == {"forward", "moments", "compress", "shrinkage", "solve"}
    assert all(v > 0 for v in timer.seconds.values())


def test_statistics_can_be_dropped_per_layer():
    calib = compress_sequential(tiny_llama(), token_batches(), EoRAConfig(rank=4, base=RTNConfig(3, 32)),
                                keep_statistics=False, progress=False)
    assert calib.groups == {} and len(calib.group_of) == 14


def test_a_model_offloaded_by_accelerate_to_cpu_and_disk_compresses_like_one_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama(layers=3).save_pretrained(tmp_path / "src")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "src", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    config = EoRAConfig(rank=4, base=GPTQConfig(bits=3, group_size=32))
    for model in (offloaded, in_memory):
        compress_sequential(model, token_batches(), config, progress=False)
    batch = token_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(offloaded(**batch).logits, in_memory(**batch).logits)
    assert offloaded.model.layers[2].mlp.down_proj.weight.rank == 4
