"""Mixture-of-experts layers as transformers 5 holds them, compressed expert by expert.

A layer's experts are one module with fused 3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I) (Qwen3-MoE, Mixtral, DeepSeek-V3, ...). Every expert's two weights get the base compressor and an EoRA
residual from the moments of the tokens the router sent to that expert (``moments.py``); they are stored as
``QuantExperts``, which the eager experts loop indexes like the dense parameter. The router (``mlp.gate``) stays
as it is; shared experts are ordinary linears.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping

import torch

from .calibration import Calibration, ModuleStats, SecondMoment
from .config import EoRAConfig
from .experts_tensor import QuantExperts
from .solver import eigen_of
from .targets import _layout_problem, module_rank
from .timing import Timer
from .transform import eora_quantize_tensor

__all__ = [
    "EXPERT_PARAMETERS", "WEIGHTED_DOWN", "check_experts", "compress_experts", "find_experts",
    "install_calibrated_experts", "least_seen", "layout_problem", "use_eager_experts",
]

log = logging.getLogger(__name__)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
# down_proj's moment weighs each routed token by its routing weight (its error reaches the layer output scaled by
# it). Against the plain moment on held-out tokens (benchmarks/moe_study.py, a random Qwen3-MoE block, error
# relative to RTN alone): 0.7183 vs 0.7189 (4 windows), 0.6877 vs 0.6873 (16), 0.6566 vs 0.6572 (64): better in
# two of three, by under 0.1% (a random router's weights vary little); kept as the objective the output sees.
WEIGHTED_DOWN = True


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A module holding experts as fused 3-D ``gate_up_proj`` and ``down_proj`` parameters."""
    params = dict(module.named_parameters(recurse=False))
    return all(name in params and params[name].dim() == 3 for name in EXPERT_PARAMETERS)


def layout_problem(module: torch.nn.Module) -> str | None:
    """Why a fused experts module is not the (E, 2I, H) / (E, H, I) concatenated, bias-free layout that is
    compressed here (None: it is)."""
    if getattr(module, "is_transposed", False):
        return "its expert weights are stored transposed"
    if getattr(module, "has_bias", False) or any(
            n.endswith("bias") for n, _ in module.named_parameters(recurse=False)):
        return "its experts have biases"
    if not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return "its gate and up projections are not concatenated"
    gate_up, down = module.gate_up_proj, module.down_proj
    E, two_i, hidden = gate_up.shape
    if down.shape != (E, hidden, two_i // 2) or two_i % 2:
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H), (E, H, I)"
    return None


def find_experts(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """The fused experts modules inside ``module`` whose layout is supported, by full name (``prefix`` + name)."""
    return {prefix + name: m for name, m in module.named_modules()
            if is_fused_experts(m) and layout_problem(m) is None}


def expert_weights(experts: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``<experts>.gate_up_proj`` / ``.down_proj`` -> the parameter, for every experts module."""
    return {f"{name}.{p}": getattr(m, p) for name, m in experts.items() for p in EXPERT_PARAMETERS}


def check_experts(experts: Mapping[str, torch.nn.Module], config: EoRAConfig) -> None:
    """Raise one ValueError naming every expert weight ``config`` cannot compress (group size, rank)."""
    problems = []
    for name, weight in expert_weights(experts).items():
        out_features, in_features = weight.shape[1:]
        layout = _layout_problem(config, in_features)
        if layout is not None:
            problems.append(f"{name}: {layout}")
        elif config.compensation != "none" and module_rank(config, out_features, in_features) == 0:
            problems.append(f"{name} ({out_features}x{in_features} per expert) has no room for a rank-{config.rank} "
                            "residual")
    if problems:
        raise ValueError(f"cannot apply {config.describe()}, nothing was changed: " + "; ".join(problems[:4]))


def use_eager_experts(model: torch.nn.Module) -> None:
    """Run the model's experts with transformers' eager loop, which indexes one expert's weight at a time (what
    ``QuantExperts`` serves); the grouped_mm / batched_mm kernels read the whole 3-D tensor as dense."""
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_experts_implementation"):
        return
    model.set_experts_implementation("eager")
    log.info("experts implementation %r -> 'eager': compressed experts are indexed one at a time", current)


def expert_token_counts(stats: Calibration | None, name: str, num_experts: int) -> list[int]:
    """Calibration tokens routed to each expert of ``name`` (0 where none came, or without statistics)."""
    if stats is None:
        return [0] * num_experts
    groups = (stats.groups.get(stats.group_of.get(f"{name}.{e}.gate_up_proj", "")) for e in range(num_experts))
    return [0 if g is None else g.n_tokens for g in groups]


def least_seen(tokens: Mapping[str, list[int]], k: int = 5) -> list[tuple[str, int]]:
    """The ``k`` experts that saw the fewest calibration tokens: ``(<experts>.<index>, tokens)``."""
    flat = [(f"{name}.{e}", n) for name, counts in tokens.items() for e, n in enumerate(counts)]
    return sorted(flat, key=lambda t: t[1])[:k]


def compress_experts(
    name: str, module: torch.nn.Module, config: EoRAConfig, stats: Calibration | None, *, timer: Timer | None = None,
) -> dict[str, QuantExperts]:
    """Compress every expert's ``gate_up_proj`` and ``down_proj`` with ``config`` and its routed statistics, install
    the ``QuantExperts`` in ``module`` and return them by parameter name (``<name>.gate_up_proj``, ...)."""
    results = {}
    for param in EXPERT_PARAMETERS:
        dense = getattr(module, param)
        weights = []
        for expert in range(dense.shape[0]):
            key = f"{name}.{expert}.{param}"
            expert_config, expert_stats = _expert_inputs(key, dense.shape[2], config, stats)
            with torch.inference_mode(False), torch.no_grad():
                weights.append(eora_quantize_tensor(dense[expert], expert_config, expert_stats, timer=timer))
        with torch.inference_mode(False):  # a normal parameter: the model may be fine-tuned or saved later
            stacked = QuantExperts.from_experts(weights)
            setattr(module, param, torch.nn.Parameter(stacked, requires_grad=False))
        results[f"{name}.{param}"] = stacked
    return results


def _expert_inputs(key: str, in_features: int, config: EoRAConfig,
                   stats: Calibration | None) -> tuple[EoRAConfig, ModuleStats | None]:
    """The config and statistics one expert weight is compressed with. An expert no calibration token reached gets
    the identity moment (plain SVD residual, RTN-like GPTQ). Under ``shrinkage="auto"``, one with fewer tokens than
    input features, or whose tokens cannot be split into two halves to cross-validate, gets a fixed pull toward plain
    SVD, ``in / (in + tokens)`` (half of the way at as many tokens as features): cross-validating on a few dozen
    tokens chose too little (benchmarks/moe_study.py, 4 windows: MoE block error 0.718 of RTN's with it, 0.731
    without)."""
    if stats is None:
        return config, None
    group = stats.group_of.get(key)
    moment = stats.groups.get(group) if group is not None else None
    if moment is None or moment.n_tokens == 0:
        identity = SecondMoment(torch.eye(in_features, dtype=torch.float64), 1, normalized=True)
        return config, ModuleStats(identity, _cached(identity))
    module_stats = ModuleStats(moment, lambda: stats.eigen(key))
    few = moment.halves() is None or moment.n_tokens < in_features
    if config.compensation == "eora" and config.shrinkage == "auto" and few:
        config = replace(config, shrinkage=in_features / (in_features + moment.n_tokens))
    return config, module_stats


def _cached(moment: SecondMoment):
    cache = []

    def eigen():
        if not cache:
            cache.append(eigen_of(moment.mean()))
        return cache[0]

    return eigen


def install_calibrated_experts(root: torch.nn.Module, results: Mapping[str, torch.Tensor]) -> int:
    """Install the ``QuantExperts`` a sequential calibration compressed (``Calibration.results``, by full name) into
    ``root`` (the model ``quantize_`` is converting); returns how many were installed."""
    installed = 0
    for name, weight in results.items():
        module_name, _, param = name.rpartition(".")
        if not isinstance(weight, QuantExperts):
            continue
        try:
            module = root.get_submodule(module_name)
        except AttributeError:  # quantize_ was called on a part of the model that does not hold it
            continue
        if not isinstance(getattr(module, param), QuantExperts):
            setattr(module, param, torch.nn.Parameter(weight, requires_grad=False))
            installed += 1
    if installed:
        use_eager_experts(root)
    return installed
