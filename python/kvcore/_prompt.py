"""Prompt-cache helpers over lists of per-layer caches (mlx-lm's API)."""

from typing import Any, List, Optional

from ._ext import KVCache, RotatingKVCache


def make_prompt_cache(
    model: Any, max_kv_size: Optional[int] = None, capacity: Optional[int] = None
) -> List[Any]:
    """Build the model's cache for generation.

    Args:
        model: The language model. If it has ``make_cache()``, that decides.
        max_kv_size (int, optional): Otherwise, a ``RotatingKVCache`` of this
            size (keeping 4 leading tokens) per layer instead of ``KVCache``.
        capacity (int, optional): Tokens each step-grown cache allocates room
            for up front (see ``KVCache(capacity=...)``); caches of other
            kinds are left as they are.

    Returns:
        list: One cache per layer.
    """
    if hasattr(model, "make_cache"):
        caches = model.make_cache()
    else:
        num_layers = len(model.layers)
        if max_kv_size is not None:
            caches = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in range(num_layers)]
        else:
            caches = [KVCache() for _ in range(num_layers)]
    if capacity is not None:
        for c in caches:
            for inner in getattr(c, "caches", (c,)):
                if hasattr(inner, "capacity"):
                    inner.capacity = capacity
    return caches


def can_trim_prompt_cache(cache: List[Any]) -> bool:
    """Whether every layer's cache can be trimmed."""
    return all(c.is_trimmable() for c in cache)


def trim_prompt_cache(cache: List[Any], num_tokens: int) -> int:
    """Trim every layer's cache by ``num_tokens`` in place.

    Returns:
        int: Tokens trimmed (from the first layer), 0 if the cache cannot be
        trimmed or is empty.
    """
    if not can_trim_prompt_cache(cache) or len(cache) == 0:
        return 0
    return [c.trim(num_tokens) for c in cache][0]
