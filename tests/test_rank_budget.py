"""A global rank budget spends the adapter parameters of a uniform rank where they remove the most error."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torchao.quantization import quantize_

from helpers import FromDisk, anisotropic_moment, tiny_llama, token_batches
from torchao_eora import (
    Calibration, EoRAConfig, RTNConfig, calibrate, compress_sequential, eora_config, eora_factors, export_peft,
    weighted_error,
)
from torchao_eora.rank_budget import allocate_ranks
from torchao_eora.solver import eigen_of, error_spectrum, output_energy, svd_factors

CONFIG = EoRAConfig(rank=8, base=RTNConfig(bits=2, group_size=32), rank_budget="global")


@pytest.mark.parametrize("weighted", [True, False])
def test_each_spectrum_entry_is_what_one_more_rank_removes(weighted):
    torch.manual_seed(0)
    delta = torch.randn(48, 64, dtype=torch.float64)
    c = anisotropic_moment(64) if weighted else torch.eye(64, dtype=torch.float64)
    spectrum = error_spectrum(delta, c if weighted else None)
    assert spectrum.shape == (48,) and (spectrum[:-1] >= spectrum[1:]).all()
    errors = [weighted_error(delta, None, c) ** 2]
    for k in range(1, 6):
        factors = eora_factors(delta, c, k) if weighted else svd_factors(delta, k)
        errors.append(weighted_error(delta, factors, c) ** 2)
    removed = torch.tensor(errors[:-1]) - torch.tensor(errors[1:])
    torch.testing.assert_close(removed, spectrum[:5].float(), rtol=1e-4, atol=1e-6 * errors[0])
    assert float(spectrum.sum()) == pytest.approx(errors[0], rel=1e-9)


def _removed(spectra, ranks):
    return sum(float(spectra[n][:r].sum()) for n, r in ranks.items())


def test_equal_costs_give_the_best_allocation():
    g = torch.Generator().manual_seed(1)
    spectra = {n: torch.rand(12, generator=g, dtype=torch.float64).sort(descending=True).values * s
               for n, s in (("a", 1.0), ("b", 3.0), ("c", 0.3))}
    shapes = {n: (16, 16) for n in spectra}
    budget = 12 * 32  # a uniform rank 4
    ranks = allocate_ranks(spectra, shapes, budget, {n: 12 for n in spectra})
    best = max((dict(zip(spectra, r)) for r in itertools.product(range(13), repeat=3) if sum(r) * 32 <= budget),
               key=lambda r: _removed(spectra, r))
    assert _removed(spectra, ranks) == pytest.approx(_removed(spectra, best))
    assert sum(ranks.values()) == 12 and ranks != {"a": 4, "b": 4, "c": 4}


def test_budget_steps_and_caps_are_respected():
    g = torch.Generator().manual_seed(2)
    spectra = {f"m{i}": torch.rand(40, generator=g, dtype=torch.float64).sort(descending=True).values * (i + 1) ** 2
               for i in range(4)}
    shapes = {"m0": (32, 32), "m1": (32, 96), "m2": (96, 32), "m3": (64, 64)}
    budget = sum(8 * sum(s) for s in shapes.values())
    ranks = allocate_ranks(spectra, shapes, budget, {n: 16 for n in spectra}, step=4)
    spent = sum(r * sum(shapes[n]) for n, r in ranks.items())
    assert spent <= budget and all(r % 4 == 0 and r <= 16 for r in ranks.values())
    assert _removed(spectra, ranks) > _removed(spectra, {n: 8 for n in spectra})


def _adapter_params(model) -> int:
    return sum(m.weight.rank * sum(m.weight.shape) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "rank"))


def test_global_budget_end_to_end(tmp_path):
    batches = token_batches(n_batches=2)
    uniform = tiny_llama()
    compress_sequential(uniform, batches, EoRAConfig(rank=8, base=CONFIG.base), progress=False)
    model = tiny_llama()
    calib = compress_sequential(model, batches, CONFIG, progress=False)
    ranks = {n: m.weight.rank for n, m in model.named_modules() if hasattr(getattr(m, "weight", None), "rank")}
    assert ranks == calib.ranks and len(set(ranks.values())) > 1  # the weights carry the ranks the budget chose
    budget = _adapter_params(uniform)
    assert budget - max(sum(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)) \
        <= _adapter_params(model) <= budget
    assert max(ranks.values()) <= 4 * 8

    # the two-step flow installs the same ranks; the statistics file keeps them; PEFT gets a rank_pattern
    fresh = tiny_llama()
    two_step = calibrate(fresh, batches, CONFIG, progress=False)
    assert two_step.ranks == calib.ranks
    two_step.save(tmp_path / "calib.safetensors")
    assert Calibration.load(tmp_path / "calib.safetensors").ranks == calib.ranks
    quantize_(fresh, eora_config(two_step))
    assert {n: m.weight.rank for n, m in fresh.named_modules() if n in ranks} == ranks
    out = export_peft(fresh, tmp_path / "adapter", config=CONFIG, save_base=False)
    pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and all(ranks[n] == r for n, r in pattern.items())


def _v_scaled(scale: float):
    """The same function with every v_proj scaled by ``scale`` and o_proj by its inverse (attention is linear in v)."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(scale)
            layer.self_attn.o_proj.weight.div_(scale)
    return model


def _budgeted_ranks(model, budget: str) -> dict[str, int]:
    config = EoRAConfig(rank=8, base=CONFIG.base, rank_budget=budget)
    return calibrate(model, token_batches(n_batches=2), config, progress=False).ranks


def test_relative_budget_is_scale_free():
    """Scaling v_proj by 8 and o_proj by 1/8 changes nothing the model computes (and, at a power of two, nothing RTN
    rounds): the relative budget gives the same ranks, the absolute one moves ranks to the louder v_proj."""
    before, after = _budgeted_ranks(_v_scaled(1.0), "relative"), _budgeted_ranks(_v_scaled(8.0), "relative")
    assert after == before and len(set(before.values())) > 1
    loud = _budgeted_ranks(_v_scaled(8.0), "global")
    quiet = _budgeted_ranks(_v_scaled(1.0), "global")

    def v_ranks(ranks):
        return sum(r for n, r in ranks.items() if n.endswith("v_proj"))
    assert v_ranks(loud) > v_ranks(quiet)


def test_output_energy_is_the_mean_squared_output():
    torch.manual_seed(0)
    w, x = torch.randn(24, 32, dtype=torch.float64), torch.randn(500, 32, dtype=torch.float64)
    assert output_energy(w, x.T @ x / len(x)) == pytest.approx(float((x @ w.T).square().sum() / len(x)), rel=1e-12)
    assert output_energy(w) == pytest.approx(float(w.square().sum()), rel=1e-12)


def test_global_budget_refuses_streaming():
    with pytest.raises(ValueError, match="two passes"):
        compress_sequential(tiny_llama(), token_batches(), CONFIG, layer_io=FromDisk(), progress=False)


def test_refinement_rounds_only_ever_lower_the_weighted_error():
    """Alternating rounds (compress W - B A, re-solve) are kept only when the residual's own error drops: never worse
    than one solve, and at 2 bits strictly better on LLM-like statistics."""
    from torchao_eora.calibration import ModuleStats, SecondMoment
    from torchao_eora.solver import LowRankFactors
    from torchao_eora.transform import eora_quantize_tensor

    torch.manual_seed(0)
    c = anisotropic_moment(128)
    stats = ModuleStats(SecondMoment(c.float(), 1), lambda: eigen_of(c))
    w = torch.randn(96, 128) * torch.logspace(-1, 0.5, 128)  # channels of different scales, as in real layers

    def error(rounds: int) -> float:
        config = EoRAConfig(rank=16, base=RTNConfig(bits=2, group_size=32), refine_rounds=rounds)
        q = eora_quantize_tensor(w, config, stats)
        return weighted_error(w - q.dequantize_base(torch.float32), LowRankFactors(q.A, q.B), c)

    once, refined = error(0), error(3)
    assert refined < once
    with pytest.raises(ValueError, match="refine_rounds"):
        EoRAConfig(refine_rounds=-1)
