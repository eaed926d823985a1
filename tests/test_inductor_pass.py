"""The custom ops and the Inductor fusion pass: what gets fused, that fusing changes nothing, and caching."""

import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache
from torchao.quantization import quantize_

from helpers import tiny_llama
from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig
from torchao_eora.compressors import CompressedWeight
from torchao_eora.inductor_passes import FuseLowRankPass, fusion_pass_installed, install_fusion_pass
from torchao_eora.intx import dequantize_intx
from torchao_eora.ops import eora_linear, quant_linear
from torchao_eora.solver import LowRankFactors

OUT, IN, RANK, GROUP = 48, 96, 8, 32


def _weight(seed=0, rank=RANK, bits=4):
    g = torch.Generator().manual_seed(seed)
    base = RTNConfig(bits=bits, group_size=GROUP).compress(torch.randn(OUT, IN, generator=g))
    factors = LowRankFactors(torch.randn(rank, IN, generator=g) / 10, torch.randn(OUT, rank, generator=g) / 10)
    return QuantWithLowRank.from_parts(base, factors)


def _linear(bias: bool, rank=RANK) -> torch.nn.Linear:
    lin = torch.nn.Linear(IN, OUT, bias=bias)
    lin.weight = torch.nn.Parameter(_weight(rank=rank), requires_grad=False)
    return lin


def _compiled_with_pass(module, *inputs):
    """Compile from scratch with the fusion pass; return (output, number of fusions)."""
    torch._dynamo.reset()
    counters.clear()
    # A fresh cache: a graph cached by an earlier run would be reused without running the pass.
    with torch.no_grad(), fresh_cache(), inductor_config.patch(post_grad_custom_pre_pass=FuseLowRankPass()):
        out = torch.compile(module, fullgraph=True)(*inputs)
    return out, counters["torchao_eora"]["fused_low_rank"]


# ---- the ops -----------------------------------------------------------------------------------------------------


def _fp64_fields(packed=True):
    """The weight's fields in fp64; ``qdata`` as held (int4 bit-packed, uint8) or unpacked to one int8 a value."""
    w = _weight()
    return w.qdata if packed else w.values("qdata"), w.scale.double(), w.zero_point, w.A.double(), w.B.double()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "int8"])
def test_ops_compute_the_dequantized_reference_in_fp64(packed):
    qdata, scale, zero_point, A, B = _fp64_fields(packed)
    assert qdata.dtype == (torch.uint8 if packed else torch.int8)
    x = torch.randn(5, IN, dtype=torch.float64)
    bias = torch.randn(OUT, dtype=torch.float64)
    values = _fp64_fields(packed=False)[0].double()
    w_c = (values - zero_point.double().repeat_interleave(GROUP, 1)) * scale.repeat_interleave(GROUP, 1)
    torch.testing.assert_close(quant_linear(x, qdata, scale, zero_point, GROUP, bias), x @ w_c.T + bias)
    fused = eora_linear(x, qdata, scale, zero_point, GROUP, A, B, bias)
    torch.testing.assert_close(fused, x @ (w_c + B @ A).T + bias)


@pytest.mark.parametrize("op", ["quant_linear", "eora_linear"])
def test_ops_pass_torch_library_opcheck(op):
    w = _weight()
    x = torch.randn(3, IN, requires_grad=True)
    bias = torch.randn(OUT, requires_grad=True)
    if op == "quant_linear":
        args = (x, w.qdata, w.scale, w.zero_point, GROUP, bias)
        torch.library.opcheck(torch.ops.torchao_eora.quant_linear.default, args)
    else:
        A, B = w.dequantize_A().clone().requires_grad_(), w.dequantize_B().clone().requires_grad_()
        args = (x, w.qdata, w.scale, w.zero_point, GROUP, A, B, bias)
        torch.library.opcheck(torch.ops.torchao_eora.eora_linear.default, args)


def test_op_gradients_match_autograd_through_the_dense_weight():
    qdata, scale, zero_point, A, B = _fp64_fields()
    w_c = dequantize_intx(qdata, scale, zero_point, GROUP, torch.float64)
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    A, B = A.requires_grad_(), B.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, A, B: eora_linear(x, qdata, scale, zero_point, GROUP, A, B), (x, A, B))
    grad = torch.randn(4, OUT, dtype=torch.float64)
    (gx,) = torch.autograd.grad(quant_linear(x, qdata, scale, zero_point, GROUP), x, grad)
    torch.testing.assert_close(gx, grad @ w_c)


def test_ops_refuse_inputs_that_are_not_flat_or_do_not_fit():
    w = _weight()
    with pytest.raises(ValueError, match="2-D input"):
        quant_linear(torch.randn(2, 3, IN), w.qdata, w.scale, w.zero_point, GROUP)
    with pytest.raises(ValueError, match="shapes do not fit"):
        quant_linear(torch.randn(2, IN + 1), w.qdata, w.scale, w.zero_point, GROUP)


# ---- the pass on QuantWithLowRank --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, IN), (2, 3, IN)])
def test_low_rank_linear_is_fused_and_compiled_equals_eager(bias, shape):
    lin = _linear(bias)
    x = torch.randn(*shape)
    out, fused = _compiled_with_pass(lin, x)
    assert fused == 1
    with torch.no_grad():
        torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_bit_packed_int2_and_int3_bases_are_fused_too(bits):
    """On CPU ``quant_linear`` is decomposed before the pass; the pass finds the packed tensor behind the unpacking."""
    lin = torch.nn.Linear(IN, OUT, bias=True)
    lin.weight = torch.nn.Parameter(_weight(bits=bits), requires_grad=False)
    assert lin.weight.qdata.dtype == torch.uint8
    x = torch.randn(5, IN)
    out, fused = _compiled_with_pass(lin, x)
    assert fused == 1
    with torch.no_grad():
        torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)


def test_only_a_subgraph_computing_the_unpacking_counts_as_one():
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchao_eora.inductor_passes.fuse_low_rank import _VIEWS_AND_CASTS, _packed_source, _strip
    from torchao_eora.packing import unpack_intx

    packed = torch.randint(0, 256, (4, 6), dtype=torch.uint8)  # 16 int3 values a row

    def source_of(fn, in_features=16):
        graph = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(packed).graph
        (out,) = [n for n in graph.nodes if n.op == "output"]
        result = out.args[0][0] if isinstance(out.args[0], (list, tuple)) else out.args[0]
        return _packed_source(_strip(result, _VIEWS_AND_CASTS), 4, in_features), graph

    found, graph = source_of(lambda p: unpack_intx(p, 3).float())
    assert found is not None and found.op == "placeholder"
    assert source_of(lambda p: (unpack_intx(p, 3) ^ 1).float())[0] is None  # a different function of the bytes
    assert source_of(lambda p: unpack_intx(p, 3).flip(1).float())[0] is None  # values out of order
    # the unpacking of a uint8 tensor derived from the input: that tensor is what the fused op gets
    shuffled, _ = source_of(lambda p: unpack_intx(p.view(4, 3, 2).transpose(1, 2).reshape(4, 6), 3).float())
    assert shuffled is not None and shuffled.op == "call_function"
    assert source_of(lambda p: unpack_intx(p, 3).float(), in_features=24)[0] is None  # not (4, 24) values


@pytest.mark.parametrize("bias", [False, True])
def test_one_token_on_cpu_lowers_to_a_reduction_over_the_int8_weight(bias):
    """Decode on CPU: dequantize + multiply + sum in one Inductor kernel, no fp32 weight copy and no GEMV call."""
    from torch._inductor.utils import run_and_get_code

    lin, x = _linear(bias, rank=0), torch.randn(1, IN)
    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():
        out, (code, *_) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
        torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    assert "int8_t" in code  # the kernel reads the int8 values themselves


def test_rank_zero_and_unpassed_compiles_are_not_fused():
    _, fused = _compiled_with_pass(_linear(True, rank=0), torch.randn(4, IN))
    assert fused == 0
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), fresh_cache():
        torch.compile(_linear(True), fullgraph=True)(torch.randn(4, IN))
    assert counters["torchao_eora"]["fused_low_rank"] == 0


class _ExposesIntermediate(torch.nn.Module):
    """Returns ``x A^T`` too: fusing would have to compute it twice, so the pass must leave the graph alone."""

    def __init__(self):
        super().__init__()
        self.w = _weight()

    def forward(self, x):
        w = self.w
        t = x @ w.dequantize_A().t()
        return quant_linear(x, w.qdata, w.scale, w.zero_point, GROUP) + t @ w.dequantize_B().t(), t


def test_pattern_with_an_escaping_intermediate_is_not_fused():
    module = _ExposesIntermediate()
    x = torch.randn(4, IN)
    (y, t), fused = _compiled_with_pass(module, x)
    assert fused == 0
    torch.testing.assert_close(y, module(x)[0])


class _AddmmForm(torch.nn.Module):
    """The residual's outer matmul already folded into ``addmm(base, x A^T, B^T)``."""

    def __init__(self):
        super().__init__()
        self.w = _weight()

    def forward(self, x):
        w = self.w
        base = quant_linear(x, w.qdata, w.scale, w.zero_point, GROUP)
        return torch.addmm(base, x @ w.dequantize_A().t(), w.dequantize_B().t())


def test_addmm_form_is_fused():
    module = _AddmmForm()
    x = torch.randn(7, IN)
    out, fused = _compiled_with_pass(module, x)
    assert fused == 1
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles a whole model
@pytest.mark.parametrize("adapter_bits", [None, 4])
def test_whole_model_every_adapted_linear_is_fused(adapter_bits):
    model = tiny_llama()
    config = EoRAConfig(rank=16, base=RTNConfig(bits=4, group_size=32), compensation="svd", adapter_bits=adapter_bits,
                        adapter_group_size=16)
    quantize_(model, config)  # int4 adapters: the pass fuses their dequantized values like any other A, B
    n_adapted = sum(isinstance(getattr(m, "weight", None), QuantWithLowRank) for m in model.modules())
    ids = torch.randint(0, 128, (2, 16))
    out, fused = _compiled_with_pass(model, ids)
    assert fused == n_adapted == 14  # 7 per decoder layer (lm_head is left alone)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# ---- the pass on PEFT LoRA over a stock torchao base -------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, IN), (2, 3, IN)])
def test_peft_lora_over_torchao_intx_base_is_fused(bias, shape):
    peft = pytest.importorskip("peft")
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(IN, OUT, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    block = Block()
    quantize_(block, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that merge() needs a TorchAoConfig; we never merge
        lora = peft.get_peft_model(
            block, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"], init_lora_weights=False)
        )
    x = torch.randn(*shape)
    out, fused = _compiled_with_pass(lora, x)
    assert fused == 1
    with torch.no_grad():
        reference = lora(x)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


# ---- installation and caching ------------------------------------------------------------------------------------


class _CountingPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        type(self).calls += 1

    def uuid(self):
        return "counting-pass"


def test_install_chains_an_existing_pass_and_is_idempotent():
    with fresh_cache(), inductor_config.patch(post_grad_custom_pre_pass=_CountingPass()):
        install_fusion_pass()
        install_fusion_pass()
        installed = inductor_config.post_grad_custom_pre_pass
        assert fusion_pass_installed() and isinstance(installed.then, _CountingPass)
        assert "counting-pass" in installed.uuid()
        torch._dynamo.reset()
        counters.clear()
        _CountingPass.calls = 0
        with torch.no_grad():
            torch.compile(_linear(False), fullgraph=True)(torch.randn(3, IN))
        assert _CountingPass.calls == 1 and counters["torchao_eora"]["fused_low_rank"] == 1
    assert not fusion_pass_installed()


def test_second_compile_hits_the_fx_graph_cache():
    lin, x = _linear(True), torch.randn(4, IN)
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True, post_grad_custom_pre_pass=FuseLowRankPass()):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            with torch.no_grad():
                torch.compile(lin, fullgraph=True)(x)
            first = counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]
            if _ == 0:
                assert first == (1, 0) and counters["torchao_eora"]["fused_low_rank"] == 1
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        assert counters["torchao_eora"]["fused_low_rank"] == 0  # the cached, already fused graph was reused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels behind the ops)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_cuda_fused_kernel_under_compile_matches_eager(dtype, tokens):
    lin = _linear(True).to("cuda", dtype)
    x = torch.randn(tokens, IN, device="cuda", dtype=dtype)
    out, fused = _compiled_with_pass(lin, x)
    assert fused == 1
    with torch.no_grad():
        w = lin.weight
        reference = x.double() @ w.dequantize(torch.float32).double().T + lin.bias.double()
    err = (out.double() - reference).abs().max() / reference.abs().max()
    assert err < (1.6e-2 if dtype == torch.bfloat16 else 2e-3)  # output rounding of the dtype, with headroom


@pytest.mark.parametrize("adapter_bits", [4, 8])
def test_one_token_on_cpu_reads_quantized_adapters_in_reductions(adapter_bits):
    """Decode on CPU with int adapters: both adapter products are reductions over the stored (packed) values, fused
    with their dequantize; no matmul call and no dequantized copy of A or B. Same result as eager."""
    from torch._inductor.utils import run_and_get_code

    from torchao_eora.adapter_quant import quantize_factors

    g = torch.Generator().manual_seed(5)
    w = torch.randn(OUT, IN, generator=g)
    base = RTNConfig(bits=4, group_size=GROUP).compress(w)
    delta = w - base.dequantize(torch.float32)
    factors = LowRankFactors(torch.randn(RANK, IN, generator=g) / 10, torch.randn(OUT, RANK, generator=g) / 10)
    lin = torch.nn.Linear(IN, OUT, bias=False)
    weight = QuantWithLowRank.from_parts(base, quantize_factors(delta, factors, adapter_bits, 8, None))
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = torch.randn(1, IN)
    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():
        out, (code, *_) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
        torch.testing.assert_close(out, lin(x), rtol=1e-4, atol=1e-4)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    assert ("uint8_t" if adapter_bits == 4 else "int8_t") in code
    # no buffer the size of a dequantized A (RANK x IN) or B (OUT x RANK) in fp32
    assert f"empty_strided_cpu(({RANK}, {IN})" not in code and f"empty_strided_cpu(({OUT}, {RANK})" not in code


@pytest.mark.parametrize("base_bits,adapter_bits", [(4, 4), (3, 4), (4, 2), (4, 3), (4, 8), (None, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_token_on_cpu_int_adapters_share_the_de_interleaved_input(base_bits, adapter_bits, bias):
    """Packed base and packed adapters of one packing unit (int4 both): ``A`` reads the base's de-interleaved copy
    of ``x`` and ``A x`` is written in the order ``B`` reads it, so the only copy is the base's (each extra one was a
    buffer and a pass a module a token). Other widths, and a dense (pruned) base, keep their own copies. Same result
    as eager in every case."""
    from torch._inductor.utils import run_and_get_code

    from torchao_eora.adapter_quant import quantize_factors

    g = torch.Generator().manual_seed((base_bits or 0) * 10 + adapter_bits)
    w = torch.randn(OUT, IN, generator=g)
    if base_bits is None:  # a pruned-only base: dense qdata, no scale
        base = CompressedWeight(w * (torch.rand(w.shape, generator=g) > 0.5))
    else:
        base = RTNConfig(bits=base_bits, group_size=GROUP).compress(w)
    factors = LowRankFactors(torch.randn(RANK, IN, generator=g) / 10, torch.randn(OUT, RANK, generator=g) / 10)
    lin = torch.nn.Linear(IN, OUT, bias=bias)
    weight = QuantWithLowRank.from_parts(base, quantize_factors(w - base.dequantize(torch.float32), factors,
                                                                adapter_bits, 8, None))
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = torch.randn(1, IN, generator=g)
    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():
        out, (code, *_) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
        torch.testing.assert_close(out, lin(x), rtol=1e-4, atol=1e-4)
    if base_bits == adapter_bits == 4:  # x de-interleaved once, A x (already de-interleaved), the output
        buffers = [line.split("(")[2] for line in code.splitlines() if "empty_strided_cpu((" in line]
        assert sorted(buffers) == sorted([f"2, {IN // 2}), ", f"2, {RANK // 2}), ", f"{OUT}, ), "]), buffers


def test_one_token_on_cpu_computes_float_adapters_as_reductions():
    """Decode on CPU with adapters in the model dtype: both adapter products are reductions Inductor fuses with the
    rest of the layer, not two GEMV calls per module (measured: 420 extern calls a SmolLM2 token). Same result."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(IN, OUT, bias=True)
    base = RTNConfig(bits=4, group_size=GROUP).compress(torch.randn(OUT, IN, generator=g))
    factors = LowRankFactors(torch.randn(RANK, IN, generator=g) / 10, torch.randn(OUT, RANK, generator=g) / 10)
    lin.weight = torch.nn.Parameter(QuantWithLowRank.from_parts(base, factors), requires_grad=False)
    torch._dynamo.reset()
    for tokens, reductions in ((1, True), (3, False)):
        x = torch.randn(tokens, IN, generator=g)
        with torch.no_grad(), fresh_cache():
            out, (code, *_) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
            torch.testing.assert_close(out, lin(x), rtol=1e-4, atol=1e-4)
        assert ("extern_kernels.mm" not in code and "extern_kernels.addmm" not in code) == reductions


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, 32), (3, 4)])  # (3, 4): a group smaller than a unit
def test_one_token_on_cpu_reads_packed_values_where_they_lie(bits, group):
    """The decode reduction over bit-packed values (value i of every packing unit against a de-interleaved x)
    computes exactly what eager does, for every packed width, and falls back when a group splits a unit."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(IN, OUT, bias=True)
    base = RTNConfig(bits=bits, group_size=group).compress(torch.randn(OUT, IN, generator=g))
    factors = LowRankFactors(torch.randn(RANK, IN, generator=g) / 10, torch.randn(OUT, RANK, generator=g) / 10)
    lin.weight = torch.nn.Parameter(QuantWithLowRank.from_parts(base, factors), requires_grad=False)
    assert lin.weight.is_packed("qdata")
    x = torch.randn(1, IN)
    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():
        out, (code, *_) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
        torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    assert "uint8_t" in code and f"empty_strided_cpu(({OUT}, {IN})" not in code  # no dequantized weight copy


def test_kernel_fallbacks_are_registered_once_and_cpu_still_decomposes():
    """Off CPU the ops must lower to themselves (torch 2.11 refused Inductor's implicit fallback for an op with a
    decomposition, on an H200); registering twice is harmless, and CPU compiles still decompose them."""
    from torch._inductor.lowering import lowerings

    from torchao_eora.ops import register_kernel_fallbacks

    register_kernel_fallbacks()
    register_kernel_fallbacks()
    assert torch.ops.torchao_eora.quant_linear.default in lowerings
    assert torch.ops.torchao_eora.eora_linear.default in lowerings
    test_one_token_on_cpu_computes_float_adapters_as_reductions()  # no extern call: the decomposition still ran


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 3])
def test_compiled_quant_matvec_decodes_every_value_at_every_position(bits, groups):
    """Every signed value at every position of a packing unit (the top one read through the sign of the unit's last
    byte, the others by rounding), with one group a row and with several."""
    from torchao_eora.ops import quant_matvec
    from torchao_eora.packing import pack_intx

    group = 24 * (4 // groups)  # a multiple of every packing unit (int3: 8 values)
    cols = group * groups
    values = torch.arange(cols * 16) % (1 << bits) - (1 << (bits - 1))  # every value, at shifting positions
    q = values.reshape(-1, cols)[:, torch.randperm(cols, generator=torch.Generator().manual_seed(bits))]
    q = q.to(torch.int8).contiguous()
    g = torch.Generator().manual_seed(groups)
    scale, zero = torch.rand(q.shape[0], groups, generator=g) + 0.5, torch.randint(-2, 3, (q.shape[0], groups),
                                                                                   generator=g, dtype=torch.int8)
    x = torch.randn(1, cols, generator=g)
    reference = x.double() @ dequantize_intx(q, scale, zero, group, torch.float32).double().T
    with torch.no_grad():
        out = torch.compile(quant_matvec, fullgraph=True)(x, pack_intx(q, bits), scale, zero, group)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
