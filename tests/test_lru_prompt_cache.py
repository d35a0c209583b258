"""mlx-lm's server-side LRUPromptCache (deep copies, trims, byte counts)
runs on kvcore's caches as on its own."""

import mlx.core as mx
from mlx_lm.models import cache as ref

import kvcore
from conftest import assert_states_equal, int_valued_normal


def filled(mod, n_tokens, seed):
    caches = [mod.KVCache(), mod.KVCache()]
    for i, c in enumerate(caches):
        k = int_valued_normal(mx.random.key(seed + i), (1, 2, n_tokens, 8), mx.float32)
        c.update_and_fetch(k, k)
    return caches


def test_lru_prompt_cache_on_kvcore_caches_matches_mlx_lm():
    results = {}
    for mod in (ref, kvcore):
        lru = ref.LRUPromptCache(max_size=4)
        tokens = list(range(12))
        lru.insert_cache("m", tokens, filled(mod, 12, 0))
        lru.insert_cache("m", [100, 101], filled(mod, 2, 5))
        # A shorter prompt sharing 7 tokens: a trimmed deep copy comes back.
        cache, rest = lru.fetch_nearest_cache("m", tokens[:7] + [50, 51])
        assert all(type(c).__module__.split(".")[0] == mod.__name__.split(".")[0] for c in cache)
        results[mod.__name__] = (
            [c.state for c in cache],
            rest,
            lru.nbytes,
            len(lru),
        )
        # The stored entry was not trimmed with the copy.
        again, _ = lru.fetch_nearest_cache("m", tokens)
        assert again[0].offset == 12
    r, k = results["mlx_lm.models.cache"], results["kvcore"]
    assert r[1:] == k[1:]
    for rs, ks in zip(r[0], k[0]):
        assert_states_equal(rs, ks)
