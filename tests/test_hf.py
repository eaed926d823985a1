"""transformers round trip: save_pretrained -> from_pretrained (bit-identical, eager and compiled), quantize on load,
strict loading with named errors, atomic saves, and the CLI writing a directory from_pretrained loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM, TorchAoConfig

import torchao_eora
from helpers import edited_copy, tiny_llama, token_batches
from torchao_eora import (
    Calibration, EoRAConfig, PruneConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config, merge_low_rank,
)
from torchao_eora.hf import load_pretrained, recorded_config, save_pretrained
from torchao_eora.io_utils import atomic_directory

BASE = RTNConfig(bits=3, group_size=32)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _decoder_linears(module, name: str) -> bool:
    """What the CLI and quantize-on-load convert: the linears inside the decoder blocks, not lm_head."""
    return isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny EoRA model (calibrated, rank 8) and the directory it was saved to."""
    model, config = tiny_llama(), EoRAConfig(rank=8, base=BASE)
    quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    out = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "eora", config)
    return model, out


def _low_rank_weights(model) -> dict[str, QuantWithLowRank]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, QuantWithLowRank)}


def test_config_json_wraps_eora_config_without_statistics(saved):
    _, out = saved
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "torchao"
    default = quant["quant_type"]["default"]
    assert default["_type"] == "EoRAConfig" and default["_data"]["rank"] == 8
    assert default["_data"]["calibration"] is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.slow  # compiles two whole models
def test_from_pretrained_is_bit_identical_eager_and_compiled(saved):
    model, out = saved
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original, loaded = _low_rank_weights(model), _low_rank_weights(reloaded)
    assert set(loaded) == set(original) and len(loaded) == 14  # 7 linears x 2 layers; lm_head stays dense
    for name, w in original.items():
        for field in ("qdata", "A", "B", "scale", "zero_point"):
            assert torch.equal(getattr(loaded[name], field), getattr(w, field)), (name, field)
        assert (loaded[name].target_dtype, loaded[name].group_size) == (w.target_dtype, w.group_size)
    batch = token_batches(1, seed=3)[0]
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
    compiled_original = _logits(torch.compile(model, fullgraph=True), batch)
    compiled_reloaded = _logits(torch.compile(reloaded, fullgraph=True), batch)
    assert torch.equal(compiled_reloaded, compiled_original)
    torch.testing.assert_close(compiled_reloaded, _logits(reloaded, batch), rtol=1e-4, atol=1e-4)


def test_reloaded_model_saves_again_with_plain_save_pretrained(saved, tmp_path):
    model, out = saved
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded.save_pretrained(tmp_path / "again")  # the quantizer came with from_pretrained: nothing to attach
    twice = load_pretrained(tmp_path / "again")
    batch = token_batches(1, seed=4)[0]
    assert torch.equal(_logits(twice, batch), _logits(model, batch))


def test_load_pretrained_is_strict_and_eval(saved):
    model, out = saved
    reloaded = load_pretrained(out)
    assert not reloaded.training
    batch = token_batches(1, seed=5)[0]
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


@pytest.mark.parametrize("base", [
    PruneConfig("magnitude", pattern="2:4"),  # a dense pruned base: no scale or zero point in the checkpoint
    PruneConfig("magnitude", pattern="2:4", quantizer=RTNConfig(3, 32)),
], ids=["pruned", "pruned+int3"])
def test_round_trip_other_bases(tmp_path, base):
    model = tiny_llama()
    config = EoRAConfig(rank=4, base=base, compensation="svd")
    quantize_(model, config, filter_fn=_decoder_linears)
    reloaded = load_pretrained(save_pretrained(model, tmp_path / "ckpt", config))
    assert reloaded.config.quantization_config.quant_type.base == base
    batch = token_batches(1, seed=2)[0]
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


def test_tied_embeddings_round_trip(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: the checkpoint holds one of the two and still reloads exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )).eval()
    config = EoRAConfig(rank=4, base=BASE, compensation="svd")
    quantize_(model, config, filter_fn=_decoder_linears)
    out = save_pretrained(model, tmp_path / "tied", config)
    batch = token_batches(1, seed=10)[0]
    for reloaded in (load_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


def test_merge_low_rank_gives_an_ordinary_model(saved, tmp_path):
    model, out = saved
    merged = merge_low_rank(AutoModelForCausalLM.from_pretrained(out))
    assert not any(isinstance(p, QuantWithLowRank) for p in merged.parameters())
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight) is torch.nn.Parameter and "QuantWithLowRank" not in repr(q_proj)
    assert torch.equal(q_proj.weight, model.model.layers[0].self_attn.q_proj.weight.dequantize())
    batch = token_batches(1, seed=9)[0]
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "plain")  # quantization markers are gone: a plain checkpoint
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert torch.equal(_logits(load_pretrained(tmp_path / "plain"), batch), _logits(merged, batch))


# ---- quantize on load ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


def test_quantize_on_load_data_free_matches_quantize_and_logs_once(fp_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="torchao_eora"):
        loaded = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=TorchAoConfig(EoRAConfig(rank=4, base=BASE))
        )
    assert caplog.text.count("falling back to data-free SVD") == 1
    reference = tiny_llama()
    quantize_(reference, EoRAConfig(rank=4, base=BASE, compensation="svd"), filter_fn=_decoder_linears)
    assert set(_low_rank_weights(loaded)) == set(_low_rank_weights(reference))
    assert not isinstance(loaded.lm_head.weight, QuantWithLowRank)
    batch = token_batches(1, seed=6)[0]
    assert torch.equal(_logits(loaded, batch), _logits(reference, batch))


def test_saved_statistics_go_through_quantize_after_loading(fp_dir, tmp_path):
    """The documented way to use statistics with a Hugging Face directory: load, bind, quantize_, save."""
    model, batches = tiny_llama(), token_batches()
    config = EoRAConfig(rank=4, base=BASE)
    calib = calibrate(model, batches, config, progress=False)
    calib.save(tmp_path / "stats.safetensors")
    quantize_(model, eora_config(calib))

    loaded = AutoModelForCausalLM.from_pretrained(fp_dir)
    quantize_(loaded, eora_config(Calibration.load(tmp_path / "stats.safetensors", loaded)))
    batch = token_batches(1, seed=7)[0]
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    save_pretrained(loaded, tmp_path / "saved", config)
    assert torch.equal(_logits(load_pretrained(tmp_path / "saved"), batch), _logits(model, batch))


def test_quantize_on_load_refuses_statistics_with_the_way_to_use_them(fp_dir):
    stats = Calibration({}, {Q_PROJ: Q_PROJ}, "one-shot")
    with pytest.raises(ValueError, match=r"load the unquantized model, then quantize_"):
        AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=TorchAoConfig(EoRAConfig(rank=4, base=BASE, calibration=stats))
        )


# ---- failures name the tensor ----------------------------------------------------------------------------------


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


CORRUPTIONS = {  # name: (edit, the tensor the error must name)
    "missing A": (_drop(f"{Q_PROJ}._weight_A"), f"{Q_PROJ}._weight_A"),
    "stray field": (_set(f"{Q_PROJ}._weight_C", torch.zeros(3)), f"{Q_PROJ}._weight_C"),
    "mis-shaped B": (_set(f"{Q_PROJ}._weight_B", torch.zeros(64, 5)), f"{Q_PROJ}._weight_B"),
    "mis-shaped qdata": (
        _set(f"{Q_PROJ}._weight_qdata", torch.zeros(64, 32, dtype=torch.int8)), f"{Q_PROJ}._weight_qdata"
    ),
    "missing norm": (_drop("model.norm.weight"), "model.norm.weight"),
    "extra tensor": (_set("model.layers.0.extra", torch.zeros(2)), "model.layers.0.extra"),
    "mis-shaped norm": (_set("model.norm.weight", torch.zeros(32)), "model.norm.weight"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_fails_naming_the_tensor(saved, tmp_path, case):
    edit, tensor = CORRUPTIONS[case]
    broken = edited_copy(saved[1], tmp_path / "broken", edit)
    # Checked before anything is loaded, by plain from_pretrained too (transformers alone would warn, re-initialise,
    # or, in 5.17, load a mis-shaped tensor as it is).
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
            load(broken)


def test_load_pretrained_is_strict_for_plain_checkpoints_too(fp_dir, tmp_path):
    def edit(tensors):
        tensors.pop("model.norm.weight")
        tensors["model.layers.0.extra"] = torch.zeros(2)

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in fp_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(broken)  # transformers only warns
    expected = r"missing tensors: model\.norm\.weight; unexpected tensors: model\.layers\.0\.extra"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(broken)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors only"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        load_pretrained(tmp_path / "nowhere")


# ---- atomic saves ----------------------------------------------------------------------------------------------


class _FailingTokenizer:
    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{half")
        raise OSError("disk full")


def test_failed_save_leaves_nothing(saved, tmp_path):
    model, _ = saved
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "out", recorded_config(model), tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_directory(saved, tmp_path):
    model, _ = saved
    out = save_pretrained(model, tmp_path / "out", recorded_config(model))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, out, recorded_config(model), tokenizer=_FailingTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    save_pretrained(model, out)  # a successful save replaces it; config now comes from model.config
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_has_the_usual_permissions(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_directory(tmp_path / "atomic") as tmp:
        (tmp / "file").write_text("x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_atomic_directory_failure_inside_block(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "x") as tmp:
            (tmp / "partial").write_text("...")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_quantize_writes_a_directory_from_pretrained_loads(tiny_dir, tmp_path, monkeypatch):
    from torchao_eora import cli, pipeline

    out = tmp_path / "out"
    code = cli.main([
        "quantize", "--model", str(tiny_dir), "--compensation", "svd", "--eval-tokens", "0",
        "--rank", "4", "--group-size", "32", "--out", str(out),
    ])
    assert code == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    reference = tiny_llama()
    # the CLI's defaults: 4-bit adapters, grouped by the largest power of two up to 32 that divides the rank
    quantize_(reference, EoRAConfig(rank=4, base=RTNConfig(3, 32), compensation="svd", adapter_bits=4,
                                    adapter_group_size=4), filter_fn=_decoder_linears)
    batch = token_batches(1, seed=8)[0]
    assert torch.equal(_logits(loaded, batch), _logits(reference, batch))
    assert (out / "tokenizer.json").exists()

    # `eval` loads the saved directory too (held-out text replaced by a short string: no data package needed).
    monkeypatch.setattr(pipeline, "wikipedia_split", lambda: ([], ["the quick brown fox " * 20]))
    assert cli.main(["eval", "--model", str(out), "--eval-tokens", "200", "--seq-len", "32", "--tasks", ""]) == 0


def test_extension_is_installed_once():
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    assert TorchAoHfQuantizer._torchao_eora_extended
    assert torchao_eora.hf_patches.extend_transformers_torchao()  # idempotent
    quantizer = TorchAoHfQuantizer(TorchAoConfig(EoRAConfig(rank=4, base=BASE)), pre_quantized=True)
    quantizer.metadata = {}
    if hasattr(type(quantizer), "serialized_names"):
        names = quantizer.serialized_names["weight"]
    else:  # transformers 5.17
        names = quantizer.get_weight_conversions()[0]._original_source_patterns
    assert names.count("_weight_A") == 1 and names.count("_weight_B") == 1 and "_weight_qdata" in names
