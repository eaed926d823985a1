"""Preserve, then quantize: ranks that hold the top of the weight are kept out of the compressor."""

from __future__ import annotations

import pytest
import torch

from helpers import anisotropic_moment, tiny_llama, token_batches
from torchao_eora import EoRAConfig, RTNConfig, compress_sequential, weighted_error
from torchao_eora.calibration import ModuleStats, SecondMoment
from torchao_eora.preserve import preserve_candidates, preserved_factors
from torchao_eora.solver import LowRankFactors, eigen_of, error_spectrum
from torchao_eora.transform import eora_quantize_tensor

BASE = RTNConfig(bits=2, group_size=32)


def _stats(c: torch.Tensor) -> ModuleStats:
    return ModuleStats(SecondMoment(c.float(), 1), lambda: eigen_of(c))


def _spiky_weight(seed: int = 0) -> torch.Tensor:
    """A few large directions over small noise: the large ones set every quantization group's range."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(96, 3, generator=g), torch.randn(3, 128, generator=g)
    return u @ v + 0.05 * torch.randn(96, 128, generator=g)


def test_preserved_part_is_the_best_rank_k_of_the_weight_and_its_prefixes_too():
    torch.manual_seed(0)
    c = anisotropic_moment(128)
    w = torch.randn(96, 128)
    spectrum = error_spectrum(w, c)  # what each rank of the best approximation of W removes
    top = preserved_factors(w, c, 12)
    for k in (4, 12):  # the first k ranks of the rank-12 part are the best rank-k part
        part = LowRankFactors(top.A[:k], top.B[:, :k])
        assert weighted_error(w, part, c) ** 2 == pytest.approx(float(spectrum[k:].sum()), rel=1e-6)


def _error(w: torch.Tensor, c: torch.Tensor, preserve) -> float:
    config = EoRAConfig(rank=16, base=BASE, preserve=preserve, shrinkage=0.0)
    q = eora_quantize_tensor(w, config, _stats(c))
    assert q.rank == 16
    return weighted_error(w - q.dequantize_base(torch.float32), LowRankFactors(q.A, q.B), c)


def test_preserving_the_top_lowers_the_error_where_a_few_directions_dominate():
    c = anisotropic_moment(128)
    w = _spiky_weight()
    plain, fixed, auto = _error(w, c, 0), _error(w, c, 4), _error(w, c, "auto")
    assert fixed < 0.8 * plain and auto <= fixed * 1.0001  # auto tries 0, 4 and 8: never worse than 4 here


def test_auto_never_loses_to_plain_eora_in_sample():
    """k = 0 is among auto's candidates and scored by the residual's own (unshrunk) error, as the final solve is."""
    torch.manual_seed(1)
    c = anisotropic_moment(128, seed=1)
    w = torch.randn(96, 128)  # no dominant directions: preserving has little to gain
    assert _error(w, c, "auto") <= _error(w, c, 0) * (1 + 1e-6)


def test_the_compressor_sees_the_weight_without_its_top():
    c = anisotropic_moment(128)
    w = _spiky_weight()
    q = eora_quantize_tensor(w, EoRAConfig(rank=16, base=BASE, preserve=4), _stats(c))
    top = preserved_factors(w, c.float(), 4)
    expected = BASE.compress(w - top.B @ top.A, None).dequantize(torch.float32)
    torch.testing.assert_close(q.dequantize_base(torch.float32), expected)


def test_candidates_respect_the_adapter_groups():
    assert preserve_candidates("auto", 192, 32) == [0, 32, 96]
    assert preserve_candidates("auto", 16, 1) == [0, 4, 8]
    assert preserve_candidates(64, 192, 32) == [64]


@pytest.mark.parametrize("kwargs, match", [
    (dict(preserve=-1), "preserve must be"),
    (dict(preserve=16), "preserve must be"),
    (dict(preserve="half"), "preserve must be"),
    (dict(preserve=4, adapter_bits=4, adapter_group_size=8), "multiple of adapter_group_size"),
    (dict(preserve=4, compensation="none"), "needs compensation"),
])
def test_bad_preserve_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EoRAConfig(rank=16, **kwargs)


def test_sequential_pass_with_int4_adapters():
    model = tiny_llama()
    config = EoRAConfig(rank=16, base=BASE, preserve="auto", adapter_bits=4, adapter_group_size=4)
    compress_sequential(model, token_batches(), config, progress=False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "rank")]
    assert linears and all(m.weight.rank == 16 for m in linears)
    logits = model(token_batches()[0]["input_ids"]).logits
    assert torch.isfinite(logits).all()
