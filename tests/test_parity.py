"""Differential tests: kvcore's caches against mlx-lm's, side by side.

Each hypothesis test drives the same random operation sequence on an mlx-lm
cache and a kvcore cache and, after every operation, compares everything
observable: returned arrays (shape, dtype, bits), offset, size(), empty(),
nbytes, is_trimmable(), state, keys_and_values() and make_mask().

Two intended differences have their own tests below:
  * RotatingKVCache.trim of n > 0 tokens once tokens were rotated out:
    mlx-lm moves its cursor back silently, kvcore raises CacheRuntimeError.
  * ConcatenateKVCache.trim: mlx-lm only lowers offset (the next update
    brings the trimmed tokens back), kvcore drops them for good.
"""

import contextlib
import copy

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlx_lm.models import cache as ref

import kvcore
from conftest import (
    assert_arrays_equal,
    assert_masks_equal,
    assert_states_equal,
    int_valued_normal,
)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def class_step(name, step):
    """Set ``step`` on both mlx-lm's and kvcore's class ``name``; restore after."""
    classes = (getattr(ref, name), getattr(kvcore, name))
    saved = [c.__dict__["step"] for c in classes]
    try:
        for c in classes:
            c.step = step
        yield
    finally:
        for c, s in zip(classes, saved):
            c.step = s


class Inputs:
    """Deterministic integer-valued keys/values: each call returns two
    independent, identical (keys, values) pairs, one per cache."""

    def __init__(self, seed, dtype, B, H, Dk, Dv):
        self.key = mx.random.key(seed)
        self.dtype, self.B, self.H, self.Dk, self.Dv = dtype, B, H, Dk, Dv

    def next(self, S):
        self.key, kk, vk = mx.random.split(self.key, 3)
        shape_k = (self.B, self.H, S, self.Dk)
        shape_v = (self.B, self.H, S, self.Dv)
        a = (int_valued_normal(kk, shape_k, self.dtype), int_valued_normal(vk, shape_v, self.dtype))
        b = (int_valued_normal(kk, shape_k, self.dtype), int_valued_normal(vk, shape_v, self.dtype))
        return a, b


def draw_geometry(data):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B = data.draw(st.sampled_from([1, 2]), label="B")
    H = data.draw(st.sampled_from([1, 2]), label="H")
    Dk = data.draw(st.sampled_from([4, 8]), label="Dk")
    Dv = data.draw(st.sampled_from([4, 8]), label="Dv")
    return Inputs(seed, dtype, B, H, Dk, Dv)


def update_both(r, k, inputs, S):
    (rk_in, rv_in), (kk_in, kv_in) = inputs.next(S)
    rk, rv = r.update_and_fetch(rk_in, rv_in)
    kk, kv = k.update_and_fetch(kk_in, kv_in)
    mx.eval(rk, rv, kk, kv)
    assert isinstance(kk, mx.array) and isinstance(kv, mx.array)
    assert_arrays_equal(rk, kk, f"update_and_fetch(S={S}) keys")
    assert_arrays_equal(rv, kv, f"update_and_fetch(S={S}) values")


def compare_common(r, k):
    assert type(k.offset) is int
    assert r.offset == k.offset, f"offset {r.offset} != {k.offset}"
    assert r.empty() == k.empty(), "empty()"
    assert r.size() == k.size(), f"size() {r.size()} != {k.size()}"
    assert r.nbytes == k.nbytes, f"nbytes {r.nbytes} != {k.nbytes}"
    assert r.is_trimmable() == k.is_trimmable(), "is_trimmable()"
    rs, ks = r.state, k.state
    mx.eval([a for a in (*rs, *ks) if isinstance(a, mx.array)])
    assert_states_equal(rs, ks)
    for name in ("keys", "values"):
        ra, ka = getattr(r, name), getattr(k, name)
        if ra is None:
            assert ka is None, name
        else:
            assert_arrays_equal(ra, ka, name)
    if not r.empty():
        rk, rv = r.keys_and_values()
        kk, kv = k.keys_and_values()
        mx.eval(rk, rv, kk, kv)
        assert_arrays_equal(rk, kk, "keys_and_values() keys")
        assert_arrays_equal(rv, kv, "keys_and_values() values")


def compare_full_attention_masks(r, k, data):
    """KVCache / ConcatenateKVCache.make_mask, called as mlx-lm's
    base.create_attention_mask calls it (both keywords given)."""
    for _ in range(data.draw(st.integers(1, 3), label="n_masks")):
        N = data.draw(st.integers(1, 5), label="N")
        return_array = data.draw(st.booleans(), label="return_array")
        window_size = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="window_size")
        rm = r.make_mask(N, return_array=return_array, window_size=window_size)
        km = k.make_mask(N, return_array=return_array, window_size=window_size)
        assert_masks_equal(
            rm, km, f"make_mask({N}, return_array={return_array}, window_size={window_size})"
        )


def compare_rotating_masks(r, k, data):
    max_size = r.max_size
    windows = st.none() if max_size < 2 else st.one_of(st.none(), st.integers(1, max_size - 1))
    for _ in range(data.draw(st.integers(1, 3), label="n_masks")):
        N = data.draw(st.integers(1, 5), label="N")
        return_array = data.draw(st.booleans(), label="return_array")
        window_size = data.draw(windows, label="window_size")
        rm = r.make_mask(N, window_size=window_size, return_array=return_array)
        km = k.make_mask(N, window_size=window_size, return_array=return_array)
        assert_masks_equal(
            rm, km, f"make_mask({N}, window_size={window_size}, return_array={return_array})"
        )


def compare_rotating(r, k, data):
    compare_common(r, k)
    assert (r.keep, r.max_size, r._idx) == (k.keep, k.max_size, k._idx), (
        f"(keep, max_size, _idx) {(r.keep, r.max_size, r._idx)} != "
        f"{(k.keep, k.max_size, k._idx)}"
    )
    compare_rotating_masks(r, k, data)


def round_trip(r, k, how):
    """Replace both caches by a state round trip or a copy of themselves."""
    if how == "from_state":
        return type(r).from_state(r.state), type(k).from_state(k.state)
    if how == "copy":
        return copy.copy(r), copy.copy(k)
    if how == "deepcopy":
        return copy.deepcopy(r), copy.deepcopy(k)
    raise AssertionError(how)


# KVCache -------------------------------------------------------------------

SEQ_LENGTHS = st.one_of(st.just(1), st.integers(1, 8), st.integers(1, 300))


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_kvcache_matches_mlx_lm_over_random_operation_sequences(data):
    inputs = draw_geometry(data)
    step = data.draw(st.sampled_from([256, 256, 3, 16]), label="step")
    ops = st.sampled_from(
        ["update"] * 5 + ["trim", "from_state", "state_setter", "copy", "deepcopy"]
    )
    with class_step("KVCache", step):
        r, k = ref.KVCache(), kvcore.KVCache()
        compare_common(r, k)
        compare_full_attention_masks(r, k, data)
        for _ in range(data.draw(st.integers(1, 12), label="n_ops")):
            op = data.draw(ops, label="op")
            if op == "update":
                cap = 0 if r.keys is None else r.keys.shape[2]
                update_both(r, k, inputs, data.draw(SEQ_LENGTHS, label="S"))
                if r.keys.shape[2] != cap:
                    event("buffer grew" + (" (not from empty)" if cap else ""))
            elif op == "trim":
                assert r.is_trimmable() and k.is_trimmable()
                n = data.draw(st.integers(0, r.offset + 3), label="n")
                event("trim n > offset" if n > r.offset else "trim n <= offset")
                assert r.trim(n) == k.trim(n)
            elif op == "state_setter":
                r2, k2 = ref.KVCache(), kvcore.KVCache()
                r2.state, k2.state = r.state, k.state
                r, k = r2, k2
            else:
                r, k = round_trip(r, k, op)
            compare_common(r, k)
            compare_full_attention_masks(r, k, data)


# RotatingKVCache -------------------------------------------------------------


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_rotating_kvcache_matches_mlx_lm_over_random_operation_sequences(data):
    inputs = draw_geometry(data)
    max_size = data.draw(st.integers(2, 40), label="max_size")
    keep = data.draw(st.integers(0, min(4, max_size - 1)), label="keep")
    step = data.draw(st.sampled_from([1, 3, 4, 8]), label="step")
    ops = st.sampled_from(
        ["update1"] * 4
        + ["burst"] * 3
        + ["update"] * 2
        + ["trim", "from_state", "state_setter", "copy", "deepcopy"]
    )
    with class_step("RotatingKVCache", step):
        r = ref.RotatingKVCache(max_size, keep)
        k = kvcore.RotatingKVCache(max_size, keep)
        compare_rotating(r, k, data)
        for _ in range(data.draw(st.integers(1, 14), label="n_ops")):
            op = data.draw(ops, label="op")
            if op == "update1":
                update_both(r, k, inputs, 1)
                if r.offset > max_size:
                    event("single token into a full ring")
            elif op == "burst":
                # A run of single tokens, checked after each: fills and rotates.
                for _ in range(data.draw(st.integers(1, max_size + 4), label="burst")):
                    update_both(r, k, inputs, 1)
                    if r.offset > max_size:
                        event("single token into a full ring")
                    compare_rotating(r, k, data)
            elif op == "update":
                # S > 1 takes the concat path; up to beyond max_size.
                S = data.draw(st.integers(2, max_size + 4), label="S")
                if not r.empty():
                    event("concat onto a rotated ring" if r._idx < r.offset else "concat")
                if S > max_size:
                    event("concat with S > max_size")
                update_both(r, k, inputs, S)
            elif op == "trim":
                if r.is_trimmable():
                    n = data.draw(st.integers(0, r.offset + 3), label="n")
                    event("trim before rotation")
                else:
                    n = 0  # the only trim both agree on once rotated
                assert r.trim(n) == k.trim(n)
            elif op == "state_setter":
                r2 = ref.RotatingKVCache(max_size + 1)
                k2 = kvcore.RotatingKVCache(max_size + 1)
                r2.state, k2.state = r.state, k.state
                r, k = r2, k2
            else:
                r, k = round_trip(r, k, op)
            compare_rotating(r, k, data)


def test_rotating_trim_after_rotation_mlx_lm_moves_cursor_kvcore_raises():
    """Intended difference. Once tokens were rotated out (offset >= max_size),
    mlx-lm's trim(n) still lowers offset and _idx, pointing the cursor at
    slots that no longer hold those tokens; kvcore raises CacheRuntimeError
    and leaves the cache as it was."""
    inputs = Inputs(0, mx.float32, 1, 1, 4, 4)
    with class_step("RotatingKVCache", 4):
        r, k = ref.RotatingKVCache(4, keep=1), kvcore.RotatingKVCache(4, keep=1)
        for _ in range(6):
            update_both(r, k, inputs, 1)
        assert (r.offset, r._idx) == (k.offset, k._idx) == (6, 3)
        assert not r.is_trimmable() and not k.is_trimmable()
        before = k.state
        mx.eval([a for a in before if isinstance(a, mx.array)])

        # trim(0) is fine on both.
        assert r.trim(0) == k.trim(0) == 0
        compare_common(r, k)

        assert r.trim(2) == 2
        assert (r.offset, r._idx) == (4, 1)
        with pytest.raises(kvcore.CacheRuntimeError):
            k.trim(2)
        assert isinstance(kvcore.CacheRuntimeError(), RuntimeError)
        assert_states_equal(before, k.state)
        assert (k.offset, k._idx) == (6, 3)


# ConcatenateKVCache --------------------------------------------------------


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_concatenate_kvcache_matches_mlx_lm_over_random_operation_sequences(data):
    inputs = draw_geometry(data)
    ops = st.sampled_from(["update"] * 4 + ["from_state", "state_setter", "copy", "deepcopy"])
    r, k = ref.ConcatenateKVCache(), kvcore.ConcatenateKVCache()
    compare_common(r, k)
    compare_full_attention_masks(r, k, data)
    for _ in range(data.draw(st.integers(1, 10), label="n_ops")):
        op = data.draw(ops, label="op")
        if op == "update" or r.empty():  # mlx-lm cannot restore an empty state
            update_both(r, k, inputs, data.draw(st.integers(1, 20), label="S"))
        elif op == "state_setter":
            r2, k2 = ref.ConcatenateKVCache(), kvcore.ConcatenateKVCache()
            r2.state, k2.state = r.state, k.state
            r, k = r2, k2
        else:
            r, k = round_trip(r, k, op)
        compare_common(r, k)
        compare_full_attention_masks(r, k, data)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_concatenate_kvcache_trim_drops_tokens_per_hand_built_model(data):
    """kvcore's ConcatenateKVCache against the content built by hand: all
    tokens concatenated, trims cutting the tail off for good. Masks are
    checked against mlx-lm's create_attention_mask at the model's offset."""
    inputs = draw_geometry(data)
    k = kvcore.ConcatenateKVCache()
    exp_k = exp_v = None
    for _ in range(data.draw(st.integers(1, 10), label="n_ops")):
        if exp_k is not None and data.draw(st.booleans(), label="trim?"):
            n = data.draw(st.integers(0, exp_k.shape[2] + 3), label="n")
            assert k.trim(n) == min(n, exp_k.shape[2])
            end = max(exp_k.shape[2] - n, 0)
            exp_k, exp_v = exp_k[..., :end, :], exp_v[..., :end, :]
        else:
            S = data.draw(st.integers(1, 20), label="S")
            (ek, ev), (kk_in, kv_in) = inputs.next(S)
            out_k, out_v = k.update_and_fetch(kk_in, kv_in)
            exp_k = ek if exp_k is None else mx.concatenate([exp_k, ek], axis=2)
            exp_v = ev if exp_v is None else mx.concatenate([exp_v, ev], axis=2)
            mx.eval(out_k, out_v, exp_k, exp_v)
            assert_arrays_equal(exp_k, out_k, "returned keys")
            assert_arrays_equal(exp_v, out_v, "returned values")
        assert k.offset == exp_k.shape[2]
        assert_states_equal((exp_k, exp_v), k.state)
        got_k, got_v = k.keys_and_values()
        assert_arrays_equal(exp_k, got_k, "keys_and_values() keys")
        assert_arrays_equal(exp_v, got_v, "keys_and_values() values")
        assert k.nbytes == exp_k.nbytes + exp_v.nbytes
        N = data.draw(st.integers(1, 5), label="N")
        ra = data.draw(st.booleans(), label="return_array")
        ws = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="window_size")
        assert_masks_equal(
            ref.create_attention_mask(N, k.offset, ra, ws),
            k.make_mask(N, return_array=ra, window_size=ws),
        )


def test_concatenate_trim_mlx_lm_does_not_stick_kvcore_does():
    """Intended difference. mlx-lm's ConcatenateKVCache.trim only lowers
    offset: keys_and_values() still returns the trimmed tokens and the next
    update concatenates onto them. kvcore drops them."""
    inputs = Inputs(1, mx.float32, 1, 2, 4, 8)
    (k5, v5), (k5b, v5b) = inputs.next(5)
    (k1, v1), (k1b, v1b) = inputs.next(1)
    r, k = ref.ConcatenateKVCache(), kvcore.ConcatenateKVCache()
    r.update_and_fetch(k5, v5)
    k.update_and_fetch(k5b, v5b)
    assert r.trim(2) == k.trim(2) == 2

    # After trim: mlx-lm's offset and keys disagree; kvcore's agree.
    assert r.offset == 3 and r.keys_and_values()[0].shape[2] == 5
    assert k.offset == 3
    assert_arrays_equal(k5[..., :3, :], k.keys_and_values()[0])
    assert_arrays_equal(v5[..., :3, :], k.keys_and_values()[1])

    # After one more token: mlx-lm has the two trimmed tokens back.
    rk, rv = r.update_and_fetch(k1, v1)
    kk, kv = k.update_and_fetch(k1b, v1b)
    mx.eval(rk, rv, kk, kv)
    assert_arrays_equal(mx.concatenate([k5, k1], axis=2), rk)
    assert r.offset == 6  # 3 kept + 1 new would be 4

    expected_k = mx.concatenate([k5[..., :3, :], k1], axis=2)
    expected_v = mx.concatenate([v5[..., :3, :], v1], axis=2)
    assert_arrays_equal(expected_k, kk)
    assert_arrays_equal(expected_v, kv)
    assert k.offset == 4 == kk.shape[2]
    assert_states_equal((expected_k, expected_v), k.state)


def test_concatenate_size_matches_mlx_lm():
    """mlx-lm's ConcatenateKVCache does not override _BaseCache.size(), so it
    reports 0 at any fill level."""
    inputs = Inputs(2, mx.float16, 1, 1, 4, 4)
    r, k = ref.ConcatenateKVCache(), kvcore.ConcatenateKVCache()
    assert r.size() == k.size()
    update_both(r, k, inputs, 3)
    assert r.size() == k.size()


# Prompt-cache helpers ------------------------------------------------------


class _Model:
    def __init__(self, n_layers):
        self.layers = [None] * n_layers


def test_prompt_cache_helpers_match_mlx_lm():
    inputs = Inputs(3, mx.float32, 1, 1, 4, 4)
    for max_kv_size in (None, 6):
        rc = ref.make_prompt_cache(_Model(3), max_kv_size=max_kv_size)
        kc = kvcore.make_prompt_cache(_Model(3), max_kv_size=max_kv_size)
        assert [type(c).__name__ for c in rc] == [type(c).__name__ for c in kc]
        if max_kv_size is not None:
            assert [(c.max_size, c.keep) for c in rc] == [(c.max_size, c.keep) for c in kc]
        for S in (5, 1, 1):
            assert ref.can_trim_prompt_cache(rc) == kvcore.can_trim_prompt_cache(kc)
            assert ref.trim_prompt_cache(rc, 0) == kvcore.trim_prompt_cache(kc, 0)
            for r, k in zip(rc, kc):
                update_both(r, k, inputs, S)
        assert ref.can_trim_prompt_cache(rc) == kvcore.can_trim_prompt_cache(kc)
        assert ref.trim_prompt_cache(rc, 2) == kvcore.trim_prompt_cache(kc, 2)
        for r, k in zip(rc, kc):
            compare_common(r, k)
    assert ref.trim_prompt_cache([], 2) == kvcore.trim_prompt_cache([], 2)
