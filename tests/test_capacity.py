"""KVCache(capacity=N): room for N tokens at the first update, filled in place
(no growth copy, so a long prefill peaks at the cache's own bytes), the same
tokens as mlx-lm's KVCache at every step, and step growth past N."""

import mlx.core as mx
import mlx_lm.models.cache as ref
import numpy as np
import pytest

import kvcore
from conftest import assert_arrays_equal, int_valued_normal


def chunk(i, S, H=2, D=8):
    return int_valued_normal(mx.random.key(i), (1, H, S, D), mx.float16)


def data_pointer(a):
    view = np.asarray(a)
    p = view.__array_interface__["data"][0]
    del view
    return p


def test_results_equal_mlx_lm_and_buffer_is_allocated_once():
    c = kvcore.KVCache(capacity=40)
    r = ref.KVCache()
    c.step = r.step = 8
    lengths = []
    for i, S in enumerate([7, 1, 13, 1, 1, 17, 1, 5]):  # 46 tokens: past the capacity
        x = chunk(i, S)
        ck, cv = c.update_and_fetch(x, x)
        rk, rv = r.update_and_fetch(x, x)
        assert_arrays_equal(rk, ck, f"keys {i}")
        assert_arrays_equal(rv, cv, f"values {i}")
        assert c.offset == r.offset
        lengths.append(c.keys.shape[2])
    # 40 slots until the 41st token, then mlx-lm's step growth.
    assert lengths == [40, 40, 40, 40, 40, 40, 48, 48]
    assert c.capacity == 40


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="reads CPU memory")
def test_filling_up_to_capacity_never_moves_the_buffer():
    c = kvcore.KVCache(capacity=64)
    pointers = []
    for i in range(8):
        x = chunk(i, 8)
        out = c.update_and_fetch(x, x)
        del out
        mx.eval(c.keys, c.values)
        pointers.append(data_pointer(c.keys))
    assert len(set(pointers)) == 1 and c.offset == 64


def test_prefill_peak_stays_near_the_cache_bytes():
    """A 4096-token prefill in 512-token chunks: with capacity the peak is the
    cache plus one chunk; mlx-lm's growth copies the buffer beside itself."""
    H, D = 8, 128
    x = mx.zeros((1, H, 512, D), mx.float16)
    mx.eval(x)
    peaks = {}
    for name, cache in (("capacity", kvcore.KVCache(capacity=4096)), ("mlx-lm", ref.KVCache())):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        for _ in range(8):
            cache.update_and_fetch(x, x)
            mx.eval(cache.keys, cache.values)
        peaks[name] = (mx.get_peak_memory() - base) / cache.nbytes
        del cache
    assert peaks["capacity"] <= 1.1, peaks
    assert peaks["mlx-lm"] > 1.5, peaks


def test_capacity_on_existing_cache_and_make_prompt_cache():
    c = kvcore.KVCache()
    c.capacity = 1000  # at least a step (256): the first allocation is the larger
    x = chunk(0, 3)
    c.update_and_fetch(x, x)
    assert c.keys.shape[2] == 1000

    class Model:
        layers = [object()] * 3

    caches = kvcore.make_prompt_cache(Model(), capacity=100)
    assert [c.capacity for c in caches] == [100, 100, 100]
    assert [c.capacity for c in kvcore.make_prompt_cache(Model())] == [0, 0, 0]


def test_negative_capacity_is_refused():
    with pytest.raises(kvcore.CacheValueError, match=r"capacity in \[0, 2147483647\] but got -1"):
        kvcore.KVCache(capacity=-1)
    c = kvcore.KVCache()
    with pytest.raises(kvcore.CacheValueError, match="capacity"):
        c.capacity = -5
    assert c.capacity == 0


def test_capacity_beyond_memory_fails_at_first_update_and_changes_nothing():
    c = kvcore.KVCache(capacity=2**31 - 1)
    x = chunk(0, 2, H=8, D=128)
    with pytest.raises(kvcore.CacheValueError, match="memory limit"):
        c.update_and_fetch(x, x)
    assert c.keys is None and c.offset == 0
    c.capacity = 300
    c.update_and_fetch(x, x)
    assert c.offset == 2 and c.keys.shape[2] == 300
