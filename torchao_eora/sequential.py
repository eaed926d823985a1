"""The sequential job, the only place that loops over decoder layers: capture the inputs of the first layer, then per
layer collect its input moments, compress and solve each of its linears once, and run the *compressed* layer to
make the next layer's inputs (torchao's GPTQ example ``sequential_quantize``, GPTQModel's looper).

Only one layer's activations are alive at a time, and with a streaming ``LayerIO`` (``streaming.py``) only one
layer's weights: a model larger than memory is compressed layer by layer on the compute device (CUDA when present,
else CPU). ``calibrate`` (the public two-step flow) runs the same loop on a copy of each layer and keeps the
compressed weights for ``quantize_`` to install, so nothing is compressed twice.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
from dataclasses import replace
from typing import Iterable, Literal, Mapping, Protocol

import torch
from tqdm.auto import tqdm

from .calibration import Calibration, SecondMoment, model_fingerprint
from .config import EoRAConfig
from .targets import check_targets
from .timing import Timer
from .transform import eora_quantize_tensor, install

__all__ = ["LayerIO", "calibrate", "compress_sequential", "compute_device", "find_decoder_layers"]

log = logging.getLogger(__name__)
Mode = Literal["sequential", "one-shot"]
_BLOCK = 1024  # columns of x^T x computed at a time


def compute_device() -> torch.device:
    """Where layers are compressed: the GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LayerIO(Protocol):
    """Where a decoder layer's weights come from and where the finished layer goes (see ``streaming.py``)."""

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        """Make ``layer``'s weights real on ``device`` before it is measured."""

    def done(self, index: int, layer: torch.nn.Module) -> None:
        """``layer`` is compressed: keep, write or free it."""


class InMemory:
    """The model is in memory: move each layer to the compute device for its turn and back after.

    A layer that accelerate offloads (``device_map`` with "cpu"/"disk", its weights on meta behind a hook) is taken
    over: its weights are onloaded, its hooks removed (they would restore the original weights at every forward),
    and once compressed it stays on the CPU.
    """

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        if any(hasattr(m, "_hf_hook") for m in layer.modules()):
            _take_over_from_accelerate(layer, device)
            self._home[index] = torch.device("cpu")
            return
        home = next(layer.parameters()).device
        self._home[index] = home
        if home != device:
            layer.to(device)

    def done(self, index: int, layer: torch.nn.Module) -> None:
        home = self._home.pop(index)
        if next(layer.parameters()).device != home:
            layer.to(home)


def _take_over_from_accelerate(layer: torch.nn.Module, device: torch.device) -> None:
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import align_module_device, set_module_tensor_to_device

    with contextlib.ExitStack() as stack:  # real weights for a moment, wherever they were offloaded to
        for module in layer.modules():
            if hasattr(module, "_hf_hook"):
                stack.enter_context(align_module_device(module, device))
        state = {k: v.detach().to(device, copy=True) for k, v in layer.state_dict().items()}
    remove_hook_from_module(layer, recurse=True)
    for name, value in state.items():
        set_module_tensor_to_device(layer, name, device, value=value)


@torch.inference_mode()
def compress_sequential(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: EoRAConfig,
    *,
    in_place: bool = True,
    keep_statistics: bool = True,
    layer_io: LayerIO | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    timer: Timer | None = None,
) -> Calibration:
    """Compress every linear of every decoder layer with ``config``, layer by layer, each exactly once.

    Args:
        model: a causal LM with a ``ModuleList`` of decoder layers (its weights may be on the meta device when
            ``layer_io`` materialises them).
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (padding is left out); may be
            empty for a data-free config (no forward passes then).
        config: the compression; its ``calibration`` is ignored (this pass makes the statistics).
        in_place: compress the model's layers (True), or copies of them, keeping the compressed weights in the
            returned ``Calibration.results`` and the model untouched (``calibrate``).
        keep_statistics: keep every layer's second moments in the result (to save them, or to quantize again
            with another config); False frees each layer's statistics once it is done (large models).
        layer_io: loads and stores layers (default: the model is in memory).
        device: where to run each layer (default: CUDA when present, else CPU).
        timer: adds seconds to ``forward``, ``moments``, ``compress``, ``solve`` (and whatever ``layer_io`` adds).

    Returns:
        The ``Calibration`` (config, fingerprint of the uncompressed model, statistics if kept, results if not
        in place), not yet bound.
    """
    timer = timer or Timer()
    device = torch.device(device) if device is not None else compute_device()
    layer_io = layer_io or InMemory()
    config = replace(config, calibration=None)
    batches = list(batches)
    # Statistics are collected when the config needs them or batches are given; a data-free config with no batches
    # (streaming RTN + SVD) runs no forward pass at all.
    needs_data = bool(batches) or config.method == "eora" or bool(getattr(config.base, "needs_calibration", False))
    batches = _check_batches(batches) if needs_data else []
    prefix, layers = find_decoder_layers(model)
    check_targets(_linears(layers, prefix + "."), config)  # every layer before the first changes (meta: shapes only)
    calib = Calibration({}, {}, "sequential", config, fingerprint=model_fingerprint(model))
    with timer("forward"):
        inputs = _capture_layer_inputs(model, layers[0], batches, device)
    masks = [b.get("attention_mask") for b in batches]
    bar = tqdm(range(len(layers)), desc=f"compressing ({config.describe()})", disable=not progress)
    for i in bar:
        layer = layers[i]
        layer_io.load(i, layer, device)
        linears = _linears(layer, f"{prefix}.{i}.")
        check_targets(linears, config, warn=False)  # now with the real weights (NaN), when they were streamed in
        with _MomentCollector(linears, timer) as collector, timer("forward"):
            for (hidden, kwargs), mask in zip(inputs, masks):
                collector.start_batch(mask)
                layer(hidden, **kwargs)
        if not keep_statistics:  # nobody needs the sums: divide in place, the solver then reads them without a copy
            for moment in collector.groups.values():
                moment.normalize_()
        stats = Calibration(collector.groups, collector.group_of, "sequential")
        target = layer if in_place else copy.deepcopy(layer)
        targets = _linears(target, f"{prefix}.{i}.")
        last_reader = {stats.group_of[n]: n for n in targets if n in stats.group_of}  # q/k/v: v reads it last
        for name, module in targets.items():
            module_stats = stats.stats_of(name) if needs_data else None
            weight = eora_quantize_tensor(module.weight, config, module_stats, timer=timer)
            install(module, weight)
            if not in_place:
                calib.results[name] = weight
            group = stats.group_of.get(name)
            if not keep_statistics and last_reader.get(group) == name:  # its last reader is done: free it now
                del stats.groups[group]
                stats._eigen_cache.pop(group, None)
        with timer("forward"):
            for j, (hidden, kwargs) in enumerate(inputs):  # batch by batch: one batch's old activations at a time
                inputs[j] = (_output(target(hidden, **kwargs)), kwargs)
        calib.group_of.update(stats.group_of)
        if keep_statistics:
            calib.groups.update(stats.groups)
        del stats, target, collector
        layer_io.done(i, layer)
        _release_free_memory()
    timer.seconds["forward"] -= timer.seconds.get("moments", 0.0)  # the moment hooks ran inside the forward passes
    return calib


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: EoRAConfig | None = None,
    *,
    mode: Mode = "sequential",
    progress: bool = True,
) -> Calibration:
    """Collect the input second moment of every linear layer inside the decoder blocks; the model is not changed.

    Args:
        model: a Hugging Face causal LM (or any model with a ``ModuleList`` of decoder layers) in eval mode.
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T); padded positions are
            excluded from the statistics.
        config: the ``EoRAConfig`` the model will be compressed with. Required in sequential mode: layer ``i`` is
            measured behind layers ``< i`` compressed and compensated with it (each on a copy, compressed once;
            ``quantize_(model, eora_config(calib))`` then installs those weights).
        mode: ``"sequential"`` (recommended) or ``"one-shot"`` (statistics of the original model).
        progress: show a tqdm bar.

    Returns:
        A ``Calibration`` bound to ``model``; pass it on with ``eora_config(calib)`` or
        ``EoRAConfig(..., calibration=calib)``.
    """
    batches = _check_batches(batches)
    if config is not None and mode != "sequential":  # fail now on a layer the config cannot convert
        prefix, layers = find_decoder_layers(model)
        check_targets(_linears(layers, prefix + "."), replace(config, calibration=None), warn=False)
    if mode == "sequential":
        if config is None:
            raise ValueError("sequential calibration compresses as it goes: pass the EoRAConfig you will quantize with")
        calib = compress_sequential(model, batches, config, in_place=False, progress=progress,
                                    device=next(model.parameters()).device)
    elif mode == "one-shot":
        calib = _calibrate_one_shot(model, batches, progress)
        calib.config = None if config is None else replace(config, calibration=None)
    else:
        raise ValueError(f"mode must be 'sequential' or 'one-shot', got {mode!r}")
    return calib.bind(model)


def _calibrate_one_shot(model, batches, progress) -> Calibration:
    fingerprint = model_fingerprint(model)
    prefix, layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    with _MomentCollector(_linears(layers, prefix + ".")) as collector:
        for batch in tqdm(batches, desc="calibrating (one-shot)", disable=not progress):
            batch = _to(batch, device)
            collector.start_batch(batch.get("attention_mask"))
            model(**batch, use_cache=False)
    return Calibration(collector.groups, collector.group_of, "one-shot", fingerprint=fingerprint)


# ---- collecting statistics ------------------------------------------------------------------------------------


class _MomentCollector:
    """Forward pre-hooks on linear modules that accumulate ``sum x^T x`` once per distinct input tensor, in fp64
    from fp32 products, over real tokens only."""

    def __init__(self, modules: Mapping[str, torch.nn.Linear], timer: Timer | None = None):
        self.modules = dict(modules)
        self.timer = timer or Timer()
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
            with self.timer("moments"):
                self._accumulate(name, group, x)

        return hook

    def _accumulate(self, name: str, group: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        mask = self.token_mask
        if mask is not None and mask.numel() == flat.shape[0] and not bool(mask.all()):  # a copy only if padded
            flat = flat[mask.reshape(-1).to(flat.device)]
        flat = flat.float()
        if not torch.isfinite(flat).all():
            raise ValueError(
                f"non-finite (NaN/inf) activations at the input of {name!r}: the model overflowed on the "
                "calibration data. Run calibration in float32 (model.float()) or check the inputs."
            )
        moment = self.groups.get(group)
        if moment is None:
            n = flat.shape[1]
            moment = self.groups[group] = SecondMoment(torch.zeros(n, n, dtype=torch.float64, device=flat.device))
        for start in range(0, flat.shape[1], _BLOCK):  # fp32 products, fp64 running sum; in column blocks so the
            block = flat[:, start:start + _BLOCK]  # temporaries stay small (a 7B down_proj's full product is 2 GiB)
            moment.total[:, start:start + _BLOCK] += (flat.T @ block).double()
        moment.n_tokens += flat.shape[0]


# ---- the model's decoder layers and their inputs ----------------------------------------------------------------


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


def _to(obj, device: torch.device):
    """Tensors (also inside dicts, tuples and lists) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


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


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where the embeddings are (the batches go there); the first real parameter's device otherwise."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for p in (embedding.parameters() if embedding is not None else model.parameters()):
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _capture_layer_inputs(model, layer0, batches, device: torch.device):
    """Run the part of the model before the first decoder layer once per batch, and keep what that layer receives
    (hidden states and keyword arguments such as the mask and position embeddings), on ``device``."""
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.to(device), _to(dict(kwargs), device)))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    source = _input_device(model)
    try:
        for batch in batches:
            try:
                model(**_to(dict(batch), source), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _release_free_memory() -> None:
    """Hand the heap memory freed by the last layer back to the OS (glibc keeps it otherwise, and the peak resident
    size of a long job grows with fragmentation); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out
