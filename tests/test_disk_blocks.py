"""The disk tier's blocks: the plain KVCache layers' keys and values as
chained blocks of disk_block_tokens tokens, each written once and shared by
every entry through it, checked on every read, served bit for bit as memory
serves them, by any process on the directory."""

import os
import random
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from test_disk_faults import HERE, assert_same, entry_files, hybrid, run_python

import kvcore

MODEL = ("model-a", None, None)
B = 256


def kv_caches(tokens, layers=2, heads=2, dim=8, dtype=mx.float16):
    """KVCaches whose keys and values are a function of the tokens (as a
    model's are), distinct per layer and head."""
    n = len(tokens)
    t = mx.array(tokens, dtype=mx.float32).reshape(1, 1, n, 1)
    out = []
    for layer in range(layers):
        k = (t * 0.001 + mx.arange(heads * dim).reshape(1, heads, 1, dim) + layer).astype(dtype)
        c = kvcore.KVCache()
        c.update_and_fetch(k, -k)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def cache_bytes(caches):
    return sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in caches)


def blocks(d):
    return [f for f in entry_files(d) if f.startswith("blk-")]


def tails(d):
    return [f for f in entry_files(d) if not f.startswith("blk-")]


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def prompt(n, seed=0):
    return random.Random(seed).choices(range(50000), k=n)


def test_a_growing_conversation_writes_each_block_once(tmp_path):
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert lru.disk_block_tokens == B
    toks, seen, written = [], {}, 0
    for turn in range(8):
        toks = toks + prompt(B, seed=turn)
        lru.insert_cache(MODEL, toks, kv_caches(toks, dim=64))
        lru.flush()
        for f in os.listdir(tmp_path):  # every file is new or unchanged
            size = os.path.getsize(tmp_path / f)
            if f not in seen:
                seen[f] = size
                written += size
            assert seen[f] == size
        assert len(blocks(tmp_path)) == turn + 1
        assert len(tails(tmp_path)) == 1  # the prefix's tail went: the longer entry serves it
    final = cache_bytes(kv_caches(toks, dim=64))
    assert written <= 1.1 * final
    assert dir_bytes(tmp_path) <= 1.05 * final
    assert lru.disk_nbytes == dir_bytes(tmp_path)
    # Served after a restart, its tail holding no keys (a whole last block).
    got, rest = kvcore.LRUPromptCache(disk_dir=tmp_path).fetch_nearest_cache(MODEL, toks + [7])
    assert rest == [7]
    assert_same(got, kv_caches(toks, dim=64))


def test_shared_prefixes_are_stored_once(tmp_path):
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    shared = prompt(4 * B)
    for i in range(6):
        toks = shared + prompt(B + 100, seed=100 + i)
        lru.insert_cache(MODEL, toks, kv_caches(toks))
    lru.flush()
    assert lru.disk_blocks == 4 + 6 and len(tails(tmp_path)) == 6
    one = kvcore.LRUPromptCache(disk_dir=tmp_path / "one")
    toks = shared + prompt(B + 100, seed=100)
    one.insert_cache(MODEL, toks, kv_caches(toks))
    one.flush()
    # The shared part once; each other conversation adds its own part (and a tail).
    assert dir_bytes(tmp_path) <= dir_bytes(tmp_path / "one") * (1 + 5 * (B + 100) / len(toks)) + 5 * 8192


@pytest.mark.parametrize("hybrid_caches", [False, True])
def test_served_from_blocks_as_memory_serves(tmp_path, hybrid_caches):
    make = hybrid if hybrid_caches else kv_caches
    base = prompt(3 * B + 40)
    # The last entry's caches hold one token fewer than its key (as a server stores
    # prompt and reply before the reply's last token is run).
    other = prompt(4 * B, seed=10)
    entries = [base, base[: 2 * B] + prompt(50, seed=7), base[:B] + prompt(2 * B, seed=8), other + [3]]
    memory = kvcore.LRUPromptCache(max_size=100)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        for toks in entries:
            held = toks[:-1] if toks[-1] == 3 else toks
            w.insert_cache(MODEL, toks, make(held))
            memory.insert_cache(MODEL, toks, make(held))
    assert len(blocks(tmp_path)) == 3 + 1 + 1 + 4  # the shared first blocks once
    queries = entries + [base + [1, 2], base[: 2 * B + 10] + [5], base[: B + 3], prompt(300, seed=9),
                         other[: B + 7] + [4], other[:B] + [4], other + [4]]
    for q in queries:
        disk = kvcore.LRUPromptCache(disk_dir=tmp_path)  # after a restart: all from disk
        got, rest = disk.fetch_nearest_cache(MODEL, q)
        want, want_rest = memory.fetch_nearest_cache(MODEL, q)
        assert rest == want_rest
        assert (got is None) == (want is None)
        if got is not None:
            assert_same(got, want)
            if not hybrid_caches:
                assert_same(got, kv_caches(q[: got[0].offset]))
        if q == other[:B] + [4] and not hybrid_caches:
            assert disk.disk_blocks_read == 1  # only the block it needs
        assert disk.disk_errors == []


def test_a_prompt_sharing_part_of_a_chain_reads_only_its_blocks(tmp_path):
    long = prompt(6 * B + 9)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, long, kv_caches(long))
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    q = long[: B + 20] + [1, 2, 3]
    got, rest = lru.fetch_nearest_cache(MODEL, q)
    assert rest == [1, 2, 3] and lru.disk_blocks_read == 2
    assert_same(got, kv_caches(long[: B + 20]))
    # The part read is kept in memory and serves again; all of it is read when needed.
    got, rest = lru.fetch_nearest_cache(MODEL, long[: 2 * B] + [5])
    assert rest == [5] and lru.disk_blocks_read == 2
    assert_same(got, kv_caches(long[: 2 * B]))
    got, rest = lru.fetch_nearest_cache(MODEL, long)
    assert rest == [] and lru.disk_blocks_read == 2 + 4  # the first two from memory
    assert_same(got, kv_caches(long))


def test_whole_entry_files_are_read(tmp_path):
    toks = prompt(2 * B + 5)
    with kvcore.LRUPromptCache(disk_dir=tmp_path, disk_block_tokens=0) as w:
        w.insert_cache(MODEL, toks, kv_caches(toks))
    assert blocks(tmp_path) == [] and len(tails(tmp_path)) == 1
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = lru.fetch_nearest_cache(MODEL, toks)
    assert rest == []
    assert_same(got, kv_caches(toks))
    with pytest.raises(kvcore.CacheValueError, match="disk_block_tokens from 0 to 65536"):
        kvcore.LRUPromptCache(disk_dir=tmp_path, disk_block_tokens=-1)


def corrupt(path, at=-3):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 1
    open(path, "wb").write(data)


def block_of(d, toks, j):
    """The file of block j of toks's chain (the one holding toks[j*B])."""
    for f in blocks(d):
        h = kvcore_header(os.path.join(d, f))
        if h["kvcore.index"] == str(j) and h["kvcore.tokens.0"] == ",".join(map(str, toks[j * B:(j + 1) * B])):
            return os.path.join(d, f)
    raise AssertionError("no such block")


def kvcore_header(path):
    import json
    import struct
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


def test_blocks_memory_holds_are_not_read_again(tmp_path):
    shared = prompt(2 * B)
    a, b = shared + prompt(30, seed=1), shared + prompt(30, seed=2)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, a, kv_caches(a))
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    lru.insert_cache(MODEL, b, kv_caches(b))  # the shared blocks are in memory now
    lru.flush()
    corrupt(block_of(tmp_path, a, 0))  # changed in place: a read would refuse it
    got, rest = lru.fetch_nearest_cache(MODEL, a)
    assert rest == []
    assert_same(got, kv_caches(a))
    assert lru.disk_errors == [] and lru.disk_blocks_read == 0
    # Without them in memory, the block is read, refused and never served.
    fresh = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = fresh.fetch_nearest_cache(MODEL, a)
    assert got is None and rest == a
    (err,) = fresh.disk_errors
    assert err.startswith("blk-") and ": [LRUPromptCache disk block] expected file contents hashing to " in err


def test_damaged_blocks_are_refused_with_their_reason(tmp_path):
    toks = prompt(5 * B + 7)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, toks, kv_caches(toks))
    paths = [block_of(tmp_path, toks, j) for j in range(5)]
    names = [os.path.basename(p) for p in paths]
    corrupt(paths[4])  # a bit of the keys: found when read
    with open(paths[3], "r+b") as fh:  # truncated
        fh.truncate(300)
    # Misnamed: block 1's file under block 2's chain.
    misnamed = names[2][:21] + names[1][21:]
    os.replace(paths[1], tmp_path / misnamed)
    # A header whose tokens were altered no longer hashes to its chain.
    data = open(paths[0], "rb").read()
    t0 = str(toks[0]).encode()
    pos = data.index(b'"0.kvcore.tokens.0":"' + t0) + len(b'"0.kvcore.tokens.0":"')
    other = str((toks[0] + 1) % 10 ** len(t0)).rjust(len(t0), "1").encode()
    open(paths[0], "wb").write(data[:pos] + other + data[pos + len(t0):])
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    errs = dict(e.split(": ", 1) for e in lru.disk_errors)
    assert errs[names[3]].startswith("[load_prompt_cache]")
    assert errs[misnamed].startswith("[LRUPromptCache disk tier] expected a block file named for its chain " +
                                     names[1][4:20])
    assert errs[names[0]].startswith("[LRUPromptCache disk block] expected a chain hash of its parent, model, "
                                     "layout and tokens")
    assert set(os.listdir(tmp_path)) == {names[2], names[4]} | set(tails(tmp_path))  # refused files deleted
    got, rest = lru.fetch_nearest_cache(MODEL, toks)
    assert got is None and rest == toks  # a chain with a hole serves nothing
    # The flipped bit is found when its block is read.
    lru2 = kvcore.LRUPromptCache(disk_dir=tmp_path / "again")
    lru2.insert_cache(MODEL, toks, kv_caches(toks))
    lru2.flush()
    corrupt(block_of(tmp_path / "again", toks, 4))
    lru2 = kvcore.LRUPromptCache(disk_dir=tmp_path / "again")
    got, rest = lru2.fetch_nearest_cache(MODEL, toks)
    assert got is None
    (err,) = lru2.disk_errors
    assert err.startswith(os.path.basename(block_of(tmp_path, toks, 4))[:21])
    assert "expected file contents hashing to" in err
    assert lru2.disk_size == 0 and len(blocks(tmp_path / "again")) == 4  # it, and the tail after it, went


def test_a_block_deleted_while_indexed_is_a_miss(tmp_path):
    toks = prompt(3 * B)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, toks, kv_caches(toks))
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    os.remove(block_of(tmp_path, toks, 1))
    got, rest = lru.fetch_nearest_cache(MODEL, toks)
    assert got is None and rest == toks and lru.disk_errors == []


def test_disk_bytes_evicts_least_recently_used_leaving_no_hole(tmp_path):
    one = kvcore.LRUPromptCache(disk_dir=tmp_path / "one")
    toks = prompt(2 * B + 10)
    one.insert_cache(MODEL, toks, kv_caches(toks))
    one.flush()
    bound = int(2.5 * dir_bytes(tmp_path / "one"))
    lru = kvcore.LRUPromptCache(max_size=1, disk_dir=tmp_path / "d", disk_bytes=bound)
    entries = [prompt(2 * B + 10, seed=i) for i in range(6)]
    for i, toks in enumerate(entries):
        lru.insert_cache(MODEL, toks, kv_caches(toks))
        lru.flush()
        if i >= 1:  # the second one is read (by another tier: its mtime) after each write: it stays
            time.sleep(0.02)  # a tick of the filesystem's clock apart
            assert kvcore.LRUPromptCache(disk_dir=tmp_path / "d").fetch_nearest_cache(MODEL, entries[1])[1] == []
            time.sleep(0.02)
    assert dir_bytes(tmp_path / "d") <= bound
    fresh = kvcore.LRUPromptCache(disk_dir=tmp_path / "d")
    served = []
    for i, toks in enumerate(entries):
        got, rest = fresh.fetch_nearest_cache(MODEL, toks)
        if got is not None:
            assert rest == []
            assert_same(got, kv_caches(toks))
            served.append(i)
    assert served == [1, 5] and fresh.disk_errors == []
    # No hole: every block left is a chain's first or follows one left.
    heads = [kvcore_header(tmp_path / "d" / f) for f in blocks(tmp_path / "d")]
    chains = {h["kvcore.chain"] for h in heads}
    assert len(heads) >= 4 and all(h["kvcore.index"] == "0" or h["kvcore.parent"] in chains for h in heads)


SERVE_AND_WRITE = """
import kvcore, json
from test_disk_blocks import kv_caches, prompt, MODEL
from test_disk_faults import assert_same
d, mine, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
lru = kvcore.LRUPromptCache(disk_dir=d)
got, rest = lru.fetch_nearest_cache(MODEL, theirs)
if got is not None:
    assert_same(got, kv_caches(theirs[: got[0].offset]))
print(len(theirs) - len(rest))
lru.insert_cache(MODEL, mine, kv_caches(mine))
lru.close()
assert lru.disk_errors == [], lru.disk_errors
"""


def test_two_processes_serve_each_others_blocks(tmp_path):
    import json
    shared = prompt(3 * B)
    a, b = shared + prompt(B + 20, seed=1), shared + prompt(B + 30, seed=2)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)  # open while the other writes
    out = run_python(SERVE_AND_WRITE, [str(tmp_path), json.dumps(b), json.dumps(a)])
    assert out.stdout.split() == ["0"]
    got, rest = lru.fetch_nearest_cache(MODEL, b)  # its blocks, without a restart
    assert rest == []
    assert_same(got, kv_caches(b))
    assert lru.disk_blocks_read == 4
    lru.insert_cache(MODEL, a, kv_caches(a))
    lru.flush()
    assert lru.disk_blocks == 3 + 1 + 1
    out = run_python(SERVE_AND_WRITE, [str(tmp_path), json.dumps(b), json.dumps(a)])
    assert out.stdout.split() == [str(len(a))]
    # Two at once writing the same blocks: one file each, nothing refused.
    c = shared + prompt(2 * B, seed=3)
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r})\n" + SERVE_AND_WRITE,
                               str(tmp_path), json.dumps(c), json.dumps(c)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert lru.disk_blocks == 3 + 1 + 1 + 2 and len(blocks(tmp_path)) == 7
    got, rest = lru.fetch_nearest_cache(MODEL, c)
    assert rest == []
    assert_same(got, kv_caches(c))
    assert lru.disk_errors == []


def test_a_full_disk_ends_block_writes_with_an_error_and_memory_serves(tmp_path):
    # RLIMIT_FSIZE makes writes past 20000 bytes fail (EFBIG), as a full disk fails with ENOSPC:
    # the blocks are not written, so neither is the tail that would follow them.
    code = (
        "import resource, os, kvcore\n"
        "from test_disk_blocks import kv_caches, prompt, MODEL, B\n"
        "from test_disk_faults import assert_same\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "lru = kvcore.LRUPromptCache(disk_dir=sys.argv[1])\n"
        "toks = prompt(2 * B + 5)\n"
        "lru.insert_cache(MODEL, toks, kv_caches(toks, dim=16))\n"
        "lru.flush()\n"
        "got, rest = lru.fetch_nearest_cache(MODEL, toks)\n"
        "assert rest == []\n"
        "assert_same(got, kv_caches(toks, dim=16))\n"
        "print(os.listdir(sys.argv[1]))\n"
        "for e in lru.disk_errors: print(e)\n"
    )
    out = run_python(code, check=False, args=[str(tmp_path)])
    assert out.returncode == 0, out.stderr
    files, *errors = out.stdout.splitlines()
    assert files == "[]"
    assert len(errors) == 3
    assert all(e.startswith(".tmp-") and ": not written: [save_prompt_cache] expected a file it can write at " in e
               and "Unable to write" in e for e in errors[:2]), errors
    assert errors[2].startswith(".tmp-") and "expected its 2 blocks on disk but got a chain with a hole" in errors[2]


QUANTIZED = {
    "affine-4": dict(group_size=64, bits=4),
    "affine-8/4": dict(group_size=32, bits=(8, 4)),
    "rotated-4/2": dict(group_size=(32, 64), bits=(4, 2), scheme="rotated-channel", window=0),
    "rotated-3-window": dict(group_size=(64, 64), bits=3, scheme="rotated-channel", window=128),
}


def q_caches(tokens, kw, dim=64):
    return [c.to_quantized(**kw) for c in kv_caches(tokens, dim=dim)]


def held(c):
    """What a cache holds: a QuantizedKVCache's triples up to its offset (its
    buffers run on) and its float residual; other caches' state."""
    if isinstance(c, kvcore.QuantizedKVCache):
        return tree_flatten((c.keys_and_values(), c.residual, c.value_residual))
    return tree_flatten(c.state)


def assert_same_state(got, want):
    """Same classes, settings, offsets and contents bit for bit."""
    assert [type(c) for c in got] == [type(c) for c in want]
    for g, w in zip(got, want):
        assert g.offset == w.offset
        if isinstance(w, kvcore.QuantizedKVCache):
            assert (g.group_size, g.bits, g.scheme, g.window) == (w.group_size, w.bits, w.scheme, w.window)
        gs, ws = held(g), held(w)
        assert [k for k, _ in gs] == [k for k, _ in ws]
        for (_, a), (_, b) in zip(gs, ws):
            if isinstance(b, mx.array):
                assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
            else:
                assert a == b


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_caches_go_to_disk_as_blocks_at_their_own_bytes(tmp_path, name):
    kw = QUANTIZED[name]
    toks = prompt(3 * B + 40)
    caches = q_caches(toks, kw)
    float_bytes = cache_bytes(kv_caches(toks, dim=64))
    with kvcore.LRUPromptCache(disk_dir=str(tmp_path)) as lru:
        lru.insert_cache(MODEL, toks, caches)
    # Blocks for the tokens whose keys are quantized (rotated-channel keeps its
    # newest tokens in float: window 128 leaves 2 whole blocks of 256).
    want_blocks = 2 if kw.get("window") == 128 else 3
    assert len(blocks(tmp_path)) == want_blocks and len(tails(tmp_path)) == 1
    # 4-bit (or fewer) keys or values with float16 scales: under 0.65x float16's bytes.
    assert dir_bytes(tmp_path) < float_bytes * 0.65
    h = kvcore_header(os.path.join(tmp_path, blocks(tmp_path)[0]))
    assert h["kvcore.layout"].startswith("2;q:" + kw.get("scheme", "affine") + ":")
    again = kvcore.LRUPromptCache(disk_dir=str(tmp_path))
    got, rest = again.fetch_nearest_cache(MODEL, toks)
    assert rest == [] and again.disk_errors == [] and again.disk_blocks_read == want_blocks
    assert_same_state(got, caches)
    # Prefixes: served as memory serves them (a trim into the chain reads only its blocks).
    memory = kvcore.LRUPromptCache()
    memory.insert_cache(MODEL, toks, q_caches(toks, kw))
    for q in (toks[: B + 20] + [1], toks[: 2 * B] + [1], toks[: 3 * B + 5] + [1]):
        disk = kvcore.LRUPromptCache(disk_dir=str(tmp_path))
        got, rest = disk.fetch_nearest_cache(MODEL, q)
        want, want_rest = memory.fetch_nearest_cache(MODEL, q)
        assert rest == want_rest == [1] and disk.disk_errors == []
        assert_same_state(got, want)


def test_quantized_blocks_are_shared_and_kept_apart_from_float_ones(tmp_path):
    kw = QUANTIZED["affine-4"]
    shared = prompt(2 * B)
    a, b = shared + prompt(B + 10, seed=1), shared + prompt(B + 10, seed=2)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, a, q_caches(a, kw))
        w.insert_cache(MODEL, b, q_caches(b, kw))
        w.flush()
        assert w.disk_blocks == 2 + 1 + 1  # the shared blocks once
        # The same tokens at other bits, or in float, are other chains.
        c = shared + prompt(B + 10, seed=4)
        w.insert_cache(MODEL, c, kv_caches(c, dim=64))
        w.insert_cache(MODEL, shared + [9], q_caches(shared + [9], QUANTIZED["affine-8/4"]))
        w.flush()
        assert w.disk_blocks == 4 + 3 + 2
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = lru.fetch_nearest_cache(MODEL, b)
    assert rest == []
    assert_same_state(got, q_caches(b, kw))
    got, rest = lru.fetch_nearest_cache(MODEL, c)
    assert rest == [] and [type(x) for x in got] == [kvcore.KVCache] * 2
    assert_same(got, kv_caches(c, dim=64))
    got, rest = lru.fetch_nearest_cache(MODEL, shared + [9])
    assert rest == []
    assert_same_state(got, q_caches(shared + [9], QUANTIZED["affine-8/4"]))
    # Blocks memory holds are not read again: b's shared blocks are in memory now.
    lru2 = kvcore.LRUPromptCache(disk_dir=tmp_path)
    lru2.insert_cache(MODEL, shared + prompt(40, seed=3), q_caches(shared + prompt(40, seed=3), kw))
    lru2.flush()
    corrupt(block_of(tmp_path, b, 0))  # a read would refuse it
    got, rest = lru2.fetch_nearest_cache(MODEL, b)
    assert rest == [] and lru2.disk_errors == [] and lru2.disk_blocks_read == 1
    assert_same_state(got, q_caches(b, kw))


def test_a_damaged_quantized_block_is_refused_and_never_served(tmp_path):
    kw = QUANTIZED["rotated-4/2"]
    toks = prompt(2 * B + 40)
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, toks, q_caches(toks, kw))
    path = block_of(tmp_path, toks, 1)
    corrupt(path)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = lru.fetch_nearest_cache(MODEL, toks + [1])
    assert got is None and rest == toks + [1]
    assert len(lru.disk_errors) == 1
    assert lru.disk_errors[0].startswith(os.path.basename(path) + ": [LRUPromptCache disk block] expected file "
                                         "contents hashing to "), lru.disk_errors
    assert not os.path.exists(path)


def test_quantized_layers_beside_other_layers_go_as_blocks(tmp_path):
    kw = QUANTIZED["affine-4"]
    toks = prompt(2 * B + 3)
    r, _ = hybrid(toks)
    q = q_caches(toks, kw)[0]
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as w:
        w.insert_cache(MODEL, toks, [r, q])
    assert len(blocks(tmp_path)) == 2
    got, rest = kvcore.LRUPromptCache(disk_dir=tmp_path).fetch_nearest_cache(MODEL, toks)
    assert rest == []
    assert_same_state(got, [r, q])


