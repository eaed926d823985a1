"""Hugging Face glue: save a compressed model as safetensors + a config.json carrying a ``TorchAoConfig``."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from .config import EoRAConfig

__all__ = ["save_pretrained"]


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike, config: EoRAConfig, tokenizer=None) -> Path:
    """``model.save_pretrained`` for a model compressed by ``quantize_(model, config)``, written atomically.

    Everything is written into a temporary sibling directory that is renamed into place only once complete, so an
    interrupted save never leaves a directory that looks valid. An existing ``out_dir`` is replaced.
    """
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    quant_config = TorchAoConfig(replace(config, calibration=None))  # statistics are not part of the checkpoint
    model.config.quantization_config = quant_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quant_config)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
