"""Never a silent partial job: a large weight holder the pass cannot compress is an error naming it, and every
run reports the share of the model's weights it compressed."""

from __future__ import annotations

import pytest

from helpers import tiny_causal_lm, tiny_llama, token_batches
from torchao_eora import EoRAConfig, RTNConfig, compress_sequential

CONFIG = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), adapter_bits=None)


def test_a_dense_model_is_compressed_whole_and_says_so():
    model = tiny_llama()
    calib = compress_sequential(model, token_batches(1), CONFIG, progress=False)
    decoder = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    assert calib.coverage.compressed == decoder and not calib.coverage.left_alone
    assert "compressed" in calib.coverage.describe() and 0 < calib.coverage.share < 1


def test_an_unknown_expert_layout_fails_loudly_naming_it():
    """A Qwen3-MoE whose experts say they are stored transposed (as gpt-oss's are): the pass would compress only
    the attention projections, a few percent of the weights; it refuses, naming the experts."""
    model = tiny_causal_lm("qwen3_moe")
    model.set_experts_implementation("eager")  # ignores the flag below: the model still runs
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts .*allow_partial"):
        compress_sequential(model, token_batches(1), CONFIG, progress=False)
    calib = compress_sequential(model, token_batches(1), CONFIG, progress=False, allow_partial=True)
    assert calib.coverage.share < 0.2 and "model.layers.1.mlp.experts" in calib.coverage.left_alone
