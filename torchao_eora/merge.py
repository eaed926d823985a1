"""Merge EoRA residuals into plain dense weights, for users who want an ordinary checkpoint back."""

from __future__ import annotations

import torch

from .tensor import QuantWithLowRank

__all__ = ["merge_low_rank"]


@torch.no_grad()
def merge_low_rank(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``QuantWithLowRank`` weight by a dense ``nn.Parameter`` holding ``W_c + B @ A``, in place.

    The result is an ordinary model: its quantization markers (``config.quantization_config``, ``hf_quantizer``)
    are removed so ``model.save_pretrained`` writes a plain checkpoint. Outputs agree with the unmerged model up
    to float rounding (one matmul instead of two paths). Memory grows back to the dense size.

    Returns:
        ``model``.
    """
    merged = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, QuantWithLowRank):
            module.weight = torch.nn.Parameter(weight.dequantize().contiguous(), requires_grad=weight.requires_grad)
            module.__dict__.pop("extra_repr", None)  # the quantize_ / transformers repr patch describes the old weight
            merged += 1
    if merged:
        _forget_quantization(model)
    return model


def _forget_quantization(model: torch.nn.Module) -> None:
    """What transformers' ``remove_quantization_config`` does, without needing an ``hf_quantizer``."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "quantization_method" in vars(model):
        del model.quantization_method
    if "is_quantized" in vars(model):
        model.is_quantized = False
