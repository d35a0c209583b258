"""mlx-lm's attention entry point, routed to kvcore's quantized attention so
that caches with different key and value bits (``bits=(8, 4)``) and caches of
the ``"rotated-channel"`` scheme work in mlx-lm's models; ``patch_mlx_lm()``
swaps it in."""

import mlx.core as mx

from ._ext import quantized_scaled_dot_product_attention


def _sink(cache):
    """A rotated-channel cache's float first tokens and where each row's
    first token sits (a batch's left padding), or None."""
    keys = getattr(cache, "sink_keys", None)
    if keys is None:
        return None
    # A batch's rows start at their left padding; a single cache's at 0.
    return keys, cache.sink_values, getattr(cache, "left_padding", None)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """As ``mlx_lm.models.base.scaled_dot_product_attention``: quantized
    attention when the cache has ``bits`` (an int, or a (keys, values)
    pair), on the cache's scheme, else
    ``mx.fast.scaled_dot_product_attention``."""
    if hasattr(cache, "bits"):
        if sinks is not None:
            raise ValueError("Quantized SDPA does not support attention sinks.")
        return quantized_scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask,
            group_size=cache.group_size, bits=cache.bits,
            scheme=getattr(cache, "scheme", "affine"), sink=_sink(cache))
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks)
