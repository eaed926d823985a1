"""An Inductor pass that fuses a residual low-rank path into the quantized matmul it is added to.

It rewrites, in the post-grad graph (before Inductor's own passes fold ``mm + mm(mm)`` into ``addmm``),

    quant_linear(x, W_c) + mm(mm(x, A^T), B^T) [* scaling]      ->  eora_linear(x, W_c, A, scaling * B)

for two kinds of base:
- ``torchao_eora::quant_linear`` (what ``QuantWithLowRank`` emits), in the ``add`` and ``addmm`` forms;
- a torchao intx weight dequantized in the graph, ``mm(x, ((q - zero_point) * scale)^T)`` (what a PEFT LoRA
  layer over an ``IntxWeightOnlyConfig`` base emits, with its ``reshape``s and ``* scaling``, and what
  ``quant_linear`` becomes on CPU, where it is decomposed before this pass runs). ``q`` is int8 values, or the
  unpacking of bit-packed uint8 values (``torchao_eora.packing``): a subgraph checked to compute exactly
  ``unpack_intx`` of one uint8 tensor, which the fused op then takes packed.

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

from ..ops import eora_linear, quant_linear, register_kernel_fallbacks  # noqa: F401  (registers the ops)
from ..packing import PACKED_BITS, packed_bits, unpack_intx

register_kernel_fallbacks()  # the eora_linear nodes this pass writes on CUDA must lower on torch 2.11 too

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
    if any(t is None for t in (q, z, s, w)) or w.dim() != 2:
        return None
    if q.dtype != torch.int8 or q.shape != w.shape:
        qdata = _packed_source(qdata, *w.shape)  # bit-packed values, unpacked in the graph
        if qdata is None:
            return None
    if s.dim() != 2 or z.shape != s.shape or s.shape[0] != w.shape[0] or w.shape[1] % s.shape[1]:
        return None
    return qdata, scale, zero_point, w.shape[1] // s.shape[1]


_MAX_UNPACK_NODES = 64


def _packed_source(root: Node, out_features: int, in_features: int) -> Optional[Node]:
    """The uint8 node whose bit-packed values ``root`` unpacks (``root`` reshaped to ``(out, in)`` row-major being
    ``unpack_intx(source, bits)``), or None.

    The subgraph from one uint8 ``(out, in * bits / 8)`` tensor to ``root`` must be pure, deterministic aten ops; it
    is then run on every byte value and on random bytes and compared with :func:`unpack_intx`: whatever form the
    decompositions gave the unpacking, only a subgraph computing exactly it is accepted.
    """
    def packed_bits_of(val) -> Optional[int]:
        """The width of a uint8 (out, in * bits / 8) tensor, else None (other uint8 tensors are walked through)."""
        if not isinstance(val, torch.Tensor) or val.dtype != torch.uint8 or val.dim() != 2:
            return None
        if val.shape[0] != out_features:
            return None
        try:
            return packed_bits(val.shape[1], in_features)
        except ValueError:
            return None

    nodes: set[Node] = set()
    sources: set[Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in nodes or node in sources:
            continue
        if node is not root and packed_bits_of(_val(node)) is not None:
            sources.add(node)
            continue
        target = node.target
        if (node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable
                or torch.Tag.nondeterministic_seeded in target.tags or len(nodes) >= _MAX_UNPACK_NODES):
            return None
        nodes.add(node)
        stack.extend(node.all_input_nodes)
    if len(sources) != 1:
        return None
    (source,) = sources
    bits = packed_bits_of(_val(source))
    if bits not in PACKED_BITS or _val(root) is None or _val(root).numel() != out_features * in_features:
        return None
    return source if _computes_unpack(root, nodes, source, bits) else None


def _computes_unpack(root: Node, nodes: set[Node], source: Node, bits: int) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    graph = torch.fx.Graph()
    env = {source: graph.placeholder("packed")}
    for node in root.graph.nodes:  # graph order is a topological order
        if node in nodes:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[root])
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    rows, width = _val(source).shape
    with unset_fake_temporarily(), torch.no_grad():
        every_byte = torch.arange(rows * width, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(rows, width)
        noise = torch.randint(0, 256, (rows, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        for sample in (every_byte, every_byte.flip(1).contiguous(), noise):
            try:
                got = module(sample)
            except Exception:  # noqa: BLE001  (a subgraph that does not run on real bytes is not an unpacking)
                return False
            want = unpack_intx(sample, bits)
            if not isinstance(got, torch.Tensor) or got.numel() != want.numel() or got.is_floating_point():
                return False
            if not torch.equal(got.reshape(want.shape).to(torch.int64), want.to(torch.int64)):
                return False
    return True


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
