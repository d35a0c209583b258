#!/usr/bin/env bash
# The rotated-channel sink on the GPU machine (see ../shared/gpu/README.md),
# with .gpukit carried and the model directory reachable (KVCORE_MODEL):
# perplexity over 4096 tokens and greedy agreement over 64, with and without
# the sink, and decode tokens/s at 4k and 16k context.
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
out="${OUT:-bench/results}"
model="${KVCORE_MODEL:?set KVCORE_MODEL to the SmolLM2-135M-Instruct mlx-lm directory}"
python3 bench/bench_kv_quality.py --mlx --model "$model" --tokens 4096 --greedy 64 \
  --json "$out/kv_sink_quality_gpu.jsonl" \
  --schemes float,affine4,kvcore:rotated-channel:4:32/64,kvcore:rotated-channel:4:32/64:128:1,kvcore:rotated-channel:3:32/64,kvcore:rotated-channel:3:32/64:128:1,kvcore:rotated-channel:4/2:32/64,kvcore:rotated-channel:4/2:32/64:128:1
python3 bench/bench_kv_decode.py --model "$model" --contexts 4096,16384 --steps 32 --repeats 3 \
  --caches float,affine:4:64,rotated-channel:4:32/64,rotated-channel:4:32/64:1,rotated-channel:3:32/64:1 \
  --json "$out/kv_sink_decode_gpu.jsonl"
