"""Serve an exported EoRA model with vLLM (offline mode): stock base + PEFT LoRA adapter, greedy decoding, compared
token by token with our own greedy continuations (``vllm_reference.py``). Must not import torchao_eora.

Run with the vLLM venv (a separate one: vllm pins its own torch):

    VLLM_CPU_KVCACHE_SPACE=1 /work/venv-vllm/bin/python benchmarks/vllm_serve.py --ref /tmp/vllm_eora \
        --adapter adapter --json benchmarks/results/vllm_cpu.json

``--adapter`` is a directory under ``--ref`` holding the adapter and its base in ``base/``. Each run appends (or
replaces) its entry, keyed by the adapter, in ``--json``: versions, success or the exact error, tokens matched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

# torchao_eora is never imported: only stock vLLM / transformers / torchao load the export.
# torchvision 0.28.0 and torchaudio 2.11.1 in the vLLM venv do not import with its torch 2.13.0+cpu ("operator
# torchvision::nms does not exist", "Could not load this library: .../_torchaudio.so"); a text-only model needs
# neither, so make them look absent (transformers then skips its image / audio parts), here and, through a
# sitecustomize on PYTHONPATH, in the processes vLLM starts (model inspection, engine core).
_BLOCKED = ["torchao_eora"]
if os.environ.get("VLLM_SERVE_KEEP_MEDIA") != "1":
    _BLOCKED += ["torchvision", "torchaudio", "torchcodec"]
for _name in _BLOCKED:
    sys.modules[_name] = None
_site = Path(tempfile.mkdtemp(prefix="vllm_serve_site_"))
(_site / "sitecustomize.py").write_text(f"import sys\nfor _n in {_BLOCKED!r}:\n    sys.modules[_n] = None\n")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_site), os.environ.get("PYTHONPATH")) if p)


def _versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for name in ("vllm", "torch", "transformers", "peft", "torchao"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - record what is missing
            out[name] = f"not importable: {type(e).__name__}: {e}"
    return out


def _agreement(ours: list[int], theirs: list[int]) -> dict:
    prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    same = sum(a == b for a, b in zip(ours, theirs))
    return {"common_prefix": prefix, "positions_equal": same, "of": len(ours), "identical": ours == theirs}


def run(ref_dir: Path, adapter: str, dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    reference = json.loads((ref_dir / "reference.json").read_text())
    adapter_dir = ref_dir / adapter
    base_dir = adapter_dir / "base"
    rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    llm = LLM(model=str(base_dir), enable_lora=True, max_lora_rank=rank, max_loras=1, dtype=dtype,
              enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=reference["max_new_tokens"], ignore_eos=True)
    rows = reference["results"]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in rows]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=LoRARequest("eora", 1, str(adapter_dir)))
    seconds = time.perf_counter() - start
    base_outs = llm.generate(prompts, params)  # the base alone: shows the adapter was applied
    results = []
    for r, o, b in zip(rows, outs, base_outs):
        theirs = list(o.outputs[0].token_ids)
        results.append({"prompt": r["prompt"], "ours": r["text"], "vllm": o.outputs[0].text,
                        **_agreement(r["token_ids"], theirs),
                        "base_only_positions_equal": _agreement(r["token_ids"], list(b.outputs[0].token_ids))[
                            "positions_equal"]})
    total = sum(x["positions_equal"] for x in results)
    return {"status": "ok", "generate_seconds_with_lora": round(seconds, 2), "tokens_equal": total,
            "tokens_total": sum(x["of"] for x in results),
            "prompts_identical": sum(x["identical"] for x in results), "prompts": len(results), "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="directory written by vllm_reference.py")
    p.add_argument("--adapter", default="adapter", help="adapter directory under --ref (its base in base/)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="results file to add this run to")
    args = p.parse_args()
    ref = Path(args.ref).resolve()
    json_path = Path(args.json).resolve() if args.json else None
    # vLLM inspects the model in `python -m` subprocesses, which put the working directory on sys.path: from this
    # repository's root our kernels/ folder would shadow Hugging Face's `kernels` ("No module named 'kernels'").
    os.chdir(_site)
    base_config = json.loads((ref / args.adapter / "base" / "config.json").read_text())
    entry = {
        "adapter": args.adapter,
        "base_format": "torchao" if "quantization_config" in base_config else "dense",
        "dtype": args.dtype,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "versions": _versions(),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    try:
        entry.update(run(ref, args.adapter, args.dtype))
    except BaseException as e:  # noqa: BLE001 - the point is to record the exact failure
        lines = traceback.format_exception(e)
        entry.update({"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[:20],
                      "traceback_tail": "".join(lines[-6:]).splitlines()[-40:]})
    print(json.dumps({k: v for k, v in entry.items() if k != "results"}, indent=2))
    for r in entry.get("results", []):
        print(f"{r['prompt']!r}: {r['positions_equal']}/{r['of']} equal, prefix {r['common_prefix']}\n"
              f"  ours: {r['ours']!r}\n  vllm: {r['vllm']!r}")
    if json_path:
        path = json_path
        data = json.loads(path.read_text()) if path.exists() else {"runs": []}
        data["runs"] = [r for r in data["runs"] if r.get("adapter") != args.adapter] + [entry]
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
