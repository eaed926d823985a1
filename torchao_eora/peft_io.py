"""PEFT LoRA adapters from EoRA residuals, and back.

A layer ``y = W_c x + B (A x)`` is a LoRA layer on the compressed base ``W_c`` with ``lora_A = A`` (r x in),
``lora_B = B`` (out x r) and scaling ``lora_alpha / r = 1``. :func:`export_peft` writes the residuals as
``adapter_model.safetensors`` + ``adapter_config.json`` (the format PEFT, vLLM and SGLang load) beside a base-only
checkpoint (the same model with rank-0 residuals); :func:`import_peft` folds any PEFT LoRA adapter back into
``QuantWithLowRank`` weights.

PEFT has no integer adapters: quantized adapters (``EoRAConfig(adapter_bits=...)``) are exported dequantized, as
floating ``lora_A`` / ``lora_B`` in the model dtype holding exactly the values the layer computes with (same outputs,
none of the size saving); an imported adapter is always full precision.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from .config import EoRAConfig
from .hf import atomic_directory, attach_quantizer, eora_config_of, write_checkpoint
from .tensor import QuantWithLowRank

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_DIR", "base_only", "export_peft", "import_peft"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
_KEY = re.compile(rf"^{re.escape(_PREFIX)}(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def _low_rank_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m._parameters.get("weight"), QuantWithLowRank)}


@contextlib.contextmanager
def base_only(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily give every ``QuantWithLowRank`` weight a rank-0 residual: the compressed base alone."""
    saved = {}
    try:
        for module in _low_rank_modules(model).values():
            w = saved[module] = module.weight
            empty = dict(dtype=w.dtype, device=w.device)
            rank0 = w.with_factors(torch.zeros(0, w.shape[1], **empty), torch.zeros(w.shape[0], 0, **empty))
            module.weight = torch.nn.Parameter(rank0, requires_grad=False)
        yield model
    finally:
        for module, w in saved.items():
            module.weight = w


def _adapter_config(ranks: dict[str, int], target_modules: list[str], base_model_name_or_path: str | None) -> dict:
    # One global r (the most common rank) plus per-module exceptions; alpha always equals r, so scaling is 1.
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _target_modules(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Short names (``q_proj``) when they select exactly the exported modules, as vLLM expects; else full names."""
    short = {n.rsplit(".", 1)[-1] for n in names}
    selected = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in short}
    return sorted(short) if selected == set(names) else sorted(names)


def export_peft(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    *,
    save_base: bool = True,
    config: EoRAConfig | None = None,
    tokenizer=None,
) -> Path:
    """Write the EoRA residuals of ``model`` as a PEFT LoRA adapter, atomically.

    ``out_dir`` receives ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` = ``A``,
    ``...lora_B.weight`` = ``B``, dequantized to the model dtype when the adapters are intx) and ``adapter_config.json`` (``lora_alpha = r``, per-module ``rank_pattern`` /
    ``alpha_pattern`` when ranks differ). With ``save_base``, ``out_dir/base`` receives the base-only checkpoint:
    this model with rank-0 residuals, loadable with ``from_pretrained`` after ``import torchao_eora``.
    ``PeftModel.from_pretrained(base, out_dir)`` then computes what ``model`` computes; ``model`` keeps its residuals.

    Args:
        model: a Hugging Face model with ``QuantWithLowRank`` weights.
        out_dir: the adapter directory (replaced only once complete).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to ``out_dir/base`` when it is saved.
        save_base: also write the base-only checkpoint to ``out_dir/base``.
        config: the ``EoRAConfig`` of the model (default: the one in ``model.config``); needed for ``save_base``.
        tokenizer: saved with the base checkpoint when given.
    """
    out = Path(out_dir).resolve()
    modules = {n: m for n, m in _low_rank_modules(model).items() if m.weight.rank > 0}
    if not modules:
        raise ValueError("the model has no QuantWithLowRank weight with a residual (rank > 0) to export")
    tensors = {}
    for name, module in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.weight.dequantize_A().detach().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.weight.dequantize_B().detach().contiguous()
    if save_base:
        config = config if config is not None else eora_config_of(model)
        base_model_name_or_path = base_model_name_or_path or str(out / BASE_DIR)
    adapter_config = _adapter_config(
        {n: m.weight.rank for n, m in modules.items()}, _target_modules(model, list(modules)), base_model_name_or_path
    )
    from safetensors.torch import save_file

    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        if save_base:
            (tmp / BASE_DIR).mkdir()
            try:
                with base_only(model):
                    write_checkpoint(model, tmp / BASE_DIR, replace(config, method="none"), tokenizer)
            finally:  # write_checkpoint recorded the base-only config; the model itself still has its residuals
                attach_quantizer(model, config)
    return out


# ---- import -----------------------------------------------------------------------------------------------------


def _pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rule (``get_pattern_key``): the first key matching a suffix of the module name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_supported(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise NotImplementedError(f"{path}: LoRA options {found} cannot become a low-rank residual")


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise ValueError(
                f"{adapter_dir} holds adapter_model.bin (pickle); torchao-eora reads safetensors only "
                "(unpickling can execute code): re-save the adapter with safe_serialization=True"
            )
        raise FileNotFoundError(f"{weights} not found")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    _check_supported(config, adapter_dir)
    return config, load_file(str(weights))


def _with_residual(name: str, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> QuantWithLowRank:
    out_features, in_features = weight.shape
    if A.shape[1] != in_features or B.shape[0] != out_features:
        raise ValueError(
            f"adapter tensors for {name} do not fit its {out_features}x{in_features} weight: "
            f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
        )
    if isinstance(weight, QuantWithLowRank):  # keep the compressed base, replace the residual
        return weight.with_factors(A, B)
    if type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.is_floating_point():  # a dense base
        dtype = weight.dtype
        return QuantWithLowRank(weight.detach().contiguous(), A.to(dtype), B.to(dtype), None, None, dtype)
    raise TypeError(f"{name}: cannot add a residual to a {type(weight).__name__} weight")


@torch.no_grad()
def import_peft(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.nn.Module:
    """Fold a PEFT LoRA adapter into ``model``'s linear layers as ``QuantWithLowRank`` residuals, in place.

    Each adapted layer gets ``A = lora_A`` and ``B = lora_B * scaling`` with PEFT's scaling ``lora_alpha / r``
    (``/ sqrt(r)`` with rsLoRA; per-module ``rank_pattern`` / ``alpha_pattern`` honoured). A ``QuantWithLowRank``
    layer keeps its compressed base and gets the adapter as its residual (an existing residual is replaced);
    a dense floating weight becomes a dense base. Only ``adapter_model.safetensors`` is read.

    Returns:
        ``model``.
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_adapter(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"{adapter_dir}: unsupported adapter tensor {key} (expected {_PREFIX}<module>.lora_A/B.weight)"
            )
        pairs.setdefault(match["module"], {})[match["factor"]] = value
    for name, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise ValueError(f"{adapter_dir}: adapter tensor {_PREFIX}{name}.{missing}.weight is missing")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{adapter_dir}: the adapter targets {name}, which this model does not have") from None
        A, B = factors["A"], factors["B"]
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if A.shape[0] != r or B.shape[1] != r:
            raise ValueError(
                f"{adapter_dir}: {name} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, "
                f"but adapter_config says r={r}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        new = _with_residual(name, module.weight, A, B * scaling if scaling != 1 else B)
        module.weight = torch.nn.Parameter(new, requires_grad=False)
    return model
