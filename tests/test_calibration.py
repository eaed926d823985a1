"""Calibration statistics are exactly sum x^T x over real tokens, shared per input, and survive a save/load."""

import os
from collections import Counter

import pytest
import torch
from torchao.quantization import quantize_

from helpers import tiny_llama, token_batches
from torchao_eora import (
    Calibration, EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, compress_sequential, eora_config,
)

CONFIG = EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32))


def _brute_force_inputs(model, batches):
    """Every linear's input over real tokens, captured the naive way."""
    seen = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        rows = [x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()] for x, b in zip(xs, batches)]
        out[name] = torch.cat(rows).double()
    return out


def test_one_shot_moments_are_exact_and_skip_padding(model):
    batches = token_batches(pad_first=11)
    calib = calibrate(model, batches, mode="one-shot", progress=False)
    xs = _brute_force_inputs(model, batches)
    assert set(calib.group_of) == set(xs)
    for name, x in xs.items():
        m = calib.second_moment(name)
        assert m.n_tokens == 2 * 4 * 32 - 2 * 11
        torch.testing.assert_close(m.total, x.T @ x, rtol=1e-5, atol=1e-4)


def test_modules_reading_one_input_share_one_accumulator(model, batches):
    calib = calibrate(model, batches, mode="one-shot", progress=False)
    g = calib.group_of
    for i in range(2):
        p = f"model.layers.{i}."
        assert g[p + "self_attn.q_proj"] == g[p + "self_attn.k_proj"] == g[p + "self_attn.v_proj"]
        assert g[p + "mlp.gate_proj"] == g[p + "mlp.up_proj"]
        assert len({g[p + s] for s in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}) == 4
    # 8 distinct inputs, plus each v_proj's attention-weighted moment (for EoRA's residual)
    assert len(calib.groups) == 10 and len(calib.group_of) == 14 and len(calib.value_group_of) == 2


def test_sequential_sees_compressed_earlier_layers_and_leaves_model_intact(model, batches):
    with torch.no_grad():
        before = model(**batches[0]).logits
    seq = calibrate(model, batches, CONFIG, progress=False)
    one = calibrate(model, batches, mode="one-shot", progress=False)
    # layer 0 reads the embeddings either way; layer 1 reads the output of a compressed layer 0 in sequential mode
    first, later = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(seq.second_moment(first).total, one.second_moment(first).total)
    assert not torch.allclose(seq.second_moment(later).total, one.second_moment(later).total)
    assert not any(isinstance(p, QuantWithLowRank) for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, before)


def test_sequential_stats_match_what_the_compressed_model_feeds_each_layer(model, batches):
    seq = calibrate(model, batches, CONFIG, progress=False)
    quantize_(model, eora_config(seq))
    # after compression, the inputs a layer sees are exactly what sequential calibration measured... for the
    # first linear of every layer (within a layer, calibration measures the layer uncompressed, like GPTQ)
    xs = _brute_force_inputs(model, batches)
    for i in range(2):
        name = f"model.layers.{i}.self_attn.q_proj"
        torch.testing.assert_close(seq.second_moment(name).total, xs[name].T @ xs[name], rtol=1e-4, atol=1e-3)


def test_measuring_passes_stop_once_every_statistic_is_taken(model, batches):
    """Nothing after the last hooked input runs while measuring (one-shot: the final norm and lm_head; sequential:
    the last layer's down_proj runs only in the pass that makes the layer's outputs, with the dense weight)."""
    calls = Counter()
    last = "model.layers.1.mlp.down_proj"
    for name in ("lm_head", last):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: calls.update([n]))
    calibrate(model, batches, mode="one-shot", progress=False)
    assert calls == Counter()
    compress_sequential(model, batches, CONFIG, progress=False)
    assert calls == Counter({last: len(batches)})
    assert isinstance(model.get_submodule(last).weight, QuantWithLowRank)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the dense forward is taken off again


def test_save_load_round_trip_is_exact_and_atomic(tmp_path, model, batches):
    calib = calibrate(model, batches, CONFIG, progress=False)
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    assert os.listdir(tmp_path) == ["calib.safetensors"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions of any file the user writes
    loaded = Calibration.load(path, model=tiny_llama())
    assert loaded.mode == "sequential" and loaded.group_of == calib.group_of
    assert loaded.config is None and eora_config(loaded) == calib.config  # rebuilt (strictly) by eora_config
    for k, m in calib.groups.items():
        assert torch.equal(loaded.groups[k].total, m.total) and loaded.groups[k].n_tokens == m.n_tokens

    # the same statistics give the same compressed model
    a, b = tiny_llama(), tiny_llama()
    quantize_(a, eora_config(calib.bind(a)))
    quantize_(b, eora_config(Calibration.load(path, model=b)))
    with torch.no_grad():
        assert torch.equal(a(**batches[0]).logits, b(**batches[0]).logits)


def test_load_rejects_foreign_and_truncated_files(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a torchao-eora calibration"):
        Calibration.load(foreign)
    broken = tmp_path / "broken.safetensors"
    save_file({}, broken, metadata={"torchao_eora.calibration": '{"mode": "one-shot", "group_of": {}, "n_tokens": {"x": 3}, "config": null}'})
    with pytest.raises(ValueError, match="missing tensors"):
        Calibration.load(broken)


def test_empty_calibration_set_is_an_error(model):
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(model, [], CONFIG)
    with pytest.raises(ValueError, match="input_ids"):
        calibrate(model, [{"ids": torch.zeros(1, 4, dtype=torch.long)}], CONFIG)


def test_sequential_needs_the_config(model, batches):
    with pytest.raises(ValueError, match="pass the EoRAConfig"):
        calibrate(model, batches)


def test_nan_activations_name_the_layer(model, batches):
    with torch.no_grad():
        model.model.embed_tokens.weight[batches[0]["input_ids"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite .* 'model.layers.0.self_attn.q_proj'"):
        calibrate(model, batches, CONFIG, progress=False)
