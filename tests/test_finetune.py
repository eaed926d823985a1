"""Fine-tuning from EoRA: gradients reach lora_A / lora_B only, the compressed base never changes, training lowers
the loss, torch.compile matches eager, and fold_adapters gives back QuantWithLowRank weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torchao.quantization import quantize_

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config
from torchao_eora.finetune import LoRALinear, adapter_parameters, fold_adapters, make_trainable

BASE = RTNConfig(bits=3, group_size=32)
N_LINEARS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


def _compressed(method: str = "eora", rank: int = 8):
    model = tiny_llama()
    config = EoRAConfig(rank=rank, base=BASE, compensation=method)
    if method == "eora":
        config = eora_config(calibrate(model, token_batches(), config, progress=False))
    # decoder layers only, as calibration does (quantize_ with no calibration would also take lm_head)
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and ".layers." in name)
    return model


@pytest.fixture(scope="module")
def eora_model():
    return _compressed("eora")


@pytest.fixture
def model(eora_model):
    return copy.deepcopy(eora_model)


def _loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


BASE_FIELDS = ("qdata", "scale", "zero_point")


def _compressed_weights(model) -> dict[str, QuantWithLowRank]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m._parameters.get("weight"), QuantWithLowRank)}


def _base_fields(model) -> dict[str, torch.Tensor]:
    """The compressed base of every QuantWithLowRank weight (int values, scales, zero points), cloned."""
    return {f"{name}.{field}": getattr(w, field).clone()
            for name, w in _compressed_weights(model).items() for field in BASE_FIELDS}


def test_make_trainable_swaps_every_compressed_linear_and_freezes_the_rest(model):
    params = make_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == N_LINEARS and len(params) == 2 * N_LINEARS
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert [id(p) for p in params] == [id(p) for p in adapter_parameters(model)]
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (8, 64) and q.lora_B.shape == (64, 8) and q.lora_A.dtype == torch.float32
    assert isinstance(q.weight, QuantWithLowRank) and q.weight.rank == 0 and not q.weight.requires_grad
    assert "lora_A" in "".join(model.state_dict()) and not isinstance(model.lm_head, LoRALinear)
    with pytest.raises(ValueError, match="already has trainable adapters"):
        make_trainable(model)


def test_gradients_reach_A_and_B_only(model, batches):
    make_trainable(model)
    _loss(model, batches[0]).backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_base_is_bit_identical_after_training_and_loss_goes_down(model, batches):
    before = _base_fields(model)
    originals = _compressed_weights(model)
    factors = {n: (w.dequantize_A().clone(), w.dequantize_B().clone()) for n, w in originals.items()}
    params = make_trainable(model)
    optimizer = torch.optim.SGD(params, lr=0.5)
    batch = batches[0]
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, w in originals.items():  # the parameters are copies: the weights they came from are untouched
        assert torch.equal(w.dequantize_A(), factors[name][0]) and torch.equal(w.dequantize_B(), factors[name][1])
    for stage in ("trained", "folded"):  # the rank-0 bases while training, then the folded weights
        after = _base_fields(model)
        assert after.keys() == before.keys() and len(after) == 3 * N_LINEARS
        for key, tensor in after.items():
            assert torch.equal(tensor, before[key]), (stage, key)
        fold_adapters(model)
    for name, w in _compressed_weights(model).items():  # only the residuals moved, and every one of them did
        A, B = factors[name]
        assert w.rank == 8 and not torch.equal(w.dequantize_A(), A) and not torch.equal(w.dequantize_B(), B), name


def test_make_trainable_keeps_logits_and_fold_round_trip_is_exact(model, batches):
    reference = _logits(model, batches[0])
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    make_trainable(model)
    torch.testing.assert_close(_logits(model, batches[0]), reference, rtol=1e-5, atol=1e-5)
    fold_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # the same modules are back
    assert torch.equal(_logits(model, batches[0]), reference)


def test_lora_init_is_exactly_the_compressed_base_at_step_zero(model, batches):
    base_only = _compressed("none")
    params = make_trainable(model, init="lora", rank=4, generator=torch.Generator().manual_seed(0))
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank == 4 and torch.count_nonzero(q.lora_B) == 0 and torch.count_nonzero(q.lora_A) > 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on (r x in): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear
    assert q.lora_A.abs().max() <= bound
    assert torch.equal(_logits(model, batches[0]), _logits(base_only, batches[0]))
    # B = 0: the first gradient reaches B (and A only after B moves), as with PEFT's default
    _loss(model, batches[0]).backward()
    assert all(p.grad is not None for p in params)
    # a rank-0 (compression-only) model needs a rank for init="lora", and has no factors to start from
    with pytest.raises(ValueError, match="no residual"):
        make_trainable(copy.deepcopy(base_only))
    lora = make_trainable(base_only, init="lora", rank=4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(lora, params))  # seeded: the same initialisation


def test_compiled_forward_backward_matches_eager(model, batches):
    make_trainable(model)
    compiled_model = copy.deepcopy(model)
    _loss(model, batches[0]).backward()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    loss = _loss(compiled, batches[0])
    loss.backward()
    torch.testing.assert_close(loss, _loss(model, batches[0]).detach(), rtol=1e-5, atol=1e-5)
    eager_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    compiled_grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 2 * N_LINEARS
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert all(p.grad is None for p in compiled_model.parameters() if not p.requires_grad)


def test_folded_model_saves_and_reloads(model, batches, tmp_path):
    from transformers import AutoModelForCausalLM

    import torchao_eora

    config = EoRAConfig(rank=8, base=BASE)
    params = make_trainable(model)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    trained = _logits(model, batches[0])
    fold_adapters(model)
    torch.testing.assert_close(_logits(model, batches[0]), trained, rtol=1e-5, atol=1e-5)
    torchao_eora.save_pretrained(model, tmp_path / "out", config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(reloaded, batches[0]), _logits(model, batches[0]))


def test_peft_on_the_compressed_base_trains_the_exported_adapter_only(model, batches, tmp_path):
    """The other route: our EoRA residual as a PEFT LoRA adapter on the compressed base, trained with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from torchao_eora import export_peft

    reference = _logits(model, batches[0])
    out = export_peft(model, tmp_path / "adapter", config=EoRAConfig(rank=8, base=BASE))
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    peft_model = PeftModel.from_pretrained(base, out, is_trainable=True)
    torch.testing.assert_close(_logits(peft_model, batches[0]), reference, rtol=1e-5, atol=1e-5)
    _loss(peft_model, batches[0]).backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * N_LINEARS and all(".lora_" in n for n in trainable)
    for name, p in peft_model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_rejects_models_without_compressed_linears_and_bad_arguments(model):
    with pytest.raises(ValueError, match="no QuantWithLowRank"):
        make_trainable(tiny_llama())
    with pytest.raises(ValueError, match="only applies to init='lora'"):
        make_trainable(model, rank=4)
    with pytest.raises(ValueError, match="init must be"):
        make_trainable(model, init="gaussian")


def test_quantized_adapters_are_a_starting_point_and_fold_back_in_full_precision(batches):
    model = tiny_llama()
    config = EoRAConfig(rank=8, base=BASE, adapter_bits=4, adapter_group_size=8)
    quantize_(model, eora_config(calibrate(model, token_batches(), config, progress=False)))
    assert model.model.layers[0].self_attn.q_proj.weight.adapter_bits == 4
    reference = _logits(model, batches[0])
    make_trainable(model)  # A, B start from the dequantized int4 factors: the same model
    assert torch.equal(_logits(model, batches[0]), reference)
    fold_adapters(model)  # the folded factors are full precision (quantize them again to save space)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.adapter_bits is None and weight.rank == 8
    assert torch.equal(_logits(model, batches[0]), reference)


def test_a_model_compressed_by_the_sequential_pass_trains(batches):
    """The pass runs its forwards in inference mode; the weights it installs must still work under autograd
    (the CLI and benchmarks/finetune.py compress in place, then fine-tune)."""
    from torchao_eora import compress_sequential

    model = tiny_llama()
    compress_sequential(model, token_batches(), EoRAConfig(rank=8, base=BASE), progress=False)
    make_trainable(model)
    _loss(model, batches[0]).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
