"""QuantizedRotatingKVCache: the sliding-window ring with quantized keys and
values, keys and values at their own bits.

Quantization works per token (groups run along the head dimension), and the
ring only moves whole tokens, so a quantized ring must return exactly
mx.quantize of what mlx-lm's float RotatingKVCache returns for the same
updates. That is the reference every test here compares against."""

import copy

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore
from conftest import assert_arrays_equal, assert_masks_equal, int_valued_normal

H, D = 2, 64


def quantize(x, group_size, bits):
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


def spec(v):
    return v if isinstance(v, tuple) else (v, v)


class ReferenceRing:
    """mlx-lm's float ring, its results quantized."""

    def __init__(self, max_size, keep, group_size, bits):
        self.ring = ref.RotatingKVCache(max_size=max_size, keep=keep)
        self.gs, self.bits = spec(group_size), spec(bits)

    def update_and_fetch(self, k, v):
        k, v = self.ring.update_and_fetch(k, v)
        return (quantize(k, self.gs[0], self.bits[0]), quantize(v, self.gs[1], self.bits[1]))


def assert_triples_equal(a, b, what):
    assert len(a) == len(b) == 3
    for i, (x, y) in enumerate(zip(a, b)):
        assert_arrays_equal(x, y, f"{what}[{i}]")


def tokens(seed, S, dtype=mx.float16):
    k = int_valued_normal(mx.random.key(seed), (1, H, S, D), dtype, scale=3.0)
    v = int_valued_normal(mx.random.key(seed + 10_000), (1, H, S, D), dtype, scale=3.0)
    return k, v


@settings(max_examples=30, deadline=None)
@given(
    max_size=st.integers(2, 12),
    keep=st.integers(0, 3),
    bits=st.sampled_from([4, 8, (8, 4), (4, 8)]),
    steps=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    trims=st.lists(st.integers(0, 3), min_size=12, max_size=12),
)
def test_matches_quantized_float_ring(max_size, keep, bits, steps, trims):
    keep = min(keep, max_size - 1)
    got = kvcore.QuantizedRotatingKVCache(max_size, keep, group_size=64, bits=bits)
    want = ReferenceRing(max_size, keep, 64, bits)
    for i, S in enumerate(steps):
        k, v = tokens(i, S)
        gk, gv = got.update_and_fetch(k, v)
        wk, wv = want.update_and_fetch(k, v)
        assert_triples_equal(wk, gk, f"step {i} keys")
        assert_triples_equal(wv, gv, f"step {i} values")
        assert (got.offset, got._idx) == (want.ring.offset, want.ring._idx)
        for N in (1, 3):
            assert_masks_equal(want.ring.make_mask(N, window_size=None, return_array=True),
                               got.make_mask(N, window_size=None, return_array=True))
        assert got.is_trimmable() == want.ring.is_trimmable()
        if got.is_trimmable() and trims[i]:
            assert got.trim(trims[i]) == want.ring.trim(trims[i])


def test_to_quantized_keeps_the_ring():
    c = kvcore.RotatingKVCache(max_size=8, keep=2)
    r = ref.RotatingKVCache(max_size=8, keep=2)
    for i, S in enumerate([5, 1, 1, 1, 1, 1, 3, 1]):
        k, v = tokens(i, S)
        c.update_and_fetch(k, v)
        r.update_and_fetch(k, v)
    q = c.to_quantized(group_size=32, bits=(8, 4))
    assert type(q) is kvcore.QuantizedRotatingKVCache
    assert (q.offset, q._idx, q.max_size, q.keep) == (c.offset, c._idx, 8, 2)
    assert (q.group_size, q.bits) == (32, (8, 4))
    assert_triples_equal(quantize(c.keys, 32, 8), q.keys, "keys")
    assert_triples_equal(quantize(c.values, 32, 4), q.values, "values")
    # And on from there, as the float ring quantized.
    for i in range(6):
        k, v = tokens(100 + i, 1)
        gk, gv = q.update_and_fetch(k, v)
        wk, wv = r.update_and_fetch(k, v)
        assert_triples_equal(quantize(wk, 32, 8), gk, f"keys {i}")
        assert_triples_equal(quantize(wv, 32, 4), gv, f"values {i}")


def test_mlx_lm_refuses_where_kvcore_quantizes():
    with pytest.raises(NotImplementedError):
        ref.RotatingKVCache(max_size=8).to_quantized()
    assert type(kvcore.RotatingKVCache(max_size=8).to_quantized()) is kvcore.QuantizedRotatingKVCache


def test_bytes_per_token_at_4_bits():
    c = kvcore.RotatingKVCache(max_size=256)
    k, v = tokens(0, 256)
    c.update_and_fetch(k, v)
    q4 = c.to_quantized(group_size=64, bits=4)
    q84 = c.to_quantized(group_size=64, bits=(8, 4))
    assert q4.nbytes / c.nbytes == pytest.approx((D * 4 / 8 + 2 * 2 * D / 64) / (2 * D))
    assert q4.nbytes <= 0.3 * c.nbytes
    assert q4.nbytes < q84.nbytes < c.nbytes


def test_state_round_trip_and_copies():
    q = kvcore.QuantizedRotatingKVCache(6, 1, group_size=64, bits=(8, 4))
    for i, S in enumerate([3, 1, 1, 1, 1, 2]):
        q.update_and_fetch(*tokens(i, S))
    state = q.state
    assert state[2:] == (q.offset, 1, 6, q._idx, 64, (8, 4))
    r = kvcore.QuantizedRotatingKVCache.from_state(state)
    assert (r.offset, r._idx, r.bits) == (q.offset, q._idx, (8, 4))
    assert_triples_equal(q.keys, r.keys, "keys")
    c = copy.deepcopy(q)
    k, v = tokens(50, 1)
    assert_triples_equal(q.update_and_fetch(k, v)[0], c.update_and_fetch(k, v)[0], "after copy")


def test_file_round_trip_names_the_class(tmp_path):
    q = kvcore.QuantizedRotatingKVCache(8, 2, group_size=64, bits=(8, 4))
    for i, S in enumerate([5, 1, 1, 1, 1, 1]):
        q.update_and_fetch(*tokens(i, S))
    path = str(tmp_path / "q.safetensors")
    kvcore.save_prompt_cache(path, [q], {"m": "x"})
    (r,), meta = kvcore.load_prompt_cache(path, return_metadata=True)
    assert meta == {"m": "x"}
    assert type(r) is kvcore.QuantizedRotatingKVCache
    assert (r.offset, r._idx, r.keep, r.max_size, r.group_size, r.bits) == (
        q.offset, q._idx, 2, 8, 64, (8, 4))
    assert_triples_equal(q.values, r.values, "values")
    assert mx.load(path, return_metadata=True)[1]["1.0"] == "QuantizedRotatingKVCache"
    # mlx-lm has no such class: it refuses the file (kvcore names the kind).
    with pytest.raises(KeyError, match="QuantizedRotatingKVCache"):
        ref.load_prompt_cache(path)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"bits": 7}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 7"),
        ({"bits": (8, 1)}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 1"),
        ({"group_size": 48}, r"group_size in \{32, 64, 128\} but got 48"),
        ({"bits": (8, 4, 2)}, r"bits as an int or a \(keys, values\) pair"),
    ],
)
def test_bad_settings_raise_typed(kwargs, pattern):
    with pytest.raises(kvcore.CacheValueError, match=pattern):
        kvcore.QuantizedRotatingKVCache(8, **kwargs)
    c = kvcore.RotatingKVCache(max_size=8)
    c.update_and_fetch(*tokens(0, 3))
    before = c.state
    with pytest.raises(kvcore.CacheValueError, match=pattern):
        c.to_quantized(**kwargs)
    assert c.state[2:] == before[2:]


def test_head_dim_not_divisible_leaves_cache_unchanged():
    q = kvcore.QuantizedRotatingKVCache(8, group_size=64, bits=4)
    q.update_and_fetch(*tokens(0, 2))
    state = q.state
    k = mx.zeros((1, H, 1, 48), mx.float16)
    with pytest.raises(kvcore.CacheValueError, match="head dim divisible by group_size 64"):
        q.update_and_fetch(k, k)
    assert (q.offset, q._idx) == (state[2], state[5])
    assert_triples_equal(state[0], q.keys, "keys")


def test_integer_keys_cannot_be_quantized():
    q = kvcore.QuantizedRotatingKVCache(8)
    k = mx.zeros((1, H, 1, D), mx.int32)
    with pytest.raises(kvcore.CacheValueError, match="int32"):
        q.update_and_fetch(k, k)
    assert q.empty() and q.offset == 0
