#!/usr/bin/env bash
# Prefill checkpoints in process on the GPU machine (see ../shared/gpu/README.md),
# with .gpukit carried: bash bench/gpu_run_checkpoints.sh [bench args...]
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
python3 bench/bench_checkpoints.py --in-process "$@"
