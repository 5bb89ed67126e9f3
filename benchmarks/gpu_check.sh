#!/usr/bin/env bash
# One prepared GPU check (<= 10 minutes, installs nothing): copy bandwidth, fused-vs-reference
# correctness at the shapes of record, and the kernel timings table. Usage, from the repo root:
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
timeout 560 python benchmarks/gpu_check.py "$out" 2>&1 | tee "$out/gpu_check.log"
