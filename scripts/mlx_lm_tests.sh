#!/usr/bin/env bash
# Run mlx-lm 0.32.2's own cache tests with kvcore's caches swapped into
# mlx_lm.models.cache: tests/test_prompt_cache.py and test_server.py's
# TestLRUPromptCache (on kvcore's LRUPromptCache).
#
#   scripts/mlx_lm_tests.sh                  # on kvcore's caches
#   scripts/mlx_lm_tests.sh --caches=mlx-lm  # the same tests on mlx-lm's own
#
# Further arguments go to pytest. The sdist (which carries the tests) is
# fetched once with pip download into build/mlx-lm-src (or $MLX_LM_SRC).
# tests/mlx_lm_suite/kvcore_suite.py does the patching and deselects the tests
# that need a model download when it is not in the local Hugging Face cache.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PYTHON:-python3}
VERSION=0.32.2
src=${MLX_LM_SRC:-$root/build/mlx-lm-src}

tests="$src/mlx_lm-$VERSION/tests"
if [ ! -f "$tests/test_prompt_cache.py" ]; then
  mkdir -p "$src"
  if ! ls "$src"/mlx_lm-$VERSION.tar.gz >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "mlx-lm==$VERSION" -d "$src"
  fi
  tar -xzf "$src/mlx_lm-$VERSION.tar.gz" -C "$src" "mlx_lm-$VERSION/tests"
fi

# Run from the tests folder with the sdist's own mlx_lm package out of reach,
# so the installed mlx-lm (the one kvcore patches) is the one imported.
cd "$tests"
export PYTHONPATH="$root/tests/mlx_lm_suite${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest -p kvcore_suite -p no:cacheprovider --rootdir "$tests" \
  test_prompt_cache.py "test_server.py::TestLRUPromptCache" "$@"
