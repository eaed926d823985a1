"""Loading never runs code: crafted configs and pickles are refused on every load path, and nothing is touched.

The payloads are the ones that worked before the fix: with the whole package allowed in torchao's
``config_from_dict``, a ``config.json`` could call ``export_peft(load_pretrained(victim), victim)`` (which empties
the victim directory) or ``load_pretrained(dir, trust_remote_code=True)`` (which imports Python from ``dir``).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from safetensors.torch import save_file
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

import torchao_eora  # noqa: F401  (extends transformers' torchao quantizer)
from helpers import char_tokenizer, copy_dir, tiny_llama, token_batches
from torchao_eora import Calibration, EoRAConfig, RTNConfig, calibrate, eora_config, import_peft, load_pretrained
from torchao_eora.config import config_from_json
from torchao_eora.hf import save_pretrained

BASE = RTNConfig(bits=3, group_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, config = tiny_llama(), EoRAConfig(rank=4, base=BASE)
    calib = calibrate(model, token_batches(), config, progress=False)
    stats = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    calib.save(stats)
    quantize_(model, eora_config(calib))
    out = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "eora", config, tokenizer=char_tokenizer())
    return out, stats


@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory the payloads try to empty."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "train.py").write_text("print('my work')\n")
    return d


def _evil_remote_code_dir(root: Path, marker: Path) -> Path:
    """A model directory whose custom code, if ever imported, writes ``marker``."""
    d = root / "remote"
    d.mkdir()
    tiny_llama().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return d


def _payloads(victim: Path, remote: Path) -> dict[str, dict]:
    delete = {"_type": "export_peft", "_data": {
        "model": {"_type": "load_pretrained", "_data": {"path": str(victim.parent / "eora")}},
        "out_dir": str(victim),
    }}
    remote_code = {"_type": "load_pretrained", "_data": {"path": str(remote), "trust_remote_code": True}}
    nested = {"_type": "EoRAConfig", "_data": {"rank": 4, "base": remote_code}}
    return {"delete": delete, "remote_code": remote_code, "nested": nested}


def _crafted_checkpoint(saved_dir: Path, dst: Path, payload: dict) -> Path:
    copy_dir(saved_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["quant_type"] = {"default": payload}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _intact(victim: Path, marker: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["train.py"]
    assert not marker.exists(), "code from a model directory was executed"


@pytest.mark.parametrize("case", ["delete", "remote_code", "nested"])
def test_crafted_config_json_is_refused_by_every_loader(saved, tmp_path, victim, case):
    from torchao_eora import cli

    saved_dir, _ = saved
    copy_dir(saved_dir, victim.parent / "eora")  # what the payload's load_pretrained would read: a real checkpoint
    marker = tmp_path / "marker"
    payload = _payloads(victim, _evil_remote_code_dir(tmp_path, marker))[case]
    crafted = _crafted_checkpoint(saved_dir, tmp_path / "crafted", payload)

    with pytest.raises(ValueError, match="refusing to build|allowed modules"):
        AutoModelForCausalLM.from_pretrained(crafted)
    _intact(victim, marker)
    with pytest.raises(ValueError, match="refusing to build|allowed modules"):
        load_pretrained(crafted)
    _intact(victim, marker)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(crafted), "--eval-tokens", "0", "--tasks", ""])
    assert exit_info.value.code == 2
    _intact(victim, marker)
    # torchao's own config_from_dict (what any other tool calls) cannot reach the package's functions either.
    with pytest.raises(ValueError):
        config_from_dict(payload)
    _intact(victim, marker)


def test_crafted_calibration_metadata_is_refused(saved, tmp_path, victim):
    _, stats = saved
    marker = tmp_path / "marker"
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(stats), framework="pt") as f:
        meta = json.loads(f.metadata()["torchao_eora.calibration"])
    for name, payload in _payloads(victim, _evil_remote_code_dir(tmp_path, marker)).items():
        meta["config"] = payload
        crafted = tmp_path / f"{name}.safetensors"
        save_file(load_file(str(stats)), str(crafted), metadata={"torchao_eora.calibration": json.dumps(meta)})
        with pytest.raises(ValueError, match="refusing to build"):
            Calibration.load(crafted, tiny_llama())
        _intact(victim, marker)


def test_the_real_configs_still_round_trip_through_json():
    from torchao_eora import GPTQConfig, PruneConfig

    for config in [
        EoRAConfig(rank=8, base=BASE, adapter_bits=4, adapter_group_size=8),
        EoRAConfig(rank=8, base=GPTQConfig(bits=4, group_size=32, act_order=True), compensation="svd"),
        EoRAConfig(rank=8, base=PruneConfig("sparsegpt", "2:4", quantizer=GPTQConfig(bits=4))),
        EoRAConfig(base=PruneConfig("wanda", ratio=0.5), compensation="none", rank=0),
    ]:
        data = config_to_dict(config)
        assert config_from_json(data) == config
        assert config_from_dict(data) == config  # through torchao too, by the allowed json_types module


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["_data"].update(rank="8"), "rank must be a positive integer"),
    (lambda d: d["_data"].update(evil=1), "has no field 'evil'"),
    (lambda d: d["_data"].update(form=["auto"]), "must be a plain value"),
    (lambda d: d["_data"]["base"]["_data"].update(bits=3.5), "bits must be an integer"),
    (lambda d: d["_data"].update(base={"_type": "torch.dtype", "_data": "load"}), "refusing to build 'torch.dtype'"),
])
def test_config_json_fields_are_plain_data_of_the_declared_type(edit, message):
    data = config_to_dict(EoRAConfig(rank=8, base=BASE))
    edit(data)
    with pytest.raises(ValueError, match=message):
        config_from_json(data)


def test_load_pretrained_never_trusts_remote_code(tmp_path):
    marker = tmp_path / "marker"
    remote = _evil_remote_code_dir(tmp_path, marker)
    with pytest.raises(ValueError, match="never runs Python code"):
        load_pretrained(remote, trust_remote_code=True)
    load_pretrained(remote)  # the plain Llama weights load; the custom code is not imported
    assert not marker.exists()


# ---- no pickle is ever executed ----------------------------------------------------------------------------------


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def _evil_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _WritesMarker(marker)}))


def test_no_load_path_unpickles(saved, tmp_path):
    from torchao_eora import cli

    saved_dir, stats = saved
    marker = tmp_path / "marker"
    _evil_pickle(tmp_path / "probe.pkl", marker)  # the payload works when unpickled
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert marker.exists()
    marker.unlink()

    # A checkpoint directory holding a malicious pickle beside (and instead of) the safetensors.
    beside = copy_dir(saved_dir, tmp_path / "beside")
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        _evil_pickle(beside / name, marker)
    only = tmp_path / "only"
    only.mkdir()
    (only / "config.json").write_bytes((saved_dir / "config.json").read_bytes())
    _evil_pickle(only / "pytorch_model.bin", marker)

    load_pretrained(beside)
    AutoModelForCausalLM.from_pretrained(beside)
    with pytest.raises(ValueError, match="safetensors only"):
        load_pretrained(only)
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(only), "--eval-tokens", "0", "--tasks", ""])
    with pytest.raises((ValueError, OSError)):
        AutoModelForCausalLM.from_pretrained(only, use_safetensors=True)

    fake_stats = tmp_path / "stats.safetensors"
    _evil_pickle(fake_stats, marker)
    with pytest.raises(ValueError, match="not a torchao-eora calibration file"):
        Calibration.load(fake_stats)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    _evil_pickle(adapter / "adapter_model.bin", marker)
    model = load_pretrained(saved_dir)
    with pytest.raises((ValueError, FileNotFoundError)):
        import_peft(model, adapter)
    assert not marker.exists(), "a pickle was executed"
