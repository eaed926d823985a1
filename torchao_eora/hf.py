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

import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple

import torch

from .checks import CONFIG_TYPES
from .config import EoRAConfig, _build_from_json
from .io_utils import atomic_directory, canonicalize_safetensors_header, recover_directory
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

# The field suffixes transformers' torchao quantizer reloads by itself; QuantWithLowRank's others are added.
_TRANSFORMERS_FIELDS = ("qdata", "scale_and_zero", "per_tensor_scale", "scale", "zero_point", "act_pre_scale")


def _extra_fields() -> list[str]:
    """QuantWithLowRank's fields transformers does not reload, a name after every longer name it starts:
    transformers 5.17 matches the names as one regex alternation, first branch wins, so "_weight_A" listed
    before "_weight_A_scale" would claim (and mis-rename) the scale's key."""
    extra = [f for f in QuantWithLowRank.fields if f not in _TRANSFORMERS_FIELDS]
    return sorted(extra, key=lambda f: any(g != f and g.startswith(f) for g in extra))


_EXTRA_FIELDS = _extra_fields()
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---- saving -----------------------------------------------------------------------------------------------------


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
    untie_compressed_head(model)
    model.save_pretrained(directory, safe_serialization=True)
    for weights in Path(directory).glob("*.safetensors"):
        canonicalize_safetensors_header(weights)  # same model, same bytes
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def untie_compressed_head(model: torch.nn.Module) -> None:
    """A tied ``lm_head`` that ``quantize_`` compressed no longer shares the embedding's weight: record that in the
    config, or the saved model would be re-tied on load (and fail comparing a QuantWithLowRank with a tensor)."""
    config = getattr(model, "config", None)
    get_in, get_out = (getattr(model, f, None) for f in ("get_input_embeddings", "get_output_embeddings"))
    if not getattr(config, "tie_word_embeddings", False) or get_in is None or get_out is None:
        return
    head, embedding = get_out(), get_in()
    if head is None or embedding is None or head.weight is embedding.weight:
        return
    if isinstance(head.weight, QuantWithLowRank) or isinstance(embedding.weight, QuantWithLowRank):
        log.info("lm_head was compressed apart from the embeddings: saving it untied (tie_word_embeddings=False)")
        config.tie_word_embeddings = False
        text_config = getattr(config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False
        if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
            model.all_tied_weights_keys = {}  # transformers would otherwise drop lm_head as a duplicate


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    config: EoRAConfig | None = None,
    tokenizer=None,
    *,
    overwrite: bool = False,
) -> Path:
    """``model.save_pretrained`` for a model compressed by ``quantize_(model, config)``, written atomically.

    Args:
        model: a Hugging Face model whose linear weights are ``QuantWithLowRank``.
        out_dir: the directory to write; an existing one is replaced only once the new one is complete (an atomic
            swap). A file, the directory the model was loaded from, or a non-empty directory that is not a
            torchao-eora checkpoint is refused.
        config: the ``EoRAConfig`` it was compressed with (default: the one in ``model.config``, for a model
            loaded with ``from_pretrained``). Its calibration statistics are not saved.
        tokenizer: saved alongside when given.
        overwrite: replace a non-empty directory that is not a torchao-eora checkpoint.

    Returns:
        The absolute path of the written directory; ``AutoModelForCausalLM.from_pretrained`` loads it after
        ``import torchao_eora``.
    """
    config = config if config is not None else eora_config_of(model)
    sources = [getattr(model, "name_or_path", None) or None]  # never replace the directory being read
    with atomic_directory(out_dir, sources=sources, overwrite=overwrite) as tmp:
        write_checkpoint(model, tmp, config, tokenizer)
    return Path(out_dir).resolve()


# ---- loading ----------------------------------------------------------------------------------------------------


def check_safetensors_only(path: str | os.PathLike) -> Path:
    """A local model directory with safetensors weights; pickle-only checkpoints are refused (they can run code)."""
    path = Path(path)
    recover_directory(path)  # a save killed mid-swap (where renames are not atomic) is finished first
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
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("load_pretrained never runs Python code from a model directory: drop trust_remote_code")
    kwargs = {"local_files_only": True, **kwargs, "use_safetensors": True, "trust_remote_code": False}
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
    if getattr(model.config, "quantization_config", None) is None:
        # A plain checkpoint: no quantizer ran check_checkpoint, and transformers casts an integer tensor into a
        # floating parameter without a word. (Quantized checkpoints are checked before loading.)
        _check_plain_dtypes(model, sorted(str(f) for f in path.glob("*.safetensors")))
    return model.eval()


def _check_plain_dtypes(model: torch.nn.Module, files: Iterable[str]) -> None:
    """Every tensor that loads into a floating-point parameter or buffer of ``model`` must be floating point."""
    state = model.state_dict()
    _, headers = _read_headers(files)
    for key, header in headers.items():
        target = state.get(key)
        if target is not None and target.is_floating_point() and not _is_floating(header.dtype):
            raise ValueError(_dtype_problem(key, header.dtype, "a floating-point type"))


def _describe_key(key) -> str:
    if isinstance(key, tuple):  # (name, checkpoint shape, model shape)
        return f"{key[0]} (checkpoint {tuple(key[1])}, model {tuple(key[2])})" if len(key) == 3 else str(key[0])
    return str(key)


class _Header(NamedTuple):
    """What a safetensors header says about one tensor (no data read)."""

    shape: list[int]
    dtype: str  # safetensors' name: "I8", "F32", "BF16", ...
    file: str


def _read_headers(files: Iterable[str]) -> tuple[dict[str, str], dict[str, _Header]]:
    """Metadata and tensor shapes / dtypes / files of safetensors files, without reading any tensor data."""
    from safetensors import safe_open

    metadata: dict[str, str] = {}
    headers: dict[str, _Header] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            metadata.update(f.metadata() or {})
            for k in f.keys():
                s = f.get_slice(k)
                headers[k] = _Header(list(s.get_shape()), s.get_dtype(), str(file))
    return metadata, headers


def check_checkpoint(model: torch.nn.Module, files: Iterable[str]) -> None:
    """Check a torchao safetensors checkpoint against ``model`` before any tensor is loaded.

    Every entry of the torchao metadata must have its tensors (a plain tensor, or each field of a tensor subclass),
    no other tensor may be in the files, and shapes must fit each other and the model: ``QuantWithLowRank`` fields
    by their layout, plain tensors by the model's parameter. Dtypes must be the layout's too (int8 ``qdata`` and
    zero points, floating scales and adapters, int8 quantized adapters; floating tensors for floating parameters),
    and intx values must lie in the range of their bit width (``qdata`` of an int3 base in [-4, 3]): this reads
    those tensors, one at a time and in slices, so memory stays bounded. Raises ``ValueError`` naming the tensor.
    (transformers 5.17 does not compare shapes at all when a quantizer is active, and none of its versions compare
    dtypes or values: a wrong dtype fails with an opaque conversion error, or loads as wrong numbers.)
    """
    metadata, headers = _read_headers(files)
    shapes = {k: h.shape for k, h in headers.items()}
    expected: dict[str, tuple[int, ...] | None] = {}  # tensor key -> shape it must have (None: not checked)
    kinds: dict[str, _Kind] = {}  # tensor key -> the dtype (and value range) it must have
    for name, raw in metadata.items():
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(meta, dict) or "_type" not in meta or "." not in name:
            continue
        if meta["_type"] == torch.Tensor.__name__:
            expected[name] = _model_shape(model, name)
            if _model_is_floating(model, name):
                kinds[name] = _Kind("floating")
            continue
        fqn, param = name.rsplit(".", 1)
        prefix = f"{fqn}._{param}_"
        layout = _low_rank_layout(prefix, meta, shapes, _model_shape(model, name))
        expected.update({prefix + f: layout.get(f) for f in meta.get("_tensor_data_names") or ()})
        kinds.update({prefix + f: kind for f, kind in _low_rank_kinds(meta).items()})
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
    present = {k: kind for k, kind in kinds.items() if k in headers}
    for key, kind in present.items():  # every dtype first (headers only), then the values
        if not kind.accepts(headers[key].dtype):
            raise ValueError(_dtype_problem(key, headers[key].dtype, kind.describe()))
    _check_ranges(present, headers)


# safetensors dtype names, for messages
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}
_RANGE_CHUNK_BYTES = 64 << 20  # read intx tensors in slices of about this size


class _Kind(NamedTuple):
    """The dtype a checkpoint tensor must have: ``"int8"`` (intx values of ``bits`` bits) or ``"floating"``."""

    dtype: str
    bits: int | None = None

    def accepts(self, st_dtype: str) -> bool:
        return _is_floating(st_dtype) if self.dtype == "floating" else st_dtype == "I8"

    def describe(self) -> str:
        if self.dtype == "floating":
            return "a floating-point type"
        return "int8" + (f" (holding int{self.bits} values)" if self.bits is not None else "")


def _is_floating(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))  # F16, BF16, F32, F64, F8_E4M3, ...


_RESAVE = (
    "the file was edited or written by other code; re-save the model with torchao_eora.save_pretrained "
    "(or model.save_pretrained after import torchao_eora)"
)


def _dtype_problem(key: str, st_dtype: str, wanted: str) -> str:
    return f"checkpoint tensor {key} is stored as {_ST_DTYPES.get(st_dtype, st_dtype)}, expected {wanted}: {_RESAVE}"


def _intx_bits(value) -> int | None:
    """``N`` of an ``intN`` dtype as torchao's metadata writes it (``{"_type": "torch.dtype", "_data": "int3"}``)."""
    name = value.get("_data") if isinstance(value, dict) else value
    if isinstance(name, str):
        name = name.removeprefix("torch.")
        if name.startswith("int") and name[3:].isdigit() and 1 <= int(name[3:]) <= 8:
            return int(name[3:])
    return None


def _low_rank_kinds(meta: dict) -> dict[str, _Kind]:
    """Field dtypes of a ``QuantWithLowRank`` (empty for other tensor subclasses: their layout is torchao's)."""
    if meta["_type"] != QuantWithLowRank.__name__:
        return {}
    data = meta.get("_data", {})
    kinds = {}
    for name, field in QuantWithLowRank.fields.items():
        # values: intN in int8 for an intx part, floating otherwise (a pruned-only base, full-precision adapters)
        part_dtype = data.get(field.dtype_attribute)
        if field.is_floating(part_dtype):
            kinds[name] = _Kind("floating")
        else:
            kinds[name] = _Kind("int8", _intx_bits(part_dtype) if field.role == "values" else None)
    return kinds


def _check_ranges(kinds: dict[str, _Kind], headers: dict[str, _Header]) -> None:
    """intx values of ``bits`` bits must lie in ``[-2**(bits-1), 2**(bits-1) - 1]``.

    Reads one tensor at a time, in row slices of about ``_RANGE_CHUNK_BYTES``, so memory stays bounded.
    """
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key, kind in kinds.items():
        if kind.bits is not None and kind.bits < 8:  # every int8 value is in range
            by_file.setdefault(headers[key].file, []).append(key)
    # transformers calls check_checkpoint under a meta-device context: the values must really be read
    with torch.device("cpu"):
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    _check_range(key, f.get_slice(key), headers[key].shape, kinds[key].bits)


def _check_range(key: str, tensor, shape: list[int], bits: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows = shape[0] if shape else 0
    step = max(1, _RANGE_CHUNK_BYTES // max(1, math.prod(shape[1:])))
    for start in range(0, rows, step):
        chunk = tensor[start : start + step]
        if chunk.numel() == 0:
            continue
        found_lo, found_hi = int(chunk.min()), int(chunk.max())
        if found_lo < lo or found_hi > hi:
            raise ValueError(
                f"checkpoint tensor {key} holds values outside the int{bits} range [{lo}, {hi}] "
                f"(found {found_lo}..{found_hi} in rows {start}..{min(start + step, rows) - 1}): {_RESAVE}"
            )


def _model_is_floating(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's parameter or buffer ``name`` is floating point (False when it has none of that name)."""
    for get in (model.get_parameter, model.get_buffer):
        try:
            return get(name).is_floating_point()
        except AttributeError:
            continue
    return False


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
    dims = {"out": out_features, "in": in_features, "rank": (shapes.get(prefix + "A") or [None])[0]}
    data = meta.get("_data", {})
    layout = {f: field.shape(dims, data.get(field.group_attribute)) for f, field in QuantWithLowRank.fields.items()}
    return {f: shape for f, shape in layout.items() if shape is not None}


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
    _guard_torchao_config_from_dict()
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


def _guard_torchao_config_from_dict() -> None:
    """Check every EoRA config inside a ``config.json``'s ``TorchAoConfig`` with :func:`config_from_json` before
    torchao builds it, so a crafted file is refused with a clear error before any of it is called."""
    from transformers import TorchAoConfig

    original = TorchAoConfig.from_dict.__func__

    def check(node) -> None:
        if isinstance(node, dict):
            if node.get("_type") in CONFIG_TYPES:
                _build_from_json(node, "quantization_config in config.json")
                return
            for value in node.values():
                check(value)
        elif isinstance(node, list):
            for value in node:
                check(value)

    def from_dict(cls, config_dict, *args, **kwargs):
        check(config_dict.get("quant_type"))
        return original(cls, config_dict, *args, **kwargs)

    TorchAoConfig.from_dict = classmethod(from_dict)


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
