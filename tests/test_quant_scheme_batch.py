"""QuantizedBatchKVCache under the "rotated-channel" scheme.

The key groups run along buffer positions shared by all rows (group j holds
positions [32 j, 32 j + 32) of every row): one transposed triple serves the
batch and the left-padding mask masks it. A row whose left padding is a
whole number of groups has exactly the groups its own QuantizedKVCache has
(same tokens per group, quantized at the same step), so for such rows the
tests ask for exact equality with the single caches; a row whose padding is
not is quantized again from its dequantized tokens at merge, and agrees
within quantization error. Pad positions never widen a group's range: they
take the group's smallest real value before quantizing."""

import copy

import mlx.core as mx
import numpy as np
import pytest

import kvcore
from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

SCHEME = "rotated-channel"
G, H, D = 32, 2, 64


def rot(x):
    return mx.hadamard_transform(x, scale=1.0 / np.sqrt(x.shape[-1]))


def kv(B=1, S=8, seed=0, dtype=mx.float32):
    k = mx.random.normal((B, H, S, D), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((B, H, S, D), key=mx.random.key(seed + 1)).astype(dtype)
    return k, v


def eq(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert mx.array_equal(a, b).item()


def single(window=0, bits=4):
    return kvcore.QuantizedKVCache(group_size=G, bits=bits, scheme=SCHEME, window=window)


def filled(n, seed, window=0, bits=4):
    c = single(window, bits)
    if n:
        c.update_and_fetch(*kv(S=n, seed=seed))
    return c


def dequantized(cache):
    """(keys, values) of a rotated-channel cache (single or batch) as floats
    in the model's space, (B, H, tokens or _idx, D)."""
    (kw, ks, kb, r), (vw, vs, vb, rv) = cache.keys_and_values()
    keys, values = [], []
    if ks.shape[-1]:
        keys.append(mx.swapaxes(mx.dequantize(kw, ks, kb, group_size=G, bits=4), 2, 3))
        values.append(mx.dequantize(vw, vs, vb, group_size=G, bits=4))
    if r is not None:
        keys.append(r)
        values.append(rv)
    return rot(mx.concatenate(keys, axis=2)), rot(mx.concatenate(values, axis=2))


def assert_same_single(a, b):
    """Two rotated-channel QuantizedKVCaches hold the same tokens, stored
    alike (their buffers' spare room aside)."""
    assert (a.offset, a.scheme, a.window, a.group_size, a.bits) == \
        (b.offset, b.scheme, b.window, b.group_size, b.bits)
    (ka, va), (kb, vb) = a.keys_and_values(), b.keys_and_values()
    for x, y in zip(ka + va, kb + vb):
        eq(x, y)


def assert_same_batch(a, b):
    sa, sb = a.state, b.state
    assert len(sa) == len(sb) == 11
    for x, y in zip(sa[0] + sa[1], sb[0] + sb[1]):
        eq(x, y)
    eq(sa[2], sb[2])
    eq(sa[3], sb[3])
    assert sa[4:9] == sb[4:9]
    eq(sa[9], sb[9])
    eq(sa[10], sb[10])


def snapshot(b):
    st = b.state
    flat = list(st[0] or ()) + list(st[1] or ()) + [st[2], st[3], st[9], st[10]]
    return [None if a is None else a.tolist() for a in flat] + list(st[4:9])


# Lengths 70, 38 and 6 under a longest of 70: paddings 0, 32 and 64, whole
# groups. 45 pads 25: its groups straddle the grid.
ALIGNED = [70, 38, 6]
MIXED = [70, 45, 6]


def merged(lengths, window=0):
    singles = [filled(n, 10 * i, window) for i, n in enumerate(lengths)]
    return singles, kvcore.QuantizedKVCache.merge(singles)


# -- merge -------------------------------------------------------------------


def test_merge_left_pads_to_the_longest_and_names_the_scheme():
    _, b = merged(MIXED)
    assert type(b) is kvcore.QuantizedBatchKVCache
    assert (b.scheme, b.window, b.group_size, b.bits) == (SCHEME, 0, G, 4)
    assert b._idx == b.size() == 70
    assert b.offset.tolist() == MIXED
    assert b.left_padding.tolist() == [0, 25, 64]
    (kw, ks, kb, r), (vw, vs, vb, rv) = b.keys_and_values()
    assert ks.shape == (3, H, D, 2) and kw.shape == (3, H, D, 64 * 4 // 32)
    assert vw.shape == (3, H, 64, D * 4 // 32)
    assert r.shape == rv.shape == (3, H, 6, D)


def test_rows_padded_by_whole_groups_keep_their_groups_exactly():
    singles, b = merged(ALIGNED)
    for i, s in enumerate(singles):
        assert_same_single(b.extract(i), s)


def test_a_row_off_the_grid_holds_its_tokens_within_quantization_error():
    singles, b = merged(MIXED)
    k, v = dequantized(b)
    sk, sv = dequantized(singles[1])
    # Quantized again from dequantized tokens: within about a quantization
    # step of the single cache (4 bits over a range of ~6 sigma: ~0.4).
    assert mx.abs(k[:, :, 25:][1:2] - sk).max().item() < 0.5
    assert mx.abs(v[:, :, 25:][1:2] - sv).max().item() < 0.5
    # The aligned rows are exact.
    for i in (0, 2):
        sk, sv = dequantized(singles[i])
        p = [0, 25, 64][i]
        eq(k[i:i + 1, :, p:], sk)
        eq(v[i:i + 1, :, p:], sv)


def test_merge_of_empty_caches_and_empty_with_full():
    b = kvcore.QuantizedKVCache.merge([single(), single()])
    assert b.empty() and b.keys is None and b._idx == 0 and b.offset.tolist() == [0, 0]
    singles, b = merged([40, 0])
    assert b.offset.tolist() == [40, 0] and b.left_padding.tolist() == [0, 40]
    assert_same_single(b.extract(0), singles[0])
    assert b.extract(1).offset == 0


# -- update_and_fetch and attention -------------------------------------------


def test_updates_quantize_whole_groups_older_than_the_window_for_every_row():
    singles, b = merged(ALIGNED, window=16)
    for step, S in enumerate([1, 3, 1, 20, 1, 9]):
        k, v = kv(B=3, S=S, seed=100 + step)
        (kw, ks, kb, r), _ = b.update_and_fetch(k, v)
        for i, s in enumerate(singles):
            s.update_and_fetch(k[i:i + 1], v[i:i + 1])
        assert ks.shape[-1] * G == max(0, b._idx - 16) // G * G
        assert r.shape[2] == b._idx - ks.shape[-1] * G
    for i, s in enumerate(singles):
        assert_same_single(b.extract(i), s)


def test_pad_positions_take_the_groups_smallest_real_value():
    f = kvcore.BatchKVCache([25, 0])
    k, v = kv(B=2, S=40, seed=3)
    f.update_and_fetch(k, v)
    b = f.to_quantized(group_size=G, bits=4, scheme=SCHEME, window=0)
    (kw, ks, kb, _), _ = b.keys_and_values()
    x = rot(k)[0:1, :, :32]  # row 0's first group: 25 pads, 7 tokens
    real = x[:, :, 25:]
    x = mx.concatenate([mx.broadcast_to(real.min(axis=2, keepdims=True), (1, H, 25, D)), real], axis=2)
    want = mx.quantize(mx.swapaxes(x, 2, 3), group_size=G, bits=4)
    for got, w in zip((kw[0:1, ..., :4], ks[0:1, ..., :1], kb[0:1, ..., :1]), want):
        eq(got, w)


def test_to_quantized_equals_a_batch_fed_the_same_tokens():
    f = kvcore.BatchKVCache([3, 0, 40])
    q = kvcore.QuantizedBatchKVCache([3, 0, 40], group_size=G, bits=4, scheme=SCHEME, window=8)
    for step, S in enumerate([50, 1, 1, 30]):
        k, v = kv(B=3, S=S, seed=step)
        f.update_and_fetch(k, v)
        q.update_and_fetch(k, v)
    assert_same_batch(f.to_quantized(group_size=G, bits=4, scheme=SCHEME, window=8), q)


def _rows_attention(b, singles, L, seed):
    """Per row: (batch attention, attention over the dequantized batch, the
    single cache's own attention), after one update of L tokens."""
    k, v = kv(B=len(singles), S=L, seed=seed)
    mask = b.make_mask(L, return_array=True)
    keys, values = b.update_and_fetch(k, v)
    q = mx.random.normal((len(singles), 4, L, D), key=mx.random.key(seed + 7))
    got = kvcore.quantized_scaled_dot_product_attention(
        q, keys, values, scale=0.125, mask=mask, group_size=G, bits=4, scheme=SCHEME)
    dk, dv = dequantized(b)
    over = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
    own = []
    for i, s in enumerate(singles):
        sk, sv = s.update_and_fetch(k[i:i + 1], v[i:i + 1])
        own.append(kvcore.quantized_scaled_dot_product_attention(
            q[i:i + 1], sk, sv, scale=0.125, mask="causal" if L > 1 else None,
            group_size=G, bits=4, scheme=SCHEME))
    return got, over, own


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("window", [0, 16])
def test_attention_over_the_batch_matches_each_row(L, window):
    singles, b = merged(MIXED, window)
    got, over, own = _rows_attention(b, singles, L, seed=L + window)
    # Against float attention over the same (dequantized) cache: only float
    # rounding differs (float32, as tests/test_quant_scheme.py).
    assert mx.abs(got - over).max().item() < 2e-5
    # Against each sequence's own cache: the same stored data for the rows
    # padded by whole groups (float rounding only).
    for i in (0, 2):
        assert mx.abs(got[i:i + 1] - own[i]).max().item() < 2e-5, i
    # The row off the grid was quantized again at merge: against float
    # attention over its original tokens it errs as a 4-bit cache does (its
    # own cache errs by up to ~0.11 here; the batch row by up to ~0.1).
    k0, v0 = kv(S=45, seed=10)
    k, v = kv(B=3, S=L, seed=L + window)
    q = mx.random.normal((3, 4, L, D), key=mx.random.key(L + window + 7))
    ref = mx.fast.scaled_dot_product_attention(
        q[1:2], mx.concatenate([k0, k[1:2]], axis=2), mx.concatenate([v0, v[1:2]], axis=2),
        scale=0.125, mask="causal" if L > 1 else None)
    assert mx.abs(got[1:2] - ref).max().item() < 0.15


def test_mlx_lms_entry_point_routes_the_batch_to_channel_attention():
    from kvcore._attention import scaled_dot_product_attention

    _, b = merged(MIXED)
    k, v = kv(B=3, S=1, seed=5)
    mask = b.make_mask(1, return_array=True)
    keys, values = b.update_and_fetch(k, v)
    q = mx.random.normal((3, 4, 1, D), key=mx.random.key(6))
    got = scaled_dot_product_attention(q, keys, values, b, scale=0.125, mask=mask)
    dk, dv = dequantized(b)
    want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
    assert mx.abs(got - want).max().item() < 2e-5


def test_make_mask_hides_each_rows_padding():
    _, b = merged(MIXED)
    m = b.make_mask(2, return_array=True)
    assert m.shape == (3, 1, 2, 72)
    assert m[1, 0, 0, :25].tolist() == [False] * 25 and m[1, 0, 0, 25:71].all().item()
    assert not m[0, 0, 0, 71].item() and m[0, 0, 1, 71].item()


# -- prepare / finalize ---------------------------------------------------------


def test_right_padded_prompts_end_where_left_padded_ones_do():
    lengths, right = [40, 13, 27], [0, 27, 13]
    k, v = kv(B=3, S=40, seed=8)
    b = kvcore.QuantizedKVCache.merge([single(window=0) for _ in lengths])
    b.prepare(lengths=lengths, right_padding=right)
    (_, ks, _, r), _ = b.update_and_fetch(k, v)
    assert ks.shape[-1] == 0 and r.shape[2] == 40  # nothing quantized before finalize
    b.finalize()
    assert b.left_padding.tolist() == right and b.offset.tolist() == lengths
    # A left-padded batch fed the same tokens, each row right-aligned.
    lk = mx.concatenate([mx.roll(k[i:i + 1], right[i], axis=2) for i in range(3)], axis=0)
    lv = mx.concatenate([mx.roll(v[i:i + 1], right[i], axis=2) for i in range(3)], axis=0)
    want = kvcore.QuantizedBatchKVCache(right, group_size=G, bits=4, scheme=SCHEME, window=0)
    want.update_and_fetch(lk, lv)
    got_k, want_k = b.keys_and_values()[0], want.keys_and_values()[0]
    for x, y in zip(got_k[:3], want_k[:3]):  # pads never reach the key groups
        eq(x, y)
    for i, p in enumerate(right):
        assert_same_single(b.extract(i), want.extract(i))
    b.update_and_fetch(*kv(B=3, S=1, seed=9))
    assert b.offset.tolist() == [41, 14, 28]


def test_finalize_over_quantized_history_keeps_the_rows_that_do_not_move():
    singles, b = merged(ALIGNED)
    before = [b.extract(i) for i in range(3)]
    b.prepare(right_padding=[0, 2, 0])
    b.update_and_fetch(*kv(B=3, S=4, seed=11))
    b.finalize()
    assert b.left_padding.tolist() == [0, 34, 64]
    for i in (0, 2):
        e = b.extract(i)
        ek, _ = dequantized(e)
        bk, _ = dequantized(before[i])
        eq(ek[:, :, :bk.shape[2]], bk)
    ek, _ = dequantized(b.extract(1))
    bk, _ = dequantized(before[1])
    assert ek.shape[2] == 40 and mx.abs(ek[:, :, :38] - bk).max().item() < 0.5


# -- filter / extend / extract / trim ------------------------------------------------


def test_filter_keeps_rows_exactly_and_drops_whole_groups_of_padding():
    _, b = merged(MIXED)
    rows = [b.extract(i) for i in range(3)]
    b.filter([2, 1])
    assert b.left_padding.tolist() == [64, 25] and b._idx == 70  # 25: no whole group to drop
    assert_same_single(b.extract(0), rows[2])
    assert_same_single(b.extract(1), rows[1])
    b.filter([0])
    assert b._idx == 70 - 64 and b.left_padding.tolist() == [0]
    assert_same_single(b.extract(0), rows[2])


def test_extend_by_whole_groups_keeps_rows_exactly():
    s1, a = merged([70, 38])
    s2, b = merged([38, 6])  # _idx 38: 32 behind a
    a.extend(b)
    assert a._idx == 70 and a.left_padding.tolist() == [0, 32, 32, 64]
    assert a.offset.tolist() == [70, 38, 38, 6]
    for i, s in enumerate(s1 + s2):
        assert_same_single(a.extract(i), s)


def test_extend_off_the_grid_requantizes_the_shorter_side():
    s1, a = merged([70])
    s2, b = merged([45])
    a.extend(b)
    assert a._idx == 70 and a.left_padding.tolist() == [0, 25]
    assert_same_single(a.extract(0), s1[0])
    k, _ = dequantized(a.extract(1))
    sk, _ = dequantized(s2[0])
    assert k.shape == sk.shape and mx.abs(k - sk).max().item() < 0.5


def test_extract_off_the_grid_returns_the_tokens_in_float():
    _, b = merged(MIXED)
    e = b.extract(1)
    assert (e.scheme, e.window, e.offset) == (SCHEME, 0, 45)
    assert e.residual.shape == (1, H, 45, D)
    k, v = dequantized(b)
    ek, ev = dequantized(e)
    eq(ek, k[1:2, :, 25:])
    eq(ev, v[1:2, :, 25:])


@pytest.mark.parametrize("n", [3, 10, 40, 100])
def test_trim_as_each_rows_own_cache(n):
    singles, b = merged(ALIGNED)
    assert b.is_trimmable() and b.trim(n) == min(n, 70)
    assert b._idx == 70 - min(n, 70)
    for i, s in enumerate(singles):
        s.trim(n)
        e = b.extract(i)
        assert e.offset == s.offset
        if s.offset:
            assert_same_single(e, s)


def test_trim_into_a_group_and_refill():
    singles, b = merged([70, 38])
    b.trim(10)
    for s in singles:
        s.trim(10)
    k, v = kv(B=2, S=20, seed=12)
    b.update_and_fetch(k, v)
    for i, s in enumerate(singles):
        s.update_and_fetch(k[i:i + 1], v[i:i + 1])
        assert_same_single(b.extract(i), s)


# -- state, copies, files, nbytes ----------------------------------------------------


def test_state_names_the_scheme_and_round_trips():
    _, b = merged(MIXED, window=16)
    st = b.state
    assert len(st) == 11 and st[4:9] == (70, G, 4, SCHEME, 16)
    r = kvcore.QuantizedBatchKVCache.from_state(st)
    assert_same_batch(r, b)
    c = copy.deepcopy(b)
    c.update_and_fetch(*kv(B=3, S=40, seed=1))
    assert b._idx == 70 and c._idx == 110


def test_files_round_trip_and_name_the_scheme(tmp_path):
    from kvcore._files import describe

    _, b = merged(MIXED, window=16)
    path = str(tmp_path / "b.safetensors")
    kvcore.save_prompt_cache(path, [b, kvcore.QuantizedBatchKVCache([0], bits=4)])
    loaded = kvcore.load_prompt_cache(path)
    assert_same_batch(loaded[0], b)
    assert loaded[1].scheme == "affine"
    layer = describe(path)["layers"][0]
    assert layer["scheme"] == SCHEME and layer["window"] == 16


def test_nbytes_counts_the_quantized_arrays_and_the_residuals():
    _, b = merged(MIXED)
    st = b.state
    assert b.nbytes == sum(a.nbytes for a in st[0] + st[1]) + st[9].nbytes + st[10].nbytes


# -- bad calls: typed errors, nothing changed ----------------------------------------


def test_merge_refuses_a_mix_of_schemes_settings_and_windows():
    a = filled(40, 0)
    cases = [
        ([a, kvcore.QuantizedKVCache(group_size=32, bits=4)], r"one scheme"),
        ([kvcore.QuantizedKVCache(group_size=32, bits=4), a], r"one scheme.*rotated-channel"),
        ([a, filled(40, 1, bits=3)], r"quantized alike"),
        ([a, kvcore.QuantizedKVCache(group_size=64, bits=4, scheme=SCHEME, window=0)], r"quantized alike"),
        ([a, filled(40, 1, window=16)], r"window 16"),
    ]
    for caches, match in cases:
        with pytest.raises(kvcore.CacheValueError, match=match):
            kvcore.QuantizedKVCache.merge(caches)


def test_extend_refuses_another_scheme_or_window_and_changes_nothing():
    _, b = merged(MIXED)
    before = snapshot(b)
    affine = kvcore.QuantizedBatchKVCache([0], group_size=G, bits=4)
    with pytest.raises(kvcore.CacheValueError, match="scheme 'rotated-channel'.*'affine'"):
        b.extend(affine)
    with pytest.raises(kvcore.CacheValueError, match="window"):
        b.extend(merged([10], window=8)[1])
    assert snapshot(b) == before
    with pytest.raises(kvcore.CacheValueError, match="scheme 'affine'"):
        affine.extend(b)


def test_bad_updates_leave_the_cache_unchanged():
    _, b = merged(MIXED)
    before = snapshot(b)
    cases = [
        (kv(B=2, S=1), "batch of 3"),
        ((mx.zeros((3, H, 1, 48)), mx.zeros((3, H, 1, 48))), "power of two"),
        ((mx.zeros((3, H + 1, 1, D)), mx.zeros((3, H + 1, 1, D))), "like the cache's"),
        (kv(B=3, S=1, dtype=mx.float16), "like the cache's"),
        ((mx.zeros((3, H, 1, D), mx.int32),) * 2, "float16, bfloat16 or float32"),
    ]
    for (k, v), match in cases:
        with pytest.raises(kvcore.CacheValueError, match=match):
            b.update_and_fetch(k, v)
        assert snapshot(b) == before


def test_bad_filter_extract_prepare_and_state_leave_the_cache_unchanged():
    _, b = merged(MIXED)
    before = snapshot(b)
    with pytest.raises(kvcore.CacheIndexError):
        b.filter([0, 3])
    with pytest.raises(kvcore.CacheIndexError):
        b.extract(3)
    with pytest.raises(kvcore.CacheValueError, match="empty"):
        b.prepare(left_padding=[1, 1, 1])
    st = list(b.state)
    st[4] = 60  # fewer positions than the quantized ones
    with pytest.raises(kvcore.CacheValueError, match="_idx 60"):
        b.state = tuple(st)
    st = list(b.state)
    st[10] = st[10][:, :, :3]
    with pytest.raises(kvcore.CacheValueError, match="residual"):
        b.state = tuple(st)
    st = list(b.state)
    st[7] = "rotated"
    with pytest.raises(kvcore.CacheValueError, match="'rotated'"):
        b.state = tuple(st)
    assert snapshot(b) == before


def test_bad_settings_are_typed_errors():
    with pytest.raises(kvcore.CacheValueError, match="'nope'"):
        kvcore.BatchKVCache([0]).to_quantized(scheme="nope")
    with pytest.raises(kvcore.CacheValueError, match="window -1"):
        kvcore.BatchKVCache([0]).to_quantized(scheme=SCHEME, window=-1)
    with pytest.raises(kvcore.CacheValueError, match="window 4"):
        kvcore.QuantizedBatchKVCache([0], window=4)


# -- mlx-lm's BatchGenerator ------------------------------------------------------------


def _batch_generate(model, prompts, caches, n):
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=n, completion_batch_size=4, prefill_batch_size=4)
    try:
        uids = gen.insert(prompts, caches=caches)
        out = {u: [] for u in uids}
        for _ in range(4 * n):
            for r in gen.next_generated():
                out[r.uid].append(r.token)
            if all(len(t) == n for t in out.values()):
                break
        return [out[u] for u in uids]
    finally:
        gen.close()


def _own_tokens(model, prompts, make_cache, n):
    from mlx_lm.generate import generate_step

    return [[t for t, _ in generate_step(mx.array(p), model, prompt_cache=make_cache(), max_tokens=n)]
            for p in prompts]


def test_batch_generator_decodes_as_each_sequence_alone():
    # Prompts whose prefills (all but the last token: 104, 72, 40) differ by
    # whole groups: after BatchGenerator's right padding and finalize every
    # row's padding is whole groups, so each row holds what its own cache
    # holds, and the window (72) keeps the prefills in float on both sides
    # (the batch quantizes nothing while right padding is pending; a single
    # cache would quantize during its prefill past window + 32 tokens).
    # Decoding then quantizes rows 0 and 1 at the same steps on both sides.
    from kvcore._demo import tiny_qwen2

    patch_mlx_lm()
    try:
        model = tiny_qwen2(2)
        base = [(7 * i) % 500 + 1 for i in range(105)]
        prompts = [base[:105], base[3:76], base[9:50]]
        n = 40

        def cache():
            return [c.to_quantized(group_size=G, bits=4, scheme=SCHEME, window=72)
                    for c in kvcore.make_prompt_cache(model)]

        got = _batch_generate(model, prompts, [cache() for _ in prompts], n)
        assert got == _own_tokens(model, prompts, cache, n)
    finally:
        unpatch_mlx_lm()


def test_batch_generator_with_prompts_off_the_grid():
    # Paddings that are not whole groups: those rows' groups hold other
    # token sets than their own caches' (and the batch's prefill attention
    # stays in float), so tokens may part once a step's quantization error
    # flips the argmax of a random model. The first token follows a float
    # prefill on both sides (prompts shorter than the window): equal.
    from kvcore._demo import tiny_qwen2

    patch_mlx_lm()
    try:
        model = tiny_qwen2(2)
        prompts = [[(5 * i) % 500 + 2 for i in range(n)] for n in (50, 23, 37)]
        n = 12

        def cache():
            return [c.to_quantized(group_size=G, bits=4, scheme=SCHEME, window=64)
                    for c in kvcore.make_prompt_cache(model)]

        got = _batch_generate(model, prompts, [cache() for _ in prompts], n)
        want = _own_tokens(model, prompts, cache, n)
        assert all(len(t) == n for t in got)
        assert [t[0] for t in got] == [t[0] for t in want]
    finally:
        unpatch_mlx_lm()


def test_batch_generator_extends_a_running_batch():
    # A second request arrives while the first decodes: BatchGenerator
    # extends the running batch (_idx 65, 32 positions quantized) with the
    # new one (_idx 21, all in float). The running row keeps its groups; the
    # newcomer, 44 positions behind (not whole groups), joins through the
    # float residual, so nothing of it is quantized twice. Both finish; the
    # tokens before the extend and the newcomer's first are their own.
    from mlx_lm.generate import BatchGenerator

    from kvcore._demo import tiny_qwen2

    patch_mlx_lm()
    try:
        model = tiny_qwen2(2)
        prompts = [[(3 * i) % 500 + 1 for i in range(60)], [(11 * i) % 500 + 1 for i in range(21)]]
        n = 10

        def cache():
            return [c.to_quantized(group_size=G, bits=4, scheme=SCHEME, window=16)
                    for c in kvcore.make_prompt_cache(model)]

        gen = BatchGenerator(model, max_tokens=n, completion_batch_size=4, prefill_batch_size=4)
        try:
            out = {}
            (first,) = gen.insert([prompts[0]], caches=[cache()])
            out[first] = []
            for _ in range(3):
                for r in gen.next_generated():
                    out[r.uid].append(r.token)
            (second,) = gen.insert([prompts[1]], caches=[cache()])
            out[second] = []
            for _ in range(8 * n):
                for r in gen.next_generated():
                    out[r.uid].append(r.token)
                if all(len(t) == n for t in out.values()):
                    break
        finally:
            gen.close()
        assert [len(t) for t in out.values()] == [n, n]
        want = _own_tokens(model, prompts, cache, n)
        assert out[first][:3] == want[0][:3]
        assert out[second][0] == want[1][0]
    finally:
        unpatch_mlx_lm()


# -- found by the fuzz (tests/test_bad_calls.py) --------------------------------------


@pytest.mark.parametrize("window", [0, 128])
def test_an_update_past_the_memory_limit_is_refused_before_it_allocates(memory_limit, window):
    # The batch's update checked no size: 2**27 tokens were taken (lazily)
    # and the cache was left holding them.
    _, b = merged(MIXED, window=window)
    before = snapshot(b)
    big = mx.zeros((3, H, 2**27, D))  # lazy: never evaluated
    with pytest.raises(kvcore.CacheValueError) as e:
        b.update_and_fetch(big, big)
    assert str(e.value).startswith(
        "[QuantizedBatchKVCache.update_and_fetch] expected an allocation within mlx's memory limit of "
        f"{1 << 30} bytes")
    assert str(e.value).endswith(" bytes") and f"{70 + 2**27} positions of 3 rows of " in str(e.value)
    assert snapshot(b) == before
    b.update_and_fetch(*kv(B=3, S=1, seed=2))
    assert b._idx == 71


@pytest.mark.parametrize("spoil", ["key biases", "value biases", "value scales"])
def test_a_state_with_scales_and_biases_of_two_dtypes_is_refused(spoil):
    # The batch's state took float16 biases beside float32 scales.
    _, b = merged(MIXED, window=16)
    before = snapshot(b)
    st = list(b.state)
    (kw, ks, kb), (vw, vs, vb) = st[0], st[1]
    if spoil == "key biases":
        st[0] = (kw, ks, kb.astype(mx.float16))
    elif spoil == "value biases":
        st[1] = (vw, vs, vb.astype(mx.float16))
    else:
        st[1] = (vw, vs.astype(mx.bfloat16), vb)
    for call in (lambda: setattr(b, "state", tuple(st)),
                 lambda: kvcore.QuantizedBatchKVCache.from_state(tuple(st))):
        with pytest.raises(kvcore.CacheValueError) as e:
            call()
        assert str(e.value).startswith(
            "[QuantizedBatchKVCache.state] expected scales and biases of keys and values of one float "
            "dtype but got float32, ")
        assert snapshot(b) == before
