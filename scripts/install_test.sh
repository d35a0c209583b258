#!/usr/bin/env bash
# kvcore as a plain C++ install, outside Python: build the library against
# the mlx package's CMake config, `cmake --install` it to a fresh prefix,
# build cpp/examples from scratch with only that prefix on CMAKE_PREFIX_PATH
# (find_package(kvcore) finds MLX itself), and run the example programs with
# an empty environment.
#
#   bash scripts/install_test.sh       # PYTHON, JOBS, BUILD_DIR to override
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
BUILD=${BUILD_DIR:-build/install-c}

work=$(mktemp -d "${TMPDIR:-/tmp}/kvcore-install-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
examples=$work/examples

mlx_prefix=$("$PY" -m mlx --cmake-dir)
cmake -S . -B "$BUILD" -DKVCORE_BUILD_PYTHON=OFF -DCMAKE_PREFIX_PATH="$mlx_prefix" >/dev/null
cmake --build "$BUILD" -j "$JOBS"
cmake --install "$BUILD" --prefix "$prefix" >/dev/null

cmake -S cpp/examples -B "$examples" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$examples" -j "$JOBS"
env -i "$examples/decode"
env -i "$examples/prompt_cache"
echo "install test: ok"
