#!/usr/bin/env bash
# One prepared GPU check (<= 10 minutes, installs nothing): the config sweep (writes OUT_DIR/configs.json: copy it
# to kernels/configs.json and commit it), copy bandwidth, fused-vs-reference correctness at the shapes of record,
# and the kernel timings table (with the swept configs). Usage, from the repo root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/)
# The table is printed last and written to OUT_DIR/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks}}"
# Import the package from this tree without installing it (kernels/ is dearkd_fast.kernels).
stage=$(mktemp -d)
cp -r dearkd_fast "$stage/" && rm -rf "$stage/dearkd_fast/kernels" && cp -r kernels "$stage/dearkd_fast/kernels"
export PYTHONPATH="$stage:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
mkdir -p "$out"
DEARKD_SWEEP_BUDGET="${DEARKD_SWEEP_BUDGET:-150}" timeout 200 python benchmarks/sweep.py "$out" 2>&1 | tee "$out/sweep.log"
cp "$out/configs.json" "$stage/dearkd_fast/kernels/configs.json" 2>/dev/null || true   # the timings use the winners
DEARKD_GPU_CHECK_BUDGET="${DEARKD_GPU_CHECK_BUDGET:-300}" timeout 380 python benchmarks/gpu_check.py "$out" 2>&1 | tee "$out/gpu_check.log"
