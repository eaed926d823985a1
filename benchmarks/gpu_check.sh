#!/bin/bash
# One short run on a CUDA machine (under 9 minutes), most important first; JSON lines as it goes, so a timeout keeps
# what was measured. Dry-run the kernel part on a CPU with `python benchmarks/kernel_bench.py --dry-run`.
#   1. kernel_bench.py: copy bandwidth, bf16 GEMM, then bf16 cuBLAS / tinygemm / ours per M, int4 and int3, r 0 / 64
#   2. the kernel tests on the GPU (numerics of every path, compiled); output weighting's layer-by-layer backward
#   3. the streaming CLI on the GPU: the random 1.43B Llama of scale.py, 8 calibration windows (time, peak memory)
#   4. speed.py: Llama-3-8B-shaped layers, eager vs compiled
# Needs torch (CUDA), triton, transformers, torchao, pytest and this package importable (pip install -e . or
# PYTHONPATH to an installed copy). Run from the repository root. Logs and JSON go to ${OUT:-gpu_out}.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { local limit=$1; shift; local t=$(date +%s); timeout "$limit" "$@"; echo "[$(( $(date +%s) - t )) s] $*"; }
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null || echo gpu)
step 180 python3 -P benchmarks/kernel_bench.py --json "$OUT/gpu_check_$CARD.json" 2> "$OUT/kernel_bench.log"
# -P: the repository root (its torchao_eora/ without kernels/, and kernels/ itself) must not shadow the package
step 150 python3 -P -m pytest -q -p no:cacheprovider -k "not on_cpu" tests/test_kernels.py tests/test_inductor_pass.py \
  > "$OUT/pytest_kernels.log" 2>&1; tail -3 "$OUT/pytest_kernels.log"
step 60 python3 -P -m pytest -q -p no:cacheprovider -k cuda tests/test_output_weights.py > "$OUT/pytest_gradients.log" \
  2>&1; tail -3 "$OUT/pytest_gradients.log"
step 150 python3 -P benchmarks/scale.py --only big --calib-samples 8 --cache-dir "$OUT/cache" \
  --json "$OUT/scale_$CARD.json" > "$OUT/scale.log" 2>&1; tail -2 "$OUT/scale.log"; rm -rf "$OUT/cache"
cd benchmarks
step 80 python3 speed.py --models llama3-8b --no-decode --json "$OUT/speed_gpu_llama3_layers.json" \
  > "$OUT/speed_llama3.log" 2>&1
grep -h "^|" "$OUT/speed_llama3.log"
