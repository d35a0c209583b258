"""LRUPromptCache's disk tier: entries written through to checked
prompt-cache files, served again after a restart, keyed by model; bad files
skipped with the reason, never served."""

import os

import mlx.core as mx
import pytest
from test_shared_prefix import caches_for, kv_of

import kvcore

MODEL = ("model-a", None, None)


def fill(lru, n=4, model=MODEL):
    for i in range(n):
        toks = list(range(100)) + [200 + i]
        lru.insert_cache(model, toks, caches_for(kvcore.KVCache, toks))


def files(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def test_entries_outlive_eviction_and_restart(tmp_path):
    lru = kvcore.LRUPromptCache(max_size=2, disk_dir=tmp_path)
    assert lru.disk_dir == str(tmp_path)
    fill(lru)
    assert len(lru) == 2 and lru.disk_size == 4
    assert lru.disk_nbytes == sum(os.path.getsize(f) for f in files(tmp_path))
    # Evicted from memory, found on disk.
    got, rest = lru.fetch_nearest_cache(MODEL, list(range(100)) + [200, 7])
    assert rest == [7] and got[0].offset == 101
    assert kv_of(got[0])[0][0, 0, :, 0].tolist() == list(range(100)) + [200]
    assert len(lru) == 2 and lru.disk_size == 4  # back in memory, nothing rewritten
    del lru
    # A new process: the files are the index.
    again = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert again.disk_size == 4 and len(again) == 0 and again.disk_errors == []
    got, rest = again.fetch_nearest_cache(MODEL, list(range(100)) + [203])
    assert rest == [] and got[0].offset == 101 and len(again) == 1
    want = caches_for(kvcore.KVCache, list(range(100)) + [203])
    assert mx.array_equal(kv_of(got[1])[0], kv_of(want[1])[0]).item()
    # A longer entry on disk serves a prefix, trimmed.
    got, rest = again.fetch_nearest_cache(MODEL, list(range(100)) + [999, 5])
    assert rest == [999, 5] and got[0].offset == 100
    # Another model is never served these entries.
    got, rest = again.fetch_nearest_cache(("model-b", None, None), list(range(100)) + [203])
    assert got is None and len(rest) == 101


def test_bad_files_are_skipped_with_a_reason(tmp_path):
    fill(kvcore.LRUPromptCache(disk_dir=tmp_path))
    f = files(tmp_path)
    data = bytearray(open(f[0], "rb").read())
    data[-3] ^= 1  # one bit of the keys
    open(f[0], "wb").write(data)
    with open(f[1], "r+b") as fh:  # truncated
        fh.truncate(200)
    open(os.path.join(tmp_path, "0" * 16 + "-" + "1" * 16 + ".safetensors"), "wb").write(b"garbage")
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert lru.disk_size == 3  # the truncated one and the garbage never indexed, and deleted
    assert sorted(e.split(": [load_prompt_cache]")[0] for e in lru.disk_errors) == sorted(
        os.path.basename(p) for p in (f[1], os.path.join(tmp_path, "0" * 16 + "-" + "1" * 16 + ".safetensors")))
    assert len(files(tmp_path)) == 3
    served = []
    for i in range(4):
        toks = list(range(100)) + [200 + i]
        got, rest = lru.fetch_nearest_cache(MODEL, toks)
        if got is not None and rest == []:
            served.append(i)
            want = caches_for(kvcore.KVCache, toks)
            assert all(mx.array_equal(kv_of(a)[0], kv_of(b)[0]).item() for a, b in zip(got, want))
    assert len(served) == 2  # the two good files, bit for bit
    assert lru.disk_errors[-1].startswith(os.path.basename(f[0]) + ": [LRUPromptCache disk tier] expected file "
                                          "contents hashing to")
    assert lru.disk_size == 2 and len(files(tmp_path)) == 2


def test_another_models_file_under_this_models_name_is_refused(tmp_path):
    # A file moved to the name of another model's entry fails its checks.
    fill(kvcore.LRUPromptCache(disk_dir=tmp_path / "a"), n=1)
    fill(kvcore.LRUPromptCache(disk_dir=tmp_path / "b"), n=1, model=("model-b", None, None))
    (a,), (b,) = files(tmp_path / "a"), files(tmp_path / "b")
    os.replace(b, a)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path / "a")
    assert lru.disk_size == 0
    assert "expected a file named for its model and tokens" in lru.disk_errors[0]


def test_disk_bytes_keeps_the_newest_files(tmp_path):
    probe = kvcore.LRUPromptCache(disk_dir=tmp_path / "probe")
    fill(probe, n=1)
    one = probe.disk_nbytes
    lru = kvcore.LRUPromptCache(max_size=1, disk_dir=tmp_path / "d", disk_bytes=2 * one + 10)
    fill(lru)
    assert lru.disk_size == 2 and lru.disk_nbytes == 2 * one
    # The oldest two are gone from disk and memory.
    got, rest = lru.fetch_nearest_cache(MODEL, list(range(100)) + [200])
    assert rest == [200] and got[0].offset == 100  # a newer one, trimmed
    assert len(files(tmp_path / "d")) == 2


def test_disk_dir_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(kvcore.CacheValueError, match="a directory it can create or use"):
        kvcore.LRUPromptCache(disk_dir=tmp_path / "file")
    with pytest.raises(kvcore.CacheValueError, match="disk_dir as a directory path or None"):
        kvcore.LRUPromptCache(disk_dir="")
    assert kvcore.LRUPromptCache().disk_dir is None


def test_files_are_written_off_the_callers_thread_and_all_land(tmp_path):
    # insert_cache queues the file; flush() waits for it; a process that
    # exits without flushing still writes what it queued (at exit).
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    fill(lru, n=3)
    lru.flush()
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 3
    import subprocess
    import sys

    other = tmp_path / "other"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import kvcore\n"
        "from test_disk_tier import fill\n"
        "lru = kvcore.LRUPromptCache(disk_dir=%r)\n"
        "fill(lru, n=6)\n" % (os.path.dirname(__file__), str(other))
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    names = os.listdir(other)
    assert len(names) == 6 and not [n for n in names if n.startswith(".tmp-")]
    again = kvcore.LRUPromptCache(disk_dir=other)
    assert again.disk_size == 6 and again.disk_errors == []
