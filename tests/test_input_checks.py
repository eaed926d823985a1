"""Bad input ends in one line that names the file or tensor and says what to do, before anything is written: the
streaming path (`quantize --model DIR --out OUT`) checks a checkpoint as strictly as ``load_pretrained``, and
calibration files, GGUF paths, unsupported models and read-only outputs are refused the same way."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

import torchao_eora  # noqa: F401  (extends transformers' torchao quantizer)
from helpers import char_tokenizer, copy_dir, tiny_llama, token_batches
from test_cli_errors import _fails_in_one_line, _quantize
from torchao_eora import Calibration, EoRAConfig, RTNConfig, calibrate, cli, eora_config
from torchao_eora.hf import load_pretrained, save_pretrained

BASE = RTNConfig(bits=3, group_size=32)
INDEX = "model.safetensors.index.json"
DOWN = "model.layers.0.mlp.down_proj.weight"


# ---- the streaming path: a sharded float checkpoint, edited ---------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny untied Llama in several safetensors shards with an index, and a tokenizer (copy it to edit it)."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="60KB")
    char_tokenizer().save_pretrained(path)
    return path


def _shard_of(directory: Path, key: str) -> Path:
    return directory / json.loads((directory / INDEX).read_text())["weight_map"][key]


def _edit_tensor(key: str, change):
    """An edit: ``key``'s tensor in its shard becomes ``change(tensor)`` (metadata kept)."""

    def edit(directory: Path) -> None:
        shard = _shard_of(directory, key)
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(shard))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(shard), metadata=metadata)

    return edit


def _extra_tensor(directory: Path) -> None:
    shard = _shard_of(directory, DOWN)
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard.name
    (directory / INDEX).write_text(json.dumps(index))


def _config_hidden_size(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = 32
    (directory / "config.json").write_text(json.dumps(config))


def _write(name: str, data: bytes | None = None, cut: int | None = None):
    """An edit: file ``name`` (or the shard holding DOWN) gets ``data``, or is cut to its first ``cut`` bytes."""

    def edit(directory: Path) -> None:
        path = directory / name if name else _shard_of(directory, DOWN)
        path.write_bytes(data if data is not None else path.read_bytes()[:cut])

    return edit


STREAMING = {  # edit: fragments the one-line error must hold
    "decoder weight int8": (_edit_tensor(DOWN, lambda t: t.to(torch.int8)), [DOWN, "stored as int8", "floating"]),
    "lm_head int8": (_edit_tensor("lm_head.weight", lambda t: t.to(torch.int8)), ["lm_head.weight", "int8"]),
    "lm_head 511x64": (_edit_tensor("lm_head.weight", lambda t: t[:127]), ["lm_head.weight", "(127, 64)",
                                                                          "(128, 64)", "config.json"]),
    "weight of the wrong shape": (_edit_tensor(DOWN, lambda t: t[:, :127].contiguous()), [DOWN, "(64, 127)", "(64, 128)"]),
    "config.json hidden size": (_config_hidden_size, ["model.embed_tokens.weight", "(128, 64)", "(128, 32)",
                                                      "config.json"]),
    "extra tensor": (_extra_tensor, ["model.layers.0.mlp.extra.weight", "not a tensor of LlamaForCausalLM"]),
    "index not JSON": (_write(INDEX, b"{not json"), [INDEX, "not valid JSON"]),
    "index without weight_map": (_write(INDEX, b'{"metadata": {}}'), [INDEX, "weight_map"]),
    "index names a missing shard": (_write(INDEX, json.dumps({"weight_map": {DOWN: "gone.safetensors"}}).encode()),
                                    ["gone.safetensors"]),
    "truncated shard": (_write("", cut=4000), ["safetensors", "truncated or damaged"]),
    "empty shard": (_write("", data=b""), ["safetensors", "truncated or damaged"]),
}


@pytest.mark.parametrize("case", list(STREAMING))
def test_streaming_refuses_a_bad_checkpoint_before_writing(sharded, tmp_path, capsys, case):
    edit, fragments = STREAMING[case]
    source = copy_dir(sharded, tmp_path / "src")
    edit(source)
    _fails_in_one_line(_quantize(source, "--out", str(tmp_path / "out")), capsys, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no hidden temporary


def test_the_loader_and_the_streaming_path_say_the_same(sharded, tmp_path, capsys):
    source = copy_dir(sharded, tmp_path / "src")
    _edit_tensor(DOWN, lambda t: t.to(torch.int8))(source)
    with pytest.raises(ValueError) as err:
        load_pretrained(source)
    line = _fails_in_one_line(_quantize(source, "--out", str(tmp_path / "out")), capsys)
    assert line.endswith(str(err.value))


def test_a_full_disk_is_one_line_and_loses_nothing(sharded, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from torchao_eora import io_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(io_utils, "save_file", full)
    _fails_in_one_line(_quantize(sharded, "--out", str(tmp_path / "out")), capsys, "No space left on device",
                       "model-00001-of-")
    assert list(tmp_path.iterdir()) == []


def test_an_untouched_sharded_checkpoint_still_streams(sharded, tmp_path):
    assert cli.main(_quantize(sharded, "--out", str(tmp_path / "out"))) == 0
    load_pretrained(tmp_path / "out")


# ---- calibration statistics meet a model in quantize_ ---------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Statistics of tiny_llama(seed 0), calibrated sequentially, and the file they were saved to."""
    model = tiny_llama()
    calib = calibrate(model, token_batches(), EoRAConfig(rank=4, base=BASE), progress=False)
    path = tmp_path_factory.mktemp("calib") / "stats.safetensors"
    calib.save(path)
    return calib, path


def test_loaded_statistics_are_checked_when_quantize_meets_the_model(calibrated):
    other = tiny_llama(seed=1)
    before = other.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match=r"collected on different weights .*check_weights=False"):
        quantize_(other, eora_config(Calibration.load(calibrated[1])))
    assert torch.equal(other.model.layers[0].self_attn.q_proj.weight, before)  # nothing converted
    quantize_(tiny_llama(), eora_config(Calibration.load(calibrated[1])))  # the calibrated model: converts


def test_another_models_compressed_weights_are_never_installed():
    calib = calibrate(tiny_llama(), token_batches(), EoRAConfig(rank=4, base=BASE), progress=False)
    other = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="collected on different weights"):
        quantize_(other, eora_config(calib))
    # Weights that differ on purpose (a fine-tune): compressed from its own weights with the statistics, never
    # replaced by the calibrated model's compressed copies
    calib.bind(other, check_weights=False)
    quantize_(other, eora_config(calib))
    own = tiny_llama(seed=1).model.layers[1].mlp.down_proj.weight
    error = (other.model.layers[1].mlp.down_proj.weight.dequantize() - own).abs().max()
    assert error < 0.5 * own.abs().max()


@pytest.mark.parametrize("field, value, fragment", [
    ("n_tokens", "many", "n_tokens"),
    ("group_of", ["x"], "group_of"),
    ("mode", "weekly", "mode"),
])
def test_a_calibration_file_with_a_wrong_type_is_refused_at_load(calibrated, tmp_path, field, value, fragment):
    path = calibrated[1]
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["torchao_eora.calibration"])
    if field == "n_tokens":
        meta[field] = {k: value for k in meta[field]}
    else:
        meta[field] = value
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(str(path)), str(crafted), metadata={"torchao_eora.calibration": json.dumps(meta)})
    with pytest.raises(ValueError, match=rf"crafted\.safetensors.*{fragment}"):
        Calibration.load(crafted)


# ---- per-tensor torchao metadata of a saved checkpoint --------------------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, config = tiny_llama(), EoRAConfig(rank=4, base=BASE, compensation="svd")
    quantize_(model, config)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "eora", config)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(_type="Int4Tensor"),
    lambda m: m["_data"].update(dtype={"_type": "torch.dtype", "_data": "float99"}),
    lambda m: m["_data"].update(target_dtype="int3"),
], ids=["another class", "unknown dtype", "dtype as a string"])
def test_edited_tensor_metadata_is_named(saved, tmp_path, edit):
    from transformers import AutoModelForCausalLM

    broken = copy_dir(saved, tmp_path / "broken")
    weights = str(broken / "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata[Q_PROJ])
    edit(meta)
    metadata[Q_PROJ] = json.dumps(meta)
    save_file(load_file(weights), weights, metadata=metadata)
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"{Q_PROJ}.*re-save"):
            load(broken)


# ---- GGUF paths ----------------------------------------------------------------------------------------------


def _real_gguf_head(path: Path, size: int) -> bytes:
    """The first bytes of a real GGUF (the header, and part of its key table): a download cut short."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list([f"t{i}" for i in range(2000)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()[:size]


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00"), "truncated or damaged"),
    (lambda p: p.write_bytes(_real_gguf_head(p.with_name("full.gguf"), 4096)), "truncated or damaged"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(64)), "not a GGUF file"),
    (lambda p: p.mkdir(), "is a directory"),
], ids=["empty", "truncated header", "cut in the key table", "not gguf", "directory"])
def test_a_bad_gguf_path_is_named(tmp_path, capsys, make, fragment):
    path = tmp_path / "model.gguf"
    make(path)
    line = _fails_in_one_line(["eval", "--model", str(path), "--tasks", "", "--eval-tokens", "0"], capsys, fragment)
    assert str(path) in line and "huggingface.co" not in line


# ---- a model with no nn.Linear to convert (GPT-2's Conv1D) ----------------------------------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).eval()


def test_data_free_quantize_names_conv1d_instead_of_converting_nothing():
    with pytest.raises(ValueError, match=r"no supported linear layers found .*transformer\.h; found Conv1D"):
        quantize_(_gpt2(), EoRAConfig(rank=4, base=BASE, compensation="svd"))


def test_quantize_on_load_names_conv1d_instead_of_converting_nothing(tmp_path):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    _gpt2().save_pretrained(tmp_path / "gpt2")
    config = TorchAoConfig(EoRAConfig(rank=4, base=BASE, compensation="svd"))
    with pytest.raises(ValueError, match=r"no supported linear layers found .*found Conv1D"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=config)


# ---- a read-only output directory ----------------------------------------------------------------------------


def test_a_read_only_output_is_refused_before_anything_is_written(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_quantize(tiny_dir, "--out", str(out))) == 0
    os.chmod(out, stat.S_IRUSR | stat.S_IXUSR)
    try:
        for argv in (_quantize(tiny_dir, "--out", str(out)), _quantize(tiny_dir, "--out", str(out), "--rank", "8")):
            _fails_in_one_line(argv, capsys, str(out), "read-only", "chmod")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden copy left behind
    finally:
        os.chmod(out, 0o755)


# ---- tensor-parallel slices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_bits", [None, 4])
def test_row_and_column_slices_are_both_independent_copies(adapter_bits):
    model = tiny_llama()
    config = EoRAConfig(rank=8, base=BASE, compensation="svd", adapter_bits=adapter_bits, adapter_group_size=8)
    quantize_(model, config)
    q = model.model.layers[0].self_attn.q_proj.weight
    for piece in (q[16:48], torch.ops.aten.slice.Tensor(q, 1, 32, 64)):
        for name in q.fields:
            inner, whole = getattr(piece, name), getattr(q, name)
            if inner is not None:
                assert inner.is_contiguous()
                assert inner.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr(), name
