"""Fused expert weights (``QuantExperts``) in PEFT's LoRA format for 3-D parameters (``target_parameters``).

PEFT (>= 0.17) adapts a fused (E, out, in) parameter of transformers' layout with one ``lora_A`` of (E * r, in),
expert ``e``'s rows at ``[e * r, (e + 1) * r)``, and one ``lora_B`` of (out, r * E) whose column ``k * E + e`` is
column ``k`` of expert ``e``'s ``B``. Two parameters of one module (``gate_up_proj``, ``down_proj``) nest: the one
listed first in ``target_parameters`` is wrapped first, so its factors are under ``<experts>.base_layer``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .experts import EXPERT_PARAMETERS
from .experts_tensor import QuantExperts

__all__ = ["dropped_by_peft", "expert_adapter", "experts_base_only", "quant_experts"]


def quant_experts(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """``<experts module>.<parameter>`` -> (module, parameter name) for every ``QuantExperts`` of ``model``."""
    return {f"{n}.{p}": (m, p) for n, m in model.named_modules() for p in EXPERT_PARAMETERS
            if isinstance(m._parameters.get(p), QuantExperts)}


def expert_adapter(model: torch.nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], list[str], set[int]]:
    """The LoRA tensors of every ``QuantExperts`` (keys under ``prefix``), PEFT's ``target_parameters`` (short
    names, in nesting order) and the ranks used."""
    tensors, targets, ranks = {}, [], set()
    for name, (module, param) in quant_experts(model).items():
        weight: QuantExperts = getattr(module, param)
        experts = [weight.expert(e) for e in range(weight.num_experts)]
        A = torch.cat([w.dequantize_A() for w in experts])  # (E * r, in)
        B = torch.stack([w.dequantize_B() for w in experts], dim=-1)  # (out, r, E)
        module_name = name.rsplit(".", 1)[0]
        nested = ".base_layer" if param == EXPERT_PARAMETERS[0] else ""
        tensors[f"{prefix}{module_name}{nested}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{prefix}{module_name}{nested}.lora_B.weight"] = B.reshape(B.shape[0], -1).detach().contiguous()
        short = ".".join(name.split(".")[-3:])  # mlp.experts.gate_up_proj
        if short not in targets:
            targets.append(short)
        ranks.add(weight.rank)
    order = {p: i for i, p in enumerate(EXPERT_PARAMETERS)}
    return tensors, sorted(targets, key=lambda t: order[t.rsplit(".", 1)[1]]), ranks


@contextlib.contextmanager
def experts_base_only(model: torch.nn.Module, dense: bool = False) -> Iterator[torch.nn.Module]:
    """Temporarily replace every ``QuantExperts`` by its base alone: rank-0 residuals, or with ``dense`` the plain
    (E, out, in) ``W_c`` (stock libraries have no 3-D intx tensor)."""
    saved = {}
    try:
        for module, param in quant_experts(model).values():
            weight = saved[(module, param)] = getattr(module, param)
            base = weight.dequantize_base() if dense else weight.without_residual()
            setattr(module, param, torch.nn.Parameter(base, requires_grad=False))
        yield model
    finally:
        for (module, param), weight in saved.items():
            setattr(module, param, weight)


def dropped_by_peft(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The exported linears PEFT will not adapt: with transformers 5, PEFT (0.18-0.21) reads targets named like a
    transformers 4 per-expert weight of this architecture (``gate_proj`` / ``up_proj`` / ``down_proj`` of a
    DeepSeek-V3's shared experts or dense layers) as old expert adapters and drops them from ``target_modules``."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    old_names = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {})
    return [n for n in names if n.rsplit(".", 1)[-1] in old_names]
