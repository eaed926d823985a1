"""Output weighting's loss gradients for a model streamed from disk, one decoder layer in memory at a time.

``output_weights.output_gradient_moments`` backpropagates through the whole model at once; a checkpoint larger than
memory cannot. Here the same numbers come from three passes over the decoder layers:

1. forward: each layer is loaded, its inputs (every calibration window) are stored, its outputs computed, it is freed;
2. head: the gradient of the summed next-token loss at the last layer's output, from the model's own head (final
   norm, ``lm_head``, logit soft-capping, loss): the model runs with every decoder layer swapped for a pass-through
   that hands the stored last output to the head, so nothing model-specific is written here;
3. backward, last layer first: each layer is loaded again, recomputes its forward from its stored inputs and
   backpropagates the gradient at its output to its inputs, recording the gradient at every linear's output.

Cost: every layer read twice more from the checkpoint, about three forwards of compute (as in memory), one layer's
activations with their autograd graph, and the stored inputs, layers x windows x tokens x hidden in the model's
dtype, written to ``spill_dir`` when given (kept in memory otherwise). When the disk under ``spill_dir`` cannot hold
every layer's inputs, only every k-th layer's are stored and the backward recomputes the layers between from them
(one more read and forward of most layers; k the smallest that fits, about the square root of the layer count at
most, which needs about twice that many layers' inputs of disk).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .sequential import (_capture_layer_inputs, _check_batches, _linears, _output, find_decoder_layers,
                         swapped_forwards)

__all__ = ["layerwise_output_gradient_moments"]

log = logging.getLogger(__name__)
DISK_SHARE = 0.9  # of the free space the stored inputs may take: the job's log and other writers need some

LayerFn = Callable[[int, torch.nn.Module], None]


def layerwise_output_gradient_moments(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    load: LayerFn,
    release: LayerFn,
    device: torch.device,
    spill_dir: str | Path | None = None,
    every: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per linear of the decoder layers (by name), the diagonal of the loss gradient's second moment at its output
    per predicted token: what ``output_weights.output_gradient_moments`` returns, one decoder layer at a time.

    Args:
        model: a causal LM whose embeddings and head (final norm, ``lm_head``) are in memory; its decoder layers may
            be on the meta device.
        batches: dicts with ``input_ids`` and optionally ``attention_mask`` (padded positions predict nothing).
        load: gives layer ``i`` its original weights on ``device``; ``release`` frees them again.
        spill_dir: a directory for the stored layer inputs (created, and removed when done); None keeps them in
            memory.
        every: store the inputs of every ``every``-th layer only and recompute the rest in the backward (default:
            1 in memory; on disk the smallest spacing whose stored inputs fit the free space, a ValueError before
            any layer runs when none does).
    """
    batches = _check_batches(batches)
    prefix, layers = find_decoder_layers(model)
    store = _LayerInputs(spill_dir)
    frozen: list[torch.nn.Parameter] = []  # no weight gradients: only the activations carry one
    try:
        with torch.inference_mode(False), torch.no_grad():
            hidden, kwargs = _capture_layer_inputs(model, layers, batches, device)
            hidden, kwargs = _normal(hidden), _normal(kwargs)  # autograd cannot save inference tensors
            every = every or (1 if spill_dir is None else store.spacing(len(layers), hidden))
            for i in tqdm(range(len(layers)), desc="output gradients: forward", disable=not progress):
                if i % every == 0:
                    store.put(i, hidden)
                hidden = _forward(i, layers[i], hidden, kwargs[i], load, release)
        with torch.inference_mode(False), torch.enable_grad(), _rest_on(model, layers, device):
            frozen += _freeze(model)
            grads, tokens = _head_gradients(model, layers, batches, hidden)
        with torch.inference_mode(False), torch.enable_grad():
            del hidden
            sums: dict[str, torch.Tensor] = {}
            for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="output gradients: backward",
                          disable=not progress):
                if not store.has(i):  # recompute this segment's inputs from the last stored ones before it
                    start = i - i % every
                    with torch.no_grad():
                        inputs = [x.to(device) for x in store.get(start)]
                        for j in range(start, i):
                            inputs = _forward(j, layers[j], inputs, kwargs[j], load, release)
                            store.put(j + 1, inputs)
                        del inputs
                layer = layers[i]
                load(i, layer)
                _normal_tensors(layer)
                frozen += _freeze(layer)
                handles = [m.register_forward_hook(_recorder(name, sums))
                           for name, m in _linears(layer, f"{prefix}.{i}.").items()]
                try:
                    for b, (x, kw) in enumerate(zip(store.pop(i), kwargs[i])):
                        x = x.to(device).detach().requires_grad_()
                        _output(layer(x, **kw)).backward(grads[b])
                        grads[b] = x.grad
                finally:
                    for handle in handles:
                        handle.remove()
                release(i, layer)
    finally:
        store.close()
        for p in frozen:
            p.requires_grad_(True)
    missing = [name for name in _linears(layers, prefix + ".") if name not in sums]
    if missing:
        raise RuntimeError(f"no loss gradient reached {missing[0]} (and {len(missing) - 1} more): output weighting "
                           "needs every compressed linear on the path from the embeddings to the loss")
    return {name: s / max(tokens, 1) for name, s in sums.items()}


def _forward(i: int, layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs, load: LayerFn,
             release: LayerFn) -> list[torch.Tensor]:
    """Layer ``i``'s outputs for every batch: loaded, run (no graph), released."""
    load(i, layer)
    _normal_tensors(layer)
    outputs = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    release(i, layer)
    return outputs


def _head_gradients(model, layers, batches, last_outputs) -> tuple[list[torch.Tensor], int]:
    """Per batch, the gradient of the summed next-token loss at the last decoder layer's output; and the number of
    predicted tokens. The model's own forward computes the loss, its decoder layers swapped for pass-throughs."""
    head = model.get_output_embeddings()
    head_device = head.weight.device if head is not None else last_outputs[0].device
    grads, tokens, leaf = [], 0, None

    def passthrough(i: int):
        def forward(*args, **kw):
            return leaf if i == len(layers) - 1 else (args[0] if args else kw["hidden_states"])
        return forward

    with swapped_forwards(layers, passthrough):
        for batch, out in zip(batches, last_outputs):
            mask = batch.get("attention_mask")
            mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
            grad = torch.zeros_like(out)
            for row in range(len(out)):  # one window's logits at a time: a large vocabulary makes them big
                ids, row_mask = batch["input_ids"][row:row + 1].to(head_device), mask[row:row + 1].to(head_device)
                labels = ids.masked_fill(row_mask == 0, -100)
                predicted = int((labels[:, 1:] != -100).sum())  # the loss is their mean: make it the sum
                tokens += predicted
                leaf = out[row:row + 1].detach().to(head_device).requires_grad_()
                if predicted:
                    loss = model(input_ids=ids, attention_mask=row_mask, labels=labels, use_cache=False).loss
                    (loss * predicted).backward()
                    grad[row:row + 1] = leaf.grad.to(grad.device)
            grads.append(grad)
    return grads, tokens


@contextlib.contextmanager
def _rest_on(model: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device):
    """Meanwhile, the model outside its decoder layers (embeddings, final norm, head) as normal tensors on ``device``:
    the head's large matmuls run where the layers do, and its backward can save its weights (autograd cannot save an
    inference-mode tensor). Tied weights stay tied; the original tensors are put back afterwards."""
    inside = {id(m) for m in layers.modules()}
    originals, replaced = [], {}
    for module in model.modules():
        if id(module) in inside:
            continue
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None or t.is_meta or (t.device == device and not t.is_inference()):
                    continue
                if id(t) not in replaced:
                    replaced[id(t)] = _normal_copy(t, device)
                originals.append((store, key, t))
                store[key] = replaced[id(t)]
    try:
        yield
    finally:
        for store, key, t in originals:
            store[key] = t


def _recorder(name: str, sums: dict[str, torch.Tensor]):
    def hook(module, args, output):
        def accumulate(grad):
            square = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0)
            sums[name] = square if name not in sums else sums[name] + square

        output.register_hook(accumulate)
    return hook


def _normal(obj):
    """Inference-mode tensors (also inside dicts, tuples and lists) cloned into normal ones."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_normal(v) for v in obj)
    return obj


def _freeze(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Turn off ``module``'s parameters' gradients; returns those it turned off."""
    turned = [p for p in module.parameters() if p.requires_grad]
    for p in turned:
        p.requires_grad_(False)
    return turned


def _normal_tensors(module: torch.nn.Module) -> None:
    """Replace ``module``'s inference-mode parameters and buffers by normal copies, in place."""
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None and t.is_inference():
                    store[key] = _normal_copy(t, t.device)


def _normal_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A normal (not inference-mode) copy of ``t`` on ``device``; a parameter stays a parameter."""
    with torch.inference_mode(False):
        copy = t.detach().to(device, copy=True)
    return torch.nn.Parameter(copy, t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy


class _LayerInputs:
    """Decoder layers' inputs (one tensor per batch) by layer index, in memory or, with a directory, one file each."""

    def __init__(self, spill_dir: str | Path | None):
        self.dir = Path(spill_dir) if spill_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True)
        self.kept: dict[int, list[torch.Tensor]] = {}

    def spacing(self, n_layers: int, hidden: list[torch.Tensor]) -> int:
        """The smallest k for which every k-th layer's inputs, plus the k - 1 recomputed while a segment is
        backpropagated, fit ``DISK_SHARE`` of the free disk; a ValueError saying what is needed otherwise."""
        per_layer = sum(h.numel() * h.element_size() for h in hidden)
        free = shutil.disk_usage(self.dir).free
        needed = {k: (math.ceil(n_layers / k) + k - 1) * per_layer for k in range(1, n_layers + 1)}
        fitting = [k for k, size in needed.items() if size <= free * DISK_SHARE]
        if not fitting:
            least = min(needed.values())
            raise ValueError(f"output weighting stores decoder layers' inputs: it needs {least / 2**30:.1f} GiB of "
                             f"disk in {self.dir.parent} and {free / 2**30:.1f} GiB are free; free some "
                             "space, calibrate on fewer windows (--calib-samples), or leave out --output-weighting")
        if fitting[0] > 1:
            log.info("output weighting: %.1f GiB free under %s, so every %d-th layer's inputs are stored and the "
                     "layers between recomputed", free / 2**30, self.dir, fitting[0])
        return fitting[0]

    def has(self, index: int) -> bool:
        return index in self.kept if self.dir is None else self._path(index).exists()

    def put(self, index: int, hidden: list[torch.Tensor]) -> None:
        if self.dir is None:
            self.kept[index] = hidden
        else:
            torch.save([h.cpu() for h in hidden], self._path(index))

    def get(self, index: int) -> list[torch.Tensor]:
        if self.dir is None:
            return self.kept[index]
        return torch.load(self._path(index), weights_only=True)

    def pop(self, index: int) -> list[torch.Tensor]:
        hidden = self.get(index)
        if self.dir is None:
            del self.kept[index]
        else:
            self._path(index).unlink()
        return hidden

    def close(self) -> None:
        self.kept.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, index: int) -> Path:
        return self.dir / f"layer{index}.pt"
