"""An Inductor pass that fuses a residual low-rank path into the quantized matmul it is added to.

It rewrites, in the post-grad graph (before Inductor's own passes fold ``mm + mm(mm)`` into ``addmm``),

    quant_linear(x, W_c) + mm(mm(x, A^T), B^T) [* scaling]      ->  eora_linear(x, W_c, A, scaling * B)

for two kinds of base:
- ``torchao_eora::quant_linear`` (what ``QuantWithLowRank`` emits), in the ``add`` and ``addmm`` forms;
- a torchao intx weight dequantized in the graph, ``mm(x, ((q - zero_point) * scale)^T)`` (what a PEFT LoRA
  layer over an ``IntxWeightOnlyConfig`` base emits, with its ``reshape``s and ``* scaling``).

Install it with ``install_fusion_pass()``; it chains any pass already installed in the same hook.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    CallFunction,
    Ignored,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)
from torch.fx import Node

from ..ops import eora_linear, quant_linear  # noqa: F401  (registers torch.ops.torchao_eora.*)

__all__ = ["FuseLowRankPass", "install_fusion_pass", "fusion_pass_installed"]

aten = torch.ops.aten
prims = torch.ops.prims
_quant_linear = torch.ops.torchao_eora.quant_linear.default
_eora_linear = torch.ops.torchao_eora.eora_linear.default

_patterns = PatternMatcherPass(pass_name="torchao_eora_fuse_low_rank")


# ---- the pattern pieces ------------------------------------------------------------------------------------------


def _maybe_reshaped(pattern: Any) -> list[Any]:
    """``p`` and ``reshape(p, *)``: F.linear on a 3-D input flattens and unflattens around every mm."""
    return [pattern, CallFunction(aten.reshape.default, pattern, Ignored())]


def _t(name: str) -> CallFunction:
    return CallFunction(aten.permute.default, KeywordArg(name), Ignored())


def _bases(x: Callable[[], Any]) -> list[tuple[str, Any]]:
    fields = [KeywordArg("qdata"), KeywordArg("scale"), KeywordArg("zero_point"), KeywordArg("group_size")]
    quant = CallFunction(_quant_linear, x(), *fields)  # the graph drops a defaulted bias=None
    quant_bias = CallFunction(_quant_linear, x(), *fields, KeywordArg("bias"))
    dense_mm = CallFunction(aten.mm.default, x(), _t("weight"))
    dense_addmm = CallFunction(aten.addmm.default, KeywordArg("bias"), x(), _t("weight"))
    return [
        ("quant_linear", quant), ("quant_linear", quant_bias), ("torchao_intx", dense_mm),
        ("torchao_intx", dense_addmm),
    ]


def _low_rank_terms(x: Callable[[], Any]) -> list[Any]:
    term = CallFunction(aten.mm.default, CallFunction(aten.mm.default, x(), _t("A")), _t("B"))
    terms = []
    for t in _maybe_reshaped(term):
        terms += [t, CallFunction(aten.mul.Tensor, t, KeywordArg("scaling"))]
    return terms


def _register_all() -> None:
    # x is the flat input, or a 3-D input flattened separately for the base and the adapter (PEFT, transformers).
    # Factories, not objects: the matcher binds one pattern object to one node, and the two flattens are two nodes.
    def flat_x() -> Any:
        return KeywordArg("x")

    def flattened_x() -> Any:
        return CallFunction(aten.reshape.default, KeywordArg("x"), Ignored())

    for x in (flat_x, flattened_x):
        for (kind, base), term in itertools.product(_bases(x), _low_rank_terms(x)):
            for base_out in _maybe_reshaped(base):
                for lhs, rhs in ((base_out, term), (term, base_out)):
                    _register(CallFunction(aten.add.Tensor, lhs, rhs), kind)
        # addmm form: base + (x A^T) B^T with the residual's outer mm already folded into an addmm.
        for kind, base in _bases(x):
            inner = CallFunction(aten.mm.default, x(), _t("A"))
            _register(CallFunction(aten.addmm.default, base, inner, _t("B")), kind)


def _register(pattern: Any, kind: str) -> None:
    extra_check = _check_quant_linear if kind == "quant_linear" else _check_torchao_intx
    register_graph_pattern(pattern, extra_check=extra_check, pass_dict=_patterns)(_fuse)


# ---- checks and the rewrite --------------------------------------------------------------------------------------


def _val(node: Any) -> Optional[torch.Tensor]:
    return node.meta.get("val") if isinstance(node, Node) else None


def _scaling_ok(match: Match) -> bool:
    scaling = match.kwargs.get("scaling")
    return scaling is None or isinstance(scaling, (int, float))


def _check_quant_linear(match: Match) -> bool:
    return _scaling_ok(match) and _low_rank_shapes_ok(match)


def _low_rank_shapes_ok(match: Match) -> bool:
    A, B = _val(match.kwargs["A"]), _val(match.kwargs["B"])
    return A is not None and B is not None and A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1]


def _strip(node: Any, targets: tuple) -> Any:
    while isinstance(node, Node) and node.target in targets:
        node = node.args[0]
    return node


_VIEWS_AND_CASTS = (aten.reshape.default, aten.view.default, prims.convert_element_type.default)


def _intx_fields(weight: Node) -> Optional[tuple[Node, Node, Node, int]]:
    """Recognise ``reshape((q - zero_point) * scale)`` (torchao's per-group intx dequantize) and return its parts."""
    body = _strip(weight, _VIEWS_AND_CASTS)
    if not (isinstance(body, Node) and body.target == aten.mul.Tensor):
        return None
    diff, scale = body.args
    if not (isinstance(diff, Node) and diff.target == aten.sub.Tensor):
        diff, scale = scale, diff
    if not (isinstance(diff, Node) and diff.target == aten.sub.Tensor):
        return None
    qdata, zero_point = (_strip(a, _VIEWS_AND_CASTS) for a in diff.args)
    scale = _strip(scale, _VIEWS_AND_CASTS)
    q, z, s, w = _val(qdata), _val(zero_point), _val(scale), _val(weight)
    if any(t is None for t in (q, z, s, w)) or q.dtype != torch.int8 or q.dim() != 2 or q.shape != w.shape:
        return None
    if s.dim() != 2 or z.shape != s.shape or s.shape[0] != q.shape[0] or q.shape[1] % s.shape[1]:
        return None
    return qdata, scale, zero_point, q.shape[1] // s.shape[1]


def _check_torchao_intx(match: Match) -> bool:
    return _scaling_ok(match) and _low_rank_shapes_ok(match) and _intx_fields(match.kwargs["weight"]) is not None


def _fuse(match: Match, **kwargs: Any) -> None:
    if "weight" in kwargs:
        qdata, scale, zero_point, group_size = _intx_fields(kwargs["weight"])
    else:
        qdata, scale, zero_point, group_size = (kwargs[k] for k in ("qdata", "scale", "zero_point", "group_size"))
    x, A, B, bias = kwargs["x"], kwargs["A"], kwargs["B"], kwargs.get("bias")
    scaling = kwargs.get("scaling", 1)
    out_shape = list(match.output_node().meta["val"].shape)
    in_features = _val(A).shape[1]

    def replacement(x, qdata, scale, zero_point, A, B, *maybe_bias):
        B = B if scaling == 1 else B * scaling
        y = _eora_linear(x.reshape(-1, in_features), qdata, scale, zero_point, group_size, A, B, *maybe_bias)
        return y.reshape(out_shape)

    args = [x, qdata, scale, zero_point, A, B] + ([bias] if bias is not None else [])
    match.replace_by_example(replacement, args)
    counters["torchao_eora"]["fused_low_rank"] += 1


_register_all()


# ---- the pass object and its installation ------------------------------------------------------------------------


class FuseLowRankPass(CustomGraphPass):
    """``post_grad_custom_pre_pass`` that fuses residual low-rank paths; runs ``then`` (a chained pass) first."""

    def __init__(self, then: Optional[Any] = None) -> None:
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.then is not None:
            self.then(graph)
        _patterns.apply(graph)

    def uuid(self) -> Optional[Any]:
        # The FX graph cache keys on this: change it when the pass (or the ops it targets) changes.
        from .. import ops

        mine = get_hash_for_files((__file__, ops.__file__))
        if self.then is None:
            return mine
        chained = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if chained is None else f"{mine}+{chained}"  # None: an un-hashable chained pass bypasses cache


def fusion_pass_installed() -> bool:
    """Whether ``install_fusion_pass()`` is in effect."""
    return isinstance(inductor_config.post_grad_custom_pre_pass, FuseLowRankPass)


def install_fusion_pass() -> None:
    """Install the fusion as Inductor's ``post_grad_custom_pre_pass``, chaining any pass already there.

    Idempotent. Affects graphs compiled afterwards in this process; a module already compiled keeps its graph
    (Dynamo's guards do not include Inductor's config), so install before the first call, or
    ``torch._dynamo.reset()``. For a scoped install use
    ``torch._inductor.config.patch(post_grad_custom_pre_pass=FuseLowRankPass())``.
    """
    if not fusion_pass_installed():
        inductor_config.post_grad_custom_pre_pass = FuseLowRankPass(then=inductor_config.post_grad_custom_pre_pass)
