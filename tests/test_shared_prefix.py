"""LRUPromptCache's shared store: entries of plain KVCaches keep each token's
keys and values once, and serve mlx-lm's results."""

import random

import mlx.core as mx
import pytest
from mlx_lm.models import cache as ref

import kvcore


@pytest.fixture(autouse=True)
def fresh_buffers():
    # These tests count bytes per mlx buffer: a buffer mlx's allocator reuses
    # from its cache (left by earlier tests) may be larger than the request.
    mx.synchronize()
    mx.clear_cache()

LAYERS = 2


def token_kv(tokens, heads=2, dim=4, dtype=mx.float16):
    """Keys and values that are a function of the tokens (as a model's are):
    position p holds tokens[p] (keys) and -tokens[p] (values)."""
    t = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
    k = mx.broadcast_to(t, (1, heads, len(tokens), dim)).astype(dtype)
    return k, -k


def caches_for(cls, tokens, layers=LAYERS, **kw):
    out = []
    for layer in range(layers):
        c = cls()
        k, v = token_kv(tokens, **kw)
        c.update_and_fetch(k + layer, v - layer)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def kv_of(c):
    """(keys, values) up to the offset, for kvcore's and mlx-lm's KVCache."""
    keys, values = c.state[0], c.state[1]
    return keys[..., : c.offset, :], values[..., : c.offset, :]


def assert_same_caches(ours, theirs):
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert type(a) is kvcore.KVCache
        assert a.offset == b.offset
        ka, va = kv_of(a)
        kb, vb = kv_of(b)
        assert ka.shape == kb.shape and mx.array_equal(ka, kb).item()
        assert mx.array_equal(va, vb).item()


@pytest.mark.parametrize("seed", range(4))
def test_shared_entries_match_mlx_lm(seed):
    # Random inserts, fetches and trims over a small token alphabet (many
    # shared prefixes): every fetch gives mlx-lm's offset, keys, values and
    # rest; the counts match; the bytes never exceed mlx-lm's.
    rng = random.Random(seed)
    ours = kvcore.LRUPromptCache(max_size=8)
    theirs = ref.LRUPromptCache(max_size=8)
    models = ["a", "b"]
    for _ in range(300):
        model = rng.choice(models)
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        op = rng.random()
        if op < 0.4:
            kind = rng.choice(["assistant", "user", "system"])
            # The server stores caches one token short of their tokens too.
            n = len(toks) - (rng.random() < 0.3 and len(toks) > 1)
            ours.insert_cache(model, toks, caches_for(kvcore.KVCache, toks[:n]), cache_type=kind)
            theirs.insert_cache(model, toks, caches_for(ref.KVCache, toks[:n]), cache_type=kind)
        elif op < 0.45:
            n_seq = rng.randrange(9)
            ours.trim_to(n_sequences=n_seq)
            theirs.trim_to(n_sequences=n_seq)
        else:
            c1, r1 = ours.fetch_nearest_cache(model, toks)
            c2, r2 = theirs.fetch_nearest_cache(model, toks)
            assert r1 == r2
            assert_same_caches(c1, c2)
        assert len(ours) == len(theirs)
        stats1, stats2 = ours.stats_by_type(), theirs.stats_by_type()
        assert {k: v["n_sequences"] for k, v in stats1.items()} == {
            k: v["n_sequences"] for k, v in stats2.items()
        }
        assert sum(v["n_bytes"] for v in stats1.values()) == ours.nbytes
        assert ours.nbytes <= theirs.nbytes
    ours.trim_to(n_sequences=0)
    assert len(ours) == 0 and ours.nbytes == 0


def test_sixteen_conversations_cost_one_prefix_plus_tails():
    prefix = list(range(1000, 1000 + 4096))
    lru = kvcore.LRUPromptCache(max_size=32)
    mlx = ref.LRUPromptCache(max_size=32)
    convs = [prefix + [50_000 + 100 * i + j for j in range(64)] for i in range(16)]
    for i, toks in enumerate(convs):
        lru.insert_cache("m", toks, caches_for(kvcore.KVCache, toks, heads=2, dim=64))
        mlx.insert_cache("m", toks, caches_for(ref.KVCache, toks, heads=2, dim=64))
        if i == 0:
            one, one_mlx = lru.nbytes, mlx.nbytes
    # One conversation: its KVCache buffers (4352 slots of 256), as mlx-lm
    # counts them.
    assert one == one_mlx == LAYERS * 2 * (2 * 4352 * 64 * 2)
    # Sixteen: the first one's buffers plus 15 tails of 64 tokens (copied
    # out of their own buffers; an allocation may round up a little).
    tails = 15 * LAYERS * 2 * (2 * 64 * 64 * 2)
    assert one + tails <= lru.nbytes <= one + tails * 1.01
    assert lru.nbytes / one < 1.3
    assert mlx.nbytes / one_mlx == 16.0
    for toks in (convs[0], convs[7], convs[15]):
        got, rest = lru.fetch_nearest_cache("m", toks)
        want, _ = mlx.fetch_nearest_cache("m", toks)
        assert rest == []
        assert_same_caches(got, want)
    # Evicting frees only what no other entry uses; the last one gone
    # frees everything.
    # The one left (the newest) keeps the first one's prefix buffers and
    # its own tail.
    lru.trim_to(n_sequences=1)
    assert one + tails / 15 <= lru.nbytes <= one + tails / 15 * 1.01
    got, _ = lru.fetch_nearest_cache("m", convs[15])
    assert_same_caches(got, mlx.fetch_nearest_cache("m", convs[15])[0])
    lru.trim_to(n_sequences=0)
    assert lru.nbytes == 0


def test_trimmed_fetch_and_independence():
    lru = kvcore.LRUPromptCache()
    toks = list(range(20))
    lru.insert_cache("m", toks, caches_for(kvcore.KVCache, toks))
    got, rest = lru.fetch_nearest_cache("m", toks[:12] + [99, 98])
    assert rest == [99, 98] and [c.offset for c in got] == [12, 12]
    assert kv_of(got[0])[0][0, 0, :, 0].tolist() == list(range(12))
    # The caller owns what it got: growing it changes no stored entry.
    got[0].update_and_fetch(*token_kv([7, 7]))
    assert got[0].offset == 14
    again, rest = lru.fetch_nearest_cache("m", toks)
    assert rest == [] and again[0].offset == 20
    assert kv_of(again[0])[0][0, 0, :, 0].tolist() == list(range(20))


def test_what_is_not_shared_is_held_as_given():
    lru = kvcore.LRUPromptCache()
    toks = list(range(8))
    # A subclass, a different cache kind, and a cache past its tokens are
    # held as given (bytes as their own nbytes).
    class Sub(kvcore.KVCache):
        pass

    plain = caches_for(Sub, toks)
    lru.insert_cache("m", toks, plain)
    assert lru.nbytes == sum(c.nbytes for c in plain)
    got, _ = lru.fetch_nearest_cache("m", toks)
    assert type(got[0]) is Sub
    rot = [kvcore.RotatingKVCache(max_size=16)]
    rot[0].update_and_fetch(*token_kv([1, 2, 3]))
    lru.insert_cache("m", [1, 2, 3], rot)
    long = caches_for(kvcore.KVCache, list(range(30)))
    lru.insert_cache("m", [5, 6], long)
    assert lru.nbytes == sum(c.nbytes for c in plain + rot + long)
    got, rest = lru.fetch_nearest_cache("m", [5, 6])
    assert rest == [] and got[0].offset == 30


def test_share_false_holds_everything_as_given():
    lru = kvcore.LRUPromptCache(share=False)
    assert lru.share is False and kvcore.LRUPromptCache().share is True
    a, b = [1, 2, 3, 4], [1, 2, 3, 5]
    ca, cb = caches_for(kvcore.KVCache, a), caches_for(kvcore.KVCache, b)
    lru.insert_cache("m", a, ca)
    lru.insert_cache("m", b, cb)
    assert lru.nbytes == sum(c.nbytes for c in ca + cb)


def test_layers_of_other_shapes_are_not_mixed():
    # The same model and tokens with other dtypes or head counts go to a
    # group of their own, each served its own arrays.
    lru = kvcore.LRUPromptCache()
    toks = [1, 2, 3]
    lru.insert_cache("m", toks + [4], caches_for(kvcore.KVCache, toks + [4], dtype=mx.float32))
    lru.insert_cache("m", toks + [5], caches_for(kvcore.KVCache, toks + [5], heads=4))
    got, _ = lru.fetch_nearest_cache("m", toks + [4])
    assert got[0].state[0].dtype == mx.float32 and got[0].state[0].shape[1] == 2
    got, _ = lru.fetch_nearest_cache("m", toks + [5])
    assert got[0].state[0].dtype == mx.float16 and got[0].state[0].shape[1] == 4


def test_byte_limit_counts_shared_bytes_once():
    prefix = list(range(300))
    one = caches_for(kvcore.KVCache, prefix + [1000])
    per_conv = sum(c.nbytes for c in one)
    # Room for little more than one conversation's buffers: mlx-lm keeps one
    # entry, the shared store keeps all four (the tails are small).
    lru = kvcore.LRUPromptCache(max_bytes=int(per_conv * 1.2))
    mlx = ref.LRUPromptCache(max_bytes=int(per_conv * 1.2))
    for i in range(4):
        toks = prefix + [1000 + i]
        lru.insert_cache("m", toks, caches_for(kvcore.KVCache, toks))
        mlx.insert_cache("m", toks, caches_for(ref.KVCache, toks))
    assert len(mlx) == 1
    assert len(lru) == 4 and lru.nbytes <= lru.max_bytes


def test_buffers_mostly_freed_are_copied_out():
    # B shares A's first 10 tokens. Once A goes, B's 10 shared tokens would
    # keep A's whole buffers alive: they are copied out instead.
    a = list(range(600))
    b = a[:10] + list(range(700, 1290))
    lru = kvcore.LRUPromptCache()
    lru.insert_cache("m", a, caches_for(kvcore.KVCache, a))
    one = lru.nbytes  # A's buffers, as allocated
    lru.insert_cache("m", b, caches_for(kvcore.KVCache, b))
    assert lru.nbytes == 2 * one  # B's tail views B's buffers
    lru.trim_to(n_sequences=1)  # A goes
    assert one < lru.nbytes < 1.1 * one
    got, rest = lru.fetch_nearest_cache("m", b)
    assert rest == [] and kv_of(got[1])[0][0, 0, :, 0].tolist() == [t + 1 for t in b]


def hybrid_for(mod, tokens, layers=LAYERS):
    """Falcon-H1's layers: CacheList(ArraysCache(2), KVCache), state slots a
    function of the tokens too."""
    out = []
    for layer in range(layers):
        slots = mod.ArraysCache(size=2)
        slots[0] = mx.full((1, 3), float(sum(tokens) % 97 + layer))
        slots[1] = mx.full((1, 2, 2), float(len(tokens)))
        kv = mod.KVCache()
        k, v = token_kv(tokens, dim=64)
        kv.update_and_fetch(k + layer, v - layer)
        out.append(mod.CacheList(slots, kv))
    mx.eval([c.state for c in out])
    return out


def assert_same_hybrid(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert type(a) is kvcore.CacheList
        (sa, ka), (sb, kb) = a.caches, b.caches
        assert type(sa) is kvcore.ArraysCache and type(ka) is kvcore.KVCache
        for i in range(2):
            assert mx.array_equal(sa[i], sb[i]).item()
        assert ka.offset == kb.offset
        for x, y in zip(kv_of(ka), kv_of(kb)):
            assert x.shape == y.shape and mx.array_equal(x, y).item()


def test_hybrid_layers_share_their_kv_caches():
    # Entries of CacheList(ArraysCache, KVCache) layers: the KVCaches' keys
    # and values go to the store, the state slots are held per entry; the
    # results are mlx-lm's, and fetched caches are independent.
    prefix = list(range(1000, 1512))
    convs = [prefix + [9000 + 100 * i + j for j in range(16)] for i in range(8)]
    lru, mlx = kvcore.LRUPromptCache(max_size=16), ref.LRUPromptCache(max_size=16)
    for i, toks in enumerate(convs):
        lru.insert_cache("m", toks, hybrid_for(kvcore, toks))
        mlx.insert_cache("m", toks, hybrid_for(ref, toks))
        if i == 0:
            one = lru.nbytes
            assert one == mlx.nbytes
    slots = sum(c.caches[0].nbytes for c in hybrid_for(kvcore, convs[0]))
    tail = LAYERS * 2 * (2 * 16 * 64 * 2)
    assert one + 7 * (tail + slots) <= lru.nbytes <= one + 7 * (tail + slots) * 1.01
    assert lru.nbytes / one < 1.2 and mlx.nbytes / one == 8.0
    for toks in (convs[0], convs[5], prefix + [1, 2]):
        got, rest = lru.fetch_nearest_cache("m", toks)
        want, want_rest = mlx.fetch_nearest_cache("m", toks)
        assert rest == want_rest and (got is None) == (want is None)
        if got is not None:
            assert_same_hybrid(got, want)
    got, _ = lru.fetch_nearest_cache("m", convs[5])
    got[0].caches[0][0] = mx.zeros((1, 3))
    got[0].caches[1].trim(100)
    again, _ = lru.fetch_nearest_cache("m", convs[5])
    assert_same_hybrid(again, mlx.fetch_nearest_cache("m", convs[5])[0])
    lru.trim_to(n_sequences=0)
    assert lru.nbytes == 0
