"""Fine-tuning the adapters of a compressed model from three starting points, with the same budget for each.

    python benchmarks/finetune.py --quick                   # smoke run: a few steps, a few minutes
    python benchmarks/finetune.py --json benchmarks/results/finetune_3bit_r64.json \\
                                  --plot benchmarks/results/finetune_3bit_r64.png

The EoRA paper (arXiv 2410.21271) fine-tunes the adapters on top of the frozen compressed model and finds EoRA a
better starting point than QLoRA's default initialisation and LoftQ (3-bit GPTQ LLaMA3-8B, ARC-C: QLoRA 30.3,
LoftQ 44.7, EoRA 47.4). This reproduces the comparison on the bundled SmolLM2-135M, 3-bit group-64 RTN base:

* ``lora``: QLoRA / PEFT default: A Kaiming-uniform (a = sqrt(5)), B = 0; the model starts as the base alone.
* ``svd``: plain truncated SVD of ``W - W_c`` (LoftQ with one alternating step is exactly this).
* ``eora``: EoRA, from calibration statistics of the training text (sequential calibration).

Every start has the same compressed base, rank, data (the same windows in the same order), optimizer (AdamW, no
weight decay), learning-rate schedule and number of steps. Only ``lora_A`` / ``lora_B`` are trained
(``torchao_eora.finetune.make_trainable``); the base stays 3-bit. Training text: the Wikipedia articles the
evaluation never sees (or BBC News); held-out perplexity: the other Wikipedia articles, before and after.
After training the adapters are folded back into ``QuantWithLowRank`` weights (``fold_adapters``) and the
"after" perplexity is measured on that folded model, i.e. on what ``save_pretrained`` would write.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm.auto import tqdm

from torchao_eora import EoRAConfig, RTNConfig
from torchao_eora.data import calibration_batches, load_model, token_stream, wikipedia_split
from torchao_eora.eval import perplexity
from torchao_eora.finetune import fold_adapters, make_trainable
from torchao_eora.pipeline import Timer, calibration_texts, compress_model
from torchao_eora.report import format_table

from results_io import environment, write_json  # benchmarks/ is on sys.path when run as a script

INITS = ("lora", "svd", "eora")
LABELS = {"lora": "QLoRA init (Kaiming A, B = 0)", "svd": "SVD init (LoftQ, 1 iter)", "eora": "EoRA init"}
METHOD = {"lora": "none", "svd": "svd", "eora": "eora"}  # the EoRAConfig method that builds each start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the bundled SmolLM2-135M, fp32)")
    p.add_argument("--bits", type=int, default=3, help="RTN bit width of the frozen base (default 3)")
    p.add_argument("--group-size", type=int, default=64, help="RTN group size (default 64)")
    p.add_argument("--rank", type=int, default=64, help="adapter rank, the same for every start (default 64)")
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS,
                   help="starting points to train (default: lora svd eora): lora = QLoRA default (A Kaiming, B = 0), "
                        "svd = truncated SVD of W - W_c (LoftQ, one iteration), eora = EoRA")
    p.add_argument("--train-source", default="wikipedia", choices=["wikipedia", "bbc"],
                   help="training text, also EoRA's calibration text (default: the Wikipedia articles disjoint from "
                        "the evaluation ones; bbc: BBC News)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per start (default 150)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per step (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="training window length in tokens (default 128)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate, the same for every start (default 2e-4)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default: 10%% of --steps); then cosine decay to 10%% of --lr")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning rate after warm-up (default cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (default 0: decay would pull the SVD/EoRA factors towards the bare base)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip, 0 for none (default 1.0)")
    p.add_argument("--calib-samples", type=int, default=16, help="EoRA calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="EoRA calibration window length (default 512)")
    p.add_argument("--calib-mode", default="sequential", choices=["sequential", "one-shot"],
                   help="EoRA calibration mode (default sequential)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out Wikipedia perplexity tokens (default 4096)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--no-fp-baseline", action="store_true", help="skip the fp32 (uncompressed) perplexity row")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train through torch.compile (default on: ~1.7x faster steps on CPU after a one-off compile "
                        "of a few minutes, counted in the reported training time; --no-compile for eager)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs 1 can be faster)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order and the Kaiming init (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 steps, 2 calibration windows of 128, 512 eval tokens, eager, no fp row")
    p.add_argument("--json", default=None, metavar="PATH", help="write settings, rows and loss curves as JSON "
                   "(rewritten after each start)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG: training-loss curves, and held-out perplexity "
                   "before / after (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.calib_samples, args.calib_seq_len, args.eval_tokens = 6, 2, 128, 512
        args.compile, args.no_fp_baseline = False, True
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    return args


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to 1, then constant or cosine down to 0.1 at the last step."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup) / max(1, args.steps - args.warmup - 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(rows: list[dict], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    window = max(1, min(10, args.steps // 10))
    for r, color in zip(rows, ("tab:gray", "tab:blue", "tab:red")):
        steps = range(1, len(r["losses"]) + 1)
        ax.plot(steps, r["losses"], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(r["losses"], window), color=color, linewidth=2, label=LABELS[r["init"]])
        bx.plot([0, r["steps"]], [r["ppl_before"], r["ppl_after"]], marker="o", color=color, label=LABELS[r["init"]])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (thin: per step; thick: mean of {window})")
    name = Path(args.model).name if args.model else "SmolLM2-135M"
    ax.set_title(f"{name}, {args.bits}-bit g{args.group_size} RTN base, rank {args.rank}, "
                 f"{args.batch_size}x{args.seq_len} tokens/step, lr {args.lr:g}", fontsize=9)
    ax.legend(fontsize=8)
    fp = rows[0].get("ppl_fp32")
    if fp:
        bx.axhline(fp, color="black", linewidth=1, linestyle=":", label="fp32")
    bx.set_xlabel("step")
    bx.set_ylabel(f"held-out Wikipedia perplexity ({args.eval_tokens} tokens)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train(model, batches, params, args, desc: str) -> tuple[list[float], float]:
    """AdamW over ``params`` on ``batches`` (one step each); returns per-step losses and the seconds spent."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    step_fn = torch.compile(model) if args.compile else model
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc)
    for batch in bar:
        loss = step_fn(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: non-finite loss at step {len(losses)}")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    original, tokenizer = load_model(args.model)
    meta = {"environment": environment(), "args": vars(args)}

    texts = calibration_texts(args.train_source)
    # One fixed list of windows, in one order, for every start (seed + 1: not the calibration windows' draw).
    batches = calibration_batches(tokenizer, texts, args.steps * args.batch_size, args.seq_len, args.batch_size,
                                  seed=args.seed + 1)
    eval_tokens = token_stream(tokenizer, wikipedia_split()[1])

    def ppl(model) -> float:
        return perplexity(model, eval_tokens, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)

    fp_ppl = None if args.no_fp_baseline else ppl(original)
    rows: list[dict] = []
    for init in args.inits:
        timer = Timer()
        model = copy.deepcopy(original)
        config = EoRAConfig(rank=args.rank, base=RTNConfig(args.bits, args.group_size), compensation=METHOD[init])
        compress_model(model, tokenizer, config, source=args.train_source, n_samples=args.calib_samples,
                 seq_len=args.calib_seq_len, mode=args.calib_mode, timer=timer)
        generator = torch.Generator().manual_seed(args.seed)
        params = make_trainable(model, init="lora", rank=args.rank, generator=generator) if init == "lora" \
            else make_trainable(model)
        with timer("evaluate"):
            before = ppl(model)
        print(f"{LABELS[init]}: held-out perplexity before fine-tuning {before:.2f}", flush=True)
        losses, train_s = train(model, batches, params, args, desc=f"fine-tuning from {init}")
        fold_adapters(model)  # measure what would be saved: QuantWithLowRank weights with the trained residual
        with timer("evaluate"):
            after = ppl(model)
        tail = max(1, min(10, args.steps // 5))
        row = {
            "init": init, "label": LABELS[init], "steps": args.steps, "ppl_fp32": fp_ppl,
            "ppl_before": round(before, 3), "ppl_after": round(after, 3),
            "train_loss_first": round(sum(losses[:tail]) / tail, 4),
            "train_loss_final": round(sum(losses[-tail:]) / tail, 4),
            "train_s": round(train_s, 1), "s_per_step": round(train_s / args.steps, 2),
            **{f"{k}_s": round(v, 1) for k, v in timer.seconds.items()},
            "losses": [round(x, 5) for x in losses],
        }
        rows.append(row)
        print(f"{LABELS[init]}: perplexity {before:.2f} -> {after:.2f}, training loss (mean of {tail}) "
              f"{row['train_loss_first']:.3f} -> {row['train_loss_final']:.3f}, {train_s:.0f} s", flush=True)
        if args.json:
            write_json(args.json, {**meta, "rows": rows, "total_s": round(time.perf_counter() - start, 1)})
        del model, params

    total = time.perf_counter() - start
    if args.json:
        write_json(args.json, {**meta, "rows": rows, "total_s": round(total, 1)})
    tail = max(1, min(10, args.steps // 5))
    columns = ["start", "ppl before", "ppl after", f"train loss first {tail}", f"train loss last {tail}", "s/step"]
    table = [{"start": r["label"], "ppl before": r["ppl_before"], "ppl after": r["ppl_after"],
              f"train loss first {tail}": r["train_loss_first"], f"train loss last {tail}": r["train_loss_final"],
              "s/step": r["s_per_step"]} for r in rows]
    print("\n" + format_table(table, columns, markdown=True))
    if args.compile:
        print("s/step: training seconds / steps, including the first step's one-off torch.compile")
    print(f"\n{meta['environment']}; {args.bits}-bit g{args.group_size} RTN base, rank {args.rank}; {args.steps} "
          f"steps x {args.batch_size}x{args.seq_len} tokens of {args.train_source} per start, AdamW lr {args.lr:g} "
          f"({args.schedule}, {args.warmup} warm-up steps); EoRA calibration {args.calib_samples}x{args.calib_seq_len} "
          f"({args.calib_mode}); perplexity on {args.eval_tokens} held-out Wikipedia tokens"
          + (f" (fp32: {fp_ppl:.2f})" if fp_ppl else "") + f"; {total:.0f} s")
    if args.plot:
        plot(rows, args, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
