"""How much of a model a run compresses, and the large weight holders of its decoder layers it would leave alone.

A run that compresses the attention projections of a mixture-of-experts model and skips its experts looks
successful and compresses a few percent of the weights. :func:`check_coverage` makes that an error naming the
module (or a logged choice with ``allow_partial``), and :class:`Coverage` is the share every summary prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["Coverage", "LARGE_SHARE", "check_coverage", "measured_coverage", "parameter_count"]

log = logging.getLogger(__name__)
# A module of a decoder layer holding at least this share of the layer's parameters in its own >= 2-D weights is a
# large weight holder: leaving it alone must be a choice (routers, norms and biases are far below it).
LARGE_SHARE = 0.05


@dataclass
class Coverage:
    """Parameters of the model (tied ones counted once), of them compressed, and the large holders left alone."""

    total: int
    compressed: int
    left_alone: dict[str, int] = field(default_factory=dict)  # module name -> parameters

    @property
    def share(self) -> float:
        """Compressed parameters / all parameters of the model."""
        return self.compressed / self.total if self.total else 0.0

    def describe(self) -> str:
        text = f"compressed {100 * self.share:.2f}% of the model's weights ({self.compressed:,} of {self.total:,} " \
               "parameters; embeddings, output head, norms and routers stay as they are)"
        if self.left_alone:
            text += f"; left alone by choice: {', '.join(self.left_alone)}"
        return text


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, each shared (tied) tensor once; meta tensors count by shape."""
    return sum(p.numel() for p in model.parameters())  # parameters() already yields a shared tensor once


def check_coverage(
    model: torch.nn.Module, layers: Iterable[torch.nn.Module], prefix: str, targets: dict[str, torch.Tensor], *,
    allow_partial: bool = False,
) -> Coverage:
    """The ``Coverage`` of compressing ``targets`` (name -> weight, inside ``layers``); raises ValueError naming
    the first large weight holder of a decoder layer that is not a target, unless ``allow_partial``."""
    compressed = sum(w.numel() for w in targets.values())
    target_modules = {name.rsplit(".", 1)[0] for name in targets}
    left_alone: dict[str, int] = {}
    for i, layer in enumerate(layers):
        layer_total = sum(p.numel() for p in layer.parameters())
        for name, module in layer.named_modules():
            full = f"{prefix}.{i}.{name}" if name else f"{prefix}.{i}"
            if full in target_modules:
                continue
            own = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2
                      and f"{full}.{_param_name(module, p)}" not in targets)
            if own and own >= LARGE_SHARE * layer_total:
                left_alone[full] = own
    coverage = Coverage(parameter_count(model), compressed, left_alone)
    if left_alone and not allow_partial:
        name, n = next(iter(left_alone.items()))
        module = model.get_submodule(name)
        more = f" (and {len(left_alone) - 1} more)" if len(left_alone) > 1 else ""
        raise ValueError(
            f"{name} ({type(module).__name__}, {n:,} parameters){more} would stay uncompressed: only "
            f"{100 * coverage.share:.2f}% of the model's weights would be compressed. This layout is not supported; "
            "pass allow_partial=True (CLI: --allow-partial) to compress the rest anyway"
        )
    if left_alone:
        log.warning("leaving uncompressed (allow_partial): %s", ", ".join(left_alone))
    return coverage


def _param_name(module: torch.nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters(recurse=False) if p is param)


def measured_coverage(model: torch.nn.Module) -> Coverage:
    """The ``Coverage`` of a model as it is now: its compressed weights (torchao-eora tensor subclasses) counted."""
    compressed = sum(p.numel() for p in model.parameters() if isinstance(p, _compressed_types()))
    return Coverage(parameter_count(model), compressed)


def _compressed_types() -> tuple[type, ...]:
    from .experts_tensor import QuantExperts
    from .tensor import QuantWithLowRank

    return (QuantWithLowRank, QuantExperts)
