"""pytest plugin that runs mlx-lm's own tests on kvcore's caches.

Load it with ``-p kvcore_suite`` (this directory on PYTHONPATH); the script
scripts/mlx_lm_tests.sh does. It is a plugin rather than a conftest.py so
that kvcore's own ``pytest tests`` never loads it.

``--caches=kvcore`` (the default) calls ``kvcore.patch_mlx_lm()`` before
pytest imports the test modules, so their ``from mlx_lm.models.cache import
KVCache`` (and mlx_lm.server's ``LRUPromptCache``) get kvcore's classes;
``--caches=mlx-lm`` runs the same tests on mlx-lm's own, for comparison.

Offline adaptations, the same in both modes:
* test_prompt_cache.py loads a Hugging Face model (Qwen1.5-0.5B-Chat-4bit)
  in setUpClass. When it is not in the local HF cache (no downloads here),
  ``load`` there returns a stand-in of the same architecture instead: a
  small Qwen2 model with seeded random weights, quantized to 4 bits like the
  real one, and a byte-level tokenizer with the one method the tests call
  (``encode(text, return_tensors="mlx")``). The three tests that generate
  (MODEL_TESTS) then run on it; they check that the cache gives the same
  tokens and logits whichever way it is filled, saved, trimmed or
  quantized, which does not depend on trained weights.
  ``--no-stand-in`` deselects them instead.
* test_server.py imports ``requests`` at the top; TestLRUPromptCache does not
  use it. Without the package a stub module stands in.
"""

import sys
import types

import pytest

HF_MODEL_PATH = "mlx-community/Qwen1.5-0.5B-Chat-4bit"

# Tests of test_prompt_cache.py that run the model (generate_step or
# self.model / self.tokenizer); they need it downloaded.
MODEL_TESTS = (
    "test_prompt_cache.py::TestPromptCache::test_cache_with_generate",
    "test_prompt_cache.py::TestPromptCache::test_trim_cache_with_generate",
    "test_prompt_cache.py::TestPromptCache::test_cache_to_quantized",
)

_model_missing = None  # the reason, when the model is not available
_use_stand_in = True


def pytest_addoption(parser):
    parser.addoption(
        "--caches",
        choices=("kvcore", "mlx-lm"),
        default="kvcore",
        help="whose caches mlx_lm.models.cache holds while mlx-lm's tests run",
    )
    parser.addoption(
        "--no-stand-in",
        action="store_true",
        help="deselect the model tests when the model is not downloaded",
    )


def _model_available():
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(HF_MODEL_PATH, local_files_only=True)
        return None
    except Exception as e:  # not downloaded, or no huggingface_hub
        return f"{HF_MODEL_PATH} is not in the local Hugging Face cache ({type(e).__name__})"


def pytest_configure(config):
    global _model_missing, _use_stand_in
    _use_stand_in = not config.getoption("--no-stand-in")
    try:
        import requests  # noqa: F401
    except ImportError:
        stub = types.ModuleType("requests")
        stub.__doc__ = "stand-in: the package is not installed"
        sys.modules["requests"] = stub

    # Import mlx-lm's modules the tests use before patching, so that
    # patch_mlx_lm() sees every name they bound at import.
    import mlx_lm.generate  # noqa: F401
    import mlx_lm.models.base  # noqa: F401
    import mlx_lm.models.cache  # noqa: F401
    import mlx_lm.server  # noqa: F401
    import mlx_lm.utils  # noqa: F401

    mode = config.getoption("--caches")
    if mode == "kvcore":
        import kvcore

        kvcore.patch_mlx_lm()
        import mlx_lm.models.cache as cache

        import mlx_lm.server as server

        assert cache.KVCache is kvcore.KVCache
        assert server.LRUPromptCache is kvcore.LRUPromptCache
    _model_missing = _model_available()


def pytest_report_header(config):
    import mlx_lm.models.cache as cache

    lines = [f"mlx-lm tests on caches from: {cache.KVCache.__module__} (--caches="
             f"{config.getoption('--caches')})"]
    if _model_missing:
        what = "run on a random-weight stand-in" if _use_stand_in else "deselected"
        lines.append(f"model tests {what}: {_model_missing}")
    return lines


class _ByteTokenizer:
    """Bytes as token ids: all the tests ask of a tokenizer is encode()."""

    def encode(self, text, return_tensors=None):
        import mlx.core as mx

        ids = list(text.encode("utf-8"))
        return mx.array([ids]) if return_tensors == "mlx" else ids


def _stand_in_model():
    import mlx.core as mx
    import mlx.nn as nn

    from kvcore._demo import tiny_qwen2

    model = tiny_qwen2(layers=4, seed=0)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def _offline_load(path, *args, **kwargs):
    if _use_stand_in:
        return _stand_in_model(), _ByteTokenizer()
    return None, None


def pytest_collection_modifyitems(session, config, items):
    if not _model_missing:
        return
    keep, dropped = [], []
    for item in items:
        if not _use_stand_in and any(item.nodeid.endswith(name) for name in MODEL_TESTS):
            dropped.append(item)
        else:
            keep.append(item)
            module = getattr(item, "module", None)
            if module is not None and module.__name__.endswith("test_prompt_cache"):
                module.load = _offline_load
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
