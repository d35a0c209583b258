#!/usr/bin/env bash
# The memory benchmark on the GPU machine (see ../shared/gpu/README.md), with
# .gpukit carried: bash bench/gpu_run_memory.sh [bench args...]
# On a GPU decode runs at 1k and 16k context; decode and peak-memory cases
# run each in a child process under --case-timeout (default 300 s), so a
# kernel the CUDA backend lacks becomes a "failed: ..." row.
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
python3 bench/bench_memory.py --out "${OUT:-bench/results}" "$@"
