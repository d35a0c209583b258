"""Inputs mlx-lm 0.32.2 accepts that kvcore once refused, from mlx-lm's own
tests (scripts/mlx_lm_tests.sh runs those on kvcore):

* integer (and bool) keys and values: stored like any others, as
  test_server.py's TestLRUPromptCache.test_caching does; only quantizing
  needs floats, and it raises a typed error naming the dtype;
* a batch cache updated with more rows than it has paddings
  (test_prompt_cache.py's test_save_load_batch_caches): updates, trims and
  states as in mlx-lm; the row-wise operations, whose rows would not
  correspond, raise;
* RotatingKVCaches merged through KVCache.merge (test_merge_with_empty_caches):
  exact where mlx-lm's merge reads their tokens in order; a rotated ring or
  an over-long buffer is refused.

Each case runs mlx-lm's cache beside kvcore's and compares arrays bit for
bit, offsets, states and errors (type, and message where mlx-lm raises).

Deliberate differences, each pinned below:
* QuantizedKVCache.update_and_fetch on integer keys: both raise ValueError,
  mlx-lm after advancing its offset, kvcore leaving the cache unchanged.
* float64 keys: mlx-lm's to_quantized returns arrays that fail when
  evaluated (RuntimeError); kvcore raises CacheValueError at the call.
* the row-wise batch operations on mismatched rows raise CacheRuntimeError;
  mlx-lm returns a mask, filter and extend results for paddings that belong
  to no row, and raises ValueError (finalize) or IndexError (extract past
  the paddings).
* KVCache.merge of a rotated RotatingKVCache: mlx-lm copies the ring in slot
  order (rows out of order); kvcore raises CacheValueError.
"""

import copy

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from conftest import assert_arrays_equal, assert_masks_equal, assert_states_equal

import kvcore

# --------------------------------------------------------------------------
# helpers


def ints(seed, shape, dtype):
    """Deterministic integer data of dtype (bool: nonzero)."""
    x = mx.random.randint(0, 100, shape, key=mx.random.key(seed))
    x = (x % 2 == 1) if dtype == mx.bool_ else x.astype(dtype)
    mx.eval(x)
    return x


def floats(seed, shape, dtype=mx.float32):
    x = mx.round(mx.random.normal(shape, key=mx.random.key(seed)) * 30).astype(dtype)
    mx.eval(x)
    return x


def tokens(first, S, B=1, H=1, D=2):
    """(B, H, S, D) float32 keys whose values are their positions."""
    t = mx.arange(first, first + S, dtype=mx.float32).reshape(1, 1, S, 1)
    return mx.array(mx.broadcast_to(t, (B, H, S, D)))


def both_update(c, r, keys, values, what):
    """The same update on kvcore's c and mlx-lm's r; results compared at once
    (mlx-lm's rotating caches hand out buffers their next update rewrites)."""
    ck, cv = c.update_and_fetch(keys, values)
    rk, rv = r.update_and_fetch(mx.array(keys), mx.array(values))
    assert_arrays_equal(rk, ck, f"{what}: keys")
    assert_arrays_equal(rv, cv, f"{what}: values")


def assert_same(c, r, what):
    assert_states_equal(r.state, c.state, f"{what}: state")
    if isinstance(r.offset, mx.array):
        assert_arrays_equal(r.offset, c.offset, f"{what}: offset")
    else:
        assert c.offset == r.offset, what
    if hasattr(r, "_idx"):
        assert c._idx == r._idx, what
    assert c.size() == r.size(), what
    assert c.empty() == r.empty(), what
    assert c.nbytes == r.nbytes, what


def frozen(c):
    """Evaluated copies of a cache's state and counters, for 'unchanged'."""
    state = tuple(mx.array(x) if isinstance(x, mx.array) else x for x in c.state)
    mx.eval([x for x in state if isinstance(x, mx.array)])
    return state, getattr(c, "_idx", None), c.empty(), c.size()


def assert_unchanged(c, before, what):
    state, idx, empty, size = before
    assert_states_equal(state, c.state, what)
    assert (getattr(c, "_idx", None), c.empty(), c.size()) == (idx, empty, size), what


def typed(excinfo, kind, builtin, message):
    e = excinfo.value
    assert type(e) is kind and isinstance(e, builtin) and isinstance(e, kvcore.CacheError)
    assert str(e) == message, str(e)


# --------------------------------------------------------------------------
# integer keys and values

SINGLE_KINDS = {
    "KVCache": (),
    "ConcatenateKVCache": (),
    "RotatingKVCache": (8, 2),
    "ChunkedKVCache": (4,),
}
INT_DTYPES = [mx.int32, mx.int64, mx.int8, mx.uint8, mx.uint32, mx.bool_]


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(SINGLE_KINDS))
def test_integer_keys_are_stored_like_mlx_lm(kind, dtype):
    args = SINGLE_KINDS[kind]
    c, r = getattr(kvcore, kind)(*args), getattr(ref, kind)(*args)
    # The rotating cache (8 slots) fills, wraps and is re-ordered by a
    # multi-token update; the chunked one trims its front.
    for i, S in enumerate([3, 1, 1, 5, 1, 1, 1, 1, 2]):
        shape = (1, 2, S, 4)
        both_update(c, r, ints(2 * i, shape, dtype), ints(2 * i + 1, shape, dtype), f"update {i}")
        assert_same(c, r, f"after update {i}")
        if kind == "ChunkedKVCache":
            c.maybe_trim_front()
            r.maybe_trim_front()
    d = copy.deepcopy(c)
    assert_same(d, r, "deep copy")
    # (ConcatenateKVCache's trim differs on purpose: kvcore drops the tokens.)
    if c.is_trimmable() and kind != "ConcatenateKVCache":
        assert c.trim(2) == r.trim(2)
        assert_same(c, r, "trimmed")


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8], ids=str)
def test_integer_keys_with_float_values_like_mlx_lm(dtype):
    c, r = kvcore.KVCache(), ref.KVCache()
    both_update(c, r, ints(1, (1, 2, 3, 4), dtype), floats(2, (1, 2, 3, 4)), "mixed")
    both_update(c, r, ints(3, (1, 2, 1, 4), dtype), floats(4, (1, 2, 1, 4)), "mixed again")
    assert_same(c, r, "mixed dtypes")


@pytest.mark.parametrize("kind", ["KVCache", "RotatingKVCache", "ChunkedKVCache"])
def test_integer_state_round_trips_like_mlx_lm(kind):
    args = SINGLE_KINDS[kind]
    c, r = getattr(kvcore, kind)(*args), getattr(ref, kind)(*args)
    both_update(c, r, ints(5, (1, 2, 6, 4), mx.int32), ints(6, (1, 2, 6, 4), mx.int32), "fill")
    c2 = getattr(kvcore, kind).from_state(r.state)
    r2 = getattr(ref, kind).from_state(r.state)
    assert_same(c2, r2, "from mlx-lm's state")
    both_update(c2, r2, ints(7, (1, 2, 1, 4), mx.int32), ints(8, (1, 2, 1, 4), mx.int32), "next")


@pytest.mark.parametrize("cls, args", [("BatchKVCache", ([1, 0],)), ("BatchRotatingKVCache", (4, [1, 0]))])
def test_integer_keys_in_batch_caches_like_mlx_lm(cls, args):
    c, r = getattr(kvcore, cls)(*args), getattr(ref, cls)(*args)
    for i, S in enumerate([3, 1, 1, 1, 2]):
        shape = (2, 1, S, 2)
        both_update(c, r, ints(i, shape, mx.int16), ints(i + 50, shape, mx.int16), f"update {i}")
        assert_same(c, r, f"after update {i}")
        assert_masks_equal(r.make_mask(1), c.make_mask(1), f"mask {i}")


def lru_scenario(mod):
    """test_server.py's TestLRUPromptCache.test_caching, with mlx-lm's
    LRUPromptCache holding `mod`'s KVCache; records what each step sees."""
    seen = []
    cache = ref.LRUPromptCache(max_size=10)

    def get_kv(n):
        keys = mx.arange(n).reshape(1, 1, n, 1)
        return keys, keys

    def record(c, t):
        k, v = c[0].keys_and_values()
        seen.append((k, v, c[0].offset, list(t), len(cache), cache.nbytes))

    model = ("test", None, None)
    tokens_ = [10] * 24
    c, t = cache.fetch_nearest_cache(model, tokens_)
    assert c is None and t == tokens_
    c = [mod.KVCache()]
    c[0].update_and_fetch(*get_kv(24))
    cache.insert_cache(model, t, c)
    tokens_ = tokens_ + [20] * 5
    c, t = cache.fetch_nearest_cache(model, tokens_)
    record(c, t)
    tokens_ = tokens_ + [30] * 3
    c[0].update_and_fetch(*get_kv(8))
    cache.insert_cache(model, tokens_, c)
    tokens_ = tokens_[:26] + [40] * 8
    c, t = cache.fetch_nearest_cache(model, tokens_)
    record(c, t)
    c[0].update_and_fetch(*get_kv(8))
    cache.insert_cache(model, tokens_, c)
    c, t = cache.fetch_nearest_cache(model, tokens_)
    record(c, t)
    return seen


def test_lru_prompt_cache_with_integer_kvcaches_matches_mlx_lm():
    got, want = lru_scenario(kvcore), lru_scenario(ref)
    assert len(got) == len(want) == 3
    for i, (g, w) in enumerate(zip(got, want)):
        assert_arrays_equal(w[0], g[0], f"step {i}: keys")
        assert_arrays_equal(w[1], g[1], f"step {i}: values")
        assert g[2:] == w[2:], f"step {i}"
    assert got[1][0].flatten().tolist() == list(range(24)) + [0, 1]


QUANTIZE_MESSAGE = ("[{ctx}] expected keys and values of dtype float16, bfloat16 or float32 "
                    "to quantize but got {dtype}")


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_], ids=str)
def test_to_quantized_on_integer_keys_raises_typed_error(dtype):
    c, r = kvcore.KVCache(), ref.KVCache()
    both_update(c, r, ints(1, (1, 2, 3, 64), dtype), ints(2, (1, 2, 3, 64), dtype), "fill")
    with pytest.raises(ValueError) as re_:
        r.to_quantized()
    before = frozen(c)
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.to_quantized()
    name = str(dtype).replace("mlx.core.", "")
    typed(ce, kvcore.CacheValueError, ValueError,
          QUANTIZE_MESSAGE.format(ctx="KVCache.to_quantized", dtype=name))
    assert f"type {name}" in str(re_.value)  # mlx-lm's comes from mx.quantize
    assert_unchanged(c, before, "after the refused to_quantized")
    assert_same(c, r, "still equal to mlx-lm's")
    both_update(c, r, ints(3, (1, 2, 1, 64), dtype), ints(4, (1, 2, 1, 64), dtype), "next")


def test_quantizing_rotating_caches_needs_floats_too():
    # mlx-lm has no quantized rotating cache (NotImplementedError); kvcore's
    # refuses integer keys the same way.
    c = kvcore.RotatingKVCache(8)
    c.update_and_fetch(ints(1, (1, 2, 3, 64), mx.int32), ints(2, (1, 2, 3, 64), mx.int32))
    before = frozen(c)
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.to_quantized()
    typed(ce, kvcore.CacheValueError, ValueError,
          QUANTIZE_MESSAGE.format(ctx="RotatingKVCache.to_quantized", dtype="int32"))
    assert_unchanged(c, before, "after the refused to_quantized")
    q = kvcore.QuantizedRotatingKVCache(8)
    x = ints(3, (1, 2, 1, 64), mx.int32)
    with pytest.raises(kvcore.CacheValueError) as ce:
        q.update_and_fetch(x, x)
    typed(ce, kvcore.CacheValueError, ValueError,
          QUANTIZE_MESSAGE.format(ctx="QuantizedRotatingKVCache.update_and_fetch", dtype="int32"))
    assert q.offset == 0 and q.empty()


def test_to_quantized_of_an_empty_cache_needs_no_dtype():
    q, rq = kvcore.KVCache().to_quantized(32, 8), ref.KVCache().to_quantized(32, 8)
    assert (q.offset, q.group_size, q.bits, q.empty()) == (rq.offset, rq.group_size, rq.bits, True)


def test_quantized_update_with_integer_keys_raises_and_changes_nothing():
    c, r = kvcore.QuantizedKVCache(64, 4), ref.QuantizedKVCache(64, 4)
    x = ints(1, (1, 2, 2, 64), mx.int32)
    with pytest.raises(ValueError):
        r.update_and_fetch(x, x)
    assert r.offset == 2  # mlx-lm's cache is left advanced over nothing
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.update_and_fetch(x, x)
    typed(ce, kvcore.CacheValueError, ValueError,
          QUANTIZE_MESSAGE.format(ctx="QuantizedKVCache.update_and_fetch", dtype="int32"))
    assert c.offset == 0 and c.empty()
    # Then it works like a fresh mlx-lm cache.
    fresh = ref.QuantizedKVCache(64, 4)
    y = floats(2, (1, 2, 3, 64))
    (ck, cv), (rk, rv) = c.update_and_fetch(y, y), fresh.update_and_fetch(mx.array(y), mx.array(y))
    for a, b in zip(ck + cv, rk + rv):
        assert_arrays_equal(b, a, "quantized")


def test_float64_to_quantized_raises_at_the_call():
    x = mx.zeros((1, 1, 2, 64), mx.float64)
    r = ref.KVCache()
    r.update_and_fetch(x, x)
    q = r.to_quantized()  # lazily accepted by mlx-lm ...
    with pytest.raises(RuntimeError):
        mx.eval(q.keys)  # ... failing only when evaluated
    c = kvcore.KVCache()
    c.update_and_fetch(x, x)
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.to_quantized()
    typed(ce, kvcore.CacheValueError, ValueError,
          QUANTIZE_MESSAGE.format(ctx="KVCache.to_quantized", dtype="float64"))


def test_integer_keys_into_a_float_cache_still_raise_and_change_nothing():
    c = kvcore.KVCache()
    c.update_and_fetch(floats(1, (1, 2, 3, 4)), floats(2, (1, 2, 3, 4)))
    before = frozen(c)
    x = ints(3, (1, 2, 1, 4), mx.int32)
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.update_and_fetch(x, x)
    typed(ce, kvcore.CacheValueError, ValueError,
          "[KVCache.update_and_fetch] expected keys of dtype float32 like the cache's but got int32")
    assert_unchanged(c, before, "after the refused update")


# --------------------------------------------------------------------------
# batch caches updated with more rows than paddings

BATCH_KINDS = {
    "BatchKVCache": ([1, 2],),
    "BatchRotatingKVCache": (10, [1, 2]),
}


def mismatched_pair(kind, S=7):
    """test_save_load_batch_caches's caches: two paddings, four rows."""
    args = BATCH_KINDS[kind]
    c, r = getattr(kvcore, kind)(*args), getattr(ref, kind)(*args)
    both_update(c, r, floats(1, (4, 4, S, 4)), floats(2, (4, 4, S, 4)), "first update")
    return c, r


@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_update_with_more_rows_than_paddings_matches_mlx_lm(kind):
    c, r = mismatched_pair(kind)
    assert_same(c, r, "after the first update")
    assert c.offset.tolist() == [6, 5] and c.left_padding.tolist() == [1, 2]
    # The rotating one (10 slots) fills, rotates and is re-ordered by S > 1.
    for i, S in enumerate([1, 1, 1, 1, 3, 1]):
        both_update(c, r, floats(10 + i, (4, 4, S, 4)), floats(20 + i, (4, 4, S, 4)), f"update {i}")
        assert_same(c, r, f"after update {i}")
    if r.is_trimmable():
        assert c.trim(2) == r.trim(2)
        assert_same(c, r, "trimmed")
    assert_same(copy.deepcopy(c), r, "deep copy")


@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_mismatched_batch_state_saves_and_loads_both_ways(kind, tmp_path):
    c, r = mismatched_pair(kind)
    mine, theirs = str(tmp_path / "kvcore.safetensors"), str(tmp_path / "mlx_lm.safetensors")
    kvcore.save_prompt_cache(mine, [c])
    ref.save_prompt_cache(theirs, [r])
    for f in (mine, theirs):
        (loaded,) = kvcore.load_prompt_cache(f)
        (ref_loaded,) = ref.load_prompt_cache(f)
        assert type(loaded) is getattr(kvcore, kind)
        assert_states_equal(ref_loaded.state, loaded.state, f"{f}: loaded")
        assert_arrays_equal(mx.array([1, 2]), loaded.left_padding, "left_padding")
    (loaded,) = kvcore.load_prompt_cache(mine)
    both_update(loaded, r, floats(5, (4, 4, 2, 4)), floats(6, (4, 4, 2, 4)), "loaded, then updated")


def batch_message(ctx):
    return (f"[{ctx}] expected offset, left_padding and keys for one batch of 2 "
            f"but got 2 paddings and keys for 4")


# What mlx-lm does with each: a mask for two rows applied to four, rows
# filtered or extended whose paddings belong to no key row, a broadcast
# ValueError (finalize) or an IndexError (extract(3)).
ROW_WISE = {
    "make_mask": (lambda c: c.make_mask(1), "{kind}.make_mask"),
    "filter": (lambda c: c.filter([0, 1]), "filter"),
    "extend": (lambda c: c.extend(type(c)(*BATCH_KINDS[type(c).__name__][:-1], [0])), "extend"),
    "extract": (lambda c: c.extract(0), "{kind}.extract"),
}


@pytest.mark.parametrize("op", list(ROW_WISE))
@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_row_wise_ops_refuse_mismatched_rows_and_change_nothing(kind, op):
    c, r = mismatched_pair(kind)
    fn, ctx = ROW_WISE[op]
    before = frozen(c)
    with pytest.raises(kvcore.CacheRuntimeError) as ce:
        fn(c)
    typed(ce, kvcore.CacheRuntimeError, RuntimeError, batch_message(ctx.format(kind=kind)))
    assert_unchanged(c, before, f"after {op}")
    both_update(c, r, floats(7, (4, 4, 1, 4)), floats(8, (4, 4, 1, 4)), f"update after {op}")


def test_finalize_refuses_mismatched_rows_and_changes_nothing():
    c, r = mismatched_pair("BatchKVCache")
    c.prepare(right_padding=[1, 0])
    r.prepare(right_padding=[1, 0])
    with pytest.raises(ValueError):
        r.finalize()  # mlx's broadcast of (2, 1) shifts over four rows
    before = frozen(c)
    with pytest.raises(kvcore.CacheRuntimeError) as ce:
        c.finalize()
    typed(ce, kvcore.CacheRuntimeError, RuntimeError, batch_message("BatchKVCache.finalize"))
    assert_unchanged(c, before, "after finalize")
    assert_arrays_equal(mx.array([1, 0]), c._right_padding, "right padding kept")


def test_rotating_right_padded_update_refuses_mismatched_rows():
    c, r = mismatched_pair("BatchRotatingKVCache", S=3)
    c.prepare(lengths=[2, 3], right_padding=[1, 0])
    r.prepare(lengths=[2, 3], right_padding=[1, 0])
    x = floats(3, (4, 4, 2, 4))
    with pytest.raises(ValueError):
        r.update_and_fetch(x, x)  # mlx's broadcast, as in finalize
    before = frozen(c)
    with pytest.raises(kvcore.CacheRuntimeError) as ce:
        c.update_and_fetch(x, x)
    typed(ce, kvcore.CacheRuntimeError, RuntimeError,
          batch_message("BatchRotatingKVCache.update_and_fetch"))
    assert_unchanged(c, before, "after the update")
    with pytest.raises(kvcore.CacheRuntimeError) as ce:
        c.finalize()
    typed(ce, kvcore.CacheRuntimeError, RuntimeError, batch_message("BatchRotatingKVCache.finalize"))
    assert_unchanged(c, before, "after finalize")


@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_states_still_need_one_padding_per_offset(kind):
    c, _ = mismatched_pair(kind)
    state = list(c.state)
    state[3] = mx.array([1, 2, 0])  # three paddings for two offsets
    before = frozen(c)
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.state = tuple(state)
    typed(ce, kvcore.CacheValueError, ValueError,
          f"[{kind}.state] expected offset and left_padding for one batch size but got 2, 3")
    assert_unchanged(c, before, "after the refused state")


def test_update_of_a_filled_batch_cache_still_needs_its_rows():
    c, _ = mismatched_pair("BatchKVCache")
    before = frozen(c)
    x = floats(4, (2, 4, 1, 4))
    with pytest.raises(kvcore.CacheValueError) as ce:
        c.update_and_fetch(x, x)
    typed(ce, kvcore.CacheValueError, ValueError,
          "[BatchKVCache.update_and_fetch] expected keys of shape (4, 4, S, 4) like the cache's "
          "but got (2, 4, 1, 4)")
    assert_unchanged(c, before, "after the refused update")


# --------------------------------------------------------------------------
# KVCache.merge of RotatingKVCaches


def rotating(mod, fill, max_size=4, keep=0, trim=0):
    """A RotatingKVCache fed the token counts in `fill`, then trimmed."""
    c = mod.RotatingKVCache(max_size=max_size, keep=keep)
    t = 0
    for S in fill:
        c.update_and_fetch(tokens(t, S), tokens(t, S))
        t += S
    if trim:
        c.trim(trim)
    return c


def kv(mod, S, first=100):
    c = mod.KVCache()
    if S:
        c.update_and_fetch(tokens(first, S), tokens(first, S))
    return c


MERGEABLE = {
    # test_merge_with_empty_caches: an empty and a full one.
    "empty and full": lambda m: [rotating(m, []), rotating(m, [4])],
    "full by one update, with keep": lambda m: [rotating(m, [4], keep=2), kv(m, 2)],
    # single tokens grow the buffer to max_size: longer than the tokens
    "filling by single tokens": lambda m: [rotating(m, [1, 1, 1], max_size=8), kv(m, 5)],
    "filled by single tokens": lambda m: [rotating(m, [1, 1, 1, 1]), kv(m, 1)],
    "prefill then tokens": lambda m: [rotating(m, [2, 1], max_size=6), rotating(m, [5], max_size=6)],
    "trimmed": lambda m: [rotating(m, [5, 1], max_size=8, trim=2), kv(m, 3)],
    "kvcaches first": lambda m: [kv(m, 0), kv(m, 3), rotating(m, [2])],
}


@pytest.mark.parametrize("via", ["KVCache", "BatchKVCache"])
@pytest.mark.parametrize("case", list(MERGEABLE))
def test_merge_of_rotating_caches_matches_mlx_lm(case, via):
    c = getattr(kvcore, via).merge(MERGEABLE[case](kvcore))
    r = getattr(ref, via).merge(MERGEABLE[case](ref))
    assert type(c) is kvcore.BatchKVCache
    assert_same(c, r, "merged")
    assert_arrays_equal(r.left_padding, c.left_padding, "left_padding")
    assert_masks_equal(r.make_mask(1), c.make_mask(1), "mask")
    B = c.offset.shape[0]
    for i, S in enumerate([1, 2]):
        both_update(c, r, tokens(50 + i, S, B), tokens(60 + i, S, B), f"update {i}")
        assert_same(c, r, f"after update {i}")


def test_merge_of_the_mlx_lm_test_case_holds_the_tokens():
    c = kvcore.KVCache.merge(MERGEABLE["empty and full"](kvcore))
    assert c.keys.shape == (2, 1, 4, 2)
    assert c.keys[1, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert c.left_padding.tolist() == [4, 0] and c.offset.tolist() == [0, 4]


def merge_message(size, offset, idx, slots):
    return ("[BatchKVCache.merge] expected a RotatingKVCache whose buffer begins with its "
            f"{size} tokens in temporal order (not rotated, no longer than max_size) "
            f"but got offset {offset}, _idx {idx} in {slots} slots")


def test_merge_refuses_a_rotated_ring_mlx_lm_copies_out_of_order():
    r = rotating(ref, [4, 1])
    m = ref.KVCache.merge([r])
    assert m.keys[0, 0, :, 0].tolist() == [4, 1, 2, 3]  # slot order, not 1, 2, 3, 4
    c = rotating(kvcore, [4, 1])
    before = frozen(c)
    with pytest.raises(kvcore.CacheValueError) as ce:
        kvcore.KVCache.merge([kv(kvcore, 2), c])
    typed(ce, kvcore.CacheValueError, ValueError, merge_message(4, 5, 1, 4))
    assert_unchanged(c, before, "after the refused merge")
    # Once back in order (the cursor at the end) it merges like mlx-lm's.
    c2, r2 = rotating(kvcore, [4, 1, 1, 1, 1]), rotating(ref, [4, 1, 1, 1, 1])
    assert_same(kvcore.KVCache.merge([c2]), ref.KVCache.merge([r2]), "ring back in order")


def test_merge_refuses_an_over_long_buffer_like_mlx_lm():
    with pytest.raises(ValueError):  # mlx's broadcast of 6 tokens into 4 slots
        ref.KVCache.merge([rotating(ref, [6])])
    c = rotating(kvcore, [6])
    before = frozen(c)
    with pytest.raises(kvcore.CacheValueError) as ce:
        kvcore.KVCache.merge([c])
    typed(ce, kvcore.CacheValueError, ValueError, merge_message(4, 6, 6, 6))
    assert_unchanged(c, before, "after the refused merge")


def test_merge_refuses_other_cache_kinds():
    filled = ref.ConcatenateKVCache()
    filled.update_and_fetch(tokens(0, 3), tokens(0, 3))
    with pytest.raises(ValueError):  # mlx-lm: 3 tokens into a 0-slot row
        ref.KVCache.merge([filled, kv(ref, 2)])
    c = kvcore.ConcatenateKVCache()
    c.update_and_fetch(tokens(0, 3), tokens(0, 3))
    with pytest.raises(kvcore.CacheValueError) as ce:
        kvcore.KVCache.merge([c, kv(kvcore, 2)])
    typed(ce, kvcore.CacheValueError, ValueError,
          "[KVCache.merge] expected a list of kvcore KVCache or RotatingKVCache "
          "but got ConcatenateKVCache")


def test_rotating_merge_into_batch_rotating_is_unchanged():
    # RotatingKVCache.merge (BatchRotatingKVCache) still takes only those.
    c = kvcore.RotatingKVCache.merge([rotating(kvcore, [4, 1]), rotating(kvcore, [2])])
    r = ref.RotatingKVCache.merge([rotating(ref, [4, 1]), rotating(ref, [2])])
    assert_same(c, r, "batch rotating merge")
    with pytest.raises(kvcore.CacheValueError):
        kvcore.RotatingKVCache.merge([kv(kvcore, 2)])
