#!/bin/bash
# On a CUDA machine: the kernel tests, then benchmarks/speed.py (SmolLM2 quick rows + decode, Llama-3-8B layers).
# Logs and JSON go to ${OUT:-gpu_out}; each step has its own time limit so one slow step cannot eat the others.
# Needs torch (CUDA), triton, transformers, torchao, pytest and this package importable (pip install -e . or
# PYTHONPATH to an installed copy). Run from the repository root. Measured with it: README "Speed", H200 rows.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { local limit=$1; shift; local t=$(date +%s); timeout "$limit" "$@"; echo "[$(( $(date +%s) - t )) s] $*"; }
# -P: the repository root (its torchao_eora/ without kernels/, and kernels/ itself) must not shadow the package
step 300 python3 -P -m pytest -q -p no:cacheprovider -k "not on_cpu" tests/test_kernels.py tests/test_inductor_pass.py \
  > "$OUT/pytest_kernels.log" 2>&1; tail -5 "$OUT/pytest_kernels.log"
cd benchmarks
step 400 python3 speed.py --quick --random-weights --new-tokens 64 --json "$OUT/speed_gpu_quick.json" > "$OUT/speed_quick.log" 2>&1
step 200 python3 speed.py --models llama3-8b --no-decode --json "$OUT/speed_gpu_llama3_layers.json" \
  > "$OUT/speed_llama3.log" 2>&1
grep -h "^|" "$OUT/speed_quick.log" "$OUT/speed_llama3.log"
