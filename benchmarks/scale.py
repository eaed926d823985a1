"""Memory and time of the sequential job at scale, through the CLI.

    python benchmarks/scale.py --json benchmarks/results/scale_cpu.json     # both measurements below
    python benchmarks/scale.py --only big --calib-samples 16               # the 1.3B model alone

* ``big``: a random Llama of about 1.4B parameters (24 layers, hidden 2048, intermediate 5632, SmolLM2's 49,152-token
  vocabulary), saved once as fp32 safetensors shards in ``--cache-dir`` (5.7 GB) and compressed with the CLI's
  defaults (3-bit g64 RTN + EoRA r192, int4 adapters, shrinkage auto) by ``torchao-eora quantize --model DIR --out
  OUT``, which streams it one decoder layer at a time. Reported: wall time split into forward / moments / compress /
  shrinkage / solve / io, peak RSS of the CLI process against the checkpoint size, bytes written, and the time of
  one bare forward of the decoder stack over the same calibration batches (the model loaded whole, in this
  process).
* ``smollm2``: the bundled SmolLM2-135M at 128 x 512 calibration tokens (in memory: it is a GGUF file), the same
  split, and the time of one bare forward pass over the calibration set: the sequential pass must run each layer
  twice (once to measure it, once compressed to feed the next), so twice that is the floor it is compared with.

Each run is a separate CLI process; its peak RSS is the one the CLI reports (VmHWM of its own address space).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, write_json  # noqa: E402

SIZES = {  # the random Llama of the "big" measurement; "tiny" is the smoke test's (tests/test_benchmarks.py)
    "1.4b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=49152, max_position_embeddings=2048),
    "tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["big", "smollm2"], default=None, help="run one of the two measurements")
    p.add_argument("--size", choices=sorted(SIZES), default="1.4b",
                   help="the random Llama of the big measurement: 1.4b (default) or tiny (2 layers, a smoke test)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "torchao-eora"),
                   help="where the random 1.4B checkpoint is built once and kept (default ~/.cache/torchao-eora)")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration windows of 512 tokens for the big model (default 32)")
    p.add_argument("--calib-batch-size", type=int, default=2,
                   help="windows per forward pass for the big model: bounds the activations held (default 2)")
    p.add_argument("--smollm2-calib-samples", type=int, default=128,
                   help="calibration windows of 512 tokens for SmolLM2 (default 128)")
    p.add_argument("--out-dir", default=None, help="where compressed outputs go (default: a folder in --cache-dir)")
    p.add_argument("--json", default=None, help="write the results (machine and versions included) to this file")
    return p


def build_big_model(directory: Path, size: str = "1.4b") -> Path:
    """The random Llama checkpoint (fp32 shards) and SmolLM2's tokenizer, built once."""
    if (directory / "model.safetensors.index.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchao_eora.data import load_model

    _, tokenizer = load_model(None)  # SmolLM2's tokenizer: real text tokenizes as it would for a real model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False)).eval()
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def run_cli(args: list[str]) -> dict:
    """One ``torchao-eora`` process: wall time, its peak RSS (of the compression, as it reports it), and the phase
    split it prints."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torchao_eora.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"torchao-eora {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    phases = {}
    line = next((x for x in result.stdout.splitlines() if x.startswith("time per phase")), "")
    for name, seconds in re.findall(r"(\w+) ([\d.]+)", line.partition(":")[2]):
        phases[name] = float(seconds)
    # The CLI's own VmHWM: ru_maxrss of a child counts this process's peak at the fork (the model built above).
    peak = re.search(r"peak memory of the compression \(GiB\): ([\d.]+)", result.stdout)
    return {"wall_s": round(wall, 1), "phases_s": phases, "peak_rss_gib": float(peak.group(1)) if peak else None}


def directory_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def measure_big(args) -> dict:
    source = build_big_model(Path(args.cache_dir) / f"random-llama-{args.size}", args.size)
    out = Path(args.out_dir or Path(args.cache_dir) / "out") / f"random-llama-{args.size}-3bit-eora"
    row = run_cli(["quantize", "--model", str(source),
                   "--calib-samples", str(args.calib_samples), "--calib-batch-size", str(args.calib_batch_size),
                   "--eval-tokens", "0", "--tasks", "",
                   "--out", str(out), "--overwrite"])
    checkpoint = directory_bytes(source)
    shape = SIZES[args.size]
    model = (f"random Llama {shape['num_hidden_layers']} x {shape['hidden_size']} / {shape['intermediate_size']}, "
             f"vocab {shape['vocab_size']}")
    row.update({"model": model, "calibration": f"{args.calib_samples} x 512, {args.calib_batch_size} per forward",
                "compression": "3-bit g64 RTN + EoRA r192, int4 adapters, shrinkage auto (CLI defaults)",
                "checkpoint_gib": round(checkpoint / 2**30, 3), "written_gib": round(directory_bytes(out) / 2**30, 3)})
    row["peak_rss_fraction_of_checkpoint"] = round(row["peak_rss_gib"] * 2**30 / checkpoint, 3)
    bare = bare_forward_seconds(args.calib_samples, str(source), args.calib_batch_size)
    work = sum(v for k, v in row["phases_s"].items() if k != "io")
    row.update({"bare_forward_s": round(bare, 1), "calibration_and_compression_s": round(work, 1),
                "ratio_to_two_bare_forwards": round(work / (2 * bare), 2)})
    return row


def bare_forward_seconds(n_samples: int, path: str | None = None, batch_size: int = 8) -> float:
    """One plain forward pass of the decoder stack (SmolLM2's, or the checkpoint at ``path``) over the calibration
    batches (no hooks, no compression, no lm_head, which the sequential pass never runs), in-process."""
    import torch

    from torchao_eora.data import calibration_batches, load_model
    from torchao_eora.pipeline import calibration_texts

    model, tokenizer = load_model(path)
    batches = calibration_batches(tokenizer, calibration_texts("wikipedia"), n_samples, 512, batch_size)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model.model(**batch, use_cache=False)
    return time.perf_counter() - start


def measure_smollm2(args) -> dict:
    out = Path(args.out_dir or Path(args.cache_dir) / "out") / "smollm2-3bit-eora"
    row = run_cli(["quantize", "--bits", "3", "--group-size", "64", "--rank", "64", "--calib-samples",
                   str(args.smollm2_calib_samples), "--eval-tokens", "0", "--tasks", "", "--out", str(out),
                   "--overwrite"])
    bare = bare_forward_seconds(args.smollm2_calib_samples)
    work = sum(v for k, v in row["phases_s"].items() if k != "io")
    row.update({"model": "SmolLM2-135M", "calibration": f"{args.smollm2_calib_samples} x 512",
                "bare_forward_s": round(bare, 1), "written_gib": round(directory_bytes(out) / 2**30, 3),
                "calibration_and_compression_s": round(work, 1),
                "ratio_to_two_bare_forwards": round(work / (2 * bare), 2)})
    return row


def main() -> None:
    args = build_parser().parse_args()
    rows = {}
    if args.only in (None, "big"):
        rows["big"] = measure_big(args)
        print(rows["big"], flush=True)
    if args.only in (None, "smollm2"):
        rows["smollm2"] = measure_smollm2(args)
        print(rows["smollm2"], flush=True)
    if args.json:
        write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
