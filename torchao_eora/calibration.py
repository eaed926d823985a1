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

from .solver import Eigen, eigen_of

if TYPE_CHECKING:
    from .config import EoRAConfig

__all__ = ["SecondMoment", "Calibration", "calibrate", "find_decoder_layers"]

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
    """

    def __init__(
        self,
        groups: Mapping[str, SecondMoment],
        group_of: Mapping[str, str],
        mode: Mode,
        config: "EoRAConfig | None" = None,
    ):
        self.groups = dict(groups)
        self.group_of = dict(group_of)
        self.mode = mode
        self.config = config
        self._names: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
        self._eigen_cache: "OrderedDict[str, Eigen]" = OrderedDict()

    def __repr__(self) -> str:
        tokens = max((m.n_tokens for m in self.groups.values()), default=0)
        return (
            f"Calibration(mode={self.mode!r}, modules={len(self.group_of)}, distinct_inputs={len(self.groups)}, "
            f"tokens={tokens})"
        )

    # ---- lookup ------------------------------------------------------------------------------------------------

    def bind(self, model: torch.nn.Module, prefix: str = "") -> "Calibration":
        """Remember which module object carries which name, so the quantize_ handler can look it up."""
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
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> "Calibration":
        """Read statistics written by ``save``; pass ``model`` to bind them to its modules right away."""
        from safetensors import safe_open
        from torchao.core.config import config_from_dict

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("torchao_eora.calibration")
        if raw is None:
            raise ValueError(f"{path} is not a torchao-eora calibration file (no 'torchao_eora.calibration' metadata)")
        meta = json.loads(raw)
        tensors = load_file(str(path))
        missing = set(meta["n_tokens"]) - set(tensors)
        if missing:
            raise ValueError(f"{path} is truncated or corrupt: missing tensors {sorted(missing)[:5]}")
        groups = {k: SecondMoment(tensors[k], n) for k, n in meta["n_tokens"].items()}
        config = None if meta["config"] is None else config_from_dict(meta["config"])
        calib = cls(groups, meta["group_of"], meta["mode"], config)
        return calib.bind(model) if model is not None else calib


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """The ``ModuleList`` of decoder blocks (``model.model.layers`` for Llama-style models) and its name."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    raise TypeError(
        f"{type(model).__name__} has no list of decoder layers to calibrate sequentially; "
        "use calibrate(..., mode='one-shot') for other architectures"
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
    if mode == "sequential":
        if config is None:
            raise ValueError("sequential calibration compresses as it goes: pass the EoRAConfig you will quantize with")
        calib = _calibrate_sequential(model, batches, config, progress)
    elif mode == "one-shot":
        calib = _calibrate_one_shot(model, batches, progress)
        calib.config = config
    else:
        raise ValueError(f"mode must be 'sequential' or 'one-shot', got {mode!r}")
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
