"""The anchored target (``EoRAConfig(target="anchored")``): fit the original model's outputs, not only the layer's
own weight error.

Sequential calibration feeds layer ``i`` the inputs ``X_q`` that the compressed prefix produces. EoRA's residual fits
``(W - W_c) X_q^T``; the anchored target asks ``(W_c + B A) X_q^T`` to match what the *original* model computes,
``W X_fp^T``, with ``X_fp`` the original prefix's inputs for the same tokens. Least squares over the tokens gives
the unconstrained optimum ``W C G^-1`` with ``G = X_q^T X_q`` and the cross moment ``C = X_fp^T X_q``; the rank-r
optimum is EoRA's closed form with the weight ``W`` replaced by that, i.e. with the error ``W + S - W_c`` where

    S = W (C - G) (G + lambda I)^-1        (the target shift; lambda = 1% of G's mean diagonal, as GPTQ damps)

``S`` is 0 where the prefix is uncompressed (``C = G``). The same idea is GPTAQ's for GPTQ and AA-SVD's for SVD
compression.

Which modules are anchored: those that read the residual stream (q/k/v, gate/up, and the like). An output projection
(``o_proj``, ``down_proj``) reads activations made inside its own block by projections that are anchored
themselves; measured in one pass with the block's original weights, its ``X_q`` does not see that correction, and
anchoring it too would correct the same drift twice. Fused experts keep the layer target.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from .allocator import long_lived_allocations
from .calibration import SecondMoment
from .timing import Timer

__all__ = ["AnchorCollector", "DAMPING", "OUTPUT_PROJECTIONS", "is_anchored"]

# Linears whose output is added back into the residual stream: their inputs are made inside their own block.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "wo", "c_proj", "dense_4h_to_h")
DAMPING = 0.01  # lambda as a fraction of G's mean diagonal
_BLOCK = 1024  # columns of x_fp^T x_q computed at a time


def is_anchored(name: str) -> bool:
    """Whether the linear called ``name`` gets the anchored target (it reads the residual stream)."""
    return name.rsplit(".", 1)[-1] not in OUTPUT_PROJECTIONS


class AnchorCollector:
    """Forward pre-hooks on a decoder layer's anchored linears that pair the original model's inputs with the
    compressed prefix's, token by token, and sum the cross moment ``x_fp^T x_q`` in fp64 over real tokens.

    Per batch: run the layer on the original activations inside :meth:`recording` (each distinct linear input is
    kept), then on the compressed prefix's activations (each is multiplied with the kept one). Use it as a context
    manager, entered before the ``MomentCollector`` of the same forwards so its hooks run first.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Linear], timer: Timer | None = None):
        self.modules = {name: m for name, m in modules.items() if is_anchored(name)}
        self.timer = timer or Timer()
        self.cross: dict[str, torch.Tensor] = {}  # group (first module of a shared input) -> sum x_fp^T x_q
        self.n_tokens: dict[str, int] = {}
        self.group_of: dict[str, str] = {}
        self._fp: dict[str, torch.Tensor] = {}  # group -> this batch's original inputs (real tokens, fp32)
        self._seen: set[str] = set()  # groups already multiplied in this batch's compressed forward
        self._last_input: torch.Tensor | None = None
        self._last_group: str | None = None
        self._mix: dict[str, torch.Tensor] = {}  # group -> (C - G) (G + lambda I)^-1, shared by its modules
        self._recording = False
        self._keep: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> "AnchorCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fp.clear()
        self._last_input = None

    @contextlib.contextmanager
    def recording(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Inside, the layer runs on the original activations of a batch whose padding mask is ``attention_mask``;
        the compressed forward of the same batch comes next."""
        self._fp.clear()
        self._seen.clear()
        self._keep = None if attention_mask is None else attention_mask.bool().reshape(-1)
        self._recording, self._last_input = True, None
        try:
            yield
        finally:
            self._recording, self._last_input = False, None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        keep = self._keep
        if keep is not None and keep.numel() == flat.shape[0] and not bool(keep.all()):
            flat = flat[keep.to(flat.device)]
        return flat.float()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._recording:
                if x is not self._last_input:  # q/k/v (gate/up) share one input: kept once, under the first name
                    self._last_input = x
                    self._fp[name] = self._rows(x)
                    group = name
                else:
                    group = self._last_group
                self._last_group = self.group_of.setdefault(name, group)
                return
            group = self.group_of.get(name)
            if group is None or group in self._seen or group not in self._fp:
                return
            self._seen.add(group)
            with self.timer("moments"):
                self._add(group, self._fp.pop(group), self._rows(x))

        return hook

    def _add(self, group: str, fp: torch.Tensor, q: torch.Tensor) -> None:
        if fp.shape != q.shape:
            raise RuntimeError(f"{group}: the original and the compressed forward saw different tokens "
                               f"({tuple(fp.shape)} vs {tuple(q.shape)})")
        n = fp.shape[1]
        total = self.cross.get(group)
        if total is None:
            with long_lived_allocations():
                total = self.cross[group] = torch.zeros(n, n, dtype=torch.float64, device=fp.device)
        for start in range(0, n, _BLOCK):  # fp32 products a block of columns at a time: small temporaries
            total[:, start:start + _BLOCK] += (fp.T @ q[:, start:start + _BLOCK]).double()
        self.n_tokens[group] = self.n_tokens.get(group, 0) + fp.shape[0]

    def shift(self, name: str, weight: torch.Tensor, moment: SecondMoment) -> torch.Tensor | None:
        """The target shift ``S = W (C - G) (G + lambda I)^-1`` of module ``name`` (fp32, like ``weight``), given the
        second moment ``G`` of its input; None for a module whose input saw no tokens. ``G``'s mean is read once per
        shared input (q/k/v, gate/up), when the group's mix is first computed."""
        group = self.group_of.get(name)
        mix = self._mix.get(group)
        if mix is None:
            if group not in self.cross:
                return None
            cross = self.cross.pop(group) / self.n_tokens[group]
            gram = moment.mean().to(torch.float64)
            damped = gram + DAMPING * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                        device=gram.device)
            # (C - G) (G + lambda I)^-1 = solve(G + lambda I, (C - G)^T)^T, G symmetric
            mix = self._mix[group] = torch.linalg.solve(damped, (cross - gram).T).T
        return (weight.detach().to(torch.float64) @ mix).float()
