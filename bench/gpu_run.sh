#!/usr/bin/env bash
# Run the benchmark on the GPU machine (see ../shared/gpu/README.md): unpack
# the kit's mlx (CUDA), build kvcore against it, then bench/bench_caches.py.
#   source-free use: bash bench/gpu_run.sh [bench args...]   (with .gpukit carried)
set -euo pipefail
# shellcheck disable=SC1091
source .gpukit/setup_on_device.sh .gpukit
cmake -S . -B /tmp/kvbuild -G Ninja -DKVCORE_BUILD_PYTHON=ON \
  -DPython_EXECUTABLE="$(which python3)" \
  -DCMAKE_PREFIX_PATH="$(python3 -m mlx --cmake-dir)" >/tmp/kvbuild.log 2>&1 || {
  tail -30 /tmp/kvbuild.log; exit 1; }
cmake --build /tmp/kvbuild -j "$(nproc)" >>/tmp/kvbuild.log 2>&1 || { tail -30 /tmp/kvbuild.log; exit 1; }
mkdir -p /tmp/kvpkg/kvcore
cp python/kvcore/*.py /tmp/kvpkg/kvcore/
cp /tmp/kvbuild/_ext*.so /tmp/kvbuild/_build_info.py /tmp/kvpkg/kvcore/
export PYTHONPATH=/tmp/kvpkg:$PYTHONPATH PYTHONUNBUFFERED=1
python3 -c 'import kvcore, mlx.core as mx; print("kvcore", kvcore.__version__, "on", mx.default_device())'
python3 bench/bench_caches.py --out "${OUT:-bench/results}" "$@"
