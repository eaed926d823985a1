"""Calibration statistics as data: the second moment ``sum x^T x`` of every linear layer's inputs (the one statistic
EoRA, GPTQ, SparseGPT and Wanda need), keyed by the modules' fully qualified names, saved and loaded as safetensors.

Statistics are kept once per *distinct input*: q/k/v projections read the same tensor, as do gate/up, so they share
one accumulator (and later one eigendecomposition). ``sequential.py`` collects them; this module imports nothing
of the package above it.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file

from .checks import check_config_json
from .io_utils import atomic_file
from .solver import Eigen, eigen_of

if TYPE_CHECKING:
    from .config import EoRAConfig
    from .tensor import QuantWithLowRank

__all__ = ["Calibration", "ModuleStats", "SecondMoment", "VALUE_GROUP_SUFFIX", "check_fingerprint", "model_fingerprint"]

log = logging.getLogger(__name__)
Mode = Literal["sequential", "one-shot"]
_HALF_SUFFIX = ":half"  # tensor name of a group's even-window sum in the saved file
VALUE_GROUP_SUFFIX = ":attention"  # group key of a v_proj's attention-weighted moment: "<v_proj name>:attention"


@dataclass
class SecondMoment:
    """``total = sum over real tokens of x x^T`` (in x in, fp64) and the number of tokens summed.

    An attention-weighted v_proj moment (``attention_moments``) has one (in x in) matrix per kv head, (H_kv, in, in),
    and counts (head, query) pairs instead of tokens."""

    total: torch.Tensor
    n_tokens: int = 0
    normalized: bool = False  # total already divided by n_tokens, in place (see normalize_)
    # The sum over the even-numbered calibration windows alone (fp32: it only chooses EoRA's shrinkage), and their
    # token count; None when the statistics were not split (one window, attention-weighted moments, old files).
    half: torch.Tensor | None = None
    n_half: int = 0

    def mean(self) -> torch.Tensor:
        """``X^T X / n``: the scale-free form the solver and GPTQ use (do not modify it)."""
        if self.n_tokens == 0:
            raise ValueError("no calibration tokens reached this layer (all padding?)")
        return self.total if self.normalized else self.total / self.n_tokens

    def halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mean second moments (fp64) of the even- and of the odd-numbered windows, for cross-validation
        (``solver.choose_shrinkage``); None unless both halves have tokens."""
        if self.half is None or not 0 < self.n_half < self.n_tokens:
            return None
        total = self.total.to(torch.float64) * (self.n_tokens if self.normalized else 1)
        half = self.half.to(torch.float64)
        return half / self.n_half, (total - half) / (self.n_tokens - self.n_half)

    def half_terms(self) -> "tuple[tuple[tuple[float, torch.Tensor], ...], ...] | None":
        """The two halves of :meth:`halves` as weighted sums of the stored tensors, ``((1 / n_half, half),)`` and
        ``((1 / n_rest, total), (-1 / n_rest, half))`` (``solver.Moment``): the solver works with them without an
        in x in copy (two fp64 copies of a 70B down_proj's moment would be 13 GiB). None as for :meth:`halves`."""
        if self.half is None or not 0 < self.n_half < self.n_tokens:
            return None
        rest = self.n_tokens - self.n_half
        total_weight = (self.n_tokens if self.normalized else 1) / rest
        return ((1.0 / self.n_half, self.half),), ((total_weight, self.total), (-1.0 / rest, self.half))

    def normalize_(self) -> "SecondMoment":
        """Divide ``total`` by ``n_tokens`` in place, so ``mean()`` costs no copy (a 7B down_proj's is 1 GiB)."""
        if not self.normalized and self.n_tokens:
            self.total.div_(self.n_tokens)
            self.normalized = True
        return self


@dataclass
class ModuleStats:
    """What the compressor and the solver need of one module: its input second moment, that moment's
    eigendecomposition computed on first use and shared by the modules reading the same input, and, for a v_proj,
    the attention-weighted moment (``attention_moments``): the one its base compressor minimises instead in
    sequential calibration (``compressor_moment``, one per kv head), and the one EoRA's residual may be weighted
    with (``attention_moment``, any calibration mode). None elsewhere."""

    moment: SecondMoment
    eigen: Callable[[], Eigen]
    compressor_moment: SecondMoment | None = None  # (H_kv, in, in): one per kv head's rows of v_proj
    attention_moment: SecondMoment | None = None  # (H_kv, in, in) or summed over kv heads, (in, in)

    def attention_weighted(self) -> "ModuleStats":
        """These statistics with ``attention_moment`` summed over kv heads as the moment (one low-rank residual
        serves all rows of v_proj, so it is weighted by the sum); its eigendecomposition is computed on first use."""
        m = self.attention_moment
        if m is None:
            raise ValueError("no attention-weighted moment: only a v_proj's statistics have one")
        summed = SecondMoment(m.total.sum(0) if m.total.dim() == 3 else m.total, m.n_tokens, m.normalized)
        cache: list[Eigen] = []

        def eigen() -> Eigen:
            if not cache:
                cache.append(eigen_of(summed.mean()))
            return cache[0]

        return ModuleStats(summed, eigen)


class Calibration:
    """Per-layer second moments of a calibration run, keyed by the fully qualified names of the linear modules.

    ``groups`` maps a group key to its ``SecondMoment``; ``group_of`` maps each linear module's name to the group
    of modules that read the same input; ``value_group_of`` maps a v_proj's name to the group of its
    attention-weighted moment (sequential GPTQ, see ``EoRAConfig.value_moment``). ``config`` is the ``EoRAConfig``
    the run compressed with (sequential mode), so ``eora_config(calib)`` reproduces it; a loaded file keeps it as checked JSON (``config_json``) until
    ``eora_config`` rebuilds it. ``results`` holds the weights sequential calibration already compressed, by module
    name: ``quantize_(model, eora_config(calib))`` installs them instead of compressing twice. Bind to a model
    (``bind``) to let ``quantize_`` find a module's statistics: torchao's handlers see the module, never its name.

    ``fingerprint`` (from :func:`model_fingerprint`, taken by ``calibrate`` on the uncompressed model and saved with
    the statistics) says which model they describe; ``bind`` refuses another one (``ValueError``): other
    architecture, layer count or linear shapes always, other weights of the same shapes unless
    ``check_weights=False``. None (a file from an older version, or statistics built by hand) checks nothing.
    """

    def __init__(
        self,
        groups: Mapping[str, SecondMoment],
        group_of: Mapping[str, str],
        mode: Mode,
        config: "EoRAConfig | None" = None,
        fingerprint: "dict | None" = None,
        check_weights: bool = True,
        *,
        config_json: "dict | None" = None,
        results: "Mapping[str, QuantWithLowRank] | None" = None,
        value_group_of: "Mapping[str, str] | None" = None,
        ranks: "Mapping[str, int] | None" = None,
    ):
        self.groups = dict(groups)
        self.group_of = dict(group_of)
        self.value_group_of = dict(value_group_of or {})
        self.mode = mode
        self.config = config
        self.config_json = config_json
        self.results = dict(results or {})
        self.ranks = dict(ranks or {})  # per-module residual ranks of a global rank budget (empty: uniform)
        self.fingerprint = fingerprint
        self.check_weights = check_weights
        self.coverage = None  # the share of the model a sequential pass compressed (coverage.Coverage)
        self.expert_tokens: dict[str, list[int]] = {}  # experts module name -> calibration tokens per expert
        self._names: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
        self._roots: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # whole models bound (fingerprint checked)
        self._eigen_cache: "OrderedDict[str, Eigen]" = OrderedDict()

    def __repr__(self) -> str:
        values = set(self.value_group_of.values())  # these count (head, query) pairs, not tokens
        tokens = max((m.n_tokens for g, m in self.groups.items() if g not in values), default=0)
        return (
            f"Calibration(mode={self.mode!r}, modules={len(self.group_of)}, distinct_inputs={len(self.groups)}, "
            f"tokens={tokens})"
        )

    # ---- lookup ------------------------------------------------------------------------------------------------

    def bind(
        self, model: torch.nn.Module, prefix: str = "", *, check_weights: bool | None = None
    ) -> "Calibration":
        """Remember which module object carries which name, so the quantize_ handler can look it up.

        Binding a whole model (no ``prefix``) first compares it with the ``fingerprint`` of the model the statistics
        were collected on, and raises ``ValueError`` saying what differs: statistics of another model would convert
        some layers with wrong statistics and silently skip others. ``check_weights=False`` accepts other weights
        of the same shapes (e.g. statistics of a base model for its fine-tune). An explicit choice is remembered
        (as ``load(..., check_weights=...)``'s is): later binds, such as the one in ``compress_model``, keep it; the
        default, None, uses the remembered one (True unless set).
        Weights already compressed (``QuantWithLowRank``) are not compared, so binding after quantizing works.
        (With a ``prefix``, only a part of the model is bound, e.g. the copy of one decoder layer in sequential
        calibration: there is nothing whole to compare.)
        """
        if check_weights is not None:
            self.check_weights = check_weights
        if not prefix and self.fingerprint is not None:
            check_fingerprint(self.fingerprint, model, check_weights=self.check_weights)
            if self.results and not self.check_weights and not _same_weights(self.fingerprint, model):
                self.results = {}  # compressed copies of other weights: quantize_ compresses this model's instead
        if not prefix:
            self._roots.add(model)
        for name, module in model.named_modules():
            full = prefix + name
            if full in self.group_of:
                self._names[module] = full
        return self

    def name_of(self, module: torch.nn.Module) -> str | None:
        return self._names.get(module)

    def covers(self, module: torch.nn.Module) -> bool:
        return module in self._names

    def second_moment(self, name: str) -> SecondMoment:
        if name not in self.group_of:
            raise KeyError(f"calibration has no statistics for module {name!r}")
        return self.groups[self.group_of[name]]

    def stats_of(self, name: str) -> ModuleStats:
        value = self.value_group_of.get(name)
        value = None if value is None else self.groups.get(value)
        # One-shot statistics keep v_proj's compressor on the plain moment: the attention-weighted one is collected
        # there (summed over kv heads) for EoRA's residual alone.
        return ModuleStats(self.second_moment(name), lambda: self.eigen(name),
                           value if self.mode == "sequential" else None, value)

    def eigen(self, name: str) -> Eigen:
        """Eigendecomposition of a module's input second moment, cached per distinct input (q/k/v share one)."""
        group = self.group_of[name]
        if group not in self._eigen_cache:
            self._eigen_cache[group] = eigen_of(self.groups[group].mean())
            while len(self._eigen_cache) > 2:  # modules sharing an input are quantized back to back
                self._eigen_cache.popitem(last=False)
        return self._eigen_cache[group]

    # ---- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically: a temp file renamed into place)."""
        from torchao.core.config import config_to_dict

        path = Path(path)
        meta = {
            "mode": self.mode,
            "group_of": self.group_of,
            "value_group_of": {n: g for n, g in self.value_group_of.items() if g in self.groups},
            "n_tokens": {k: m.n_tokens for k, m in self.groups.items()},
            "n_half": {k: m.n_half for k, m in self.groups.items() if m.half is not None},
            "config": self.config_json if self.config is None else config_to_dict(replace(self.config, calibration=None)),
            "fingerprint": self.fingerprint,
            "ranks": self.ranks,
        }
        tensors = {k: m.total.contiguous() for k, m in self.groups.items()}
        tensors.update({k + _HALF_SUFFIX: m.half.contiguous() for k, m in self.groups.items() if m.half is not None})
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"torchao_eora.calibration": json.dumps(meta)})

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: torch.nn.Module | None = None, *, check_weights: bool = True
    ) -> "Calibration":
        """Read statistics written by ``save``; pass ``model`` to bind them to its modules right away.

        Binding checks that ``model`` is the one the statistics were collected on (see ``bind``);
        ``check_weights=False`` accepts other weights of the same architecture and shapes, for this bind and later
        ones. A file without a fingerprint (written by an older version) loads with a warning and is not checked.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("torchao_eora.calibration")
        except SafetensorError as e:  # a pickle or anything else: never unpickled, refused
            raise ValueError(f"{path} is not a torchao-eora calibration file (not safetensors: {e})") from None
        if raw is None:
            raise ValueError(f"{path} is not a torchao-eora calibration file (no 'torchao_eora.calibration' metadata)")
        meta = json.loads(raw)
        _check_meta_types(meta, path)  # a wrong type here would surface as a TypeError inside quantize_
        tensors = load_file(str(path))
        missing = set(meta["n_tokens"]) - set(tensors)
        if missing:
            raise ValueError(f"{path} is truncated or corrupt: missing tensors {sorted(missing)[:5]}")
        halves = meta.get("n_half") or {}
        if not isinstance(halves, dict) or any(k not in meta["n_tokens"] or k + _HALF_SUFFIX not in tensors
                                               or not isinstance(n, int) for k, n in halves.items()):
            raise ValueError(f"{path} is truncated or corrupt: 'n_half' does not match the tensors in the file")
        groups = {k: SecondMoment(tensors[k], n, half=tensors.get(k + _HALF_SUFFIX) if k in halves else None,
                                  n_half=halves.get(k, 0)) for k, n in meta["n_tokens"].items()}
        values = meta.get("value_group_of") or {}
        if not isinstance(values, dict) or any(not isinstance(g, str) or g not in groups for g in values.values()):
            raise ValueError(f"{path} is corrupt: 'value_group_of' must map v_proj names to moments in the file")
        if meta["config"] is not None:  # only our configs, plain values: refused here if crafted, built by eora_config
            check_config_json(meta["config"], f"calibration file {path}")
        ranks = meta.get("ranks") or {}
        if not isinstance(ranks, dict) or any(isinstance(r, bool) or not isinstance(r, int) or r < 0
                                              for r in ranks.values()):
            raise ValueError(f"{path} is corrupt: 'ranks' must map module names to ranks >= 0")
        fingerprint = meta.get("fingerprint")
        if fingerprint is None:
            log.warning(
                "%s has no model fingerprint (written by an older torchao-eora): cannot check that its statistics "
                "belong to this model; recalibrate to get a checked file", path,
            )
        calib = cls(groups, meta["group_of"], meta["mode"], None, fingerprint, check_weights, config_json=meta["config"],
                    value_group_of=values, ranks=ranks)
        return calib.bind(model) if model is not None else calib


def _check_meta_types(meta, path) -> None:
    """The fields every reader relies on have their types: counts are integers, names are strings."""
    def names_to(kind):
        return lambda v: isinstance(v, dict) and all(isinstance(k, str) and kind(x) for k, x in v.items())

    count = names_to(lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 0)
    checks = {
        "mode": (lambda m: m in ("sequential", "one-shot"), "'sequential' or 'one-shot'"),
        "n_tokens": (count, "a map of moment names to token counts"),
        "group_of": (names_to(lambda g: isinstance(g, str)), "a map of module names to moment names"),
    }
    for key, (valid, what) in checks.items():
        if not isinstance(meta, dict) or not valid(meta.get(key)):
            raise ValueError(f"{path} is corrupt: {key!r} must be {what}; recalibrate to get a valid file")
    unknown = sorted(set(meta["group_of"].values()) - set(meta["n_tokens"]))
    if unknown:
        raise ValueError(f"{path} is corrupt: 'group_of' names moments not in the file ({unknown[:3]}); recalibrate")


# ---- which model the statistics belong to ----------------------------------------------------------------------

_SAMPLES = 8  # weight values sampled per linear layer
# Sampled weights are compared with a tolerance, not hashed: the same weights loaded in another dtype (calibrate in
# fp32, quantize in bf16) must still match; bf16 rounding changes a value by at most 2**-8 of it.
_RTOL, _ATOL = 1e-2, 1e-6


def _text_config_value(model: torch.nn.Module, key: str):
    config = getattr(model, "config", None)
    value = getattr(config, key, None)
    if value is None and hasattr(config, "get_text_config"):  # multimodal configs nest the decoder's
        value = getattr(config.get_text_config(), key, None)
    return value


def _is_plain(weight) -> bool:
    """A dense weight whose values can be read (not a tensor subclass such as QuantWithLowRank, not on meta)."""
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and not weight.is_meta and weight.is_floating_point()


def _sample(weight: torch.Tensor) -> list[float]:
    """``_SAMPLES`` values at fixed positions spread over the weight: cheap even for a 70B model."""
    n_out, n_in = weight.shape
    if n_out * n_in == 0:
        return []
    flat = [(k * n_out * n_in) // _SAMPLES for k in range(_SAMPLES)]
    rows = torch.tensor([i // n_in for i in flat], device=weight.device)
    cols = torch.tensor([i % n_in for i in flat], device=weight.device)
    return weight.detach()[rows, cols].float().cpu().tolist()


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What identifies the model calibration statistics were collected on, as JSON-ready data.

    Architecture class, ``config.model_type``, ``num_hidden_layers``, ``hidden_size``, every linear module's name
    and ``[out, in]``, and a few sampled values of each dense linear weight (compressed weights are skipped).
    Take it before calibration compresses anything.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "num_hidden_layers": _text_config_value(model, "num_hidden_layers"),
        "hidden_size": _text_config_value(model, "hidden_size"),
        "linears": {name: [m.out_features, m.in_features] for name, m in linears.items()},
        "weights": {name: _sample(m.weight) for name, m in linears.items() if _is_plain(m.weight)},
    }


def _same_weights(expected: Mapping, model: torch.nn.Module) -> bool:
    try:
        check_fingerprint(expected, model)
    except ValueError:
        return False
    return True


def check_fingerprint(expected: Mapping, model: torch.nn.Module, *, check_weights: bool = True) -> None:
    """Raise ``ValueError`` if ``model`` is not the model ``expected`` (a :func:`model_fingerprint`) describes.

    Architecture, layer count, hidden size and linear shapes must match; sampled weights too unless
    ``check_weights=False``. Weights compressed since (tensor subclasses) are not compared.
    """
    actual = model_fingerprint(model)
    recalibrate = "recalibrate on this model (statistics of one model do not fit another)"
    for key in ("architecture", "model_type", "num_hidden_layers", "hidden_size"):
        if expected.get(key) != actual[key]:
            raise ValueError(
                f"calibration statistics were collected on a model with {key} {expected.get(key)!r}; this model has "
                f"{actual[key]!r}: {recalibrate}"
            )
    saved, ours = expected.get("linears") or {}, actual["linears"]
    if saved != ours:
        missing, extra = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
        reshaped = [f"{n} {tuple(saved[n])} -> {tuple(ours[n])}" for n in sorted(set(saved) & set(ours))
                    if list(saved[n]) != list(ours[n])]
        parts = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for what, names in (("not in this model", missing), ("not in the calibrated model", extra),
                                     ("other shapes", reshaped)) if names]
        raise ValueError(f"calibration statistics do not fit this model's linear layers ({'; '.join(parts)}): "
                         f"{recalibrate}")
    if not check_weights:
        return
    for name, values in (expected.get("weights") or {}).items():
        now = actual["weights"].get(name)
        if now is not None and any(abs(a - b) > _ATOL + _RTOL * abs(a) for a, b in zip(values, now)):
            raise ValueError(
                f"calibration statistics were collected on different weights (first difference: {name}); "
                "recalibrate, or pass check_weights=False (Calibration.load / bind) if you mean it"
            )
