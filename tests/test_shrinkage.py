"""EoRA's shrinkage: 1 is plain SVD, the cross-validated amount is the held-out optimum of its grid, the split
statistics are exactly the even windows' sums, and they survive a save/load."""

import pytest
import torch

from helpers import anisotropic_moment, tiny_llama, token_batches
from torchao_eora import Calibration, EoRAConfig, RTNConfig, calibrate
from torchao_eora.solver import SHRINKAGE_GRID, choose_shrinkage, eora_factors, shrink, svd_factors, weighted_error
from torchao_eora.transform import eora_quantize_tensor


def _error(out=96, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 0, n, dtype=torch.float64)


def _moment_of(x):
    return (x.T @ x) / x.shape[0]


def test_full_shrinkage_is_plain_svd_and_none_is_eora():
    delta, c = _error(), anisotropic_moment(128)
    svd, eora = svd_factors(delta, 16), eora_factors(delta, c, 16)
    at_one, at_zero = eora_factors(delta, shrink(c, 1.0), 16), eora_factors(delta, shrink(c, 0.0), 16)
    torch.testing.assert_close(at_one.B @ at_one.A, svd.B @ svd.A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at_zero.B @ at_zero.A, eora.B @ eora.A)
    # in between, the eigenvectors stay and the spread of the eigenvalues shrinks
    values = torch.linalg.eigvalsh(c)
    half = torch.linalg.eigvalsh(shrink(c, 0.5))
    torch.testing.assert_close(half, 0.5 * values + 0.5 * values.mean())


def _folds(delta, halves):
    """Both ways round, one error: the folds of a data-free compressor."""
    return [(delta, halves[0], halves[1]), (delta, halves[1], halves[0])]


def _held_out_error(delta, fit, score, rank, amount):
    f = eora_factors(delta, shrink(fit, amount), rank)
    return weighted_error(delta, f, score) ** 2


@pytest.mark.parametrize("tokens", [40, 4000])
def test_chosen_amount_is_the_cross_validated_optimum_of_the_grid(tokens):
    """The closed-form held-out error inside choose_shrinkage must rank the grid as the real factors do."""
    n, rank = 64, 8
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(-1.5, 0.5, n, dtype=torch.float64)
    x = torch.randn(2 * tokens, n, generator=g, dtype=torch.float64) @ mix
    halves = (_moment_of(x[:tokens]), _moment_of(x[tokens:]))
    delta = _error(48, n)
    chosen = choose_shrinkage(_folds(delta, halves), rank)
    errors = {a: _held_out_error(delta, halves[0], halves[1], rank, a)
              + _held_out_error(delta, halves[1], halves[0], rank, a) for a in SHRINKAGE_GRID}
    assert errors[chosen] <= min(errors.values()) * (1 + 1e-6)
    if tokens == 40:  # fewer tokens than dimensions: the exact fit to one half does not carry over to the other
        assert chosen > 0
    else:  # plenty of tokens: the sample moment is right, EoRA needs no help
        assert chosen < 0.1 and errors[0.0] < errors[1.0]


def test_unrelated_halves_choose_plain_svd():
    """When one half says nothing about the other, the data-free SVD is what generalises."""
    n = 64
    g = torch.Generator().manual_seed(2)
    first = torch.zeros(n, n, dtype=torch.float64)
    first[:4, :4] = torch.eye(4, dtype=torch.float64) * 100
    second = torch.zeros(n, n, dtype=torch.float64)
    second[-4:, -4:] = torch.eye(4, dtype=torch.float64) * 100
    second += 1e-3 * torch.eye(n, dtype=torch.float64)
    first += 1e-3 * torch.eye(n, dtype=torch.float64)
    delta = torch.randn(32, n, generator=g, dtype=torch.float64)
    assert choose_shrinkage(_folds(delta, (first, second)), 4) == 1.0


def _window_inputs(model, batches):
    """Each linear's input over real tokens, per window, captured the naive way."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {name: [x[i][b["attention_mask"][i].bool()].double() for x, b in zip(xs, batches) for i in range(len(x))]
            for name, xs in seen.items()}


def test_split_statistics_are_the_even_windows_and_survive_save_load(tmp_path):
    model = tiny_llama()
    batches = token_batches(n_batches=2, batch=3, pad_first=5)  # odd batches: the parity runs across them
    calib = calibrate(model, batches, mode="one-shot", progress=False)
    for name, windows in _window_inputs(model, batches).items():
        m = calib.second_moment(name)
        even = torch.cat(windows[0::2])
        odd = torch.cat(windows[1::2])
        assert m.n_half == even.shape[0] and m.n_tokens == even.shape[0] + odd.shape[0]
        torch.testing.assert_close(m.half.double(), even.T @ even, rtol=1e-5, atol=1e-3)
        first, second = m.halves()
        torch.testing.assert_close(first, even.T @ even / even.shape[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, odd.T @ odd / odd.shape[0], rtol=1e-4, atol=1e-5)
    calib.save(tmp_path / "c.safetensors")
    loaded = Calibration.load(tmp_path / "c.safetensors")
    for group, m in calib.groups.items():  # v_proj's attention-weighted moments are not split: None both sides
        half = loaded.groups[group].half
        assert (half is None) == (m.half is None) and loaded.groups[group].n_half == m.n_half
        assert half is None or torch.equal(half, m.half)
    assert any(m.half is None for m in calib.groups.values()) and any(m.half is not None for m in calib.groups.values())


def test_sequential_splits_only_for_cross_validated_shrinkage():
    model = tiny_llama()
    batches = token_batches()
    auto = calibrate(model, batches, EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32)), progress=False)
    fixed = calibrate(model, batches, EoRAConfig(rank=8, base=RTNConfig(bits=3, group_size=32), shrinkage=0.1),
                      progress=False)
    assert all(m.halves() is not None for m in auto.groups.values())
    assert all(m.half is None for m in fixed.groups.values())
    one = calibrate(model, batches[:1], mode="one-shot", progress=False)
    one_window = {k: v[:1] for k, v in batches[0].items()}
    single = calibrate(model, [one_window], mode="one-shot", progress=False)
    plain = [m for g, m in one.groups.items() if g not in one.value_group_of.values()]  # v_proj's attention-
    assert plain and all(m.halves() is not None for m in plain)  # weighted moments are not split
    assert all(m.halves() is None for m in single.groups.values())  # nothing to cross-validate: no shrinkage


def test_quantize_uses_the_configured_amount():
    """shrinkage=1 gives the SVD residual; 'auto' without split statistics is plain EoRA."""
    from torchao_eora.calibration import ModuleStats, SecondMoment
    from torchao_eora.solver import eigen_of

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    c = anisotropic_moment(128)
    stats = ModuleStats(SecondMoment(c, 1), lambda: eigen_of(c))
    base = RTNConfig(bits=3, group_size=32)

    def residual(config):
        q = eora_quantize_tensor(w, config, stats)
        return q.dequantize(torch.float32) - q.dequantize_base(torch.float32)

    svd = residual(EoRAConfig(rank=8, base=base, compensation="svd"))
    torch.testing.assert_close(residual(EoRAConfig(rank=8, base=base, shrinkage=1.0)), svd, rtol=1e-4, atol=1e-5)
    plain = residual(EoRAConfig(rank=8, base=base, shrinkage=0.0))
    torch.testing.assert_close(residual(EoRAConfig(rank=8, base=base)), plain)
    assert not torch.allclose(plain, svd, atol=1e-3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "yes", True, None])
def test_bad_shrinkage_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="shrinkage must be 'auto' or a number in"):
        EoRAConfig(shrinkage=bad)


def test_calibrated_compressors_are_cross_validated_on_a_compression_of_the_fitting_half():
    """GPTQ saw both halves: each fold's error must come from compressing on its fitting half alone (else the
    scoring half is not held out); RTN's error is data-free and shared by both folds."""
    from torchao_eora import GPTQConfig
    from torchao_eora.calibration import ModuleStats, SecondMoment
    from torchao_eora.solver import eigen_of
    from torchao_eora.transform import _cross_validation_folds

    g = torch.Generator().manual_seed(4)
    n = 64
    x = torch.randn(400, n, generator=g) @ torch.randn(n, n, generator=g)
    moment = SecondMoment(x.T @ x, 400)
    moment.half, moment.n_half = x[:200].T @ x[:200], 200
    stats = ModuleStats(moment, lambda: eigen_of(moment.mean()))
    w = torch.randn(32, n, generator=g)
    first, second = moment.halves()
    gptq = EoRAConfig(rank=4, base=GPTQConfig(bits=3, group_size=32))
    delta = w - gptq.base.compress(w, moment.mean()).dequantize(torch.float32)
    folds = _cross_validation_folds(w, w, delta, gptq, 4, stats, attention=False)
    for (error, fit, score), (expect_fit, expect_score) in zip(folds, [(first, second), (second, first)]):
        assert torch.equal(fit, expect_fit) and torch.equal(score, expect_score)
        torch.testing.assert_close(error, w - gptq.base.compress(w, fit).dequantize(torch.float32))
        assert not torch.allclose(error, delta)
    rtn = EoRAConfig(rank=4, base=RTNConfig(bits=3, group_size=32))
    assert all(error is delta for error, _, _ in _cross_validation_folds(w, w, delta, rtn, 4, stats, attention=False))
    fixed = EoRAConfig(rank=4, base=rtn.base, shrinkage=0.1)
    assert _cross_validation_folds(w, w, delta, fixed, 4, stats, False) is None


@pytest.mark.parametrize("normalized", [False, True])
def test_half_terms_are_the_halves_without_copies(normalized):
    """The folds of data-free compressors read each half as a weighted sum of the stored sums: the same Gram
    matrices (and the same chosen amount) as the materialised halves."""
    from torchao_eora.calibration import SecondMoment
    from torchao_eora.solver import ReducedError, mean_eigenvalue

    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 48, generator=g, dtype=torch.float64) * torch.logspace(0.5, -1, 48, dtype=torch.float64)
    moment = SecondMoment(x.T @ x, 300, half=(x[:120].T @ x[:120]).float(), n_half=120)
    if normalized:
        moment.normalize_()
    problem = ReducedError(_error(24, 48))
    for terms, half in zip(moment.half_terms(), moment.halves()):
        torch.testing.assert_close(problem.gram(terms), problem.gram(half), rtol=1e-5, atol=1e-8)
        assert mean_eigenvalue(terms) == pytest.approx(float(half.diagonal().mean()), rel=1e-6)
    terms, halves = moment.half_terms(), moment.halves()
    as_terms = choose_shrinkage([(problem, terms[0], terms[1]), (problem, terms[1], terms[0])], 4)
    as_halves = choose_shrinkage([(problem.delta, halves[0], halves[1]), (problem.delta, halves[1], halves[0])], 4)
    assert as_terms == as_halves
