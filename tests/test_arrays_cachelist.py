"""ArraysCache and CacheList against mlx-lm's.

A hypothesis-driven differential test runs random sequences of operations on
kvcore's ArraysCache and on mlx-lm's side by side and compares every
observable result exactly; then kvcore's own behaviour where mlx-lm crashes
or is undefined, typed errors for bad input, and CacheList over kvcore caches
against mlx-lm's CacheList over mlx-lm caches.
"""

import copy

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from conftest import assert_arrays_equal, assert_masks_equal, assert_states_equal, int_valued_normal
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvcore

DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32]
INDEX_DTYPES = [mx.int32, mx.int64, mx.uint32]


def is_kvcore(c):
    return type(c).__module__.startswith("kvcore")


def assert_optional_equal(r, g, what):
    if r is None:
        assert g is None, f"{what}: expected None, got {g!r}"
    else:
        assert_arrays_equal(r, g, what)


def assert_same_arrays_cache(kv, r, what="cache"):
    """Every observable of kvcore's ArraysCache equals mlx-lm's."""
    assert type(kv) is kvcore.ArraysCache, f"{what}: {type(kv)!r}"
    assert type(r) is ref.ArraysCache
    n = len(r.cache)
    slots = kv.cache
    assert isinstance(slots, list) and len(slots) == n, f"{what}: {len(slots)} slots != {n}"
    for i in range(n):
        assert_optional_equal(r.cache[i], slots[i], f"{what}.cache[{i}]")
        assert_optional_equal(r[i], kv[i], f"{what}[{i}]")
        assert_optional_equal(r[i - n], kv[i - n], f"{what}[{i - n}]")
    assert_optional_equal(r.left_padding, kv.left_padding, f"{what}.left_padding")
    assert_optional_equal(r.lengths, kv.lengths, f"{what}.lengths")
    assert kv.batch_size == r.batch_size, f"{what}.batch_size {kv.batch_size} != {r.batch_size}"
    assert kv.empty() == r.empty(), f"{what}.empty()"
    assert kv.nbytes == r.nbytes, f"{what}.nbytes {kv.nbytes} != {r.nbytes}"
    assert kv.size() == r.size()
    assert kv.is_trimmable() == r.is_trimmable()
    st_kv, st_r = kv.state, r.state
    assert isinstance(st_kv, tuple) and len(st_kv) == 3
    assert isinstance(st_kv[0], list)
    assert_states_equal(tuple(st_r[0]) + tuple(st_r[1:]), tuple(st_kv[0]) + tuple(st_kv[1:]),
                        f"{what}.state")


class Pair:
    """kvcore's cache and mlx-lm's, driven identically."""

    def __init__(self, kv, r):
        self.kv, self.r = kv, r

    def check(self, what="cache"):
        assert_same_arrays_cache(self.kv, self.r, what)

    def all_set(self):
        return all(x is not None for x in self.r.cache)


@st.composite
def slot_layouts(draw):
    """Per slot: trailing shape (past the batch axis) and dtype, fixed for
    one example so that extend/merge see compatible slots."""
    n = draw(st.integers(1, 3))
    return [
        (tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))), draw(st.sampled_from(DTYPES)))
        for _ in range(n)
    ]


def make_pair(n, left_padding):
    kv = kvcore.ArraysCache(n, left_padding=None if left_padding is None else list(left_padding))
    r = ref.ArraysCache(n, left_padding=None if left_padding is None else list(left_padding))
    return Pair(kv, r)


def index_arg(data, indices):
    """The same indices as a list (one per side) or as two equal mx.arrays."""
    if data.draw(st.booleans(), label="indices as array"):
        dt = data.draw(st.sampled_from(INDEX_DTYPES), label="index dtype")
        return mx.array(indices, dtype=dt), mx.array(indices, dtype=dt)
    return list(indices), list(indices)


# Weighted: writes and extracts often enough that merges see set rows.
OPS = ["write"] * 3 + ["write_all"] * 2 + ["extract"] * 3 + ["merge"] * 2 + [
    "write_none", "prepare", "advance", "mask", "filter", "extend", "finalize", "state", "deepcopy", "new",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=slot_layouts(), data=st.data())
def test_arrays_cache_differential(layout, data):
    n = len(layout)
    key_counter = [0]

    def fresh_pair():
        lp = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=0, max_size=4)),
                       label="left_padding")
        return make_pair(n, lp)

    pool = [fresh_pair()]
    pool[0].check("initial")
    n_ops = data.draw(st.integers(1, 40), label="n_ops")
    for step in range(n_ops):
        op = data.draw(st.sampled_from(OPS), label="op")
        j = data.draw(st.integers(0, len(pool) - 1), label="target")
        p = pool[j]
        B = p.r.batch_size
        what = f"step {step} {op}"
        event(op)
        if op == "write":
            i = data.draw(st.integers(-n, n - 1), label="slot")
            fresh = all(x is None for x in p.r.cache) and p.r.left_padding is None and p.r.lengths is None
            rows = data.draw(st.integers(1, 4), label="rows") if fresh else B
            trail, dt = layout[i]
            key_counter[0] += 1
            k = mx.random.key(key_counter[0])
            p.kv[i] = int_valued_normal(k, (rows,) + trail, dt)
            p.r[i] = int_valued_normal(k, (rows,) + trail, dt)
        elif op == "write_all":
            fresh = all(x is None for x in p.r.cache) and p.r.left_padding is None and p.r.lengths is None
            rows = data.draw(st.integers(1, 4), label="rows") if fresh else B
            for i, (trail, dt) in enumerate(layout):
                key_counter[0] += 1
                k = mx.random.key(key_counter[0])
                p.kv[i] = int_valued_normal(k, (rows,) + trail, dt)
                p.r[i] = int_valued_normal(k, (rows,) + trail, dt)
        elif op == "write_none":
            i = data.draw(st.integers(-n, n - 1), label="slot")
            p.kv[i] = None
            p.r[i] = None
        elif op == "prepare":
            lengths = data.draw(st.lists(st.integers(0, 8), min_size=B, max_size=B), label="lengths")
            if data.draw(st.booleans(), label="lengths as array"):
                dt = data.draw(st.sampled_from([mx.int32, mx.int64]), label="lengths dtype")
                p.kv.prepare(lengths=mx.array(lengths, dtype=dt))
                p.r.prepare(lengths=mx.array(lengths, dtype=dt))
            else:
                p.kv.prepare(lengths=list(lengths))
                p.r.prepare(lengths=list(lengths))
        elif op == "advance":
            N = data.draw(st.integers(0, 3), label="N")
            p.kv.advance(N)
            p.r.advance(N)
        elif op == "mask":
            N = data.draw(st.integers(0, 6), label="N")
            assert_masks_equal(p.r.make_mask(N), p.kv.make_mask(N), f"{what} make_mask({N})")
        elif op == "filter":
            idx = data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B + 1), label="indices")
            a, b = index_arg(data, idx)
            p.kv.filter(a)
            p.r.filter(b)
        elif op == "extend":
            o = pool[data.draw(st.integers(0, len(pool) - 1), label="other")]
            event("extend with itself" if o is p else "extend with another")
            p.kv.extend(o.kv)
            p.r.extend(o.r)
        elif op == "extract":
            # mlx-lm's extract crashes on a None slot: only when all are set.
            if not p.all_set():
                event("extract skipped")
                continue
            i = data.draw(st.integers(0, B - 1), label="row")
            e = Pair(p.kv.extract(i), p.r.extract(i))
            e.check(f"{what} result")
            pool.append(e)
        elif op == "merge":
            # One-row caches with every slot set, and empty caches; mlx-lm's
            # merge needs some cache with slot e set for every e unless all
            # are empty.
            ones = [q for q in pool if q.r.batch_size == 1 and q.all_set()]
            picks = data.draw(st.lists(st.integers(-1, len(ones) - 1), min_size=1, max_size=4),
                              label="merge picks")
            parts = [ones[q] if q >= 0 else make_pair(n, None) for q in picks]
            event("merge of " + ("empties only" if all(q < 0 for q in picks) else "set rows"))
            m = Pair(kvcore.ArraysCache.merge([q.kv for q in parts]),
                     ref.ArraysCache.merge([q.r for q in parts]))
            m.check(f"{what} result")
            pool.append(m)
        elif op == "finalize":
            p.kv.finalize()
            p.r.finalize()
        elif op == "state":
            # The rebuilt cache replaces the original: mlx-lm's shares its
            # slot list and paddings with the original, so keeping both
            # would alias them (advance subtracts in place).
            pool[j] = p = Pair(kvcore.ArraysCache.from_state(p.kv.state),
                               ref.ArraysCache.from_state(p.r.state))
        elif op == "deepcopy":
            pool.append(Pair(copy.deepcopy(p.kv), copy.deepcopy(p.r)))
            pool[-1].check(f"{what} result")
        elif op == "new":
            pool.append(fresh_pair())
        p.check(what)
    for q, p in enumerate(pool):
        p.check(f"pool[{q}] at the end")


# --------------------------------------------------------------------------
# Fixed ArraysCache cases


def test_merge_all_empty_like_mlx_lm():
    got = kvcore.ArraysCache.merge([kvcore.ArraysCache(2) for _ in range(3)])
    want = ref.ArraysCache.merge([ref.ArraysCache(2) for _ in range(3)])
    assert_same_arrays_cache(got, want)
    assert got.left_padding.tolist() == [0, 0, 0]


def test_extend_with_none_slots_on_either_side():
    k = mx.random.key(3)
    a, ra = kvcore.ArraysCache(3, left_padding=[1, 2]), ref.ArraysCache(3, left_padding=[1, 2])
    a[0] = int_valued_normal(k, (2, 3), mx.float16)
    ra[0] = int_valued_normal(k, (2, 3), mx.float16)
    b, rb = kvcore.ArraysCache(3), ref.ArraysCache(3)
    b[1] = int_valued_normal(k, (3, 2, 2), mx.float32)
    rb[1] = int_valued_normal(k, (3, 2, 2), mx.float32)
    b.prepare(lengths=[4, 5, 6])
    rb.prepare(lengths=[4, 5, 6])
    a.extend(b)
    ra.extend(rb)
    assert_same_arrays_cache(a, ra)
    assert a.batch_size == 5 and a[2] is None
    assert a.left_padding.tolist() == [1, 2, 0, 0, 0]
    assert a.lengths.tolist() == [0, 0, 4, 5, 6]
    assert_masks_equal(ra.make_mask(4), a.make_mask(4))


def test_filter_with_array_indices_like_mlx_lm():
    k = mx.random.key(5)
    c, r = kvcore.ArraysCache(2, left_padding=[0, 1, 2, 3]), ref.ArraysCache(2, left_padding=[0, 1, 2, 3])
    c[1] = int_valued_normal(k, (4, 5), mx.bfloat16)
    r[1] = int_valued_normal(k, (4, 5), mx.bfloat16)
    c.filter(mx.array([3, 1, 1]))
    r.filter(mx.array([3, 1, 1]))
    assert_same_arrays_cache(c, r)
    assert c.batch_size == 3


def test_advance_does_not_alias_earlier_state():
    # mlx-lm's advance subtracts in place (`self.left_padding -= N`), so an
    # array taken from the cache before (its state, left_padding) changes
    # too; kvcore's advance makes new arrays and leaves them alone.
    c = kvcore.ArraysCache(1, left_padding=[3, 4])
    held = c.left_padding
    clone = kvcore.ArraysCache.from_state(c.state)
    c.advance(2)
    assert c.left_padding.tolist() == [1, 2]
    assert held.tolist() == [3, 4]
    assert clone.left_padding.tolist() == [3, 4]


def test_extract_keeps_none_slots():
    # mlx-lm's extract crashes (TypeError: None[idx:idx+1]) on a None slot.
    k = mx.random.key(1)
    c = kvcore.ArraysCache(3)
    c[1] = int_valued_normal(k, (3, 4), mx.float32)
    r = ref.ArraysCache(3)
    r[1] = int_valued_normal(k, (3, 4), mx.float32)
    with pytest.raises(TypeError):
        r.extract(1)
    e = c.extract(2)
    assert type(e) is kvcore.ArraysCache
    assert e[0] is None and e[2] is None
    assert_arrays_equal(r[1][2:3], e[1])
    assert e.left_padding is None and e.lengths is None and e.batch_size == 1


@pytest.mark.parametrize("idx", [-1, -3, 3, 7])
def test_extract_out_of_range_raises(idx):
    # mlx-lm's extract(-1) slices c[-1:0], an empty (0, ...) row, and
    # extract(B) a (0, ...) row too; kvcore refuses both.
    k = mx.random.key(2)
    c = kvcore.ArraysCache(2)
    c[0] = int_valued_normal(k, (3, 2), mx.float32)
    c[1] = int_valued_normal(k, (3, 1), mx.float32)
    before = c.state
    with pytest.raises(kvcore.CacheIndexError):
        c.extract(idx)
    with pytest.raises(IndexError):
        c.extract(idx)
    assert_states_equal(tuple(before[0]) + before[1:], tuple(c.state[0]) + c.state[1:])
    r = ref.ArraysCache(2)
    r[0] = int_valued_normal(k, (3, 2), mx.float32)
    r[1] = int_valued_normal(k, (3, 1), mx.float32)
    if idx in (-1, 3):
        assert r.extract(idx)[0].shape == (0, 2)  # mlx-lm: an empty slice


# --------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("idx", [5, 2, -3, 100])
def test_slot_index_out_of_range(idx):
    c = kvcore.ArraysCache(2)
    c[0] = mx.zeros((1, 2))
    with pytest.raises(kvcore.CacheIndexError):
        c[idx]
    with pytest.raises(IndexError):
        c[idx]
    with pytest.raises(kvcore.CacheIndexError):
        c[idx] = mx.ones((1, 2))
    assert c[1] is None and c[0].tolist() == [[0.0, 0.0]]
    assert issubclass(kvcore.CacheIndexError, kvcore.CacheError)


@pytest.mark.parametrize("size", [-1, -100])
def test_negative_size(size):
    with pytest.raises(kvcore.CacheValueError):
        kvcore.ArraysCache(size)
    with pytest.raises(ValueError):
        kvcore.ArraysCache(size)


def test_left_padding_of_rank_2_at_construction():
    with pytest.raises(kvcore.CacheValueError):
        kvcore.ArraysCache(2, left_padding=mx.zeros((2, 2), mx.int32))


def _populated():
    c = kvcore.ArraysCache(2, left_padding=[1, 0])
    c[0] = mx.arange(6).reshape(2, 3).astype(mx.float32)
    c.prepare(lengths=[3, 4])
    return c


def _snapshot(c):
    s = c.state
    return tuple(s[0]) + tuple(s[1:])


BAD_STATES = {
    "left_padding rank 2": lambda: ([mx.zeros((2, 3))], mx.zeros((2, 1), mx.int32), None),
    "lengths rank 2": lambda: ([mx.zeros((2, 3))], None, mx.zeros((1, 2), mx.int32)),
    "left_padding rank 0": lambda: ([mx.zeros((2, 3))], mx.array(1), None),
}


@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_bad_state_assignment_leaves_cache_unchanged(bad):
    c = _populated()
    before = _snapshot(c)
    with pytest.raises(kvcore.CacheValueError):
        c.state = BAD_STATES[bad]()
    assert_states_equal(before, _snapshot(c))
    with pytest.raises(kvcore.CacheValueError):
        kvcore.ArraysCache.from_state(BAD_STATES[bad]())


def test_bad_padding_attributes_leave_cache_unchanged():
    c = _populated()
    before = _snapshot(c)
    with pytest.raises(kvcore.CacheValueError):
        c.left_padding = mx.zeros((2, 2), mx.int32)
    with pytest.raises(kvcore.CacheValueError):
        c.lengths = mx.zeros((2, 2), mx.int32)
    assert_states_equal(before, _snapshot(c))


# --------------------------------------------------------------------------
# CacheList


def kv_args(key, B=1, H=2, S=3, D=8, dtype=mx.float32):
    shape = (B, H, S, D)
    return int_valued_normal(key, shape, dtype), int_valued_normal(mx.random.split(key)[0], shape, dtype)


def assert_same_cache(kv, r, what):
    assert is_kvcore(kv), f"{what}: {type(kv)!r}"
    assert type(kv).__name__ == type(r).__name__
    if isinstance(r, ref.ArraysCache):
        assert_same_arrays_cache(kv, r, what)
        return
    assert_states_equal(r.state, kv.state, f"{what}.state")
    for attr in ("offset", "max_size", "keep", "_idx", "left_padding"):
        if hasattr(r, attr):
            a, b = getattr(kv, attr), getattr(r, attr)
            if isinstance(b, mx.array):
                assert_arrays_equal(b, a, f"{what}.{attr}")
            else:
                assert a == b, f"{what}.{attr}: {a!r} != {b!r}"
    assert kv.empty() == r.empty()
    assert kv.nbytes == r.nbytes
    assert kv.size() == r.size()
    assert kv.is_trimmable() == r.is_trimmable()


def assert_same_cache_list(kv, r, what="CacheList"):
    assert type(kv) is kvcore.CacheList
    assert type(r) is ref.CacheList
    assert len(kv.caches) == len(r.caches)
    for i, (a, b) in enumerate(zip(kv.caches, r.caches)):
        assert a is kv[i]
        assert_same_cache(a, b, f"{what}[{i}]")
    sk, sr = kv.state, r.state
    assert len(sk) == len(sr)
    for i, ((s1, n1), (s2, n2)) in enumerate(zip(sk, sr)):
        assert n1 == n2, f"{what}.state[{i}] names {n1} != {n2}"
        if n2 == "ArraysCache":
            assert_states_equal(tuple(s2[0]) + tuple(s2[1:]), tuple(s1[0]) + tuple(s1[1:]))
        else:
            assert_states_equal(s2, s1, f"{what}.state[{i}]")
    assert kv.is_trimmable() == r.is_trimmable()
    assert kv.size() == r.size()
    assert kv.empty() == r.empty()
    assert kv.nbytes == r.nbytes


def update_kv(kv, r, key, S, B=1):
    k1, v1 = kv_args(key, B=B, S=S)
    k2, v2 = kv_args(key, B=B, S=S)
    o1 = kv.update_and_fetch(k1, v1)
    o2 = r.update_and_fetch(k2, v2)
    for a, b in zip(o1, o2):
        assert_arrays_equal(b, a)


def write_slot(kv, r, i, key, shape, dtype=mx.float32):
    kv[i] = int_valued_normal(key, shape, dtype)
    r[i] = int_valued_normal(key, shape, dtype)


def test_cache_list_kv_and_arrays():
    kv = kvcore.CacheList(kvcore.KVCache(), kvcore.ArraysCache(2))
    r = ref.CacheList(ref.KVCache(), ref.ArraysCache(2))
    assert_same_cache_list(kv, r)
    assert kv.empty() and kv.size() == 0 and kv.nbytes == 0
    for step, S in enumerate([5, 1, 1, 3]):
        key = mx.random.key(10 + step)
        update_kv(kv[0], r[0], key, S)
        write_slot(kv[1], r[1], 0, key, (1, 3, 6))
        write_slot(kv[1], r[1], 1, key, (1, 2, 4, 4), mx.float16)
        assert_same_cache_list(kv, r, f"after step {step}")
    assert kv.size() == 10 and not kv.empty()
    assert not kv.is_trimmable()  # ArraysCache is not

    # from_state rebuilds kvcore classes by name
    rebuilt = kvcore.CacheList.from_state(kv.state)
    assert [type(c) for c in rebuilt.caches] == [kvcore.KVCache, kvcore.ArraysCache]
    assert_same_cache_list(rebuilt, ref.CacheList.from_state(r.state), "from_state")
    # and from mlx-lm's state as well
    rebuilt2 = kvcore.CacheList.from_state(r.state)
    assert [type(c) for c in rebuilt2.caches] == [kvcore.KVCache, kvcore.ArraysCache]
    assert_same_cache_list(rebuilt2, r, "from mlx-lm state")

    # state assignment on an instance
    other = kvcore.CacheList(kvcore.ArraysCache(1))
    other.state = kv.state
    assert_same_cache_list(other, r, "state set")

    # deepcopy: independent
    cp, rcp = copy.deepcopy(kv), copy.deepcopy(r)
    assert type(cp) is kvcore.CacheList and cp[0] is not kv[0]
    assert_same_cache_list(cp, rcp, "deepcopy")
    key = mx.random.key(99)
    update_kv(cp[0], rcp[0], key, 2)
    write_slot(cp[1], rcp[1], 0, key, (1, 3, 6))
    assert_same_cache_list(cp, rcp, "deepcopy after update")
    assert_same_cache_list(kv, r, "original after copy update")
    assert cp.size() == 12 and kv.size() == 10


def test_cache_list_rotating_and_kv_trim():
    kv = kvcore.CacheList(kvcore.RotatingKVCache(max_size=8, keep=2), kvcore.KVCache())
    r = ref.CacheList(ref.RotatingKVCache(max_size=8, keep=2), ref.KVCache())
    for step, S in enumerate([4, 1, 1]):
        key = mx.random.key(20 + step)
        update_kv(kv[0], r[0], key, S)
        update_kv(kv[1], r[1], key, S)
        assert_same_cache_list(kv, r, f"step {step}")
    assert kv.is_trimmable() and r.is_trimmable()
    assert kv.trim(2) == r.trim(2) == 2
    assert_same_cache_list(kv, r, "after trim")
    assert kv.trim(100) == r.trim(100) == 4
    assert_same_cache_list(kv, r, "after trim past start")
    assert kv.size() == 0
    for step, S in enumerate([6, 1, 1, 1, 1, 1]):
        key = mx.random.key(40 + step)
        update_kv(kv[0], r[0], key, S)
        update_kv(kv[1], r[1], key, S)
        assert_same_cache_list(kv, r, f"regrow step {step}")
    # the rotating cache has rotated: no longer trimmable
    assert not kv.is_trimmable() and not r.is_trimmable()
    rebuilt = kvcore.CacheList.from_state(kv.state)
    assert [type(c) for c in rebuilt.caches] == [kvcore.RotatingKVCache, kvcore.KVCache]
    assert_same_cache_list(rebuilt, ref.CacheList.from_state(r.state), "from_state")
    cp, rcp = copy.deepcopy(kv), copy.deepcopy(r)
    assert_same_cache_list(cp, rcp, "deepcopy")
    key = mx.random.key(77)
    update_kv(cp[0], rcp[0], key, 1)
    update_kv(cp[1], rcp[1], key, 1)
    assert_same_cache_list(cp, rcp, "deepcopy after update")
    assert_same_cache_list(kv, r, "original after copy update")


def arrays_list_pair(B, key, lp=None):
    kv = kvcore.CacheList(kvcore.ArraysCache(2, left_padding=lp), kvcore.ArraysCache(1, left_padding=lp))
    r = ref.CacheList(ref.ArraysCache(2, left_padding=lp), ref.ArraysCache(1, left_padding=lp))
    write_slot(kv[0], r[0], 0, key, (B, 3, 4))
    write_slot(kv[0], r[0], 1, key, (B, 2), mx.float16)
    write_slot(kv[1], r[1], 0, key, (B, 5), mx.bfloat16)
    return kv, r


def test_cache_list_batch_ops_over_arrays_caches():
    kv, r = arrays_list_pair(4, mx.random.key(1), lp=[0, 1, 2, 3])
    assert_same_cache_list(kv, r)
    kv.prepare(lengths=[5, 6, 7, 8])
    r.prepare(lengths=[5, 6, 7, 8])
    assert_same_cache_list(kv, r, "prepare")
    kv.filter([3, 0, 2])
    r.filter([3, 0, 2])
    assert_same_cache_list(kv, r, "filter list")
    kv.filter(mx.array([2, 0]))
    r.filter(mx.array([2, 0]))
    assert_same_cache_list(kv, r, "filter array")

    kv2, r2 = arrays_list_pair(3, mx.random.key(2))
    kv.extend(kv2)
    r.extend(r2)
    assert_same_cache_list(kv, r, "extend")
    assert kv[0].batch_size == 5

    parts = [(kv.extract(i), r.extract(i)) for i in (4, 0, 2)]
    for a, b in parts:
        assert type(a) is kvcore.CacheList
        assert all(type(c) is kvcore.ArraysCache for c in a.caches)
        assert_same_cache_list(a, b, "extract")
    empty = (kvcore.CacheList(kvcore.ArraysCache(2), kvcore.ArraysCache(1)),
             ref.CacheList(ref.ArraysCache(2), ref.ArraysCache(1)))
    merged = kvcore.CacheList.merge([a for a, _ in parts] + [empty[0]])
    want = ref.CacheList.merge([b for _, b in parts] + [empty[1]])
    assert type(merged) is kvcore.CacheList
    assert_same_cache_list(merged, want, "merge")
    all_empty = kvcore.CacheList.merge([empty[0], copy.deepcopy(empty[0])])
    assert_same_cache_list(all_empty, ref.CacheList.merge([empty[1], copy.deepcopy(empty[1])]),
                           "merge of empties")

    kv.finalize()
    r.finalize()
    assert_same_cache_list(kv, r, "finalize")
    assert kv[0].left_padding is None and kv[1].lengths is None

    rebuilt = kvcore.CacheList.from_state(kv.state)
    assert_same_cache_list(rebuilt, ref.CacheList.from_state(r.state), "from_state")
    cp = copy.deepcopy(kv)
    assert_same_cache_list(cp, copy.deepcopy(r), "deepcopy")


def test_cache_list_mask_via_inner_arrays_cache():
    kv, r = arrays_list_pair(2, mx.random.key(4), lp=[2, 0])
    kv.prepare(lengths=[3, 5])
    r.prepare(lengths=[3, 5])
    for N in (1, 4, 6):
        assert_masks_equal(r[0].make_mask(N), kv[0].make_mask(N))
    kv[0].advance(2)
    r[0].advance(2)
    assert_same_cache_list(kv, r, "advance")


@pytest.mark.parametrize(
    "name",
    ["Foo", "_BaseCache", "create_attention_mask", "make_prompt_cache", "__class__", "kvcache", "", 3, None],
)
def test_cache_list_state_naming_unknown_class(name):
    good = kvcore.CacheList(kvcore.KVCache(), kvcore.ArraysCache(2))
    update_kv(good[0], ref.KVCache(), mx.random.key(0), 2)
    state = good.state
    bad = [state[0], (state[1][0], name)]
    with pytest.raises(kvcore.CacheValueError):
        kvcore.CacheList.from_state(bad)
    c = kvcore.CacheList(kvcore.ArraysCache(1))
    with pytest.raises(kvcore.CacheValueError):
        c.state = bad
    assert len(c.caches) == 1 and type(c[0]) is kvcore.ArraysCache


@pytest.mark.parametrize("bad", [None, 3, [("x",)], [1, 2]])
def test_cache_list_malformed_state(bad):
    with pytest.raises(kvcore.CacheValueError):
        kvcore.CacheList.from_state(bad)


def kv_arrays_list_pair(S, seed):
    """CacheList(KVCache, ArraysCache) with one row and S cached tokens."""
    key = mx.random.key(seed)
    kv = kvcore.CacheList(kvcore.KVCache(), kvcore.ArraysCache(2))
    r = ref.CacheList(ref.KVCache(), ref.ArraysCache(2))
    update_kv(kv[0], r[0], key, S)
    write_slot(kv[1], r[1], 0, key, (1, 3, 4))
    write_slot(kv[1], r[1], 1, key, (1, 2), mx.float16)
    return kv, r


def test_cache_list_merge_kv_and_arrays_into_batch():
    # KVCache.merge gives a BatchKVCache (left-padded rows), in mlx-lm and
    # in kvcore; the CacheList's batch operations go through both members.
    pairs = [kv_arrays_list_pair(S, seed) for S, seed in ((3, 1), (5, 2), (1, 3))]
    kv = kvcore.CacheList.merge([a for a, _ in pairs])
    r = ref.CacheList.merge([b for _, b in pairs])
    assert [type(c) for c in kv.caches] == [kvcore.BatchKVCache, kvcore.ArraysCache]
    assert [type(c) for c in r.caches] == [ref.BatchKVCache, ref.ArraysCache]
    assert_same_cache_list(kv, r, "merge")
    assert kv[0].left_padding.tolist() == [2, 0, 4]

    key = mx.random.key(9)
    update_kv(kv[0], r[0], key, 1, B=3)
    write_slot(kv[1], r[1], 0, key, (3, 3, 4))
    assert_same_cache_list(kv, r, "batched update")

    kv.filter([2, 0])
    r.filter([2, 0])
    assert_same_cache_list(kv, r, "filter")

    more = [kv_arrays_list_pair(S, seed) for S, seed in ((2, 4), (7, 5))]
    kv2 = kvcore.CacheList.merge([a for a, _ in more])
    r2 = ref.CacheList.merge([b for _, b in more])
    kv.extend(kv2)
    r.extend(r2)
    assert_same_cache_list(kv, r, "extend")
    assert kv[1].batch_size == 4

    for i in range(4):
        a, b = kv.extract(i), r.extract(i)
        assert [type(c) for c in a.caches] == [kvcore.KVCache, kvcore.ArraysCache]
        assert_same_cache_list(a, b, f"extract({i})")

    rebuilt = kvcore.CacheList.from_state(kv.state)
    assert [type(c) for c in rebuilt.caches] == [kvcore.BatchKVCache, kvcore.ArraysCache]
    assert_same_cache_list(rebuilt, ref.CacheList.from_state(r.state), "from_state")
    cp, rcp = copy.deepcopy(kv), copy.deepcopy(r)
    assert_same_cache_list(cp, rcp, "deepcopy")
    update_kv(cp[0], rcp[0], mx.random.key(10), 1, B=4)
    assert_same_cache_list(cp, rcp, "deepcopy after update")
    assert_same_cache_list(kv, r, "original after copy update")
