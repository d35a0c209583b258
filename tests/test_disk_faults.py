"""The disk tier under a hostile environment: files changed in place,
copied, forged and truncated; processes forked, killed mid-write and
sharing one directory; a full disk. Nothing wrong is ever served, and every
refusal is one line in disk_errors naming its file."""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import mlx.core as mx
from conftest import run_in_threads
import kvcore

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ("model-a", None, None)
TOKENS = list(range(20))


def hybrid(tokens=TOKENS):
    """A RotatingKVCache past its window (a prefill, then a decoded token
    into its ring) beside a KVCache; each position holds values of its
    token, as a model's would."""
    n = len(tokens)
    k = mx.array(tokens, dtype=mx.float32).reshape(1, 1, n, 1) * mx.ones((1, 2, n, 16))
    r, kv = kvcore.RotatingKVCache(max_size=8), kvcore.KVCache()
    for part in (k[:, :, : n - 1], k[:, :, n - 1 :]):
        r.update_and_fetch(part, -part)
        kv.update_and_fetch(part + 1, -part - 1)
    mx.eval(r.state, kv.state)
    return [r, kv]


def assert_same(got, want):
    assert [type(c) for c in got] == [type(c) for c in want]
    for a, b in zip(got, want):
        assert a.offset == b.offset
        n = a.offset if type(a) is kvcore.KVCache else None  # a KVCache's buffer may be longer
        for x, y in zip(a.state[:2], b.state[:2]):
            assert mx.array_equal(x[..., :n, :], y[..., :n, :]).item()


def entry_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and not f.startswith(".tmp-"))


def tail_files(d):
    """Entries' files: whole ones and tails, not their chains' blocks."""
    return [f for f in entry_files(d) if not f.startswith("blk-")]


def temp_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith(".tmp-"))


def run_python(code, args=(), check=True):
    """Run code in a fresh interpreter (tests/ on its path), args as sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r})\n" + code, *args],
                          check=check, timeout=120, capture_output=True, text=True)


def write_entry(d, tokens=TOKENS, caches=None):
    w = kvcore.LRUPromptCache(disk_dir=d)
    w.insert_cache(MODEL, tokens, caches or hybrid(tokens))
    w.flush()
    return entry_files(d)


# --- the tier's 64-bit hash, as a forger would recompute it -------------------

def tier_hash(*parts):
    """The 64-bit hash of disk_tier.cpp over byte strings, each padded to 8."""
    m = (1 << 64) - 1
    h = 0x243F6A8885A308D3

    def mix(h, w):
        h = ((h ^ w) * 0x9E3779B97F4A7C15) & m
        return h ^ (h >> 29)

    for data in parts:
        full = len(data) // 8 * 8
        for (w,) in struct.iter_unpack("<Q", data[:full]):
            h = mix(h, w)
        h = mix(h, int.from_bytes(data[full:], "little") ^ ((len(data) - full) << 56))
    return h


def entry_name(model, tokens, data):
    key = tier_hash(repr(model).encode(), struct.pack(f"<{len(tokens)}q", *tokens))
    whole = tier_hash(*[data[i:i + (1 << 20)] for i in range(0, len(data) + 1, 1 << 20)])  # 1 MB blocks, a short last
    return f"{key:016x}-{whole:016x}.safetensors"


# --- fault 1: what is loaded is evaluated where it is loaded ------------------

def test_a_cache_loaded_on_one_thread_serves_another(tmp_path):
    want = hybrid()
    write_entry(tmp_path, caches=want)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    loaded = []
    th = threading.Thread(target=lambda: loaded.append(lru.fetch_nearest_cache(MODEL, TOKENS)))
    th.start()
    th.join()
    # Was: RuntimeError: There is no Stream(cpu, N) in current thread.
    got, rest = lru.fetch_nearest_cache(MODEL, TOKENS)
    mx.eval([c.state for c in got])
    assert rest == [] and len(lru) == 1
    assert_same(got, want)
    assert_same(loaded[0][0], want)


def test_threads_fetching_a_cache_from_disk_at_once_all_get_it_whole(tmp_path):
    # Was: wrong contents, IndexError: _Map_base::at, or a segmentation fault.
    want = hybrid()
    write_entry(tmp_path, caches=want)
    for _ in range(3):
        lru = kvcore.LRUPromptCache(disk_dir=tmp_path)

        def fetch(i):
            got, rest = lru.fetch_nearest_cache(MODEL, TOKENS)
            mx.eval([c.state for c in got])
            assert rest == []
            assert_same(got, want)

        assert run_in_threads(fetch) == []


# --- fault 2: the bytes checked are the bytes served --------------------------

def test_a_file_changed_in_place_after_its_fetch_serves_nothing_wrong(tmp_path):
    want = hybrid()
    (name,) = write_entry(tmp_path, caches=want)
    path = tmp_path / name
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, _ = lru.fetch_nearest_cache(MODEL, TOKENS)
    # The data section overwritten, same length: a reader that reads the
    # file after its check would serve these bytes.
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\x7f" * (len(data) - header)
    path.write_bytes(bytes(data))
    mx.eval([c.state for c in got])
    assert_same(got, want)
    again, _ = lru.fetch_nearest_cache(MODEL, TOKENS)  # from memory now
    assert_same(again, want)


def test_a_file_changed_before_its_fetch_is_refused_and_removed(tmp_path):
    (name,) = write_entry(tmp_path)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    data = bytearray((tmp_path / name).read_bytes())
    data[-1] ^= 1
    (tmp_path / name).write_bytes(bytes(data))
    got, rest = lru.fetch_nearest_cache(MODEL, TOKENS)
    assert got is None and rest == TOKENS
    (line,) = lru.disk_errors
    assert line.startswith(f"{name}: [LRUPromptCache disk tier] expected file contents hashing to {name[17:33]}")
    assert entry_files(tmp_path) == [] and lru.disk_size == 0 and lru.disk_nbytes == 0


# --- fault 3: temporary names are unique across processes ---------------------

FORKED_WRITERS = """
import os, resource, signal
import kvcore
from test_disk_faults import hybrid
lru = kvcore.LRUPromptCache(disk_dir=sys.argv[1])
child = os.fork()
# Each process is killed by SIGXFSZ part way through its file.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
if child:
    os.waitpid(child, 0)  # one after the other: no race decides the outcome
lru.insert_cache(("model-a", None, None), list(range(20 + (child > 0))), hybrid())
lru.flush()
print("not killed")
"""


def test_processes_forked_after_creating_the_cache_write_distinct_temporary_files(tmp_path):
    got = run_python(FORKED_WRITERS, [str(tmp_path)], check=False)
    assert got.returncode == -signal.SIGXFSZ, got.stderr
    # Was: one ".tmp-<address>-0.safetensors", the second write over the first.
    temps = temp_files(tmp_path)
    assert len(temps) == 2 and entry_files(tmp_path) == []
    # Both writers are dead: the next process on the directory removes them.
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert os.listdir(tmp_path) == [] and lru.disk_size == 0
    assert sorted(lru.disk_errors) == [f"{t}: removed, left by a process that is gone" for t in temps]


# --- fault 4: a copy never displaces the original ----------------------------

def test_a_copy_under_another_hash_leaves_the_original_served(tmp_path):
    want = hybrid()
    (name,) = write_entry(tmp_path, caches=want)
    copy = name[:17] + "0" * 16 + ".safetensors"
    data = (tmp_path / name).read_bytes()
    (tmp_path / copy).write_bytes(data)
    os.utime(tmp_path / copy, ns=(os.stat(tmp_path / name).st_mtime_ns + 10**9,) * 2)  # the newer
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert lru.disk_size == 1 and lru.disk_nbytes == len(data)
    got, rest = lru.fetch_nearest_cache(MODEL, TOKENS)
    assert rest == []
    assert_same(got, want)
    assert entry_files(tmp_path) == [name]
    (line,) = lru.disk_errors
    assert line.startswith(f"{copy}: [LRUPromptCache disk tier] expected file contents hashing to {'0' * 16}")


# --- fault 5: refused files and dead writers' temporaries are removed ---------

def test_refused_files_and_dead_temporaries_are_removed_live_ones_kept(tmp_path):
    (name,) = write_entry(tmp_path)
    good = (tmp_path / name).read_bytes()
    garbage = "1" * 16 + "-" + "2" * 16 + ".safetensors"
    truncated = "3" * 16 + "-" + "4" * 16 + ".safetensors"
    (tmp_path / garbage).write_bytes(b"garbage")
    (tmp_path / truncated).write_bytes(good[:300])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = f".tmp-{host_tag()}-{int(gone.stdout)}-0123456789abcdef.safetensors"
    live = f".tmp-{host_tag()}-{os.getpid()}-fedcba9876543210.safetensors"
    other_host = f".tmp-another.host-{int(gone.stdout)}-0123456789abcdef.safetensors"
    for t in (dead, live, other_host):
        (tmp_path / t).write_bytes(b"x" * 1000)
    (tmp_path / "notes.txt").write_text("not the tier's")
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([name, live, other_host, "notes.txt"])
    assert lru.disk_size == 1 and lru.disk_nbytes == len(good)
    errors = lru.disk_errors
    assert len(errors) == 3
    assert f"{dead}: removed, left by a process that is gone" in errors
    assert any(e.startswith(f"{garbage}: [load_prompt_cache] ") for e in errors)
    assert any(e.startswith(f"{truncated}: [load_prompt_cache] ") for e in errors)


def host_tag():
    """This host's part of temporary names."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())


# --- fault 6: one line per error, naming the file ----------------------------

class Bogus(kvcore.KVCache):
    pass


def test_a_forged_file_that_fails_to_load_is_one_line_naming_it(tmp_path):
    tokens = list(range(8))
    meta = {"kvcore.entry": "1", "kvcore.model": repr(MODEL), "kvcore.type": "assistant",
            "kvcore.trimmable": "1", "kvcore.tokens": "8", "kvcore.tokens.0": ",".join(map(str, tokens))}
    c = Bogus()
    c.update_and_fetch(mx.ones((1, 1, 8, 4)), mx.ones((1, 1, 8, 4)))
    kvcore.save_prompt_cache(str(tmp_path / "forged.safetensors"), [c], meta)
    data = (tmp_path / "forged.safetensors").read_bytes()
    os.remove(tmp_path / "forged.safetensors")
    name = entry_name(MODEL, tokens, data)
    (tmp_path / name).write_bytes(data)
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert lru.disk_size == 1  # its header names an entry
    got, rest = lru.fetch_nearest_cache(MODEL, tokens)
    assert got is None and rest == tokens
    # Was: a whole Python traceback.
    assert lru.disk_errors == [f"{name}: [load_prompt_cache] expected a cache class among "
                               + ", ".join(kvcore._ext.cache_class_names()) + " but got 'Bogus'"]
    assert os.listdir(tmp_path) == []


# --- many processes, one directory -------------------------------------------

WRITE_FOREVER = """
import kvcore
from test_disk_faults import hybrid
# Files of 2 MB (writes take a while), the oldest deleted past 8 of them.
lru = kvcore.LRUPromptCache(max_size=2, disk_dir=sys.argv[1], disk_bytes=8 * 2_200_000)
i = 0
while True:
    toks = list(range(4000)) + [10000 + i]
    lru.insert_cache(("model-a", None, None), toks, hybrid(toks))
    i += 1
"""


def test_a_process_killed_at_any_moment_leaves_nothing_served_wrong(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r})\n" + WRITE_FOREVER,
                          str(tmp_path)])
    try:  # killed once it has written a few entries and is writing another file
        while len(tail_files(tmp_path)) < 3 or not temp_files(tmp_path):
            assert p.poll() is None
            threading.Event().wait(0.001)
    finally:
        p.kill()
        p.wait()
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert temp_files(tmp_path) == []
    assert lru.disk_size >= 3
    found, i = 0, 0
    while found < lru.disk_size and i < 100_000:  # every file on disk serves its own tokens
        toks = list(range(4000)) + [10000 + i]
        got, rest = lru.fetch_nearest_cache(MODEL, toks)
        if got is not None:
            assert rest == []
            assert_same(got, hybrid(toks))
            found += 1
        i += 1
    assert found == lru.disk_size >= 3
    assert [e for e in lru.disk_errors if "gone" not in e] == []
    assert any(f.startswith("blk-") for f in entry_files(tmp_path))  # the KVCache layer's blocks


def test_a_full_disk_ends_writes_with_an_error_and_serving_goes_on(tmp_path):
    # RLIMIT_FSIZE makes every write past 16000 bytes fail (EFBIG), as a
    # full disk fails with ENOSPC.
    code = (
        "import resource, os, mlx.core as mx, kvcore\n"
        "from test_disk_faults import hybrid, assert_same, MODEL\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))\n"
        "d = sys.argv[1]\n"
        "lru = kvcore.LRUPromptCache(disk_dir=d)\n"
        "small = [kvcore.KVCache()]; small[0].update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))\n"
        "lru.insert_cache(MODEL, [1, 2], small)\n"
        "for i in range(3):\n"
        "    toks = list(range(20)) + [i]\n"
        "    lru.insert_cache(MODEL, toks, hybrid(toks))\n"
        "lru.flush()\n"
        "for i in range(3):\n"
        "    toks = list(range(20)) + [i]\n"
        "    got, rest = lru.fetch_nearest_cache(MODEL, toks)\n"
        "    assert rest == []\n"
        "    assert_same(got, hybrid(toks))\n"
        "assert lru.disk_size == 1, lru.disk_size\n"
        "print('--'); print(len(os.listdir(d)))\n"
        "for e in lru.disk_errors: print(e)\n"
    )
    out = run_python(code, check=False, args=[str(tmp_path)])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("--\n")[-1].splitlines()
    assert lines[0] == "1"  # the small entry; no temporary left behind
    errors = lines[1:]
    assert len(errors) == 3
    for e in errors:
        assert e.startswith(".tmp-") and ": not written: [save_prompt_cache] expected a file it can write" in e, e
        assert "Unable to write" in e, e


def test_close_writes_the_queue_and_says_how_many_files(tmp_path):
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    for i in range(3):
        lru.insert_cache(MODEL, TOKENS + [i], hybrid(TOKENS + [i]))
    assert lru.close() == 3
    assert len(entry_files(tmp_path)) == 3
    assert lru.close() == 3  # closed once
    # Closed: memory still serves, nothing more is written.
    lru.insert_cache(MODEL, TOKENS + [9], hybrid(TOKENS + [9]))
    got, rest = lru.fetch_nearest_cache(MODEL, TOKENS + [9])
    assert rest == []
    assert_same(got, hybrid(TOKENS + [9]))
    assert len(entry_files(tmp_path)) == 3
    with kvcore.LRUPromptCache(disk_dir=tmp_path) as again:
        assert again.disk_size == 3
    assert kvcore.LRUPromptCache().close() == 0


WRITE_ENTRIES = """
import kvcore
from test_disk_faults import hybrid, MODEL
lru = kvcore.LRUPromptCache(max_size=1, disk_dir=sys.argv[1], disk_bytes=int(sys.argv[2]))
for i in range(int(sys.argv[3]), int(sys.argv[4])):
    toks = list(range(20)) + [i]
    lru.insert_cache(MODEL, toks, hybrid(toks))
lru.flush()
"""


def test_processes_on_one_directory_see_each_others_files_and_share_one_bound(tmp_path):
    (name,) = write_entry(tmp_path / "probe")
    one = os.path.getsize(tmp_path / "probe" / name)
    bound = 4 * one + one // 2
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path / "d", disk_bytes=bound)
    tmp_path = tmp_path / "d"
    # Another process writes while this one is open ...
    run_python(WRITE_ENTRIES, [str(tmp_path), str(bound), "0", "3"])
    toks = list(range(20)) + [1]
    got, rest = lru.fetch_nearest_cache(MODEL, toks)
    assert rest == []
    assert_same(got, hybrid(toks))
    assert lru.disk_size == 3
    # ... and two at once, three of their entries the same: the directory
    # keeps to the bound they share.
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r})\n" + WRITE_ENTRIES,
                               str(tmp_path), str(bound), str(a), str(a + 6)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for a in (10, 13)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    # Was: each process kept its own four files.
    sizes = [os.path.getsize(tmp_path / f) for f in entry_files(tmp_path)]
    assert sum(sizes) <= bound and len(sizes) == 4
    assert lru.disk_size == 4 and lru.disk_nbytes == sum(sizes)
    assert lru.disk_errors == []
    for i in range(10, 19):  # what is on disk is whole
        toks = list(range(20)) + [i]
        got, rest = lru.fetch_nearest_cache(MODEL, toks)
        if got is not None:
            assert rest == []
            assert_same(got, hybrid(toks))
    assert lru.disk_errors == []
