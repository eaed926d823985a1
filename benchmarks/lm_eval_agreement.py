"""lm-evaluation-harness next to our own zero-shot scoring, on SmolLM2-135M compressed with 3-bit g64 RTN + EoRA r64.

piqa and arc_easy, the first ``--limit`` validation documents, through lm-eval's two routes:

  checkpoint: python -m torchao_eora.lm_eval --model hf --model_args pretrained=CKPT --tasks piqa_offline,...
  peft:       python -m torchao_eora.lm_eval --model hf --model_args pretrained=ADAPTER/base,peft=ADAPTER ...

and two numbers of ours on the same documents:

* ``ours_same_requests``: ``torchao_eora.eval.loglikelihoods`` of lm-eval's own (context, continuation) requests,
  turned into acc / acc_norm as lm-eval does (acc_norm: log-likelihood per character of the choice). The same
  measurement through our code: it must match lm-eval's per-request log-likelihoods.
* ``ours_zero_shot``: ``torchao_eora.eval.zero_shot``, what our CLI reports: OLMo's pre-rendered prompts (piqa
  says "Goal:" where lm-eval says "Question:"; arc_easy's prompt is the same) and acc_norm per character of the
  continuation with its leading space.

    python benchmarks/lm_eval_agreement.py --limit 50 --json benchmarks/results/lm_eval_smollm2.json
    (or --checkpoint DIR, written by `torchao-eora quantize --rank 64 --adapter-bits none --calib-samples 16`)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import environment, write_json  # noqa: E402

TASKS = {"piqa_offline": "piqa", "arc_easy_offline": "arc_easy"}  # lm-eval task -> our task


def compress(out: Path, calib_samples: int, seq_len: int = 512, checkpoint: Path | None = None,
             shrinkage: str | float = "auto") -> tuple:
    """SmolLM2 with 3-bit g64 RTN + EoRA r64 (adapters in fp32), saved to ``out/ckpt`` (or ``checkpoint``, already
    written by ``torchao-eora quantize``, loaded instead) and exported (stock torchao base + PEFT adapter) to
    ``out/adapter``; returns ``(model, tokenizer, checkpoint_dir, adapter_dir)``."""
    from torchao_eora import EoRAConfig, RTNConfig, save_pretrained
    from torchao_eora.data import load_model
    from torchao_eora.peft_io import export_peft
    from torchao_eora.pipeline import compress_model

    model, tokenizer = load_model(None if checkpoint is None else str(checkpoint))
    if checkpoint is None:
        config = EoRAConfig(rank=64, base=RTNConfig(bits=3, group_size=64), shrinkage=shrinkage)
        compress_model(model, tokenizer, config, n_samples=calib_samples, seq_len=seq_len, progress=False)
        checkpoint = save_pretrained(model, out / "ckpt", config, tokenizer)
    adapter = export_peft(model, out / "adapter", tokenizer=tokenizer)
    return model, tokenizer, Path(checkpoint), Path(adapter)


def run_lm_eval(model_args: str, limit: int, out: Path) -> dict[str, dict]:
    """Our lm-eval command line in this process; per task: acc, acc_norm and the logged requests."""
    from torchao_eora.lm_eval import main

    main(["--model", "hf", "--model_args", f"{model_args},dtype=float32", "--device", "cpu", "--batch_size", "16",
          "--tasks", ",".join(TASKS), "--limit", str(limit), "--output_path", str(out), "--log_samples"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    tasks = {}
    for task in TASKS:
        samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        tasks[task] = {
            "acc": results[task]["acc,none"], "acc_norm": results[task]["acc_norm,none"],
            "pairs": [[(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] for s in samples],
            "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "gold": [int(s["target"]) for s in samples],
        }
    return tasks


def ours_on_requests(model, tokenizer, logged: dict) -> dict:
    """Our log-likelihoods of lm-eval's requests, scored as lm-eval scores them."""
    from torchao_eora.eval import loglikelihoods

    flat = [pair for pairs in logged["pairs"] for pair in pairs]
    scores = iter(s for s, _ in loglikelihoods(model, tokenizer, flat, progress=False))
    acc = acc_norm = 0
    max_diff = 0.0
    for pairs, theirs, gold in zip(logged["pairs"], logged["lls"], logged["gold"]):
        lls = [next(scores) for _ in pairs]
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lls, theirs)))
        per_char = [ll / len(cont.removeprefix(" ")) for ll, (_, cont) in zip(lls, pairs)]  # lm-eval: len(choice)
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        acc_norm += max(range(len(lls)), key=per_char.__getitem__) == gold
    n = len(logged["gold"])
    return {"acc": acc / n, "acc_norm": acc_norm / n, "max_abs_loglikelihood_diff": max_diff}


def measure(out: Path, limit: int = 50, calib_samples: int = 16, seq_len: int = 512,
            checkpoint: Path | None = None, shrinkage: str | float = "auto") -> dict:
    """Every number of the comparison, per task: lm-eval per route, ours on its requests, our zero-shot."""
    from torchao_eora.eval import load_task_requests, zero_shot

    start = time.perf_counter()
    model, tokenizer, ckpt, adapter = compress(out, calib_samples, seq_len, checkpoint, shrinkage)
    routes = {"checkpoint": f"pretrained={ckpt}", "peft": f"pretrained={adapter / 'base'},peft={adapter}"}
    logged = {route: run_lm_eval(args, limit, out / f"lm_eval_{route}") for route, args in routes.items()}
    ours = zero_shot(model, tokenizer, tasks=tuple(TASKS.values()), limit=limit, progress=False)
    rows = {}
    for task, our_task in TASKS.items():
        rows[our_task] = {
            **{f"lm_eval_{route}": {k: logged[route][task][k] for k in ("acc", "acc_norm")} for route in routes},
            "ours_same_requests": ours_on_requests(model, tokenizer, logged["checkpoint"][task]),
            "ours_zero_shot": {"acc": ours[our_task], "acc_norm": ours[f"{our_task}_norm"]},
            "docs": len(logged["checkpoint"][task]["gold"]),
            # the same documents in the same order: every choice's text (prompts differ, choices do not)
            "same_documents": [[c.strip() for c in d.continuations] for d in load_task_requests(our_task, limit)]
            == [[c.strip() for _, c in pairs] for pairs in logged["checkpoint"][task]["pairs"]],
        }
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="documents per task (default 50)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="score this checkpoint instead of compressing (the same config: torchao-eora quantize --rank 64 "
                        "--adapter-bits none --calib-samples 16 --out DIR)")
    p.add_argument("--work-dir", default="lm_eval_work", help="checkpoint, adapter and lm-eval outputs")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    measured = measure(Path(args.work_dir), args.limit, args.calib_samples, checkpoint=args.checkpoint)
    settings = {k: v if v is None or isinstance(v, int) else str(v) for k, v in vars(args).items()}  # JSON-safe
    result = {"environment": environment(), "args": settings, **measured}
    print(json.dumps(result["rows"], indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
