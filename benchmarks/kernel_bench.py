"""Kernel timings against the card's limits: copy bandwidth, bf16 cuBLAS, PyTorch's tinygemm (int4) and ours.

    python benchmarks/kernel_bench.py --json gpu_out/kernels.json          # on a CUDA machine (gpu_check.sh)
    python benchmarks/kernel_bench.py --dry-run                            # CPU: tiny shapes, the interpreter

First the measured device-to-device copy rate and a bf16 8192^3 GEMM; then, for one 14336 x 4096 layer (Llama-3-8B's
gate/up) per M in {1, 16, 128, 2048}, int4 and int3 at group 128, residual rank 0 and 64: bf16 cuBLAS (``x @ W^T``),
tinygemm (``aten._weight_int4pack_mm``, int4 only, rank 0) and ours (``ops.cuda_quant_linear``: the packed GEMV at
M <= 4, else the tiled dequantizing GEMM). Every timing is a CUDA-graph replay of ``--copies`` calls, each on its own
copy of the weights, so L2 (50-60 MB) never holds the weight being read. Each row is printed as one JSON line as
soon as it is measured (a timeout keeps the rows before it): ``us``, ``gbps`` and ``pct_copy_bw`` (M = 1),
``tflops`` (M = 2048), ``ratio_to_bf16``, ``ratio_to_tinygemm`` and ``max_rel_err`` against an fp64 reference.

``--dry-run`` runs every path once on tiny shapes on the CPU (the Triton interpreter) to check the script itself;
its times mean nothing and it prints no timing fields.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, interpreter, no timings")
    p.add_argument("--copies", type=int, default=8, help="weight copies a replay rotates through (default 8)")
    p.add_argument("--json", default=None, help="also append every row to this JSON-lines file")
    return p


def emit(row: dict, path: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def graph_us(fn, calls: int, dry: bool) -> float | None:
    """Microseconds per call of ``fn(i)`` for i in 0..calls-1, replayed as one CUDA graph (None on a dry run)."""
    import torch

    if dry:
        for i in range(calls):
            fn(i)
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up: autotuning and lazy allocations happen outside the graph
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    replays = 20
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def main() -> None:
    args = build_parser().parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import torch

    from torchao_eora import ops
    from torchao_eora.packing import pack_intx

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    card = "cpu-dry-run" if dry else torch.cuda.get_device_name()
    N, K, group = (256, 512, 128) if dry else (14336, 4096, 128)
    dtype = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 dot is not a tensor core's
    copies = 2 if dry else args.copies
    g = torch.Generator().manual_seed(0)

    # the card's limits
    size = (1 << 20) if dry else (1 << 30)
    src, dst = torch.empty(size, dtype=torch.uint8, device=device), torch.empty(size, dtype=torch.uint8, device=device)
    us = graph_us(lambda i: dst.copy_(src), 4, dry)
    copy_gbps = None if us is None else 2 * size / us / 1e3
    emit({"device": card, "kernel": "copy", "bytes": size, **({} if us is None else {"us": us, "gbps": copy_gbps})},
         args.json)
    n = 256 if dry else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    us = graph_us(lambda i: a @ b, 4, dry)
    emit({"device": card, "kernel": "bf16 gemm", "shape": [n, n, n],
          **({} if us is None else {"us": us, "tflops": 2 * n**3 / us / 1e6})}, args.json)

    for bits in (4, 3):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
        z = torch.randint(lo, hi + 1, (N, K // group), generator=g, dtype=torch.int8)
        s = (torch.rand(N, K // group, generator=g) + 0.5) / (1 << (bits - 1))
        w = (q.double() - z.double().repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)
        packed = [pack_intx(q, bits).to(device) for _ in range(copies)]
        scales = [s.to(device, dtype) for _ in range(copies)]
        zeros = [z.to(device) for _ in range(copies)]
        dense = [w.to(device, dtype) for _ in range(copies)]
        tiny = tinygemm_weights(q, z, s, group, copies, device) if bits == 4 and not dry else None
        for rank in (0, 64):
            A = (torch.randn(rank, K, generator=g) / K**0.5).to(device, dtype) if rank else None
            B = (torch.randn(N, rank, generator=g) * 0.01).to(device, dtype) if rank else None
            for M in ((1, 16) if dry else (1, 16, 128, 2048)):
                x = torch.randn(M, K, generator=g).to(device, dtype)
                ref = x.double().cpu() @ w.T
                if rank:
                    ref += (x.double().cpu() @ A.double().cpu().T) @ B.double().cpu().T
                def bf16(i):
                    y = x @ dense[i].T
                    return y if not rank else torch.addmm(y, x @ A.T, B.T)

                rows = {"bf16": (graph_us(bf16, copies, dry), bf16(0))}
                if tiny is not None and not rank:
                    packed4, sz = tiny
                    call = lambda i: torch.ops.aten._weight_int4pack_mm(x, packed4[i], group, sz[i])  # noqa: E731
                    rows["tinygemm"] = graph_us(call, copies, dry), call(0)
                call = lambda i: ops.cuda_quant_linear(x, packed[i], scales[i], zeros[i], group, None, A, B)  # noqa
                rows["ours"] = graph_us(call, copies, dry), call(0)
                weight_bytes = packed[0].numel() + 2 * scales[0].numel() + zeros[0].numel()
                for kernel, (us, y) in rows.items():
                    row = {"device": card, "kernel": kernel, "bits": 16 if kernel == "bf16" else bits, "M": M,
                           "N": N, "K": K, "group": group, "rank": rank, "max_rel_err": rel_err(y.cpu(), ref)}
                    if us is not None:
                        read = 2 * N * K if kernel == "bf16" else weight_bytes
                        row.update(us=us, ratio_to_bf16=us / rows["bf16"][0])
                        if "tinygemm" in rows:
                            row["ratio_to_tinygemm"] = us / rows["tinygemm"][0]
                        if M == 1:
                            row.update(gbps=read / us / 1e3, pct_copy_bw=100 * read / us / 1e3 / copy_gbps)
                        if M == 2048:
                            row["tflops"] = 2 * M * N * K / us / 1e6
                    emit(row, args.json)


def tinygemm_weights(q, z, s, group: int, copies: int, device):
    """Our int4 (q - z) * s in tinygemm's layout: unsigned nibbles q + 8 (even column in the high nibble before
    ``_convert_weight_to_int4pack``) and bf16 (scale, zero) pairs with ``w = (u - 8) * scale + zero``, so
    ``zero = -z * scale``."""
    import torch

    u = (q.to(torch.int32) + 8).to(device)
    u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    sz = torch.stack([s, -z.float() * s], dim=-1).transpose(0, 1).contiguous().to(device, torch.bfloat16)
    return [packed.clone() for _ in range(copies)], [sz.clone() for _ in range(copies)]


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"kernel_bench: {time.time() - start:.0f} s", file=sys.stderr)
