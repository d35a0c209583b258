#!/usr/bin/env bash
# The rotated-channel scheme on the GPU machine (see ../shared/gpu/README.md),
# with .gpukit carried and the model directory reachable (KVCORE_MODEL, e.g.
# carried beside the kit): bash bench/gpu_run_kv_quality.sh
# 1. kvcore's quantized attention against the dequantized cache, every shape;
# 2. perplexity over 4096 tokens and greedy agreement over 256, float /
#    affine / rotated-channel at 4, 3 and K4/V2 bits (mlx's own linears);
# 3. decode tokens/s at 4k and 16k context.
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
out="${OUT:-bench/results}"
model="${KVCORE_MODEL:?set KVCORE_MODEL to the SmolLM2-135M-Instruct mlx-lm directory}"
python3 bench/check_kv_attention.py | tee "$out/kv_attention_check.jsonl"
python3 bench/bench_kv_quality.py --mlx --model "$model" --tokens 4096 --greedy 256 \
  --json "$out/kv_quality_gpu.jsonl" \
  --schemes float,affine8,affine4,kvcore:affine:4:64,kvcore:rotated-channel:4:32/64,affine3,kvcore:rotated-channel:3:32/64,kvcore:affine:4/2:64,kvcore:rotated-channel:4/2:32/64
python3 bench/bench_kv_decode.py --model "$model" --contexts 4096,16384 --steps 64 \
  --caches float,affine:4:64,rotated-channel:4:32/64,rotated-channel:4:64 --json "$out/kv_decode_gpu.jsonl"
