"""Numerics of the fused dequant-GEMM + low-rank Triton kernel against an fp64 reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter. ``triton.jit`` decides between
compiling and interpreting when the kernel module is imported, and the interpreter reads
``TRITON_INTERPRET`` again while launching, so: the module is imported (or re-imported) here with the
variable set, and an autouse fixture keeps it set while these tests run only, so it leaks into no other test.

Error bounds: ``max |y - ref| / max |ref|`` with ``ref`` computed in fp64 from the same stored inputs.
The output is rounded to its dtype (unit roundoff u: fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3) and, for half
dtypes, so is each dequantized weight before the fp32-accumulated dot, as a dequantize-then-matmul would.
Bounds are 4u for half dtypes (fp16 2e-3, bf16 1.6e-2) and 1e-5 for fp32 (accumulation over K).
``test_bounds_catch_wrong_kernels`` checks that typical mistakes overshoot these bounds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
_MODULE = "torchao_eora.kernels.dequant_gemm"


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 while inside, only when there is no GPU; restores the previous value."""
    if _CUDA:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


with _interpreter_env():
    if _MODULE in sys.modules:
        dg = sys.modules[_MODULE]
        if not _CUDA and not dg.is_interpreted():  # imported earlier without the interpreter: rebuild
            dg = importlib.reload(dg)
    else:
        dg = importlib.import_module(_MODULE)


@pytest.fixture(autouse=True)
def _interpret():
    with _interpreter_env():
        yield


BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OBSERVED: dict[torch.dtype, float] = {}  # max relative error per dtype, printed at the end (pytest -s)


def make_case(M, N, K, group_size, bits, packed, R, bias, dtype, *, seed=0, scale_dtype=None,
              ab_dtype=torch.float32, device=DEVICE):
    """Random inputs in the torchao layout plus their fp64 reference output.

    The low-rank term and the bias are scaled to about a third of the quantized term, so that
    dropping, doubling or mis-indexing any of them is far above the error bounds.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    zp = torch.randint(lo, hi + 1, (N, K // group_size), generator=g, dtype=torch.int8)
    scale = ((torch.rand(N, K // group_size, generator=g) + 0.5) / 2 ** (bits - 1)).to(scale_dtype or dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (q.double() - zp.double().repeat_interleave(group_size, 1)) * scale.double().repeat_interleave(group_size, 1)
    main = x.double() @ w.T
    size = main.std().item() if main.numel() > 1 else 1.0
    A = B = b = None
    ref = main.clone()
    if R is not None:
        A = (torch.randn(R, K, generator=g) / K**0.5).to(ab_dtype)
        B = (torch.randn(N, R, generator=g) * size / (3 * max(R, 1) ** 0.5)).to(ab_dtype)
        ref += (x.double() @ A.double().T) @ B.double().T
    if bias:
        b = (torch.randn(N, generator=g) * size / 3).to(dtype)
        ref += b.double()
    qdata = dg.pack_int4(q) if packed else q
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = dict(x=to(x), qdata=to(qdata), scale=to(scale), zero_point=to(zp), group_size=group_size,
                bias=to(b), A=to(A), B=to(B))
    return args, ref.to(device), dict(q=q, zp=zp, scale=scale, x=x, A=A, B=B, b=b)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = rel_err(y, ref)
    OBSERVED[dtype] = max(OBSERVED.get(dtype, 0.0), err)
    assert err <= BOUND[dtype], f"{dtype}: relative error {err:.3g} > {BOUND[dtype]}"


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (M, N, K, group_size, bits, packed, rank, bias, dtype): M <= 16 takes the split-K path, M > 16 the tiled one.
# Every M, dtype, bit width, rank and group layout appears on both paths; not the full product (slow).
CASES = [
    (1, 40, 96, 32, 4, False, 5, True, f32),
    (1, 27, 64, 64, 4, True, 24, False, f16),
    (1, 72, 160, 32, 2, True, 16, True, bf16),
    (5, 72, 160, 32, 3, False, 16, False, f16),
    (5, 40, 128, 8, 3, False, 5, True, bf16),      # group < 16: per-element scales
    (5, 72, 96, 32, 8, False, 16, True, f32),
    (16, 27, 64, 64, 2, False, 24, True, bf16),
    (16, 40, 160, 32, 4, True, 0, False, f32),
    (16, 25, 192, 96, 8, False, None, True, f16),  # no adapters at all; group of 96 = 3 tiles
    (17, 40, 96, 32, 8, False, 0, True, f32),
    (17, 72, 64, 64, 8, False, 24, False, bf16),
    (17, 25, 192, 96, 3, False, 5, True, f16),
    (33, 72, 160, 32, 4, True, 5, True, bf16),
    (33, 40, 96, 32, 2, False, 16, True, f16),
    (33, 27, 128, 8, 4, True, 24, True, f32),     # packed, group < 16
    (33, 25, 64, 64, 3, False, None, False, bf16),
]


@pytest.mark.parametrize("M,N,K,group_size,bits,packed,R,bias,dtype", CASES)
def test_numerics(M, N, K, group_size, bits, packed, R, bias, dtype):
    args, ref, _ = make_case(M, N, K, group_size, bits, packed, R, bias, dtype, seed=M * 1000 + N)
    check(dg.quant_linear_triton(**args), ref, dtype)


@pytest.mark.parametrize("scale_dtype,ab_dtype,dtype", [(f32, bf16, bf16), (bf16, f16, f32), (f16, f32, bf16)])
def test_mixed_parameter_dtypes(scale_dtype, ab_dtype, dtype):
    """Scale and adapters in another float dtype than x (torchao keeps scales in the model dtype)."""
    for M in (3, 20):
        args, ref, _ = make_case(M, 40, 96, 32, 4, False, 5, True, dtype, scale_dtype=scale_dtype, ab_dtype=ab_dtype)
        check(dg.quant_linear_triton(**args), ref, dtype)


# Forced launch configs reach what the heuristics may not pick on this machine.
FORCED = [
    # tile straddles groups, K % BLOCK_K != 0 (per-element scales), tiled and split-K
    (33, 40, 96, 32, False, 5, dict(block_m=32, block_n=32, block_k=64)),
    (5, 40, 96, 32, True, 5, dict(block_m=16, block_n=32, block_k=64, split_k=2)),
    # several tiles per group; 4 K tiles in 2 splits
    (5, 27, 64, 64, False, 24, dict(block_m=16, block_n=16, block_k=16, split_k=3)),
    # 5 K tiles in 3 splits of 2: the last split's second tile lies past K
    (1, 72, 160, 32, True, 16, dict(block_m=16, block_n=32, block_k=32, split_k=3)),
    # split-K disabled on the decode shape; grouped ordering with a partial last group (3 M tiles, GROUP_M=2)
    (7, 40, 96, 32, False, 5, dict(block_m=16, block_n=32, block_k=32, split_k=1)),
    (33, 40, 96, 32, False, 5, dict(block_m=16, block_n=16, block_k=32, group_m=2)),
    # rank above BLOCK_R = 64: two rank chunks in the epilogue
    (20, 24, 64, 32, False, 80, dict(block_m=32, block_n=32, block_k=32)),
]


@pytest.mark.parametrize("M,N,K,group_size,packed,R,cfg", FORCED)
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_forced_configs(M, N, K, group_size, packed, R, cfg, dtype):
    args, ref, _ = make_case(M, N, K, group_size, 4, packed, R, True, dtype, seed=K + R)
    check(dg._quant_linear(**args, config=dg._Config(**cfg)), ref, dtype)


def test_non_contiguous_and_empty():
    args, ref, _ = make_case(6, 40, 96, 32, 4, False, 5, True, f32)
    args["x"] = args["x"].t().contiguous().t()  # column-major view
    check(dg.quant_linear_triton(**args), ref, f32)
    args["x"] = args["x"][:0]
    y = dg.quant_linear_triton(**args)
    assert y.shape == (0, 40) and y.dtype == f32


@pytest.mark.parametrize("M", [5, 33])  # split-K (low-rank and bias added by split 0 only) and tiled
def test_bounds_catch_wrong_kernels(M):
    """Each plausible bug moves the output further from the reference than the loosest (bf16) bound."""
    dtype, g = bf16, 32
    args, ref, raw = make_case(M, 40, 96, g, 3, False, 16, True, dtype)
    y = dg.quant_linear_triton(**args)
    check(y, ref, dtype)
    x64, A64, B64 = raw["x"].double(), raw["A"].double(), raw["B"].double()
    lowrank = ((x64 @ A64.T) @ B64.T).to(ref.device)
    bias = raw["b"].double().to(ref.device)

    def main_with(zp, scale):
        w = (raw["q"].double() - zp.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)
        return (x64 @ w.T).to(ref.device)

    wrong = {
        "low-rank dropped": ref - lowrank,
        "low-rank added twice": ref + lowrank,
        "bias doubled": ref + bias,
        "bias dropped": ref - bias,
        "zero point off by one": main_with(raw["zp"] + 1, raw["scale"]) + lowrank + bias,
        "zero point ignored": main_with(torch.zeros_like(raw["zp"]), raw["scale"]) + lowrank + bias,
        "group index shifted": main_with(raw["zp"].roll(1, 1), raw["scale"].roll(1, 1)) + lowrank + bias,
    }
    for name, bad in wrong.items():
        assert rel_err(y, bad) > 2 * BOUND[dtype], name


def test_kernels_run_interpreted_on_cpu():
    assert dg.is_interpreted() != _CUDA


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_quant_with_low_rank_through_the_kernel(bits):
    """A QuantWithLowRank holds int2/3/4 bit-packed: packed int4 reaches the kernel as it is, int2/int3 unpacked
    (``ops.kernel_qdata``, what the CUDA op registrations call); the result is the fp64 reference's."""
    from torchao_eora import QuantWithLowRank, RTNConfig, svd_factors
    from torchao_eora.ops import kernel_qdata

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 64, generator=g)
    base = RTNConfig(bits, 32).compress(w)
    q = QuantWithLowRank.from_parts(base, svd_factors(w - base.dequantize(), 8))
    assert q.qdata.dtype == torch.uint8
    qdata = kernel_qdata(q.qdata, 64, 32)
    assert (qdata is q.qdata) == (bits == 4) and qdata.dtype == (torch.uint8 if bits == 4 else torch.int8)
    x, bias = torch.randn(20, 64, generator=g), torch.randn(40, generator=g)
    fields = [t.to(DEVICE) for t in (x, qdata, q.scale, q.zero_point)]
    y = dg.quant_linear_triton(*fields, 32, bias.to(DEVICE), q.A.to(DEVICE), q.B.to(DEVICE))
    ref = x.double() @ q.dequantize(torch.float64).T + bias.double()
    check(y, ref.to(y.device), torch.float32)


def test_pack_int4_roundtrip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 18), generator=g, dtype=torch.int8)
    p = dg.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 9)
    assert torch.equal(dg.unpack_int4(p), q)
    # low nibble = even column, two's complement nibbles
    assert dg.pack_int4(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)).tolist() == [[0xF1, 0x78]]
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(dg.pack_int4(dg.unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 3, dtype=torch.int8), "even number of columns"),
    (torch.full((2, 2), 8, dtype=torch.int8), r"\[-8, 7\]"),
    (torch.zeros(2, 2, dtype=torch.int32), "int8"),
    (torch.zeros(4, dtype=torch.int8), "2-D"),
])
def test_pack_int4_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        dg.pack_int4(bad)


def test_unpack_int4_errors():
    with pytest.raises(ValueError, match="uint8"):
        dg.unpack_int4(torch.zeros(2, 2, dtype=torch.int8))


def _valid_args():
    args, _, _ = make_case(2, 8, 64, 32, 4, False, 3, True, f32, device=DEVICE)
    return args


BAD_INPUTS = [
    (lambda a: a.update(x=a["x"][0]), "x must be 2-D"),
    (lambda a: a.update(x=a["x"].double()), "x must be 2-D float32"),
    (lambda a: a.update(qdata=a["qdata"][:, :32]), r"int8 qdata must be \(N, K=64\)"),
    (lambda a: a.update(qdata=a["qdata"].to(torch.int16)), "qdata must be int8"),
    (lambda a: a.update(qdata=a["qdata"][:, :16].to(torch.uint8)), "packed int4 qdata"),
    (lambda a: a.update(group_size=24), "multiple of group_size"),
    (lambda a: a.update(group_size=0), "positive int"),
    (lambda a: a.update(group_size=64, scale=a["scale"][:, :1], zero_point=a["zero_point"][:, :1],
                        qdata=torch.zeros(8, 32, dtype=torch.uint8, device=DEVICE),
                        x=torch.zeros(2, 64, device=DEVICE)), None),  # valid packed
    (lambda a: a.update(scale=a["scale"][:, :1]), "scale must be"),
    (lambda a: a.update(scale=a["scale"].to(torch.int8)), "scale must be float"),
    (lambda a: a.update(zero_point=a["zero_point"].to(torch.int32)), "zero_point must be int8"),
    (lambda a: a.update(bias=a["bias"][:4]), "bias must be"),
    (lambda a: a.update(B=None), "together"),
    (lambda a: a.update(A=a["A"][:, :32]), "A must be"),
    (lambda a: a.update(B=a["B"][:, :2]), "B must be"),
    (lambda a: a.update(B=a["B"].to(torch.int8)), "B must be"),
]


@pytest.mark.parametrize("mutate,match", BAD_INPUTS)
def test_input_validation(mutate, match):
    args = _valid_args()
    mutate(args)
    if match is None:
        dg.quant_linear_triton(**args)
        return
    with pytest.raises(ValueError, match=match):
        dg.quant_linear_triton(**args)


def test_packed_group_size_must_be_even():
    x = torch.zeros(1, 6)
    with pytest.raises(ValueError, match="even group_size"):
        dg.quant_linear_triton(x, torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 2),
                               torch.zeros(2, 2, dtype=torch.int8), 3)


def _compile_for(kernel, target, x_ty, q_ty, out_ty, aligned, cfg):
    from triton.compiler import ASTSource

    names = kernel.arg_names
    ptrs = dict(x_ptr=x_ty, q_ptr=q_ty, s_ptr="*bf16", z_ptr="*i8", bias_ptr=x_ty, t_ptr="*fp32", b_ptr="*fp32",
                out_ptr=out_ty)
    const = dict(PACKED=q_ty == "*u8", GROUP_ALIGNED=aligned, HAS_BIAS=True, HAS_LOWRANK=True, DOT_IN_FP32=False,
                 PRECISION="ieee" if x_ty == "*fp32" else "tf32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, BLOCK_R=32, GROUP_M=cfg.group_m)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=target, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def test_compiles_for_nvidia_gpus(tmp_path, monkeypatch):
    """Compile (no GPU needed) the tiled and the split-K variants to sm80/sm90 cubins.

    The interpreter accepts some code the compiler rejects (and the reverse); this catches the first kind
    on machines without a GPU. The GPU tests below check the compiled numerics.
    """
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip("triton build without the NVIDIA backend")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the current default; silences its warning
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = triton.runtime.JITFunction(dg._dequant_gemm_kernel.fn) if dg.is_interpreted() else dg._dequant_gemm_kernel
    variants = [  # (target arch, x, qdata, out, scales one per tile, config)
        (90, "*bf16", "*u8", "*bf16", True, dg._Config(128, 128, 64, num_warps=8)),
        (80, "*fp32", "*i8", "*fp32", False, dg._Config(16, 64, 128, split_k=8, num_stages=2)),
    ]
    for arch, x_ty, q_ty, out_ty, aligned, cfg in variants:
        compiled = _compile_for(kernel, GPUTarget("cuda", arch, 32), x_ty, q_ty, out_ty, aligned, cfg)
        assert compiled.asm.get("cubin"), (arch, x_ty)


def test_report_observed_errors():
    """Not a check: prints the worst error seen per dtype (run with -s)."""
    print("\nmax relative error observed:", {str(k): f"{v:.2e}" for k, v in OBSERVED.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("dtype", [f32, f16, bf16])
@pytest.mark.parametrize("packed,group_size", [(False, 128), (True, 128), (True, 32)])
def test_numerics_cuda_large(M, dtype, packed, group_size):
    N = K = 4096
    args, ref, _ = make_case(M, N, K, group_size, 4, packed, 64, True, dtype, device="cuda")
    check(dg.quant_linear_triton(**args), ref, dtype)


# ---- decode GEMV on bit-packed words (kernels/gemv.py) ---------------------------------------------------------

_GEMV_MODULE = "torchao_eora.kernels.gemv"
with _interpreter_env():
    gv = importlib.import_module(_GEMV_MODULE)
    if not _CUDA and not isinstance(gv._packed_gemv_kernel, triton.runtime.interpreter.InterpretedFunction):
        gv = importlib.reload(gv)

# (M, N, K, group_size, bits, rank, bias, dtype): every packed width, rank 0 / None, group 32 to 256
GEMV_CASES = [
    (1, 40, 256, 64, 4, 5, True, f32),
    (3, 27, 512, 128, 3, 24, False, bf16),   # int3: values 10 and 21 of a chunk straddle two words
    (4, 72, 128, 32, 2, 16, True, f16),
    (2, 40, 512, 256, 3, None, True, f32),
    (1, 25, 256, 32, 3, 0, False, bf16),
]


@pytest.mark.parametrize("M,N,K,group_size,bits,R,bias,dtype", GEMV_CASES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_packed_gemv_matches_fp64_reference(M, N, K, group_size, bits, R, bias, dtype, split_k):
    from torchao_eora.packing import pack_intx

    args, ref, raw = make_case(M, N, K, group_size, bits, False, R, bias, dtype)
    qdata = pack_intx(raw["q"], bits).to(DEVICE)
    y = gv.packed_gemv(args["x"], qdata, bits, args["scale"], args["zero_point"], group_size, args["bias"],
                       args["A"], args["B"], split_k=split_k)
    check(y, ref, dtype)


@pytest.mark.parametrize("M,path", [(2, "gemv"), (5, "tiled"), (130, "prefill")])
def test_cuda_dispatch_by_batch_size(M, path, monkeypatch):
    """Decode of packed weights -> the GEMV, middle sizes -> the tiled kernel, prefill -> dequantize + cuBLAS."""
    from torchao_eora import ops
    from torchao_eora.packing import pack_intx

    args, ref, raw = make_case(M, 40, 256, 64, 3, False, 16, True, bf16)
    calls = []
    for module, name, label in ((gv, "packed_gemv", "gemv"), (dg, "quant_linear_triton", "tiled")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _l=label, **k: calls.append(_l) or _r(*a, **k))
    y = ops.cuda_quant_linear(args["x"], pack_intx(raw["q"], 3).to(DEVICE), args["scale"], args["zero_point"], 64,
                              args["bias"], args["A"], args["B"])
    check(y, ref, bf16)
    assert calls == ([] if path == "prefill" else [path])


def _compiled_module(module):
    """A second copy of ``module`` built with TRITON_INTERPRET unset (the caller unsets it): its kernels and the
    ``@jit`` helpers they call are compilable ``JITFunction``s even where this test run interprets them."""
    import importlib.util

    assert "TRITON_INTERPRET" not in os.environ
    spec = importlib.util.spec_from_file_location(module.__name__ + "_compiled", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def _compile_gemv(bits: int, z_type: str = "*i8"):
    """The shipped decode configuration (bf16 x, group 128, 64 rows a program, 4 warps) compiled for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _compiled_module(gv)._packed_gemv_kernel
    names = kernel.arg_names
    ptrs = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr=z_type, bias_ptr="*bf16", t_ptr="*fp32",
                b_ptr="*bf16", out_ptr="*bf16")
    const = dict(BITS=bits, GROUP_CHUNKS=4, HAS_BIAS=True, HAS_LOWRANK=True, BLOCK_N=64, BLOCK_R=64)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))


def _main_loop(ptx: str) -> list[str]:
    """The instructions of the first loop of the PTX (the K loop): its header label to its back-edge branch."""
    import re

    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)
    label = lines[start].split(":")[0]
    end = next(i for i in range(start + 1, len(lines)) if re.search(rf"bra(\.uni)?\s+{re.escape(label)};", lines[i]))
    return [s for s in (line.strip() for line in lines[start + 1:end + 1]) if s and not s.startswith((".loc", "//"))]


# PTX instructions the K loop may spend per weight (shipped: about 7 for every width; the tiled kernel's decode
# spent about 25 per int4 weight, with one scalar byte load per weight)
MAX_INSTRUCTIONS_PER_WEIGHT = 8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_ptx_loads_packed_words_and_stays_short(bits, tmp_path, monkeypatch):
    """What stops a slow decode kernel from landing unnoticed, without a GPU: for sm_90, packed weights are read
    in 32-bit words (with int32 zero points there is no narrower load left at all; shipped, the only byte loads
    are the int8 zero points, one per group and row), no register spills (ptxas), and the K loop stays under
    ``MAX_INSTRUCTIONS_PER_WEIGHT`` per weight."""
    import re
    import subprocess

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton build without the NVIDIA backend")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    wide_zero = _compile_gemv(bits, "*i32").asm["ptx"]
    assert not re.findall(r"ld\.global(\.\w+)*\.[bsu]8\b", wide_zero)
    shipped = _compile_gemv(bits).asm["ptx"]
    assert re.findall(r"ld\.global(\.v\d)?\.b32", shipped)
    loop = _main_loop(shipped)
    weights_per_thread = 64 * 4 * 32 // (4 * 32)  # BLOCK_N x group values / threads, one group an iteration
    assert len(loop) / weights_per_thread <= MAX_INSTRUCTIONS_PER_WEIGHT, len(loop) / weights_per_thread
    from triton.backends.nvidia.compiler import get_ptxas

    ptx_file = tmp_path / "gemv.ptx"
    ptx_file.write_text(shipped)
    report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o",
                             str(tmp_path / "gemv.cubin")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in report.stderr + report.stdout
