"""QuantizedKVCache, ChunkedKVCache and KVCache.to_quantized against mlx-lm,
side by side: every returned array, state and scalar equal exactly."""

import copy

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import cache as ref

import kvcore
from conftest import assert_arrays_equal, assert_states_equal, int_valued_normal


def assert_trees_equal(a, b, what="result"):
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{what}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_trees_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, mx.array):
        assert_arrays_equal(a, b, what)
    else:
        assert type(a) is type(b) and a == b, f"{what}: {a!r} vs {b!r}"


def kv_pair(seed, B, H, S, D, dtype):
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    return int_valued_normal(k1, (B, H, S, D), dtype, 1.0), int_valued_normal(k2, (B, H, S, D), dtype, 1.0)


# mlx-lm's own buffer arithmetic (dim // (32 // bits)) is only right for
# these widths; 3, 5 and 6 bits fail inside mlx-lm for most head dims.
QUANT = st.sampled_from([(32, 4), (64, 4), (64, 8), (32, 2), (128, 8)])


@settings(max_examples=25, deadline=None)
@given(
    q=QUANT,
    dtype=st.sampled_from([mx.float16, mx.float32, mx.bfloat16]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("update"), st.sampled_from([1, 1, 1, 2, 7, 40])),
            st.tuples(st.just("trim"), st.integers(0, 10)),
            st.tuples(st.just("state"), st.just(0)),
            st.tuples(st.just("copy"), st.just(0)),
        ),
        min_size=1,
        max_size=14,
    ),
    seed=st.integers(0, 2**16),
)
def test_quantized_cache_matches_mlx_lm(q, dtype, ops, seed):
    group_size, bits = q
    D = 128
    old_ref, old_kv = ref.QuantizedKVCache.step, kvcore.QuantizedKVCache.step
    ref.QuantizedKVCache.step = kvcore.QuantizedKVCache.step = 16
    try:
        r = ref.QuantizedKVCache(group_size=group_size, bits=bits)
        k = kvcore.QuantizedKVCache(group_size=group_size, bits=bits)
        for i, (op, n) in enumerate(ops):
            if op == "update":
                a, b = kv_pair(seed + i, 1, 2, n, D, dtype)
                assert_trees_equal(r.update_and_fetch(a, b), k.update_and_fetch(a, b), "update")
            elif op == "trim" and not r.empty():
                assert r.trim(n) == k.trim(n)
            elif op == "state" and not r.empty():
                r = ref.QuantizedKVCache.from_state(r.state)
                k = kvcore.QuantizedKVCache.from_state(k.state)
            elif op == "copy":
                r, k = copy.deepcopy(r), copy.deepcopy(k)
            assert r.offset == k.offset
            assert r.empty() == k.empty() and r.size() == k.size()
            if not r.empty():  # mlx-lm's nbytes fails on an empty quantized cache
                assert r.nbytes == k.nbytes
            assert_trees_equal(r.state, k.state, "state")
            for N in (1, 3):
                assert_trees_equal(
                    r.make_mask(N, return_array=False, window_size=None),
                    k.make_mask(N, return_array=False, window_size=None), "mask")
    finally:
        ref.QuantizedKVCache.step, kvcore.QuantizedKVCache.step = old_ref, old_kv


def test_quantized_cache_has_bits_and_group_size_for_quantized_attention():
    c = kvcore.QuantizedKVCache(group_size=32, bits=4)
    assert (c.group_size, c.bits) == (32, 4)
    assert not hasattr(kvcore.KVCache(), "bits")  # plain caches take the fused path


@settings(max_examples=25, deadline=None)
@given(
    chunk=st.integers(1, 24),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("update"), st.sampled_from([1, 1, 1, 3, 9, 20])),
            st.tuples(st.just("front"), st.just(0)),
            st.tuples(st.just("trim"), st.integers(0, 6)),
            st.tuples(st.just("state"), st.just(0)),
        ),
        min_size=1,
        max_size=16,
    ),
    seed=st.integers(0, 2**16),
)
def test_chunked_cache_matches_mlx_lm(chunk, ops, seed):
    old_ref, old_kv = ref.ChunkedKVCache.step, kvcore.ChunkedKVCache.step
    ref.ChunkedKVCache.step = kvcore.ChunkedKVCache.step = 8
    try:
        r, k = ref.ChunkedKVCache(chunk), kvcore.ChunkedKVCache(chunk)
        for i, (op, n) in enumerate(ops):
            if op == "update":
                a, b = kv_pair(seed + i, 1, 2, n, 8, mx.float32)
                assert_trees_equal(r.update_and_fetch(a, b), k.update_and_fetch(a, b), "update")
            elif op == "front":
                r.maybe_trim_front()
                k.maybe_trim_front()
            elif op == "trim":
                assert r.trim(n) == k.trim(n)
            elif op == "state" and not r.empty():
                r = ref.ChunkedKVCache.from_state(r.state)
                k = kvcore.ChunkedKVCache.from_state(k.state)
            assert (r.offset, r.start_position, r.size()) == (k.offset, k.start_position, k.size())
            assert_states_equal(r.state, k.state)
            if not r.empty():
                assert_trees_equal(r.keys_and_values(), k.keys_and_values(), "keys_and_values")
    finally:
        ref.ChunkedKVCache.step, kvcore.ChunkedKVCache.step = old_ref, old_kv


def test_chunked_cache_has_no_make_mask_like_mlx_lm():
    # mlx-lm's create_attention_mask asks the cache for a mask only if it
    # has make_mask; Llama 4 builds its chunked mask itself.
    assert hasattr(ref.ChunkedKVCache(4), "make_mask") is False
    assert hasattr(kvcore.ChunkedKVCache(4), "make_mask") is False


@pytest.mark.parametrize("group_size,bits", [(64, 4), (32, 8), (64, 2)])
def test_to_quantized_matches_mlx_lm(group_size, bits):
    r, k = ref.KVCache(), kvcore.KVCache()
    a, b = kv_pair(1, 1, 2, 10, 64, mx.float16)
    r.update_and_fetch(a, b)
    k.update_and_fetch(a, b)
    rq, kq = r.to_quantized(group_size, bits), k.to_quantized(group_size, bits)
    assert type(kq) is kvcore.QuantizedKVCache
    assert_trees_equal(rq.state, kq.state, "state")
    a, b = kv_pair(2, 1, 2, 1, 64, mx.float16)
    assert_trees_equal(rq.update_and_fetch(a, b), kq.update_and_fetch(a, b), "update")


def test_to_quantized_of_empty_cache_is_empty():
    q = kvcore.KVCache().to_quantized()
    assert q.empty() and q.offset == 0 and q.state[0] is None


@pytest.mark.parametrize("group_size,bits,match", [
    (16, 4, "group_size in"),
    (64, 7, "bits in"),
    (64, 1, "bits in"),
])
def test_quantized_cache_rejects_unsupported_settings(group_size, bits, match):
    with pytest.raises(kvcore.CacheValueError, match=match):
        kvcore.QuantizedKVCache(group_size=group_size, bits=bits)


def test_quantized_update_with_indivisible_head_dim_fails_and_keeps_cache():
    c = kvcore.QuantizedKVCache(group_size=64, bits=4)
    a, b = kv_pair(0, 1, 2, 3, 64, mx.float16)
    c.update_and_fetch(a, b)
    before = c.state
    x, y = kv_pair(1, 1, 2, 1, 96, mx.float16)
    with pytest.raises(kvcore.CacheValueError, match="head dim divisible by group_size 64"):
        c.update_and_fetch(x, y)
    assert_trees_equal(before, c.state)


def test_quantized_state_rejects_broken_triples():
    c = kvcore.QuantizedKVCache()
    a, b = kv_pair(0, 1, 2, 3, 64, mx.float16)
    c.update_and_fetch(a, b)
    keys, values, offset, gs, bits = c.state
    with pytest.raises(kvcore.CacheValueError, match="expected 3 items but got 2"):
        c.state = ((keys[0], keys[1]), values, offset, gs, bits)
    with pytest.raises(kvcore.CacheValueError, match="offset in"):
        c.state = (keys, values, 10**6, gs, bits)
    with pytest.raises(ValueError):
        kvcore.QuantizedKVCache.from_state((keys, None, offset, gs, bits))
    assert c.offset == 3


def test_chunked_state_rejects_offset_before_start():
    c = kvcore.ChunkedKVCache(4)
    a, b = kv_pair(0, 1, 1, 6, 8, mx.float32)
    c.update_and_fetch(a, b)
    keys, values, offset, chunk, start = c.state
    with pytest.raises(kvcore.CacheValueError, match="offset >= start_position"):
        c.state = (keys, values, 1, chunk, 3)
    with pytest.raises(kvcore.CacheValueError, match="chunk_size"):
        kvcore.ChunkedKVCache(0)
    assert c.offset == 6
