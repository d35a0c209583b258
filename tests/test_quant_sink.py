"""The rotated-channel scheme's attention sink: a cache's first `sink` tokens
kept in float too. They are quantized in their groups like any token (so the
quantized arrays are those of a cache without a sink), and attention reads
their float keys and values in place of the quantized ones."""

import copy
import re

import mlx.core as mx
import numpy as np
import pytest
from test_quant_scheme import SCHEME, dequantized, eq, kv, rot

import kvcore


def new(bits=3, window=0, sink=1, **kw):
    return kvcore.QuantizedKVCache(group_size=32, bits=bits, scheme=SCHEME, window=window, sink=sink, **kw)


def with_sink(cache):
    """The cache's keys and values as floats (model space), its sink's
    tokens read from their float copies."""
    dk, dv = dequantized(cache)
    if cache.sink_keys is None:
        return dk, dv
    n = cache.sink_keys.shape[2]
    return (mx.concatenate([rot(cache.sink_keys), dk[:, :, n:]], axis=2),
            mx.concatenate([rot(cache.sink_values), dv[:, :, n:]], axis=2))


def close(got, want):
    """Equal up to float32 rounding (outputs here reach about 50)."""
    return mx.abs(got - want).max().item() <= 1e-5 * (1 + mx.abs(want).max().item())


def outlier_kv(S, seed=0, H=2):
    k, v = kv(S=S, seed=seed, H=H)
    return k.at[:, :, 0].multiply(30.0), v.at[:, :, 0].multiply(30.0)


@pytest.mark.parametrize("sink", [1, 3])
def test_the_sink_holds_the_first_tokens_rotated_and_the_quantized_arrays_stay_as_without(sink):
    k, v = outlier_kv(75)
    c, plain = new(sink=sink), new(sink=0)
    c.update_and_fetch(k[:, :, :2], v[:, :, :2])  # the sink fills over updates
    c.update_and_fetch(k[:, :, 2:], v[:, :, 2:])
    plain.update_and_fetch(k, v)
    assert c.sink == sink and plain.sink == 0 and plain.sink_keys is None
    eq(c.sink_keys, rot(k[:, :, :sink]))
    eq(c.sink_values, rot(v[:, :, :sink]))
    for a, b in zip(c.keys_and_values(), plain.keys_and_values()):
        for x, y in zip(a, b):
            eq(x, y)
    # Bytes: the quantized cache's, plus the sink's floats.
    assert c.nbytes == plain.nbytes + 2 * sink * 2 * 64 * 4


@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("sink", [1, 3])
def test_attention_reads_the_sinks_float_keys_and_values(sink, window):
    for n_q, L, S in ((4, 1, 75), (2, 5, 64), (4, 3, 20)):  # groups and residual, whole groups, residual only
        c = new(sink=sink, window=window)
        keys, values = c.update_and_fetch(*outlier_kv(S, seed=S))
        q = mx.random.normal((1, n_q, L, 64), key=mx.random.key(7))
        for mask in (None, "causal"):
            got = kvcore.quantized_scaled_dot_product_attention(
                q, keys, values, scale=0.125, mask=mask, group_size=32, bits=3, scheme=SCHEME,
                sink=(c.sink_keys, c.sink_values, mx.array([0])))
            dk, dv = with_sink(c)
            want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
            assert close(got, want), (n_q, L, S, mask)
    # mlx-lm's entry point passes the cache's sink.
    from kvcore._attention import scaled_dot_product_attention

    got = scaled_dot_product_attention(q, keys, values, c, scale=0.125, mask=None)
    dk, dv = with_sink(c)
    assert close(got, mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=None))


def test_a_sink_brings_attention_closer_to_float_where_the_first_token_is_an_outlier():
    k, v = outlier_kv(200)
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(3))
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)
    errors = []
    for sink in (0, 1):
        c = new(sink=sink)
        keys, values = c.update_and_fetch(k, v)
        from kvcore._attention import scaled_dot_product_attention

        got = scaled_dot_product_attention(q, keys, values, c, scale=0.125, mask=None)
        errors.append(mx.abs(got - exact).max().item())
    assert errors[1] < errors[0] / 2, errors


def test_state_files_and_copies_carry_the_sink(tmp_path):
    c = new(sink=2, window=16)
    c.update_and_fetch(*outlier_kv(75))
    state = c.state
    assert len(state) == 12 and state[2:7] == (75, 32, 3, SCHEME, 16) and state[9] == 2
    eq(state[10], c.sink_keys)
    back = kvcore.QuantizedKVCache.from_state(state)
    assert back.sink == 2
    eq(back.sink_values, c.sink_values)
    path = str(tmp_path / "c.safetensors")
    kvcore.save_prompt_cache(path, [c, new(sink=0)])
    loaded = kvcore.load_prompt_cache(path)
    assert (loaded[0].sink, loaded[1].sink, loaded[1].sink_keys) == (2, 0, None)
    eq(loaded[0].sink_keys, c.sink_keys)
    d = copy.deepcopy(c)
    d.trim(74)
    assert c.sink_keys.shape[2] == 2 and d.sink_keys.shape[2] == 1


def test_trim_into_the_first_group_returns_the_sinks_float_tokens():
    k, v = outlier_kv(75)
    c = new(sink=2)
    c.update_and_fetch(k, v)
    c.trim(75 - 10)  # into group 0: its kept tokens go back to float
    assert c.offset == 10 and c.keys_and_values()[0][1].shape[-1] == 0
    eq(c.residual[:, :, :2], rot(k[:, :, :2]))  # exactly, not dequantized
    assert not mx.array_equal(c.residual[:, :, 2:], rot(k[:, :, 2:10])).item()  # the rest dequantized
    c.trim(9)
    assert c.offset == 1 and c.sink_keys.shape[2] == 1
    c.trim(1)
    assert c.offset == 0 and c.sink_keys is None
    c.update_and_fetch(k, v)  # fills again
    eq(c.sink_keys, rot(k[:, :, :2]))


def test_to_quantized_takes_a_sink():
    k, v = outlier_kv(70)
    f = kvcore.KVCache()
    f.update_and_fetch(k, v)
    q = f.to_quantized(group_size=32, bits=3, scheme=SCHEME, window=0, sink=1)
    c = new(sink=1)
    c.update_and_fetch(k, v)
    eq(q.sink_keys, c.sink_keys)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="affine", sink=1), "no sink for the affine scheme but got sink 1"),
    (dict(scheme=SCHEME, sink=-1), "a sink of 0 to 256 tokens but got sink -1"),
    (dict(scheme=SCHEME, sink=257), "a sink of 0 to 256 tokens but got sink 257"),
])
def test_bad_sinks_are_typed_errors_naming_the_value(kwargs, message):
    with pytest.raises(kvcore.CacheValueError, match=message):
        kvcore.QuantizedKVCache(group_size=32, bits=4, **kwargs)
    f = kvcore.KVCache()
    f.update_and_fetch(*kv(S=8))
    with pytest.raises(kvcore.CacheValueError, match=message):
        f.to_quantized(group_size=32, bits=4, **kwargs)


def test_a_state_with_a_bad_sink_is_refused_and_the_cache_unchanged():
    c = new(sink=2)
    c.update_and_fetch(*outlier_kv(40))
    before = c.state
    state = list(before)
    for spoil, message in [
        (lambda s: s.__setitem__(10, s[10][:, :, :, :32]), "sink keys \\(B, H, 1 to 2, 64\\)"),
        (lambda s: s.__setitem__(11, None), "sink keys and values both set \\(with a sink\\) or both None"),
        (lambda s: (s.__setitem__(10, mx.concatenate([s[10]] * 2, 2)),
                    s.__setitem__(11, mx.concatenate([s[11]] * 2, 2))), "sink keys \\(B, H, 1 to 2, 64\\)"),
    ]:
        s = list(state)
        spoil(s)
        with pytest.raises(kvcore.CacheValueError, match=message):
            c.state = tuple(s)
        assert c.offset == 40
        eq(c.sink_keys, before[10])


def test_a_sink_cache_goes_to_disk_in_blocks_shared_with_caches_without_one(tmp_path):
    toks = list(range(1000, 1000 + 600))
    k, v = outlier_kv(600)

    def cache(sink, n=600):
        c = kvcore.QuantizedKVCache(group_size=(32, 64), bits=3, scheme=SCHEME, window=0, sink=sink)
        c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        return c

    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache("m", toks, [cache(1)])
        w.insert_cache("m", toks[:512] + [1], [cache(0, 513)])  # the same first 2 blocks
        w.flush()
        assert w.disk_blocks == 2
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = lru.fetch_nearest_cache("m", toks)
    assert rest == [] and lru.disk_errors == []
    want = cache(1)
    assert got[0].sink == 1 and got[0].offset == 600
    eq(got[0].sink_keys, want.sink_keys)
    for a, b in zip(got[0].keys_and_values(), want.keys_and_values()):
        for x, y in zip(a, b):
            eq(x, y) if x is not None else None
    # A prefix served by a trim within the chain keeps the sink.
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = lru.fetch_nearest_cache("m", toks[:520] + [5])
    assert rest == [5] and got[0].offset == 520 and got[0].sink == 1 and lru.disk_blocks_read == 2
    eq(got[0].sink_keys, want.sink_keys)


# ---------------------------------------------------------------------------
# The batch cache: row b's sink token j sits at position left_padding[b] + j.

def single(n, seed, sink=2, window=0):
    c = new(bits=4, window=window, sink=sink)
    if n:
        c.update_and_fetch(*outlier_kv(n, seed=seed))
    return c


def attend(q, keys, values, cache, mask):
    from kvcore._attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, keys, values, cache, scale=0.125, mask=mask)


@pytest.mark.parametrize("L", [1, 4])
def test_batch_rows_attend_as_their_own_sink_caches(L):
    lengths = (70, 38, 102)  # padded by 32, 64 and 0: whole groups, so rows keep their groups exactly
    singles = [single(n, seed=n) for n in lengths]
    b = kvcore.QuantizedBatchKVCache.merge([copy.deepcopy(s) for s in singles])
    assert b.sink == 2 and b.sink_keys.shape == (3, 2, 2, 64)
    for i, s in enumerate(singles):
        eq(b.sink_keys[i:i + 1], s.sink_keys)
    k, v = kv(B=3, S=L, seed=9)
    mask = b.make_mask(L, return_array=True)
    keys, values = b.update_and_fetch(k, v)
    q = mx.random.normal((3, 4, L, 64), key=mx.random.key(5))
    got = attend(q, keys, values, b, mask)
    plain = kvcore.quantized_scaled_dot_product_attention(
        q, keys, values, scale=0.125, mask=mask, group_size=32, bits=4, scheme=SCHEME)
    for i, s in enumerate(singles):
        sk, sv = s.update_and_fetch(k[i:i + 1], v[i:i + 1])
        own = attend(q[i:i + 1], sk, sv, s, "causal" if L > 1 else None)
        assert close(got[i:i + 1], own), i
        # Without the sink the rows read their quantized first tokens: another result.
        assert mx.abs(plain[i:i + 1] - own).max().item() > 1e-3, i
    for i, s in enumerate(singles):  # and back
        e = b.extract(i)
        assert (e.offset, e.sink) == (s.offset, 2)
        eq(e.sink_keys, s.sink_keys)
        eq(e.sink_values, s.sink_values)


def test_batch_updates_fill_each_rows_sink_from_its_first_token():
    b = kvcore.QuantizedBatchKVCache([3, 0], group_size=32, bits=4, scheme=SCHEME, window=0, sink=2)
    ks, vs = [], []
    for step in range(4):
        k, v = kv(B=2, S=2 if step == 0 else 1, seed=step)
        b.update_and_fetch(k, v)
        ks.append(k)
        vs.append(v)
    k = mx.concatenate(ks, axis=2)  # positions 0..4 of both rows
    eq(b.sink_keys[1:], rot(k[1:, :, 0:2]))  # row 1 starts at 0
    eq(b.sink_keys[:1], rot(k[:1, :, 3:5]))  # row 0 at its padding, 3
    eq(b.sink_values[:1], rot(mx.concatenate(vs, axis=2)[:1, :, 3:5]))


def test_batch_to_quantized_filter_extend_and_state_carry_the_sink():
    f = kvcore.BatchKVCache([1, 0])
    k, v = outlier_kv(40)
    k2, v2 = kv(B=2, S=40, seed=3)
    f.update_and_fetch(k2, v2)
    b = f.to_quantized(group_size=32, bits=4, scheme=SCHEME, window=0, sink=1)
    eq(b.sink_keys[0:1], rot(k2[0:1, :, 1:2]))
    eq(b.sink_keys[1:2], rot(k2[1:2, :, 0:1]))
    state = b.state
    assert len(state) == 14 and state[11] == 1
    back = kvcore.QuantizedBatchKVCache.from_state(state)
    eq(back.sink_keys, b.sink_keys)
    b.filter([1])
    eq(b.sink_keys, back.sink_keys[1:2])
    b.extend(copy.deepcopy(back))
    assert b.sink_keys.shape == (3, 2, 1, 64)
    eq(b.sink_keys[1:], back.sink_keys)


def test_batch_refuses_caches_of_other_sinks_and_changes_nothing():
    a, c = single(40, seed=1, sink=2), single(40, seed=2, sink=1)
    with pytest.raises(kvcore.CacheValueError, match=re.escape(
            "expected caches quantized alike: group_size (32, 32), bits (4, 4), window 0, sink 2 but got "
            "group_size (32, 32), bits (4, 4), window 0, sink 1")):
        kvcore.QuantizedBatchKVCache.merge([a, c])
    b = kvcore.QuantizedBatchKVCache.merge([copy.deepcopy(a)])
    other = kvcore.QuantizedBatchKVCache.merge([c])
    before = b.sink_keys
    with pytest.raises(kvcore.CacheValueError, match="and sink 2 but got window 0, sink 1"):
        b.extend(other)
    eq(b.sink_keys, before)
    with pytest.raises(kvcore.CacheValueError, match="a sink of 0 to 256 tokens but got sink 300"):
        kvcore.QuantizedBatchKVCache([0], group_size=32, bits=4, scheme=SCHEME, sink=300)


def test_a_model_on_sink_caches_computes_what_float_attention_over_them_does():
    from test_quant_scheme import Dequantizing, _qwen

    from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

    class Reference(Dequantizing):
        """The cache's contents as floats, its sink read from its float copy."""

        def __init__(self):
            self.inner = new(bits=4, window=16, sink=1)

        def update_and_fetch(self, k, v):
            self.inner.update_and_fetch(k, v)
            return with_sink(self.inner)

    model = _qwen(layers=1)
    patch_mlx_lm()
    try:
        ours = [new(bits=4, window=16, sink=1) for _ in model.layers]
        ref = [Reference() for _ in model.layers]
        tokens = mx.random.randint(0, 128, (1, 90), key=mx.random.key(5))
        for a, b in ((0, 40), (40, 41), (41, 90)):
            got, want = model(tokens[:, a:b], cache=ours), model(tokens[:, a:b], cache=ref)
            assert mx.abs(got - want).max().item() < 1e-4
    finally:
        unpatch_mlx_lm()


def test_generate_step_quantizes_with_the_sink_patch_mlx_lm_names():
    from mlx_lm.generate import generate_step
    from test_quant_scheme import _qwen

    from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

    model = _qwen()
    with pytest.raises(kvcore.CacheValueError, match="no sink for the affine scheme but got sink 1"):
        patch_mlx_lm(kv_sink=1)
    patch_mlx_lm(kv_scheme=SCHEME, kv_sink=1)
    try:
        cache = kvcore.make_prompt_cache(model)
        prompt = mx.random.randint(0, 128, (40,), key=mx.random.key(6))
        toks = [t for (t, _), _ in zip(generate_step(
            prompt, model, prompt_cache=cache, kv_bits=3, kv_group_size=32,
            quantized_kv_start=0, max_tokens=3), range(3))]
        assert len(toks) == 3
        assert all(c.scheme == SCHEME and c.sink == 1 and c.sink_keys.shape[2] == 1 for c in cache)
    finally:
        unpatch_mlx_lm()


def test_a_disk_prefix_shorter_than_the_sink_holds_only_its_own_first_tokens(tmp_path):
    # Blocks of 32 tokens, a sink of 128: a prefix served on a block edge holds
    # 64 sink tokens, and its next update fills the rest from the new tokens.
    k, v = outlier_kv(300)
    toks = list(range(300))

    def cache():
        return kvcore.QuantizedKVCache(group_size=(32, 64), bits=4, scheme=SCHEME, window=0, sink=128)

    c = cache()
    c.update_and_fetch(k, v)
    with kvcore.LRUPromptCache(disk_dir=tmp_path, disk_block_tokens=32) as w:
        w.insert_cache("m", toks, [c])
    got, rest = kvcore.LRUPromptCache(disk_dir=tmp_path, disk_block_tokens=32).fetch_nearest_cache(
        "m", toks[:64] + [7])
    assert rest == [7] and got[0].offset == 64 and got[0].sink_keys.shape[2] == 64
    k2, v2 = kv(S=70, seed=4)
    direct = cache()
    direct.update_and_fetch(k[:, :, :64], v[:, :, :64])
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(2))
    outs = []
    for x in (got[0], direct):
        keys, values = x.update_and_fetch(k2, v2)
        outs.append(attend(q, keys, values, x, None))
    eq(got[0].sink_keys, direct.sink_keys)
    assert close(outs[0], outs[1])


def test_a_state_whose_sink_runs_past_its_offset_is_cut_at_the_next_update_and_merge():
    c = new(sink=4)
    c.update_and_fetch(*outlier_kv(40))
    st = list(c.state)
    st[2] = 2  # offset 2, no whole group: two float tokens (which ones does not matter here)
    st[0] = tuple(x[..., :0] for x in st[0])
    st[1] = tuple(x[:, :, :0] for x in st[1])
    st[7], st[8] = c.residual[:, :, :2], c.value_residual[:, :, :2]
    short = kvcore.QuantizedKVCache.from_state(tuple(st))
    assert short.sink_keys.shape[2] == 4  # an entry's tail keeps the sequence's first tokens
    b = kvcore.QuantizedBatchKVCache.merge([copy.deepcopy(short)])
    eq(b.sink_keys[:, :, :2], c.sink_keys[:, :, :2])
    k2, v2 = kv(S=3, seed=8)
    short.update_and_fetch(k2, v2)
    eq(short.sink_keys, mx.concatenate([c.sink_keys[:, :, :2], rot(k2[:, :, :2])], axis=2))


def test_batch_trim_and_finalize_give_the_sinks_tokens_back_in_float():
    a, c = single(70, seed=1, sink=3), single(2, seed=2, sink=3)
    b = kvcore.QuantizedBatchKVCache.merge([copy.deepcopy(a)])
    a.trim(60)
    b.trim(60)  # into the first group: its kept tokens return to float
    eq(b.residual[:, :, :3], a.residual[:, :, :3])
    eq(b.residual[:, :, :3], a.sink_keys)
    # A row rolled right by finalize moves its sink tokens past the quantized positions.
    long = single(64, seed=3, sink=3)
    batch = kvcore.QuantizedBatchKVCache.merge([copy.deepcopy(c), copy.deepcopy(long)])
    batch.prepare(right_padding=[6, 0])
    k8, v8 = kv(B=2, S=8, seed=5)
    batch.update_and_fetch(k8, v8)
    batch.finalize()
    c.update_and_fetch(k8[:1, :, :2], v8[:1, :, :2])
    lp = batch.left_padding.tolist()[0]
    T = batch.keys_and_values()[0][1].shape[-1] * 32
    eq(batch.residual[0:1, :, lp - T:lp - T + 3], c.sink_keys)
    k1, v1 = kv(B=2, S=1, seed=9)
    q = mx.random.normal((2, 4, 1, 64), key=mx.random.key(13))
    m = batch.make_mask(1, return_array=True)
    kb, vb = batch.update_and_fetch(k1, v1)
    ks, vs = c.update_and_fetch(k1[:1], v1[:1])
    assert close(attend(q, kb, vb, batch, m)[:1], attend(q[:1], ks, vs, c, None))
