"""Quality per byte as vLLM serves the adapter, against our own int4-adapter runtime.

    python benchmarks/served_bytes.py --json benchmarks/results/served_bytes.json

vLLM holds LoRA weights in bf16/fp16 only, at ``--max-lora-rank`` (one of 8, 16, 32, 64, 128, 256, ...), so what it
allocates depends on the rank slot, not on how the adapter was stored. Each row is one ``torchao-eora quantize``
process (3-bit g64 RTN + EoRA, shrinkage auto, sequential calibration) at one rank and adapter format:
full-precision adapters at ranks 64, 128 and 256 (what fills vLLM's slots) and the CLI default, rank 192 with int4
adapters. Every row reports the perplexity the CLI measured, vLLM's bf16 bytes (``peft_io.vllm_lora_allocation``)
and our checkpoint's adapter bytes; full-precision rows are then evaluated again with ``A`` and ``B`` rounded to
bf16 (what vLLM holds), on the same held-out tokens. With ``--json``, rows of models not run this time are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, rows_of_other_models, run_cli, write_json  # noqa: E402
from solver_perplexity import model_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma",
                   help="comma-separated, of smollm2, gemma or model directories (default both)")
    p.add_argument("--ranks", default="64,128,256",
                   help="full-precision adapter ranks, comma-separated (default 64,128,256: vLLM's slot sizes)")
    p.add_argument("--default", default="192:4", metavar="RANK:BITS",
                   help="the int-adapter row, the CLI default (default 192:4)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out perplexity tokens (default 20000)")
    p.add_argument("--json", default=None, help="write the rows (machine and versions included) to this file")
    return p


def round_adapters_to_bf16(model: torch.nn.Module) -> int:
    """Round every full-precision ``A`` and ``B`` to bf16 in place (kept in the model dtype); returns how many."""
    from torchao_eora.tensor import QuantWithLowRank

    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, QuantWithLowRank) and w.adapter_dtype is None and w.A.numel():
            w.A.copy_(w.A.to(torch.bfloat16))
            w.B.copy_(w.B.to(torch.bfloat16))
            count += 1
    return count


def served_row(out: Path, eval_tokens: int, full_precision: bool) -> dict:
    """vLLM's allocation and ours for the checkpoint at ``out``; the bf16-adapter perplexity when ``full_precision``."""
    from torchao_eora import load_pretrained
    from torchao_eora.data import load_tokenizer
    from torchao_eora.peft_io import vllm_lora_allocation
    from torchao_eora.pipeline import evaluate

    model = load_pretrained(out)
    alloc = vllm_lora_allocation(model)
    row = {"max_lora_rank": alloc["max_lora_rank"], "vllm_bf16_mb": alloc["vllm_bf16_bytes"] / 1e6,
           "our_adapter_mb": alloc["our_bytes"] / 1e6}
    if full_precision:
        row["bf16_modules"] = round_adapters_to_bf16(model)
        row["ppl_bf16_adapters"] = evaluate(model, load_tokenizer(out), eval_tokens=eval_tokens, tasks=(),
                                            progress=False)["ppl"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    default_rank, default_bits = map(int, args.default.split(":"))
    configs = [(int(r), None) for r in args.ranks.split(",")] + [(default_rank, default_bits)]
    rows = rows_of_other_models(args.json, models)
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for rank, bits in configs:
                out = Path(tmp) / f"{model}-r{rank}-{bits or 'fp'}"
                argv = ["quantize", *model_flags(model), "--rank", str(rank), "--adapter-bits",
                        str(bits) if bits else "none", "--calib-samples", str(args.calib_samples),
                        "--eval-tokens", str(args.eval_tokens), "--out", str(out)]
                summary, wall = run_cli(argv, Path(tmp) / "summary.json")
                row = {"model": model, "rank": rank, "adapter_bits": bits, "calib_samples": args.calib_samples,
                       "eval_tokens": args.eval_tokens, "ppl": summary["rows"][-1]["ppl"],
                       **served_row(out, args.eval_tokens, bits is None), "wall_s": round(wall, 1),
                       "command": "torchao-eora " + " ".join(a if a != str(out) else "OUT" for a in argv)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})

    return 0


if __name__ == "__main__":
    sys.exit(main())
