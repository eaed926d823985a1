"""Streaming compression of a sharded checkpoint: the same model as the in-memory pass, loadable as usual."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import char_tokenizer, token_batches
from torchao_eora import EoRAConfig, GPTQConfig, RTNConfig, compress_sequential, load_pretrained
from torchao_eora.streaming import quantize_checkpoint
from torchao_eora.timing import Timer


def _sharded_model(path, tie: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="60KB")  # several shards and an index
    char_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.mark.parametrize("option", [{}, {"target": "anchored"}, {"output_weighting": "gradient"}],
                         ids=["layer", "anchored", "gradient"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(
    "base",  # GPTQ streams the same way, slower: only in the full run
    [RTNConfig(bits=3, group_size=32), pytest.param(GPTQConfig(bits=3, group_size=32), marks=pytest.mark.slow)],
)
def test_streamed_checkpoint_equals_the_in_memory_pass(tmp_path, tie, base, option):
    source = _sharded_model(tmp_path / "src", tie)
    config = EoRAConfig(rank=4, base=base, adapter_bits=4, adapter_group_size=4, **option)
    batches = token_batches(2, 4, 16, seed=2, pad_first=3)
    timer = Timer()
    calib = quantize_checkpoint(source, tmp_path / "out", config, batches, device="cpu", timer=timer, progress=False)
    assert {"forward", "moments", "compress", "solve", "io"} <= set(timer.seconds)
    assert calib.bytes_written > 0 and calib.groups == {}  # statistics dropped layer by layer by default

    in_memory = load_pretrained(source)
    compress_sequential(in_memory, batches, config, progress=False)
    batch = token_batches(1, seed=9)[0]
    # the output gradients are summed in another order when streamed: the adapters agree to rounding only
    same = torch.equal if not option.get("output_weighting") else partial(torch.allclose, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        expected = in_memory(**batch).logits
        assert same(load_pretrained(tmp_path / "out")(**batch).logits, expected)
        assert same(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(**batch).logits, expected)
    assert not any(p.name.endswith(".gradients") for p in tmp_path.iterdir())  # the spilled inputs are gone
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "tokenizer.json" in written and "model.safetensors.index.json" in written
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quant["quant_type"]["default"]["_type"] == "EoRAConfig"


def test_output_weighting_without_the_disk_for_its_scratch_is_refused_before_anything_is_written(tmp_path,
                                                                                                   monkeypatch):
    from collections import namedtuple

    import torchao_eora.layerwise_gradients as lg

    source = _sharded_model(tmp_path / "src", tie=False)
    monkeypatch.setattr(lg.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(0, 0, 1024))
    config = EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=32), output_weighting="gradient")
    with pytest.raises(ValueError, match="GiB of disk"):
        quantize_checkpoint(source, tmp_path / "out", config, token_batches(2, 4, 16), device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial job, no scratch


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    source = _sharded_model(tmp_path / "src", tie=False)
    cfg = json.loads((source / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (source / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no tensors for"):
        quantize_checkpoint(source, tmp_path / "out", EoRAConfig(rank=4, base=RTNConfig(3, 32)),
                            token_batches(1), progress=False)
    assert not (tmp_path / "out").exists()
