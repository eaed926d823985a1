"""Which modules a config can convert, checked for all of them before any is changed.

A model is either fully converted or untouched: a group size that divides q_proj's in_features but not
down_proj's, or a NaN in one weight, must fail before the first layer is replaced. Ranks are the exception: a rank
too large for a small layer (k_proj of a GQA model) is clamped for that layer, with one warning.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from .config import EoRAConfig

__all__ = ["check_targets", "module_rank", "quantize_call_targets", "warn_once"]

log = logging.getLogger(__name__)
_warned: set[tuple[int, str]] = set()  # (id(config), message), dropped when the config is garbage collected


def warn_once(config: object, message: str) -> None:
    """Log ``message`` once per config object (one quantize_ call, one from_pretrained), not once per layer."""
    key = (id(config), message)
    if key not in _warned:
        _warned.add(key)
        weakref.finalize(config, _warned.discard, key)
        log.warning(message)


def module_rank(config: "EoRAConfig", out_features: int, in_features: int) -> int:
    """The residual rank a layer gets: ``config.rank``, clamped below ``min(out, in)`` (a full-rank residual is
    just the dense weight) and, with quantized adapters, to a multiple of ``adapter_group_size``."""
    if config.compensation == "none":
        return 0
    rank = min(config.rank, min(out_features, in_features) - 1)
    if config.adapter_bits is not None:
        rank -= rank % config.adapter_group_size
    return max(rank, 0)


def _layout_problem(config: "EoRAConfig", in_features: int) -> str | None:
    """Why ``in_features`` does not fit the base's groups / N:M pattern or the adapters' groups, in the words of the
    check that would fail during compression (with its suggestions)."""
    from .adapter_quant import check_adapter_group_size
    from .compressors import check_group_size

    base = config.base
    quantizer = getattr(base, "quantizer", base)
    try:
        if getattr(base, "nm", None) and in_features % base.nm[1]:
            return f"in_features={in_features} is not a multiple of M={base.nm[1]} for the {base.pattern} pattern"
        if getattr(quantizer, "group_size", None):
            check_group_size(quantizer.group_size, in_features)
        if config.adapter_bits is not None and config.compensation != "none":
            check_adapter_group_size(config.adapter_group_size, config.rank, in_features)
    except ValueError as e:
        return str(e)
    return None


def _problem(name: str, module: torch.nn.Module, config: "EoRAConfig") -> str | None:
    from .tensor import QuantWithLowRank

    if not isinstance(module, torch.nn.Linear):
        return f"{name} is a {type(module).__name__}, not a torch.nn.Linear"
    if isinstance(module.weight, QuantWithLowRank):
        return f"{name} is already compressed (reload the original weights first)"
    out_features, in_features = module.weight.shape
    layout = _layout_problem(config, in_features)
    if layout is not None:
        return f"{name}: {layout}"
    if config.compensation != "none" and module_rank(config, out_features, in_features) == 0:
        return f"{name} ({out_features}x{in_features}) has no room for a rank-{config.rank} residual"
    calib = config.calibration
    if calib is not None and (config.compensation == "eora" or getattr(config.base, "needs_calibration", False)):
        moment = calib.groups.get(calib.group_of.get(name, ""))
        if moment is None:
            return f"the calibration has no statistics for {name}"
        if moment.total.shape[-1] != in_features:
            return f"the statistics of {name} are {moment.total.shape[-1]}-wide, the layer reads {in_features}"
    weight = module.weight
    if weight.is_floating_point() and not weight.is_meta and not bool(torch.isfinite(weight).all()):
        return f"the weight of {name} has NaN/inf values (a broken checkpoint?)"
    return None


def check_targets(modules: Mapping[str, torch.nn.Module], config: "EoRAConfig", *, warn: bool = True) -> None:
    """Raise one ValueError naming every module ``config`` cannot convert; with ``warn``, say once which layers
    get a clamped rank."""
    if not modules:
        return
    problems = [p for name, module in modules.items() if (p := _problem(name, module, config)) is not None]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"cannot apply {config.describe()}, nothing was changed: {shown}")
    if not warn:
        return
    clamped = sorted({
        module_rank(config, *m.weight.shape) for m in modules.values()
        if config.compensation != "none" and module_rank(config, *m.weight.shape) != config.rank
    })
    if clamped:
        warn_once(config, f"rank {config.rank} does not fit every layer: the smaller layers get rank {clamped}")


def quantize_call_targets(module: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], torch.nn.Module] | None:
    """Inside torchao's ``quantize_``: every module this call converts (by FQN) and the root model, or None.

    torchao's handlers see one module at a time, with no name, so a bad layer found late would leave a model half
    converted. ``quantize_`` walks the model with ``_replace_with_custom_fn_if_matches_filter`` (torchao 0.18, the
    version we pin); its outermost frame holds the root and the filter, so all targets can be checked up front.
    Returns None when called some other way (transformers' quantize on load, a direct call).
    """
    frame, outermost = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter" and "torchao" in frame.f_code.co_filename:
            outermost = frame
        frame = frame.f_back
    if outermost is None:
        return None
    root, filter_fn = outermost.f_locals.get("model"), outermost.f_locals.get("filter_fn")
    if not isinstance(root, torch.nn.Module) or not callable(filter_fn):
        return None
    targets = {name: m for name, m in root.named_modules() if filter_fn(m, name)}
    return (targets, root) if any(m is module for m in targets.values()) else None
