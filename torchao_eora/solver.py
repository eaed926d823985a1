"""Closed-form low-rank compensation of a compression error: the math of EoRA in one place.

For one linear layer with weight ``W`` (out x in), compressed weight ``W_c`` and calibration inputs ``X``
(tokens x in), EoRA finds ``B`` (out x r) and ``A`` (r x in) minimising

    || (dW - B A) X^T ||_F      with  dW = W - W_c,

which only depends on the second moment ``C = X^T X`` (a global scale of ``C`` does not change ``B A``).
Writing ``C = Q Q^T`` turns this into a plain Eckart-Young problem on ``dW Q``: the optimum keeps the top-r
singular triplets of ``dW Q`` (arXiv 2410.21271).

The default form (``"auto"``, :class:`ReducedError`) writes ``dW = F m`` with ``n = min(out, in)`` rows, so the
residual's directions are the top eigenvectors of the ``n x n`` matrix ``m C m^T``: exact up to ``EXACT_SIZE``,
randomized subspace iteration with a tolerance on the objective above (:func:`top_eigenpairs`; docs/solver.md). Two
exact reference forms reach the same optimum:

* ``"eigen"`` (the paper's): eigendecompose ``C = U diag(l) U^T``, ``Q = U diag(sqrt l)`` and truncate the SVD
  of ``dW Q`` to ``U_r S_r V_r^T``. Costs an ``in x in`` eigendecomposition, which every module reading the same
  input (q/k/v, gate/up) can share.
* ``"inverse_free"``: ``U_r`` and ``S_r^2`` are the top eigenpairs of ``dW C dW^T`` (out x out); cheaper when
  ``in > out``.

Both then set ``B = U_r S_r^1/2`` and ``A = S_r^-1/2 U_r^T dW``. On the range of ``C`` this equals the paper's
``A = S_r^1/2 V_r^T Q^-1`` (since ``U_r^T dW Q = S_r V_r^T``) but it never inverts ``Q``: tiny or round-off
negative eigenvalues (dead channels, fewer tokens than in_features) cannot blow up into inf/NaN (the failure of
GPTQModel PR #3014), and no eigenvalue cut-off trades accuracy for safety. ``B A = U_r U_r^T dW`` in both forms.
The split ``S^1/2 | S^1/2`` keeps ``A`` and ``B`` on the same scale, which matters once they are quantized.

Plain SVD of ``dW`` (ZeroQuant-V2's LoRC) is the ``C = I`` special case and the baseline EoRA must beat.

Quantized adapters (:func:`resolve_B`): once ``A`` is rounded to ``A_q``, the best ``B`` for that ``A_q`` is again a
least-squares problem in the same activation-weighted norm, ``B = dW C A_q^T (A_q C A_q^T)^+``, so ``B`` absorbs
``A``'s rounding error before it is quantized itself.
Shrinkage (:func:`shrink`, :func:`choose_shrinkage`): with few calibration tokens ``C`` is a noisy estimate and the
exact optimum for it fits the noise (EoRA then loses to plain SVD). ``C_a = (1 - a) C + a mean(diag C) I`` keeps the
eigenvectors and lifts the small eigenvalues; ``a = 1`` is plain SVD exactly. ``a`` is chosen per module by 2-fold
cross-validation on the calibration windows: fit on one half's moment, score the residual on the other's.
The small factorisations run in fp64 (``dW`` is tiny relative to ``W`` and ``C`` can be badly conditioned); the
reduced form's large products run in the error's own precision (fp32 from the compressors) with fp64 sums.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import torch

__all__ = [
    "Eigen",
    "LowRankFactors",
    "eigen_of",
    "eora_factors",
    "resolve_B",
    "svd_factors",
    "one_cpu_thread",
    "weighted_error",
    "check_rank",
    "SHRINKAGE_GRID",
    "shrink",
    "choose_shrinkage",
    "ReducedError",
    "top_eigenpairs",
    "reduced_factors",
    "error_spectrum",
    "output_energy",
    "mean_eigenvalue",
]

Form = Literal["auto", "randomized", "eigen", "inverse_free"]
FORMS = ("auto", "randomized", "eigen", "inverse_free")

# Singular values below this fraction (times the dimension) of the largest are numerically zero: their
# directions carry no error worth fitting, and dividing by their square root would only amplify round-off.
_REL_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class LowRankFactors:
    """``B @ A`` approximates the compression error; ``A`` is (rank x in), ``B`` is (out x rank), fp32."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class Eigen:
    """Eigendecomposition of a second moment without its null space: ``C ~ U diag(l) U^T`` with ``l > 0``."""

    values: torch.Tensor  # (k,) fp64, positive, descending
    vectors: torch.Tensor  # (in, k) fp64


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    """Reject ranks that give no compression or make no sense, with a message that says what to use."""
    limit = min(out_features, in_features)
    if not isinstance(rank, int) or rank < 1 or rank >= limit:
        raise ValueError(
            f"rank must be an integer with 1 <= rank < min(out_features, in_features) = {limit} for a "
            f"{out_features}x{in_features} layer, got {rank!r}. A rank of {limit} or more stores more than the "
            f"dense error itself; pick a smaller rank (64 is a good start) or skip this layer."
        )


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU LAPACK calls (eigh, Cholesky) on one thread: MKL's threaded factorisations round differently with
    different thread counts (thousands of fp64 entries differ between 1 and 2 threads), and GPTQ's rounding and
    EoRA's factors follow those last bits. One thread makes a checkpoint independent of ``torch.set_num_threads``.
    (The thread count is process-wide: restored afterwards.)"""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with one_cpu_thread(m.device):
        return torch.linalg.eigh(m)


def eigen_of(second_moment: torch.Tensor) -> Eigen:
    """Eigendecompose a (symmetrised) second moment in fp64, dropping zero and round-off negative directions."""
    c = second_moment.to(torch.float64)
    if not torch.isfinite(c).all():
        raise ValueError("second moment has non-finite entries: the calibration activations contained NaN/inf")
    values, vectors = _eigh(0.5 * (c + c.T))  # accumulated sums are symmetric only up to round-off
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > c.shape[0] * _REL_EPS * values[0].clamp_min(0.0)
    if not keep.any():
        raise ValueError("second moment is zero: the calibration activations of this layer are all zero")
    return Eigen(values[keep], vectors[:, keep])


def _truncate(u: torch.Tensor, s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top ``rank`` singular pairs, zeroing numerically-null ones so no division blows up."""
    u, s = u[:, :rank], s[:rank]
    if s.numel() and s[0] > 0:
        s = torch.where(s > max(u.shape[0], 1) * _REL_EPS * s[0], s, torch.zeros_like(s))
    else:
        s = torch.zeros_like(s)
    return u, s


def _pad(factors_a: torch.Tensor, factors_b: torch.Tensor, rank: int) -> LowRankFactors:
    """Zero-pad to exactly ``rank`` when the problem has lower numerical rank (shapes stay predictable)."""
    missing = rank - factors_a.shape[0]
    if missing > 0:
        factors_a = torch.cat([factors_a, factors_a.new_zeros(missing, factors_a.shape[1])])
        factors_b = torch.cat([factors_b, factors_b.new_zeros(factors_b.shape[0], missing)], dim=1)
    return LowRankFactors(A=factors_a.float().contiguous(), B=factors_b.float().contiguous())


def _top_singular(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors and values of ``m`` (fp64) from the eigendecomposition of its smaller
    Gram matrix: several times cheaper than a full SVD, and exact enough in fp64 for the leading pairs."""
    if m.shape[0] <= m.shape[1]:
        values, u = _eigh(m @ m.T)
        values, u = values.flip(0).clamp_min(0.0), u.flip(1)
        return _truncate(u, values.sqrt(), rank)
    values, v = _eigh(m.T @ m)
    values, v = values.flip(0)[:rank].clamp_min(0.0), v.flip(1)[:, :rank]
    s = values.sqrt()
    u = (m @ v) / torch.where(s > 0, s, torch.ones_like(s))  # u_i = m v_i / s_i
    return _truncate(u, s, rank)


def _balanced(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int) -> LowRankFactors:
    """``B = U S^1/2``, ``A = S^-1/2 U^T dW`` (null singular directions get zero rows, not a division by 0)."""
    half = s.sqrt()
    inv_half = torch.where(half > 0, 1.0 / half, torch.zeros_like(half))
    return _pad(inv_half[:, None] * (u.T @ delta), u * half, rank)


Method = Literal["auto", "exact", "randomized"]
# A second moment, or a weighted sum of stored ones ``((w, C), ...)``: the held-out halves of the cross-validation are
# ``half / n_half`` and ``(total - half) / n_rest``, and Gram matrices are linear in the moment, so no in x in
# copy of either half is ever made.
Moment = Union[torch.Tensor, tuple[tuple[float, torch.Tensor], ...]]

# Reduced problems up to this size are eigendecomposed exactly: below it a full eigh costs less than the iterations.
EXACT_SIZE = 1024
# The randomized eigensolver stops once an iteration lowers the objective (the energy its top-r directions leave
# out) by less than this fraction of it; the objective is then within 1e-4 of the exact one (measured on every
# module of SmolLM2 and Gemma-3: benchmarks/solve_scaling.py --real).
RANDOMIZED_TOLERANCE = 1e-5
# choose_shrinkage only ranks the amounts of its grid: a looser tolerance there (the chosen amounts were the exact
# solver's on every module of SmolLM2 and Gemma-3); the final solve uses RANDOMIZED_TOLERANCE.
SHRINKAGE_TOLERANCE = 1e-4
_MAX_ITERATIONS = 40
_GRAM_BLOCK = 2048  # columns of an in x in moment converted to the working precision at a time


class ReducedError:
    """One module's compression error ``dW`` (out x in) written as ``dW = F m`` with ``F`` (out x n) orthonormal
    columns and ``n = min(out, in)``: ``m = dW`` when ``out <= in``, else ``m = R`` of a QR decomposition of ``dW``.

    For every second moment ``C``, ``dW C dW^T = F (m C m^T) F^T``: the top eigenvectors the residual needs come from
    the ``n x n`` Gram matrix :meth:`gram` (lifted back by :meth:`lift`), and no ``in x in`` eigendecomposition is
    ever formed. Gram matrices are cached per moment, so the folds and amounts of :func:`choose_shrinkage` and the
    final solve share them. The large products run in the error's precision, fp32 as compressors give it (fp64 when
    given fp64); the Gram matrices are fp64."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta.detach()
        work = self.delta if self.delta.dtype == torch.float64 else self.delta.float()
        out_features, in_features = work.shape
        self._qr = None
        if out_features <= in_features:
            self.m = work
        else:
            with one_cpu_thread(work.device):  # threaded Householder QR rounds differently per thread count
                a, tau = torch.geqrf(work)
            self._qr = (a, tau)
            self.m = a[:in_features].triu()
        self._grams: dict[int | None, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def size(self) -> int:
        return self.m.shape[0]

    def gram(self, moment: Moment | None) -> torch.Tensor:
        """``m C m^T`` (n x n, fp64, symmetric) for the second moment ``C``; ``m m^T`` for None (the identity)."""
        if isinstance(moment, tuple):
            return sum(weight * self.gram(term) for weight, term in moment)
        key = None if moment is None else id(moment)
        if key not in self._grams:
            m = self.m
            if moment is None:
                gram = (m @ m.T).double()
            else:
                gram = torch.zeros(m.shape[0], m.shape[0], dtype=torch.float64, device=m.device)
                for start in range(0, m.shape[1], _GRAM_BLOCK):  # C in column blocks: no full-size copy of C
                    columns = moment[:, start:start + _GRAM_BLOCK].to(m.dtype)
                    gram += ((m @ columns) @ m[:, start:start + _GRAM_BLOCK].T).double()
            self._grams[key] = (0.5 * (gram + gram.T), moment)  # the moment is held so its id stays unique
        return self._grams[key][0]

    def lift(self, vectors: torch.Tensor) -> torch.Tensor:
        """``F v``: directions of the reduced space as (out x k) fp64 directions of the output space."""
        if self._qr is None:
            return vectors
        a, tau = self._qr
        padded = vectors.new_zeros(a.shape[0], vectors.shape[1], dtype=a.dtype)
        padded[: vectors.shape[0]] = vectors
        with one_cpu_thread(a.device):
            return torch.ormqr(a, tau, padded).double()


def top_eigenpairs(
    gram: torch.Tensor, rank: int, *, method: Method = "auto", start: torch.Tensor | None = None,
    oversample: int | None = None, tolerance: float = RANDOMIZED_TOLERANCE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The top ``rank`` eigenvectors (n x rank) and eigenvalues (descending, >= 0) of a symmetric PSD ``gram``, and a
    basis to start the next, similar problem from (None after an exact solve).

    ``"exact"``: a full eigendecomposition. ``"randomized"``: subspace iteration on ``rank + oversample`` vectors
    (``start``, else a seeded Gaussian block: the same input gives the same bytes), with a Rayleigh-Ritz step per
    iteration, until an iteration lowers the objective ``tr(gram) - sum(top values)`` by less than ``tolerance`` of
    it. ``"auto"``: exact up to ``EXACT_SIZE`` or where the block would span half the space, else randomized."""
    n = gram.shape[0]
    block = min(n, rank + (oversample if oversample is not None else max(16, rank // 2)))
    small = n <= EXACT_SIZE or 2 * block >= n  # a full eigh costs less than the iterations
    if method == "exact" or block >= n or method == "auto" and small:
        values, vectors = _eigh(gram)
        return vectors.flip(1)[:, :rank], values.flip(0)[:rank].clamp_min(0.0), None
    work = gram.float()  # the products in fp32 (2x faster here); the small Rayleigh-Ritz problem in fp64
    if start is None:
        generator = torch.Generator(device=gram.device).manual_seed(0)
        start = torch.randn(n, block, generator=generator, device=gram.device)
    basis = _orthonormal(start.float())
    total, previous = float(gram.trace()), float("inf")
    for _ in range(_MAX_ITERATIONS):
        image = work @ basis
        values, vectors = _eigh((basis.T @ image).double())  # Rayleigh-Ritz in the current subspace (ascending)
        objective = max(total - float(values[-rank:].clamp_min(0.0).sum()), 0.0)
        if previous - objective <= tolerance * objective + _REL_EPS * total:
            break
        previous, basis = objective, _orthonormal(image)
    vectors, values = vectors.flip(1)[:, :rank], values.flip(0)[:rank].clamp_min(0.0)
    return basis.double() @ vectors, values, basis


def mean_eigenvalue(moment: Moment) -> float:
    """``mean(diag C)``: the level :func:`shrink` pulls the eigenvalues toward."""
    if isinstance(moment, tuple):
        return sum(weight * mean_eigenvalue(term) for weight, term in moment)
    return float(moment.diagonal().double().mean())


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    with one_cpu_thread(block.device):
        return torch.linalg.qr(block).Q


def reduced_factors(
    problem: ReducedError, second_moment: torch.Tensor | None, rank: int, *, shrinkage: float = 0.0,
    method: Method = "auto",
) -> LowRankFactors:
    """EoRA's residual through the reduced frame (:class:`ReducedError`): the top-``rank`` eigenvectors of
    ``m C_a m^T``, ``C_a = (1 - a) C + a mean(diag C) I`` with ``a = shrinkage`` (``C = I`` for None: plain SVD),
    lifted to the output space, balanced as in the other forms."""
    gram = problem.gram(second_moment)
    if shrinkage and second_moment is not None:
        gram = (1.0 - shrinkage) * gram + (shrinkage * mean_eigenvalue(second_moment)) * problem.gram(None)
    vectors, values, _ = top_eigenpairs(gram, rank, method=method)
    d = problem.delta.to(torch.float64)
    return _balanced(d, *_truncate(problem.lift(vectors), values.sqrt(), rank), rank)


def svd_factors(delta: torch.Tensor, rank: int) -> LowRankFactors:
    """Plain truncated SVD of the compression error (ZeroQuant-V2 LoRC): the data-free baseline, ``C = I``."""
    check_rank(rank, *delta.shape)
    return reduced_factors(ReducedError(delta), None, rank)


def eora_factors(
    delta: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    rank: int = 64,
    *,
    form: Form = "auto",
    eigen: Eigen | None = None,
    shrinkage: float = 0.0,
    problem: ReducedError | None = None,
) -> LowRankFactors:
    """EoRA: the rank-``rank`` ``B @ A`` minimising ``||(delta - B A) X^T||_F`` given ``C = X^T X``.

    Args:
        delta: compression error ``W - W_c`` (out x in), ideally fp32 or fp64.
        second_moment: ``C`` (in x in). May be omitted when ``eigen`` is given.
        rank: target rank, ``1 <= rank < min(out, in)``.
        form: ``"auto"`` (default): the reduced frame (:class:`ReducedError`), whose cost grows with
            ``min(out, in)`` and the rank rather than with ``in^3``, with an exact eigensolver for small problems and
            a randomized one for large ones; ``"randomized"``: the same with the randomized eigensolver wherever it
            applies (for checks); ``"eigen"`` (the paper's, through ``C``'s eigendecomposition) and
            ``"inverse_free"`` (``dW C dW^T``, out x out): exact references.
        eigen: a precomputed :func:`eigen_of` of ``C`` (the eigen form; shared by modules that read one input).
        shrinkage: solve for ``C_a = (1 - a) C + a mean(diag C) I`` instead (:func:`shrink`).
        problem: ``delta``'s :class:`ReducedError`, when the caller already built it (its Gram matrices are reused).
    """
    out_features, in_features = delta.shape
    check_rank(rank, out_features, in_features)
    if second_moment is None and eigen is None:
        raise ValueError("eora_factors needs the calibration second moment (or its eigendecomposition)")
    if form in ("auto", "randomized"):
        if second_moment is None:
            second_moment = (eigen.vectors * eigen.values) @ eigen.vectors.T
        method = "randomized" if form == "randomized" else "auto"
        return reduced_factors(problem or ReducedError(delta), second_moment, rank, shrinkage=shrinkage, method=method)
    if shrinkage:
        second_moment, eigen = shrink(second_moment, shrinkage), None
    d = delta.to(torch.float64)

    if form == "eigen":
        eig = eigen if eigen is not None else eigen_of(second_moment)
        q = eig.vectors * eig.values.sqrt()  # C = Q Q^T
        return _balanced(d, *_top_singular(d @ q, rank), rank)

    if form == "inverse_free":
        if second_moment is None:
            c = (eigen.vectors * eigen.values) @ eigen.vectors.T
        else:
            c = second_moment.to(torch.float64)  # not symmetrised: m is, below, which is the same and needs no copy
        m = d @ c @ d.T
        values, vectors = _eigh(0.5 * (m + m.T))
        values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
        return _balanced(d, *_truncate(vectors, values.sqrt(), rank), rank)  # eigenvalues of dW C dW^T are s^2

    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def error_spectrum(delta: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """The squared singular values of ``dW Q`` (``C = Q Q^T``; of ``dW`` itself without a moment, the plain
    SVD's norm), descending, fp64: the eigenvalues of the reduced Gram matrix (:class:`ReducedError`). Entry ``k`` is
    exactly what the ``k+1``-th rank removes from the squared error ``||(dW - B A) X^T||_F^2`` of the best rank-``k``
    residual (Eckart-Young): the rank budget spends ranks by it."""
    gram = ReducedError(delta).gram(second_moment)
    with one_cpu_thread(gram.device):
        values = torch.linalg.eigvalsh(gram)
    return values.flip(0).clamp_min(0.0)


def output_energy(weight: torch.Tensor, second_moment: torch.Tensor | None = None) -> float:
    """``tr(W C W^T)``, the mean squared norm of the layer's output ``W x`` (``||W||_F^2`` without a moment): the
    scale a relative rank budget measures a module's error spectrum in."""
    w = weight.detach().to(torch.float64)
    if second_moment is None:
        return float(w.square().sum())
    return float((w @ second_moment.to(w.device, torch.float64) * w).sum())


# Shrinkage amounts tried by choose_shrinkage: 0 (plain EoRA) to 1 (plain SVD), roughly geometric in between.
SHRINKAGE_GRID = (0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 1.0)


def shrink(second_moment: torch.Tensor, amount: float) -> torch.Tensor:
    """``(1 - amount) C + amount * mean(diag C) * I`` in fp64: the same eigenvectors, eigenvalues pulled toward their
    mean. ``amount = 0`` is ``C`` (EoRA), ``amount = 1`` a multiple of ``I`` (plain SVD: a scale does not matter)."""
    c = second_moment.to(torch.float64)
    if amount == 0:
        return c
    out = (1.0 - amount) * c
    out.diagonal().add_(amount * mean_eigenvalue(c))
    return out


def choose_shrinkage(
    folds: list[tuple[torch.Tensor | ReducedError, Moment, Moment]],
    rank: int,
    grid: tuple[float, ...] = SHRINKAGE_GRID,
    *,
    method: Method = "auto",
) -> float:
    """The shrinkage amount of ``grid`` whose rank-``rank`` EoRA residual generalises best across cross-validation
    ``folds``: ``(delta, fit, score)``, the error to fit (a tensor or its :class:`ReducedError`) and the mean second
    moments (:data:`Moment`) of the fitting and the held-out calibration windows (two folds: even- and odd-numbered
    windows, each way round).

    In the reduced frame of each error the shrunk problem is ``H_a = (1 - a) H_fit + a mean(diag C_fit) H_I``
    (``ReducedError.gram``): every amount of the grid reuses the same two ``n x n`` matrices, and folds that share an
    error (data-free compressors) share its frame and Gram matrices. The top-``rank`` eigenvectors ``V`` of ``H_a``
    span the residual; the held-out moment scores it by the exact error ``tr(H_score) - tr(V^T H_score V)``. Each
    amount starts its eigensolver from the previous amount's subspace, at ``SHRINKAGE_TOLERANCE``; amount 1 (plain
    SVD: ``H_I`` alone) is solved once per error. Ties go to the smaller amount."""
    errors = torch.zeros(len(grid), dtype=torch.float64)
    problems: dict[int, ReducedError] = {}
    plain: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # amount 1 is plain SVD: the same for every fold
    for delta, fit, score in folds:
        problem = delta if isinstance(delta, ReducedError) else problems.setdefault(id(delta), ReducedError(delta))
        fit_gram, identity, held_out = problem.gram(fit), problem.gram(None), problem.gram(score)
        mean = mean_eigenvalue(fit)
        start = None
        for i, amount in enumerate(grid):
            if amount == 1.0 and id(problem) in plain:
                vectors, values = plain[id(problem)]
            else:
                vectors, values, start = top_eigenpairs(
                    (1.0 - amount) * fit_gram + (amount * mean) * identity, rank, method=method, start=start,
                    tolerance=SHRINKAGE_TOLERANCE)
                if amount == 1.0:
                    plain[id(problem)] = vectors, values
            vectors = vectors * (values > 0)  # numerically null directions are not part of the residual
            errors[i] += held_out.trace() - torch.einsum("nr,nm,mr->", vectors, held_out, vectors)
    return float(grid[int(torch.argmin(errors))])  # argmin returns the first of equal minima: the smaller amount


def normal_equations_B(
    delta: torch.Tensor, A: torch.Tensor, second_moment: torch.Tensor | None = None, *, shrinkage: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P = delta C A^T`` (out x r) and ``G = A C A^T`` (r x r) in fp64, ``C`` shrunk by ``shrinkage`` (the plain
    norm, ``C = I``, when ``second_moment`` is None): ``B = P G^+`` is :func:`resolve_B`'s optimum, and for any
    ``B`` the squared error is ``||delta X^T||^2 - 2 <B, P> + <B G, B>``, so candidates for this ``A`` compare
    without another in x in product."""
    d, a = delta.to(torch.float64), A.to(torch.float64)
    ca = a.T if second_moment is None else _shrunk_product(second_moment, a.T, shrinkage)  # C A^T (in x r)
    return d @ ca, a @ ca


def psd_pinv(gram: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (fp64): eigenvalues below ``n * eps * max`` dropped, so zero rows
    of a factor (rank-deficient errors, dead channels) give zero columns instead of a division by zero."""
    values, vectors = _eigh(0.5 * (gram + gram.T))
    limit = max(gram.shape[0], 1) * _REL_EPS * values.abs().max().clamp_min(0.0) if values.numel() else 0.0
    inv = torch.where(values > limit, 1.0 / values, torch.zeros_like(values))
    return (vectors * inv) @ vectors.T


def resolve_B(
    delta: torch.Tensor, A: torch.Tensor, second_moment: torch.Tensor | None = None, *, shrinkage: float = 0.0
) -> torch.Tensor:
    """The ``B`` (out x r) minimising ``||(delta - B A) X^T||_F`` for a fixed ``A`` (r x in), ``C = X^T X`` (shrunk
    by ``shrinkage`` as in :func:`shrink`, without forming the shrunk in x in matrix).

    ``B = delta C A^T (A C A^T)^+`` (``C = I`` when ``second_moment`` is None: the plain Frobenius norm). Used after
    ``A`` is quantized, so that ``B`` compensates ``A``'s rounding error. The pseudo-inverse (:func:`psd_pinv`)
    keeps zero rows of ``A`` from dividing by zero: their columns of ``B`` come out zero. Returns fp32.
    """
    p, gram = normal_equations_B(delta, A, second_moment, shrinkage=shrinkage)
    return (p @ psd_pinv(gram)).float().contiguous()


def weighted_error(
    delta: torch.Tensor, factors: LowRankFactors | None, second_moment: torch.Tensor, *, shrinkage: float = 0.0
) -> float:
    """``||(delta - B A) X^T||_F`` computed from ``C = X^T X`` alone (shrunk by ``shrinkage``):
    ``sqrt(tr(E C E^T))``."""
    e = delta.to(torch.float64)
    if factors is not None:
        e = e - factors.B.double() @ factors.A.double()
    return float((_shrunk_product(second_moment, e.T, shrinkage) * e.T).sum().clamp_min(0).sqrt())


def _shrunk_product(second_moment: torch.Tensor, x: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``C_a x`` in fp64 for ``C_a = (1 - a) C + a mean(diag C) I`` (:func:`shrink`), C symmetric."""
    product = second_moment.to(torch.float64) @ x
    if not shrinkage:
        return product
    return (1.0 - shrinkage) * product + (shrinkage * mean_eigenvalue(second_moment)) * x
