"""How much of EoRA's error the rounding of its adapters gives back, per way of rounding them.

For the linear modules of a few decoder layers of a real model: the 3-bit g64 RTN error, EoRA's factors for it
(one-shot moments), and the activation-weighted error ``||(dW - B A) X^T||`` the residual leaves with the factors in
full precision, rounded as solved (min/max RTN), with ``B`` re-solved for the rounded ``A``, and quantization-aware
(``adapter_quant.quantize_factors``: rotation, clip search, least-squares rounds). The error is summed in squares
over the modules and printed as its square root, beside the error of the base alone. No perplexity: it is the
screen for what the full job then measures.

    python benchmarks/adapter_quantization.py --json benchmarks/results/adapter_quantization_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from torchao_eora import RTNConfig, calibrate, eora_factors, resolve_B, weighted_error
from torchao_eora.adapter_quant import _quantize, quantize_factors
from torchao_eora.data import calibration_batches, load_model, wikipedia_split
from torchao_eora.solver import LowRankFactors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import environment, write_json  # noqa: E402
from sizes import adapter_spec  # noqa: E402

ADAPTERS = ("int4 g32 r192", "int3 g64 r256")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M)")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27], help="decoder layers (default 3 15 27)")
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), metavar="'intN gG rR'",
                   help="adapter widths, groups and ranks (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows of --seq-len tokens (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    return p.parse_args(argv)


def _spec(text: str) -> tuple[int, int, int]:
    """'intN gG rR' -> (N, G, R), parsed as sizes.py parses it."""
    try:
        spec = adapter_spec(text)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(str(e)) from None
    if "adapter_bits" not in spec:
        raise SystemExit(f"adapter spec {text!r}: use 'intN gG rR', e.g. 'int4 g32 r192'")
    return spec["adapter_bits"], spec["adapter_group_size"], spec["rank"]


def _resolved_only(delta, factors, bits, group, moment) -> LowRankFactors:
    qa = _quantize(factors.A, bits, group, torch.float32).dequantize()
    qb = _quantize(resolve_B(delta, qa, moment), bits, group, torch.float32).dequantize()
    return LowRankFactors(qa, qb)


@torch.no_grad()  # not set_grad_enabled(False): tests run main inside the test process
def main(argv=None) -> int:
    args = parse_args(argv)
    specs = [_spec(a) for a in args.adapters]
    model, tokenizer = load_model(args.model)
    model = model.eval()
    train, _ = wikipedia_split()
    calib = calibrate(model, calibration_batches(tokenizer, train, args.calib_samples, args.seq_len), mode="one-shot",
                      progress=False)
    layers = tuple(f".layers.{i}." for i in args.layers)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(part in f".{n}" for part in layers)]
    ways = ("base alone", "full precision", "as solved", "B re-solved", "quantization-aware")
    rows = []
    for spec, (bits, group, rank) in zip(args.adapters, specs):
        squares = dict.fromkeys(ways, 0.0)
        start = time.perf_counter()
        for name in names:
            weight = model.get_submodule(name).weight.float()
            moment = calib.second_moment(name).mean().float()
            delta = weight - RTNConfig(3, 64).compress(weight).dequantize(torch.float32)
            r = min(rank, min(weight.shape) - 1)
            factors = eora_factors(delta, moment, r - r % group)
            fitted = {
                "base alone": None, "full precision": factors,
                "as solved": quantize_factors(delta, factors, bits, group, moment, resolve=False).dequantize(),
                "B re-solved": _resolved_only(delta, factors, bits, group, moment),
                "quantization-aware": quantize_factors(delta, factors, bits, group, moment).dequantize(),
            }
            for way, f in fitted.items():
                squares[way] += weighted_error(delta, f, moment) ** 2
        row = {"adapters": spec, "modules": len(names), **{w: round(v**0.5, 4) for w, v in squares.items()},
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print("  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    if args.json:
        write_json(args.json, {"environment": environment(), "args": vars(args), "layers": list(args.layers),
                               "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
