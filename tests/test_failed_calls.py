"""A failed call changes nothing: the calls that once left a cache, the
prefix cache or a file half-changed, each with its exact error and the
object compared before and after. Where mlx-lm itself fails (a raw mlx
broadcast error, a silent wrong result), the test says so and checks
kvcore's result instead."""

import os

import mlx.core as mx
import mlx_lm.models.cache as ref
import mlx_lm.server as ref_server
import pytest

import kvcore
from conftest import assert_arrays_equal, assert_states_equal


def kv(B=1, H=2, S=2, D=32, dtype=mx.float32, start=0):
    x = mx.arange(start, start + B * H * S * D, dtype=mx.float32).reshape(B, H, S, D) / 64
    return x.astype(dtype)


def flat_state(cache):
    """The cache's state as a flat list of arrays and scalars."""
    out = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        else:
            out.append(x)

    walk(cache.state)
    return out


def offset_of(cache):
    o = cache.offset
    return o.tolist() if isinstance(o, mx.array) else o


def snapshot(cache):
    return flat_state(cache), offset_of(cache), cache.nbytes


def assert_unchanged(cache, before):
    state, offset, nbytes = before
    assert offset_of(cache) == offset
    assert cache.nbytes == nbytes
    got = flat_state(cache)
    assert len(got) == len(state)
    for i, (a, b) in enumerate(zip(state, got)):
        if isinstance(a, mx.array):
            assert_arrays_equal(a, b, f"state[{i}]")
        else:
            assert a == b


# 1. A failed update of the quantized caches built over three float caches.

QUANTIZED_OVER_PARTS = [
    pytest.param(lambda: kvcore.QuantizedRotatingKVCache(max_size=8, group_size=32, bits=4), 1,
                 id="QuantizedRotatingKVCache"),
    pytest.param(lambda: kvcore.BatchKVCache(left_padding=[0, 1]).to_quantized(group_size=32, bits=4), 2,
                 id="QuantizedBatchKVCache"),
    pytest.param(lambda: kvcore.BatchRotatingKVCache(max_size=8, left_padding=[0, 1])
                 .to_quantized(group_size=32, bits=4), 2, id="QuantizedBatchRotatingKVCache"),
]


@pytest.mark.parametrize("make, B", QUANTIZED_OVER_PARTS)
def test_quantized_update_of_another_dtype_changes_nothing(make, B):
    c = make()
    c.update_and_fetch(kv(B=B), kv(B=B))
    before = snapshot(c)
    name = type(c).__name__
    with pytest.raises(kvcore.CacheValueError) as e:
        c.update_and_fetch(kv(B=B, S=1, dtype=mx.float16), kv(B=B, S=1, dtype=mx.float16))
    assert str(e.value) == (f"[{name}.update_and_fetch] expected keys of dtype float32 like the "
                            "cache's but got float16")
    assert_unchanged(c, before)
    # The next good update lines up weights, scales and biases.
    keys, _ = c.update_and_fetch(kv(B=B, S=1, start=7), kv(B=B, S=1, start=7))
    assert offset_of(c) == (before[1] + 1 if B == 1 else [o + 1 for o in before[1]])
    assert len({k.shape[2] for k in keys}) == 1


def test_quantized_rotating_after_a_failed_update_matches_one_without_it():
    good = kvcore.QuantizedRotatingKVCache(max_size=8, group_size=32, bits=4)
    bad = kvcore.QuantizedRotatingKVCache(max_size=8, group_size=32, bits=4)
    for c in (good, bad):
        c.update_and_fetch(kv(), kv())
    with pytest.raises(kvcore.CacheValueError):
        bad.update_and_fetch(kv(S=1, dtype=mx.float16), kv(S=1, dtype=mx.float16))
    for c in (good, bad):
        c.update_and_fetch(kv(S=3, start=5), kv(S=3, start=5))
    assert_unchanged(bad, snapshot(good))


# 2. Capacity is checked against mlx's memory limit before it allocates.

@pytest.fixture
def memory_limit_100mb():
    old = mx.set_memory_limit(100 << 20)
    yield
    mx.set_memory_limit(old)


@pytest.mark.parametrize("capacity", [10**7, 2**31 - 1])
def test_quantized_capacity_past_the_memory_limit_is_refused(memory_limit_100mb, capacity):
    c = kvcore.QuantizedKVCache(group_size=64, bits=4, capacity=capacity)
    with pytest.raises(kvcore.CacheValueError,
                       match=r"\[QuantizedKVCache.update_and_fetch\] expected an allocation within mlx's "
                             rf"memory limit of 104857600 bytes \(\d+ in use\) but got {capacity} tokens of "):
        c.update_and_fetch(kv(D=64, S=1), kv(D=64, S=1))
    assert c.offset == 0 and c.keys is None and c.nbytes == 0
    assert mx.get_active_memory() < 100 << 20


def test_kv_capacity_past_the_memory_limit_is_refused(memory_limit_100mb):
    c = kvcore.KVCache(capacity=10**6)
    with pytest.raises(kvcore.CacheValueError, match=r"\[KVCache.update_and_fetch\] expected an allocation within mlx's memory "
                                                     r"limit of 104857600 bytes .* but got 1000000 tokens"):
        c.update_and_fetch(kv(D=64, S=1), kv(D=64, S=1))
    assert c.offset == 0 and c.keys is None


def test_merge_past_the_memory_limit_is_refused(memory_limit_100mb):
    # One long row and many empty ones: the merged batch would be B x longest.
    long = kvcore.KVCache()
    long.update_and_fetch(mx.zeros((1, 8, 4096, 64), mx.float16), mx.zeros((1, 8, 4096, 64), mx.float16))
    short = [kvcore.KVCache() for _ in range(40)]
    for c in short:
        c.update_and_fetch(kv(H=8, D=64, S=1, dtype=mx.float16), kv(H=8, D=64, S=1, dtype=mx.float16))
    with pytest.raises(kvcore.CacheValueError, match=r"\[BatchKVCache.merge\] expected an allocation within "
                                                     r"mlx's memory limit .* but got 41 rows of 4096 tokens"):
        kvcore.KVCache.merge([long] + short)


def test_a_file_past_the_memory_limit_is_refused(tmp_path):
    c = kvcore.KVCache()
    c.update_and_fetch(mx.zeros((1, 8, 2048, 64)), mx.zeros((1, 8, 2048, 64)))  # 8 MiB of arrays
    path = tmp_path / "big.safetensors"
    kvcore.save_prompt_cache(str(path), [c])
    del c
    old = mx.set_memory_limit(4 << 20)
    try:
        with pytest.raises(kvcore.CacheValueError, match=r"\[load_prompt_cache\] expected an allocation within "
                                                         r"mlx's memory limit of 4194304 bytes \(\d+ in use\) but "
                                                         r"got the file's arrays of 8388612 bytes"):
            kvcore.load_prompt_cache(str(path))
    finally:
        mx.set_memory_limit(old)
    assert kvcore.load_prompt_cache(str(path))[0].offset == 2048


# 3. A batch extended with itself doubles, as mlx-lm's does.

def test_batch_rotating_extend_with_itself_doubles():
    rows = []
    for mod in (ref, kvcore):
        b = mod.BatchRotatingKVCache(max_size=8, left_padding=[1, 0])
        b.update_and_fetch(kv(B=2, S=3, D=4), kv(B=2, S=3, D=4))
        b.extend(b)
        rows.append(b)
    r, k = rows
    assert k.keys.shape == r.keys.shape == (4, 2, 3, 4)
    assert k.offset.tolist() == r.offset.tolist() == [2, 3, 2, 3]
    assert_arrays_equal(r.keys, k.keys)
    assert_arrays_equal(r.left_padding, k.left_padding)


# 4. Paths as str, bytes or os.PathLike everywhere; anything else refused.

def test_lru_disk_dir_as_bytes_and_pathlike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given, expected in [(os.fsencode(tmp_path / "b"), tmp_path / "b"), (tmp_path / "p", tmp_path / "p")]:
        lru = kvcore.LRUPromptCache(disk_dir=given)
        assert lru.disk_dir == str(expected)
        c = kvcore.KVCache()
        c.update_and_fetch(kv(), kv())
        lru.insert_cache("m", [1, 2], [c])
        lru.flush()
        assert lru.disk_size == 1 and expected.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "p"]  # no "b'...'" directory


def test_lru_disk_dir_of_another_type_is_refused():
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.LRUPromptCache(disk_dir=3)
    assert str(e.value) == "[LRUPromptCache] expected disk_dir as str, bytes or os.PathLike but got int"


def test_files_take_bytes_and_pathlike_paths(tmp_path):
    c = kvcore.KVCache()
    c.update_and_fetch(kv(), kv())
    for path in (os.fsencode(tmp_path / "a.safetensors"), tmp_path / "b.safetensors"):
        kvcore.save_prompt_cache(path, [c], {"k": "v"})
        loaded, meta = kvcore.load_prompt_cache(path, return_metadata=True)
        assert meta == {"k": "v"}
        assert_states_equal(c.state, loaded[0].state)


@pytest.mark.parametrize("path, name", [(1, "int"), (["a"], "list")])
def test_files_refuse_paths_of_another_type(tmp_path, path, name):
    # mlx-lm raises mlx's plain ValueError here; kvcore's is a CacheValueError.
    c = kvcore.KVCache()
    c.update_and_fetch(kv(), kv())
    with pytest.raises(ValueError):
        ref.save_prompt_cache(path, [c])
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.save_prompt_cache(path, [c])
    assert str(e.value) == f"[save_prompt_cache] expected file_name as str, bytes or os.PathLike but got {name}"
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.load_prompt_cache(path)
    assert str(e.value) == f"[load_prompt_cache] expected file_name as str, bytes or os.PathLike but got {name}"


# 5-7. LRUPromptCache's arguments.

def filled(n=2):
    c = kvcore.KVCache()
    c.update_and_fetch(kv(S=n), kv(S=n))
    return [c]


def lru_view(lru, probes=((("m"), [1, 2]), (None, [1, 2]), ("m", [1, 2, 3]), ("m", [5]))):
    """What an LRUPromptCache shows: its sizes and what fixed fetches return."""
    fetched = []
    for model, tokens in probes:
        cache, rest = lru.fetch_nearest_cache(model, tokens)
        fetched.append((None if cache is None else [flat_state(c) for c in cache], rest))
    return len(lru), lru.nbytes, lru.n_checkpoints, fetched


def assert_same_view(a, b):
    assert a[:3] == b[:3]
    for (ca, ra), (cb, rb) in zip(a[3], b[3]):
        assert ra == rb
        assert (ca is None) == (cb is None)
        for sa, sb in zip(ca or [], cb or []):
            for x, y in zip(sa, sb):
                assert_arrays_equal(x, y) if isinstance(x, mx.array) else x == y


def test_prompt_cache_generator_is_refused_and_nothing_stored():
    lru = kvcore.LRUPromptCache()
    lru.insert_cache("m", [1, 2], filled())
    before = lru_view(lru)
    caches = filled(3)
    with pytest.raises(kvcore.CacheTypeError) as e:
        lru.insert_cache("m", [1, 2, 3], (c for c in caches))
    assert isinstance(e.value, TypeError)
    assert str(e.value) == ("[LRUPromptCache.insert_cache] expected prompt_cache as a list or tuple of caches "
                            "but got generator")
    with pytest.raises(kvcore.CacheTypeError, match=r"\[LRUPromptCache.insert_checkpoint\] expected prompt_cache "
                                                    "as a list or tuple of caches but got generator"):
        lru.insert_checkpoint("m", [1, 2, 3], (c for c in caches))
    assert_same_view(before, lru_view(lru))


def test_prompt_cache_as_tuple_is_taken_as_mlx_lm_takes_it():
    mine, theirs = kvcore.LRUPromptCache(), ref_server.LRUPromptCache()
    for lru in (mine, theirs):
        lru.insert_cache("m", [1, 2], tuple(filled()))
    assert len(mine) == len(theirs) == 1 and mine.nbytes == theirs.nbytes
    assert mine.fetch_nearest_cache("m", [1, 2, 3])[1] == theirs.fetch_nearest_cache("m", [1, 2, 3])[1] == [3]


def test_none_model_key_as_mlx_lm():
    mine, theirs = kvcore.LRUPromptCache(), ref_server.LRUPromptCache()
    for lru in (mine, theirs):
        lru.insert_cache(None, [1, 2], filled())
    got, want = mine.fetch_nearest_cache(None, [1, 2, 7]), theirs.fetch_nearest_cache(None, [1, 2, 7])
    assert got[1] == want[1] == [7]
    assert got[0][0].offset == want[0][0].offset == 2
    assert_arrays_equal(want[0][0].keys[..., :2, :], got[0][0].keys[..., :2, :])
    assert mine.fetch_nearest_cache("None", [1, 2])[0] is None  # a key, not its repr
    trie = kvcore.PromptTrie()
    assert trie.add(None, [1], "v") is None
    assert trie.get(None, [1]) == "v" and trie.pop(None, [1]) == "v"
    assert trie.pop_prefixes(None, [1, 2]) == []


@pytest.mark.parametrize("cache_type, shown", [(None, "None"), (b"user", "b'user'"), ("tool", "'tool'"), (3, "3")])
def test_cache_type_not_known_is_one_key_error(cache_type, shown):
    theirs = ref_server.LRUPromptCache()
    with pytest.raises(KeyError):
        theirs.insert_cache("m", [1], filled(1), cache_type=cache_type)
    lru = kvcore.LRUPromptCache()
    lru.insert_cache("m", [1, 2], filled())
    before = lru_view(lru)
    with pytest.raises(kvcore.CacheKeyError) as e:
        lru.insert_cache("m", [1, 2, 3], filled(3), cache_type=cache_type)
    assert isinstance(e.value, KeyError) and isinstance(e.value, kvcore.CacheError)
    assert str(e.value) == ("[LRUPromptCache.insert_cache] expected cache_type among assistant, user, system "
                            f"but got {shown}")
    assert_same_view(before, lru_view(lru))


# 8. save_prompt_cache's metadata.

@pytest.mark.parametrize("metadata, actual", [
    ({"a": 1}, "an item 'a': 1"),
    ({"a": None}, "an item 'a': None"),
    ({1: "a"}, "an item 1: 'a'"),
    (object(), "object"),
    # mlx-lm stores these as trees of strings and loads them back as lists
    # or a string, not the dict its docstring promises; kvcore refuses them.
    (["a"], "list"),
    ("ab", "str"),
    (("a", "b"), "tuple"),
])
def test_metadata_not_a_dict_of_strings_is_refused(tmp_path, metadata, actual):
    path = tmp_path / "c.safetensors"
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.save_prompt_cache(path, filled(), metadata)
    assert str(e.value) == f"[save_prompt_cache] expected metadata as a dict of str to str but got {actual}"
    assert not path.exists()


def test_metadata_none_or_any_mapping(tmp_path):
    import types

    path = tmp_path / "c.safetensors"
    for metadata, want in [(None, {}), (types.MappingProxyType({"x": "y"}), {"x": "y"})]:
        kvcore.save_prompt_cache(path, filled(), metadata)
        assert kvcore.load_prompt_cache(path, return_metadata=True)[1] == want
        assert ref.load_prompt_cache(str(path), return_metadata=True)[1] == want


# 9. Where mlx-lm ends in a raw broadcast error, kvcore finishes the job.

def test_right_padding_follows_filter():
    # mlx-lm: finalize() after filter([0]) silently restores the second row.
    theirs = ref.BatchKVCache(left_padding=[0, 0])
    theirs.prepare(right_padding=[1, 0])
    theirs.update_and_fetch(kv(B=2, S=3, D=2), kv(B=2, S=3, D=2))
    theirs.filter([0])
    theirs.finalize()
    assert theirs.offset.tolist() == [2, 3]  # two rows for a batch of one

    b = kvcore.BatchKVCache(left_padding=[0, 0])
    b.prepare(right_padding=[1, 0])
    b.update_and_fetch(kv(B=2, S=3, D=2), kv(B=2, S=3, D=2))
    b.filter([0])
    b.finalize()
    assert b.offset.tolist() == [2] and b.left_padding.tolist() == [1]
    one = kvcore.BatchKVCache(left_padding=[0])
    one.prepare(right_padding=[1])
    one.update_and_fetch(kv(B=1, S=3, D=2), kv(B=1, S=3, D=2))
    one.finalize()
    assert_states_equal(one.state, b.state)


def right_padded_then_extended(mod):
    """A right-padded batch of two extended by a batch of one."""
    b = mod.BatchKVCache(left_padding=[0, 0])
    b.prepare(right_padding=[1, 0])
    b.update_and_fetch(kv(B=2, S=3, D=2), kv(B=2, S=3, D=2))
    o = mod.BatchKVCache(left_padding=[0])
    o.update_and_fetch(kv(B=1, S=3, D=2, start=50), kv(B=1, S=3, D=2, start=50))
    b.extend(o)
    return b, o


def test_right_padding_follows_extend():
    # mlx-lm: a broadcast error in finalize().
    theirs, _ = right_padded_then_extended(ref)
    with pytest.raises(ValueError, match="broadcast"):
        theirs.finalize()

    b, o = right_padded_then_extended(kvcore)
    b.finalize()
    assert b.offset.tolist() == [2, 3, 3] and b.left_padding.tolist() == [1, 0, 0]
    # Row 0 rolled by its padding; the extended row untouched.
    assert_arrays_equal(b.keys[2:], o.keys)


def test_rotating_lengths_follow_filter_and_extend():
    def prepared():
        b = kvcore.BatchRotatingKVCache(max_size=8, left_padding=[0, 0])
        b.prepare(lengths=[2, 3], right_padding=[1, 0])
        b.update_and_fetch(kv(B=2, S=3, D=2), kv(B=2, S=3, D=2))
        return b

    b = prepared()
    b.filter([0])
    b.finalize()
    whole = prepared()
    whole.finalize()
    assert b.offset.tolist() == [whole.offset.tolist()[0]]
    assert_arrays_equal(b.keys, whole.keys[:1])
    b = prepared()
    o = kvcore.BatchRotatingKVCache(max_size=8, left_padding=[0])
    o.update_and_fetch(kv(B=1, S=3, D=2, start=50), kv(B=1, S=3, D=2, start=50))
    b.extend(o)
    b.finalize()
    assert b.offset.tolist() == whole.offset.tolist() + [3]
    assert_arrays_equal(b.keys[:2], whole.keys)
    assert_arrays_equal(b.keys[2:], o.keys)


def rotating_with_short_ring():
    """A window of 4 given 5 tokens, then none: offset 5, three tokens held."""
    out = []
    for mod in (ref, kvcore):
        r = mod.RotatingKVCache(max_size=4)
        r.update_and_fetch(kv(S=5, D=2), kv(S=5, D=2))
        r.update_and_fetch(kv(S=0, D=2), kv(S=0, D=2))
        out.append(r)
    return out


def test_rotating_merge_takes_the_tokens_the_ring_holds():
    theirs, mine = rotating_with_short_ring()
    assert theirs.offset == mine.offset == 5 and theirs.keys.shape[2] == mine.keys.shape[2] == 3
    with pytest.raises(ValueError, match="broadcast"):  # mlx-lm
        ref.RotatingKVCache.merge([theirs, theirs])
    b = kvcore.RotatingKVCache.merge([mine, mine])
    assert b.offset.tolist() == [5, 5] and b.left_padding.tolist() == [0, 0]
    assert_arrays_equal(b.keys[:1], mine.keys)
    assert_arrays_equal(b.extract(1).keys, mine.keys)


def test_rotating_merge_after_offset_set_past_the_buffer():
    r = kvcore.RotatingKVCache(max_size=4)
    r.update_and_fetch(kv(S=3, D=2), kv(S=3, D=2))
    r.offset = 10
    b = kvcore.RotatingKVCache.merge([r])
    assert b.offset.tolist() == [10] and b.keys.shape == (1, 2, 3, 2)
    assert_arrays_equal(b.keys, r.keys)


def test_ring_growth_past_the_memory_limit_is_refused(memory_limit_100mb):
    # A step set by the caller (a class attribute, as in mlx-lm) sizes the growth.
    class Huge(kvcore.RotatingKVCache):
        step = 10**8

    r = Huge(max_size=10**8)
    with pytest.raises(kvcore.CacheValueError,
                       match=r"\[RotatingKVCache.update_and_fetch\] expected an allocation within mlx's memory "
                             r"limit of 104857600 bytes \(\d+ in use\) but got 100000000 slots of 102400000000 bytes"):
        r.update_and_fetch(kv(D=64, S=1), kv(D=64, S=1))
    assert r.offset == 0 and r.keys is None
