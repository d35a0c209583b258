#!/usr/bin/env bash
# Build kvcore and its C++ tests with AddressSanitizer and UBSan in
# build/asan, then run every C++ test (and the loader fuzzer) under them.
#
# libmlx.so is not instrumented: ASan sees kvcore's and the tests' own code
# and every heap allocation (it replaces malloc for the whole process).
# detect_leaks=0: LeakSanitizer reports mlx's own process-lifetime
# allocations (its allocator caches, thread pools, and the device streams
# it keeps until exit), which kvcore does not own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
BUILD=${BUILD:-build/asan}

mlx_prefix=$("$PY" -m mlx --cmake-dir)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVCORE_BUILD_TESTS=ON -DKVCORE_BUILD_PYTHON=OFF -DKVCORE_SANITIZE=ON \
  -DCMAKE_PREFIX_PATH="$mlx_prefix" >/dev/null
cmake --build "$BUILD" -j "$JOBS"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest --test-dir "$BUILD" --output-on-failure "$@"
