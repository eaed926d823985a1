"""``EoRAConfig``: the torchao workflow config (validated at construction), and its strict JSON loader.

The ``quantize_`` handler that applies it lives in ``transform.py``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Optional, Union

from torchao.core.config import AOBaseConfig

from .adapter_quant import check_adapter_group_size
from .calibration import Calibration
from .checks import check_bool, check_choice, check_config_json, check_int
from .compressors import Compressor, GPTQConfig, PruneConfig, RTNConfig
from .solver import FORMS

__all__ = ["EoRAConfig", "config_from_json", "eora_config"]

Compensation = Literal["eora", "svd", "none"]
COMPENSATIONS = ("eora", "svd", "none")
VALUE_MOMENTS = ("auto", "attention", "plain")
RANK_BUDGETS = ("uniform", "global", "relative")
TARGETS = ("layer", "anchored")
OUTPUT_WEIGHTINGS = ("none", "gradient")


@dataclass
class EoRAConfig(AOBaseConfig):
    """Compress every linear weight with ``base`` and add a rank-``rank`` residual ``B @ A``.

    Args:
        rank: rank of the residual path (``1 <= rank < min(out, in)``).
        base: the compressor for ``W_c``, any ``Compressor``: ``RTNConfig``, ``GPTQConfig``, ``PruneConfig``, or
            one of your own (only these three reload from a saved checkpoint or calibration file).
        compensation: ``"eora"`` (activation-weighted, needs ``calibration``), ``"svd"`` (plain SVD of the error,
            data-free) or ``"none"`` (compression only: a rank-0 residual, for baselines).
        calibration: a ``Calibration`` from ``calibrate()``. Modules it did not see (e.g. ``lm_head``) are left
            unchanged. Without one, ``compensation="eora"`` falls back to data-free SVD and says so.
        form: solver form (same optimum, different cost; ``solver.eora_factors``): ``"auto"`` (default) reduces the
            error to ``min(out, in)`` dimensions and finds the top directions exactly for small layers and by
            randomized subspace iteration for large ones (cost grows with the width squared and the rank, not the
            width cubed); ``"randomized"`` uses the iteration wherever it applies; ``"eigen"`` (the paper's) and
            ``"inverse_free"`` are the exact references (an ``in x in`` or ``out x out`` eigendecomposition).
        adapter_bits: quantize ``A`` and ``B`` to this many bits (2..8; 4 is the paper's recommendation) in
            torchao's intx layout, or None (default) for adapters in the model dtype. Ignored by ``compensation="none"``.
        adapter_group_size: values per scale along each factor's input dimension (``A``: in_features, ``B``: the
            rank); must divide the rank and every in_features (default 32).
        adapter_resolve: with ``adapter_bits``, quantize the factors for the norm the compensation minimises
            (default True; activation-weighted for EoRA, plain for SVD): a fixed rotation of the rank, a clip search
            per group, ``B`` re-solved in closed form against the quantized ``A`` and ``A`` against the quantized
            ``B`` for a few rounds, the best kept (``adapter_quant.py``). False rounds the factors as solved.
        value_moment: what a calibrated base compressor (GPTQ, SparseGPT, Wanda) minimises for ``v_proj`` in
            sequential calibration: ``"attention"`` the error of the attention output, from the inputs mixed by
            the attention probabilities, one moment per kv head's rows (``attention_moments``; the calibration
            forwards then run eager attention, slower); ``"plain"`` the error of v_proj's own output, ``X^T X`` as
            for every other layer. Plain moments miss the "attention sink": a few tokens (a window's first) receive
            most of the attention in later layers, but count once in ``X^T X``. ``"auto"`` (default): attention
            for ``GPTQConfig`` (measured better on SmolLM2 and Gemma-3, README), plain for the pruning compressors
            (not measured on a real model). EoRA's residual for ``v_proj`` is weighted with the attention-weighted
            moment (summed over kv heads, in any calibration mode) under ``"attention"``, and under ``"auto"`` over
            every calibrated compressor that did not minimise the attention-output error itself: measured on
            SmolLM2's paper suite, it turned the two points where EoRA lost to plain SVD into wins (README); over
            sequential GPTQ it tied on SmolLM2 and lost 0.45% on Gemma-3, so ``"auto"`` keeps the plain moment
            there, and for RTN (not yet measured).
            ``shrinkage="auto"`` leaves that residual unshrunk (its moment is not split for cross-validation).
        rank_budget: ``"uniform"`` (default): every module gets ``rank``; ``"global"``: the same total adapter
            parameters, spent where they remove the most activation-weighted error (``rank_budget.py``; ranks of at
            most ``4 * rank`` per module, chosen from a first sequential pass, so calibration takes about twice as
            long; the chosen ranks are kept in the ``Calibration`` and in the saved weights); ``"relative"``: the
            same, each module's error measured relative to its own output energy ``tr(W C W^T)`` (scale-free: a
            layer with large activations does not take the budget for that alone). Under
            ``output_weighting="gradient"``, ``"global"`` measures the error in loss units (the output-weighted error
            times the gradient's scale): a loss-aware budget.
        refine_rounds: alternating rounds after the first solve (default 0): compress ``W - B A`` again and
            re-solve ``B A`` for the new error; a round is kept only if it lowers the residual's own error
            (activation-weighted for EoRA). Each round costs one more compression and solve per module.
        shrinkage: how far EoRA pulls the calibration second moment toward a multiple of the identity before
            solving (``solver.shrink``: 0 is the paper's EoRA, 1 plain SVD). ``"auto"`` (default) chooses it per
            module from ``solver.SHRINKAGE_GRID`` by 2-fold cross-validation over the calibration windows (even
            against odd); with little calibration data the exact fit to the sample overfits, and this keeps EoRA
            from losing to plain SVD. Needs statistics collected with the split (sequential calibration with this
            config, or one-shot); without it ``"auto"`` means 0. A float in [0, 1] fixes the amount.
        target: what EoRA's residual fits. ``"layer"`` (default, the paper's): the module's own weight error
            ``W - W_c`` on the inputs the compressed prefix produces. ``"anchored"``: the original model's output
            ``W X_fp`` from those inputs ``X_q``, which also corrects the error the compressed layers before it
            left in its inputs (``anchor.py``). Sequential calibration only: the pass then runs each layer a
            second time on the original model's activations, carried beside the compressed ones. Measured on
            SmolLM2: a tie at 3 bits, a loss at 2 bits (docs/beyond-eora.md).
        preserve: preserve-then-quantize (``preserve.py``): ``k`` of the ``rank`` residual ranks hold the top of
            the weight itself in the activation-weighted norm, ``P W`` (``P`` projects on the top-k output
            directions of ``W C W^T``), kept out of the compressor, which then sees only ``W - P W``; the other
            ``rank - k`` ranks fit what compressing that leaves. 0 (default) is plain EoRA; an integer fixes ``k``
            for every module (a multiple of ``adapter_group_size`` with quantized adapters); ``"auto"`` chooses it
            per module among 0, ``rank/4`` and ``rank/2`` by the residual's own error (a compression and a solve
            per candidate).
        output_weighting: ``"none"`` (default, the paper's): every output channel's error counts alike;
            ``"gradient"``: weighted by the diagonal of the loss gradient's second moment at the layer's output
            (``output_weights.py``; one forward and backward of the original model over the calibration windows
            first, one decoder layer at a time when streamed; sequential calibration only).
    """

    rank: int = 64
    base: Compressor = field(default_factory=RTNConfig)
    compensation: Compensation = "eora"
    calibration: Optional[Calibration] = field(default=None, repr=False, compare=False)
    form: str = "auto"
    adapter_bits: Optional[int] = None
    adapter_group_size: int = 32
    adapter_resolve: bool = True
    value_moment: str = "auto"
    rank_budget: str = "uniform"
    refine_rounds: int = 0
    shrinkage: Union[str, float] = "auto"
    target: str = "layer"
    preserve: Union[int, str] = 0
    output_weighting: str = "none"

    def __post_init__(self) -> None:
        check_choice("compensation", self.compensation, COMPENSATIONS)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < (self.compensation != "none"):
            raise ValueError(
                f"rank must be a positive integer, got {self.rank!r} (use compensation='none' for no residual)"
            )
        if not isinstance(self.base, Compressor) or isinstance(self.base, type):
            raise ValueError(
                f"base must be a compressor config such as RTNConfig(bits=3), GPTQConfig(bits=3) or "
                f"PruneConfig('sparsegpt', '2:4'), got {self.base!r}"
            )
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            kind = type(self.calibration).__name__
            raise ValueError(f"calibration must be a Calibration from calibrate() or None, got a {kind}")
        check_choice("form", self.form, FORMS)
        check_choice("value_moment", self.value_moment, VALUE_MOMENTS)
        check_choice("rank_budget", self.rank_budget, RANK_BUDGETS)
        check_choice("target", self.target, TARGETS)
        check_choice("output_weighting", self.output_weighting, OUTPUT_WEIGHTINGS)
        if self.output_weighting != "none" and self.compensation != "eora":
            raise ValueError("output_weighting weights EoRA's residual: it needs compensation='eora', got "
                             f"{self.compensation!r}")
        if self.target == "anchored" and self.compensation != "eora":
            raise ValueError("target='anchored' fits EoRA's residual to the original outputs: it needs "
                             f"compensation='eora', got {self.compensation!r}")
        check_int("refine_rounds", self.refine_rounds, 0, 10)
        self._check_preserve()
        if self.shrinkage != "auto" and (isinstance(self.shrinkage, bool) or not isinstance(self.shrinkage, (int, float))
                                         or not 0 <= self.shrinkage <= 1):
            raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1] (0: plain EoRA, 1: plain SVD), got "
                             f"{self.shrinkage!r}")
        check_bool("adapter_resolve", self.adapter_resolve)
        check_int("adapter_group_size", self.adapter_group_size, 1)
        if self.adapter_bits is not None:
            if isinstance(self.adapter_bits, bool) or self.adapter_bits not in range(2, 9):
                raise ValueError(
                    f"adapter_bits must be None (adapters in the model dtype) or an integer in 2..8, got "
                    f"{self.adapter_bits!r}; 4 bits is the paper's recommendation"
                )
            if self.compensation != "none":
                check_adapter_group_size(self.adapter_group_size, self.rank)  # in_features: checked per layer

    def _check_preserve(self) -> None:
        if self.preserve == "auto":
            return
        if isinstance(self.preserve, bool) or not isinstance(self.preserve, int) or not 0 <= self.preserve < max(
                self.rank, 1):
            raise ValueError(f"preserve must be 'auto' or an integer 0 <= k < rank ({self.rank}): the ranks that "
                             f"hold the top of the weight, got {self.preserve!r}")
        if self.preserve and self.compensation == "none":
            raise ValueError("preserve keeps ranks of the residual: it needs compensation='eora' or 'svd'")
        if self.preserve and self.adapter_bits is not None and self.preserve % self.adapter_group_size:
            raise ValueError(f"preserve={self.preserve} must be a multiple of adapter_group_size "
                             f"({self.adapter_group_size}): an adapter group must not mix preserved and residual "
                             "ranks")

    @property
    def sequential_only(self) -> Optional[str]:
        """The option that exists only inside the sequential pass (its statistics are made there), or None."""
        if self.target == "anchored":
            return "target='anchored'"
        if self.compensation == "eora" and self.output_weighting != "none":
            return f"output_weighting={self.output_weighting!r}"
        return None

    @property
    def attention_value_moment(self) -> bool:
        """Whether v_proj's base compressor minimises the attention-output error (see ``value_moment``)."""
        if not getattr(self.base, "needs_calibration", False) or self.value_moment == "plain":
            return False
        return self.value_moment == "attention" or isinstance(self.base, GPTQConfig)

    @property
    def attention_value_residual(self) -> bool:
        """Whether EoRA may weight ``v_proj``'s residual with the attention-weighted moment (see ``value_moment``;
        ``transform.residual_stats`` makes the last call, knowing what the compressor was fitted to)."""
        if self.compensation != "eora" or self.value_moment == "plain":
            return False
        return self.value_moment == "attention" or bool(getattr(self.base, "needs_calibration", False))

    def describe(self) -> str:
        residual = "no residual" if self.compensation == "none" else f"{self.compensation} r{self.rank}"
        if self.compensation != "none" and self.rank_budget != "uniform":
            residual += f" ({self.rank_budget} budget)"
        if self.compensation == "eora" and self.shrinkage != "auto":
            residual += f" (shrinkage {self.shrinkage:g})"
        if self.compensation == "eora" and self.target == "anchored":
            residual += " (anchored)"
        if self.compensation == "eora" and self.output_weighting != "none":
            residual += f" ({self.output_weighting}-weighted outputs)"
        if self.compensation != "none" and self.preserve:
            residual += f" (preserve {self.preserve})"
        if self.compensation != "none" and self.refine_rounds:
            residual += f" (refined x{self.refine_rounds})"
        if self.compensation != "none" and self.adapter_bits is not None:
            resolve = "" if self.adapter_resolve else ", no re-solve"
            residual += f" (int{self.adapter_bits} g{self.adapter_group_size} adapters{resolve})"
        return f"{self.base.describe()} + {residual}"


def eora_config(calibration: Calibration, **overrides) -> EoRAConfig:
    """The config a sequential calibration compressed with, carrying its statistics: ``quantize_(m, eora_config(c))``."""
    config = calibration.config
    if config is None and calibration.config_json is not None:  # a loaded file: rebuild, strictly
        config = calibration.config = config_from_json(calibration.config_json, "calibration file")
    if config is None:
        raise ValueError("this calibration carries no config (one-shot mode): use EoRAConfig(..., calibration=calib)")
    return replace(config, calibration=calibration, **overrides)


def config_from_json(data: Any, where: str = "config") -> EoRAConfig:
    """Rebuild an ``EoRAConfig`` from ``config_to_dict`` JSON, strictly: only our four config classes, known
    fields, plain values. Anything else (another class or function name, a nested object where a value belongs) is
    refused before anything is built, so a crafted ``config.json`` or calibration file cannot call code.
    ``where`` names the file in the error."""
    config = _build_from_json(data, where)
    if not isinstance(config, EoRAConfig):
        raise ValueError(f"{where}: expected an EoRAConfig, got {type(config).__name__}")
    return config


def _build_from_json(data: Any, where: str):
    check_config_json(data, where)  # before anything is built
    classes = {cls.__name__: cls for cls in (EoRAConfig, RTNConfig, GPTQConfig, PruneConfig)}
    cls = classes[data["_type"]]
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data["_data"].items():
        if key not in names:
            raise ValueError(f"{where}: {cls.__name__} has no field {key!r}")
        kwargs[key] = _build_from_json(value, where) if isinstance(value, dict) else value
    return cls(**kwargs)  # __post_init__ checks every field's type and range
