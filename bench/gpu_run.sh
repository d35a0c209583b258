#!/usr/bin/env bash
# The benchmark on the GPU machine (see ../shared/gpu/README.md), with
# .gpukit carried: bash bench/gpu_run.sh [bench args...]
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
python3 bench/bench_caches.py --out "${OUT:-bench/results}" "$@"
