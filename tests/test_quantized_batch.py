"""QuantizedBatchKVCache and QuantizedBatchRotatingKVCache: the float batch
caches' bookkeeping with each token quantized.

mx.quantize works group by group along the head dimension, so quantizing a
token never depends on the others: every triple a quantized batch cache
returns must equal, bit for bit, mx.quantize of what the float batch cache
returns for the same calls. mlx-lm has no quantized batch caches; its
BatchKVCache / BatchRotatingKVCache are the reference for the float side
(kvcore's equal them bit for bit, tests/test_batch.py)."""

import copy

import mlx.core as mx
import pytest
from mlx_lm.models import cache as ref

import kvcore

H, D = 2, 64
SPECS = [(64, 8), (32, 4), ((64, 32), (8, 4))]


def split(spec):
    gs, bits = spec
    kg, vg = gs if isinstance(gs, tuple) else (gs, gs)
    kb, vb = bits if isinstance(bits, tuple) else (bits, bits)
    return (kg, kb), (vg, vb)


def quant(x, gb):
    return mx.quantize(x, group_size=gb[0], bits=gb[1])


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()


def assert_triples(got, keys, values, spec, left_padding=None):
    """got == mx.quantize of (keys, values); with left_padding, each row only
    from its padding on (pad slots rolled in by finalize were never written,
    zeros in the float cache and zero triples in the quantized one)."""
    ks, vs = split(spec)
    for t, x, s in ((got[0], keys, ks), (got[1], values, vs)):
        want = quant(x, s)
        assert len(t) == 3
        for a, b in zip(t, want):
            if left_padding is None:
                assert same(a, b)
            else:
                for row, p in enumerate(left_padding):
                    assert same(a[row, :, p:], b[row, :, p:])


def kv(B, S, seed):
    mx.random.seed(seed)
    return (mx.random.normal((B, H, S, D)).astype(mx.float16),
            mx.random.normal((B, H, S, D)).astype(mx.float16))


def pair(kind, lp, spec, max_size=6):
    gs, bits = spec
    if kind == "kv":
        return kvcore.BatchKVCache(lp), kvcore.QuantizedBatchKVCache(lp, group_size=gs, bits=bits)
    return (kvcore.BatchRotatingKVCache(max_size, lp),
            kvcore.QuantizedBatchRotatingKVCache(max_size, lp, group_size=gs, bits=bits))


def assert_bookkeeping(f, q):
    assert same(q.offset, f.offset)
    assert same(q.left_padding, f.left_padding)
    assert q._idx == f._idx
    assert q.size() == f.size()
    assert q.empty() == f.empty()
    if isinstance(f, kvcore.BatchRotatingKVCache):
        assert (q._offset, q.rotated, q.max_size) == (f._offset, f.rotated, f.max_size)
    for N in (1, 3):
        m_f, m_q = f.make_mask(N, return_array=True), q.make_mask(N, return_array=True)
        assert same(m_q, m_f)


def assert_like_quantized(q, f, spec):
    """q's stored triples are f's stored arrays quantized (slots written)."""
    assert_bookkeeping(f, q)
    if f.keys is None:
        assert q.keys is None and q.values is None
        return
    # Slots past the write position were never written (a wrapped ring has
    # written them all).
    rotated = isinstance(f, kvcore.BatchRotatingKVCache) and f.rotated
    n = f.keys.shape[2] if rotated else min(f._idx, f.keys.shape[2])
    # A row's left-padding slots hold no token (after finalize they may be
    # slots never written, rolled in): compare each row from its padding on.
    lp = [max(0, p) for p in f.left_padding.tolist()] if not rotated else [0] * f.keys.shape[0]
    ks, vs = split(spec)
    for t, x, s in ((q.keys, f.keys, ks), (q.values, f.values, vs)):
        for a, b in zip(t, quant(x[..., :n, :], s)):
            for row, p in enumerate(lp):
                assert same(a[row, :, p:n, :], b[row, :, p:, :])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_updates_match_the_float_batch_cache(kind, spec):
    f, q = pair(kind, [2, 0, 1], spec)
    for step, S in enumerate([4, 1, 1, 3, 1, 1, 1, 5, 1]):
        k, v = kv(3, S, step)
        fk, fv = f.update_and_fetch(k, v)
        got = q.update_and_fetch(k, v)
        assert_triples(got, fk, fv, spec)
        assert_bookkeeping(f, q)
    assert_triples(q.keys_and_values(), *f.keys_and_values(), spec)


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_the_float_side_is_mlx_lms(kind):
    # The reference for the float side: mlx-lm's batch cache gives the same
    # arrays as kvcore's, so the quantized cache is mlx-lm's quantized.
    lp = [1, 0]
    r = ref.BatchKVCache(lp) if kind == "kv" else ref.BatchRotatingKVCache(5, lp)
    _, q = pair(kind, lp, (64, 4), max_size=5)
    for step, S in enumerate([3, 1, 1, 4, 1]):
        k, v = kv(2, S, 10 + step)
        rk, rv = r.update_and_fetch(k, v)
        assert_triples(q.update_and_fetch(k, v), rk, rv, (64, 4))
        assert same(q.offset, r.offset) and same(q.left_padding, r.left_padding)
        assert same(q.make_mask(1, return_array=True), r.make_mask(1, return_array=True))


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_prepare_finalize_right_padding(kind):
    spec = (32, (8, 4))
    f, q = pair(kind, [0, 0, 0], spec, max_size=8)
    lengths, right = [5, 3, 4], [0, 2, 1]
    if kind == "kv":
        f.prepare(right_padding=right)
        q.prepare(right_padding=right)
    else:
        f.prepare(lengths=lengths, right_padding=right)
        q.prepare(lengths=lengths, right_padding=right)
    k, v = kv(3, 5, 3)
    assert_triples(q.update_and_fetch(k, v), *f.update_and_fetch(k, v), spec)
    f.finalize()
    q.finalize()
    assert_like_quantized(q, f, spec)
    k, v = kv(3, 1, 4)
    lp = [max(0, p) for p in f.left_padding.tolist()]
    assert_triples(q.update_and_fetch(k, v), *f.update_and_fetch(k, v), spec, lp)
    assert_bookkeeping(f, q)


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_to_quantized_keeps_rows_padding_and_ring(kind):
    f, _ = pair(kind, [3, 0], (64, 8), max_size=5)
    for step, S in enumerate([6, 1, 1, 1]):
        f.update_and_fetch(*kv(2, S, step))
    q = f.to_quantized(group_size=32, bits=(8, 4))
    assert type(q).__name__ == ("QuantizedBatchKVCache" if kind == "kv" else "QuantizedBatchRotatingKVCache")
    assert (q.group_size, q.bits) == (32, (8, 4))
    for a, b in zip(q.keys, mx.quantize(f.keys, group_size=32, bits=8)):
        assert same(a, b)
    for a, b in zip(q.values, mx.quantize(f.values, group_size=32, bits=4)):
        assert same(a, b)
    assert_bookkeeping(f, q)
    # And they go on in step.
    k, v = kv(2, 1, 9)
    assert_triples(q.update_and_fetch(k, v), *f.update_and_fetch(k, v), (32, (8, 4)))


def test_to_quantized_of_an_empty_batch_cache():
    q = kvcore.BatchKVCache([1, 0]).to_quantized()
    assert q.keys is None and q.empty() and (q.group_size, q.bits) == (64, 4)
    assert q.offset.tolist() == [-1, 0]


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_filter_extend_extract_as_the_float_cache(kind):
    spec = (64, (8, 4))
    f1, q1 = pair(kind, [1, 0, 2], spec, max_size=6)
    f2, q2 = pair(kind, [0, 1], spec, max_size=6)
    for step, S in enumerate([3, 1, 1]):
        k, v = kv(3, S, step)
        f1.update_and_fetch(k, v)
        q1.update_and_fetch(k, v)
    for step, S in enumerate([5, 1]):
        k, v = kv(2, S, 20 + step)
        f2.update_and_fetch(k, v)
        q2.update_and_fetch(k, v)
    f1.filter([2, 0])
    q1.filter([2, 0])
    assert_bookkeeping(f1, q1)
    f1.extend(f2)
    q1.extend(q2)
    assert_like_quantized(q1, f1, spec)
    for i in range(4):
        fe, qe = f1.extract(i), q1.extract(i)
        assert type(qe).__name__ == ("QuantizedKVCache" if kind == "kv" else "QuantizedRotatingKVCache")
        assert qe.offset == fe.offset and qe.bits == (8, 4)
        ks, vs = split(spec)
        n = fe.keys.shape[2]
        for a, b in zip(qe.keys, quant(fe.keys, ks)):
            assert same(a[..., :n, :], b)
        for a, b in zip(qe.values, quant(fe.values, vs)):
            assert same(a[..., :n, :], b)


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_merge_of_quantized_singles(kind):
    # What BatchGenerator does with the caches it is given: merge them.
    spec = (32, (8, 4))
    gs, bits = spec
    singles_f, singles_q = [], []
    for i, n in enumerate([4, 2, 7]):
        f = kvcore.KVCache() if kind == "kv" else kvcore.RotatingKVCache(max_size=8)
        f.update_and_fetch(*kv(1, n, 30 + i))
        singles_f.append(f)
        singles_q.append(f.to_quantized(group_size=gs, bits=bits))
    mf = type(singles_f[0]).merge(singles_f)
    mq = type(singles_q[0]).merge(singles_q)
    assert type(mq).__name__ == ("QuantizedBatchKVCache" if kind == "kv" else "QuantizedBatchRotatingKVCache")
    assert_like_quantized(mq, mf, spec)
    cls = kvcore.QuantizedBatchKVCache if kind == "kv" else kvcore.QuantizedBatchRotatingKVCache
    assert_like_quantized(cls.merge(singles_q), mf, spec)


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_state_copy_and_files(kind, tmp_path):
    spec = (32, (8, 4))
    f, q = pair(kind, [2, 0], spec, max_size=5)
    for step, S in enumerate([4, 1, 1, 1]):
        k, v = kv(2, S, step)
        f.update_and_fetch(k, v)
        q.update_and_fetch(k, v)
    st = q.state
    assert (st[-2], st[-1]) == (32, (8, 4))
    r = type(q).from_state(st)
    assert_like_quantized(r, f, spec)
    c = copy.deepcopy(q)
    k, v = kv(2, 1, 50)
    c.update_and_fetch(k, v)
    assert q._idx == f._idx  # the copy is independent
    path = str(tmp_path / "qb.safetensors")
    kvcore.save_prompt_cache(path, [q, f], {"a": "b"})
    loaded, meta = kvcore.load_prompt_cache(path, return_metadata=True)
    assert meta == {"a": "b"}
    assert type(loaded[0]) is type(q)
    assert_like_quantized(loaded[0], f, spec)
    assert (loaded[0].group_size, loaded[0].bits) == (32, (8, 4))
    k, v = kv(2, 1, 60)
    assert_triples(loaded[0].update_and_fetch(k, v), *f.update_and_fetch(k, v), spec)


def test_mlx_lm_refuses_the_kvcore_only_file(tmp_path):
    q = kvcore.QuantizedBatchKVCache([0], bits=4)
    q.update_and_fetch(*kv(1, 2, 0))
    path = str(tmp_path / "q.safetensors")
    kvcore.save_prompt_cache(path, [q])
    with pytest.raises(KeyError, match="QuantizedBatchKVCache"):
        ref.load_prompt_cache(path)


def test_trim():
    spec = (64, 4)
    f, q = pair("kv", [1, 0], spec)
    for step, S in enumerate([5, 1, 1]):
        k, v = kv(2, S, step)
        f.update_and_fetch(k, v)
        q.update_and_fetch(k, v)
    assert q.is_trimmable() and q.trim(2) == f.trim(2) == 2
    assert_bookkeeping(f, q)
    k, v = kv(2, 1, 7)
    assert_triples(q.update_and_fetch(k, v), *f.update_and_fetch(k, v), spec)


# -- bad input: typed errors, nothing changed --------------------------------


def snapshot(q):
    keys = q.keys
    return (q._idx, q.offset.tolist(), q.left_padding.tolist(),
            None if keys is None else [a.tolist() for a in keys])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 7}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 7"),
        ({"bits": (8, 9)}, r"bits in \{2, 3, 4, 5, 6, 8\} but got 9"),
        ({"group_size": 48}, r"group_size in \{32, 64, 128\} but got 48"),
        ({"bits": (8, 4, 2)}, r"bits as an int or a \(keys, values\) pair"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(kvcore.CacheValueError, match=match):
        kvcore.QuantizedBatchKVCache([0], **kwargs)
    with pytest.raises(kvcore.CacheValueError, match=match):
        kvcore.QuantizedBatchRotatingKVCache(4, [0], **kwargs)
    b = kvcore.BatchKVCache([0])
    b.update_and_fetch(*kv(1, 2, 0))
    with pytest.raises(kvcore.CacheValueError, match=match):
        b.to_quantized(**kwargs)
    assert b._idx == 2


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_bad_updates_leave_the_cache_alone(kind):
    _, q = pair(kind, [1, 0], (64, 4))
    q.update_and_fetch(*kv(2, 3, 0))
    before = snapshot(q)
    cases = [
        ((mx.zeros((2, H, 1, 48)), mx.zeros((2, H, 1, 48))), r"divisible by the group size 64|group"),
        ((mx.zeros((2, H, 1, D), mx.int32), mx.zeros((2, H, 1, D), mx.int32)),
         r"float16, bfloat16 or float32 to quantize but got int32"),
        ((mx.zeros((2, H + 1, 1, D)), mx.zeros((2, H + 1, 1, D))), r"like the cache's"),
        ((mx.zeros((2, H, 1)), mx.zeros((2, H, 1))), r"keys of rank 4"),
    ]
    for (k, v), match in cases:
        with pytest.raises(kvcore.CacheValueError, match=match):
            q.update_and_fetch(k, v)
        assert snapshot(q) == before


@pytest.mark.parametrize("kind", ["kv", "rot"])
def test_mixed_settings_are_refused(kind):
    _, a = pair(kind, [0], (64, 4))
    _, b = pair(kind, [0], (64, 8))
    a.update_and_fetch(*kv(1, 2, 0))
    b.update_and_fetch(*kv(1, 2, 1))
    before = snapshot(a)
    with pytest.raises(kvcore.CacheValueError, match=r"quantized alike: group_size \(64, 64\), bits \(4, 4\) but got group_size \(64, 64\), bits \(8, 8\)"):
        a.extend(b)
    assert snapshot(a) == before
    one = kvcore.QuantizedKVCache(bits=4) if kind == "kv" else kvcore.QuantizedRotatingKVCache(8, bits=4)
    two = kvcore.QuantizedKVCache(bits=8) if kind == "kv" else kvcore.QuantizedRotatingKVCache(8, bits=8)
    with pytest.raises(kvcore.CacheValueError, match=r"caches quantized alike"):
        type(one).merge([one, two])
    with pytest.raises(kvcore.CacheValueError, match=r"a list of kvcore Quantized"):
        type(one).merge([one, kvcore.KVCache()])


def test_bad_filter_and_extract_leave_the_cache_alone():
    _, q = pair("kv", [1, 0], (64, 4))
    q.update_and_fetch(*kv(2, 3, 0))
    before = snapshot(q)
    with pytest.raises(kvcore.CacheIndexError):
        q.filter([0, 5])
    assert snapshot(q) == before
    with pytest.raises(kvcore.CacheIndexError):
        q.extract(2)
    assert snapshot(q) == before


def test_bad_state_is_refused_whole():
    _, q = pair("kv", [1, 0], (64, 4))
    q.update_and_fetch(*kv(2, 3, 0))
    before = snapshot(q)
    st = list(q.state)
    st[1] = (st[1][0], st[1][1])
    with pytest.raises(kvcore.CacheValueError):
        q.state = tuple(st)
    st = list(q.state)
    st[5] = 48
    with pytest.raises(kvcore.CacheValueError, match="group_size"):
        q.state = tuple(st)
    assert snapshot(q) == before


# -- mlx-lm's BatchGenerator on quantized batch caches -----------------------


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


@pytest.mark.parametrize("bits", [8, (8, 4)])
def test_batch_generator_with_quantized_caches(bits):
    # The documented way: hand BatchGenerator quantized prompt caches; it
    # merges them into QuantizedBatchKVCaches. Each sequence's tokens equal
    # its own generate_step run on the same quantized cache.
    from mlx_lm.generate import generate_step

    from kvcore._demo import tiny_qwen2

    kvcore.patch_mlx_lm()
    try:
        model = tiny_qwen2(2)
        prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15]]
        n = 8

        def quantized_cache():
            return [c.to_quantized(group_size=32, bits=bits) for c in kvcore.make_prompt_cache(model)]

        got = _batch_generate(model, prompts, [quantized_cache() for _ in prompts], n)
        want = []
        for p in prompts:
            steps = generate_step(mx.array(p), model, prompt_cache=quantized_cache(), max_tokens=n)
            want.append([t for t, _ in steps])
        assert got == want
    finally:
        kvcore.unpatch_mlx_lm()
