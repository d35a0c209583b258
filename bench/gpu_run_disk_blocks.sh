#!/usr/bin/env bash
# The disk tier's blocks on the GPU machine (see ../shared/gpu/README.md),
# with .gpukit carried: bash bench/gpu_run_disk_blocks.sh [bench args...],
# e.g. --ttft-tokens 32768 --out bench/reference/h200-disk-blocks
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
python3 bench/bench_disk_blocks.py "$@"
