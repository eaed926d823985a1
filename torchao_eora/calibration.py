"""Calibration: the second moment ``sum x^T x`` of every linear layer's inputs, the one statistic EoRA (and GPTQ,
SparseGPT, Wanda) needs.

Two modes:

* ``"sequential"`` (default, like GPTQ): decoder layers are visited in order; layer ``i``'s statistics come from
  inputs produced by layers ``< i`` already compressed and compensated with the given config, so every layer
  learns to correct the error it will really see. Only one decoder layer's activations are alive at a time.
  The model itself is not modified: each layer is compressed on a throw-away copy.
* ``"one-shot"``: hooks on the original model, one forward pass per batch. Cheaper, for comparison.

Statistics are collected once per *distinct input*: q/k/v projections read the same tensor, as do gate/up, so
they share one accumulator (and later one eigendecomposition). Products are computed in fp32 and summed in
fp64 over real tokens only (the attention mask drops padding).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .io_utils import current_umask
from .solver import Eigen, eigen_of

if TYPE_CHECKING:
    from .config import EoRAConfig

__all__ = ["SecondMoment", "Calibration", "calibrate", "check_fingerprint", "find_decoder_layers", "model_fingerprint"]

log = logging.getLogger(__name__)
Mode = Literal["sequential", "one-shot"]


@dataclass
class SecondMoment:
    """``total = sum over real tokens of x x^T`` (in x in, fp64) and the number of tokens summed."""

    total: torch.Tensor
    n_tokens: int = 0

    def mean(self) -> torch.Tensor:
        """``X^T X / n``: the scale-free form the solver and GPTQ use."""
        if self.n_tokens == 0:
            raise ValueError("no calibration tokens reached this layer (all padding?)")
        return self.total / self.n_tokens


class Calibration:
    """Per-layer second moments of a calibration run, keyed by the fully qualified names of the linear modules.

    ``groups`` maps a group key to its ``SecondMoment``; ``group_of`` maps each linear module's name to the group
    of modules that read the same input. ``config`` is the ``EoRAConfig`` the run compressed with (sequential
    mode), so ``eora_config(calib)`` reproduces it. Bind to a model (``bind``) to let ``quantize_`` find a module's
    statistics: torchao's handlers see the module, never its name.

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
    ):
        self.groups = dict(groups)
        self.group_of = dict(group_of)
        self.mode = mode
        self.config = config
        self.fingerprint = fingerprint
        self.check_weights = check_weights
        self._names: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
        self._eigen_cache: "OrderedDict[str, Eigen]" = OrderedDict()

    def __repr__(self) -> str:
        tokens = max((m.n_tokens for m in self.groups.values()), default=0)
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
        (as ``load(..., check_weights=...)``'s is): later binds, such as the one in ``compress``, keep it; the
        default, None, uses the remembered one (True unless set).
        Weights already compressed (``QuantWithLowRank``) are not compared, so binding after quantizing works.
        (With a ``prefix``, only a part of the model is bound, e.g. the copy of one decoder layer in sequential
        calibration: there is nothing whole to compare.)
        """
        if check_weights is not None:
            self.check_weights = check_weights
        if not prefix and self.fingerprint is not None:
            check_fingerprint(self.fingerprint, model, check_weights=self.check_weights)
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
            "n_tokens": {k: m.n_tokens for k, m in self.groups.items()},
            "config": None if self.config is None else config_to_dict(replace(self.config, calibration=None)),
            "fingerprint": self.fingerprint,
        }
        tensors = {k: m.total.contiguous() for k, m in self.groups.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"torchao_eora.calibration": json.dumps(meta)})
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: torch.nn.Module | None = None, *, check_weights: bool = True
    ) -> "Calibration":
        """Read statistics written by ``save``; pass ``model`` to bind them to its modules right away.

        Binding checks that ``model`` is the one the statistics were collected on (see ``bind``);
        ``check_weights=False`` accepts other weights of the same architecture and shapes, for this bind and later
        ones. A file without a fingerprint (written by an older version) loads with a warning and is not checked.
        """
        from safetensors import safe_open
        from .config import config_from_json

        from safetensors import SafetensorError

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("torchao_eora.calibration")
        except SafetensorError as e:  # a pickle or anything else: never unpickled, refused
            raise ValueError(f"{path} is not a torchao-eora calibration file (not safetensors: {e})") from None
        if raw is None:
            raise ValueError(f"{path} is not a torchao-eora calibration file (no 'torchao_eora.calibration' metadata)")
        meta = json.loads(raw)
        tensors = load_file(str(path))
        missing = set(meta["n_tokens"]) - set(tensors)
        if missing:
            raise ValueError(f"{path} is truncated or corrupt: missing tensors {sorted(missing)[:5]}")
        groups = {k: SecondMoment(tensors[k], n) for k, n in meta["n_tokens"].items()}
        config = None if meta["config"] is None else config_from_json(meta["config"], f"calibration file {path}")
        fingerprint = meta.get("fingerprint")
        if fingerprint is None:
            log.warning(
                "%s has no model fingerprint (written by an older torchao-eora): cannot check that its statistics "
                "belong to this model; recalibrate to get a checked file", path,
            )
        calib = cls(groups, meta["group_of"], meta["mode"], config, fingerprint, check_weights)
        return calib.bind(model) if model is not None else calib


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


# ---- collecting statistics ------------------------------------------------------------------------------------


class _MomentCollector:
    """Forward pre-hooks on linear modules that accumulate ``sum x^T x`` once per distinct input tensor."""

    def __init__(self, modules: Mapping[str, torch.nn.Linear]):
        self.modules = dict(modules)
        self.groups: dict[str, SecondMoment] = {}
        self.group_of: dict[str, str] = {}
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool of the batch being run
        self._last_input: torch.Tensor | None = None
        self._last_group: str | None = None
        self._handles = []

    def __enter__(self) -> "_MomentCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_input = None

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self.token_mask = None if attention_mask is None else attention_mask.bool()
        self._last_input = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if x is self._last_input:  # same tensor as the previous module (q/k/v, gate/up): already counted
                self.group_of.setdefault(name, self._last_group)
                return
            group = self.group_of.setdefault(name, name)
            self._last_input, self._last_group = x, group
            self._accumulate(name, group, x)

        return hook

    def _accumulate(self, name: str, group: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        mask = self.token_mask
        if mask is not None and mask.numel() == flat.shape[0]:
            flat = flat[mask.reshape(-1).to(flat.device)]
        flat = flat.float()
        if not torch.isfinite(flat).all():
            raise ValueError(
                f"non-finite (NaN/inf) activations at the input of {name!r}: the model overflowed on the "
                "calibration data. Run calibration in float32 (model.float()) or check the inputs."
            )
        moment = self.groups.get(group)
        if moment is None:
            moment = self.groups[group] = SecondMoment(torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device))
        moment.total += (flat.T @ flat).double()  # fp32 product, fp64 running sum
        moment.n_tokens += flat.shape[0]


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks (``model.model.layers`` for Llama-style models) and its name.

    Of the non-empty ``ModuleList``s (of ``config.num_hidden_layers`` entries when the model says how many), the one
    holding the most ``nn.Linear`` parameters: another list before the blocks (norms, rotary tables) is skipped.
    Raises ValueError when no candidate holds a linear layer, naming the layer types it found instead.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n)
    ]
    scored = [(sum(m.weight.numel() for m in _linears(module, "").values()), name, module) for name, module in candidates]
    best = max(scored, key=lambda t: t[0], default=None)
    if best is None or best[0] == 0:
        raise ValueError(_no_linears_message(model, [name for name, _ in candidates]))
    return best[1], best[2]


def _no_linears_message(model: torch.nn.Module, lists: list[str]) -> str:
    weighted = sorted({
        type(m).__name__ for m in model.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
        and not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
    })
    where = f"the decoder layers of {type(model).__name__} ({', '.join(lists)}" if lists else type(model).__name__
    found = f"; found {', '.join(weighted)} instead" if weighted else ""
    closing = ")" if lists else ""
    return (
        f"no supported linear layers found in {where}{found}{closing}: EoRA compresses torch.nn.Linear layers inside "
        "a ModuleList of decoder blocks"
    )


def _linears(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    return {prefix + n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


class _StopForward(Exception):
    pass


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_batches(batches: Iterable[Mapping[str, torch.Tensor]]) -> list[Mapping[str, torch.Tensor]]:
    batches = list(batches)
    if not batches:
        raise ValueError(
            "the calibration set is empty: pass at least one batch of {'input_ids', 'attention_mask'} "
            "(torchao_eora.data.calibration_batches builds them from text)"
        )
    for b in batches:
        if "input_ids" not in b:
            raise ValueError(f"each calibration batch needs 'input_ids' (and ideally 'attention_mask'); got {list(b)}")
    return batches


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: "EoRAConfig | None" = None,
    *,
    mode: Mode = "sequential",
    progress: bool = True,
) -> Calibration:
    """Collect the input second moment of every linear layer inside the decoder blocks.

    Args:
        model: a Hugging Face causal LM (or any model with a ``ModuleList`` of decoder layers) in eval mode.
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T); padded positions are
            excluded from the statistics.
        config: the ``EoRAConfig`` the model will be compressed with. Required in sequential mode, where earlier
            layers are compressed and compensated with it before later layers are measured.
        mode: ``"sequential"`` (recommended) or ``"one-shot"`` (statistics of the original model).
        progress: show a tqdm bar.

    Returns:
        A ``Calibration`` bound to ``model``; pass it on with ``eora_config(calib)`` or
        ``EoRAConfig(..., calibration=calib)``.
    """
    batches = _check_batches(batches)
    fingerprint = model_fingerprint(model)  # of the original weights, before any layer is compressed
    if config is not None:  # fail on a layer the config cannot convert now, not after calibrating the ones before
        from .targets import check_targets

        prefix, layers = find_decoder_layers(model)
        check_targets(_linears(layers, prefix + "."), replace(config, calibration=None))
    if mode == "sequential":
        if config is None:
            raise ValueError("sequential calibration compresses as it goes: pass the EoRAConfig you will quantize with")
        calib = _calibrate_sequential(model, batches, config, progress)
    elif mode == "one-shot":
        calib = _calibrate_one_shot(model, batches, progress)
        calib.config = config
    else:
        raise ValueError(f"mode must be 'sequential' or 'one-shot', got {mode!r}")
    calib.fingerprint = fingerprint
    return calib.bind(model)


def _calibrate_one_shot(model, batches, progress) -> Calibration:
    prefix, layers = find_decoder_layers(model)
    device = _device_of(model)
    with _MomentCollector(_linears(layers, prefix + ".")) as collector:
        for batch in tqdm(batches, desc="calibrating (one-shot)", disable=not progress):
            batch = _to(batch, device)
            collector.start_batch(batch.get("attention_mask"))
            model(**batch, use_cache=False)
    return Calibration(collector.groups, collector.group_of, "one-shot")


def _capture_layer_inputs(model, layer0, batches, device):
    """Run the embedding part of the model once per batch and keep what the first decoder layer receives."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), dict(kwargs)))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**_to(batch, device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _calibrate_sequential(model, batches, config, progress) -> Calibration:
    from torchao.quantization import quantize_

    prefix, layers = find_decoder_layers(model)
    device = _device_of(model)
    inputs = _capture_layer_inputs(model, layers[0], batches, device)
    masks = [b.get("attention_mask") for b in batches]
    groups: dict[str, SecondMoment] = {}
    group_of: dict[str, str] = {}
    calib = Calibration(groups, group_of, "sequential", replace(config, calibration=None))

    for i in tqdm(range(len(layers)), desc="calibrating (sequential)", disable=not progress):
        layer, layer_prefix = layers[i], f"{prefix}.{i}."
        with _MomentCollector(_linears(layer, layer_prefix)) as collector:
            for (hidden, kwargs), mask in zip(inputs, masks):
                collector.start_batch(mask)
                layer(hidden, **kwargs)
        calib.groups.update(collector.groups)
        calib.group_of.update(collector.group_of)

        # The next layer must see this layer compressed + compensated: do it on a copy, keep the model intact.
        compressed = copy.deepcopy(layer)
        calib.bind(compressed, prefix=layer_prefix)
        quantize_(compressed, replace(config, calibration=calib))
        inputs = [(_layer_output(compressed(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        del compressed
        calib._eigen_cache.clear()
    return calib


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out
