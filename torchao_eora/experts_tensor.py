"""``QuantExperts``: the fused (experts x out x in) weight of a mixture-of-experts layer, each expert a
``QuantWithLowRank`` (compressed base + its own low-rank residual).

transformers 5 holds a layer's experts as one 3-D parameter (``mlp.experts.gate_up_proj`` (E, 2I, H),
``mlp.experts.down_proj`` (E, H, I)) and its eager forward calls ``F.linear(x, self.gate_up_proj[e])``. Indexing
one expert here gives that expert's ``QuantWithLowRank``, whose ``F.linear`` is the existing compressed path; the
model's own forward is unchanged. The fields are ``QuantWithLowRank``'s checkpoint fields stacked along a leading
expert dimension (the experts of one parameter share shapes and rank), so the tensor flattens one level deep for
safetensors, and transformers' torchao quantizer reloads it like any other torchao weight.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from .tensor import _FLOAT_TYPES, QuantWithLowRank, _bits_of, _cols

__all__ = ["QuantExperts"]

aten = torch.ops.aten


class QuantExperts(TorchAOBaseTensor):
    """E compressed expert weights with residuals, shaped (E, out, in); ``self[e]`` is expert ``e``'s
    ``QuantWithLowRank``. Build with :meth:`from_experts`. Field ``f`` holds ``QuantWithLowRank`` field ``f`` of
    every expert, stacked (``qdata`` (E, out, in or packed), ``A`` (E, r, in), ``B`` (E, out, r), ...)."""

    tensor_data_names = list(QuantWithLowRank.tensor_data_names)
    optional_tensor_data_names = list(QuantWithLowRank.optional_tensor_data_names)
    tensor_attribute_names = list(QuantWithLowRank.tensor_attribute_names)
    optional_tensor_attribute_names = list(QuantWithLowRank.optional_tensor_attribute_names)

    def __new__(cls, qdata: torch.Tensor, A: torch.Tensor, B: torch.Tensor, target_dtype, group_size, dtype, **_):
        shape = (qdata.shape[0], qdata.shape[1], _cols(qdata[0], _bits_of(target_dtype)))
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(
        self,
        qdata: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        target_dtype: Optional[torch.dtype],
        group_size: Optional[int],
        dtype: torch.dtype,
        *,
        scale: Optional[torch.Tensor] = None,
        zero_point: Optional[torch.Tensor] = None,
        A_scale: Optional[torch.Tensor] = None,
        A_zero_point: Optional[torch.Tensor] = None,
        B_scale: Optional[torch.Tensor] = None,
        B_zero_point: Optional[torch.Tensor] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        adapter_group_size: Optional[int] = None,
    ):
        super().__init__()
        tensors = dict(qdata=qdata, A=A, B=B, scale=scale, zero_point=zero_point, A_scale=A_scale,
                       A_zero_point=A_zero_point, B_scale=B_scale, B_zero_point=B_zero_point)
        for name, t in tensors.items():
            if t is not None and (t.dim() != 3 or t.shape[0] != qdata.shape[0]):
                raise ValueError(f"QuantExperts field {name} must be (experts, rows, cols) with {qdata.shape[0]} "
                                 f"experts; got {tuple(t.shape)}")
            setattr(self, name, t)
        self.target_dtype, self.group_size = target_dtype, group_size
        self.adapter_dtype, self.adapter_group_size = adapter_dtype, adapter_group_size
        self.expert(0)  # every check of QuantWithLowRank's, once

    @classmethod
    def from_experts(cls, experts: Sequence[QuantWithLowRank]) -> "QuantExperts":
        """Stack the experts' weights (same shapes, rank, base and adapter formats)."""
        first = experts[0]
        attributes = {n: getattr(first, n) for n in cls.tensor_attribute_names + cls.optional_tensor_attribute_names}
        tensors = {}
        for name in QuantWithLowRank.fields:
            parts = [getattr(w, name) for w in experts]
            if parts[0] is None:
                continue
            if any(p is None or p.shape != parts[0].shape or p.dtype != parts[0].dtype for p in parts):
                raise ValueError(f"experts differ in field {name} (shape, dtype or presence): they must share the "
                                 "rank and formats to be stacked")
            tensors[name] = torch.stack(parts)
        return cls(**tensors, **attributes)

    def without_residual(self) -> "QuantExperts":
        """The same compressed bases with rank-0 residuals (what a base-only checkpoint holds)."""
        E, out_features, in_features = self.shape
        base = {n: getattr(self, n) for n in ("qdata", "scale", "zero_point")}
        empty = dict(dtype=self.dtype, device=self.device)
        return QuantExperts(A=torch.zeros(E, 0, in_features, **empty), B=torch.zeros(E, out_features, 0, **empty),
                            **base, target_dtype=self.target_dtype, group_size=self.group_size, dtype=self.dtype)

    def dequantize_base(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense (E, out, in) compressed bases ``W_c`` alone."""
        return torch.stack([self.expert(e).dequantize_base(dtype) for e in range(self.num_experts)])

    def _fields(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.tensor_data_names + self.optional_tensor_data_names
                if getattr(self, n) is not None}

    def _attributes(self) -> dict:
        return {n: getattr(self, n) for n in self.tensor_attribute_names + self.optional_tensor_attribute_names}

    def expert(self, index: int) -> QuantWithLowRank:
        """Expert ``index``'s weight (views of this tensor's fields, no copy)."""
        return QuantWithLowRank(**{n: t[index] for n, t in self._fields().items()}, **self._attributes())

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense (E, out, in) effective weights ``W_c + B @ A`` of every expert."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.num_experts)])

    def _quantization_type(self) -> str:
        return f"experts={self.num_experts}, {self.expert(0)._quantization_type()}"

    def __repr__(self) -> str:
        return f"QuantExperts({self._quantization_type()}, device={self.device})"


implements = QuantExperts.implements
implements_torch_function = QuantExperts.implements_torch_function


@implements_torch_function(torch.Tensor.__getitem__)
def _(func, types, args, kwargs):
    """``weight[e]`` (the eager experts loop; ``e`` an int or a 0-d tensor): expert ``e``'s ``QuantWithLowRank``,
    a new tensor rather than an aten view (a view's version counter cannot be shared under inference mode). A
    vector of experts (the batched experts paths) gives their dense effective weights: correct, not fast."""
    self, index = args
    integer_tensor = isinstance(index, torch.Tensor) and not index.is_floating_point()
    if isinstance(index, int) or (integer_tensor and index.dim() == 0):
        return self.expert(int(index))
    if integer_tensor:
        dense = [self.expert(int(e)).dequantize() for e in index.reshape(-1)]
        return torch.stack(dense).reshape(*index.shape, *self.shape[1:])
    raise NotImplementedError(f"QuantExperts is indexed by expert only, got {index!r}")


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """``.to(device)`` moves every field; ``.to(dtype)`` recasts the floating ones (intN values stay)."""
    self: QuantExperts = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = to["device"], to["dtype"]
    if dtype not in _FLOAT_TYPES:
        raise TypeError(f"QuantExperts computes in a floating dtype ({_FLOAT_TYPES}), got {dtype}")
    moved = {}
    for name, t in self._fields().items():
        field = QuantWithLowRank.fields[name]
        floating = field.is_floating(getattr(self, field.dtype_attribute))
        moved[name] = t.to(device=device, dtype=dtype) if floating else t.to(device)
    new = QuantExperts(**moved, **(self._attributes() | {"dtype": dtype}))
    return return_and_correct_aliasing(func, args, kwargs, new)



@implements(aten.baddbmm.default)
def _(func, types, args, kwargs):
    """``W + alpha * b1 @ b2`` as a dense tensor: PEFT's LoRA on fused experts folds its update in this way."""
    self, batch1, batch2 = args[:3]
    return func(self.dequantize(batch1.dtype), batch1, batch2, *args[3:], **kwargs)
