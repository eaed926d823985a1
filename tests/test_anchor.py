"""The anchored target: EoRA's residual fitted to the original model's outputs from the compressed prefix's inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torchao.quantization import quantize_

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, RTNConfig, calibrate, compress_sequential, eora_config
from torchao_eora.anchor import AnchorCollector, is_anchored
from torchao_eora.calibration import SecondMoment


def _effective(model: torch.nn.Module, layer: int) -> dict[str, torch.Tensor]:
    return {n: m.weight.dequantize(torch.float32) for n, m in model.model.layers[layer].named_modules()
            if isinstance(m, torch.nn.Linear)}


def _compressed(fp: torch.nn.Module, target: str, bits: int = 2) -> torch.nn.Module:
    model = copy.deepcopy(fp)
    config = EoRAConfig(rank=8, base=RTNConfig(bits=bits, group_size=32), target=target)
    compress_sequential(model, token_batches(n_batches=4, batch=4, seq=64, seed=1), config, progress=False)
    return model


def _output_error(model: torch.nn.Module, fp: torch.nn.Module) -> float:
    held_out = token_batches(n_batches=2, batch=4, seq=64, seed=7)  # never calibrated on
    with torch.no_grad():
        return sum(float(((model(**b).logits - fp(**b).logits) ** 2).mean()) for b in held_out)


@pytest.mark.parametrize("seed", [0, 1])
def test_anchored_lowers_the_model_output_error_on_held_out_batches(seed):
    fp = tiny_llama(seed=seed, layers=4)
    layer, anchored = _output_error(_compressed(fp, "layer"), fp), _output_error(_compressed(fp, "anchored"), fp)
    assert anchored < 0.97 * layer


def test_anchored_equals_the_layer_target_where_the_prefix_is_uncompressed():
    fp = tiny_llama(layers=2)
    layer, anchored = _compressed(fp, "layer"), _compressed(fp, "anchored")
    for name, w in _effective(layer, 0).items():  # layer 0 reads the embeddings: C = G, no shift
        torch.testing.assert_close(_effective(anchored, 0)[name], w, rtol=1e-4, atol=1e-5)
    # layer 1 reads layer 0's compressed outputs; its inputs differ only by float rounding from layer 0's C vs G
    changed = [n for n, w in _effective(layer, 1).items()
               if torch.linalg.norm(_effective(anchored, 1)[n] - w) > 1e-3 * torch.linalg.norm(w)]
    assert sorted(changed) == ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj",
                               "self_attn.v_proj"]  # the output projections keep the layer target


def test_shift_is_the_least_squares_correction():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    x_fp = torch.randn(4, 50, 16)
    x_q = x_fp + 0.1 * torch.randn_like(x_fp)
    collector = AnchorCollector({"layers.0.q_proj": linear})
    with collector:
        with collector.recording(None):
            linear(x_fp)
        linear(x_q)
    fp, q = x_fp.reshape(-1, 16).double(), x_q.reshape(-1, 16).double()
    gram = q.T @ q / q.shape[0]
    shift = collector.shift("layers.0.q_proj", linear.weight, SecondMoment(q.T @ q, q.shape[0]))
    # undamped, W + S would be the least-squares map from x_q to W x_fp; damping moves it by about 1%
    exact = torch.linalg.lstsq(q, fp @ linear.weight.double().T).solution.T
    assert torch.linalg.norm(linear.weight.double() + shift.double() - exact) < 0.05 * torch.linalg.norm(exact)
    assert torch.linalg.norm(shift) > 0.01 * torch.linalg.norm(linear.weight)


def test_calibrate_then_quantize_installs_the_anchored_weights():
    fp = tiny_llama(layers=2)
    config = EoRAConfig(rank=8, base=RTNConfig(bits=2, group_size=32), target="anchored")
    model = copy.deepcopy(fp)
    quantize_(model, eora_config(calibrate(model, token_batches(n_batches=4, batch=4, seq=64, seed=1), config,
                                           progress=False)))
    for name, w in _effective(_compressed(fp, "anchored"), 1).items():
        torch.testing.assert_close(_effective(model, 1)[name], w)


def test_output_projections_are_not_anchored():
    assert is_anchored("model.layers.3.self_attn.q_proj") and is_anchored("model.layers.3.mlp.up_proj")
    assert not is_anchored("model.layers.3.self_attn.o_proj") and not is_anchored("model.layers.3.mlp.down_proj")


def test_anchored_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="needs compensation='eora'"):
        EoRAConfig(rank=8, compensation="svd", target="anchored")
    config = EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32), target="anchored")
    model = tiny_llama()
    with pytest.raises(ValueError, match="use mode='sequential'"):
        calibrate(model, token_batches(), config, mode="one-shot", progress=False)
    one_shot = calibrate(model, token_batches(), mode="one-shot", progress=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="solved during sequential calibration"):
        quantize_(model, EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32), target="anchored",
                                    calibration=one_shot))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched


def test_a_resumed_job_refuses_the_anchored_target():
    from torchao_eora.sequential import InMemory

    class Resumed(InMemory):
        def written(self, index: int) -> bool:
            return index == 0

    config = EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32), target="anchored")
    with pytest.raises(ValueError, match="without --resume"):
        compress_sequential(tiny_llama(), token_batches(), config, layer_io=Resumed(), progress=False)
