#!/usr/bin/env bash
# The CUDA tests on a GPU machine, run from a staged copy of the package (kernels/ as dearkd_fast.kernels) and
# from outside the repository, so that its own dearkd_fast/ (which has no kernels/) is not what gets imported.
# Usage, from the repo root: bash benchmarks/gpu_tests.sh [SECONDS]   (default 240; Triton compiles every shape)
set -uo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
cp -r dearkd_fast tests pyproject.toml "$stage/" && rm -rf "$stage/dearkd_fast/kernels" && cp -r kernels "$stage/dearkd_fast/kernels"
cd "$stage" || exit 1
export PYTHONPATH="$stage" PYTHONUNBUFFERED=1
python -m dearkd_fast.native --no-progress   # the native CPU backend (its tests run on CPU tensors there too)
parallel=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
# shellcheck disable=SC2086
timeout "${1:-240}" python -m pytest tests/test_kernels.py tests/test_dispatch.py tests/test_losses.py tests/test_step.py \
    -q -p no:cacheprovider $parallel
