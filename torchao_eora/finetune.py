"""Fine-tuning the low-rank residuals on top of the frozen compressed base (QLoRA-style, started from EoRA).

The EoRA paper fine-tunes its adapters and finds EoRA a better starting point than QLoRA's default
initialisation or LoftQ. Here a layer ``y = W_c x + B (A x)`` becomes a :class:`LoRALinear`: ``W_c`` stays a
compressed ``QuantWithLowRank`` weight (rank 0, ``requires_grad=False``; its int values and scales are never
touched), and ``lora_A`` (r x in) / ``lora_B`` (out x r) are ordinary fp32 ``nn.Parameter`` s, the only
trainable tensors of the model. Gradients flow through the frozen base to the inputs only.

    params = make_trainable(model)                  # A, B from the EoRA (or SVD) residual already in the weights
    params = make_trainable(model, init="lora", rank=64)   # or QLoRA's default: A Kaiming-uniform, B = 0
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ...                                             # eager or torch.compile(model)
    fold_adapters(model)                            # back to QuantWithLowRank weights: save_pretrained / export_peft

Starting points (same compressed base ``W_c``): ``EoRAConfig(compensation="none")`` then ``init="lora"`` (QLoRA);
``EoRAConfig(compensation="svd")`` (LoftQ with one alternating step is exactly the truncated SVD of ``W - W_c``);
``EoRAConfig(compensation="eora")`` with calibration statistics.

The same residual is also a PEFT LoRA adapter with scaling 1 (:func:`torchao_eora.export_peft`):
``PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)`` trains it with PEFT's own layers instead.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tensor import QuantWithLowRank

__all__ = ["LoRALinear", "make_trainable", "fold_adapters", "adapter_parameters"]

Init = Literal["factors", "lora"]


class LoRALinear(nn.Module):
    """``y = W_c x + bias + lora_B (lora_A x)`` with a frozen compressed ``W_c`` and trainable fp32 factors.

    Attributes:
        weight: the compressed base, a rank-0 ``QuantWithLowRank`` parameter with ``requires_grad=False``.
        bias: the original bias (frozen) or None.
        lora_A: (rank x in) fp32 ``nn.Parameter``.
        lora_B: (out x rank) fp32 ``nn.Parameter``.
    The low-rank path runs in fp32 whatever the model's dtype; its result is cast back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        weight = linear.weight
        if not isinstance(weight, QuantWithLowRank):
            raise TypeError(f"LoRALinear wraps a linear layer with a QuantWithLowRank weight, got {type(weight).__name__}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if lora_A.shape[1] != self.in_features or lora_B.shape[0] != self.out_features or lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(
                f"adapters do not fit a {self.out_features}x{self.in_features} layer: "
                f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
            )
        rank0 = weight.with_factors(lora_A.new_zeros(0, self.in_features), lora_B.new_zeros(self.out_features, 0))
        self.weight = nn.Parameter(rank0, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # Own copies: dequantize_A/B may return the weight's own tensors, which training must not modify.
        self.lora_A = nn.Parameter(lora_A.detach().to(torch.float32, copy=True).contiguous())
        self.lora_B = nn.Parameter(lora_B.detach().to(torch.float32, copy=True).contiguous())
        # The module we replaced, emptied (no second copy of the weights): fold_adapters puts it back, hooks and
        # repr included, with the trained residual. Kept out of _modules so it is no part of the state dict.
        linear.register_parameter("weight", None)
        linear.register_parameter("bias", None)
        self.__dict__["_original"] = linear

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as QuantWithLowRank's own F.linear, so a fresh LoRALinear computes what the
        # folded weight computes.
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.weight, self.bias)  # frozen compressed base: gradients reach x only
        low_rank = (x2.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        y = y + low_rank.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def folded(self) -> nn.Linear:
        """The original ``nn.Linear`` with ``QuantWithLowRank(W_c, A=lora_A, B=lora_B)`` as its weight."""
        linear = self.__dict__["_original"]
        A, B = (p.detach().clone() for p in (self.lora_A, self.lora_B))  # never alias the live parameters
        linear.weight = nn.Parameter(self.weight.with_factors(A, B), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, base={self.weight.describe_base()}")


def _lora_default_init(out_features: int, in_features: int, rank: int, generator: Optional[torch.Generator]):
    """PEFT's / QLoRA's default: ``A`` Kaiming-uniform with ``a = sqrt(5)`` (nn.Linear's init), ``B = 0``."""
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A, torch.zeros(out_features, rank)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def make_trainable(
    model: nn.Module,
    init: Init = "factors",
    rank: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> list[nn.Parameter]:
    """Give every ``QuantWithLowRank`` linear layer trainable adapters; freeze everything else. In place.

    Each ``nn.Linear`` whose weight is a ``QuantWithLowRank`` is replaced by a :class:`LoRALinear` holding the
    same compressed base (rank 0, frozen) and fp32 ``lora_A`` / ``lora_B`` parameters. Every other parameter of
    the model (embeddings, norms, ``lm_head``, biases) gets ``requires_grad=False``.

    Args:
        model: a model compressed with ``EoRAConfig`` (any compensation; ``"none"`` needs ``init="lora"``).
        init: ``"factors"``: start from the residual stored in the weights (``dequantize_A()`` /
            ``dequantize_B()``: EoRA, SVD, an imported adapter); the model computes exactly what it did.
            ``"lora"``: QLoRA's / PEFT's default, ``A`` Kaiming-uniform (``a = sqrt(5)``) and ``B = 0``, so the
            model starts as the compressed base alone; the stored residual is dropped.
        rank: the adapter rank for ``init="lora"`` (default: each weight's current rank).
        generator: random generator for ``init="lora"`` (reproducible initialisation).

    Returns:
        The trainable parameters (``lora_A``, ``lora_B`` of each layer, in module order), for the optimizer.
    """
    if init not in ("factors", "lora"):
        raise ValueError(f"init must be 'factors' or 'lora', got {init!r}")
    if init == "factors" and rank is not None:
        raise ValueError("rank only applies to init='lora'; init='factors' keeps each weight's rank")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has trainable adapters (make_trainable was applied); fold_adapters first")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), QuantWithLowRank)]
    if not targets:
        raise ValueError("the model has no QuantWithLowRank linear layer: compress it with EoRAConfig first")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name, linear in targets:
        weight: QuantWithLowRank = linear.weight
        out_features, in_features = weight.shape
        if init == "factors":
            if weight.rank == 0:
                raise ValueError(f"{name} has no residual (rank 0) to start from: use init='lora' with a rank")
            A, B = weight.dequantize_A(torch.float32), weight.dequantize_B(torch.float32)
        else:
            r = weight.rank if rank is None else rank
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"init='lora' needs a positive rank for {name} (its weight has rank {weight.rank})")
            A, B = _lora_default_init(out_features, in_features, r, generator)
        new = LoRALinear(linear, A.to(weight.device), B.to(weight.device))
        _replace(model, name, new)
        params += [new.lora_A, new.lora_B]
    return params


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` parameters of every :class:`LoRALinear` in ``model``, in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def fold_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`make_trainable`: every :class:`LoRALinear` becomes its ``nn.Linear`` again, in place.

    The weight is the same compressed base with the (trained) factors as its residual
    (``QuantWithLowRank.with_factors``, cast to the model dtype), so the model saves with
    :func:`torchao_eora.save_pretrained` and :func:`torchao_eora.export_peft`. Other parameters stay frozen.
    Factors are stored in full precision even where the starting adapters were quantized (``adapter_bits``).

    Returns:
        ``model``.
    """
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, name, module.folded())
    return model
