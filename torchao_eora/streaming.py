"""Compress a checkpoint larger than memory: one decoder layer's weights materialised at a time.

:func:`quantize_checkpoint` builds the model on the meta device, reads each tensor lazily from the safetensors
shards under its in-memory name (``checkpoint_names.py``: per-expert tensors fused, renamed heads), runs the sequential pass (``sequential.py``) with a ``LayerIO`` that loads layer ``i`` onto the compute
device, and writes it out as a shard as soon as it is compressed, then frees it. The output directory is the
checkpoint ``save_pretrained`` writes (safetensors shards with torchao metadata, an index, ``config.json`` with the
``TorchAoConfig``, the tokenizer files), swapped into place atomically once complete: ``from_pretrained`` and
``load_pretrained`` load it. Until then the shards are kept in ``.OUT.partial``, so a killed job resumes from its
last written layer (``resume.py``). Peak memory is about one layer's weights, statistics and solver work, plus the
calibration activations, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from .calibration import Calibration
from .checkpoint_checks import check_plain_checkpoint, checkpoint_headers
from .checkpoint_names import CheckpointLayout
from .config import EoRAConfig
from .hf import attach_quantizer, check_safetensors_only
from .io_utils import save_safetensors
from .layerwise_gradients import layerwise_output_gradient_moments
from .resume import PartialJob, job_identity
from .sequential import compress_sequential, compute_device, find_decoder_layers
from .timing import Timer

__all__ = ["ShardedWeights", "quantize_checkpoint"]

_INDEX = "model.safetensors.index.json"
_NOT_COPIED = {"config.json", _INDEX}  # written anew; weights are written anew too


class ShardedWeights:
    """The tensors of a local safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = check_safetensors_only(directory)
        self.headers = checkpoint_headers(self.directory)  # a damaged index or shard fails here, naming the file
        self.file_of = {key: Path(header.file) for key, header in self.headers.items()}

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        if key not in self.file_of:
            raise ValueError(f"{self.directory} has no tensor {key!r} (a checkpoint of another model?)")
        with safe_open(str(self.file_of[key]), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(key)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _materialise(module: torch.nn.Module, prefix: str, weights: CheckpointLayout, dtype, device) -> None:
    """Give every parameter and persistent buffer of ``module`` its checkpoint value (``prefix`` + its name)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in module.state_dict():
        set_module_tensor_to_device(module, name, device, value=weights.get(prefix + name, dtype, device))


class StreamingIO:
    """``LayerIO`` for :func:`compress_sequential`: load layer ``i`` from the shards, write it out when done, free it."""

    def __init__(self, model: torch.nn.Module, weights: CheckpointLayout, out: Path, layers_prefix: str,
                 n_shards: int, dtype: torch.dtype, timer: Timer, job: PartialJob | None = None):
        self.model, self.weights, self.out, self.prefix = model, weights, out, layers_prefix
        self.n_shards, self.dtype, self.timer, self.job = n_shards, dtype, timer, job
        # every shard names all tensors written, as save_pretrained's do (a tied lm_head is not written)
        self.tensor_names = [k for k in model.state_dict() if k.startswith(layers_prefix + ".") or k in weights]
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        with self.timer("io"):
            if index == 0:  # the first layer's inputs are captured: the embeddings are not needed any more
                for name, param in self.model.named_parameters():
                    if not name.startswith(self.prefix + ".") and not param.is_meta:
                        _free(self.model, name)
            if self.written(index):  # a resumed job: the compressed layer, only to compute the next one's inputs
                _load_compressed(layer, f"{self.prefix}.{index}.", self.out / self._shard_name(index + 1), device)
            else:
                _materialise(layer, f"{self.prefix}.{index}.", self.weights, self.dtype, device)

    def written(self, index: int) -> bool:
        """Whether layer ``index`` is on disk already (a resumed job)."""
        return self.job is not None and self.job.written(index)

    def done(self, index: int, layer: torch.nn.Module) -> None:
        # outside inference mode: the compressed weights are normal tensors, and torchao's subclass detach cannot
        # make an inference tensor of one
        with self.timer("io"), torch.inference_mode(False):
            if self.written(index):
                self._account(self._shard_name(index + 1))
            else:
                state = {f"{self.prefix}.{index}.{k}": v.detach().to("cpu") for k, v in layer.state_dict().items()}
                self.write(index + 1, state)
                if self.job is not None:
                    self.job.layer_written(index)
            _to_meta(layer)  # free it: the next layer needs the memory

    def _shard_name(self, shard: int) -> str:
        return f"model-{shard:05d}-of-{self.n_shards:05d}.safetensors"

    def _account(self, name: str) -> None:
        """Count a shard written by the run this one resumes into the index."""
        with safe_open(str(self.out / name), framework="pt") as f:
            for key in f.keys():
                self.weight_map[key] = name
                self.total_bytes += f.get_tensor(key).nbytes

    def write(self, shard: int, state: Mapping[str, torch.Tensor]) -> None:
        """One shard, with the torchao metadata of its tensors and the names of all of the model's tensors."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(dict(state))
        metadata = {**metadata, "tensor_names": json.dumps(self.tensor_names), "format": "pt"}
        name = self._shard_name(shard)
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, self.out / name, metadata)
        self.weight_map.update({key: name for key in tensors})
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())


@torch.inference_mode()
def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EoRAConfig,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    keep_statistics: bool = False,
    overwrite: bool = False,
    timer: Timer | None = None,
    progress: bool = True,
    allow_partial: bool = False,
    resume: bool = False,
) -> Calibration:
    """Compress the checkpoint in ``model_dir`` into ``out_dir``, one decoder layer in memory at a time.

    Args:
        model_dir: a local Hugging Face directory with safetensors weights (one file or shards + index).
        out_dir: where to write the compressed checkpoint (atomically; checked like ``save_pretrained``'s).
        config: the compression (calibrated or not: the sequential pass runs either way).
        batches: calibration batches (``input_ids``, ``attention_mask``), e.g. from ``data.calibration_batches``.
        dtype: dtype the layers are computed and the adapters stored in.
        device: where each layer is compressed (default: CUDA when present, else CPU).
        keep_statistics: keep every layer's second moments in the returned ``Calibration`` (to save them).
        timer: adds seconds to ``forward``, ``moments``, ``compress``, ``shrinkage``, ``solve``, ``gradients`` and
            ``io``.
        allow_partial: compress what is supported even if a large weight holder would stay uncompressed.
        resume: continue the killed job that was writing ``out_dir`` (same source, config, dtype and calibration
            tokens, else ValueError) from its last written layer; the result is the uninterrupted run's, bit for
            bit. Without it, what a killed job left is discarded.

    Returns:
        The ``Calibration`` of the pass (its ``bytes_written`` attribute is the payload written).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    timer = timer or Timer()
    device = torch.device(device) if device is not None else compute_device()
    shards = ShardedWeights(model_dir)
    source = shards.directory
    with timer("io"):
        model_config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype).eval()
    weights = CheckpointLayout(model, shards)  # in-memory names: per-expert tensors fused, heads renamed, ...
    prefix, layers = find_decoder_layers(model)
    check_plain_checkpoint(model, weights.headers(shards.headers))  # names, shapes, dtypes: before anything is written
    state_keys = list(model.state_dict())  # tied weights appear once
    outside = [k for k in weights.keys() if not k.startswith(prefix + ".") and k in state_keys]
    head = model.get_output_embeddings()
    head_name = _name_of(model, head) if head is not None else None
    needed = [k for k in outside if head_name is None or not k.startswith(head_name + ".")]  # lm_head never runs
    # what runs before the first layer (the embeddings), on the CPU like the batches; normal tensors, not inference
    # ones, which output weighting's head pass would have to copy (autograd cannot save an inference tensor)
    with timer("io"), torch.inference_mode(False):
        for key in needed:
            _materialise_key(model, key, weights, dtype)

    batches = list(batches)
    if resume and keep_statistics:
        raise ValueError("a resumed job has no statistics of the layers written before: drop keep_statistics "
                         "(--save-calibration) or start over without resume")
    job = PartialJob(out_dir, job_identity(source, config, dtype, batches), resume=resume, sources=[source],
                     overwrite=overwrite)
    tmp = job.path  # kept if the job fails or is killed after its first layer: resume=True continues it
    io = StreamingIO(model, weights, tmp, prefix, len(layers) + len(outside), dtype, timer, job)
    try:
        output_gradients = None
        if config.compensation == "eora" and config.output_weighting != "none":
            output_gradients = _output_gradients(model, weights, batches, prefix, dtype, device, tmp, timer, progress)
        calib = compress_sequential(model, batches, config, keep_statistics=keep_statistics, layer_io=io,
                                    device=device, progress=progress, timer=timer, allow_partial=allow_partial,
                                    output_gradients=output_gradients)
    except BaseException:
        job.discard_if_empty()  # bad settings fail before the first layer: nothing to resume, nothing left behind
        raise
    with timer("io"):
        for shard, key in enumerate(outside, start=len(layers) + 1):  # one tensor per shard: bounded memory
            io.write(shard, {key: weights.get(key, dtype)})
        (tmp / _INDEX).write_text(json.dumps(
            {"metadata": {"total_size": io.total_bytes}, "weight_map": dict(sorted(io.weight_map.items()))},
            indent=2) + "\n")
        attach_quantizer(model, config)
        model.config.save_pretrained(tmp)
        for file in sorted(source.iterdir()):  # tokenizer, generation config, chat template, ...
            if file.is_file() and file.suffix != ".safetensors" and file.name not in _NOT_COPIED:
                shutil.copy2(file, tmp / file.name)
    job.finish()
    calib.bytes_written = io.total_bytes
    return calib


def _output_gradients(model, weights: CheckpointLayout, batches, prefix: str, dtype, device, job_dir: Path,
                      timer: Timer, progress: bool) -> dict[str, torch.Tensor]:
    """Output weighting's loss gradients with one decoder layer in memory at a time (``layerwise_gradients.py``).
    The head is loaded for this pass only; the stored layer inputs go to a folder beside the job's, removed after."""
    from accelerate.utils import set_module_tensor_to_device

    head = model.get_output_embeddings()
    head_name = _name_of(model, head)
    kept = dict(head._parameters)  # its meta placeholders, put back afterwards: only this pass runs the head
    with timer("io"), torch.inference_mode(False):  # normal tensors: no copy of the head for its backward
        for name, param in kept.items():
            if param is None:
                continue
            key = f"{head_name}.{name}"
            if key in weights:
                set_module_tensor_to_device(head, name, "cpu", value=weights.get(key, dtype))
            elif name == "weight" and getattr(model.config, "tie_word_embeddings", False):
                head._parameters[name] = model.get_input_embeddings().weight
    spill = job_dir.parent / f"{job_dir.name}.gradients"
    shutil.rmtree(spill, ignore_errors=True)  # what a killed run left
    io_before, start = timer.seconds.get("io", 0.0), time.perf_counter()
    try:
        return layerwise_output_gradient_moments(
            model, batches, device=device, spill_dir=spill, progress=progress,
            load=lambda i, layer: _timed(timer, _materialise, layer, f"{prefix}.{i}.", weights, dtype, device),
            release=lambda i, layer: _free_layer(layer))
    finally:
        head._parameters.update(kept)
        io = timer.seconds.get("io", 0.0) - io_before  # counted once: the loads are io, the rest gradients
        timer.seconds["gradients"] = timer.seconds.get("gradients", 0.0) + time.perf_counter() - start - io


def _timed(timer: Timer, fn, *args) -> None:
    with timer("io"):
        fn(*args)


def _free_layer(layer: torch.nn.Module) -> None:
    """Put ``layer``'s checkpoint tensors back on the meta device (its other buffers stay)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in layer.state_dict():
        set_module_tensor_to_device(layer, name, "meta")


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "")


def _to_meta(module: torch.nn.Module) -> None:
    """Drop every tensor of ``module`` (meta placeholders of the same shape and dtype stay)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), False)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def _free(model: torch.nn.Module, key: str) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, key, "meta")


def _materialise_key(model: torch.nn.Module, key: str, weights: CheckpointLayout, dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, key, "cpu", value=weights.get(key, dtype))


def _load_compressed(layer: torch.nn.Module, prefix: str, shard: Path, device) -> None:
    """Give ``layer`` the compressed tensors a previous run wrote into ``shard`` (names start with ``prefix``)."""
    from accelerate.utils import set_module_tensor_to_device
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    own = [n for n in json.loads(metadata["tensor_names"]) if n in metadata]  # the shard lists the model's tensors
    state, _ = unflatten_tensor_state_dict(tensors, {**metadata, "tensor_names": json.dumps(own)})
    for key, value in state.items():
        name = key[len(prefix):]
        if type(value) in (torch.Tensor, torch.nn.Parameter):
            set_module_tensor_to_device(layer, name, device, value=value)
        else:  # a compressed weight: a frozen parameter holding the tensor subclass
            module_name, _, param = name.rpartition(".")
            with torch.inference_mode(False):
                layer.get_submodule(module_name)._parameters[param] = torch.nn.Parameter(value.to(device),
                                                                                       requires_grad=False)
