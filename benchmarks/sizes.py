"""Checkpoint sizes with bit-packed intN storage: safetensors bytes of SmolLM2-135M (bf16) compressed with RTN at
2, 3 and 4 bits (group size 64) and adapters given as ``none``, ``bf16 rR`` or ``intN gG rR`` (N bits in groups of
G values, rank R; default: none, bf16 r64 and int4 g32 at ranks 64, 192 and 256).

Compensation is plain SVD (``compensation="svd"``, data-free): the bytes do not depend on the solver, only on the
shapes and bit widths, so no calibration and no perplexity is run. Every decoder linear is compressed; the
embeddings (tied to lm_head) and norms stay bf16. Each model is saved with ``save_pretrained`` into a temporary
directory and the ``*.safetensors`` files are measured (the header included), beside the unquantized bf16 model
saved the same way. ``int8_containers_bytes`` is what the same tensors took before bit packing (every intN value in
its own int8), computed from the packed model's fields.

    python benchmarks/sizes.py --adapters none "bf16 r64" "int4 g32 r64" "int4 g32 r192" \\
        --json benchmarks/results/sizes_smollm2.json
    python benchmarks/sizes.py --bits 2 3 --adapters "int4 g32 r192" "int4 g32 r256" \\
        --json benchmarks/results/sizes_smollm2_r256.json
    python benchmarks/sizes.py --bits 3 --adapters "int4 g32 r192" "int3 g64 r256" "int3 g32 r224" "int2 g64 r384" \\
        --json benchmarks/results/sizes_smollm2_adapter_widths.json
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchao.quantization import quantize_

from torchao_eora import EoRAConfig, QuantWithLowRank, RTNConfig, model_bytes, save_pretrained
from torchao_eora.data import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import environment, write_json  # noqa: E402

DEFAULT_ADAPTERS = ["none", "bf16 r64", "int4 g32 r64", "int4 g32 r192", "int4 g32 r256"]


def adapter_spec(text: str) -> dict:
    """``none``, ``bf16 rR`` or ``intN gG rR`` -> EoRAConfig keyword arguments."""
    if text == "none":
        return dict(compensation="none")
    match = re.fullmatch(r"(?:bf16|int([2-8]) g(\d+)) r(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"adapter spec {text!r}: use none, 'bf16 rR' or 'intN gG rR' (N in 2..8)")
    bits, group, rank = match.groups()
    quantized = dict(adapter_bits=int(bits), adapter_group_size=int(group)) if bits else {}
    return dict(rank=int(rank), compensation="svd", **quantized)


def _checked_spec(text: str) -> str:
    adapter_spec(text)  # argparse turns its error into a one-line usage message
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2-135M)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="base RTN bit widths (default 2 3 4)")
    p.add_argument("--group-size", type=int, default=64, help="base RTN group size (default 64)")
    p.add_argument("--adapters", nargs="+", default=DEFAULT_ADAPTERS, type=_checked_spec, metavar="SPEC",
                   help="adapter variants: none, 'bf16 rR' or 'intN gG rR' (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON (rewritten after each row)")
    return p.parse_args(argv)


def _decoder_linears(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"


def safetensors_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def int8_container_bytes(model: torch.nn.Module, stored: int) -> int:
    """``stored`` as it was before bit packing: every packed field at one byte a value."""
    extra = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantWithLowRank):
            extra += sum(weight.values(n).numel() - getattr(weight, n).numel() for n in weight.fields
                         if weight.is_packed(n))
    return stored + extra


def measure(model: torch.nn.Module, save, label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="eora-sizes-") as tmp:
        out = Path(tmp) / "model"
        save(out)
        on_disk = safetensors_bytes(out)
    sizes = model_bytes(model)
    return {"variant": label, "safetensors_bytes": on_disk, "stored_bytes": sizes["stored"],
            "packed_bytes": sizes["packed"], "int8_containers_bytes": int8_container_bytes(model, sizes["stored"]),
            "base_bytes": sizes["base"], "adapter_bytes": sizes["adapters"], "other_bytes": sizes["other"]}


@torch.no_grad()  # not set_grad_enabled(False): tests run main inside the test process
def main(argv=None) -> int:
    args = parse_args(argv)
    specs = {name: adapter_spec(name) for name in args.adapters}
    original, _ = load_model(args.model)
    original = original.to(torch.bfloat16).eval()
    meta = {"environment": environment(), "args": vars(args), "model": args.model or "SmolLM2-135M (bundled)"}
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        ref = rows[0]["safetensors_bytes"]
        print(f"{row['variant']:<28} {row['safetensors_bytes']:>12,} B  {row['safetensors_bytes'] / ref:6.3f}x bf16  "
              f"(stored {row['stored_bytes']:,}, packed {row['packed_bytes']:,}, "
              f"int8 containers {row['int8_containers_bytes']:,})", flush=True)
        if args.json:
            write_json(args.json, {**meta, "rows": rows})

    start = time.perf_counter()
    plain = copy.deepcopy(original)  # transformers refuses to save a model it loaded from GGUF: forget that
    plain.hf_quantizer = None
    if getattr(plain.config, "quantization_config", None) is not None:
        del plain.config.quantization_config
    emit(measure(plain, lambda out: plain.save_pretrained(out, safe_serialization=True), "bf16 original"))
    del plain
    for bits in args.bits:
        for name in args.adapters:
            config = EoRAConfig(base=RTNConfig(bits, args.group_size), **specs[name])
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            quantize_(model, config, filter_fn=_decoder_linears)
            row = measure(model, lambda out: save_pretrained(model, out, config), f"RTN int{bits} g{args.group_size}, "
                          f"adapters {name}")
            row.update(bits=bits, group_size=args.group_size, adapters=name, seconds=round(time.perf_counter() - t0, 1))
            emit(row)
            del model
    if args.json:
        write_json(args.json, {**meta, "rows": rows, "total_s": round(time.perf_counter() - start, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
