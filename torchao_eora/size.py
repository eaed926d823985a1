"""Model size in bytes, every weight counted: the number to put beside perplexity when adapters cost memory.

Two numbers:

* ``stored``: bytes as held in the safetensors file (the file adds only its JSON header) and, but for one detail,
  in memory: every plain tensor and every inner tensor of a tensor subclass, at its element size. (The detail:
  in memory, quantized adapters keep their zero points in the compute dtype, beside their scales, not in int8;
  ``QuantWithLowRank.adapter_qparams`` says why.) ``QuantWithLowRank`` holds int2,
  int3 and int4 values bit-packed (uint8, N bits a value: ``packing.py``), so they count at N bits here already.
* ``packed``: the same, with intN values still held one per int8 counted at N bits (``ceil(numel * N / 8)``):
  what full bit packing would need. Scales, zero points and floating tensors count as stored. For a model of
  ``QuantWithLowRank`` layers with 2-, 3-, 4- or 8-bit parts ``stored == packed``; they differ for widths 5 to 7
  (kept one per int8), for rows whose length is not a multiple of the packing unit (4 values for int2, 8 for
  int3, 2 for int4; kept unpacked), and for other tensor subclasses that keep intN values in int8 (torchao's
  ``IntxUnpackedToInt8Tensor``).

Parameters and persistent buffers are counted (what ``state_dict`` holds); tied weights once.
"""

from __future__ import annotations

import math

import torch

from .tensor import QuantWithLowRank

__all__ = ["model_bytes"]


def _inner_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain tensors a (possibly nested) tensor subclass is made of, by field name."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return {"": t}
    # QuantWithLowRank: its checkpoint fields (in memory the adapter scales and zero points are one tensor)
    names = t.fields if isinstance(t, QuantWithLowRank) else t.__tensor_flatten__()[0]
    out = {}
    for name in names:
        inner = getattr(t, name)  # one read: a QuantWithLowRank adapter field is a copy made on access
        if inner is not None:
            out.update({f"{name}.{k}" if k else name: v for k, v in _inner_tensors(inner).items()})
    return out


def _int_bits(t: torch.Tensor, field: str) -> int | None:
    """Bits per value of an intN field (held packed or in int8), or None for any other field."""
    if isinstance(t, QuantWithLowRank):
        return t.value_bits(field)
    target = getattr(t, "target_dtype", None)  # torchao's IntxUnpackedToInt8Tensor
    if field == "qdata" and isinstance(target, torch.dtype) and str(target).startswith("torch.int"):
        return int(str(target).removeprefix("torch.int"))
    return None


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter and persistent buffer of ``model`` (tied weights once).

    Returns:
        ``{"stored": ..., "packed": ..., "base": ..., "adapters": ..., "other": ...,
        "packed_base": ..., "packed_adapters": ...}``: totals as stored and as bit-packed (see the module
        docstring); ``base`` is the compressed weights of ``QuantWithLowRank`` layers (values, scales, zero
        points), ``adapters`` their ``A`` and ``B`` with any scales and zero points, ``other`` everything else
        (embeddings, norms, uncompressed layers). ``stored == base + adapters + other``.
    """
    sizes = dict.fromkeys(("stored", "packed", "base", "adapters", "other", "packed_base", "packed_adapters"), 0)
    seen: set[int] = set()
    for tensor in model.state_dict(keep_vars=True).values():  # keep_vars: the objects themselves, so ties dedupe
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for field, inner in _inner_tensors(tensor).items():
            stored = inner.numel() * inner.element_size()
            bits = _int_bits(tensor, field)
            unpacked = bits is not None and inner.dtype == torch.int8  # packed ones are uint8, counted as held
            packed = math.ceil(inner.numel() * bits / 8) if unpacked else stored
            if isinstance(tensor, QuantWithLowRank):
                part = tensor.fields[field].part  # "base" or "adapters"
                sizes[part] += stored
                sizes[f"packed_{part}"] += packed
            else:
                sizes["other"] += stored
            sizes["stored"] += stored
            sizes["packed"] += packed
    return sizes
