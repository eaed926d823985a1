"""Hugging Face glue: save a compressed model as safetensors + a config.json carrying ``TorchAoConfig(EoRAConfig)``,
load it back strictly, and teach transformers' torchao quantizer the fields it does not know (``A``, ``B``, and the
scales and zero points of quantized adapters).

``import torchao_eora`` calls :func:`extend_transformers_torchao`, so plain
``AutoModelForCausalLM.from_pretrained(dir)`` reloads our checkpoints, and
``from_pretrained(fp_dir, quantization_config=TorchAoConfig(EoRAConfig(...)))`` quantizes on load, data-free (plain
SVD of the error). Calibration statistics go through ``quantize_`` instead: load the unquantized model, then
``quantize_(model, eora_config(Calibration.load(path, model)))`` (torchao's handler sees modules, not their names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from .calibration import current_umask
from .config import EoRAConfig
from .tensor import QuantWithLowRank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "atomic_directory",
    "attach_quantizer",
    "check_checkpoint",
    "check_safetensors_only",
    "eora_config_of",
    "extend_transformers_torchao",
    "load_pretrained",
    "save_pretrained",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

# QuantWithLowRank's fields beyond those transformers' torchao quantizer reloads (qdata, scale, zero_point, ...).
# Longer names first: transformers 5.17 matches the names as one regex alternation, first branch wins, so
# "_weight_A" listed before "_weight_A_scale" would claim (and mis-rename) the scale's key.
_EXTRA_FIELDS = ("A_scale", "A_zero_point", "B_scale", "B_zero_point", "A", "B")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---- saving -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir``; once the block completes it becomes ``out_dir``.

    If the block raises, nothing is left behind and an existing ``out_dir`` is untouched. An existing ``out_dir``
    is only moved aside after the new directory is complete (POSIX has no atomic swap of two directories, so
    there is a moment between two renames when ``out_dir`` does not exist; it never holds a partial save).
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; give the directory the usual permissions
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def eora_config_of(model: torch.nn.Module) -> EoRAConfig:
    """The ``EoRAConfig`` recorded in ``model.config.quantization_config`` (a model loaded with ``from_pretrained``)."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    quant_type = getattr(quant, "quant_type", None)
    if not isinstance(quant_type, EoRAConfig):
        raise ValueError(
            "this model carries no EoRAConfig in model.config.quantization_config; pass the EoRAConfig it was "
            "compressed with (config=...)"
        )
    return quant_type


def attach_quantizer(model: torch.nn.Module, config: EoRAConfig) -> None:
    """Set ``model.config.quantization_config`` and ``model.hf_quantizer``: transformers saves a torchao checkpoint
    only for a model that has both."""
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    quant_config = TorchAoConfig(replace(config, calibration=None))  # statistics are not part of the checkpoint
    model.config.quantization_config = quant_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quant_config)


def write_checkpoint(model: torch.nn.Module, directory: Path, config: EoRAConfig, tokenizer=None) -> None:
    """Write safetensors + config.json (+ tokenizer) into an existing directory (no atomicity: see save_pretrained)."""
    attach_quantizer(model, config)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_pretrained(
    model: torch.nn.Module, out_dir: str | os.PathLike, config: EoRAConfig | None = None, tokenizer=None
) -> Path:
    """``model.save_pretrained`` for a model compressed by ``quantize_(model, config)``, written atomically.

    Args:
        model: a Hugging Face model whose linear weights are ``QuantWithLowRank``.
        out_dir: the directory to write; an existing one is replaced only once the new one is complete.
        config: the ``EoRAConfig`` it was compressed with (default: the one in ``model.config``, for a model
            loaded with ``from_pretrained``). Its calibration statistics are not saved.
        tokenizer: saved alongside when given.

    Returns:
        The absolute path of the written directory; ``AutoModelForCausalLM.from_pretrained`` loads it after
        ``import torchao_eora``.
    """
    config = config if config is not None else eora_config_of(model)
    with atomic_directory(out_dir) as tmp:
        write_checkpoint(model, tmp, config, tokenizer)
    return Path(out_dir).resolve()


# ---- loading ----------------------------------------------------------------------------------------------------


def check_safetensors_only(path: str | os.PathLike) -> Path:
    """A local model directory with safetensors weights; pickle-only checkpoints are refused (they can run code)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); torchao-eora reads safetensors only "
                "(unpickling can execute code). Convert the checkpoint with save_pretrained(safe_serialization=True)."
            )
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    return path


def load_pretrained(path: str | os.PathLike, model_class=None, **kwargs) -> "PreTrainedModel":
    """``AutoModelForCausalLM.from_pretrained`` for a local checkpoint, strictly, in eval mode.

    Only safetensors are read, and a missing, unexpected or mis-shaped tensor is an error naming it
    (transformers on its own re-initialises missing tensors and ignores unexpected ones with a warning).

    Args:
        path: a local directory written by :func:`save_pretrained` (or any safetensors checkpoint).
        model_class: the class to load with (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``, ``device_map``).
    """
    from transformers import AutoModelForCausalLM

    path = check_safetensors_only(path)
    cls = model_class or AutoModelForCausalLM
    kwargs = {"local_files_only": True, **kwargs, "use_safetensors": True}
    # ignore_mismatched_sizes=True only so that transformers reports the names; a mismatch is still an error here.
    model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = [
        f"{label}: {', '.join(sorted(_describe_key(k) for k in info.get(key) or ()))}"
        for key, label in (
            ("missing_keys", "missing tensors"),
            ("unexpected_keys", "unexpected tensors"),
            ("mismatched_keys", "mis-shaped tensors"),
        )
        if info.get(key)
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems))
    return model.eval()


def _describe_key(key) -> str:
    if isinstance(key, tuple):  # (name, checkpoint shape, model shape)
        return f"{key[0]} (checkpoint {tuple(key[1])}, model {tuple(key[2])})" if len(key) == 3 else str(key[0])
    return str(key)


def _read_headers(files: Iterable[str]) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Metadata and tensor shapes of safetensors files, without reading any tensor data."""
    from safetensors import safe_open

    metadata: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            metadata.update(f.metadata() or {})
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    return metadata, shapes


def check_checkpoint(model: torch.nn.Module, files: Iterable[str]) -> None:
    """Check a torchao safetensors checkpoint against ``model`` before any tensor is loaded.

    Every entry of the torchao metadata must have its tensors (a plain tensor, or each field of a tensor subclass),
    no other tensor may be in the files, and shapes must fit each other and the model: ``QuantWithLowRank`` fields
    by their layout, plain tensors by the model's parameter. Raises ``ValueError`` naming the tensor.
    (transformers 5.17 does not compare shapes at all when a quantizer is active.)
    """
    metadata, shapes = _read_headers(files)
    expected: dict[str, tuple[int, ...] | None] = {}  # tensor key -> shape it must have (None: not checked)
    for name, raw in metadata.items():
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(meta, dict) or "_type" not in meta or "." not in name:
            continue
        if meta["_type"] == torch.Tensor.__name__:
            expected[name] = _model_shape(model, name)
            continue
        fqn, param = name.rsplit(".", 1)
        prefix = f"{fqn}._{param}_"
        layout = _low_rank_layout(prefix, meta, shapes, _model_shape(model, name))
        expected.update({prefix + f: layout.get(f) for f in meta.get("_tensor_data_names") or ()})
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}, e.g. lm_head -> embeddings
    tied.update({source: target for target, source in tied.items()})
    for key, shape in expected.items():
        if key not in shapes:
            if tied.get(key) in shapes:  # transformers saves one of two tied tensors
                continue
            raise ValueError(f"checkpoint tensor {key} is missing")
        if shape is not None and tuple(shapes[key]) != tuple(shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(shapes[key])}, expected {tuple(shape)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected checkpoint tensors (no entry in the torchao metadata): {unexpected[:10]}")


def _model_shape(model: torch.nn.Module, name: str) -> tuple[int, ...] | None:
    try:
        return tuple(model.get_parameter(name).shape)
    except AttributeError:
        try:
            return tuple(model.get_buffer(name).shape)
        except AttributeError:  # named differently in this model (prefixes): transformers matches it up
            return None


def _low_rank_layout(prefix: str, meta: dict, shapes: dict, model_shape: tuple[int, ...] | None) -> dict:
    """Field shapes of a ``QuantWithLowRank`` (empty for other tensor subclasses: their layout is torchao's)."""
    if meta["_type"] != QuantWithLowRank.__name__:
        return {}
    if model_shape is not None and len(model_shape) != 2:
        raise ValueError(f"checkpoint tensor {prefix}qdata is a linear weight, but the model's is {model_shape}")
    out_features, in_features = model_shape or shapes.get(prefix + "qdata") or (None, None)
    rank = (shapes.get(prefix + "A") or [None])[0]
    layout = {"qdata": (out_features, in_features), "A": (rank, in_features), "B": (out_features, rank)}
    data = meta.get("_data", {})
    group_size = data.get("group_size")
    if group_size and in_features:
        layout["scale"] = layout["zero_point"] = (out_features, in_features // group_size)
    adapter_group_size = data.get("adapter_group_size")
    if adapter_group_size and in_features and rank is not None:
        layout["A_scale"] = layout["A_zero_point"] = (rank, in_features // adapter_group_size)
    if adapter_group_size and rank is not None:
        layout["B_scale"] = layout["B_zero_point"] = (out_features, rank // adapter_group_size)
    return {f: shape for f, shape in layout.items() if None not in shape}


# ---- extending transformers' torchao quantizer -------------------------------------------------------------------


def extend_transformers_torchao() -> bool:
    """Teach transformers' ``TorchAoHfQuantizer`` about ``QuantWithLowRank``; idempotent, called at import.

    * Reload: add ``_<param>_A`` / ``_<param>_B`` (and ``_A_scale``, ``_A_zero_point``, ``_B_scale``,
      ``_B_zero_point`` of quantized adapters) to the serialized names it collects per parameter
      (``serialized_names`` in transformers >= 5.2x, ``get_weight_conversions`` in 5.17).
    * Before loading an EoRA checkpoint: :func:`check_checkpoint`, so a missing, extra or mis-shaped tensor fails
      with its name (instead of a generic conversion error, a warning, or nothing at all).
    * Quantize on load is data-free: an ``EoRAConfig`` carrying a ``Calibration`` is refused up front with the
      way to use statistics (load unquantized, then ``quantize_``); torchao's handler sees modules, not names.
    * After loading an EoRA checkpoint: forget the deserialize step transformers would try (and fail) to reverse
      in ``save_pretrained``, so a reloaded model saves again.

    Returns False (with a warning) if this transformers version has neither mechanism.
    """
    try:
        from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer
    except ImportError:  # transformers or torchao missing: nothing to extend
        return False
    if getattr(TorchAoHfQuantizer, "_torchao_eora_extended", False):
        return True
    own = vars(TorchAoHfQuantizer)
    if isinstance(own.get("serialized_names"), property):
        _extend_serialized_names(TorchAoHfQuantizer, own["serialized_names"])
    elif "get_weight_conversions" in own:
        _extend_weight_conversions(TorchAoHfQuantizer, own["get_weight_conversions"])
    else:
        log.warning("unknown transformers torchao quantizer: QuantWithLowRank checkpoints will not reload")
        return False
    _wrap_validate_environment(TorchAoHfQuantizer)
    _wrap_before_loading(TorchAoHfQuantizer)
    _wrap_after_loading(TorchAoHfQuantizer)
    TorchAoHfQuantizer._torchao_eora_extended = True
    return True


def _with_extra_fields(param: str, names: list[str]) -> list[str]:
    return names + [f"_{param}_{f}" for f in _EXTRA_FIELDS if f"_{param}_{f}" not in names]


def _extend_serialized_names(cls, original: property) -> None:
    def serialized_names(self):
        return {param: _with_extra_fields(param, list(names)) for param, names in original.fget(self).items()}

    cls.serialized_names = property(serialized_names, doc=original.__doc__)


def _extend_weight_conversions(cls, original) -> None:
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.torchao import TorchAoDeserialize

    def get_weight_conversions(self):
        converters = []
        for c in original(self):
            if isinstance(c, WeightConverter) and any(isinstance(op, TorchAoDeserialize) for op in c.operations):
                param = c._original_target_patterns[0]
                c = WeightConverter(
                    _with_extra_fields(param, list(c._original_source_patterns)),
                    list(c._original_target_patterns),
                    operations=c.operations,
                )
            converters.append(c)
        return converters

    cls.get_weight_conversions = get_weight_conversions


def _wrap_before_loading(cls) -> None:
    original = cls._process_model_before_weight_loading

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        result = original(self, model, checkpoint_files=checkpoint_files, **kwargs)
        quant_type = getattr(self.quantization_config, "quant_type", None)
        files = [str(f) for f in checkpoint_files or ()]
        if self.pre_quantized and isinstance(quant_type, EoRAConfig) and files and all(
            f.endswith(".safetensors") for f in files
        ):
            check_checkpoint(model, files)
        return result

    cls._process_model_before_weight_loading = _process_model_before_weight_loading


def _wrap_validate_environment(cls) -> None:
    original = cls.validate_environment

    def validate_environment(self, *args, **kwargs):
        quant_type = getattr(self.quantization_config, "quant_type", None)
        if isinstance(quant_type, EoRAConfig) and quant_type.calibration is not None:
            # transformers writes the config to JSON while building the model, and the handler would not know the
            # modules' names anyway: statistics belong to the quantize_ flow.
            raise ValueError(
                "quantizing on load is data-free (EoRAConfig without calibration). To use calibration statistics, "
                "load the unquantized model, then quantize_(model, eora_config(Calibration.load(path, model)))"
            )
        return original(self, *args, **kwargs)

    cls.validate_environment = validate_environment


def _wrap_after_loading(cls) -> None:
    original = cls._process_model_after_weight_loading

    def _process_model_after_weight_loading(self, model, **kwargs):
        result = original(self, model, **kwargs)
        quant_type = getattr(self.quantization_config, "quant_type", None)
        if not isinstance(quant_type, EoRAConfig):
            return result
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            # transformers keeps the load-only deserialize step to reverse it on save, but it has no reverse (the
            # quantizer flattens the state dict itself), so save_pretrained would fail: drop it, as GGUF does.
            from transformers.integrations.torchao import TorchAoDeserialize

            def load_only(c) -> bool:
                return any(isinstance(op, TorchAoDeserialize) for op in getattr(c, "operations", ()))

            model._weight_conversions = [c for c in conversions if not load_only(c)]
        return result

    cls._process_model_after_weight_loading = _process_model_after_weight_loading


extend_transformers_torchao()
