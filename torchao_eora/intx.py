"""The intx arithmetic every part shares, in plain PyTorch (no Inductor, no custom ops): dequantizing torchao's
portable "unpacked to int8" layout, where ``W_c = (qdata - zero_point) * scale`` per group along the input dim,
and its bit-packed form (uint8 ``qdata``, see ``packing.py``), unpacked first."""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import as_int8

__all__ = ["dequantize_intx", "dequantize_weight"]


def dequantize_intx(qdata: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """``(qdata - zero_point) * scale`` per group of ``group_size`` input columns.

    The same arithmetic, in the same order and dtypes, as torchao's ``dequantize_affine`` (so results are
    bit-identical), written out because torchao's refuses float64, which the reference tests use.
    ``qdata`` is int8 (one value each) or uint8 bit-packed int2/int3/int4 values (``packing.py``), whose width
    follows from the row length ``scale`` implies (groups x ``group_size``).
    """
    qdata = as_int8(qdata, scale.shape[1] * group_size)
    out_features, in_features = qdata.shape
    groups = (out_features, in_features // group_size, group_size)
    w = qdata.reshape(groups).to(dtype) - zero_point.reshape(*groups[:2], 1).to(dtype)
    return (w * scale.reshape(*groups[:2], 1)).reshape(out_features, in_features).to(dtype)


def dequantize_weight(
    qdata: Tensor,
    scale: Tensor | None,
    zero_point: Tensor | None,
    target_dtype: torch.dtype | None,
    group_size: int | None,
    dtype: torch.dtype,
) -> Tensor:
    """``W_c`` in ``dtype``: a dense (pruned-only, ``target_dtype`` None) weight as it is, or intx values
    dequantized by :func:`dequantize_intx` (the arithmetic of the ``quant_linear`` op)."""
    if target_dtype is None:
        return qdata.to(dtype)
    return dequantize_intx(qdata, scale, zero_point, group_size, dtype)
