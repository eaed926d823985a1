"""Check a safetensors checkpoint against a model before any tensor is loaded: every tensor present, nothing
extra, shapes, dtypes and intx value ranges right (``QuantWithLowRank`` fields by their layout). The strict loader
(``hf.load_pretrained``, transformers' torchao quantizer) and the streaming reader (``streaming.py``) read and check
through these functions, so both name the same problems in the same words."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch

from .packing import PACKED_BITS, can_pack, packing_unit
from .experts_tensor import QuantExperts
from .tensor import QuantWithLowRank

__all__ = [
    "check_checkpoint", "check_plain_checkpoint", "checkpoint_headers", "dtype_problem", "is_floating", "read_headers",
]

INDEX = "model.safetensors.index.json"


class _Header(NamedTuple):
    """What a safetensors header says about one tensor (no data read)."""

    shape: list[int]
    dtype: str  # safetensors' name: "I8", "F32", "BF16", ...
    file: str


def read_headers(files: Iterable[str]) -> tuple[dict[str, str], dict[str, _Header]]:
    """Metadata and tensor shapes / dtypes / files of safetensors files, without reading any tensor data."""
    from safetensors import safe_open

    from safetensors import SafetensorError

    metadata: dict[str, str] = {}
    headers: dict[str, _Header] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                metadata.update(f.metadata() or {})
                for k in f.keys():
                    s = f.get_slice(k)
                    headers[k] = _Header(list(s.get_shape()), s.get_dtype(), str(file))
        except SafetensorError as e:  # an empty, cut or overwritten file: safetensors' message names no file
            raise ValueError(f"{file} is not a readable safetensors file ({e}): it is truncated or damaged; "
                             "download or save the checkpoint again") from None
    return metadata, headers


def checkpoint_headers(directory: str | Path) -> dict[str, _Header]:
    """Shapes, dtypes and files of every tensor of a local safetensors checkpoint (one file, or shards listed by
    ``model.safetensors.index.json``), without reading tensor data; a damaged index or shard is a ValueError
    naming the file."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        return read_headers(sorted(directory.glob("*.safetensors")))[1]
    damaged = "the index is damaged: download or save the checkpoint again"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ValueError(f"{index} is not valid JSON with a 'weight_map' ({e}); {damaged}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no 'weight_map' of tensor names to shard files; {damaged}")
    shards = sorted(set(weight_map.values()))
    gone = [name for name in shards if not (directory / name).is_file() or Path(name).name != name]
    if gone:
        raise ValueError(f"{index} lists shard {gone[0]}, which is not a file in {directory}; {damaged}")
    headers = read_headers([directory / name for name in shards])[1]
    for key, name in weight_map.items():
        if key not in headers or Path(headers[key].file).name != name:
            raise ValueError(f"{index} puts tensor {key} in {name}, which does not hold it; {damaged}")
    return headers


def check_plain_checkpoint(model: torch.nn.Module, headers: dict[str, _Header], *, names: bool = True) -> None:
    """Check an unquantized checkpoint (``checkpoint_headers``) against ``model`` (built from its config.json, on
    the meta device is fine) before loading it: tensors loaded into floating-point parameters or buffers must be
    floating point; with ``names``, also every tensor present, none extra (a model is converted whole or not at
    all), and shapes equal to the model's. (``from_pretrained`` compares names and shapes itself, after its key
    conversions: ``load_pretrained`` passes ``names=False``.) Raises ``ValueError`` naming the tensor."""
    state = model.state_dict()
    where = f"{type(model).__name__} as config.json describes it"
    for key, target in state.items():  # in the model's order: the first problem named is the first layer's
        header = headers.get(key)
        if header is None:
            continue
        if names and tuple(header.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint tensor {key} ({header.file}) has shape {tuple(header.shape)}, but {where} "
                             f"expects {tuple(target.shape)}: fix config.json or the weights")
        if target.is_floating_point() and not is_floating(header.dtype):
            raise ValueError(dtype_problem(key, header.dtype, "a floating-point type"))
    if not names:
        return
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()  # e.g. GPT-2's attn.bias
    extra = sorted(k for k in set(headers) - set(state) if not any(re.search(p, k) for p in ignored))
    if extra:
        raise ValueError(f"checkpoint tensor {extra[0]} ({headers[extra[0]].file}) is not a tensor of {where}: a "
                         "checkpoint of another model? fix config.json, or remove the tensor (and its index entry)")
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers saves one of two tied tensors
    missing = [k for k in state if k not in headers and k not in tied and k not in tied.values()]
    if missing:
        source = Path(next(iter(headers.values())).file).parent if headers else "the checkpoint"
        raise ValueError(f"{source} has no tensors for {missing[:3]} of {where} (a checkpoint of another "
                         "model?): fix config.json or the weights")


def check_checkpoint(model: torch.nn.Module, files: Iterable[str]) -> None:
    """Check a torchao safetensors checkpoint against ``model`` before any tensor is loaded.

    Every entry of the torchao metadata must have its tensors (a plain tensor, or each field of a tensor subclass),
    no other tensor may be in the files, and shapes must fit each other and the model: ``QuantWithLowRank`` fields
    by their layout, plain tensors by the model's parameter. Dtypes must be the layout's too (intN values in
    ``qdata`` and quantized adapters as uint8 bit-packed (widths 2 to 4, rows in whole packing units: shape
    ``(rows, cols * N / 8)``) or int8 one per byte; int8 zero points, floating scales and full-precision adapters;
    floating tensors for floating parameters), and int8 intx values must lie in the range of their bit width
    (``qdata`` of an int3 base in [-4, 3]): this reads those tensors, one at a time and in slices, so memory stays
    bounded (every bit pattern of a packed tensor is a valid value: nothing to read). Raises ``ValueError`` naming
    the tensor.
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
        _check_metadata(name, meta)
        fqn, param = name.rsplit(".", 1)
        prefix = f"{fqn}._{param}_"
        layout = _low_rank_layout(prefix, meta, headers, _model_shape(model, name))
        expected.update({prefix + f: layout.get(f) for f in meta.get("_tensor_data_names") or ()})
        kinds.update({prefix + f: kind for f, kind in _low_rank_kinds(meta).items()})
    present = {k: kind for k, kind in kinds.items() if k in headers}
    for key, kind in present.items():  # dtypes first (headers only): the shape a field must have depends on it
        if not kind.accepts(headers[key].dtype):
            raise ValueError(dtype_problem(key, headers[key].dtype, kind.describe()))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}, e.g. lm_head -> embeddings
    tied.update({source: target for target, source in tied.items()})
    for key, shape in expected.items():
        if key not in shapes:
            if tied.get(key) in shapes:  # transformers saves one of two tied tensors
                continue
            raise ValueError(f"checkpoint tensor {key} is missing")
        if shape is not None and tuple(shapes[key]) != tuple(shape):
            kind = kinds.get(key)
            packed = f" ({_packing(kind.bits)})" if headers[key].dtype == "U8" and kind and kind.packable else ""
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(shapes[key])}, expected {tuple(shape)}{packed}: {_RESAVE}"
            )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected checkpoint tensors (no entry in the torchao metadata): {unexpected[:10]}")
    _check_ranges(present, headers)  # then the values


# safetensors dtype names, for messages
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}
_RANGE_CHUNK_BYTES = 64 << 20  # read intx tensors in slices of about this size


class _Kind(NamedTuple):
    """The dtype a checkpoint tensor must have: ``"int8"`` (intx values of ``bits`` bits, or a zero point) or
    ``"floating"``. intx values of a packed width may also be uint8 (bit-packed)."""

    dtype: str
    bits: int | None = None

    @property
    def packable(self) -> bool:
        return self.dtype == "int8" and self.bits in PACKED_BITS

    def accepts(self, st_dtype: str) -> bool:
        if self.dtype == "floating":
            return is_floating(st_dtype)
        return st_dtype == "I8" or (self.packable and st_dtype == "U8")

    def describe(self) -> str:
        if self.dtype == "floating":
            return "a floating-point type"
        if self.packable:
            return f"uint8 (int{self.bits} values bit-packed) or int8 (one int{self.bits} value a byte)"
        return "int8" + (f" (holding int{self.bits} values)" if self.bits is not None else "")


def _packing(bits: int | None) -> str:
    unit = packing_unit(bits)
    return f"int{bits} values bit-packed, {unit} in {unit * bits // 8} byte{'s' if unit * bits > 8 else ''}"


def is_floating(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))  # F16, BF16, F32, F64, F8_E4M3, ...


_RESAVE = (
    "the file was edited or written by other code; re-save the model with torchao_eora.save_pretrained "
    "(or model.save_pretrained after import torchao_eora)"
)


def dtype_problem(key: str, st_dtype: str, wanted: str) -> str:
    return f"checkpoint tensor {key} is stored as {_ST_DTYPES.get(st_dtype, st_dtype)}, expected {wanted}: {_RESAVE}"


_OUR_CLASSES = (QuantWithLowRank.__name__, QuantExperts.__name__)  # what EoRAConfig writes (experts: MoE layers)


def _check_metadata(name: str, meta: dict) -> None:
    """A tensor subclass entry of the torchao metadata names one of our classes (what ``EoRAConfig`` writes) and
    real torch dtypes: anything else would fail inside transformers with an error that names no tensor."""
    if meta["_type"] not in _OUR_CLASSES:
        raise ValueError(f"checkpoint tensor {name} is a {meta['_type']!r} in the torchao metadata, expected "
                         f"{' or '.join(_OUR_CLASSES)} or a plain tensor: {_RESAVE}")
    data = meta.get("_data")
    for key, value in (data.items() if isinstance(data, dict) else [("_data", data)]):
        if not key.endswith("dtype") or (value is None and key != "dtype"):
            continue
        dtype = value.get("_data") if isinstance(value, dict) and value.get("_type") == "torch.dtype" else None
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
            raise ValueError(f"checkpoint tensor {name} has {key} {json.dumps(value)} in the torchao metadata, not a "
                             f"torch dtype: {_RESAVE}")


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
        # every int8 value is in range of int8, and every byte of a packed (uint8) tensor is a valid value
        if kind.bits is not None and kind.bits < 8 and headers[key].dtype == "I8":
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


def _low_rank_layout(
    prefix: str, meta: dict, headers: dict[str, _Header], model_shape: tuple[int, ...] | None
) -> dict:
    """Field shapes of a ``QuantWithLowRank`` (empty for other tensor subclasses: their layout is torchao's).

    A values field stored as uint8 is bit-packed: ``(rows, cols * N / 8)``, N its part's width."""
    if meta["_type"] != QuantWithLowRank.__name__:
        return {}
    if model_shape is not None and len(model_shape) != 2:
        raise ValueError(f"checkpoint tensor {prefix}qdata is a linear weight, but the model's is {model_shape}")
    data = meta.get("_data", {})

    def packed_bits(name: str) -> int | None:
        """The width the values of field ``name`` are packed at, if its header says uint8 and the width packs."""
        header, field = headers.get(prefix + name), QuantWithLowRank.fields[name]
        bits = _intx_bits(data.get(field.dtype_attribute)) if field.role == "values" else None
        return bits if header is not None and header.dtype == "U8" and bits in PACKED_BITS else None

    qdata = headers.get(prefix + "qdata")
    out_features, in_features = model_shape or (qdata.shape if qdata else None) or (None, None)
    if model_shape is None and qdata and packed_bits("qdata"):
        in_features = in_features * 8 // packed_bits("qdata")
    A = headers.get(prefix + "A")
    dims = {"out": out_features, "in": in_features, "rank": A.shape[0] if A and A.shape else None}
    layout = {}
    for name, field in QuantWithLowRank.fields.items():
        bits = packed_bits(name)
        cols = dims.get(field.cols)
        if bits is not None and cols is not None and not can_pack(bits, cols):
            raise ValueError(
                f"checkpoint tensor {prefix}{name} is uint8 (bit-packed int{bits} values), but rows of {cols} "
                f"int{bits} values are not packed ({cols} is not a multiple of {packing_unit(bits)}); expected "
                f"int8 ({dims.get(field.rows)}, {cols}): {_RESAVE}"
            )
        layout[name] = field.shape(dims, data.get(field.group_attribute), bits)
    return {f: shape for f, shape in layout.items() if shape is not None}
