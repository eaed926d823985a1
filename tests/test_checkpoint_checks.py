"""What is loaded must be what was saved: checkpoint dtypes and integer ranges are checked before loading (and
``eval`` of a directory loads strictly); calibration statistics refuse a model they were not collected on."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

import torchao_eora  # noqa: F401  (extends transformers' torchao quantizer)
from helpers import char_tokenizer, copy_dir, edited_copy, tiny_llama, token_batches
from torchao_eora import Calibration, EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config
from torchao_eora.hf import load_pretrained, save_pretrained

BASE = RTNConfig(bits=3, group_size=32)
Q_PROJ = "model.layers.0.self_attn.q_proj"
CONFIG = EoRAConfig(rank=8, base=BASE)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---- ITEM 9: dtypes and integer ranges of a saved checkpoint -----------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny EoRA model (calibrated, rank 8, int3 base) saved with a tokenizer."""
    model = tiny_llama()
    quantize_(model, eora_config(calibrate(model, token_batches(), CONFIG, progress=False)))
    out = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "eora", CONFIG, tokenizer=char_tokenizer())
    return model, out


@pytest.fixture(scope="module")
def saved_int4_adapters(tmp_path_factory):
    model, config = tiny_llama(), EoRAConfig(rank=8, base=BASE, adapter_bits=4, adapter_group_size=8)
    quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    return model, save_pretrained(model, tmp_path_factory.mktemp("ckpt4") / "eora", config)


def _retype(key: str, dtype: torch.dtype):
    return lambda t: t.__setitem__(key, t[key].to(dtype))


def _put(key: str, index: tuple[int, int], value: int, bits: int):
    """Store ``key`` as an old checkpoint did (one intN value per int8) with one value out of range: every byte of a
    bit-packed tensor is a valid value, so only int8 containers can hold one."""
    from torchao_eora.packing import unpack_intx

    def edit(t):
        t[key] = unpack_intx(t[key], bits)
        t[key][index] = value

    return edit


TAMPERED = {  # name: (edit, pattern the error must match)
    "A as int8": (_retype(f"{Q_PROJ}._weight_A", torch.int8), rf"{Q_PROJ}\._weight_A.*int8.*floating"),
    "qdata out of int3 range": (
        _put(f"{Q_PROJ}._weight_qdata", (1, 2), 5, 3), rf"{Q_PROJ}\._weight_qdata.*outside.*\[-4, 3\]"
    ),
    "qdata int32": (_retype(f"{Q_PROJ}._weight_qdata", torch.int32), rf"{Q_PROJ}\._weight_qdata.*int32.*uint8.*int8"),
    "scale int8": (_retype(f"{Q_PROJ}._weight_scale", torch.int8), rf"{Q_PROJ}\._weight_scale.*floating"),
    "zero_point float": (
        _retype(f"{Q_PROJ}._weight_zero_point", torch.float32), rf"{Q_PROJ}\._weight_zero_point.*float32.*int8"
    ),
    "norm as int8": (_retype("model.norm.weight", torch.int8), r"model\.norm\.weight.*int8.*floating"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_dtype_or_range_is_refused_before_loading(saved, tmp_path, case):
    edit, pattern = TAMPERED[case]
    broken = edited_copy(saved[1], tmp_path / "broken", edit)
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=pattern) as err:
            load(broken)
        assert "re-save" in str(err.value)


ADAPTER_TAMPERED = {
    "A out of int4 range": (_put(f"{Q_PROJ}._weight_A", (0, 0), 8, 4), rf"{Q_PROJ}\._weight_A.*outside.*\[-8, 7\]"),
    "B as float": (_retype(f"{Q_PROJ}._weight_B", torch.float32), rf"{Q_PROJ}\._weight_B.*float32.*int8"),
    "A_zero_point int32": (
        _retype(f"{Q_PROJ}._weight_A_zero_point", torch.int32), rf"{Q_PROJ}\._weight_A_zero_point.*int8"
    ),
    "B_scale int8": (_retype(f"{Q_PROJ}._weight_B_scale", torch.int8), rf"{Q_PROJ}\._weight_B_scale.*floating"),
}


@pytest.mark.parametrize("case", list(ADAPTER_TAMPERED))
def test_tampered_quantized_adapters_are_refused(saved_int4_adapters, tmp_path, case):
    edit, pattern = ADAPTER_TAMPERED[case]
    broken = edited_copy(saved_int4_adapters[1], tmp_path / "broken", edit)
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=pattern):
            load(broken)


def test_untampered_checkpoints_still_load_exactly(saved, saved_int4_adapters):
    batch = token_batches(1, seed=3)[0]
    for model, out in (saved, saved_int4_adapters):
        for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
            assert torch.equal(_logits(load(out), batch), _logits(model, batch))


def _more_layers_in_config(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["plain", "eora"])
def test_cli_eval_refuses_a_config_with_more_layers_than_the_weights(tiny_dir, saved, tmp_path, kind, capsys):
    from torchao_eora import cli

    directory = tiny_dir if kind == "plain" else saved[1]
    argv = ["eval", "--eval-tokens", "0", "--tasks", ""]
    assert cli.main([*argv, "--model", str(directory)]) == 0  # loading alone: no text needed
    broken = copy_dir(directory, tmp_path / "broken")
    _more_layers_in_config(broken)
    # The CLI turns the loader's ValueError into a one-line error and exit status 2.
    with pytest.raises((SystemExit, ValueError)) as err:
        cli.main([*argv, "--model", str(broken)])
    message = str(err.value) if err.type is ValueError else capsys.readouterr().err
    assert err.type is ValueError or err.value.code not in (0, None)
    assert re.search(r"missing tensors: .*model\.layers\.2\.", message), message


def test_load_model_of_a_plain_directory_is_strict_and_loads_it(tiny_dir, tmp_path):
    from torchao_eora.data import load_model

    model, tokenizer = load_model(str(tiny_dir))
    batch = token_batches(1, seed=4)[0]
    assert not model.training and tokenizer.pad_token is not None
    assert torch.equal(_logits(model, batch), _logits(tiny_llama(), batch))
    broken = edited_copy(tiny_dir, tmp_path / "broken", lambda t: t.__setitem__("model.norm.weight", torch.ones(32)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: model\.norm\.weight"):
        load_model(str(broken))
    as_int = edited_copy(tiny_dir, tmp_path / "as_int", _retype("model.norm.weight", torch.int8))
    with pytest.raises(ValueError, match=r"model\.norm\.weight is stored as int8, expected a floating-point type"):
        load_model(str(as_int))  # transformers alone casts it to float: a norm of integers


# ---- ITEM 10: calibration statistics know which model they came from ---------------------------------------------


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """Sequential statistics of tiny_llama(seed=0), saved."""
    path = tmp_path_factory.mktemp("calib") / "stats.safetensors"
    calibrate(tiny_llama(), token_batches(), CONFIG, progress=False).save(path)
    return path


def _converted(model) -> int:
    return sum(isinstance(p, QuantWithLowRank) for p in model.parameters())


def test_statistics_of_other_weights_are_refused(stats_file):
    other = tiny_llama(seed=1)  # same shapes, different weights
    with pytest.raises(ValueError, match=r"different weights.*recalibrate.*check_weights=False"):
        Calibration.load(stats_file, other)
    calib = Calibration.load(stats_file)
    with pytest.raises(ValueError, match="different weights"):
        calib.bind(other)
    # an explicit opt-out is remembered by later binds (compress_model() binds again)
    calib = Calibration.load(stats_file, other, check_weights=False)
    quantize_(other, eora_config(calib.bind(other)))
    assert _converted(other) == 14


def test_statistics_of_a_model_with_fewer_layers_are_refused(stats_file):
    bigger = tiny_llama(layers=3)
    with pytest.raises(ValueError, match=r"num_hidden_layers.*2.*3.*recalibrate"):
        Calibration.load(stats_file, bigger)
    with pytest.raises(ValueError, match="num_hidden_layers"):  # shapes are never waived
        Calibration.load(stats_file, bigger, check_weights=False)
    assert _converted(bigger) == 0


def test_statistics_of_other_shapes_are_refused(stats_file):
    with pytest.raises(ValueError, match=r"hidden_size.*recalibrate"):
        Calibration.load(stats_file, tiny_llama(hidden=96))


def test_same_model_reloads_and_quantizes_like_the_original(stats_file):
    batch = token_batches(1, seed=5)[0]
    a, b = tiny_llama(), tiny_llama()
    quantize_(a, eora_config(calibrate(a, token_batches(), CONFIG, progress=False)))
    quantize_(b, eora_config(Calibration.load(stats_file, b)))
    assert _converted(b) == 14
    assert torch.equal(_logits(a, batch), _logits(b, batch))


def test_fingerprint_is_the_uncompressed_model_and_survives_save(tmp_path):
    model = tiny_llama()
    calib = calibrate(model, token_batches(), CONFIG, progress=False)
    fp = calib.fingerprint
    assert fp["architecture"] == "LlamaForCausalLM" and fp["num_hidden_layers"] == 2 and fp["hidden_size"] == 64
    assert fp["linears"][Q_PROJ] == [64, 64] and len(fp["linears"]) == 15  # 14 decoder linears + lm_head
    expected = model.get_submodule(Q_PROJ).weight.detach().reshape(-1)[0].item()
    assert fp["weights"][Q_PROJ][0] == pytest.approx(expected)
    calib.save(tmp_path / "s.safetensors")
    assert Calibration.load(tmp_path / "s.safetensors").fingerprint == fp
    one_shot = calibrate(model, token_batches(), mode="one-shot", progress=False)
    assert one_shot.fingerprint == fp


def test_binding_a_partly_or_fully_compressed_model_does_not_fail(stats_file):
    """compress_model() binds, then quantizes layer by layer; a bind after (part of) the compression must not be mistaken
    for other weights (the sampled weights of compressed layers are skipped)."""
    from torchao_eora.pipeline import compress_model

    model = tiny_llama()
    calib = Calibration.load(stats_file, model)
    quantize_(model.model.layers[0], eora_config(calib))
    quantize_(model.model.layers[1], eora_config(calib.bind(model)))  # bound with layer 0 compressed
    assert _converted(model) == 14
    calib.bind(model)  # fully compressed
    fresh = tiny_llama()
    compress_model(fresh, None, CONFIG, calibration=Calibration.load(stats_file, fresh), progress=False)
    assert _converted(fresh) == 14


def test_the_normal_flow_still_works(tmp_path):
    model = tiny_llama()
    calib = calibrate(model, token_batches(), CONFIG, progress=False)
    quantize_(model, eora_config(calib))
    assert _converted(model) == 14


def test_files_without_a_fingerprint_load_with_a_warning(stats_file, tmp_path, caplog):
    with safe_open(str(stats_file), framework="pt") as f:
        meta = json.loads(f.metadata()["torchao_eora.calibration"])
    meta.pop("fingerprint")
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(stats_file)), str(old), metadata={"torchao_eora.calibration": json.dumps(meta)})
    model = tiny_llama(layers=2)
    with caplog.at_level(logging.WARNING, logger="torchao_eora"):
        calib = Calibration.load(old, model)
    assert "no model fingerprint" in caplog.text
    quantize_(model, eora_config(calib))
    assert _converted(model) == 14
