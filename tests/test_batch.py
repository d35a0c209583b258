"""BatchKVCache and BatchRotatingKVCache against mlx-lm's.

A hypothesis-driven differential test runs random batch scenarios (left and
right padded prefill, decoding past the window, filter, extend, extract,
merge, trim, state round trips, copies, masks) on kvcore's batch caches and
on mlx-lm's side by side and compares every observable result exactly.
Then explicit tests: prepare/finalize misuse, typed errors that leave the
cache unchanged, dynamic_roll, ArraysCache/CacheList in batches and
prompt-cache files with batch caches, both ways with mlx-lm.

mlx-lm's caches write into their buffers in place (``self.keys[...] = x``
changes the very array object handed out earlier), so every result is
compared right after the call that produced it, never later.
"""

import contextlib
import copy
import os

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from conftest import assert_arrays_equal, assert_masks_equal, assert_states_equal, int_valued_normal
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvcore

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
H = 2
MAX_B = 6
# Examples per kind for the random scenarios (more for a long hunt).
EXAMPLES = int(os.environ.get("KVCORE_BATCH_EXAMPLES", "400"))

STEP_CLASSES = ("KVCache", "RotatingKVCache", "BatchKVCache", "BatchRotatingKVCache")


@contextlib.contextmanager
def small_step(step):
    """Set the class attribute ``step`` on mlx-lm's and kvcore's classes so
    that buffers grow (and get sliced) often; put the old values back."""
    saved = [(mod, name, getattr(mod, name).step) for mod in (ref, kvcore) for name in STEP_CLASSES]
    try:
        for mod, name, _ in saved:
            getattr(mod, name).step = step
        yield
    finally:
        for mod, name, old in saved:
            getattr(mod, name).step = old
    for mod, name, old in saved:
        assert getattr(mod, name).step == old


# --------------------------------------------------------------------------
# comparison helpers


def opt_equal(r, g, what):
    if r is None:
        assert g is None, f"{what}: expected None, got {g!r}"
    else:
        assert_arrays_equal(r, g, what)


def is_rotating(c):
    return type(c).__name__ in ("BatchRotatingKVCache", "RotatingKVCache")


def assert_same_batch(kv, r, what="cache"):
    """Every observable of kvcore's batch cache equals mlx-lm's."""
    name = type(r).__name__
    assert type(kv) is getattr(kvcore, name), f"{what}: {type(kv)!r} is not kvcore.{name}"
    assert_states_equal(r.state, kv.state, f"{what}.state")
    opt_equal(r.keys, kv.keys, f"{what}.keys")
    opt_equal(r.values, kv.values, f"{what}.values")
    assert_arrays_equal(r.offset, kv.offset, f"{what}.offset")
    assert_arrays_equal(r.left_padding, kv.left_padding, f"{what}.left_padding")
    assert type(kv._idx) is int and kv._idx == r._idx, f"{what}._idx {kv._idx} != {r._idx}"
    if is_rotating(r):
        assert kv._offset == r._offset, f"{what}._offset {kv._offset} != {r._offset}"
        assert kv.rotated is r.rotated, f"{what}.rotated {kv.rotated} != {r.rotated}"
        assert kv.max_size == r.max_size
        opt_equal(getattr(r, "_lengths", None), kv._lengths, f"{what}._lengths")
    else:
        opt_equal(getattr(r, "_right_padding", None), kv._right_padding, f"{what}._right_padding")
    assert kv.empty() == r.empty(), f"{what}.empty()"
    assert kv.size() == r.size(), f"{what}.size() {kv.size()} != {r.size()}"
    assert kv.nbytes == r.nbytes, f"{what}.nbytes {kv.nbytes} != {r.nbytes}"
    assert kv.is_trimmable() == r.is_trimmable(), f"{what}.is_trimmable()"
    if not r.empty():
        gk, gv = kv.keys_and_values()
        rk, rv = r.keys_and_values()
        assert_arrays_equal(rk, gk, f"{what}.keys_and_values()[0]")
        assert_arrays_equal(rv, gv, f"{what}.keys_and_values()[1]")


def assert_same_single(kv, r, what="single"):
    """kvcore's KVCache / RotatingKVCache equals mlx-lm's."""
    name = type(r).__name__
    assert type(kv) is getattr(kvcore, name), f"{what}: {type(kv)!r} is not kvcore.{name}"
    assert_states_equal(r.state, kv.state, f"{what}.state")
    assert kv.offset == r.offset, f"{what}.offset {kv.offset} != {r.offset}"
    if name == "RotatingKVCache":
        assert (kv._idx, kv.keep, kv.max_size) == (r._idx, r.keep, r.max_size), what
    assert kv.empty() == r.empty()
    assert kv.size() == r.size()
    assert kv.nbytes == r.nbytes


class Inputs:
    """Fresh key/value arrays for both implementations (distinct objects,
    equal contents), deterministic in the seed."""

    def __init__(self, seed, dk, dv, dtype):
        self.seed, self.dk, self.dv, self.dtype = seed, dk, dv, dtype
        self.n = 0

    def __call__(self, B, S):
        self.n += 1
        kk = mx.random.key(self.seed * 7919 + 2 * self.n)
        kv_ = mx.random.key(self.seed * 7919 + 2 * self.n + 1)
        ks, vs = (B, H, S, self.dk), (B, H, S, self.dv)
        mine = (int_valued_normal(kk, ks, self.dtype), int_valued_normal(kv_, vs, self.dtype))
        theirs = (int_valued_normal(kk, ks, self.dtype), int_valued_normal(kv_, vs, self.dtype))
        return mine, theirs


class Pair:
    """kvcore's batch cache and mlx-lm's, driven identically."""

    def __init__(self, kv, r):
        self.kv, self.r = kv, r

    @property
    def B(self):
        return self.r.left_padding.size

    @property
    def rotating(self):
        return is_rotating(self.r)

    def check(self, what="cache"):
        assert_same_batch(self.kv, self.r, what)

    def both(self, method, *args, **kwargs):
        """Call the method on both with the same (separately built) args."""
        got = getattr(self.kv, method)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        want = getattr(self.r, method)(*args, **kwargs)
        return got, want


def new_pair(kind, max_size, left_padding):
    if kind == "rot":
        return Pair(kvcore.BatchRotatingKVCache(max_size, list(left_padding)),
                    ref.BatchRotatingKVCache(max_size, list(left_padding)))
    return Pair(kvcore.BatchKVCache(list(left_padding)), ref.BatchKVCache(list(left_padding)))


def fix_ref_from_state(r):
    """mlx-lm's from_state skips __init__, so the attributes that the state
    does not carry are missing (its decode then fails with AttributeError);
    a fresh cache has them as None."""
    for attr in ("_lengths", "_right_padding"):
        if not hasattr(r, attr):
            setattr(r, attr, None)
    return r


def update(p, inputs, S, what):
    (kk, kv_), (rk, rv) = inputs(p.B, S)
    got = p.kv.update_and_fetch(kk, kv_)
    want = p.r.update_and_fetch(rk, rv)
    assert len(got) == 2
    assert_arrays_equal(want[0], got[0], f"{what}: returned keys")
    assert_arrays_equal(want[1], got[1], f"{what}: returned values")
    p.check(what)


# --------------------------------------------------------------------------
# the random scenario


class Scenario:
    def __init__(self, data, kind, max_size, inputs):
        self.data, self.kind, self.max_size, self.inputs = data, kind, max_size, inputs
        self.pool = []  # (kvcore single, mlx-lm single) from extract / fresh

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    # ---- building blocks

    def prefill(self, p, what):
        """One multi-token prompt step (maybe chunked, maybe right padded
        as BatchGenerator does: prepare(lengths, right_padding) ... finalize())."""
        B = p.B
        lp = p.r.left_padding.tolist() if p.r.empty() else [0] * B
        lp = [max(0, x) for x in lp]
        n = [lp[i] + self.draw(st.integers(1, 6)) for i in range(B)]
        S = max(max(n), 2)
        right = self.draw(st.booleans(), "right padding")
        if right:
            rp = [S - x for x in n]
            event(f"right padding {'> 0' if max(rp) else '= 0'}, {'rotated' if getattr(p.r, 'rotated', False) else 'not rotated'}")
            p.both("prepare", lengths=list(n), right_padding=rp)
            p.check(f"{what}: prepare(lengths={n}, right_padding={rp})")
        chunks = self.draw(st.integers(1, S // 2), "chunks")
        sizes = [S // chunks] * (chunks - 1) + [S - (S // chunks) * (chunks - 1)]
        for j, s in enumerate(sizes):
            update(p, self.inputs, s, f"{what}: prefill chunk {j} ({s} tokens)")
        if right:
            p.both("finalize")
            p.check(f"{what}: finalize")

    def decode(self, p, count, what, masks=True):
        for i in range(count):
            if masks:
                self.mask(p, 1, f"{what}: decode mask {i}")
            update(p, self.inputs, 1, f"{what}: decode {i}")

    def mask(self, p, N, what):
        return_array = self.draw(st.booleans())
        if p.rotating:
            ws = self.draw(st.one_of(st.none(), st.integers(1, p.r.max_size)))
            got, want = p.both("make_mask", N, window_size=ws, return_array=return_array)
        else:
            ws = self.draw(st.one_of(st.none(), st.integers(1, 12)))
            kwargs = {} if ws is None else {"window_size": ws}
            got, want = p.both("make_mask", N, return_array=return_array, **kwargs)
        assert_masks_equal(want, got, f"{what}: make_mask({N}, window_size={ws}, return_array={return_array})")
        p.check(f"{what}: after make_mask")

    def new_single(self, what):
        """A fresh single-sequence cache pair with some history (maybe none)."""
        if self.kind == "rot":
            keep = self.draw(st.integers(0, min(2, self.max_size - 1)))
            kv, r = kvcore.RotatingKVCache(self.max_size, keep), ref.RotatingKVCache(self.max_size, keep)
        else:
            kv, r = kvcore.KVCache(), ref.KVCache()
        for j, S in enumerate(self.draw(st.lists(st.integers(1, 7), max_size=3), "single updates")):
            (kk, kv_), (rk, rv) = self.inputs(1, S)
            got, want = kv.update_and_fetch(kk, kv_), r.update_and_fetch(rk, rv)
            assert_arrays_equal(want[0], got[0], f"{what}: single update {j}")
            assert_arrays_equal(want[1], got[1], f"{what}: single update {j}")
        assert_same_single(kv, r, what)
        return kv, r

    def merged(self, n, what, singles=None):
        if singles is None:
            singles = []
            for i in range(n):
                if self.pool and self.draw(st.booleans()):
                    singles.append(self.pool.pop(self.draw(st.integers(0, len(self.pool) - 1))))
                else:
                    singles.append(self.new_single(f"{what}: single {i}"))
        via = self.draw(st.sampled_from(["single", "batch"]), "merge via")
        if self.kind == "rot":
            kv_cls, r_cls = ((kvcore.RotatingKVCache, ref.RotatingKVCache) if via == "single"
                             else (kvcore.BatchRotatingKVCache, ref.BatchRotatingKVCache))
        else:
            kv_cls, r_cls = ((kvcore.KVCache, ref.KVCache) if via == "single"
                             else (kvcore.BatchKVCache, ref.BatchKVCache))
        p = Pair(kv_cls.merge([s[0] for s in singles]), r_cls.merge([s[1] for s in singles]))
        p.check(f"{what}: merge of {len(singles)} via {via}")
        # merging copies: the singles are untouched
        for i, (kv, r) in enumerate(singles):
            assert_same_single(kv, r, f"{what}: single {i} after merge")
        return p

    def fresh(self, what, B=None, padded=True):
        B = B or self.draw(st.integers(1, 4), "B")
        if not padded:
            lp = [0] * B
        elif self.draw(st.booleans(), "lp from lengths"):
            lens = self.draw(st.lists(st.integers(1, 8), min_size=B, max_size=B))
            lp = [max(lens) - x for x in lens]
        else:
            lp = self.draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
        if self.draw(st.booleans(), "lp via prepare"):
            p = new_pair(self.kind, self.max_size, [0] * B)
            p.check(f"{what}: fresh")
            p.both("prepare", left_padding=list(lp))
            p.check(f"{what}: prepare(left_padding={lp})")
        else:
            p = new_pair(self.kind, self.max_size, lp)
            p.check(f"{what}: fresh({lp})")
        return p

    # ---- operations on the current pair

    def op_decode(self, p, what):
        hi = 2 * self.max_size + 2 if p.rotating else 8
        self.decode(p, self.draw(st.integers(1, hi), "decode steps"), what)
        return p

    def op_prefill(self, p, what):
        self.prefill(p, what)
        return p

    def op_multi(self, p, what):
        # a multi-token step mid-decode (speculative decoding, chunked prompts)
        N = self.draw(st.integers(2, 4))
        self.mask(p, N, what)
        update(p, self.inputs, N, f"{what}: {N}-token update")
        return p

    def op_mask(self, p, what):
        self.mask(p, self.draw(st.sampled_from([1, 2, 3, 5])), what)
        return p

    def op_filter(self, p, what):
        keep = sorted(self.draw(st.sets(st.integers(0, p.B - 1), min_size=1), "keep"))
        if not p.rotating and p.r.empty() and min(p.r.left_padding[mx.array(keep)].tolist()) > 0:
            # mlx-lm's BatchKVCache.filter moves _idx below 0 on an empty
            # cache with left padding (then writes at negative positions).
            return p
        p.both("filter", list(keep))
        p.check(f"{what}: filter({keep})")
        return p

    def op_extend(self, p, what):
        if p.B >= MAX_B:
            return p
        B2 = self.draw(st.integers(1, MAX_B - p.B), "B2")
        source = self.draw(st.sampled_from(["fresh", "merged", "prefilled"]), "other")
        if source == "fresh":
            # As BatchGenerator extends a running prompt batch with the
            # merge of empty caches. (Left padding on empty rows joining a
            # non-empty batch would give rows with negative offsets, and
            # mlx-lm's filter then moves _idx below 0: garbage either way.)
            o = self.fresh(f"{what}: other", B2, padded=p.r.empty())
        elif source == "merged":
            o = self.merged(B2, f"{what}: other")
        else:
            o = self.fresh(f"{what}: other", B2)
            self.prefill(o, f"{what}: other")
            self.decode(o, self.draw(st.integers(0, self.max_size + 2)), f"{what}: other", masks=False)
        p.kv.extend(o.kv)
        p.r.extend(o.r)
        p.check(f"{what}: extend with {source} batch of {B2}")
        o.check(f"{what}: the other after extend")
        return p

    @staticmethod
    def extractable(p):
        # A row that took fewer tokens than its left padding (a fresh batch
        # with left padding extended into a running one) has a negative
        # offset: mlx-lm makes a RotatingKVCache with offset < 0 from it,
        # kvcore refuses with CacheValueError. Only rows with an offset.
        if not p.rotating:
            return list(range(p.B))
        return [i for i, o in enumerate(p.r.offset.tolist()) if o >= 0]

    def op_extract(self, p, what):
        if p.r.empty():
            return p
        rows = self.extractable(p)
        if not rows:
            return p
        i = self.draw(st.sampled_from(rows), "extract")
        kv, r = p.both("extract", i)
        assert_same_single(kv, r, f"{what}: extract({i})")
        if self.draw(st.booleans()):
            # the extracted cache is independent of the batch
            (kk, kv_), (rk, rv) = self.inputs(1, 1)
            got, want = kv.update_and_fetch(kk, kv_), r.update_and_fetch(rk, rv)
            assert_arrays_equal(want[0], got[0], f"{what}: update of extracted")
            assert_same_single(kv, r, f"{what}: extracted after update")
            p.check(f"{what}: batch after updating the extracted cache")
        self.pool.append((kv, r))
        return p

    def op_remerge(self, p, what):
        # take every sequence out and merge them back (new requests joining)
        if p.r.empty() or len(self.extractable(p)) < p.B:
            return p
        singles = [p.both("extract", i) for i in range(p.B)]
        for i, (kv, r) in enumerate(singles):
            assert_same_single(kv, r, f"{what}: extract({i})")
        return self.merged(len(singles), what, singles=singles)

    def op_trim(self, p, what):
        if p.rotating and not p.r.is_trimmable():
            return p
        limit = max(0, p.r._idx - max(0, max(p.r.left_padding.tolist())))
        n = self.draw(st.integers(0, limit), "trim")
        got, want = p.both("trim", n)
        assert got == want, f"{what}: trim({n}) returned {got} != {want}"
        p.check(f"{what}: trim({n})")
        return p

    def op_state(self, p, what):
        if self.draw(st.booleans(), "from_state"):
            q = Pair(type(p.kv).from_state(p.kv.state), fix_ref_from_state(type(p.r).from_state(p.r.state)))
        else:
            q = new_pair(self.kind, self.max_size, [0])
            q.kv.state = p.kv.state
            q.r.state = p.r.state
        q.check(f"{what}: state round trip")
        return q

    def op_copy(self, p, what):
        q = Pair(copy.deepcopy(p.kv), copy.deepcopy(p.r))
        q.check(f"{what}: deepcopy")
        update(q, self.inputs, 1, f"{what}: copy decodes")
        p.check(f"{what}: original after the copy decoded")
        return q if self.draw(st.booleans()) else p

    OPS = ["decode", "prefill", "multi", "mask", "filter", "extend", "extract",
           "remerge", "trim", "state", "copy"]

    def run(self):
        start = self.draw(st.sampled_from(["fresh", "merged"]), "start")
        if start == "fresh":
            p = self.fresh("start")
        else:
            p = self.merged(self.draw(st.integers(1, 4)), "start")
        self.prefill(p, "start")
        for k in range(self.draw(st.integers(2, 10), "n ops")):
            op = self.draw(st.sampled_from(self.OPS), f"op {k}")
            event(f"op {op}")
            p = getattr(self, f"op_{op}")(p, f"op {k} {op}")
        # whatever happened, the caches still decode the same
        self.decode(p, 2, "final")
        if p.rotating:
            event(f"ended rotated={p.r.rotated}")


@pytest.mark.parametrize("kind", ["kv", "rot"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_batch_scenarios(kind, data):
    max_size = data.draw(st.integers(3, 12), "max_size")
    step = data.draw(st.sampled_from([1, 2, 3, 5, 8, 256]), "step")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    dk, dv = data.draw(st.sampled_from([(4, 4), (4, 3), (2, 5)]), "head dims")
    seed = data.draw(st.integers(0, 10_000), "seed")
    with small_step(step):
        Scenario(data, kind, max_size, Inputs(seed, dk, dv, dtype)).run()


# --------------------------------------------------------------------------
# fixed scenarios (each feature named once, independent of hypothesis)


def test_left_padded_prefill_then_decode_past_window():
    inputs = Inputs(1, 4, 4, mx.float32)
    for kind in ("kv", "rot"):
        p = new_pair(kind, 5, [3, 0, 1])
        update(p, inputs, 6, f"{kind} prefill")
        for i in range(14):
            for N, ws in ((1, None), (1, 3), (3, None), (3, 4)):
                got, want = p.both("make_mask", N, window_size=ws)
                assert_masks_equal(want, got, f"{kind} step {i} mask N={N} ws={ws}")
            update(p, inputs, 1, f"{kind} decode {i}")
        if kind == "rot":
            assert p.kv.rotated and p.kv._offset == 20
            assert p.kv.keys.shape[2] == 5


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_right_padded_prefill_like_batch_generator(kind):
    # Three prompts of lengths 4, 7, 2 after history of 3, 0, 5 tokens
    inputs = Inputs(2, 4, 4, mx.float16)
    with small_step(4):
        singles = []
        for i, hist in enumerate([3, 0, 5]):
            kv, r = ((kvcore.RotatingKVCache(6), ref.RotatingKVCache(6)) if kind == "rot"
                     else (kvcore.KVCache(), ref.KVCache()))
            if hist:
                (kk, kv_), (rk, rv) = inputs(1, hist)
                kv.update_and_fetch(kk, kv_)
                r.update_and_fetch(rk, rv)
            singles.append((kv, r))
        p = Pair(type(singles[0][0]).merge([s[0] for s in singles]),
                 type(singles[0][1]).merge([s[1] for s in singles]))
        p.check("merged")
        lengths = [4, 7, 2]
        rp = [7 - x for x in lengths]
        p.both("prepare", lengths=lengths, right_padding=rp)
        p.check("prepare")
        update(p, inputs, 4, "chunk 1")
        update(p, inputs, 3, "chunk 2")
        p.both("finalize")
        p.check("finalize")
        assert p.kv.offset.tolist() == [3 + 4, 0 + 7, 5 + 2]
        for i in range(10):
            update(p, inputs, 1, f"decode {i}")
        p.both("filter", [0, 2])
        p.check("filter")
        for i in range(3):
            update(p, inputs, 1, f"decode after filter {i}")
        for i in range(2):
            kv, r = p.both("extract", i)
            assert_same_single(kv, r, f"extract {i}")


# --------------------------------------------------------------------------
# misuse and bad input


def filled_pair(kind, B=2, S=3, seed=5):
    p = new_pair(kind, 6, list(range(B))[::-1])
    update(p, Inputs(seed, 4, 4, mx.float32), S, "fill")
    return p


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_left_padding_on_non_empty_cache_raises(kind):
    p = filled_pair(kind)
    name = type(p.r).__name__
    with pytest.raises(ValueError, match="Left padding can only be added to an empty"):
        p.r.prepare(left_padding=[1, 1])
    with pytest.raises(kvcore.CacheValueError, match="Left padding can only be added to an empty") as e:
        p.kv.prepare(left_padding=[1, 1])
    assert isinstance(e.value, ValueError) and isinstance(e.value, kvcore.CacheError)
    assert name in str(e.value)
    p.check("unchanged after the refused prepare")
    update(p, Inputs(6, 4, 4, mx.float32), 1, "still works")


def test_rotating_decode_before_finalize_raises():
    inputs = Inputs(7, 4, 4, mx.float32)
    p = new_pair("rot", 4, [0, 0])
    p.both("prepare", lengths=[5, 3], right_padding=[0, 2])
    update(p, inputs, 5, "right padded prefill")
    (kk, kv_), (rk, rv) = inputs(2, 1)
    with pytest.raises(RuntimeError, match="finalize"):
        p.r.update_and_fetch(rk, rv)
    with pytest.raises(RuntimeError, match="finalize") as e:
        p.kv.update_and_fetch(kk, kv_)
    assert isinstance(e.value, kvcore.CacheError)
    p.check("unchanged after the refused decode")
    p.both("finalize")
    p.check("finalize")
    for i in range(6):
        update(p, inputs, 1, f"decode {i}")


def test_rotating_prepare_without_right_padding_needs_no_finalize():
    inputs = Inputs(8, 4, 4, mx.float32)
    p = new_pair("rot", 4, [0, 0])
    p.both("prepare", lengths=[3, 3], right_padding=[0, 0])
    p.check("prepare")
    assert p.kv._lengths is None
    update(p, inputs, 3, "prefill")
    update(p, inputs, 1, "decode")


def snap(c):
    """Deep copies of every observable of a kvcore batch cache."""
    state = tuple(mx.array(x) if isinstance(x, mx.array) else x for x in c.state)
    mx.eval([x for x in state if isinstance(x, mx.array)])
    return state, c._idx, c.empty(), c.size()


def assert_unchanged(c, before, what):
    state, idx, empty, size = before
    assert_states_equal(state, c.state, what)
    assert (c._idx, c.empty(), c.size()) == (idx, empty, size), what


BAD_UPDATES = {
    "batch too big": lambda B, S: ((B + 1, H, S, 4), (B + 1, H, S, 4)),
    "batch of one": lambda B, S: ((1, H, S, 4), (1, H, S, 4)),
    "rank 3": lambda B, S: ((B, S, 4), (B, S, 4)),
    "rank 5": lambda B, S: ((B, H, S, 4, 1), (B, H, S, 4, 1)),
    "values batch": lambda B, S: ((B, H, S, 4), (B + 1, H, S, 4)),
    "values length": lambda B, S: ((B, H, S, 4), (B, H, S + 1, 4)),
    "heads": lambda B, S: ((B, H + 1, S, 4), (B, H + 1, S, 4)),
    "head dim": lambda B, S: ((B, H, S, 5), (B, H, S, 4)),
}


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("bad", list(BAD_UPDATES))
@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_bad_update_raises_typed_error_and_leaves_cache(kind, bad, S):
    p = filled_pair(kind, B=3)
    before = snap(p.kv)
    ks, vs = BAD_UPDATES[bad](3, S)
    with pytest.raises(kvcore.CacheError) as e:
        p.kv.update_and_fetch(mx.zeros(ks), mx.zeros(vs))
    assert isinstance(e.value, (ValueError, IndexError))
    assert_unchanged(p.kv, before, f"after {bad}")
    p.check("equal to mlx-lm still")
    update(p, Inputs(9, 4, 4, mx.float32), S, "valid update after the bad one")


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_filter_and_extract_out_of_range(kind):
    p = filled_pair(kind, B=3)
    before = snap(p.kv)
    for keep in ([0, 3], [5], [1, 2, 7]):
        with pytest.raises(kvcore.CacheIndexError) as e:
            p.kv.filter(keep)
        assert isinstance(e.value, IndexError)
        assert_unchanged(p.kv, before, f"filter({keep})")
    for i in (3, 10):
        with pytest.raises(kvcore.CacheIndexError):
            p.kv.extract(i)
        assert_unchanged(p.kv, before, f"extract({i})")
    p.check("equal to mlx-lm still")
    p.both("filter", [0, 2])
    p.check("valid filter")


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_bad_state_raises_typed_error(kind):
    p = filled_pair(kind, B=2)
    good = p.kv.state
    cls = type(p.kv)
    bads = [
        good[:-1],
        good + (0,),
        3,
        "abc",
        {"keys": good[0]},
        (good[0], good[1], 5) + good[3:],  # offset must be an array
    ]
    for bad in bads:
        with pytest.raises(kvcore.CacheError) as e:
            cls.from_state(bad)
        assert isinstance(e.value, (ValueError, TypeError)), type(e.value)
        target = new_pair(kind, 6, [0, 0]).kv
        before = snap(target)
        with pytest.raises(kvcore.CacheError):
            target.state = bad
        assert_unchanged(target, before, f"state = {bad!r:.40}")
    # the good state still works, as a tuple or as the list a file gives
    for st_ in (good, list(good)):
        q = cls.from_state(st_)
        assert_states_equal(good, q.state)


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_none_state_raises_typed_error(kind):
    # Like every other malformed state (3, "abc", a dict): a kvcore error.
    cls = type(filled_pair(kind).kv)
    with pytest.raises(kvcore.CacheError):
        cls.from_state(None)
    target = new_pair(kind, 6, [0, 0]).kv
    before = snap(target)
    with pytest.raises(kvcore.CacheError):
        target.state = None
    assert_unchanged(target, before, "state = None")


def test_error_types():
    for cls in (kvcore.CacheValueError, kvcore.CacheIndexError, kvcore.CacheRuntimeError):
        assert issubclass(cls, kvcore.CacheError)
    assert issubclass(kvcore.CacheValueError, ValueError)
    assert issubclass(kvcore.CacheIndexError, IndexError)
    assert issubclass(kvcore.CacheRuntimeError, RuntimeError)


# --------------------------------------------------------------------------
# dynamic_roll


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    axis_pick=st.integers(0, 3),
    shifts_seed=st.integers(0, 1000),
    dtype=st.sampled_from([mx.float32, mx.bfloat16, mx.int32]),
)
def test_dynamic_roll_matches_mlx_lm(shape, axis_pick, shifts_seed, dtype):
    axis = axis_pick % len(shape)
    x = mx.arange(int(mx.prod(mx.array(shape)).item())).reshape(shape).astype(dtype)
    lead = tuple(shape[:axis])
    if lead and shifts_seed % 2:
        lead = lead[:-1] + (1,)  # broadcast over the last leading axis (as finalize does)
    shifts = mx.random.randint(-7, 8, lead, key=mx.random.key(shifts_seed))
    want = ref.dynamic_roll(x, shifts, axis)
    got = kvcore.dynamic_roll(x, shifts, axis)
    assert_arrays_equal(want, got, f"dynamic_roll(shape={shape}, axis={axis})")


def test_dynamic_roll_per_row_shifts_like_finalize():
    x = mx.arange(3 * 2 * 6 * 2).reshape(3, 2, 6, 2).astype(mx.float16)
    shifts = mx.array([0, 2, 5])
    for axis_shifts in (shifts[:, None], shifts[:, None] * -1):
        assert_arrays_equal(ref.dynamic_roll(x, axis_shifts, 2), kvcore.dynamic_roll(x, axis_shifts, 2))


# --------------------------------------------------------------------------
# ArraysCache and CacheList in batches


def arrays_single(mod, key, filled=True):
    c = mod.ArraysCache(2)
    if filled:
        c[0] = int_valued_normal(key, (1, 3, 4), mx.float32)
        c[1] = int_valued_normal(mx.random.split(key)[0], (1, 2, 2), mx.bfloat16)
    return c


def assert_same_arrays(kv, r, what):
    assert type(kv) is kvcore.ArraysCache, what
    assert len(kv.cache) == len(r.cache)
    for i, (a, b) in enumerate(zip(r.cache, kv.cache)):
        opt_equal(a, b, f"{what}.cache[{i}]")
    opt_equal(r.left_padding, kv.left_padding, f"{what}.left_padding")
    opt_equal(r.lengths, kv.lengths, f"{what}.lengths")
    assert kv.empty() == r.empty()
    assert kv.nbytes == r.nbytes


def assert_same_layer(kv, r, what):
    name = type(r).__name__
    if name == "CacheList":
        assert type(kv) is kvcore.CacheList, what
        assert len(kv.caches) == len(r.caches)
        for i, (a, b) in enumerate(zip(kv.caches, r.caches)):
            assert_same_layer(a, b, f"{what}[{i}]")
    elif name == "ArraysCache":
        assert_same_arrays(kv, r, what)
    elif name.startswith("Batch"):
        assert_same_batch(kv, r, what)
    else:
        assert_same_single(kv, r, what)


def cache_list_single(mod, inner, key, hist, max_size=5):
    attn = mod.RotatingKVCache(max_size) if inner == "rot" else mod.KVCache()
    if hist:
        kk = int_valued_normal(key, (1, H, hist, 4), mx.float32)
        vv = int_valued_normal(mx.random.split(key)[1], (1, H, hist, 4), mx.float32)
        attn.update_and_fetch(kk, vv)
    return mod.CacheList(attn, arrays_single(mod, key, filled=hist > 0))


def step_layer(kv, r, inputs, S, what):
    """A model step on a CacheList(attention, ArraysCache) layer."""
    (kk, kv_), (rk, rv) = inputs(r[0].left_padding.size, S)
    got, want = kv[0].update_and_fetch(kk, kv_), r[0].update_and_fetch(rk, rv)
    assert_arrays_equal(want[0], got[0], what)
    B = r[0].left_padding.size
    new = int_valued_normal(mx.random.key(inputs.n), (B, 3, 4), mx.float32)
    kv[1][0] = mx.array(new)
    r[1][0] = new
    assert_masks_equal(r[1].make_mask(S), kv[1].make_mask(S), f"{what}: ssm mask")
    assert_same_layer(kv, r, what)


@pytest.mark.parametrize("inner", ["kv", "rot"])
def test_cache_list_of_attention_and_arrays_in_batches(inner):
    inputs = Inputs(11, 4, 4, mx.float32)
    hists = [3, 0, 6]
    kvs = [cache_list_single(kvcore, inner, mx.random.key(20 + i), h) for i, h in enumerate(hists)]
    rs = [cache_list_single(ref, inner, mx.random.key(20 + i), h) for i, h in enumerate(hists)]
    for i, (a, b) in enumerate(zip(kvs, rs)):
        assert_same_layer(a, b, f"single {i}")
    kv = kvcore.CacheList.merge(kvs)
    r = ref.CacheList.merge(rs)
    assert_same_layer(kv, r, "merge")
    assert type(kv[0]) is (kvcore.BatchRotatingKVCache if inner == "rot" else kvcore.BatchKVCache)

    # a right-padded prompt step, as BatchGenerator runs it
    kv.prepare(lengths=[2, 4, 1], right_padding=[2, 0, 3])
    r.prepare(lengths=[2, 4, 1], right_padding=[2, 0, 3])
    assert_same_layer(kv, r, "prepare")
    step_layer(kv, r, inputs, 4, "prompt")
    kv.finalize()
    r.finalize()
    assert_same_layer(kv, r, "finalize")
    for i in range(7):
        step_layer(kv, r, inputs, 1, f"decode {i}")

    kv.filter([0, 2])
    r.filter([0, 2])
    assert_same_layer(kv, r, "filter")
    step_layer(kv, r, inputs, 1, "decode after filter")

    others_kv = [cache_list_single(kvcore, inner, mx.random.key(40 + i), h) for i, h in enumerate([2, 5])]
    others_r = [cache_list_single(ref, inner, mx.random.key(40 + i), h) for i, h in enumerate([2, 5])]
    okv, orr = kvcore.CacheList.merge(others_kv), ref.CacheList.merge(others_r)
    assert_same_layer(okv, orr, "merge others")
    kv.extend(okv)
    r.extend(orr)
    assert_same_layer(kv, r, "extend")
    for i in range(3):
        step_layer(kv, r, inputs, 1, f"decode after extend {i}")
    for i in range(4):
        assert_same_layer(kv.extract(i), r.extract(i), f"extract({i})")


def test_arrays_cache_batch_ops_like_mlx_lm():
    keys = [mx.random.key(i) for i in range(4)]
    kvs = [arrays_single(kvcore, k, filled=i != 1) for i, k in enumerate(keys)]
    rs = [arrays_single(ref, k, filled=i != 1) for i, k in enumerate(keys)]
    kv, r = kvcore.ArraysCache.merge(kvs), ref.ArraysCache.merge(rs)
    assert_same_arrays(kv, r, "merge")
    kv.prepare(lengths=[3, 1, 2, 3])
    r.prepare(lengths=[3, 1, 2, 3])
    assert_masks_equal(r.make_mask(3), kv.make_mask(3), "mask with lengths")
    kv.filter([1, 3])
    r.filter([1, 3])
    assert_same_arrays(kv, r, "filter")
    okv = kvcore.ArraysCache.merge([arrays_single(kvcore, mx.random.key(9))])
    orr = ref.ArraysCache.merge([arrays_single(ref, mx.random.key(9))])
    kv.extend(okv)
    r.extend(orr)
    assert_same_arrays(kv, r, "extend")
    for i in range(3):
        assert_same_arrays(kv.extract(i), r.extract(i), f"extract({i})")
    kv.finalize()
    r.finalize()
    assert_same_arrays(kv, r, "finalize")


# --------------------------------------------------------------------------
# prompt-cache files with batch caches


def batch_cache_list(mod):
    """A list of batch caches in varied states, built the same way from
    mlx-lm's classes or kvcore's."""
    inp = Inputs(31, 4, 3, mx.bfloat16)
    pick = 0 if mod is kvcore else 1

    def upd(c, B, S):
        c.update_and_fetch(*inp(B, S)[pick])

    a = mod.BatchKVCache([2, 0, 1])
    upd(a, 3, 5)
    upd(a, 3, 1)
    a.filter([0, 2])  # shifts left

    b = mod.BatchRotatingKVCache(4, [1, 0])
    b.prepare(lengths=[3, 2], right_padding=[0, 1])
    upd(b, 2, 3)
    b.finalize()
    for _ in range(6):
        upd(b, 2, 1)  # rotated
    assert b.rotated

    c = mod.BatchRotatingKVCache(8, [0, 2])  # empty: keys None
    d = mod.BatchKVCache([1])
    upd(d, 1, 3)
    d.trim(1)
    e = mod.BatchRotatingKVCache(6, [0, 0, 3])
    upd(e, 3, 4)  # not yet full: trimmable
    return [a, b, c, d, e]


def test_batch_cache_builders_agree():
    for i, (kv, r) in enumerate(zip(batch_cache_list(kvcore), batch_cache_list(ref))):
        assert_same_batch(kv, r, f"cache {i}")


def test_kvcore_file_with_batch_caches_loads_in_mlx_lm(tmp_path):
    path = str(tmp_path / "kv.safetensors")
    kvs = batch_cache_list(kvcore)
    kvcore.save_prompt_cache(path, kvs, {"who": "kvcore"})
    loaded, meta = ref.load_prompt_cache(path, return_metadata=True)
    assert meta == {"who": "kvcore"}
    assert [type(c) for c in loaded] == [
        ref.BatchKVCache, ref.BatchRotatingKVCache, ref.BatchRotatingKVCache,
        ref.BatchKVCache, ref.BatchRotatingKVCache,
    ]
    rs = batch_cache_list(ref)
    for i, (kv, lr, r) in enumerate(zip(kvs, loaded, rs)):
        assert_states_equal(kv.state, lr.state, f"cache {i} as loaded by mlx-lm")
        assert_states_equal(r.state, lr.state, f"cache {i} vs mlx-lm built")
    # kvcore loads its own file the same
    again = kvcore.load_prompt_cache(path)
    for i, (kv, lk) in enumerate(zip(kvs, again)):
        assert type(lk) is type(kv)
        assert_states_equal(kv.state, lk.state, f"cache {i} as loaded by kvcore")


def test_mlx_lm_file_with_batch_caches_loads_in_kvcore(tmp_path):
    path = str(tmp_path / "ref.safetensors")
    rs = batch_cache_list(ref)
    ref.save_prompt_cache(path, rs, {"who": "mlx-lm"})
    loaded, meta = kvcore.load_prompt_cache(path, return_metadata=True)
    assert meta == {"who": "mlx-lm"}
    rl = [fix_ref_from_state(c) for c in ref.load_prompt_cache(path)]
    inputs = Inputs(32, 4, 3, mx.bfloat16)
    for i, (r, kv, lr) in enumerate(zip(rs, loaded, rl)):
        assert type(kv) is getattr(kvcore, type(r).__name__)
        assert_states_equal(r.state, kv.state, f"cache {i}")
        # both loaded caches go on the same
        p = Pair(kv, lr)
        p.check(f"cache {i} loaded")
        update(p, inputs, 1, f"cache {i} decode after load")
        update(p, inputs, 2, f"cache {i} 2 tokens after load")


def test_filter_on_empty_cache_keeps_its_padding_unlike_mlx_lm():
    # mlx-lm shifts an empty cache "left" too, taking _idx below zero, and
    # its next update then fails inside mlx. kvcore keeps the padding still
    # to be written, and the next prefill matches a cache made directly
    # with the kept row's padding.
    r = ref.BatchKVCache([2, 3])
    r.filter([1])
    assert r._idx == -3

    c = kvcore.BatchKVCache([2, 3])
    c.filter([1])
    assert c._idx == 0
    assert c.left_padding.tolist() == [3]
    assert c.offset.tolist() == [-3]

    fresh = ref.BatchKVCache([3])
    k = mx.arange(8, dtype=mx.float32).reshape(1, 1, 4, 2)
    got = c.update_and_fetch(k, k)
    want = fresh.update_and_fetch(k, k)
    assert_arrays_equal(want[0], got[0])
    assert_arrays_equal(fresh.make_mask(1), c.make_mask(1))
