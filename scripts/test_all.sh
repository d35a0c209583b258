#!/usr/bin/env bash
# Install kvcore with its test extras, then run every test: pytest, mlx-lm
# 0.32.2's own cache tests on kvcore's caches, the C++ tests under ctest (and
# again under ASan/UBSan with the seeded loader fuzz), the C++ examples built
# against the installed package, and the cmake --install test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}

"$PY" -m pip install -q ".[test]"
"$PY" -m pytest tests
PYTHON="$PY" bash scripts/mlx_lm_tests.sh

mlx_prefix=$("$PY" -m mlx --cmake-dir)
cmake -S . -B build/ctest -DKVCORE_BUILD_TESTS=ON -DKVCORE_BUILD_PYTHON=OFF \
  -DCMAKE_PREFIX_PATH="$mlx_prefix" >/dev/null
cmake --build build/ctest -j "$JOBS"
ctest --test-dir build/ctest --output-on-failure
JOBS="$JOBS" PYTHON="$PY" bash scripts/sanitize.sh

# find_package(kvcore) from the installed wheel, as an embedder would.
cmake -S cpp/examples -B build/example -Dkvcore_DIR="$(cd /tmp && "$PY" -m kvcore --cmake-dir)" >/dev/null
cmake --build build/example -j "$JOBS"
./build/example/decode
./build/example/prompt_cache
"$PY" scripts/check_cpp_files.py build/example/prompt_cache

# cmake --install outside Python, then find_package from that prefix (the
# library ctest built above: the same configuration, so nothing rebuilds).
BUILD_DIR=build/ctest JOBS="$JOBS" PYTHON="$PY" bash scripts/install_test.sh
