"""Mask parity with mlx-lm: create_causal_mask, create_attention_mask and
RotatingKVCache.make_mask (including the rolled ring mask).

Every hand-written expected mask is also checked against mlx-lm's result in
the same test."""

import contextlib

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import base as ref_base
from mlx_lm.models import cache as ref

import kvcore
from conftest import assert_arrays_equal, assert_masks_equal, int_valued_normal

T, F = True, False


def bool_array(rows):
    return mx.array(rows, dtype=mx.bool_)


def check_causal(expected, *args, **kwargs):
    """kvcore.create_causal_mask == mlx-lm's == expected (bool)."""
    want = ref_base.create_causal_mask(*args, **kwargs)
    got = kvcore.create_causal_mask(*args, **kwargs)
    assert want.dtype == mx.bool_
    assert_arrays_equal(want, got)
    if expected is not None:
        assert_arrays_equal(bool_array(expected), want)


# create_causal_mask -------------------------------------------------------


def test_create_causal_mask_plain_matches_mlx_lm():
    check_causal([[T, F, F], [T, T, F], [T, T, T]], 3)
    check_causal([[T, T, T, F], [T, T, T, T]], 2, 2)
    check_causal([[T]], 1)
    check_causal([[T, T, T, T, T]], 1, 4)


def test_create_causal_mask_window_matches_mlx_lm():
    check_causal(
        [[F, T, T, F, F], [F, F, T, T, F], [F, F, F, T, T]], 3, 2, window_size=2
    )
    check_causal([[F, F, F, T, T]], 1, offset=4, window_size=2)
    # window_size=0 is a real window (nothing visible), not "no window".
    check_causal([[F, F], [F, F]], 2, window_size=0)


def test_create_causal_mask_padding_matches_mlx_lm():
    right = mx.array([0, 2], dtype=mx.int32)
    check_causal(
        [
            [[[T, T, F], [T, T, T]]],
            [[[T, F, F], [T, F, F]]],
        ],
        2,
        1,
        right_padding=right,
    )
    left = mx.array([1, 0], dtype=mx.int32)
    check_causal(
        [
            [[[F, T, F], [F, T, T]]],
            [[[T, T, F], [T, T, T]]],
        ],
        2,
        1,
        left_padding=left,
    )
    check_causal(
        [
            [[[F, T, F], [F, T, T]]],
            [[[T, F, F], [T, F, F]]],
        ],
        2,
        1,
        right_padding=right,
        left_padding=left,
    )


def test_create_causal_mask_keyword_defaults_match_mlx_lm():
    for N in (1, 2, 5):
        assert_arrays_equal(ref_base.create_causal_mask(N), kvcore.create_causal_mask(N))
        assert_arrays_equal(
            ref_base.create_causal_mask(N, offset=3),
            kvcore.create_causal_mask(N, offset=3),
        )


@st.composite
def paddings(draw, total):
    B = draw(st.integers(1, 3), label="B")
    return mx.array(draw(st.lists(st.integers(0, total), min_size=B, max_size=B)), dtype=mx.int32)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_create_causal_mask_matches_mlx_lm_over_random_arguments(data):
    N = data.draw(st.integers(1, 12), label="N")
    offset = data.draw(st.integers(0, 40), label="offset")
    window_size = data.draw(st.one_of(st.none(), st.integers(0, 20)), label="window_size")
    kwargs = {}
    if data.draw(st.booleans(), label="right?"):
        kwargs["right_padding"] = data.draw(paddings(offset + N), label="right_padding")
    if data.draw(st.booleans(), label="left?"):
        lp = data.draw(paddings(offset + N), label="left_padding")
        if "right_padding" in kwargs:  # same batch size
            B = kwargs["right_padding"].shape[0]
            lp = mx.concatenate([lp] * B)[:B]
        kwargs["left_padding"] = lp
    want = ref_base.create_causal_mask(N, offset, window_size=window_size, **kwargs)
    got = kvcore.create_causal_mask(N, offset, window_size=window_size, **kwargs)
    assert want.dtype == mx.bool_
    assert_arrays_equal(want, got)


# create_attention_mask -----------------------------------------------------


def check_attention(expected, N, offset, return_array, window_size):
    want = ref.create_attention_mask(N, offset, return_array, window_size)
    got = kvcore.create_attention_mask(N, offset, return_array, window_size)
    assert_masks_equal(want, got)
    if isinstance(expected, list):
        assert_arrays_equal(bool_array(expected), want)
    else:
        assert want == expected


def test_create_attention_mask_with_window_returns_windowed_array():
    # The window branch comes first: an array even for one token.
    check_attention([[F, F, T, T]], 1, 3, False, 2)
    check_attention([[F, F, T, T]], 1, 3, True, 2)
    check_attention([[T, T, T, F], [F, T, T, T]], 2, 2, False, 3)


def test_create_attention_mask_single_token_returns_none():
    check_attention(None, 1, 0, False, None)
    check_attention(None, 1, 7, False, None)


def test_create_attention_mask_single_token_returns_none_even_with_return_array():
    # mlx-lm checks N == 1 before return_array.
    check_attention(None, 1, 0, True, None)
    check_attention(None, 1, 7, True, None)


def test_create_attention_mask_return_array_returns_causal_array():
    check_attention([[T, T, F], [T, T, T]], 2, 1, True, None)


def test_create_attention_mask_multi_token_returns_causal_string():
    check_attention("causal", 2, 0, False, None)
    check_attention("causal", 5, 9, False, None)


@settings(max_examples=300, deadline=None)
@given(
    N=st.integers(1, 6),
    offset=st.integers(0, 12),
    return_array=st.booleans(),
    window_size=st.one_of(st.none(), st.integers(0, 8)),
)
def test_create_attention_mask_matches_mlx_lm_over_random_arguments(
    N, offset, return_array, window_size
):
    assert_masks_equal(
        ref.create_attention_mask(N, offset, return_array, window_size),
        kvcore.create_attention_mask(N, offset, return_array, window_size),
    )


@pytest.mark.parametrize("cls", ["KVCache", "ConcatenateKVCache"])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("return_array", [False, True])
@pytest.mark.parametrize("window_size", [None, 2])
def test_model_facing_create_attention_mask_matches_mlx_lm(cls, N, return_array, window_size):
    """mlx_lm.models.base.create_attention_mask(h, cache, ...) as models call
    it, with an mlx-lm cache and a kvcore cache holding the same tokens."""
    r, k = getattr(ref, cls)(), getattr(kvcore, cls)()
    x = int_valued_normal(mx.random.key(0), (1, 1, 4, 4), mx.float32)
    r.update_and_fetch(x, x)
    k.update_and_fetch(x, x)
    h = mx.zeros((1, N, 8))
    assert_masks_equal(
        ref_base.create_attention_mask(h, r, window_size=window_size, return_array=return_array),
        ref_base.create_attention_mask(h, k, window_size=window_size, return_array=return_array),
    )


# RotatingKVCache.make_mask -------------------------------------------------


@contextlib.contextmanager
def rotating_step(step):
    classes = (ref.RotatingKVCache, kvcore.RotatingKVCache)
    saved = [c.__dict__["step"] for c in classes]
    try:
        for c in classes:
            c.step = step
        yield
    finally:
        for c, s in zip(classes, saved):
            c.step = s


def feed_single_tokens(caches, n, seed=0):
    key = mx.random.key(seed)
    for _ in range(n):
        key, sub = mx.random.split(key)
        for c in caches:
            x = int_valued_normal(sub, (1, 1, 1, 4), mx.float32)
            c.update_and_fetch(x, x)


def rotating_pair(max_size, keep=0):
    return ref.RotatingKVCache(max_size, keep), kvcore.RotatingKVCache(max_size, keep)


def test_rotating_make_mask_single_token_window_rolls_with_the_ring():
    """max_size 4, window 2, one token at a time: before the ring is full the
    mask covers offset + 1 slots; once full it is rolled so the True slots
    follow the cursor (the newest token and the one before it)."""
    expected = {
        # offset: mask for the next token (keys after its update)
        0: None,
        1: None,
        2: [F, T, T],
        3: [F, F, T, T],
        4: [T, F, F, T],  # next token overwrites slot 0; slot 3 is the newest
        5: [T, T, F, F],
        6: [F, T, T, F],
        7: [F, F, T, T],
        8: [T, F, F, T],
    }
    r, k = rotating_pair(4)
    for offset, want in expected.items():
        assert r.offset == k.offset == offset
        rm = r.make_mask(1, window_size=2)
        km = k.make_mask(1, window_size=2)
        assert_masks_equal(rm, km, f"offset {offset}")
        if want is None:
            assert rm is None
        else:
            assert_arrays_equal(bool_array(want), rm, f"offset {offset}")
        feed_single_tokens([r, k], 1, seed=offset)


def test_rotating_make_mask_single_token_window_with_keep_matches_mlx_lm():
    """With keep > 0 mlx-lm still rolls by the cursor from slot 0 (it does
    not skip the pinned slots); kvcore returns the same masks."""
    expected = {
        4: [T, F, F, T],
        5: [F, T, T, F],
        6: [F, F, T, T],
        7: [T, F, F, T],
    }
    r, k = rotating_pair(4, keep=1)
    feed_single_tokens([r, k], 4)
    for offset, want in expected.items():
        assert r.offset == k.offset == offset
        assert r._idx == k._idx
        rm = r.make_mask(1, window_size=2)
        assert_masks_equal(rm, k.make_mask(1, window_size=2), f"offset {offset}")
        assert_arrays_equal(bool_array(want), rm, f"offset {offset}")
        feed_single_tokens([r, k], 1, seed=offset)


def test_rotating_make_mask_single_token_without_narrower_window_is_none():
    r, k = rotating_pair(4)
    feed_single_tokens([r, k], 6)
    for window_size in (None, 4, 9):
        for return_array in (False, True):
            rm = r.make_mask(1, window_size=window_size, return_array=return_array)
            km = k.make_mask(1, window_size=window_size, return_array=return_array)
            assert rm is None
            assert_masks_equal(rm, km)


def test_rotating_make_mask_multi_token_clamps_offset_to_the_window():
    """N > 1: offset is clamped to max_size - 1 and the window defaults to
    max_size; "causal" only while the whole block fits in the window."""
    r, k = rotating_pair(4)
    feed_single_tokens([r, k], 10)
    rm = r.make_mask(2)
    assert_masks_equal(rm, k.make_mask(2))
    assert_arrays_equal(bool_array([[T, T, T, T, F], [F, T, T, T, T]]), rm)

    r, k = rotating_pair(8)
    feed_single_tokens([r, k], 2)
    for kwargs, want in [
        ({}, "causal"),
        ({"return_array": True}, [[T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]]),
        ({"window_size": 2}, [[F, T, T, F, F], [F, F, T, T, F], [F, F, F, T, T]]),
    ]:
        rm = r.make_mask(3, **kwargs)
        assert_masks_equal(rm, k.make_mask(3, **kwargs), str(kwargs))
        if isinstance(want, str):
            assert rm == want
        else:
            assert_arrays_equal(bool_array(want), rm, str(kwargs))


@settings(max_examples=250, deadline=None)
@given(
    max_size=st.integers(2, 10),
    keep_frac=st.integers(0, 3),
    step=st.sampled_from([1, 3, 256]),
    window_frac=st.integers(1, 9),
    n_tokens=st.integers(0, 25),
    prefill=st.integers(0, 14),
)
def test_rotating_make_mask_single_token_window_matches_mlx_lm_as_the_ring_fills(
    max_size, keep_frac, step, window_frac, n_tokens, prefill
):
    keep = min(keep_frac, max_size - 1)
    window_size = 1 + window_frac % (max_size - 1)  # 1 .. max_size - 1
    with rotating_step(step):
        r, k = rotating_pair(max_size, keep)
        if prefill > 1:  # the concat path first, maybe beyond max_size
            x = int_valued_normal(mx.random.key(99), (1, 1, prefill, 4), mx.float16)
            r.update_and_fetch(x, x)
            k.update_and_fetch(mx.array(x), mx.array(x))
        for i in range(n_tokens + 1):
            for N in (1, 2):
                for return_array in (False, True):
                    assert_masks_equal(
                        r.make_mask(N, window_size=window_size, return_array=return_array),
                        k.make_mask(N, window_size=window_size, return_array=return_array),
                        f"offset {r.offset} _idx {r._idx} N {N}",
                    )
            x = int_valued_normal(mx.random.key(i), (1, 1, 1, 4), mx.float16)
            r.update_and_fetch(x, x)
            k.update_and_fetch(mx.array(x), mx.array(x))
