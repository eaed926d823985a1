"""PEFT adapters: export_peft -> real PeftModel reproduces our logits; import_peft folds any LoRA adapter back;
the export-peft CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config, export_peft, import_peft
from torchao_eora.hf import save_pretrained

BASE = RTNConfig(bits=3, group_size=32)
SHORT_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _linears_in(part: str):
    return lambda module, name: isinstance(module, torch.nn.Linear) and part in name


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def eora(tmp_path_factory):
    """A tiny EoRA model (rank 8 everywhere) and its exported adapter directory."""
    model = tiny_llama()
    config = EoRAConfig(rank=8, base=BASE)
    quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    out = export_peft(model, tmp_path_factory.mktemp("peft") / "adapter", config=config, base_format="eora")
    return model, out


def test_export_writes_peft_files_and_a_base_only_checkpoint(eora):
    model, out = eora
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "base"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == {} == config["alpha_pattern"]
    assert config["target_modules"] == SHORT_NAMES
    assert config["base_model_name_or_path"] == str(out / "base")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
    assert len(keys) == 28
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    assert a.shape == (8, 64) and b.shape == (32, 8)
    assert torch.equal(a, k_proj.A) and torch.equal(b, k_proj.B)
    base_config = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert base_config["quant_type"]["default"]["_data"]["compensation"] == "none"
    # The exporting model is left as it was: residuals in place, config still the full one.
    assert k_proj.rank == 8 and model.config.quantization_config.quant_type.compensation == "eora"


def test_peft_on_the_reloaded_base_reproduces_our_logits(eora):
    model, out = eora
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    weights = [p for p in base.parameters() if isinstance(p, QuantWithLowRank)]
    assert len(weights) == 14 and all(w.rank == 0 for w in weights)
    batch = token_batches(1, seed=11)[0]
    ours = _logits(model, batch)
    assert not torch.allclose(_logits(base, batch), ours, atol=1e-3)  # the residual matters
    peft_model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(peft_model, batch), ours, rtol=1e-5, atol=1e-5)


def test_import_of_our_export_is_bit_identical(eora):
    model, out = eora
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    import_peft(base, out)
    batch = token_batches(1, seed=12)[0]
    assert torch.equal(_logits(base, batch), _logits(model, batch))


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"), filter_fn=_linears_in("self_attn."))
    quantize_(model, EoRAConfig(rank=8, base=BASE, compensation="svd"), filter_fn=_linears_in("mlp."))
    out = export_peft(model, tmp_path / "adapter", config=EoRAConfig(rank=4, base=BASE, compensation="svd"),
                      base_format="eora")
    config = json.loads((out / "adapter_config.json").read_text())
    mlp = {f"model.layers.{i}.mlp.{p}": 8 for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert config["r"] == config["lora_alpha"] == 4  # 8 attention projections of rank 4, 6 MLP ones of rank 8
    assert config["rank_pattern"] == mlp and config["alpha_pattern"] == mlp
    batch = token_batches(1, seed=13)[0]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    assert peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape == (8, 128)
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    imported = import_peft(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    assert torch.equal(_logits(imported, batch), _logits(model, batch))


def test_partial_export_names_modules_in_full(tmp_path):
    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"), filter_fn=_linears_in("model.layers.0."))
    out = export_peft(model, tmp_path / "adapter", config=EoRAConfig(rank=4, base=BASE, compensation="svd"))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(f"model.layers.0.{p}" for p in
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    batch = token_batches(1, seed=14)[0]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_applies_peft_scaling_and_patterns(eora, tmp_path, use_rslora):
    """A foreign adapter (alpha != r, per-module rank and alpha) folds in as PEFT computes it."""
    _, out = eora
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
        use_rslora=use_rslora,
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base"), lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT's random init keeps B small; make the adapter matter
            p.data.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "foreign")
    imported = import_peft(AutoModelForCausalLM.from_pretrained(out / "base"), tmp_path / "foreign")
    q1 = imported.model.layers[1].self_attn.q_proj.weight
    assert q1.rank == 2 and imported.model.layers[0].self_attn.k_proj.weight.rank == 0
    batch = token_batches(1, seed=15)[0]
    torch.testing.assert_close(_logits(imported, batch), _logits(peft_model, batch), rtol=1e-5, atol=1e-5)


def test_import_onto_a_dense_model(tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                         init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    imported = import_peft(tiny_llama(), tmp_path / "adapter")
    w = imported.model.layers[0].self_attn.o_proj.weight
    assert isinstance(w, QuantWithLowRank) and w.target_dtype is None and w.rank == 4
    batch = token_batches(1, seed=16)[0]
    torch.testing.assert_close(_logits(imported, batch), _logits(peft_model, batch), rtol=1e-5, atol=1e-5)


def _rewrite(src, dst, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (edit_config or (lambda c: None))(config)
    (edit_tensors or (lambda t: None))(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


Q = "base_model.model.model.layers.0.self_attn.q_proj"
NOWHERE = "base_model.model.model.nowhere"


def test_import_errors_name_the_problem(eora, tmp_path):
    model, out = eora

    def fresh():
        return AutoModelForCausalLM.from_pretrained(out / "base")

    cases = [
        (dict(edit_tensors=lambda t: t.pop(f"{Q}.lora_B.weight")), ValueError, rf"{Q}\.lora_B\.weight is missing"),
        (dict(edit_tensors=lambda t: t.update({f"{NOWHERE}.lora_A.weight": torch.zeros(8, 64),
                                                f"{NOWHERE}.lora_B.weight": torch.zeros(64, 8)})),
         ValueError, r"targets model\.nowhere, which this model does not have"),
        (dict(edit_tensors=lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.zeros(8, 32))),
         ValueError, r"model\.layers\.0\.self_attn\.q_proj"),
        (dict(edit_config=lambda c: c.__setitem__("r", 6)), ValueError, "r=6"),
        (dict(edit_config=lambda c: c.__setitem__("use_dora", True)), NotImplementedError, "use_dora"),
    ]
    for i, (edit, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            import_peft(fresh(), _rewrite(out, tmp_path / str(i), **edit))


def _low_rank_state(model) -> dict[str, torch.Tensor]:
    """Every inner tensor of every QuantWithLowRank weight (A, B, and the base), by name."""
    return {f"{n}.{field}": getattr(p, field).clone() for n, p in model.named_parameters()
            if isinstance(p, QuantWithLowRank) for field in ("qdata", "A", "B", "scale", "zero_point")}


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = _low_rank_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])]
    assert not changed, f"a failed import changed {changed[:4]}"


def test_failed_import_leaves_the_model_untouched(eora, tmp_path):
    """Everything is checked before anything is applied: a bad 3rd module (in import order) leaves modules 1-2 as
    they were, rank 0, not half-imported with the adapter's rank 8."""
    _, out = eora
    third = "base_model.model.model.layers.0.mlp.up_proj"  # sorted: down_proj, gate_proj, up_proj
    bad = _rewrite(out, tmp_path / "bad", edit_tensors=lambda t: t.__setitem__(f"{third}.lora_B.weight",
                                                                                torch.zeros(127, 8)))
    model = AutoModelForCausalLM.from_pretrained(out / "base")
    before = _low_rank_state(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*lora_B \(127, 8\)"):
        import_peft(model, bad)
    _assert_unchanged(model, before)
    # ... and later problems too: a non-finite value in the last module, a wrong dtype in the first one
    for i, (key, value) in enumerate([
        ("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", torch.full((8, 64), float("nan"))),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", torch.zeros(8, 128, dtype=torch.int32)),
    ]):
        with pytest.raises(ValueError, match="non-finite|floating"):
            import_peft(model, _rewrite(out, tmp_path / f"bad{i}", edit_tensors=lambda t: t.__setitem__(key, value)))
        _assert_unchanged(model, before)


def test_adapter_matching_no_module_is_an_error(eora, tmp_path):
    _, out = eora
    model = AutoModelForCausalLM.from_pretrained(out / "base")
    before = _low_rank_state(model)
    nowhere = _rewrite(out, tmp_path / "targets", edit_config=lambda c: c.__setitem__("target_modules", ["qkv"]))
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no module.*q_proj"):
        import_peft(model, nowhere)
    regex = _rewrite(out, tmp_path / "regex", edit_config=lambda c: c.__setitem__("target_modules", r".*\.qkv"))
    with pytest.raises(ValueError, match="match no module"):
        import_peft(model, regex)
    empty = _rewrite(out, tmp_path / "empty", edit_tensors=lambda t: t.clear())
    with pytest.raises(ValueError, match=r"no lora_A/lora_B tensors.*q_proj"):
        import_peft(model, empty)
    _assert_unchanged(model, before)
    # a regex and "all-linear" that do match import as before
    for i, targets in enumerate([r".*\.(q|k|v|o|gate|up|down)_proj", "all-linear"]):
        import_peft(model, _rewrite(out, tmp_path / f"ok{i}", edit_config=lambda c: c.__setitem__("target_modules",
                                                                                                  targets)))
        assert model.model.layers[1].mlp.down_proj.weight.rank == 8


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda d, c: (d / "adapter_config.json").write_text("{not json"), "is not valid JSON.*re-export"),
        (lambda d, c: (d / "adapter_config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d, c: _write_config(d, c, r=None), "has no 'r'"),
        (lambda d, c: _write_config(d, c, r="8"), "'r' must be a positive integer"),
        (lambda d, c: _write_config(d, c, lora_alpha=float("nan")), "'lora_alpha' must be a finite number"),
        (lambda d, c: _write_config(d, c, target_modules="(q_proj"), "target_modules.*not a valid regex"),
        (lambda d, c: _write_config(d, c, target_modules=[1, 2]), "target_modules must be"),
        (lambda d, c: _write_config(d, c, rank_pattern={"q_proj[": 4}), r"rank_pattern key 'q_proj\[' is not a valid"),
        (lambda d, c: _write_config(d, c, rank_pattern={"q_proj": 0}), "rank_pattern.*positive integer"),
        (lambda d, c: _write_config(d, c, peft_type="IA3"), "not a LoRA adapter"),
        (lambda d, c: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d, c: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "cannot be read"),
    ],
    ids=["not-json", "not-object", "no-r", "r-str", "alpha-nan", "bad-regex", "targets-ints", "pattern-regex",
         "pattern-zero", "not-lora", "no-config", "bad-safetensors"],
)
def test_broken_adapter_config_gives_one_clear_value_error(eora, tmp_path, write, message):
    _, out = eora
    adapter = _rewrite(out, tmp_path / "adapter")
    write(adapter, json.loads((out / "adapter_config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(out / "base")
    before = _low_rank_state(model)
    with pytest.raises(ValueError, match=message) as info:
        import_peft(model, adapter)
    assert info.type is ValueError  # not a KeyError / json.JSONDecodeError / re.error leaking out
    assert "\n" not in str(info.value) and str(adapter) in str(info.value)
    _assert_unchanged(model, before)


def _write_config(adapter, config, **changes):
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_import_refuses_pickle_adapters(eora, tmp_path):
    _, out = eora
    (tmp_path / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        import_peft(tiny_llama(), tmp_path)


def test_export_needs_residuals(tmp_path):
    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="none"))
    with pytest.raises(ValueError, match="rank > 0"):
        export_peft(model, tmp_path / "adapter", config=EoRAConfig(rank=4, base=BASE, compensation="none"))
    assert not (tmp_path / "adapter").exists()


def test_cli_export_peft(eora, tmp_path):
    from torchao_eora import cli

    model, _ = eora
    saved = save_pretrained(model, tmp_path / "saved")
    assert cli.main(["export-peft", "--model", str(saved), "--out", str(tmp_path / "adapter")]) == 0
    batch = token_batches(1, seed=17)[0]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base"),
                                           tmp_path / "adapter")
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)

    assert cli.main(["export-peft", "--model", str(saved), "--out", str(tmp_path / "only"), "--no-base",
                     "--base-model-name-or-path", "org/eora-base"]) == 0
    only = tmp_path / "only"
    assert sorted(p.name for p in only.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((only / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/eora-base"


def test_vllm_allocation_rounds_up_to_an_allowed_max_lora_rank():
    from torchao_eora.peft_io import vllm_lora_allocation

    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"), filter_fn=_linears_in("self_attn."))
    quantize_(model, EoRAConfig(rank=12, base=BASE, compensation="svd", adapter_bits=4, adapter_group_size=4),
              filter_fn=_linears_in("mlp."))
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), QuantWithLowRank)]
    alloc = vllm_lora_allocation(model)
    assert alloc["max_rank"] == 12 and alloc["max_lora_rank"] == 16  # every module in a rank-16 slot, bf16
    assert alloc["vllm_bf16_bytes"] == sum(16 * (w.shape[0] + w.shape[1]) * 2 for w in weights)
    ours = sum(getattr(w, f).numel() * getattr(w, f).element_size() for w in weights for f in w.fields
               if w.fields[f].part == "adapters" and getattr(w, f) is not None)
    assert alloc["our_bytes"] == ours < alloc["vllm_bf16_bytes"]


def test_vllm_allocation_above_512_has_no_slot():
    from torchao_eora.cli import _vllm_note
    from torchao_eora.peft_io import vllm_lora_allocation

    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"))
    assert vllm_lora_allocation(model)["max_lora_rank"] == 8
    note = _vllm_note({"max_rank": 600, "max_lora_rank": None, "vllm_bf16_bytes": None, "our_bytes": 1})
    assert "cannot serve" in note


def test_cli_export_peft_prints_the_vllm_allocation(eora, tmp_path, capsys):
    from torchao_eora import cli

    model, _ = eora
    saved = save_pretrained(model, tmp_path / "saved")
    assert cli.main(["export-peft", "--model", str(saved), "--out", str(tmp_path / "adapter"), "--no-base"]) == 0
    out = capsys.readouterr().out
    assert "--max-lora-rank 8 " in out  # the fixture's adapters are rank 8: the allowed value 8 fits exactly
    assert "in bf16/fp16 at that rank" in out and "in our own format" in out


def test_cli_export_peft_help_covers_every_flag():
    from torchao_eora import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export-peft"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == {"model", "out", "base_model_name_or_path", "no_base", "overwrite", "base_format"}
    assert all(a.help for a in flags)


def test_vllm_note_offers_the_vllm_friendly_choice():
    from torchao_eora.cli import _vllm_note

    alloc = {"max_rank": 192, "max_lora_rank": 256, "vllm_bf16_bytes": 2e8, "our_bytes": 4e7}
    note = _vllm_note({**alloc, "quantized_adapters": True})
    assert "--max-lora-rank 256" in note and "--rank 256" in note and "--adapter-bits none" in note
    note = _vllm_note({**alloc, "max_rank": 256, "quantized_adapters": False})
    assert "re-quantize" not in note  # already what vLLM serves best: nothing to advise
