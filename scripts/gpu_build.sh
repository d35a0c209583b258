#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu/README.md), with .gpukit carried:
# unpack the kit's mlx (CUDA), build kvcore against it into /tmp/kvpkg and
# put it on PYTHONPATH. Source it: `source scripts/gpu_build.sh`.
# shellcheck disable=SC1091
source .gpukit/setup_on_device.sh .gpukit || return 1
cmake -S . -B /tmp/kvbuild -G Ninja -DKVCORE_BUILD_PYTHON=ON \
  -DPython_EXECUTABLE="$(which python3)" \
  -DCMAKE_PREFIX_PATH="$(python3 -m mlx --cmake-dir)" >/tmp/kvbuild.log 2>&1 &&
  cmake --build /tmp/kvbuild -j "$(nproc)" >>/tmp/kvbuild.log 2>&1 || {
  tail -30 /tmp/kvbuild.log; return 1; }
mkdir -p /tmp/kvpkg/kvcore
cp python/kvcore/*.py python/kvcore/*.pyi /tmp/kvpkg/kvcore/
cp /tmp/kvbuild/_ext*.so /tmp/kvbuild/_build_info.py /tmp/kvpkg/kvcore/
export PYTHONPATH=/tmp/kvpkg:$PYTHONPATH PYTHONUNBUFFERED=1
python3 -c 'import kvcore, mlx.core as mx; print("kvcore", kvcore.__version__, "on", mx.default_device())'
