"""The compressed base in formats that load without torchao_eora: torchao's own intx tensor, or plain dense weights.

``export_peft(..., base_format="torchao")`` writes ``OUT/base`` with every intx ``QuantWithLowRank`` base as
torchao's ``IntxUnpackedToInt8Tensor`` (what ``IntxWeightOnlyConfig(weight_dtype=torch.intN,
granularity=PerGroup(g))`` produces: int8 ``qdata`` one value a byte, per-group ``scale`` and int8 ``zero_point``),
saved by transformers ``save_pretrained`` with ``TorchAoConfig(IntxWeightOnlyConfig(...))`` as safetensors. Both
types dequantize with the same arithmetic, ``(qdata - zero_point) * scale`` per group, so the weight is
bit-identical. Bases torchao's intx type cannot hold (a pruned-only dense base) are written as plain dense ``W_c``;
``base_format="dense"`` writes every base that way (a plain checkpoint, loadable by anything that reads
transformers safetensors). Either loads with ``AutoModelForCausalLM.from_pretrained`` given only torchao,
transformers (and peft for the adapter); torchao_eora need not be installed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Literal

import torch

from .config import EoRAConfig
from .hf import untie_compressed_head
from .io_utils import canonicalize_safetensors_header
from .peft_experts import experts_base_only
from .tensor import QuantWithLowRank

__all__ = ["BASE_FORMATS", "BaseFormat", "stock_base", "stock_weight", "write_stock_base"]

log = logging.getLogger(__name__)

BaseFormat = Literal["torchao", "dense", "eora"]
BASE_FORMATS: tuple[str, ...] = ("torchao", "dense", "eora")


def stock_weight(weight: QuantWithLowRank, base_format: BaseFormat = "torchao") -> torch.Tensor:
    """The compressed base ``W_c`` of ``weight`` (residual dropped) as a stock tensor.

    ``"torchao"``: an ``IntxUnpackedToInt8Tensor`` with our values (unpacked to one per int8), scale and zero
    point, for an intx base; a dense base (no scale) stays a plain tensor. ``"dense"``: always the plain
    dequantized ``W_c`` in the weight's dtype.
    """
    if base_format not in ("torchao", "dense"):
        raise ValueError(f"stock base format must be 'torchao' or 'dense', got {base_format!r}")
    if base_format == "dense" or not is_intx(weight):
        return weight.dequantize_base().detach().contiguous()
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return IntxUnpackedToInt8Tensor(
        qdata=weight.values("qdata").contiguous(),
        scale=weight.scale.contiguous(),
        zero_point=weight.zero_point.contiguous(),
        target_dtype=weight.target_dtype,
        block_size=(1, weight.group_size or weight.shape[1]),
        dtype=weight.dtype,
        activation_quantization=None,
    )


def is_intx(weight: QuantWithLowRank) -> bool:
    """Whether torchao's ``IntxUnpackedToInt8Tensor`` can hold this base (intN values with scale and zero point)."""
    return weight.target_dtype is not None and weight.scale is not None and weight.zero_point is not None


def _intx_config(weight: QuantWithLowRank, symmetric: bool):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    return IntxWeightOnlyConfig(
        weight_dtype=weight.target_dtype, granularity=PerGroup(weight.group_size or weight.shape[1]),
        mapping_type=mapping,
    )


def _is_symmetric(config: EoRAConfig | None) -> bool:
    base = getattr(config, "base", None)
    base = getattr(base, "quantizer", None) or base  # PruneConfig(quantizer=...) quantizes with its quantizer
    return bool(getattr(base, "symmetric", False))


def _torchao_config(model: torch.nn.Module, weights: dict[str, QuantWithLowRank], config: EoRAConfig | None):
    """``TorchAoConfig`` describing the intx weights: one ``IntxWeightOnlyConfig`` when they share bits and group
    size (else ``FqnToConfig``), every other linear layer in ``modules_to_not_convert``; None without intx weights."""
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    symmetric = _is_symmetric(config)
    intx = {name: _intx_config(w, symmetric) for name, w in weights.items() if is_intx(w)}
    if not intx:
        return None
    plain = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in intx)
    kinds = {repr(c) for c in intx.values()}
    quant_type = next(iter(intx.values())) if len(kinds) == 1 else FqnToConfig(intx)
    return TorchAoConfig(quant_type, modules_to_not_convert=plain)


@contextlib.contextmanager
def stock_base(
    model: torch.nn.Module, base_format: BaseFormat = "torchao", config: EoRAConfig | None = None
) -> Iterator[torch.nn.Module]:
    """Temporarily replace every ``QuantWithLowRank`` weight by :func:`stock_weight` and the model's
    quantization config by the matching stock one (``TorchAoConfig(IntxWeightOnlyConfig)``, or none for a plain
    checkpoint), so that ``model.save_pretrained`` writes a checkpoint stock libraries load. ``config``: the
    model's ``EoRAConfig`` (only its symmetric / asymmetric mapping is recorded). Everything is restored on exit."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m._parameters.get("weight"), QuantWithLowRank)}
    saved_weights = {m: m.weight for m in modules.values()}
    experts = contextlib.ExitStack()
    hf_config = model.config
    had_quant = "quantization_config" in hf_config.__dict__
    saved_quant, saved_quantizer = getattr(hf_config, "quantization_config", None), getattr(model, "hf_quantizer", None)
    try:
        quant_config = None
        if base_format == "torchao":
            quant_config = _torchao_config(model, {n: m.weight for n, m in modules.items()}, config)
            dense = [n for n, m in modules.items() if not is_intx(m.weight)]
            if dense:
                log.info("%d layers have a base torchao's intx type cannot hold (e.g. pruned, no scale): written "
                         "as plain dense weights (first: %s)", len(dense), dense[0])
        for module in modules.values():
            module.weight = torch.nn.Parameter(stock_weight(module.weight, base_format), requires_grad=False)
        experts.enter_context(experts_base_only(model, dense=True))  # no stock 3-D intx type: plain W_c
        if quant_config is None:
            hf_config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
        else:
            from transformers.quantizers import AutoHfQuantizer

            hf_config.quantization_config = quant_config
            model.hf_quantizer = AutoHfQuantizer.from_config(quant_config)
        yield model
    finally:
        experts.close()
        for module, w in saved_weights.items():
            module.weight = w
        if had_quant:
            hf_config.quantization_config = saved_quant
        else:
            hf_config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = saved_quantizer


def write_stock_base(
    model: torch.nn.Module,
    directory: Path,
    base_format: BaseFormat = "torchao",
    config: EoRAConfig | None = None,
    tokenizer=None,
) -> None:
    """Write the compressed base of ``model`` (residuals dropped) into an existing ``directory`` as a stock
    checkpoint: ``"torchao"`` (intx bases as ``IntxUnpackedToInt8Tensor``, others dense) or ``"dense"``."""
    if base_format not in ("torchao", "dense"):
        raise ValueError(f"stock base format must be 'torchao' or 'dense', got {base_format!r}")
    untie_compressed_head(model)
    with stock_base(model, base_format, config):
        model.save_pretrained(directory, safe_serialization=True)
    for weights in Path(directory).glob("*.safetensors"):
        canonicalize_safetensors_header(weights)  # same model, same bytes
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
