"""Make mlx-lm run on kvcore's caches.

``patch_mlx_lm()`` swaps kvcore's classes and helpers into
``mlx_lm.models.cache`` and into every loaded ``mlx_lm`` module that imported
them by name (model modules do ``from .cache import KVCache``), so models,
``generate_step``, the prompt-cache helpers and model modules imported later
all use kvcore. It also wraps ``stream_generate`` and ``BatchGenerator`` so
that ``mlx_lm.server`` keeps prefill checkpoints (see _checkpoints).
``unpatch_mlx_lm()`` puts mlx-lm's own back.

``patch_mlx_lm(kv_scheme="rotated-channel")`` (or the environment variable
``KVCORE_KV_SCHEME``) makes ``generate_step(kv_bits=...)`` quantize with that
scheme: mlx-lm's ``maybe_quantize_kv_cache`` is replaced by one that passes
it to ``to_quantized``.
"""

import os
import sys

# Functions kvcore provides in place of mlx_lm.models.cache's; the classes
# are those of kvcore's class table.
FUNCTIONS = (
    "make_prompt_cache",
    "can_trim_prompt_cache",
    "trim_prompt_cache",
    "save_prompt_cache",
    "load_prompt_cache",
    "create_attention_mask",
    "dynamic_roll",
    # The server's prompt-prefix cache (mlx_lm.server imports LRUPromptCache).
    "TokenBuffer",
    "PromptTrie",
    "PromptTrieResult",
    "LRUPromptCache",
)


# mlx_lm.models.base's attention, for caches whose keys and values have
# different bits.
BASE_FUNCTIONS = ("scaled_dot_product_attention", "quantized_scaled_dot_product_attention")


def swapped_names():
    from ._classes import classes

    return tuple(classes()) + FUNCTIONS


# mlx_lm.generate's names wrapped to take prefill checkpoints.
GENERATE_NAMES = ("stream_generate", "BatchGenerator")


def _originals():
    """{name: mlx-lm's object} for every name kvcore replaces (classes mlx-lm
    lacks, such as QuantizedRotatingKVCache, have nothing to replace)."""
    import mlx_lm.models.base as base
    import mlx_lm.models.cache as reference

    out = {n: getattr(reference, n) for n in swapped_names() if hasattr(reference, n)}
    out.update({n: getattr(base, n) for n in BASE_FUNCTIONS})
    return out


def sink_within(cache, kwargs):
    """to_quantized's arguments for this cache: a sliding window's sink lies
    within the first tokens it keeps (a model's own windows, gemma3's say,
    keep none), and a batch of sliding windows keeps none."""
    sink = kwargs.get("sink")
    if not sink:
        return kwargs
    if type(cache).__name__ == "BatchRotatingKVCache":
        return {k: v for k, v in kwargs.items() if k != "sink"}
    keep = getattr(cache, "keep", None)
    return kwargs if keep is None or sink <= keep else dict(kwargs, sink=keep)


def quantizer(scheme, window=None, sink=None):
    """mlx-lm's maybe_quantize_kv_cache, quantizing with ``scheme`` (and,
    for "rotated-channel", a float ``window`` other than the default and a
    ``sink``)."""
    extra = {"scheme": scheme}
    extra.update({} if window is None else {"window": window}, **({} if sink is None else {"sink": sink}))

    def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
        if kv_bits is None:
            return
        for e, c in enumerate(prompt_cache):
            if hasattr(c, "to_quantized") and c.offset >= quantized_kv_start:
                prompt_cache[e] = c.to_quantized(group_size=kv_group_size, bits=kv_bits,
                                                 **sink_within(c, extra))

    return maybe_quantize_kv_cache


def _replacements(originals, kv_scheme=None, kv_window=None, kv_sink=None):
    """{name: (mlx-lm's object, kvcore's)}."""
    import importlib

    import kvcore

    from . import _checkpoints

    out = {n: (o, getattr(kvcore, n)) for n, o in originals.items()}
    generate = importlib.import_module("mlx_lm.generate")
    if kv_scheme is not None and kv_scheme != "affine":
        out["maybe_quantize_kv_cache"] = (generate.maybe_quantize_kv_cache, quantizer(kv_scheme, kv_window, kv_sink))
    out["stream_generate"] = (
        generate.stream_generate,
        _checkpoints.checkpointing_stream_generate(generate.stream_generate),
    )
    out["BatchGenerator"] = (
        generate.BatchGenerator,
        _checkpoints.checkpointing_batch_generator(generate.BatchGenerator),
    )
    return out


_replaced = None  # [(module, name, original)] while patched


def patch_mlx_lm(kv_scheme=None, kv_window=None, kv_sink=None):
    """Use kvcore's caches everywhere in mlx-lm. Idempotent (unpatch first
    to change the scheme).

    Args:
        kv_scheme (str, optional): The quantization scheme
          ``generate_step(kv_bits=...)`` uses: ``"affine"`` (mlx-lm's, the
          default) or ``"rotated-channel"``; ``None`` reads
          ``KVCORE_KV_SCHEME`` from the environment.
        kv_window (int, optional): ``"rotated-channel"``: the newest tokens
          kept in float (default 128).
        kv_sink (int, optional): ``"rotated-channel"``: each sequence's
          first tokens kept in float too (default 0).
    """
    global _replaced
    if _replaced is not None:
        return
    if kv_scheme is None:
        kv_scheme = os.environ.get("KVCORE_KV_SCHEME") or None
    if kv_scheme is not None:
        from ._ext import QuantizedKVCache

        # A typed error for an unknown name or a bad window, before patching.
        QuantizedKVCache(scheme=kv_scheme, **({} if kv_window is None else {"window": kv_window}),
                         **({} if kv_sink is None else {"sink": kv_sink}))
    elif kv_window is not None or kv_sink is not None:
        from ._ext import QuantizedKVCache

        # The affine scheme's error for any window or sink.
        QuantizedKVCache(**({} if kv_window is None else {"window": kv_window}),
                         **({} if kv_sink is None else {"sink": kv_sink}))
    replacements = _replacements(_originals(), kv_scheme, kv_window, kv_sink)
    replaced = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "mlx_lm" or mod_name.startswith("mlx_lm.")):
            continue
        namespace = vars(mod)
        for name, (original, ours) in replacements.items():
            if namespace.get(name) is original:
                replaced.append((mod, name, original, ours))
                setattr(mod, name, ours)
    _replaced = replaced


def unpatch_mlx_lm():
    """Restore mlx-lm's own caches where patch_mlx_lm() replaced them."""
    global _replaced
    if _replaced is None:
        return
    swapped = {}
    for mod, name, original, ours in _replaced:
        setattr(mod, name, original)
        swapped[name] = (original, ours)
    # Model modules first imported while patched took kvcore's names too.
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "mlx_lm" or mod_name.startswith("mlx_lm.")):
            continue
        namespace = vars(mod)
        for name, (original, ours) in swapped.items():
            if namespace.get(name) is ours:
                setattr(mod, name, original)
    _replaced = None


def is_patched():
    return _replaced is not None
