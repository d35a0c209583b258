"""TokenBuffer, PromptTrie and LRUPromptCache against mlx-lm 0.32.2's, run
side by side on the same operations (random sequences, seeded), and under
threads."""

import copy
import random

import mlx.core as mx
import pytest
from mlx_lm.models import cache as ref

import kvcore
from conftest import run_in_threads


# -- TokenBuffer -------------------------------------------------------------


@pytest.mark.parametrize("initial", [None, [], [5, 6, 7]])
def test_token_buffer_matches_mlx_lm(initial):
    a, b = kvcore.TokenBuffer(initial), ref.TokenBuffer(initial)
    rng = random.Random(0)
    for n in [3, 250, 1, 10, 300, 2]:
        # As BatchGenerator calls it: an int32 mx.array (mlx-lm's takes no
        # list); kvcore's takes either.
        toks = mx.array([rng.randrange(1000) for _ in range(n)], dtype=mx.int32)
        x, y = a.update_and_fetch(toks), b.update_and_fetch(toks)
        assert x.dtype == y.dtype == mx.int32
        assert x.tolist() == y.tolist()
        assert a.state.shape == b.state.shape
        assert a.state.tolist() == b.state.tolist()
        assert a.tokens.tolist() == b.tokens.tolist()


def test_token_buffer_empty_update():
    # mlx-lm's fails on an empty list (mx.array([]) is float32); an empty
    # update simply returns the tokens so far.
    t = kvcore.TokenBuffer([1, 2])
    assert t.update_and_fetch([]).tolist() == [1, 2]
    assert t.update_and_fetch([3]).tolist() == [1, 2, 3]
    assert kvcore.TokenBuffer().update_and_fetch([]).tolist() == []


def test_token_buffer_step_and_errors():
    t = kvcore.TokenBuffer()
    t.step = 4
    t.update_and_fetch([1, 2, 3, 4, 5])
    assert t.state.shape == (8,)
    with pytest.raises(kvcore.CacheValueError, match=r"tokens as ints but got 'a'"):
        t.update_and_fetch([1, "a"])
    with pytest.raises(kvcore.CacheValueError, match=r"tokens within int32"):
        t.update_and_fetch([1 << 40])
    assert t.tokens.tolist() == [1, 2, 3, 4, 5]


# -- PromptTrie ----------------------------------------------------------------


def random_tokens(rng, alphabet=4, max_len=8):
    return [rng.randrange(alphabet) for _ in range(rng.randrange(max_len + 1))]


def same_result(a, b):
    return (a.model, a.exact, a.shorter, a.longer, a.common_prefix) == (
        b.model, b.exact, b.shorter, b.longer, b.common_prefix)


@pytest.mark.parametrize("seed", range(6))
def test_trie_matches_mlx_lm_on_random_operations(seed):
    # Small alphabets and short sequences make shared prefixes, splits,
    # merges, ties among equally short extensions and the quirks (a value at
    # a one-token prefix is no "shorter") all common.
    rng = random.Random(seed)
    ours, theirs = kvcore.PromptTrie(), ref.PromptTrie()
    stored = {}
    models = ["m1", ("m2", None)]
    for step in range(600):
        model = rng.choice(models)
        toks = random_tokens(rng)
        op = rng.random()
        if op < 0.35:
            assert ours.add(model, toks, step) == theirs.add(model, toks, step)
            stored[(str(model), tuple(toks))] = (model, toks)
        elif op < 0.5 and stored:
            m, t = stored.pop(rng.choice(sorted(stored)))
            assert ours.pop(m, t) == theirs.pop(m, t)
        elif op < 0.55 and stored:
            m, t = rng.choice(sorted(stored.values(), key=str))
            assert ours.pop_prefixes(m, t) == theirs.pop_prefixes(m, t)
            for i in range(len(t)):
                stored.pop((str(m), tuple(t[:i])), None)
        else:
            if model not in [m for m, _ in stored.values()] and rng.random() < 0.5:
                model = "unknown"
            assert same_result(ours.search(model, toks), theirs.search(model, toks)), (model, toks)
        for m, t in list(stored.values())[:5]:
            assert ours.get(m, t) == theirs.get(m, t)


def test_trie_missing_entries_raise_key_error():
    t = kvcore.PromptTrie()
    t.add("m", [1, 2, 3], "v")
    with pytest.raises(KeyError):
        t.get("m", [1, 2])
    with pytest.raises(KeyError):
        t.pop("m", [1, 2, 4])
    assert t.get("m", [1, 2, 3]) == "v"
    r = t.search("m", [1, 2, 9])
    assert isinstance(r, kvcore.PromptTrieResult)
    assert (r.exact, r.shorter, r.longer, r.common_prefix) == (None, None, [1, 2, 3], 2)


def test_trie_long_sequences():
    # A 32k-token entry is one run: adding a diverging one splits it once.
    t, r = kvcore.PromptTrie(), ref.PromptTrie()
    a = list(range(32768))
    b = a[:20000] + [7] * 10
    for trie in (t, r):
        trie.add("m", a, "a")
        trie.add("m", b, "b")
    for q in (a, b, a[:25000], b[:20005] + [1], a + [1]):
        assert same_result(t.search("m", q), r.search("m", q))


# -- LRUPromptCache ------------------------------------------------------------


class MockCache:
    """mlx-lm's test double: nbytes, trimmable or not."""

    def __init__(self, value, trimmable=True):
        self.value = value
        self._trimmable = trimmable

    @property
    def nbytes(self):
        return len(self.value)

    def __eq__(self, other):
        return isinstance(other, MockCache) and other.value == self.value

    def is_trimmable(self):
        return self._trimmable

    def trim(self, n):
        self.value = self.value[: max(0, len(self.value) - n)]
        return n


@pytest.mark.parametrize("seed", range(5))
def test_lru_matches_mlx_lm_on_random_operations(seed):
    rng = random.Random(100 + seed)
    ours = kvcore.LRUPromptCache(max_size=6, max_bytes=60)
    theirs = ref.LRUPromptCache(max_size=6, max_bytes=60)
    models = [("a", None, None), ("b", None, None)]
    for step in range(500):
        model = rng.choice(models)
        toks = random_tokens(rng, alphabet=3, max_len=7)
        op = rng.random()
        if op < 0.4:
            value = "x" * rng.randrange(1, 12)
            trimmable = rng.random() < 0.7
            kind = rng.choice(["assistant", "user", "system"])
            for lru in (ours, theirs):
                lru.insert_cache(model, toks, [MockCache(value, trimmable)], cache_type=kind)
        elif op < 0.45:
            n_seq = rng.choice([None, rng.randrange(8)])
            n_bytes = rng.choice([None, rng.randrange(80)])
            ours.trim_to(n_sequences=n_seq, n_bytes=n_bytes)
            theirs.trim_to(n_sequences=n_seq, n_bytes=n_bytes)
        else:
            c1, t1 = ours.fetch_nearest_cache(model, toks)
            c2, t2 = theirs.fetch_nearest_cache(model, toks)
            assert t1 == t2
            assert c1 == c2
        assert len(ours) == len(theirs)
        assert ours.nbytes == theirs.nbytes
        assert ours.stats_by_type() == theirs.stats_by_type()


def test_fetched_cache_is_independent():
    lru = kvcore.LRUPromptCache()
    c = kvcore.KVCache()
    c.update_and_fetch(mx.ones((1, 1, 4, 2)), mx.ones((1, 1, 4, 2)))
    lru.insert_cache("m", [1, 2, 3, 4], [c])
    got, rest = lru.fetch_nearest_cache("m", [1, 2, 9])
    assert rest == [9] and got[0].offset == 2
    got[0].update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
    again, _ = lru.fetch_nearest_cache("m", [1, 2, 3, 4])
    assert again[0].offset == 4 and again[0].keys_and_values()[0].sum().item() == 8


def test_lru_limits_and_attributes():
    lru = kvcore.LRUPromptCache()
    assert lru.max_size == 10 and lru.max_bytes == 1 << 63
    lru.max_size = 2
    for i in range(4):
        lru.insert_cache("m", [i, i], [MockCache("ab")])
    assert len(lru) == 2 and lru.nbytes == 4
    with pytest.raises(kvcore.CacheKeyError, match="cache_type among assistant, user, system but got 'tool'"):
        lru.insert_cache("m", [9], [MockCache("a")], cache_type="tool")
    assert len(lru) == 2 and lru.nbytes == 4
    with pytest.raises(kvcore.CacheValueError, match="tokens as ints"):
        lru.insert_cache("m", [1.5], [MockCache("a")])
    assert len(lru) == 2


def test_lru_bad_cache_object_changes_nothing():
    lru = kvcore.LRUPromptCache()
    lru.insert_cache("m", [1], [MockCache("abc")])
    with pytest.raises(AttributeError):
        lru.insert_cache("m", [2], [object()])
    assert len(lru) == 1 and lru.nbytes == 3
    assert lru.stats_by_type()["assistant"] == {"n_sequences": 1, "n_bytes": 3}


def test_lru_under_threads():
    # Every call may run from any thread: four threads insert and fetch
    # real kvcore caches at once; afterwards the counts agree with the
    # entries and each fetched cache is whole.
    lru = kvcore.LRUPromptCache(max_size=8)

    def worker(w):
        rng = random.Random(w)
        for i in range(150):
            toks = [w] + [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:
                c = kvcore.KVCache()
                n = len(toks)
                c.update_and_fetch(mx.ones((1, 1, n, 2)), mx.ones((1, 1, n, 2)))
                lru.insert_cache("m", toks, [c])
            else:
                got, rest = lru.fetch_nearest_cache("m", toks)
                if got is not None:
                    assert got[0].offset + len(rest) == len(toks)

    errors = run_in_threads(worker)
    assert not errors
    stats = lru.stats_by_type()
    assert sum(s["n_sequences"] for s in stats.values()) == len(lru) <= 8
    assert sum(s["n_bytes"] for s in stats.values()) == lru.nbytes


def test_patch_swaps_the_server_cache():
    kvcore.patch_mlx_lm()
    try:
        import mlx_lm.server as server

        assert server.LRUPromptCache is kvcore.LRUPromptCache
        assert ref.PromptTrie is kvcore.PromptTrie and ref.TokenBuffer is kvcore.TokenBuffer
    finally:
        kvcore.unpatch_mlx_lm()
    import mlx_lm.server as server

    assert server.LRUPromptCache is not kvcore.LRUPromptCache
