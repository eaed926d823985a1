"""A model is fully converted or untouched: every target is checked before the first layer changes, unsupported
models fail with a clear message, lm_head is left alone, and whatever we save reloads."""

from __future__ import annotations

import logging

import pytest
import torch
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, load_pretrained
from torchao_eora.hf import save_pretrained

BASE = RTNConfig(bits=3, group_size=32)


def _llama(hidden: int = 48, intermediate: int = 80, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _untouched(model, before) -> None:
    after = dict(model.named_parameters())
    assert not any(isinstance(p, QuantWithLowRank) for p in after.values())
    assert all(torch.equal(after[n], w) for n, w in before.items())


# ---- all or nothing ------------------------------------------------------------------------------------------------


def test_a_group_size_that_fits_only_some_layers_changes_nothing():
    """24 divides hidden 48 (q/k/v/o/gate/up) but not intermediate 80 (down_proj, converted late)."""
    config = EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=24), compensation="svd")
    model = _llama()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"nothing was changed.*down_proj.*does not divide in_features=80"):
        quantize_(model, config)
    _untouched(model, before)

    model = _llama()  # the calibrated flow refuses before calibrating, and quantize_ with one-shot statistics too
    with pytest.raises(ValueError, match="down_proj"):
        calibrate(model, token_batches(), EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=24)), progress=False)
    calib = calibrate(model, token_batches(), mode="one-shot", progress=False)
    with pytest.raises(ValueError, match=r"nothing was changed.*down_proj"):
        quantize_(model, EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=24), calibration=calib))
    _untouched(model, before)


def test_a_nan_weight_late_in_the_model_changes_nothing_and_is_named():
    for calibrated in (False, True):
        model = _llama(48, 96)
        calib = calibrate(model, token_batches(), mode="one-shot", progress=False) if calibrated else None
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        before = _weights(model)
        config = EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=16), calibration=calib,
                            compensation="eora" if calibrated else "svd")
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj has NaN/inf"):
            quantize_(model, config)
        assert torch.isnan(model.model.layers[1].mlp.down_proj.weight).any()
        before.pop("model.layers.1.mlp.down_proj.weight")
        _untouched(model, before)


def test_a_rank_too_large_for_small_layers_is_clamped_with_one_warning(caplog):
    model = tiny_llama()  # q_proj 64x64, k_proj/v_proj 32x64
    with caplog.at_level(logging.WARNING, logger="torchao_eora"):
        quantize_(model, EoRAConfig(rank=40, base=BASE, compensation="svd"))
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.rank == 40 and attention.k_proj.weight.rank == 31
    assert caplog.text.count("does not fit every layer") == 1


def test_converting_twice_fails_before_changing_anything():
    model = tiny_llama()
    quantize_(model, EoRAConfig(rank=4, base=BASE, compensation="svd"))
    state = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already compressed"):
        quantize_(model, EoRAConfig(rank=8, base=BASE, compensation="svd"))
    assert all(p is state[n] for n, p in model.named_parameters())


# ---- unsupported models ---------------------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_named_instead_of_silently_skipped():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))}]
    for mode in ("sequential", "one-shot"):
        with pytest.raises(ValueError, match=r"no supported linear layers found .*transformer\.h; found Conv1D"):
            calibrate(model, batches, EoRAConfig(rank=4, base=BASE), mode=mode, progress=False)


class _ExtraListFirst(torch.nn.Module):
    """A model with another ModuleList of the same length registered before the decoder blocks."""

    def __init__(self, inner):
        super().__init__()
        self.config = inner.config
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(inner.config.num_hidden_layers))
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_the_decoder_blocks_are_found_behind_another_module_list():
    model = _ExtraListFirst(tiny_llama())
    calib = calibrate(model, token_batches(), EoRAConfig(rank=4, base=BASE), progress=False)
    assert len(calib.group_of) == 14 and all(n.startswith("inner.model.layers.") for n in calib.group_of)


# ---- lm_head ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_whole_model_quantize_leaves_lm_head_alone_and_saves_a_model_that_reloads(tmp_path, tie):
    model = _llama(64, 128, tie=tie)
    config = EoRAConfig(rank=4, base=BASE, compensation="svd")
    quantize_(model, config)
    assert not isinstance(model.lm_head.weight, QuantWithLowRank)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert isinstance(model.model.layers[1].mlp.down_proj.weight, QuantWithLowRank)
    batch = token_batches(1, seed=3)[0]
    reloaded = load_pretrained(save_pretrained(model, tmp_path / "out", config))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_a_compressed_tied_head_is_saved_untied_and_reloads(tmp_path):
    model = _llama(64, 128, tie=True)
    config = EoRAConfig(rank=4, base=BASE, compensation="svd")
    quantize_(model.lm_head, config)  # asked for explicitly: the head is no longer the embedding
    assert isinstance(model.lm_head.weight, QuantWithLowRank)
    batch = token_batches(1, seed=4)[0]
    reloaded = load_pretrained(save_pretrained(model, tmp_path / "out", config))
    assert not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


# ---- configs are validated at construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: RTNConfig(bits=3.5), "bits must be an integer in 2..8, got 3.5"),
    (lambda: RTNConfig(group_size="64"), "group_size must be an integer"),
    (lambda: RTNConfig(symmetric="no"), "symmetric must be True or False"),
    (lambda: EoRAConfig(form="foo"), "form must be one of 'auto', 'randomized', 'eigen', 'inverse_free'"),
    (lambda: EoRAConfig(base="rtn"), "base must be a compressor config"),
    (lambda: EoRAConfig(base=RTNConfig), "base must be a compressor config"),
    (lambda: EoRAConfig(adapter_resolve=1), "adapter_resolve must be True or False"),
    (lambda: EoRAConfig(calibration="stats.safetensors"), "calibration must be a Calibration"),
])
def test_configs_reject_wrong_types_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_compressor_configs_reject_wrong_types_too():
    from torchao_eora import GPTQConfig, PruneConfig

    with pytest.raises(ValueError, match="act_order must be True or False"):
        GPTQConfig(act_order="yes")
    with pytest.raises(ValueError, match="percdamp must be a number in"):
        GPTQConfig(percdamp="0.01")
    with pytest.raises(ValueError, match="sparsity pattern must be a string"):
        PruneConfig("wanda", pattern=[2, 4])
    with pytest.raises(ValueError, match="pruning criterion must be one of"):
        PruneConfig("random")
