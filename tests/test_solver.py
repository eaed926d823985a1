"""The closed form reaches the optimum of the activation-weighted objective, never NaN, and beats plain SVD."""

import pytest
import torch

from torchao_eora.solver import check_rank, eigen_of, eora_factors, svd_factors, weighted_error


def _problem(out_features=24, in_features=40, tokens=200, seed=0, anisotropy=True):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=g, dtype=torch.float64)
    if anisotropy:  # real activations have a few dominant channels: that is where EoRA differs from SVD
        x = x * torch.logspace(1, -2, in_features, dtype=torch.float64)
    return delta, x, x.T @ x


def _optimal_error(delta, c, rank):
    """Brute force via an independent square root of C (Cholesky, not the eigenbasis): Eckart-Young tail."""
    l = torch.linalg.cholesky(c + 1e-12 * torch.eye(c.shape[0], dtype=c.dtype))
    s = torch.linalg.svdvals(delta @ l)
    return float(s[rank:].pow(2).sum().sqrt())


@pytest.mark.parametrize("form", ["eigen", "inverse_free"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_eora_reaches_optimum(form, shape, rank):
    delta, x, c = _problem(*shape)
    f = eora_factors(delta, c, rank, form=form)
    assert f.A.shape == (rank, shape[1]) and f.B.shape == (shape[0], rank)
    err = weighted_error(delta, f, c)
    # the direct norm on X agrees with the C-only formula
    assert err == pytest.approx(float(torch.linalg.norm((delta - f.B.double() @ f.A.double()) @ x.T)), rel=1e-5)
    assert err == pytest.approx(_optimal_error(delta, c, rank), rel=1e-5)


def test_eora_is_a_minimum_against_random_perturbations():
    delta, _, c = _problem()
    f = eora_factors(delta, c, 6)
    best = weighted_error(delta, f, c)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        a = f.A + 1e-2 * torch.randn(f.A.shape, generator=g)
        b = f.B + 1e-2 * torch.randn(f.B.shape, generator=g)
        assert weighted_error(delta, type(f)(a, b), c) > best


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_eora_beats_plain_svd_in_weighted_norm(rank):
    delta, _, c = _problem()
    eora = weighted_error(delta, eora_factors(delta, c, rank), c)
    svd = weighted_error(delta, svd_factors(delta, rank), c)
    assert eora < 0.9 * svd


def test_svd_is_eora_with_identity_moment():
    delta, _, _ = _problem()
    eye = torch.eye(delta.shape[1], dtype=torch.float64)
    a, b = svd_factors(delta, 7), eora_factors(delta, eye, 7)
    torch.testing.assert_close(a.B @ a.A, b.B @ b.A, rtol=1e-5, atol=1e-5)


def test_two_forms_agree_and_split_singular_values_evenly():
    delta, _, c = _problem()
    e, i = eora_factors(delta, c, 8, form="eigen"), eora_factors(delta, c, 8, form="inverse_free")
    torch.testing.assert_close(e.B @ e.A, i.B @ i.A, rtol=1e-4, atol=1e-5)
    # balanced split: B^T B and A C A^T / ... share the same scale, so ||B_k|| = ||A_k||_C^{1/2}-style symmetry:
    # for the paper's split B = U S^1/2, column norms of B are S^1/2.
    s = torch.linalg.svdvals(delta @ torch.linalg.cholesky(c))[:8]
    torch.testing.assert_close(e.B.double().norm(dim=0), s.sqrt(), rtol=1e-4, atol=1e-6)


def test_shared_eigendecomposition_gives_same_factors():
    delta, _, c = _problem(40, 24)
    eig = eigen_of(c)
    a = eora_factors(delta, rank=5, form="eigen", eigen=eig)
    b = eora_factors(delta, c, 5, form="eigen")
    torch.testing.assert_close(a.B @ a.A, b.B @ b.A)


@pytest.mark.parametrize("form", ["eigen", "inverse_free"])
def test_degenerate_statistics_never_give_nan(form):
    delta, x, _ = _problem(tokens=10)  # fewer tokens than in_features: C has rank 10 of 40
    x[:, :5] = 0  # dead input channels
    c = x.T @ x
    c = c - 1e-9 * torch.eye(c.shape[0], dtype=c.dtype)  # round-off pushes eigenvalues negative
    f = eora_factors(delta, c, 16, form=form)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    # rank 16 > numerical rank 10: the optimum leaves zero weighted error
    assert weighted_error(delta, f, x.T @ x) < 1e-6 * weighted_error(delta, None, x.T @ x)


def test_zero_error_gives_zero_factors():
    delta = torch.zeros(8, 12, dtype=torch.float64)
    c = torch.eye(12, dtype=torch.float64)
    for f in (eora_factors(delta, c, 4), eora_factors(delta, c, 4, form="inverse_free"), svd_factors(delta, 4)):
        assert torch.count_nonzero(f.A) == 0 and torch.count_nonzero(f.B) == 0


@pytest.mark.parametrize("rank", [0, -1, 8, 9, 2.5])
def test_bad_rank_is_rejected_with_advice(rank):
    with pytest.raises(ValueError, match="rank must be an integer"):
        check_rank(rank, 8, 16)
    with pytest.raises(ValueError, match="rank"):
        svd_factors(torch.randn(8, 16), rank)


def test_nan_statistics_and_zero_statistics_raise():
    with pytest.raises(ValueError, match="non-finite"):
        eigen_of(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="all zero"):
        eigen_of(torch.zeros(4, 4))


def _quantization_problem(out_features, in_features, tokens=3000, seed=0):
    """A 3-bit RTN error and an anisotropic moment (a few dominant channels), big enough for the iterative solver."""
    from torchao_eora import RTNConfig

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    scales = torch.exp(torch.randn(in_features, generator=g))
    x = torch.randn(tokens, in_features, generator=g) * scales
    delta = w - RTNConfig(bits=3, group_size=32).compress(w).dequantize(torch.float32)
    return delta, (x.T @ x).double() / tokens


@pytest.mark.parametrize("shape", [(160, 384), (384, 160)])  # reduced by rows (dW itself) and by QR (out > in)
@pytest.mark.parametrize("shrinkage", [0.0, 0.1])
def test_randomized_solver_is_within_its_tolerance_of_the_exact_optimum(shape, shrinkage):
    from torchao_eora.solver import shrink

    delta, c = _quantization_problem(*shape)
    exact = eora_factors(delta, c, 24, form="inverse_free", shrinkage=shrinkage)
    fast = eora_factors(delta, c, 24, form="randomized", shrinkage=shrinkage)
    norm = shrink(c, shrinkage)
    best, got = weighted_error(delta, exact, norm) ** 2, weighted_error(delta, fast, norm) ** 2
    assert best <= got <= best * (1 + 1e-4)
    assert got < 0.999 * weighted_error(delta, svd_factors(delta, 24), norm) ** 2 or shrinkage  # still EoRA


def test_reduced_frame_reaches_the_paper_form_exactly():
    """auto with an exact eigensolver in the reduced frame is the same optimum as the paper's eigen form."""
    for shape in [(24, 40), (40, 24)]:
        delta, _, c = _problem(*shape)
        a, b = eora_factors(delta, c, 6), eora_factors(delta, c, 6, form="eigen")
        torch.testing.assert_close(a.B.double() @ a.A.double(), b.B.double() @ b.A.double(), rtol=1e-5, atol=1e-6)


def test_randomized_solver_gives_the_same_bytes_for_any_thread_count():
    delta, c = _quantization_problem(256, 512)
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, old):
            torch.set_num_threads(threads)
            runs.append(eora_factors(delta, c, 16, form="randomized"))
    finally:
        torch.set_num_threads(old)
    for f in runs[1:]:
        assert torch.equal(f.A, runs[0].A) and torch.equal(f.B, runs[0].B)


def test_randomized_shrinkage_choice_matches_the_exact_one():
    from torchao_eora.solver import choose_shrinkage

    delta, _ = _quantization_problem(192, 384)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 384, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 384, dtype=torch.float64)
    halves = ((x[:300].T @ x[:300]) / 300, (x[300:].T @ x[300:]) / 300)
    folds = [(delta, halves[0], halves[1]), (delta, halves[1], halves[0])]
    assert choose_shrinkage(folds, 16, method="randomized") == choose_shrinkage(folds, 16, method="exact")
