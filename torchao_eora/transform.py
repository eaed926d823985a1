"""From a weight to ``QuantWithLowRank``, and the thin ``quantize_`` handler for ``EoRAConfig``.

As in torchao's ``quant_api.py``: :func:`eora_quantize_tensor` is the tensor-level function (compress the weight,
take the error in fp32, solve the residual, quantize the adapters), used by the sequential engine and by the
handler; the handler only finds a module's statistics and checks every target before the first one changes.
"""

from __future__ import annotations

import types
import weakref
from functools import partial
from typing import Optional, Union

import torch
from .adapter_quant import QuantizedFactors, quantize_factors
from .calibration import ModuleStats
from .config import EoRAConfig
from .preserve import joined, preserve_candidates, preserved_factors
from .solver import LowRankFactors, Moment, ReducedError, choose_shrinkage, eora_factors, svd_factors, weighted_error
from .targets import check_targets, module_rank, quantize_call_targets, warn_once
from .tensor import QuantWithLowRank
from .timing import Timer

__all__ = ["eora_module_transform", "eora_quantize_tensor", "residual_stats"]


def eora_quantize_tensor(
    weight: torch.Tensor, config: EoRAConfig, stats: ModuleStats | None = None, *, rank: int | None = None,
    timer: Timer | None = None, target_shift: torch.Tensor | None = None, output_weight: torch.Tensor | None = None,
) -> QuantWithLowRank:
    """Compress one (out x in) weight with ``config`` and add its rank-r residual.

    Args:
        weight: the dense weight (any floating dtype; the result keeps it).
        config: what to do; ``config.calibration`` is not read here.
        stats: the layer's input statistics. Needed by calibrated compressors (GPTQ, SparseGPT, Wanda) and by
            ``compensation="eora"``; without them the residual is the plain SVD of the error.
        rank: this module's residual rank when a rank budget chose it (default: ``config.rank``, clamped to fit).
        timer: adds the seconds spent in ``"compress"``, ``"shrinkage"`` (choosing the amount) and ``"solve"``
            (benchmarks report them apart).
        target_shift: the anchored target's ``S`` (``anchor.py``): the residual fits ``W + S - W_c`` instead of
            ``W - W_c``; the base still compresses ``W``. Not applied to a v_proj residual weighted by the
            attention moment (the shift is the plain-moment least-squares one).
        output_weight: the output-side weights ``d`` (out_features,) of ``output_weights.py``: EoRA's residual and
            its shrinkage folds minimise ``||diag(d)^1/2 (dW - B A) X^T||`` (rows scaled by ``sqrt(d)``, ``B``
            scaled back), refinement rounds included. Only with ``compensation="eora"`` and statistics.
    """
    timer = timer or Timer()
    w32 = weight.detach().float()
    if getattr(config.base, "needs_calibration", False) and stats is None:
        raise ValueError(f"{config.base.describe()} needs calibration statistics: run calibrate() first")
    attention = _compressor_fitted_to_attention(stats, config)
    compressor_moment = None if stats is None else (stats.compressor_moment if attention else stats.moment).mean()
    weighted = None if config.compensation == "svd" else residual_stats(stats, config)
    if weighted is not stats:  # an attention-weighted v_proj residual: the shift was fitted under the plain moment
        target_shift = None
    target = w32 if target_shift is None else w32 + target_shift.to(w32.device, torch.float32)
    moment = None if weighted is None else weighted.moment.mean()  # EoRA's, before shrinkage
    rank = module_rank(config, *w32.shape) if rank is None else rank
    kept, compressed = None, None  # preserve-then-quantize: ranks that hold the top of W, kept out of the compressor
    if config.preserve and rank and config.compensation != "none":
        with timer("compress"):
            kept, compressed = _preserved(w32, target, config, rank, weighted, compressor_moment, moment)
    rest_rank, base_weight, rest_target = rank, w32, target
    if kept is not None:
        kept_product = kept.B @ kept.A
        rest_rank, base_weight, rest_target = rank - kept.rank, w32 - kept_product, target - kept_product
    with timer("compress"):
        if compressed is None:  # not already compressed while choosing what to preserve
            compressed = config.base.compress(base_weight, compressor_moment)
        delta = rest_target - compressed.dequantize(torch.float32)  # in fp32: the error underflows in fp16/bf16
        folds = _cross_validation_folds(base_weight, rest_target, delta, config, rest_rank, weighted, attention)
    rows = None  # sqrt(d): the output-side weighting scales the rows of every error the residual fits
    if output_weight is not None and weighted is not None and config.compensation == "eora" and rank:
        rows = output_weight.to(delta.device, torch.float32).sqrt()[:, None]
    fitted = _weighted(delta, rows)
    if rows is not None and folds is not None:  # the fold that shares delta keeps sharing it (one reduced frame)
        folds = [(fitted if error is delta else rows * error, fit, score) for error, fit, score in folds]
    with timer("solve"):
        # One reduced frame of the error serves the shrinkage folds (data-free compressors share the error) and
        # the solve: its QR and Gram matrices are computed once.
        reduced = config.form in ("auto", "randomized") and config.compensation == "eora" and rest_rank
        problem = ReducedError(fitted) if reduced and weighted is not None else None
    with timer("shrinkage"):
        amount = _shrinkage(folds, config, rest_rank, problem, fitted)
    with timer("solve"):
        factors = _unweighted(_solve(fitted, config, rest_rank, weighted, moment, amount, problem), rows)
        del fitted
    if kept is not None:  # from here on, one residual of the whole rank for the whole error
        factors, delta = joined(kept, factors), delta + kept_product
    for _ in range(config.refine_rounds if rank else 0):
        # Alternate: compress what the residual leaves (W - B A), re-solve; keep a round only if it lowers the
        # error the residual minimises (the compressor's own rounding is not aware of that norm).
        with timer("compress"):
            again = config.base.compress(w32 - factors.B @ factors.A, compressor_moment)
            delta_again = target - again.dequantize(torch.float32)
        with timer("solve"):
            factors_again = _unweighted(_solve(_weighted(delta_again, rows), config, rank, weighted, moment, amount),
                                        rows)
            if (_residual_error(_weighted(delta_again, rows), _weighted(factors_again, rows), moment, amount)
                    >= _residual_error(_weighted(delta, rows), _weighted(factors, rows), moment, amount)):
                break
        compressed, delta, factors = again, delta_again, factors_again
    with timer("solve"):
        factors = _quantize_adapters(delta, factors, config, moment, amount, weight.dtype, rows)
    return QuantWithLowRank.from_parts(compressed, factors, dtype=weight.dtype)


def _weighted(x: torch.Tensor | LowRankFactors, rows: torch.Tensor | None):
    """An error (or a residual's factors) with its rows scaled by the output weighting's ``sqrt(d)``."""
    if rows is None:
        return x
    return rows * x if isinstance(x, torch.Tensor) else LowRankFactors(x.A, rows * x.B)


def _unweighted(factors: LowRankFactors, rows: torch.Tensor | None) -> LowRankFactors:
    """The factors fitted to a row-scaled error, scaled back: ``B A`` then fits the error itself."""
    return factors if rows is None else LowRankFactors(factors.A, factors.B / rows)


def _preserved(
    w32: torch.Tensor, target: torch.Tensor, config: EoRAConfig, rank: int, stats: ModuleStats | None,
    compressor_moment: torch.Tensor | None, moment: torch.Tensor | None,
) -> tuple[LowRankFactors | None, torch.Tensor | None]:
    """The preserved ranks (``preserve.py``; None for k = 0) and, when candidates were compared, the compressed
    ``W - L_k`` of the chosen one (so it is not compressed again). Each candidate is scored by the error the whole
    residual leaves, ``||(target - W_c(W - L_k) - L_k - B A) X^T||`` with ``B A`` the unshrunk rank ``rank - k``
    solve for what compressing ``W - L_k`` leaves (in-sample, the same for every candidate)."""
    step = config.adapter_group_size if config.adapter_bits is not None else 1
    candidates = preserve_candidates(config.preserve, rank, step)
    if max(candidates) == 0:
        return None, None
    top = preserved_factors(w32, moment, max(candidates))
    if len(candidates) == 1:
        return top, None
    best = None
    for k in candidates:
        part = LowRankFactors(top.A[:k], top.B[:, :k])
        product = part.B @ part.A
        compressed = config.base.compress(w32 - product, compressor_moment)
        rest = target - product - compressed.dequantize(torch.float32)
        error = _residual_error(rest, _solve(rest, config, rank - k, stats, moment, 0.0), moment, 0.0)
        if best is None or error < best[0]:
            best = (error, part, compressed)
    _, part, compressed = best
    return (part if part.rank else None), compressed


def residual_stats(stats: ModuleStats | None, config: EoRAConfig) -> ModuleStats | None:
    """The statistics EoRA's residual is weighted with: a v_proj's attention-weighted moment where the calibration
    has one and ``config.attention_value_residual`` asks for it (an error in v_proj reaches the layer through the
    attention probabilities, which weight a window's first tokens far more than ``X^T X`` does), else ``stats``.
    Under ``value_moment="auto"`` not where v_proj's compressor already minimised that error itself (sequential
    GPTQ): measured there, it tied on SmolLM2 (26.28 vs 26.29) and lost on Gemma-3 (26.99 vs 26.87; README)."""
    if stats is None or stats.attention_moment is None or not config.attention_value_residual:
        return stats
    if config.value_moment == "auto" and _compressor_fitted_to_attention(stats, config):
        return stats
    return stats.attention_weighted()


def _compressor_fitted_to_attention(stats: ModuleStats | None, config: EoRAConfig) -> bool:
    """Whether a v_proj's base compressor minimises the attention-output error: the config asks for it and the
    statistics carry its moment (sequential calibration only)."""
    return stats is not None and stats.compressor_moment is not None and config.attention_value_moment


def _cross_validation_folds(
    w32: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, config: EoRAConfig, rank: int,
    stats: ModuleStats | None, attention: bool,
) -> list[tuple[torch.Tensor, Moment, Moment]] | None:
    """The ``(error, fit moment, score moment)`` folds that ``shrinkage="auto"`` is chosen on, or None when there is
    nothing to choose (a fixed amount, no EoRA, rank 0, or statistics that were not split in halves). ``target``
    is what the residual fits the compressed ``w32`` to (``w32`` itself unless anchored).

    A calibrated compressor (GPTQ, SparseGPT, Wanda) fitted ``W_c`` to both halves, so its error is already small
    where the scoring half looks and that half is not held out: each fold's error comes from compressing ``W``
    again on its fitting half alone (two more compressions per module)."""
    if stats is None or config.compensation != "eora" or rank == 0 or config.shrinkage != "auto":
        return None
    if not getattr(config.base, "needs_calibration", False) or attention:  # data-free, or fitted to another moment
        halves = stats.moment.half_terms()  # weighted sums of the stored sums: no in x in copies
        return None if halves is None else [(delta, fit, score) for fit, score in (halves, halves[::-1])]
    halves = stats.moment.halves()  # the compressor needs each half as a matrix
    if halves is None:
        return None
    return [(target - config.base.compress(w32, fit).dequantize(torch.float32), fit, score)
            for fit, score in (halves, halves[::-1])]


def _shrinkage(folds: list | None, config: EoRAConfig, rank: int, problem: ReducedError | None,
               delta: torch.Tensor) -> float:
    """EoRA's shrinkage amount for this module: the config's number, or cross-validated on ``folds`` (``"auto"``;
    0 when there are no folds). Folds on ``delta`` itself use its reduced frame ``problem``."""
    if folds is None:
        return 0.0 if config.shrinkage == "auto" or config.compensation != "eora" else float(config.shrinkage)
    if problem is None:  # an exact reference form: its own frames, exact eigensolver
        return choose_shrinkage(folds, rank, method="exact")
    method = "randomized" if config.form == "randomized" else "auto"
    return choose_shrinkage([(problem if d is delta else d, fit, score) for d, fit, score in folds], rank,
                            method=method)


def _residual_error(delta: torch.Tensor, factors: LowRankFactors, moment: torch.Tensor | None, amount: float) -> float:
    """``||(delta - B A) X^T||_F`` under the (shrunk by ``amount``) moment (``solver.weighted_error``); the plain
    Frobenius norm without one."""
    if moment is not None:
        return weighted_error(delta, factors, moment, shrinkage=amount)
    return float(torch.linalg.norm(delta.double() - factors.B.double() @ factors.A.double()))


def _solve(
    delta: torch.Tensor, config: EoRAConfig, rank: int, stats: ModuleStats | None, moment: torch.Tensor | None,
    amount: float, problem: ReducedError | None = None,
) -> LowRankFactors:
    """The residual factors for EoRA's second ``moment`` shrunk by ``amount`` (``problem``: ``delta``'s reduced frame,
    when already built)."""
    if config.compensation == "none" or rank == 0:
        return LowRankFactors(delta.new_zeros(0, delta.shape[1]), delta.new_zeros(delta.shape[0], 0))
    if stats is None:
        return svd_factors(delta, rank)
    if config.form == "eigen" and amount == 0:  # the in x in eigendecomposition is shared by modules of one input
        return eora_factors(delta, rank=rank, form="eigen", eigen=stats.eigen())
    return eora_factors(delta, moment, rank, form=config.form, shrinkage=amount, problem=problem)


def _quantize_adapters(
    delta: torch.Tensor, factors: LowRankFactors, config: EoRAConfig, moment: torch.Tensor | None, amount: float,
    dtype: torch.dtype, rows: torch.Tensor | None,
) -> Union[LowRankFactors, QuantizedFactors]:
    """intx adapters when the config asks for them, quantized in the compensation's own norm (output weighting's
    ``rows`` included)."""
    if config.adapter_bits is None or factors.rank == 0:
        return factors
    return quantize_factors(
        delta, factors, config.adapter_bits, config.adapter_group_size, moment,
        resolve=config.adapter_resolve, dtype=dtype, shrinkage=amount, row_scale=rows,
    )


def install(module: torch.nn.Linear, weight: QuantWithLowRank) -> None:
    """Put a ``QuantWithLowRank`` into a linear module (frozen), and show it in the module's repr."""
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.extra_repr = types.MethodType(partial(_extra_repr, original=module.extra_repr), module)


def _extra_repr(self, original) -> str:
    return f"{original()}, weight={self.weight._quantization_type()}"


# ---- the quantize_ handler -------------------------------------------------------------------------------------


def eora_module_transform(module: torch.nn.Module, config: EoRAConfig, **kwargs) -> torch.nn.Module:
    """torchao's module handler for ``EoRAConfig`` (registered in ``registrations.py``): find the module's
    statistics, check it, and replace its weight with ``eora_quantize_tensor``'s (or the sequential pass's)."""
    calib = config.calibration
    call = quantize_call_targets(module)  # every module this quantize_ call converts, by name (None: unknown)
    name = None
    if calib is not None:
        name = calib.name_of(module)
        if name is None and call is not None and call[1] not in calib._roots:
            # statistics loaded without a model, or calibrated on another one: check the fingerprint now, so
            # another model's statistics (or compressed weights) are refused before its first layer changes
            name = calib.bind(call[1]).name_of(module)
        if name is None:
            return module  # not a calibrated layer (lm_head, vision tower, ...): leave it alone
        _check_all_once(calib, {n: m for m, n in list(calib._names.items())}, config)
        check_targets({name: module}, config, warn=False)
        if call is not None:  # experts are not linears: quantize_ never visits them, so the first linear installs them
            from .experts import install_calibrated_experts

            install_calibrated_experts(call[1], calib.results)
        done = calib.results.get(name)
        if done is not None and calib.config == config:  # sequential calibration already compressed it: install
            install(module, done)
            return module
    else:
        if call is not None:
            targets, root = call
            head = _output_embeddings(root)
            if module is head:
                if all(m is head for m in targets.values()):  # nothing else to convert: say why, as calibrate() does
                    from .sequential import find_decoder_layers

                    find_decoder_layers(root)
                warn_once(config, "leaving lm_head (the output embeddings) uncompressed, as the calibrated path does; "
                          "quantize_(model.lm_head, config) compresses it")
                return module
            _check_all_once(root, {n: m for n, m in targets.items() if m is not head}, config)
            name = next(n for n, m in targets.items() if m is module)
        shape = "x".join(map(str, getattr(getattr(module, "weight", None), "shape", ())))
        check_targets({name or f"a {shape} {type(module).__name__} layer": module}, config, warn=call is None)
        if config.compensation == "eora":
            warn_once(config, "EoRAConfig(compensation='eora') without calibration statistics: falling back to "
                      "data-free SVD")
    if config.sequential_only:  # its statistics (cross moments, output gradients) exist only inside the pass
        raise ValueError(f"{config.sequential_only} is solved during sequential calibration: run calibrate(model, "
                         "batches, config) with this config, then quantize_(model, eora_config(calib))")
    stats = None if calib is None else calib.stats_of(name)
    rank = None if calib is None else calib.ranks.get(name)
    install(module, eora_quantize_tensor(module.weight, config, stats, rank=rank))
    return module


# The targets of a quantize_ call already checked, per root (a Calibration or the model) and config: the first
# handler call checks them all, so a problem anywhere fails before any layer is changed.
_checked: "weakref.WeakKeyDictionary[object, tuple[str, weakref.WeakSet]]" = weakref.WeakKeyDictionary()


def _check_all_once(key: object, targets: dict[str, torch.nn.Module], config: EoRAConfig) -> None:
    seen = _checked.get(key)
    if seen is None or seen[0] != repr(config):
        seen = _checked[key] = (repr(config), weakref.WeakSet())
    todo = {name: m for name, m in targets.items() if m not in seen[1]}
    if todo:
        check_targets(todo, config)
        seen[1].update(todo.values())


def _output_embeddings(root: torch.nn.Module) -> Optional[torch.nn.Module]:
    get = getattr(root, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
