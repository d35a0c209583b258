#!/usr/bin/env bash
# Decode speed of the quantized schemes on the GPU machine (see
# ../shared/gpu/README.md), with .gpukit carried: SmolLM2-135M's shapes with
# random weights (no model directory needed), 4k and 16k tokens of context,
# each cache timed in turn within every repeat, ratios against affine 4-bit.
set -euo pipefail
# shellcheck disable=SC1091
source scripts/gpu_build.sh
out="${OUT:-bench/results}"
python3 bench/bench_kv_decode.py --config bench/data/smollm2-135m-config.json \
  --contexts 4096,16384 --steps 32 --repeats "${REPEATS:-7}" --baseline affine:4:64 \
  --caches float,affine:4:64,rotated-channel:4:32/64,rotated-channel:4:32/64:1,rotated-channel:3:32/64:1 \
  --json "$out/kv_decode_gpu.jsonl"
