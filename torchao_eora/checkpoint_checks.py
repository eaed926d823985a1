"""Check a torchao safetensors checkpoint against a model before any tensor is loaded: every tensor present,
nothing extra, shapes, dtypes and intx value ranges right (``QuantWithLowRank`` fields by their layout)."""

from __future__ import annotations

import json
import math
from typing import Iterable, NamedTuple

import torch

from .tensor import QuantWithLowRank

__all__ = ["check_checkpoint", "dtype_problem", "is_floating", "read_headers"]


class _Header(NamedTuple):
    """What a safetensors header says about one tensor (no data read)."""

    shape: list[int]
    dtype: str  # safetensors' name: "I8", "F32", "BF16", ...
    file: str


def read_headers(files: Iterable[str]) -> tuple[dict[str, str], dict[str, _Header]]:
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
    metadata, headers = read_headers(files)
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
            if _modelis_floating(model, name):
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
            raise ValueError(dtype_problem(key, headers[key].dtype, kind.describe()))
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
        return is_floating(st_dtype) if self.dtype == "floating" else st_dtype == "I8"

    def describe(self) -> str:
        if self.dtype == "floating":
            return "a floating-point type"
        return "int8" + (f" (holding int{self.bits} values)" if self.bits is not None else "")


def is_floating(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))  # F16, BF16, F32, F64, F8_E4M3, ...


_RESAVE = (
    "the file was edited or written by other code; re-save the model with torchao_eora.save_pretrained "
    "(or model.save_pretrained after import torchao_eora)"
)


def dtype_problem(key: str, st_dtype: str, wanted: str) -> str:
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


def _modelis_floating(model: torch.nn.Module, name: str) -> bool:
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
