"""quantize_(model, EoRAConfig(...)) end to end on a tiny Llama: what gets converted, and that EoRA helps."""

import logging

import pytest
import torch
from torchao.quantization import quantize_

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config, weighted_error
from torchao_eora.solver import LowRankFactors

BASE = RTNConfig(bits=3, group_size=32)


def _logit_error(model, reference, batches):
    with torch.no_grad():
        return sum(float((model(**b).logits - reference(**b).logits).pow(2).mean()) for b in batches)


def test_decoder_linears_converted_lm_head_left_alone(model, batches):
    calib = calibrate(model, batches, EoRAConfig(rank=8, base=BASE), progress=False)
    quantize_(model, eora_config(calib))
    converted = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), QuantWithLowRank)}
    assert converted == set(calib.group_of)
    assert not isinstance(model.lm_head.weight, QuantWithLowRank)
    q = model.model.layers[0].mlp.down_proj.weight
    assert q.rank == 8 and q.bits == 3 and q.group_size == 32
    assert "rank=8" in repr(model.model.layers[0].mlp.down_proj)


@pytest.mark.slow  # three whole-model passes
def test_eora_beats_svd_beats_nothing_per_layer_and_end_to_end():
    reference = tiny_llama()
    calib_batches, held_out = token_batches(4, seed=0), token_batches(2, seed=1)
    errors = {}
    per_layer = {}
    for method in ("none", "svd", "eora"):
        m = tiny_llama()
        config = EoRAConfig(rank=8, base=BASE, compensation=method)
        calib = calibrate(m, calib_batches, config, progress=False)
        quantize_(m, eora_config(calib))
        errors[method] = _logit_error(m, reference, held_out)
        ref_w = dict(reference.named_parameters())
        per_layer[method] = {}
        for name in calib.group_of:
            w = m.get_submodule(name).weight
            delta = ref_w[name + ".weight"].detach() - w.dequantize_base()
            per_layer[method][name] = weighted_error(delta, LowRankFactors(w.A, w.B) if w.rank else None, calib.second_moment(name).total)
    for name in per_layer["eora"]:
        assert per_layer["eora"][name] < per_layer["svd"][name] < per_layer["none"][name]
    assert errors["eora"] < errors["svd"] < errors["none"]


def test_data_free_fallback_is_plain_svd_and_says_so(caplog, batches):
    a, b = tiny_llama(), tiny_llama()
    with caplog.at_level(logging.WARNING):
        quantize_(a, EoRAConfig(rank=8, base=BASE))  # no calibration
    quantize_(b, EoRAConfig(rank=8, base=BASE, compensation="svd"))
    assert caplog.text.count("falling back to data-free SVD") == 1
    with torch.no_grad():
        assert torch.equal(a(**batches[0]).logits, b(**batches[0]).logits)


def test_compiled_model_matches_eager(model, batches):
    calib = calibrate(model, batches, EoRAConfig(rank=8, base=BASE), progress=False)
    quantize_(model, eora_config(calib))
    with torch.no_grad():
        eager = model(**batches[0]).logits
        compiled = torch.compile(model, fullgraph=True)(**batches[0]).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bad_configs_and_modules_are_rejected(model):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        EoRAConfig(rank=0)
    with pytest.raises(ValueError, match="compensation"):
        EoRAConfig(compensation="lora")
    with pytest.raises(ValueError, match="is a Embedding, not a torch.nn.Linear"):
        quantize_(model, EoRAConfig(rank=8, base=BASE), filter_fn=lambda m, n: n == "model.embed_tokens")
    with pytest.raises(ValueError, match="does not divide"):
        quantize_(tiny_llama(), EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=48), compensation="svd"))


def test_already_converted_layer_is_rejected(model):
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"))
    with pytest.raises(ValueError, match="already compressed"):
        quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"))


def test_half_precision_model_keeps_dtype(batches):
    m = tiny_llama().to(torch.bfloat16)
    quantize_(m, EoRAConfig(rank=8, base=BASE, compensation="svd"))
    w = m.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and w.A.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m(**batches[0]).logits).all()
