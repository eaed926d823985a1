"""Closed-form low-rank compensation of a compression error: the math of EoRA in one place.

For one linear layer with weight ``W`` (out x in), compressed weight ``W_c`` and calibration inputs ``X``
(tokens x in), EoRA finds ``B`` (out x r) and ``A`` (r x in) minimising

    || (dW - B A) X^T ||_F      with  dW = W - W_c,

which only depends on the second moment ``C = X^T X`` (a global scale of ``C`` does not change ``B A``).
Writing ``C = Q Q^T`` turns this into a plain Eckart-Young problem on ``dW Q``: the optimum keeps the top-r
singular triplets of ``dW Q`` (arXiv 2410.21271).

Two forms reach the same optimum:

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
Everything runs in fp64: ``dW`` is tiny relative to ``W`` and ``C`` can be badly conditioned.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

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
]

Form = Literal["auto", "eigen", "inverse_free"]

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


def svd_factors(delta: torch.Tensor, rank: int) -> LowRankFactors:
    """Plain truncated SVD of the compression error (ZeroQuant-V2 LoRC): the data-free baseline, ``C = I``."""
    check_rank(rank, *delta.shape)
    d = delta.to(torch.float64)
    return _balanced(d, *_top_singular(d, rank), rank)


def eora_factors(
    delta: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    rank: int = 64,
    *,
    form: Form = "auto",
    eigen: Eigen | None = None,
) -> LowRankFactors:
    """EoRA: the rank-``rank`` ``B @ A`` minimising ``||(delta - B A) X^T||_F`` given ``C = X^T X``.

    Args:
        delta: compression error ``W - W_c`` (out x in), ideally fp32 or fp64.
        second_moment: ``C`` (in x in). May be omitted when ``eigen`` is given.
        rank: target rank, ``1 <= rank < min(out, in)``.
        form: ``"eigen"`` (paper), ``"inverse_free"``, or ``"auto"``: the eigen form when ``eigen`` is already
            computed (shared by modules with the same input) or ``in <= out``, else the inverse-free form.
        eigen: a precomputed :func:`eigen_of` of ``C`` to reuse across modules that read the same input.
    """
    out_features, in_features = delta.shape
    check_rank(rank, out_features, in_features)
    if second_moment is None and eigen is None:
        raise ValueError("eora_factors needs the calibration second moment (or its eigendecomposition)")
    if form == "auto":
        form = "eigen" if eigen is not None or in_features <= out_features else "inverse_free"
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

    raise ValueError(f"form must be 'auto', 'eigen' or 'inverse_free', got {form!r}")


def error_spectrum(delta: torch.Tensor, eigen: Eigen | None = None) -> torch.Tensor:
    """The squared singular values of ``dW Q`` (``C = Q Q^T`` from ``eigen``; of ``dW`` itself without it, the plain
    SVD's norm), descending, fp64. Entry ``k`` is exactly what the ``k+1``-th rank removes from the squared error
    ``||(dW - B A) X^T||_F^2`` of the best rank-``k`` residual (Eckart-Young): the rank budget spends ranks by it."""
    d = delta.to(torch.float64)
    m = d if eigen is None else d @ (eigen.vectors * eigen.values.sqrt())
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    with one_cpu_thread(gram.device):
        values = torch.linalg.eigvalsh(0.5 * (gram + gram.T))
    return values.flip(0).clamp_min(0.0)


# Shrinkage amounts tried by choose_shrinkage: 0 (plain EoRA) to 1 (plain SVD), roughly geometric in between.
SHRINKAGE_GRID = (0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 1.0)


def shrink(second_moment: torch.Tensor, amount: float) -> torch.Tensor:
    """``(1 - amount) C + amount * mean(diag C) * I`` in fp64: the same eigenvectors, eigenvalues pulled toward their
    mean. ``amount = 0`` is ``C`` (EoRA), ``amount = 1`` a multiple of ``I`` (plain SVD: a scale does not matter)."""
    c = second_moment.to(torch.float64)
    if amount == 0:
        return c
    out = (1.0 - amount) * c
    out.diagonal().add_(amount * float(c.diagonal().mean()))
    return out


def choose_shrinkage(
    folds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rank: int,
    grid: tuple[float, ...] = SHRINKAGE_GRID,
) -> float:
    """The shrinkage amount of ``grid`` whose rank-``rank`` EoRA residual generalises best across cross-validation
    ``folds``: ``(delta, fit, score)``, the error to fit and the mean second moments of the fitting and the held-out
    calibration windows (two folds: even- and odd-numbered windows, each way round).

    Each fold's fit eigenbasis ``U, l`` gives the shrunk problem ``dW U diag(sqrt l_a)``, whose top left singular
    vectors ``P`` span ``B A = P P^T dW``; the held-out moment scores it by the exact error ``tr(G) - tr(P^T G P)``,
    ``G = dW C_score dW^T``. Ties go to the smaller amount. Costs one ``in x in`` eigendecomposition per fold and one
    truncated SVD per fold and amount."""
    errors = torch.zeros(len(grid), dtype=torch.float64)
    for delta, fit, score in folds:
        d = delta.to(torch.float64)
        values, vectors = _eigh(0.5 * (fit.to(torch.float64) + fit.to(torch.float64).T))
        values = values.clamp_min(0.0)
        mean = float(values.mean())
        rotated = d @ vectors
        held_out = d @ score.to(torch.float64) @ d.T
        held_out = 0.5 * (held_out + held_out.T)
        for i, amount in enumerate(grid):
            scale = ((1.0 - amount) * values + amount * mean).sqrt()
            p, s = _top_singular(rotated * scale, rank)
            p = p * (s > 0)  # numerically null directions are not part of the residual (_balanced zeroes them)
            errors[i] += held_out.trace() - torch.einsum("or,op,pr->", p, held_out, p)
    return float(grid[int(torch.argmin(errors))])  # argmin returns the first of equal minima: the smaller amount


def resolve_B(delta: torch.Tensor, A: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """The ``B`` (out x r) minimising ``||(delta - B A) X^T||_F`` for a fixed ``A`` (r x in), ``C = X^T X``.

    ``B = delta C A^T (A C A^T)^+`` (``C = I`` when ``second_moment`` is None: the plain Frobenius norm). Used after
    ``A`` is quantized, so that ``B`` compensates ``A``'s rounding error. The pseudo-inverse (eigenvalues of the
    small ``r x r`` matrix below ``r * eps * max`` dropped) keeps zero rows of ``A`` (rank-deficient errors, dead
    channels) from dividing by zero: their columns of ``B`` come out zero. Returns fp32.
    """
    d, a = delta.to(torch.float64), A.to(torch.float64)
    ca = a.T if second_moment is None else second_moment.to(torch.float64) @ a.T  # C A^T (in x r), C symmetric
    gram = a @ ca  # A C A^T (r x r)
    values, vectors = _eigh(0.5 * (gram + gram.T))
    limit = max(gram.shape[0], 1) * _REL_EPS * values.abs().max().clamp_min(0.0) if values.numel() else 0.0
    inv = torch.where(values > limit, 1.0 / values, torch.zeros_like(values))
    return ((d @ ca) @ (vectors * inv) @ vectors.T).float().contiguous()


def weighted_error(delta: torch.Tensor, factors: LowRankFactors | None, second_moment: torch.Tensor) -> float:
    """``||(delta - B A) X^T||_F`` computed from ``C = X^T X`` alone: ``sqrt(tr(E C E^T))``."""
    e = delta.to(torch.float64)
    if factors is not None:
        e = e - factors.B.double() @ factors.A.double()
    return float(torch.einsum("oi,ij,oj->", e, second_moment.to(torch.float64), e).clamp_min(0).sqrt())
