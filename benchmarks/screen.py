"""Screen quality options against the CLI default on the same job: one ``torchao-eora quantize`` process per row.

    python benchmarks/screen.py --rows "original=" "RTN=--compensation none" "default=" \\
        "anchored=--target anchored" --json benchmarks/results/screen.json   # SmolLM2, 32 windows, 4,096 tokens
    python benchmarks/screen.py --model gemma --calib-samples 128 --eval-tokens 8192 --tasks lambada \\
        --rows "default=" "anchored=--target anchored" --json benchmarks/results/confirm_gemma.json

Every row runs the CLI's default job (3-bit g64 RTN + EoRA rank 192, int4 adapters, shrinkage auto, sequential
calibration) with the row's extra flags, e.g. ``--target anchored`` or ``--quantizer gptq``; ``NAME=`` alone is the
default; the row named ``original`` evaluates the uncompressed model instead (``torchao-eora eval``), so that with
a ``--compensation none`` row the docs can say which share of the compression's gap each option closes. Each row
records perplexity on the held-out Wikipedia tokens (and the tasks' accuracy), wall time, the phase
split and peak RSS from the CLI's ``--json`` summary. With ``--json``, rows of the same model, name and calibration
size are replaced and all others kept, so a screen can be extended one row at a time and confirmed at another size.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, run_cli, write_json  # noqa: E402
from solver_perplexity import model_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma, or a model directory")
    p.add_argument("--rows", nargs="+", required=True, metavar="NAME=FLAGS",
                   help="one row each: a name and the CLI flags added to the default job (quoted, may be empty)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out perplexity tokens (default 4096)")
    p.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (default none)")
    p.add_argument("--task-limit", type=int, default=500, help="documents per task (default 500)")
    p.add_argument("--json", default=None, help="write the rows (machine and versions included) to this file")
    return p


def parse_row(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--rows: expected NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows_to_run = [parse_row(r) for r in args.rows]
    names = {name for name, _ in rows_to_run}
    tasks = [t for t in args.tasks.split(",") if t]
    rows = []
    if args.json and Path(args.json).exists():
        kept = json.loads(Path(args.json).read_text())
        rows = [r for r in kept["rows"] if not (r["model"] == args.model and r["name"] in names and
                                                r.get("calib_samples", kept["args"]["calib_samples"])
                                                == args.calib_samples)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in rows_to_run:
            argv = ["quantize", *model_flags(args.model), *flags, "--calib-samples", str(args.calib_samples),
                    "--eval-tokens", str(args.eval_tokens)]
            if name == "original":
                argv = ["eval", *model_flags(args.model), *flags, "--eval-tokens", str(args.eval_tokens)]
            argv += ["--tasks", args.tasks, "--task-limit", str(args.task_limit)]  # eval's default tasks: off
            summary, wall = run_cli(argv, Path(tmp) / "summary.json")
            metrics = {k: v for k, v in summary["rows"][-1].items()
                       if k == "ppl" or any(k == t or k.startswith(t + "_") for t in tasks)}
            rows.append({"model": args.model, "name": name, "flags": " ".join(flags),
                         "residual": summary["rows"][-1]["model"],  # the job's config, e.g. its adapters
                         "calib_samples": args.calib_samples, "eval_tokens": args.eval_tokens, **metrics,
                         "wall_s": round(wall, 1),
                         "phases_s": {k: round(v, 1) for k, v in summary.get("phases_s", {}).items()},
                         "peak_rss_gib": summary.get("peak_rss_gib"),
                         "command": "torchao-eora " + shlex.join(argv)})
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})

    return 0


if __name__ == "__main__":
    sys.exit(main())
