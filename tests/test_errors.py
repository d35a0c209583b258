"""Bad input gives a typed kvcore error and leaves the cache as it was.

Every case checks, against mlx-lm's caches fed the same valid sequence:

* the error is the kvcore type *and* the matching built-in (CacheValueError
  is a ValueError, ...), its message reads "[context] expected X but got Y"
  and names the problem;
* the cache is unchanged: offset, _idx/keep/max_size, the state arrays
  (values, dtype, shape, and the very buffer, by data pointer);
* the cache still works: a valid update afterwards returns exactly what
  mlx-lm's cache returns for the same valid sequence.

Deliberate differences from mlx-lm (documented by kvcore): mismatched
dtypes raise where mlx-lm casts, a negative trim raises where mlx-lm moves
the offset forward, and trim on a rotated RotatingKVCache raises.
"""

import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx_lm.models.base as ref_base
import mlx_lm.models.cache as ref
import numpy as np
import pytest

import kvcore

B, H, D = 1, 2, 4

KINDS = ["KVCache", "ConcatenateKVCache", "RotatingKVCache"]
# RotatingKVCache(max_size=8, keep=2) everywhere.
ROT_ARGS = (8, 2)


# --------------------------------------------------------------------------
# helpers


def rand(S, seed, b=B, h=H, d=D, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((b, h, S, d)).astype(dtype)


def make(kind):
    """(kvcore cache, mlx-lm cache) of the same kind, both fresh."""
    args = ROT_ARGS if kind == "RotatingKVCache" else ()
    return getattr(kvcore, kind)(*args), getattr(ref, kind)(*args)


def feed(caches, lengths, seed=0):
    """Feed the same valid updates (fresh arrays per cache) to every cache."""
    outs = []
    for i, S in enumerate(lengths):
        k, v = rand(S, seed + 2 * i), rand(S, seed + 2 * i + 1)
        outs.append([c.update_and_fetch(mx.array(k), mx.array(v)) for c in caches])
    return outs


def ptr(a):
    """Data pointer of an (evaluated) mlx array: identifies the buffer."""
    mx.eval(a)
    return np.asarray(memoryview(a)).ctypes.data


def snapshot(c):
    snap = {"offset": c.offset, "type": type(c), "empty": c.empty()}
    for attr in ("_idx", "keep", "max_size"):
        if hasattr(c, attr):
            snap[attr] = getattr(c, attr)
    st = c.state
    snap["state_scalars"] = tuple(x for x in st if not isinstance(x, mx.array) and x is not None)
    arrays = []
    for x in (c.keys, c.values) + tuple(st):
        if isinstance(x, mx.array):
            arrays.append((x.shape, x.dtype, np.array(x, copy=True), ptr(x)))
        else:
            arrays.append(x)
    snap["arrays"] = arrays
    return snap


def assert_same_snapshot(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "arrays":
            continue
        assert a[key] == b[key], key
    assert len(a["arrays"]) == len(b["arrays"])
    for x, y in zip(a["arrays"], b["arrays"]):
        if x is None or y is None or isinstance(x, int):
            assert x == y
            continue
        assert x[0] == y[0] and x[1] == y[1], "shape/dtype changed"
        assert np.array_equal(x[2], y[2]), "contents changed"
        assert x[3] == y[3], "buffer replaced"


def assert_typed(excinfo, base, builtin):
    e = excinfo.value
    assert isinstance(e, base)
    assert isinstance(e, builtin)
    assert isinstance(e, kvcore.CacheError)
    assert isinstance(e.context, str) and e.context
    assert isinstance(e.expected, str) and isinstance(e.actual, str)
    if e.expected:
        assert str(e) == f"[{e.context}] expected {e.expected} but got {e.actual}"
    else:
        assert str(e).startswith(f"[{e.context}] ")


def raises_value(fn, match):
    with pytest.raises(kvcore.CacheValueError, match=match) as ei:
        fn()
    assert_typed(ei, kvcore.CacheValueError, ValueError)
    return ei.value


def assert_equal_arrays(a, b):
    assert type(a) is mx.array and type(b) is mx.array
    assert a.shape == b.shape and a.dtype == b.dtype
    assert mx.array_equal(a, b).item()


def assert_same_cache(c, r):
    assert c.offset == r.offset
    if hasattr(r, "_idx"):
        assert c._idx == r._idx
    for x, y in zip(c.state, r.state):
        if isinstance(y, mx.array):
            assert_equal_arrays(x, y)
        else:
            assert x == y


def assert_recovers(c, r, seed=100):
    """A valid single-token and multi-token update behaves as in mlx-lm."""
    # Compare each result at once: mlx-lm's RotatingKVCache hands out its own
    # buffer, which its next single-token update overwrites in place.
    for i, S in enumerate([1, 3, 1]):
        (ck, cv), (rk, rv) = feed([c, r], [S], seed=seed + 10 * i)[0]
        assert_equal_arrays(ck, rk)
        assert_equal_arrays(cv, rv)
        assert_same_cache(c, r)


# Prefixes fed before the bad call: empty cache, a partly filled one, and
# (for the 8-slot rotating cache) one that has rotated.
PREFIXES = {
    "empty": [],
    "filled": [3, 1],
    "rotated": [5, 1, 1, 1, 1, 1, 1],
}


def combos(prefixes, kinds=KINDS):
    """(kind, prefix) pairs; only the rotating cache has a rotated prefix."""
    return [
        pytest.param(kind, prefix, id=f"{kind}-{prefix}")
        for kind in kinds
        for prefix in prefixes
        if prefix != "rotated" or kind == "RotatingKVCache"
    ]


def prepared(kind, prefix):
    c, r = make(kind)
    feed([c, r], PREFIXES[prefix])
    return c, r


def bad_update(kind, prefix, keys, values, match):
    c, r = prepared(kind, prefix)
    before = snapshot(c)
    raises_value(lambda: c.update_and_fetch(keys, values), match)
    assert_same_snapshot(before, snapshot(c))
    assert_recovers(c, r)


# --------------------------------------------------------------------------
# update_and_fetch: shapes


@pytest.mark.parametrize("kind, prefix", combos(["empty", "filled", "rotated"]))
@pytest.mark.parametrize(
    "kshape, vshape, match",
    [
        ((1, 2, 3), (1, 2, 3, 4), r"keys of rank 4.*but got rank 3"),
        ((2, 3), (1, 2, 3, 4), r"keys of rank 4.*but got rank 2"),
        ((1, 2, 3, 4), (1, 1, 2, 3, 4), r"values of rank 4.*but got rank 5"),
        ((1, 2, 3, 4), (3, 4), r"values of rank 4.*but got rank 2"),
        ((1, 2, 3, 4), (2, 2, 3, 4), r"values with the keys' \(B, n_kv_heads, S\)"),
        ((1, 2, 3, 4), (1, 3, 3, 4), r"values with the keys' \(B, n_kv_heads, S\)"),
        ((1, 2, 3, 4), (1, 2, 2, 4), r"values with the keys' \(B, n_kv_heads, S\).*\(1, 2, 2, 4\)"),
        ((1, 2, 1, 4), (1, 2, 2, 4), r"values with the keys'"),
    ],
)
def test_bad_ranks_and_kv_mismatch(kind, prefix, kshape, vshape, match):
    bad_update(kind, prefix, mx.zeros(kshape), mx.zeros(vshape), match)


@pytest.mark.parametrize("kind, prefix", combos(["filled", "rotated"]))
@pytest.mark.parametrize(
    "kshape, vshape, match",
    [
        ((2, 2, 1, 4), (2, 2, 1, 4), r"keys of shape \(1, 2, S, 4\) like the cache's but got \(2, 2, 1, 4\)"),
        ((1, 3, 1, 4), (1, 3, 1, 4), r"keys of shape \(1, 2, S, 4\).*\(1, 3, 1, 4\)"),
        ((1, 2, 1, 5), (1, 2, 1, 5), r"keys of shape \(1, 2, S, 4\).*\(1, 2, 1, 5\)"),
        ((1, 2, 3, 8), (1, 2, 3, 4), r"keys of shape \(1, 2, S, 4\)"),
        ((1, 2, 1, 4), (1, 2, 1, 6), r"values of shape \(1, 2, S, 4\).*\(1, 2, 1, 6\)"),
    ],
)
def test_update_not_matching_buffer(kind, prefix, kshape, vshape, match):
    bad_update(kind, prefix, mx.zeros(kshape), mx.zeros(vshape), match)


# --------------------------------------------------------------------------
# update_and_fetch: dtypes


# Integer and bool keys are stored like any others (as in mlx-lm; see
# test_dropin_gaps.py): into a float32 cache they are a dtype mismatch.
@pytest.mark.parametrize("kind, prefix", combos(["filled", "rotated"]))
@pytest.mark.parametrize(
    "kdtype, vdtype, match",
    [
        (mx.int32, mx.float32, r"keys of dtype float32 like the cache's but got int32"),
        (mx.float32, mx.int32, r"values of dtype float32 like the cache's but got int32"),
        (mx.uint8, mx.uint8, r"keys of dtype float32 like the cache's but got uint8"),
        (mx.bool_, mx.float32, r"keys of dtype float32 like the cache's but got bool"),
    ],
)
def test_integer_dtypes_into_float_cache(kind, prefix, kdtype, vdtype, match):
    S = 1
    bad_update(
        kind,
        prefix,
        mx.zeros((1, 2, S, 4), dtype=kdtype),
        mx.zeros((1, 2, S, 4), dtype=vdtype),
        match,
    )


@pytest.mark.parametrize("kind, prefix", combos(["filled", "rotated"]))
@pytest.mark.parametrize("S", [1, 3])
def test_float16_into_float32_cache(kind, prefix, S):
    # Deliberate difference: mlx-lm casts (KVCache) or silently promotes.
    k = mx.array(rand(S, 7, dtype=np.float16))
    bad_update(kind, prefix, k, k, r"keys of dtype float32 like the cache's but got float16")
    v = mx.array(rand(S, 8, dtype=np.float16))
    bad_update(
        kind, prefix, mx.array(rand(S, 9)), v,
        r"values of dtype float32 like the cache's but got float16",
    )


@pytest.mark.parametrize("kind", KINDS)
def test_float32_into_float16_cache(kind):
    c, _ = make(kind)
    c.update_and_fetch(mx.array(rand(3, 1, dtype=np.float16)), mx.array(rand(3, 2, dtype=np.float16)))
    before = snapshot(c)
    x = mx.array(rand(1, 3))
    raises_value(lambda: c.update_and_fetch(x, x), r"keys of dtype float16 like the cache's but got float32")
    assert_same_snapshot(before, snapshot(c))
    # Still works with the right dtype, like mlx-lm's cache fed the same.
    r = getattr(ref, kind)(*(ROT_ARGS if kind == "RotatingKVCache" else ()))
    r.update_and_fetch(mx.array(rand(3, 1, dtype=np.float16)), mx.array(rand(3, 2, dtype=np.float16)))
    y = mx.array(rand(1, 4, dtype=np.float16))
    ck, cv = c.update_and_fetch(y, y)
    rk, rv = r.update_and_fetch(y, y)
    assert_equal_arrays(ck, rk)
    assert_equal_arrays(cv, rv)
    assert_same_cache(c, r)


# --------------------------------------------------------------------------
# trim


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [-1, -5, -(2**31)])
def test_negative_trim(kind, n):
    # mlx-lm's trim(-1) *grows* the offset; kvcore refuses.
    c, r = prepared(kind, "filled")
    before = snapshot(c)
    raises_value(lambda: c.trim(n), r"\.trim\] expected n in \[0, 2147483647\] but got -")
    assert_same_snapshot(before, snapshot(c))
    assert c.is_trimmable()
    assert_recovers(c, r)


def test_trim_rotated_rotating_cache_raises_runtime_error():
    # Deliberate: mlx-lm would move _idx back over tokens that are gone.
    c, r = prepared("RotatingKVCache", "rotated")
    assert not c.is_trimmable() and not r.is_trimmable()
    before = snapshot(c)
    with pytest.raises(kvcore.CacheRuntimeError, match=r"RotatingKVCache\.trim.*offset < max_size") as ei:
        c.trim(2)
    assert_typed(ei, kvcore.CacheRuntimeError, RuntimeError)
    assert_same_snapshot(before, snapshot(c))
    assert c.trim(0) == 0
    # trim_prompt_cache refuses quietly, like mlx-lm's.
    assert kvcore.trim_prompt_cache([c], 2) == ref.trim_prompt_cache([r], 2) == 0
    assert_recovers(c, r)


@pytest.mark.parametrize("kind", KINDS)
def test_trim_absurd_n(kind):
    # An n that does not fit in 32 bits: mlx-lm trims everything. kvcore
    # may do the same or raise its typed error, but not nanobind's TypeError.
    c, r = prepared(kind, "filled")
    n = 2**40
    expected = r.trim(n)
    assert expected == 4 and r.offset == 0
    try:
        got = c.trim(n)
    except kvcore.CacheValueError:
        assert c.offset == 4  # refused, unchanged
        c.trim(4)  # trim everything the valid way
    else:
        assert got == expected
    assert c.offset == r.offset == 0
    if kind != "ConcatenateKVCache":  # mlx-lm's Concatenate trim does not stick
        assert_recovers(c, r)


# --------------------------------------------------------------------------
# RotatingKVCache construction


def check_fresh_rotating_works():
    c, r = kvcore.RotatingKVCache(8, 2), ref.RotatingKVCache(8, 2)
    assert_recovers(c, r)
    assert_recovers(c, r, seed=200)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, r"\[RotatingKVCache\] expected max_size in \[1, 2147483647\] but got 0"),
        ((), {"max_size": 0}, r"max_size in \[1, .*but got 0"),
        ((-1,), {}, r"max_size in \[1, .*but got -1"),
        ((), {"max_size": -1, "keep": 0}, r"max_size in \[1, .*but got -1"),
        ((4, 4), {}, r"keep in \[0, max_size\) = \[0, 4\) but got keep 4"),
        ((4,), {"keep": 5}, r"keep in \[0, max_size\) = \[0, 4\) but got keep 5"),
        ((1, 1), {}, r"keep in \[0, max_size\) = \[0, 1\) but got keep 1"),
        ((4, -1), {}, r"keep in \[0, max_size\).*but got keep -1"),
        ((), {"max_size": 8, "keep": -3}, r"but got keep -3"),
    ],
)
def test_rotating_bad_construction(args, kwargs, match):
    raises_value(lambda: kvcore.RotatingKVCache(*args, **kwargs), match)
    check_fresh_rotating_works()


@pytest.mark.parametrize("max_size", [2**40, 2**31, -(2**40)])
def test_rotating_absurd_max_size(max_size):
    # Must be a typed error, not a crash (and not nanobind's TypeError).
    raises_value(lambda: kvcore.RotatingKVCache(max_size=max_size), r"max_size")
    check_fresh_rotating_works()


def test_rotating_largest_max_size_is_lazy():
    # INT32_MAX is accepted and allocates only what is used.
    c = kvcore.RotatingKVCache(max_size=2**31 - 1, keep=4)
    r = ref.RotatingKVCache(max_size=2**31 - 1, keep=4)
    feed([c, r], [1])
    assert c.keys.shape[2] == r.keys.shape[2] == 256
    assert_recovers(c, r)


@pytest.mark.parametrize(
    "attr, value, match",
    [
        ("keep", 8, r"keep in \[0, max_size\) = \[0, 8\) but got keep 8"),
        ("keep", -1, r"but got keep -1"),
        ("max_size", 0, r"max_size in \[1, "),
        ("max_size", 2, r"keep in \[0, max_size\) = \[0, 2\) but got keep 2"),
        ("_idx", -1, r"_idx in \[0, "),
    ],
)
def test_rotating_bad_attribute(attr, value, match):
    c, r = prepared("RotatingKVCache", "filled")
    before = snapshot(c)
    raises_value(lambda: setattr(c, attr, value), match)
    assert_same_snapshot(before, snapshot(c))
    assert_recovers(c, r)


@pytest.mark.parametrize("kind", KINDS)
def test_negative_offset_attribute(kind):
    c, r = prepared(kind, "filled")
    before = snapshot(c)
    raises_value(lambda: setattr(c, "offset", -1), r"offset in \[0, .*but got -1")
    assert_same_snapshot(before, snapshot(c))
    assert_recovers(c, r)


# --------------------------------------------------------------------------
# step


BAD_STEPS = [
    (0, r"step in \[1, 2147483647\] but got 0"),
    (-1, r"step in \[1, 2147483647\] but got -1"),
    ("x", r"\[(KVCache|RotatingKVCache)\.step\] expected a positive integer but got 'x'"),
    (2.5, r"expected a positive integer but got 2\.5"),
    (None, r"expected a positive integer but got None"),
    (True, r"expected a positive integer but got True"),
    (2**40, r"step in \[1, 2147483647\] but got 1099511627776"),
]
STEP_KINDS = ["KVCache", "RotatingKVCache"]


def grow_point(kind):
    """A prepared (kvcore, mlx-lm) pair whose next 1-token update must grow
    the buffer (step 4, 4 tokens in)."""
    c, r = make(kind)
    c.step = r.step = 4
    feed([c, r], [1, 1, 1, 1])
    assert c.keys.shape[2] == r.keys.shape[2] == 4
    return c, r


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("bad, match", BAD_STEPS)
def test_bad_instance_step_at_growth(kind, bad, match):
    c, r = grow_point(kind)
    c.step = bad  # setting is allowed, as in mlx-lm; growing is not
    before = snapshot(c)
    raises_value(lambda: c.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4))), match)
    assert_same_snapshot(before, snapshot(c))
    c.step = 4
    assert_recovers(c, r)
    assert c.keys.shape[2] == r.keys.shape[2]


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("bad, match", BAD_STEPS)
def test_bad_instance_step_on_fresh_cache(kind, bad, match):
    c, r = make(kind)
    c.step = bad
    before = snapshot(c)
    raises_value(lambda: c.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4))), match)
    assert_same_snapshot(before, snapshot(c))
    assert c.empty() and c.keys is None and c.offset == 0
    del c.step  # back to the class's step
    assert c.step == 256
    assert_recovers(c, r)


def test_bad_step_not_consulted_without_growth():
    c, r = make("KVCache")
    feed([c, r], [3])
    c.step = 0  # the buffer has 256 slots; no growth, no error (as mlx-lm)
    assert_recovers(c, r)


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("bad, match", BAD_STEPS[:3])
def test_bad_class_step(kind, bad, match):
    cls = getattr(kvcore, kind)
    c, r = make(kind)
    saved = cls.__dict__["step"]
    try:
        cls.step = bad
        before = snapshot(c)
        raises_value(lambda: c.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4))), match)
        assert_same_snapshot(before, snapshot(c))
    finally:
        cls.step = saved
    assert cls.step == 256
    assert_recovers(c, r)


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("bad, match", BAD_STEPS[:3])
def test_bad_subclass_step(kind, bad, match):
    cls = type("Sub", (getattr(kvcore, kind),), {"step": bad})
    c = cls(*(ROT_ARGS if kind == "RotatingKVCache" else ()))
    _, r = make(kind)
    raises_value(lambda: c.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4))), match)
    assert c.empty() and c.offset == 0
    c.step = 256
    assert_recovers(c, r)


# --------------------------------------------------------------------------
# malformed state: `cache.state = ...` and `Class.from_state(...)`


def K(S=8, dtype=mx.float32):
    return mx.array(rand(S, 11)).astype(dtype)


def V(S=8, dtype=mx.float32):
    return mx.array(rand(S, 12)).astype(dtype)


BAD_STATES = {
    "KVCache": [
        ("too short", lambda: (K(), V()), r"expected 3 items but got 2 items"),
        ("too long", lambda: (K(), V(), 3, 0), r"expected 3 items but got 4 items"),
        ("empty", lambda: (), r"expected 3 items but got 0 items"),
        ("not a tuple", lambda: {"keys": K()}, r"expected a tuple of 3 items but got dict"),
        ("a string", lambda: "abc", r"expected a tuple of 3 items but got str"),
        ("str keys", lambda: ("keys", V(), 3), r"keys as an mlx array or None but got str"),
        ("str values", lambda: (K(), "values", 3), r"values as an mlx array or None but got str"),
        ("numpy keys", lambda: (rand(8, 1), V(), 3), r"keys as an mlx array or None but got ndarray"),
        ("float offset", lambda: (K(), V(), 3.0), r"offset as an int but got 3\.0"),
        ("str offset", lambda: (K(), V(), "3"), r"offset as an int but got '3'"),
        ("None offset", lambda: (K(), V(), None), r"offset as an int but got None"),
        ("bool offset", lambda: (K(), V(), True), r"offset as an int but got True"),
        ("array offset", lambda: (K(), V(), mx.array(3)), r"offset as an int but got array"),
        ("huge offset", lambda: (K(), V(), 2**40), r"offset within 32 bits but got 1099511627776"),
        ("values None", lambda: (K(), None, 3), r"keys and values both set or both None but got keys set and values None"),
        ("keys None", lambda: (None, V(), 0), r"but got keys None and values set"),
        ("offset > buffer", lambda: (K(), V(), 9), r"offset in \[0, 8\] \(the keys' length\) but got offset 9"),
        ("offset without buffer", lambda: (None, None, 1), r"offset in \[0, 0\].*but got offset 1"),
        ("negative offset", lambda: (K(), V(), -1), r"offset in \[0, 8\].*but got offset -1"),
        ("rank-3 arrays", lambda: (K()[0], V()[0], 3), r"keys of rank 4.*but got rank 3"),
        ("rank-3 values", lambda: (K(), V()[0], 3), r"values of rank 4.*but got rank 3"),
        ("k/v length differ", lambda: (K(8), V(7), 3), r"values with the keys' \(B, n_kv_heads, S\)"),
    ],
    "RotatingKVCache": [
        ("too short", lambda: (K(), V(), 8, 2, 8), r"expected 6 items but got 5 items"),
        ("too long", lambda: (K(), V(), 8, 2, 8, 8, 0), r"expected 6 items but got 7 items"),
        ("kvcache-shaped", lambda: (K(), V(), 3), r"expected 6 items but got 3 items"),
        ("not a tuple", lambda: 5, r"expected a tuple of 6 items but got int"),
        ("str keys", lambda: ("k", V(), 8, 2, 8, 8), r"keys as an mlx array or None but got str"),
        ("float offset", lambda: (K(), V(), 8.0, 2, 8, 8), r"offset as an int but got 8\.0"),
        ("float keep", lambda: (K(), V(), 8, 2.0, 8, 8), r"keep as an int but got 2\.0"),
        ("float max_size", lambda: (K(), V(), 8, 2, 8.5, 8), r"max_size as an int but got 8\.5"),
        ("str _idx", lambda: (K(), V(), 8, 2, 8, "8"), r"_idx as an int but got '8'"),
        ("values None", lambda: (K(), None, 8, 2, 8, 8), r"keys set and values None"),
        ("negative offset", lambda: (K(), V(), -1, 2, 8, 0), r"offset in \[0, 2147483647\] but got -1"),
        ("keep >= max_size", lambda: (K(), V(), 8, 8, 8, 8), r"keep in \[0, max_size\) = \[0, 8\) but got keep 8"),
        ("negative keep", lambda: (K(), V(), 8, -1, 8, 8), r"but got keep -1"),
        ("max_size 0", lambda: (K(), V(), 8, 0, 0, 8), r"max_size in \[1, 2147483647\] but got 0"),
        ("_idx > length", lambda: (K(), V(), 8, 2, 8, 9), r"_idx in \[0, 8\] \(the keys' length\) but got _idx 9"),
        ("negative _idx", lambda: (K(), V(), 8, 2, 8, -1), r"_idx in \[0, 8\].*but got _idx -1"),
        ("_idx without buffer", lambda: (None, None, 0, 2, 8, 1), r"_idx in \[0, 0\].*but got _idx 1"),
        ("rank-3 arrays", lambda: (K()[0], V()[0], 8, 2, 8, 8), r"keys of rank 4.*but got rank 3"),
        ("huge max_size", lambda: (K(), V(), 8, 2, 2**40, 8), r"max_size within 32 bits"),
    ],
    "ConcatenateKVCache": [
        ("too long", lambda: (K(), V(), 8), r"expected 2 items but got 3 items"),
        ("too short", lambda: (K(),), r"expected 2 items but got 1 items"),
        ("not a tuple", lambda: K(), r"expected a tuple of 2 items but got array"),
        ("str keys", lambda: ("k", V()), r"keys as an mlx array or None but got str"),
        ("str values", lambda: (K(), "v"), r"values as an mlx array or None but got str"),
        ("values None", lambda: (K(), None), r"keys set and values None"),
        ("keys None", lambda: (None, V()), r"keys None and values set"),
        ("rank-3 arrays", lambda: (K()[0], V()[0]), r"keys of rank 4.*but got rank 3"),
        ("k/v length differ", lambda: (K(8), V(5)), r"values with the keys'"),
    ],
}
STATE_CASES = [
    pytest.param(kind, make_state, match, id=f"{kind}-{label}")
    for kind, cases in BAD_STATES.items()
    for label, make_state, match in cases
]


STATE_ASSIGN_CASES = [
    pytest.param(kind, make_state, match, prefix, id=f"{kind}-{label}-{prefix}")
    for kind, cases in BAD_STATES.items()
    for label, make_state, match in cases
    for prefix in ("empty", "filled", "rotated")
    if prefix != "rotated" or kind == "RotatingKVCache"
]


@pytest.mark.parametrize("kind, make_state, match, prefix", STATE_ASSIGN_CASES)
def test_bad_state_assignment(kind, make_state, match, prefix):
    c, r = prepared(kind, prefix)
    before = snapshot(c)
    bad = make_state()
    e = raises_value(lambda: setattr(c, "state", bad), match)
    assert e.context == f"{kind}.state"
    assert_same_snapshot(before, snapshot(c))
    assert_recovers(c, r)


@pytest.mark.parametrize("kind, make_state, match", STATE_CASES)
def test_bad_from_state(kind, make_state, match):
    cls = getattr(kvcore, kind)
    bad = make_state()
    raises_value(lambda: cls.from_state(bad), match)

    class Sub(cls):
        pass

    raises_value(lambda: Sub.from_state(bad), match)

    # A valid state still round-trips and then behaves like mlx-lm's cache
    # restored from the same state.
    c0, r0 = prepared(kind, "rotated" if kind == "RotatingKVCache" else "filled")
    c = cls.from_state(c0.state)
    r = getattr(ref, kind).from_state(r0.state)
    assert type(c) is cls
    assert_same_cache(c, r)
    assert_recovers(c, r)


# --------------------------------------------------------------------------
# masks


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1,), r"\[create_causal_mask\] expected N in \[0, 2147483647\] but got -1"),
        ((-5, 3), r"N in \[0, .*but got -5"),
        ((2, -1), r"offset in \[0, 2147483647\] but got -1"),
        ((2, 3, -1), r"window_size in \[0, 2147483647\] but got -1"),
        ((2, 0, -7), r"window_size in \[0, .*but got -7"),
        ((2**31 - 1, 1), r"offset \+ N in \[0, 2147483647\] but got 2147483648"),
    ],
)
def test_create_causal_mask_bad(args, match):
    raises_value(lambda: kvcore.create_causal_mask(*args), match)
    for N, offset, window in [(3, 0, None), (4, 5, None), (4, 5, 3), (1, 7, 2)]:
        got = kvcore.create_causal_mask(N, offset, window)
        want = ref_base.create_causal_mask(N, offset, window_size=window)
        assert_equal_arrays(got, want)


def test_create_causal_mask_bad_keywords():
    raises_value(lambda: kvcore.create_causal_mask(N=3, offset=-2), r"offset in \[0, .*but got -2")
    raises_value(lambda: kvcore.create_causal_mask(N=3, window_size=-2), r"window_size in .*but got -2")
    raises_value(
        lambda: kvcore.create_causal_mask(3, right_padding=mx.array([True])),
        r"right_padding of a numeric dtype",
    )
    # Float paddings are what mlx-lm's empty batch caches hold: accepted.
    fp = mx.array([1.0, 0.0])
    assert_equal_arrays(
        kvcore.create_causal_mask(3, 1, right_padding=fp, left_padding=fp),
        ref_base.create_causal_mask(3, 1, right_padding=fp, left_padding=fp),
    )
    raises_value(
        lambda: kvcore.create_causal_mask(3, left_padding=mx.array([[1]])),
        r"left_padding of rank 1 \(B,\)",
    )
    lp = mx.array([0, 2])
    assert_equal_arrays(
        kvcore.create_causal_mask(3, 2, left_padding=lp),
        ref_base.create_causal_mask(3, 2, left_padding=lp),
    )


def test_create_causal_mask_absurd_N():
    # Must be the typed error, not a TypeError or a huge allocation.
    raises_value(lambda: kvcore.create_causal_mask(2**40), r"N")


def test_create_attention_mask_bad():
    raises_value(lambda: kvcore.create_attention_mask(-1, 0, False, None), r"N in \[0, .*but got -1")
    raises_value(lambda: kvcore.create_attention_mask(2, -1, True, None), r"offset in \[0, .*but got -1")
    raises_value(lambda: kvcore.create_attention_mask(2, 0, False, -3), r"window_size in .*but got -3")
    for args in [(1, 4, False, None), (3, 4, False, None), (3, 4, True, None), (3, 4, False, 2)]:
        assert_same_mask(kvcore.create_attention_mask(*args), ref.create_attention_mask(*args))


@pytest.mark.parametrize("N", [0, 1, 2, 5])
@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("return_array", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_create_attention_mask_like_mlx_lm(N, offset, return_array, window):
    assert_same_mask(
        kvcore.create_attention_mask(N, offset, return_array, window),
        ref.create_attention_mask(N, offset, return_array, window),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_make_mask_bad(kind):
    c, r = prepared(kind, "filled")
    before = snapshot(c)
    raises_value(lambda: c.make_mask(-2), r"N in \[0, .*but got -2")
    raises_value(lambda: c.make_mask(3, window_size=-1), r"window_size in .*but got -1")
    assert_same_snapshot(before, snapshot(c))
    for N in (1, 3):
        for window in (None, 2):
            got = c.make_mask(N, return_array=False, window_size=window)
            want = r.make_mask(N, return_array=False, window_size=window)
            assert_same_mask(got, want)
    assert_recovers(c, r)


def assert_same_mask(got, want):
    if isinstance(want, mx.array):
        assert_equal_arrays(got, want)
    else:
        assert type(got) is type(want) and got == want


@pytest.mark.parametrize("kind, prefix", combos(["empty", "filled", "rotated"]))
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("window", [None, 2, 16])
def test_make_mask_return_array_like_mlx_lm(kind, N, window, prefix):
    # Models such as deepseek_v3 and gemma2 ask for return_array=True while
    # decoding; mlx-lm answers None for a single token without a window.
    c, r = prepared(kind, prefix)
    got = c.make_mask(N, return_array=True, window_size=window)
    want = r.make_mask(N, return_array=True, window_size=window)
    assert_same_mask(got, want)


# --------------------------------------------------------------------------
# not implemented


# RotatingKVCache.to_quantized is implemented here (mlx-lm raises
# NotImplementedError; see test_quantized_rotating.py): bad settings are a
# typed error that leaves the ring as it was.
@pytest.mark.parametrize("prefix", ["empty", "filled", "rotated"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 48}, r"group_size in \{32, 64, 128\} but got 48"),
        ({"bits": 7}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 7"),
        ({"bits": (8, 1)}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 1"),
    ],
)
def test_rotating_to_quantized_bad_settings(prefix, kwargs, match):
    c, r = prepared("RotatingKVCache", prefix)
    before = snapshot(c)
    raises_value(lambda: c.to_quantized(**kwargs), match)
    assert_same_snapshot(before, snapshot(c))
    assert_recovers(c, r)


# --------------------------------------------------------------------------
# the error classes themselves


def test_error_hierarchy():
    assert issubclass(kvcore.CacheValueError, kvcore.CacheError)
    assert issubclass(kvcore.CacheValueError, ValueError)
    assert issubclass(kvcore.CacheRuntimeError, RuntimeError)
    assert issubclass(kvcore.CacheNotImplementedError, NotImplementedError)
    assert issubclass(kvcore.CacheIndexError, IndexError)
    for t in (kvcore.CacheRuntimeError, kvcore.CacheNotImplementedError, kvcore.CacheIndexError):
        assert issubclass(t, kvcore.CacheError)
        assert not issubclass(t, ValueError)
    assert not issubclass(kvcore.CacheError, ValueError)
    # Caught as plain ValueError by code written for mlx-lm.
    c = kvcore.KVCache()
    with pytest.raises(ValueError, match=r"^\[KVCache\.update_and_fetch\] expected keys of rank 4"):
        c.update_and_fetch(mx.zeros((2, 3)), mx.zeros((2, 3)))
    e = raises_value(lambda: c.update_and_fetch(mx.zeros((2, 3)), mx.zeros((2, 3))), "rank")
    assert e.context == "KVCache.update_and_fetch"
    assert e.expected == "keys of rank 4 (B, n_kv_heads, S, head_dim)"
    assert e.actual == "rank 2 (2, 3)"


# --------------------------------------------------------------------------
# crashes: run where a segfault cannot take the test session down


def run_isolated(code):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("c.offset = 3", id="fresh-offset-3"),
        pytest.param("c.update_and_fetch(x, x); c.keys = None; c.values = None", id="both-None"),
        pytest.param("c.update_and_fetch(x, x); c.values = None", id="values-None"),
        pytest.param("c.update_and_fetch(x, x); c.keys = None", id="keys-None"),
    ],
)
def test_concatenate_trim_without_arrays_does_not_crash(setup):
    # mlx-lm's ConcatenateKVCache.trim only lowers offset here (returns 1).
    # kvcore may raise its typed error instead, but must not crash.
    proc = run_isolated(
        f"""
        import mlx.core as mx, kvcore
        import mlx_lm.models.cache as ref
        x = mx.ones((1, 2, 3, 4))
        for c in (ref.ConcatenateKVCache(), kvcore.ConcatenateKVCache()):
            {setup}
            try:
                print("returned", c.trim(1), c.offset, flush=True)
            except kvcore.CacheError as e:
                print("typed", type(e).__name__, flush=True)
        """
    )
    assert proc.returncode == 0, f"process died (rc {proc.returncode}): {proc.stderr[-500:]}"
    ref_line, kv_line = proc.stdout.strip().splitlines()
    assert ref_line.startswith("returned 1 ")
    assert kv_line == ref_line or kv_line.startswith("typed ")
