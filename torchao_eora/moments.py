"""Collecting calibration statistics with forward hooks: the second moment ``sum x^T x`` of every linear layer's
input (once per distinct input), v_proj's attention-weighted moment, and the moments of the tokens the router sends
to each expert of a mixture-of-experts layer. The sums are fp32 products of the lower block triangle added into
fp64, over real tokens only. ``sequential.py`` runs the forwards; this module only listens.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from .allocator import long_lived_allocations
from .attention_moments import mixed_value_moment
from .calibration import VALUE_GROUP_SUFFIX, SecondMoment
from .timing import Timer

__all__ = ["MomentCollector", "StopForward"]

_BLOCK = 256  # columns of x^T x computed at a time


class StopForward(Exception):
    """Raised by a hook once a batch's statistics are complete: the rest of the forward feeds none."""


class MomentCollector:
    """Forward hooks that accumulate, in fp64 from fp32 products and over real tokens only:

    * ``sum x^T x`` of every linear input, once per distinct input tensor (q/k/v share one, as do gate/up);
    * for each v_proj in ``values`` (name -> (attention module, v_proj, kv heads)), the attention-weighted moment
      ``sum x~ x~^T`` per kv head (``attention_moments.mixed_value_moment``), from the attention probabilities the
      (eager) attention module returns;
    * for each fused experts module in ``experts`` (name -> module), per expert the moments of the tokens routed to
      it (``<name>.<expert>.gate_up_proj`` / ``.down_proj``; an expert no token reached has none);
    * with ``split``, also the plain sums of the even-numbered windows alone (``SecondMoment.half``), from which
      EoRA's shrinkage is cross-validated.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Linear], timer: Timer | None = None,
                 values: Mapping[str, tuple[torch.nn.Module, torch.nn.Linear, int | None]] | None = None, *,
                 stop_when_done: bool = False, split: bool = False,
                 experts: Mapping[str, torch.nn.Module] | None = None, weighted_down: bool = True):
        self.modules = dict(modules)
        self.experts = dict(experts or {})
        self.weighted_down = weighted_down
        self.split = split
        self._first_window = 0  # index of the current batch's first window, over all batches
        self._windows = 0
        # With stop_when_done, the hook that completes a batch's statistics raises StopForward: the rest of the
        # forward (a layer's down_proj and residual, a model's lm_head) feeds no statistic.
        self.stop_when_done = stop_when_done
        self._pending: set[str] = set()
        self.values = dict(values or {})
        self.timer = timer or Timer()
        self.groups: dict[str, SecondMoment] = {}
        self.group_of: dict[str, str] = {}
        self.value_group_of: dict[str, str] = {}
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool of the batch being run
        self._last_input: torch.Tensor | None = None
        self._last_group: str | None = None
        self._value_input: torch.Tensor | None = None
        self._product: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> "MomentCollector":
        self._register()
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, forwards feed no statistic (the anchored target's runs on the original activations)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        try:
            yield
        finally:
            self._register()

    def _register(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        for name, (attention, v_proj, n_kv) in self.values.items():
            self._handles.append(v_proj.register_forward_pre_hook(self._keep_value_input))
            self._handles.append(attention.register_forward_hook(self._value_hook(name, n_kv)))
        for name, module in self.experts.items():
            self._handles.append(module.register_forward_pre_hook(self._experts_hook(name), with_kwargs=True))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_input = self._value_input = self._product = None
        for group, moment in self.groups.items():
            if group not in self.value_group_of.values():
                _mirror_lower_(moment.total)
                if moment.half is not None:  # total summed the odd-numbered windows only until now
                    _mirror_lower_(moment.half)
                    moment.total += moment.half

    def normalize_(self) -> None:
        """Divide every sum by its count in place (no copy of a moment is made later)."""
        for moment in self.groups.values():
            moment.normalize_()

    def start_batch(self, attention_mask: torch.Tensor | None, windows: int) -> None:
        """Before each batch's forward: its padding mask (None: no padding) and its number of windows (rows)."""
        self._first_window += self._windows
        self._windows = windows
        self.token_mask = None if attention_mask is None else attention_mask.bool()
        self._last_input = None
        self._pending = set(self.modules) | {name + VALUE_GROUP_SUFFIX for name in self.values} | set(self.experts)

    def _done(self, key: str) -> None:
        self._pending.discard(key)
        if self.stop_when_done and not self._pending:
            raise StopForward

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if x is self._last_input:  # same tensor as the previous module (q/k/v, gate/up): already counted
                self.group_of.setdefault(name, self._last_group)
            else:
                group = self.group_of.setdefault(name, name)
                self._last_input, self._last_group = x, group
                with self.timer("moments"):
                    self._accumulate(name, group, x)
            self._done(name)

        return hook

    def _keep_value_input(self, module, args) -> None:
        self._value_input = args[0]

    def _value_hook(self, name: str, n_kv: int | None):
        def hook(module, args, out):
            probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if probs is None or self._value_input is None:
                raise RuntimeError(
                    f"{name}: the attention module returned no attention probabilities; the attention-weighted "
                    "v_proj moment needs eager attention: use value_moment='plain' for this model"
                )
            mask = self.token_mask
            if mask is not None and mask.shape != self._value_input.shape[:2]:
                mask = None
            with self.timer("moments"):
                total, count = mixed_value_moment(self._value_input, probs, mask, num_kv_heads=n_kv)
            group = self.value_group_of.setdefault(name, f"{name}{VALUE_GROUP_SUFFIX}")
            if group not in self.groups:
                with long_lived_allocations():
                    self.groups[group] = SecondMoment(torch.zeros_like(total))
            moment = self.groups[group]
            moment.total += total
            moment.n_tokens += count
            self._value_input = None
            self._done(name + VALUE_GROUP_SUFFIX)

        return hook

    def _experts_hook(self, name: str):
        """Per expert of a fused experts module (``experts.py``), the moments of the tokens the router sends to it:
        ``x`` at ``gate_up_proj``'s input, and at ``down_proj``'s input the gated activation ``h``, or with
        ``weighted_down`` ``w h`` (``w`` the token's routing weight: how down_proj's error reaches the output)."""

        def hook(module, args, kwargs):
            hidden, index, weights = _routed_call(args, kwargs)
            with self.timer("moments"):
                self._accumulate_experts(name, module, hidden.detach(), index, weights)
            self._done(name)

        return hook

    def _accumulate_experts(self, name: str, module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor,
                            weights: torch.Tensor) -> None:
        keep = self.token_mask
        keep = None if keep is None or keep.numel() != hidden.shape[0] else keep.reshape(-1).to(hidden.device)
        window_length = hidden.shape[0] // self._windows if self._windows else 0
        gate_up, down = module.gate_up_proj, module.down_proj
        for expert in range(gate_up.shape[0]):
            token, slot = torch.nonzero(index == expert, as_tuple=True)
            if keep is not None:
                token, slot = token[keep[token]], slot[keep[token]]
            if token.numel() == 0:
                continue
            even = None
            if self.split and window_length:
                even = (self._first_window + torch.div(token, window_length, rounding_mode="floor")) % 2 == 0
            x = hidden[token].float()
            self._add_rows(f"{name}.{expert}.gate_up_proj", x, even)
            h = _apply_gate(module, F.linear(x, gate_up[expert].float()))
            if self.weighted_down:
                h = h * weights[token, slot].float()[:, None]
            self._add_rows(f"{name}.{expert}.down_proj", h, even)

    def _accumulate(self, name: str, group: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        keep = self.token_mask
        keep = None if keep is None or keep.numel() != flat.shape[0] or bool(keep.all()) else keep.reshape(-1)
        even = None  # which rows belong to even-numbered windows
        if self.split and x.dim() == 3 and x.shape[0] == self._windows:
            window = torch.arange(self._first_window, self._first_window + x.shape[0], device=flat.device)
            even = (window % 2 == 0).repeat_interleave(x.shape[1])
            even = even if keep is None else even[keep.to(flat.device)]
        if keep is not None:  # a copy only if padded
            flat = flat[keep.to(flat.device)]
        self._add_rows(group, flat.float(), even, name)

    def _add_rows(self, group: str, flat: torch.Tensor, even: torch.Tensor | None, name: str | None = None) -> None:
        """Add the fp32 rows ``flat`` (tokens x features) to ``group``'s moment; ``even`` flags the rows of
        even-numbered windows (None: not split)."""
        name = name or group
        self.group_of.setdefault(name, group)
        if not torch.isfinite(flat).all():
            raise ValueError(
                f"non-finite (NaN/inf) activations at the input of {name!r}: the model overflowed on the "
                "calibration data. Run calibration in float32 (model.float()) or check the inputs."
            )
        n = flat.shape[1]
        moment = self.groups.get(group)
        if moment is None:
            with long_lived_allocations():
                moment = self.groups[group] = SecondMoment(torch.zeros(n, n, dtype=torch.float64, device=flat.device))
                if self.split:
                    moment.half = torch.zeros(n, n, dtype=torch.float32, device=flat.device)
        if even is None or moment.half is None:
            self._add_products(moment.total, flat)
        else:  # odd windows into total, even ones into half; __exit__ adds half to total
            self._add_products(moment.total, flat[~even])
            self._add_products(moment.half, flat[even])
            moment.n_half += int(even.sum())
        moment.n_tokens += flat.shape[0]

    def _add_products(self, total: torch.Tensor, flat: torch.Tensor) -> None:
        """``total += flat^T flat``, lower block triangle only (``_mirror_lower_`` at exit). fp32 products in column
        blocks into one reused buffer: the temporaries stay small (a 7B down_proj's full product is 2 GiB) and
        nothing is allocated per block; the fp64 running sum takes them without an fp64 temporary."""
        n = flat.shape[1]
        product = self._product_buffer(n, flat)
        for start in range(0, n, _BLOCK):
            block = flat[:, start:start + _BLOCK]
            out = product.view(-1)[: (n - start) * block.shape[1]].view(n - start, block.shape[1])  # contiguous
            torch.mm(flat[:, start:].T, block, out=out)
            total[start:, start:start + _BLOCK].add_(out)

    def _product_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """An fp32 (n, _BLOCK) buffer for one block of products, kept for the collector's life."""
        buffer = self._product
        if buffer is None or buffer.shape[0] < n or buffer.device != like.device:
            with long_lived_allocations():
                buffer = self._product = torch.empty(n, _BLOCK, dtype=torch.float32, device=like.device)
        return buffer


def _mirror_lower_(total: torch.Tensor) -> None:
    """Copy the lower block triangle that ``_accumulate`` computes onto the upper one, in place (block by block: no
    temporary of the matrix's size)."""
    for start in range(0, total.shape[0] - _BLOCK, _BLOCK):
        end = start + _BLOCK
        total[start:end, end:] = total[end:, start:end].T


def _routed_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states (tokens, hidden), top_k_index, top_k_weights)`` of a transformers 5 experts call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    if len(values) < 3:
        raise RuntimeError("an experts module was called without (hidden_states, top_k_index, top_k_weights): "
                           "this mixture-of-experts layout is not supported; pass allow_partial=True to skip it")
    return values[0], values[1], values[2]


def _apply_gate(module: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The experts' activation ``act(gate) * up`` (transformers' ``_apply_gate`` where the class has one)."""
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up
