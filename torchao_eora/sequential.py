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
import logging
import types
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Literal, Mapping, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .allocator import LONG_LIVED_BYTES, release_free_memory, set_mmap_threshold, transient_allocations
from .anchor import AnchorCollector
from .calibration import Calibration, model_fingerprint
from .config import EoRAConfig
from .coverage import check_coverage
from .experts import (WEIGHTED_DOWN, check_experts, compress_experts, expert_token_counts, expert_weights,
                      find_experts, use_eager_experts)
from .moments import MomentCollector, StopForward
from .rank_budget import allocate_ranks
from .output_weights import output_gradient_moments, output_weighting
from .solver import error_spectrum, output_energy
from .targets import check_targets, module_rank
from .tensor import QuantWithLowRank
from .timing import Timer
from .transform import eora_quantize_tensor, install, residual_stats

__all__ = ["LayerIO", "calibrate", "compress_sequential", "compute_device", "find_decoder_layers"]

log = logging.getLogger(__name__)
Mode = Literal["sequential", "one-shot"]


def compute_device() -> torch.device:
    """Where layers are compressed: the GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LayerIO(Protocol):
    """Where a decoder layer's weights come from and where the finished layer goes (see ``streaming.py``)."""

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        """Make ``layer``'s weights real on ``device`` before it is measured."""

    def done(self, index: int, layer: torch.nn.Module) -> None:
        """``layer`` is compressed: keep, write or free it."""

    # Optional: ``written(index) -> bool``, True for a layer a resumed job already wrote; ``load`` then gives it its
    # compressed weights, and the pass only runs it to make the next layer's inputs.


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
    ranks: Mapping[str, int] | None = None,
    spectra: dict[str, torch.Tensor] | None = None,
    energies: dict[str, float] | None = None,
    output_gradients: Mapping[str, torch.Tensor] | None = None,
    allow_partial: bool = False,
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
        timer: adds seconds to ``forward``, ``moments``, ``compress``, ``solve``, ``gradients`` (output weighting's
            backward pass) and whatever ``layer_io`` adds.
        ranks: per-module residual ranks (module name -> rank) instead of ``config.rank``. With
            a budgeted ``config.rank_budget`` and no ``ranks``, a first pass (on layer copies) measures every
            module's error spectrum and ``rank_budget.allocate_ranks`` chooses them.
        spectra: filled with every module's error spectrum (``solver.error_spectrum``), when given.
        energies: filled with every module's output energy (``solver.output_energy``), when given.
        output_gradients: with ``config.output_weighting="gradient"``, the loss gradients' diagonals by module name
            (``output_weights.output_gradient_moments``) when already computed (default: computed here).
        allow_partial: compress what is supported even when a large weight holder of the decoder layers (an
            unknown expert layout, a Conv1D) would stay uncompressed; by default that is a ValueError naming it.

    Returns:
        The ``Calibration`` (config, fingerprint of the uncompressed model, statistics if kept, results if not
        in place), not yet bound; its ``coverage`` says which share of the model's weights is compressed.
    """
    timer = timer or Timer()
    device = torch.device(device) if device is not None else compute_device()
    layer_io = layer_io or InMemory()
    set_mmap_threshold(LONG_LIVED_BYTES)
    config = replace(config, calibration=None)
    batches = list(batches)
    if output_gradients is None and config.output_weighting != "none" and config.compensation == "eora":
        if not isinstance(layer_io, InMemory):
            raise ValueError("output_weighting='gradient' backpropagates through the whole model: compress it in "
                             "memory, stream it with quantize_checkpoint (one layer at a time), or pass "
                             "output_gradients (layerwise_gradients.layerwise_output_gradient_moments)")
        prefix, layers = find_decoder_layers(model)
        with timer("gradients"):
            output_gradients = output_gradient_moments(model, _check_batches(batches), _linears(layers, prefix + "."))
    if ranks is None and config.rank_budget != "uniform" and config.compensation != "none":
        if not isinstance(layer_io, InMemory):
            raise ValueError(f"rank_budget={config.rank_budget!r} runs two passes over the layers: compress the "
                             "model in memory, or use rank_budget='uniform' when streaming it from disk")
        ranks = _global_ranks(model, batches, config, device=device, progress=progress, timer=timer,
                              output_gradients=output_gradients)
    # Statistics are collected when the config needs them or batches are given; a data-free config with no batches
    # (streaming RTN + SVD) runs no forward pass at all.
    needs_data = bool(batches) or config.compensation == "eora" or bool(getattr(config.base, "needs_calibration", False))
    batches = _check_batches(batches) if needs_data else []
    prefix, layers = find_decoder_layers(model)
    check_targets(_linears(layers, prefix + "."), config)  # every layer before the first changes (meta: shapes only)
    experts = find_experts(layers, prefix + ".")
    check_experts(experts, config)
    targets = {f"{name}.weight": m.weight for name, m in _linears(layers, prefix + ".").items()}
    targets.update(expert_weights(experts))
    coverage = check_coverage(model, layers, prefix, targets, allow_partial=allow_partial)
    log.info(coverage.describe())
    if experts:
        use_eager_experts(model)
    calib = Calibration({}, {}, "sequential", config, fingerprint=model_fingerprint(model), ranks=ranks)
    calib.coverage = coverage
    # v_proj's compressor or EoRA's residual sees the attention-weighted moment: it needs the attention
    # probabilities (eager attention)
    value_moments = needs_data and (config.attention_value_moment or config.attention_value_residual)
    split = config.compensation == "eora" and config.shrinkage == "auto"  # halves to cross-validate the shrinkage
    anchored = needs_data and config.target == "anchored"
    written = getattr(layer_io, "written", None)
    if anchored and written is not None and any(written(i) for i in range(len(layers))):
        raise ValueError("a resumed job cannot continue target='anchored' (the written layers no longer have the "
                         "original weights it runs): start it again without --resume")
    with _attention("eager" if value_moments else None, model):
        with timer("forward"):
            hidden, layer_kwargs = _capture_layer_inputs(model, layers, batches, device)
            # the anchored target's original activations, beside the compressed prefix's (as much memory again)
            original = [h.clone() for h in hidden] if anchored else None
        masks = [b.get("attention_mask") for b in batches]
        bar = tqdm(range(len(layers)), desc=f"compressing ({config.describe()})", disable=not progress)
        for i in bar:
            layer, kwargs = layers[i], layer_kwargs[i]
            layer_io.load(i, layer, device)
            if written is not None and written(i):  # compressed by the run this one resumes: make the next inputs
                with timer("forward"), transient_allocations(), _dense_linears(_linears(layer, "")):
                    for h, kw in zip(hidden, kwargs):
                        h.copy_(_output(layer(h, **kw)))
                layer_kwargs[i] = None
                del kwargs
                layer_io.done(i, layer)
                continue
            linears = _linears(layer, f"{prefix}.{i}.")
            check_targets(linears, config, warn=False)  # now with the real weights (NaN), when they were streamed in
            # per kv head for the compressor; EoRA's residual alone reads the sum (1/H_kv of the memory)
            values = _value_projections(layer, f"{prefix}.{i}.", config.attention_value_moment) if value_moments else {}
            layer_experts = find_experts(layer, f"{prefix}.{i}.") if needs_data else {}
            anchor = AnchorCollector(linears, timer) if anchored else None
            with anchor or contextlib.nullcontext(), \
                    MomentCollector(linears, timer, values, stop_when_done=True, split=split, experts=layer_experts,
                                    weighted_down=WEIGHTED_DOWN) as collector, \
                    timer("forward"), \
                    transient_allocations():
                for b, (h, kw, mask) in enumerate(zip(hidden, kwargs, masks)):
                    if anchor is not None:  # the original layer on the original activations, then the next ones
                        with collector.paused(), anchor.recording(mask):
                            original[b].copy_(_output(layer(original[b], **kw)))
                    collector.start_batch(mask, h.shape[0])
                    with contextlib.suppress(StopForward):  # the rest of the layer feeds no statistic
                        layer(h, **kw)
            release_free_memory()  # the activations of the measuring passes
            if not keep_statistics:  # nobody needs the sums: divide in place, the solver reads them without a copy
                collector.normalize_()
            stats = Calibration(collector.groups, collector.group_of, "sequential",
                                value_group_of=collector.value_group_of)
            del collector  # stats holds the moments alone now: each is freed once its last reader is compressed
            shifts = {}
            if anchor is not None:
                with timer("solve"):
                    shifts = {name: anchor.shift(name, m.weight, stats.stats_of(name).moment)
                              for name, m in anchor.modules.items()}
                del anchor
            target = layer if in_place else copy.deepcopy(layer)
            results = _compress_layer(_linears(target, f"{prefix}.{i}."), config, stats if needs_data else None,
                                      free_statistics=not keep_statistics, timer=timer, ranks=ranks or {},
                                      spectra=spectra, energies=energies, shifts=shifts,
                                      output_gradients=output_gradients)
            del shifts
            results.update(_compress_layer_experts(target, f"{prefix}.{i}.", config, stats if needs_data else None,
                                                   calib, timer))
            if not in_place:
                calib.results.update(results)
            del results
            with timer("forward"), transient_allocations(), _dense_linears(_linears(target, "")):
                for h, kw in zip(hidden, kwargs):  # in place: these long-lived buffers are allocated once
                    h.copy_(_output(target(h, **kw)))
            calib.group_of.update(stats.group_of)
            calib.value_group_of.update(stats.value_group_of)
            if keep_statistics:
                calib.groups.update(stats.groups)
            layer_kwargs[i] = None  # this layer's masks and rotary tables are not needed any more
            del stats, target, kwargs
            layer_io.done(i, layer)
            release_free_memory()
    timer.seconds["forward"] -= timer.seconds.get("moments", 0.0)  # the moment hooks ran inside the forward passes
    return calib


def _compress_layer(
    targets: Mapping[str, torch.nn.Linear], config: EoRAConfig, stats: Calibration | None, *,
    free_statistics: bool, timer: Timer, ranks: Mapping[str, int],
    spectra: dict[str, torch.Tensor] | None, energies: dict[str, float] | None = None,
    shifts: Mapping[str, torch.Tensor | None] | None = None,
    output_gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Compress and solve each linear of one layer once, in place; returns the new weights by name. With
    ``free_statistics``, a moment is dropped from ``stats`` as soon as its last reader is done (q/k/v: v_proj).
    ``spectra`` and ``energies``, when given, receive each module's error spectrum and output energy; ``shifts`` are
    the anchored target's (``anchor.py``) and ``output_gradients`` the loss gradients' diagonals at the outputs
    (``output_weights.py``), by name."""
    last_reader = {} if stats is None else {stats.group_of[n]: n for n in targets if n in stats.group_of}
    if stats is not None:
        last_reader.update({g: n for n, g in stats.value_group_of.items()})
    results = {}
    for name, module in targets.items():
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: the model may be fine-tuned later
            results[name] = _compress_module(name, module, config, stats, ranks, spectra, energies, timer,
                                             (shifts or {}).get(name), (output_gradients or {}).get(name))
        if free_statistics and stats is not None:
            for group in (stats.group_of.get(name), stats.value_group_of.get(name)):
                if group is not None and last_reader.get(group) == name:
                    del stats.groups[group]
                    stats._eigen_cache.pop(group, None)
    return results


def _compress_layer_experts(
    layer: torch.nn.Module, prefix: str, config: EoRAConfig, stats: Calibration | None, calib: Calibration,
    timer: Timer,
) -> dict[str, torch.Tensor]:
    """Compress the layer's fused experts in place (``experts.py``); their routed token counts go to
    ``calib.expert_tokens`` and the log. Returns the new weights by name."""
    results = {}
    for name, module in find_experts(layer, prefix).items():
        if stats is not None:
            calib.expert_tokens[name] = expert_token_counts(stats, name, module.gate_up_proj.shape[0])
            log.info("%s: calibration tokens per expert %s", name, calib.expert_tokens[name])
        results.update(compress_experts(name, module, config, stats, timer=timer))
    return results


def _compress_module(
    name: str, module: torch.nn.Linear, config: EoRAConfig, stats: Calibration | None, ranks: Mapping[str, int],
    spectra: dict[str, torch.Tensor] | None, energies: dict[str, float] | None, timer: Timer,
    shift: torch.Tensor | None = None, output_gradient: torch.Tensor | None = None,
) -> QuantWithLowRank:
    """One module's compressed weight, installed; its error spectrum (in loss units where ``output_gradient``, the
    module's ``output_weights.output_gradient_moments``, is given) into ``spectra`` and its output energy into
    ``energies``, each when given."""
    module_stats = None if stats is None else stats.stats_of(name)
    output_weight = None if output_gradient is None else output_weighting(output_gradient)
    weight = eora_quantize_tensor(module.weight, config, module_stats, rank=ranks.get(name), timer=timer,
                                  target_shift=shift, output_weight=output_weight)
    if spectra is not None or energies is not None:
        with timer("solve"):
            delta = module.weight.detach().float() - weight.dequantize_base(torch.float32)
            delta = delta if shift is None else delta + shift
            weighted = residual_stats(module_stats, config)
            moment = weighted.moment.mean() if weighted is not None and config.compensation == "eora" else None
            if spectra is not None and output_weight is not None:  # in loss units: weighted error x gradient's scale
                spectra[name] = error_spectrum(output_weight.sqrt()[:, None] * delta, moment) * output_gradient.mean()
            elif spectra is not None:
                spectra[name] = error_spectrum(delta, moment)
            if energies is not None:
                energies[name] = output_energy(module.weight.detach(), moment)
    install(module, weight)
    return weight


def _global_ranks(model, batches, config: EoRAConfig, *, device, progress: bool, timer: Timer,
                  output_gradients: Mapping[str, torch.Tensor] | None) -> dict[str, int]:
    """The per-module ranks of a budgeted ``config.rank_budget``: a sequential pass with uniform ranks on layer copies
    (the model is untouched) measures every module's error spectrum, then the same adapter parameters as uniform
    ranks are spent greedily (``rank_budget.allocate_ranks``): on the absolute activation-weighted error
    (``"global"``; in loss units under output weighting), or on each module's error relative to its own output
    energy (``"relative"``)."""
    spectra: dict[str, torch.Tensor] = {}
    energies: dict[str, float] | None = {} if config.rank_budget == "relative" else None  # an in x in product each
    compress_sequential(model, batches, replace(config, rank_budget="uniform"), in_place=False, keep_statistics=False,
                        device=device, progress=progress, timer=timer, spectra=spectra, energies=energies,
                        output_gradients=output_gradients)
    if energies is not None:
        spectra = {name: spectrum / energies[name] for name, spectrum in spectra.items()}
    prefix, layers = find_decoder_layers(model)
    shapes = {name: tuple(m.weight.shape) for name, m in _linears(layers, prefix + ".").items()}
    step = config.adapter_group_size if config.adapter_bits is not None else 1
    budget = sum(module_rank(config, *shape) * sum(shape) for shape in shapes.values())
    largest = replace(config, rank=4 * config.rank)
    max_ranks = {name: module_rank(largest, *shape) for name, shape in shapes.items()}
    ranks = allocate_ranks(spectra, shapes, budget, max_ranks, step)
    log.info("%s rank budget: ranks %d..%d (uniform %d)", config.rank_budget, min(ranks.values()),
             max(ranks.values()), config.rank)
    return ranks


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: EoRAConfig | None = None,
    *,
    mode: Mode = "sequential",
    progress: bool = True,
    allow_partial: bool = False,
) -> Calibration:
    """Collect the input second moment of every linear layer inside the decoder blocks; the model is not changed.

    Args:
        model: a Hugging Face causal LM (or any model with a ``ModuleList`` of decoder layers) in eval mode.
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T); padded positions are
            excluded from the statistics.
        config: the ``EoRAConfig`` the model will be compressed with. Required in sequential mode: layer ``i`` is
            measured behind layers ``< i`` compressed and compensated with it (each on a copy, compressed once;
            ``quantize_(model, eora_config(calib))`` then installs those weights).
        mode: ``"sequential"`` (recommended) or ``"one-shot"`` (statistics of the original model). Where the
            config's ``v_proj`` residual is weighted by the attention-mixed moment (or ``config`` is None), one-shot
            also collects that moment, summed over kv heads, which needs the attention probabilities: the
            forward runs eager attention and costs about twice the plain statistics.
        progress: show a tqdm bar.
        allow_partial: see ``compress_sequential`` (a large uncompressed weight holder is an error by default).

    Returns:
        A ``Calibration`` bound to ``model``; pass it on with ``eora_config(calib)`` or
        ``EoRAConfig(..., calibration=calib)``.
    """
    batches = _check_batches(batches)
    if config is not None and mode != "sequential":  # fail now on a layer the config cannot convert
        prefix, layers = find_decoder_layers(model)
        check_targets(_linears(layers, prefix + "."), replace(config, calibration=None), warn=False)
        targets = {f"{name}.weight": m.weight for name, m in _linears(layers, prefix + ".").items()}
        check_coverage(model, layers, prefix, targets, allow_partial=allow_partial)
    if mode == "sequential":
        if config is None:
            raise ValueError("sequential calibration compresses as it goes: pass the EoRAConfig you will quantize with")
        calib = compress_sequential(model, batches, config, in_place=False, progress=progress,
                                    device=next(model.parameters()).device, allow_partial=allow_partial)
    elif mode == "one-shot":
        if config is not None and config.sequential_only:
            raise ValueError(f"{config.sequential_only} is computed in the sequential pass: use mode='sequential'")
        split = config is None or config.shrinkage == "auto"  # a later config may still want it: None keeps them
        values = config is None or config.attention_value_residual
        calib = _calibrate_one_shot(model, batches, progress, split, values)
        calib.config = None if config is None else replace(config, calibration=None)
    else:
        raise ValueError(f"mode must be 'sequential' or 'one-shot', got {mode!r}")
    return calib.bind(model)


def _calibrate_one_shot(model, batches, progress, split: bool, values: bool) -> Calibration:
    fingerprint = model_fingerprint(model)
    prefix, layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    value_projections = {}
    for i, layer in enumerate(layers if values else ()):  # for EoRA's residual alone: summed over kv heads
        value_projections.update(_value_projections(layer, f"{prefix}.{i}.", per_kv_head=False))
    with _attention("eager" if value_projections else None, model), \
            MomentCollector(_linears(layers, prefix + "."), None, value_projections, stop_when_done=True,
                             split=split) as collector:
        for batch in tqdm(batches, desc="calibrating (one-shot)", disable=not progress):
            batch = _to(batch, device)
            collector.start_batch(batch.get("attention_mask"), batch["input_ids"].shape[0])
            with contextlib.suppress(StopForward):  # the final norm and lm_head feed no statistic
                model(**batch, use_cache=False)
    return Calibration(collector.groups, collector.group_of, "one-shot", fingerprint=fingerprint,
                       value_group_of=collector.value_group_of)


@contextlib.contextmanager
def _dense_linears(linears: Mapping[str, torch.nn.Linear]):
    """Inside, each compressed linear multiplies by its dense effective weight ``W_c + B @ A``, built for the call
    and freed after it (one module's at a time): one GEMM instead of dequantize + GEMM + two skinny GEMMs. The
    compressed layer's outputs (the next layer's inputs) are the same up to float rounding."""
    def forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, module.weight.dequantize(x.dtype), module.bias)

    patched = {m: m.__dict__.get("forward") for m in linears.values() if isinstance(m.weight, QuantWithLowRank)}
    for module in patched:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module, own in patched.items():
            if own is None:
                del module.forward
            else:
                module.forward = own


def _value_projections(
    layer: torch.nn.Module, prefix: str, per_kv_head: bool = True,
) -> dict[str, tuple[torch.nn.Module, torch.nn.Linear, int | None]]:
    """The attention modules of a decoder layer with a separate ``v_proj`` linear and a ``head_dim`` (Llama, Gemma,
    Qwen, Mistral, ...): v_proj's name -> (attention module, v_proj, number of kv heads, or None with
    ``per_kv_head=False``: one moment summed over them). Fused qkv projections have no v_proj of their own and
    keep the plain moment."""
    found = {}
    for name, module in layer.named_modules():
        v_proj, head_dim = getattr(module, "v_proj", None), getattr(module, "head_dim", None)
        if isinstance(v_proj, torch.nn.Linear) and isinstance(head_dim, int) and head_dim > 0 \
                and v_proj.out_features % head_dim == 0:
            heads = v_proj.out_features // head_dim if per_kv_head else None
            found[f"{prefix}{name + '.' if name else ''}v_proj"] = (module, v_proj, heads)
    return found


@contextlib.contextmanager
def _attention(implementation: str | None, model: torch.nn.Module):
    """Run the block with the model's attention implementation set to ``implementation`` (None: unchanged)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if implementation is None or before == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


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


def _to(obj, device: torch.device, moved: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Tensors (also inside dicts, tuples and lists) moved to ``device``; ``moved`` (id -> (original, copy)) moves
    a tensor referenced several times only once (the original is kept alive, so its id is not reused)."""
    if isinstance(obj, torch.Tensor):
        if moved is None:
            return obj.to(device)
        if id(obj) not in moved:
            moved[id(obj)] = (obj, obj.to(device))
        return moved[id(obj)][1]
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, moved) for v in obj)
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


def _capture_layer_inputs(model, layers, batches, device: torch.device):
    """What every decoder layer is called with, per batch, without running any layer.

    The model runs once per batch with each layer's ``forward`` swapped for a recorder that keeps its keyword
    arguments and passes the hidden states through (the last one stops the forward), so no layer weight is read
    (they may still be on the meta device). Layers get their own masks and rotary tables (Gemma 3's sliding and
    global layers): layer 0's are not everyone's. Returns layer 0's hidden states per batch, and per layer its
    keyword arguments per batch, on ``device`` (a tensor the layers share is moved once).
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]
    moved: dict = {}

    def recorder(i: int):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h.to(device))
            kwargs[i].append(_to(kw, device, moved))
            if i == len(layers) - 1:
                raise StopForward
            return h

        return forward

    source = _input_device(model)
    with swapped_forwards(layers, recorder):
        for batch in batches:
            try:
                model(**_to(dict(batch), source), use_cache=False)
            except StopForward:
                pass
    return hidden, kwargs


@contextlib.contextmanager
def swapped_forwards(layers: torch.nn.ModuleList, forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Meanwhile, decoder layer ``i`` runs ``forward_of(i)`` instead of its own forward (an accelerate hook's
    wrapper, if any, is put back afterwards)."""
    own = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = forward_of(i)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out
