"""PEFT LoRA adapters from EoRA residuals, and back.

A layer ``y = W_c x + B (A x)`` is a LoRA layer on the compressed base ``W_c`` with ``lora_A = A`` (r x in),
``lora_B = B`` (out x r) and scaling ``lora_alpha / r = 1``. :func:`export_peft` writes the residuals as
``adapter_model.safetensors`` + ``adapter_config.json`` (the format PEFT, vLLM and SGLang load) beside a base-only
checkpoint (by default torchao's own intx tensors, loadable without torchao_eora: ``stock_export.py``; or the same
model with rank-0 residuals); :func:`import_peft` folds any PEFT LoRA adapter back into ``QuantWithLowRank`` weights.

PEFT has no integer adapters: quantized adapters (``EoRAConfig(adapter_bits=...)``) are exported dequantized, as
floating ``lora_A`` / ``lora_B`` in the model dtype holding exactly the values the layer computes with (same outputs,
none of the size saving); an imported adapter is always full precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from .config import EoRAConfig
from .hf import attach_quantizer, recorded_config, write_checkpoint
from .io_utils import atomic_directory
from .peft_experts import dropped_by_peft, expert_adapter, experts_base_only
from .stock_export import BASE_FORMATS, BaseFormat, write_stock_base
from .tensor import QuantWithLowRank

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_DIR", "VLLM_MAX_LORA_RANKS", "base_only", "export_peft",
           "import_peft", "vllm_lora_allocation"]

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
# vLLM's accepted --max-lora-rank values; it allocates every adapter slot at that rank, in fp16/bf16 only.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
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
    overwrite: bool = False,
    base_format: BaseFormat = "torchao",
) -> Path:
    """Write the EoRA residuals of ``model`` as a PEFT LoRA adapter, atomically.

    ``out_dir`` receives ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` = ``A``,
    ``...lora_B.weight`` = ``B``, dequantized to the model dtype when the adapters are intx) and ``adapter_config.json`` (``lora_alpha = r``, per-module ``rank_pattern`` /
    ``alpha_pattern`` when ranks differ). With ``save_base``, ``out_dir/base`` receives the compressed base alone,
    in ``base_format``: ``"torchao"`` (default): torchao's ``IntxUnpackedToInt8Tensor`` with
    ``TorchAoConfig(IntxWeightOnlyConfig)``, loadable by ``from_pretrained`` with stock torchao + transformers (no
    torchao_eora), bases it cannot hold (pruned-only) as plain dense ``W_c``; ``"dense"``: every ``W_c`` as plain
    dense weights (a plain checkpoint); ``"eora"``: this model with rank-0 residuals (``QuantWithLowRank``,
    bit-packed, smallest; loading needs ``import torchao_eora``; ``import_peft`` folds the adapter back into it).
    ``PeftModel.from_pretrained(base, out_dir)`` then computes what ``model`` computes; ``model`` keeps its residuals.

    Args:
        model: a Hugging Face model with ``QuantWithLowRank`` weights.
        out_dir: the adapter directory (replaced only once complete).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to ``out_dir/base`` when it is saved.
        save_base: also write the compressed base to ``out_dir/base``.
        config: the ``EoRAConfig`` of the model (default: the one in ``model.config``); needed for ``save_base``.
        tokenizer: saved with the base checkpoint when given.
        overwrite: replace a non-empty ``out_dir`` that is not a torchao-eora checkpoint or adapter (a file, or the
            directory the model was loaded from, is refused even so).
        base_format: ``"torchao"``, ``"dense"`` or ``"eora"``: how ``out_dir/base`` is written (see above).
    """
    if base_format not in BASE_FORMATS:
        raise ValueError(f"base_format must be one of {list(BASE_FORMATS)}, got {base_format!r}")
    out = Path(out_dir).resolve()
    modules = {n: m for n, m in _low_rank_modules(model).items() if m.weight.rank > 0}
    if not modules:
        raise ValueError("the model has no QuantWithLowRank weight with a residual (rank > 0) to export")
    tensors = {}
    for name, module in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.weight.dequantize_A().detach().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.weight.dequantize_B().detach().contiguous()
    expert_tensors, target_parameters, expert_ranks = expert_adapter(model, _PREFIX)
    tensors.update(expert_tensors)
    if save_base:
        config = config if config is not None else recorded_config(model)
        base_model_name_or_path = base_model_name_or_path or str(out / BASE_DIR)
    adapter_config = _adapter_config(
        {n: m.weight.rank for n, m in modules.items()}, _target_modules(model, list(modules)), base_model_name_or_path
    )
    if target_parameters:  # PEFT's LoRA on the fused expert parameters takes the global r
        if expert_ranks != {adapter_config["r"]}:
            raise ValueError(f"the experts' residual ranks {sorted(expert_ranks)} differ from the linear layers' "
                             f"{adapter_config['r']}: PEFT gives fused experts the global r; compress with one rank")
        adapter_config["target_parameters"] = target_parameters
        # PEFT reads gate_proj / up_proj linears (DeepSeek's shared experts) as a v4 adapter of per-expert weights
        # and gives the fused gate_up_proj rank 2r; an explicit pattern for each parameter comes first and wins.
        for target in target_parameters:
            adapter_config["rank_pattern"][target] = adapter_config["alpha_pattern"][target] = adapter_config["r"]
    dropped = dropped_by_peft(model, list(modules))
    if dropped:
        log.warning("PEFT with transformers 5 will not apply the adapters of %d linears named like transformers 4 "
                    "expert weights (first: %s): it reads them as an old per-expert adapter. The adapter file holds "
                    "them; PeftModel computes the model without their residuals", len(dropped), dropped[0])
    from safetensors.torch import save_file

    sources = [getattr(model, "name_or_path", None) or None]
    with atomic_directory(out, sources=sources, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        if save_base:
            (tmp / BASE_DIR).mkdir()
            if base_format != "eora":  # stock formats: the model's weights and config are restored on exit
                write_stock_base(model, tmp / BASE_DIR, base_format, config, tokenizer)
            else:
                try:
                    with base_only(model), experts_base_only(model):
                        write_checkpoint(model, tmp / BASE_DIR, replace(config, compensation="none"), tokenizer)
                finally:  # write_checkpoint recorded the base-only config; the model itself still has its residuals
                    attach_quantizer(model, config)
    return out


# ---- import -----------------------------------------------------------------------------------------------------
# Everything is validated before the first module is touched (a model is either fully imported or unchanged); every
# problem is one ValueError line naming the adapter directory, what is wrong and what to do.


def vllm_lora_allocation(model: torch.nn.Module) -> dict:
    """What vLLM holds for the adapter ``export_peft`` writes from ``model``, against our own format.

    vLLM keeps LoRA weights in fp16/bf16 only and allocates each module's ``A`` and ``B`` at ``--max-lora-rank``,
    which must be one of :data:`VLLM_MAX_LORA_RANKS`. Returns ``{"max_rank", "max_lora_rank" (None when no
    allowed value fits), "vllm_bf16_bytes" (every adapted module at that rank, 2 bytes a value, one adapter
    slot), "our_bytes" (the adapters as our checkpoint holds them: bit-packed values with their scales and zero
    points), "quantized_adapters" (any int adapter: vLLM serves it dequantized)}``.
    """
    from .size import _inner_tensors

    modules = [m.weight for m in _low_rank_modules(model).values() if m.weight.rank > 0]
    if not modules:
        raise ValueError("the model has no QuantWithLowRank weight with a residual (rank > 0)")
    max_rank = max(w.rank for w in modules)
    slot = next((r for r in VLLM_MAX_LORA_RANKS if r >= max_rank), None)
    ours = sum(t.numel() * t.element_size() for w in modules
               for f, t in _inner_tensors(w).items() if w.fields[f.split(".")[0]].part == "adapters")
    vllm = None if slot is None else sum(slot * (w.shape[0] + w.shape[1]) * 2 for w in modules)
    quantized = any(w.adapter_bits is not None for w in modules)
    return {"max_rank": max_rank, "max_lora_rank": slot, "vllm_bf16_bytes": vllm, "our_bytes": ours,
            "quantized_adapters": quantized}


def _pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rule (``get_pattern_key``): the first key matching a suffix of the module name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_regex(pattern: str, what: str, where: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {what} {pattern!r} is not a valid regex ({e}); fix adapter_config.json") from None


def _check_config(config, where: Path) -> None:
    """The parts of ``adapter_config.json`` the import reads: types, ranges, regexes."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {ADAPTER_CONFIG} must hold a JSON object, got {type(config).__name__}; "
                         "re-export the adapter")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: not a LoRA adapter (peft_type={config.get('peft_type')!r}); only LoRA adapters "
                         "can become low-rank residuals")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise NotImplementedError(f"{where}: LoRA options {found} cannot become a low-rank residual")
    if "r" not in config:
        raise ValueError(f"{where}: {ADAPTER_CONFIG} has no 'r' (the LoRA rank); re-export the adapter")
    if not _is_positive_int(config["r"]):
        raise ValueError(f"{where}: 'r' must be a positive integer, got {config['r']!r}; fix {ADAPTER_CONFIG}")
    if not _is_real(config.get("lora_alpha", 8)):
        raise ValueError(f"{where}: 'lora_alpha' must be a finite number, got {config.get('lora_alpha')!r}; "
                         f"fix {ADAPTER_CONFIG}")
    for key, valid, kind in (("rank_pattern", _is_positive_int, "a positive integer"),
                             ("alpha_pattern", _is_real, "a finite number")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{where}: {key} must be an object (module pattern -> value), got {pattern!r}")
        for name, value in pattern.items():
            _check_regex(name, f"{key} key", where)
            if not valid(value):
                raise ValueError(f"{where}: {key}[{name!r}] must be {kind}, got {value!r}; fix {ADAPTER_CONFIG}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            _check_regex(targets, "target_modules", where)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{where}: target_modules must be a regex string or a list of module names, got "
                         f"{targets!r}; fix {ADAPTER_CONFIG}")


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights, config_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise ValueError(
                f"{adapter_dir} holds adapter_model.bin (pickle); torchao-eora reads safetensors only "
                "(unpickling can execute code): re-save the adapter with safe_serialization=True"
            )
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; point import_peft at a PEFT adapter directory")
    if not config_path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG}; point import_peft at a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ADAPTER_CONFIG} in {adapter_dir} is not valid JSON: {e}; re-export the adapter") from None
    _check_config(config, adapter_dir)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own SafetensorError (header, size, dtype problems)
        raise ValueError(f"{weights} cannot be read as safetensors ({e}); re-export the adapter") from None
    return config, tensors


def _adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules a residual can be added to: ``QuantWithLowRank`` weights, and dense floating ``nn.Linear``s."""
    out = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, QuantWithLowRank) or (
            isinstance(module, torch.nn.Linear) and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and weight.is_floating_point()
        ):
            out[name] = module
    return out


def _expected(names) -> str:
    """A few of the module names an adapter for this model would target: short names plus one full name."""
    if not names:
        return "this model has no linear layer to adapt"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    kinds = ", ".join(short[:8]) + (", ..." if len(short) > 8 else "")
    example = max(names, key=lambda n: (n.count("."), n))
    return f"expected modules named {kinds}, e.g. {example}"


def _targeted(name: str, targets) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a full-match regex, a list matches names or suffixes."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _check_factor(where: Path, name: str, which: str, t: torch.Tensor) -> None:
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"{where}: {_PREFIX}{name}.{which}.weight must be a 2-D floating tensor, got "
                         f"{t.dtype} {tuple(t.shape)}; re-export the adapter")
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: {_PREFIX}{name}.{which}.weight has non-finite values (NaN/inf); the adapter "
                         "is corrupt or diverged in training")


def _with_residual(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> QuantWithLowRank:
    if isinstance(weight, QuantWithLowRank):  # keep the compressed base, replace the residual
        return weight.with_factors(A, B)
    dtype = weight.dtype  # a dense floating base (checked by _adaptable)
    return QuantWithLowRank(
        qdata=weight.detach().contiguous(), A=A.to(dtype), B=B.to(dtype), target_dtype=None, group_size=None,
        dtype=dtype,
    )


def _plan(model: torch.nn.Module, adapter_dir: Path, config: dict, tensors: dict[str, torch.Tensor]
          ) -> list[tuple[torch.nn.Module, QuantWithLowRank]]:
    """Check the whole adapter against ``model`` and build every new weight; nothing in ``model`` changes."""
    adaptable = _adaptable(model)
    targets = config.get("target_modules")
    if not any(_targeted(n, targets) for n in adaptable):
        raise ValueError(f"{adapter_dir}: target_modules {targets!r} match no module of this model "
                         f"({_expected(adaptable)}); the adapter was trained for another architecture")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"{adapter_dir}: unsupported adapter tensor {key} (expected {_PREFIX}<module>.lora_A/B.weight)"
            )
        pairs.setdefault(match["module"], {})[match["factor"]] = value
    if not pairs:
        raise ValueError(f"{adapter_dir}: {ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors "
                         f"({_expected(adaptable)}); re-export the adapter")
    plan = []
    for name, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise ValueError(f"{adapter_dir}: adapter tensor {_PREFIX}{name}.{missing}.weight is missing; "
                             "re-export the adapter")
        module = adaptable.get(name)
        if module is None:
            other = dict(model.named_modules()).get(name)
            problem = ("which this model does not have" if other is None else
                       f"which is not a linear layer ({type(other).__name__}) and cannot take a residual")
            raise ValueError(f"{adapter_dir}: the adapter targets {name}, {problem} ({_expected(adaptable)})")
        A, B = factors["A"], factors["B"]
        _check_factor(adapter_dir, name, "lora_A", A)
        _check_factor(adapter_dir, name, "lora_B", B)
        out_features, in_features = module.weight.shape
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{adapter_dir}: adapter tensors for {name} do not fit its {out_features}x{in_features} weight: "
                f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} (expected (r, {in_features}) and "
                f"({out_features}, r)); the adapter was trained for another model"
            )
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if A.shape[0] != r:
            raise ValueError(
                f"{adapter_dir}: {name} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, "
                f"but adapter_config says r={r}; fix r / rank_pattern in {ADAPTER_CONFIG}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if scaling != 1:
            B = B * scaling
            if not torch.isfinite(B).all():  # e.g. a huge alpha on a half-precision B
                raise ValueError(f"{adapter_dir}: {name}'s scaling lora_alpha / r = {scaling:g} overflows lora_B "
                                 f"({B.dtype}); fix lora_alpha / alpha_pattern in {ADAPTER_CONFIG}")
        plan.append((module, _with_residual(module.weight, A, B)))
    return plan


@torch.no_grad()
def import_peft(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.nn.Module:
    """Fold a PEFT LoRA adapter into ``model``'s linear layers as ``QuantWithLowRank`` residuals, in place.

    Each adapted layer gets ``A = lora_A`` and ``B = lora_B * scaling`` with PEFT's scaling ``lora_alpha / r``
    (``/ sqrt(r)`` with rsLoRA; per-module ``rank_pattern`` / ``alpha_pattern`` honoured). A ``QuantWithLowRank``
    layer keeps its compressed base and gets the adapter as its residual (an existing residual is replaced);
    a dense floating ``nn.Linear`` weight becomes a dense base. Only ``adapter_model.safetensors`` is read.

    The whole adapter is checked first (config, tensor names, shapes, dtypes, finite values, target modules):
    on any problem ``model`` is left unchanged.

    Returns:
        ``model``.

    Raises:
        ValueError: the adapter is malformed or does not fit ``model`` (one line: what is wrong, what to do).
        NotImplementedError: LoRA options with no low-rank-residual equivalent (DoRA, biases, ...).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_adapter(adapter_dir)
    for module, weight in _plan(model, adapter_dir, config, tensors):
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return model
