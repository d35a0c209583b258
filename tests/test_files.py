"""Prompt-cache files: kvcore.save_prompt_cache / load_prompt_cache against
mlx-lm's, and ``python -m kvcore inspect``.

* mlx-lm 0.32 layout, both ways: a file written by mlx-lm loads in kvcore
  (same class names, equal states, equal next updates), a file written by
  kvcore loads in mlx-lm, and the two files hold the same tensors and
  metadata.
* The older layout (mlx-lm 0.31.2, per-layer meta_state strings), written
  by the genuine old save_prompt_cache: kvcore reads it, mlx-lm 0.32 does
  not.
* Forged and corrupt files raise kvcore.CacheValueError (a ValueError)
  naming the fault, never crash (all of them are also loaded in a child
  process).

Deliberate difference from mlx-lm: user metadata keys containing dots
round-trip unchanged in kvcore ({"a.b": "y"}), where mlx-lm's loader
unflattens them ({"a": {"b": "y"}}).

mlx-lm 0.32.2 shortcomings pinned here (kvcore does better): it returns no
caches at all for an old-layout file without user metadata (and raises on
one with metadata), cannot load an empty ConcatenateKVCache, and the
BatchRotatingKVCache it loads cannot be updated (_lengths unset).
"""

import importlib.util
import os
import pathlib
import zipfile
import json
import struct
import subprocess
import sys
import textwrap
import types

import mlx.core as mx
import mlx_lm.models.base as ref_base
import mlx_lm.models.cache as ref
import pytest
from conftest import assert_arrays_equal, int_valued_normal

import kvcore

OLD_MLX_LM = "mlx-lm==0.31.2"


def old_cache_source(tmp_dir):
    """mlx-lm 0.31.2's models/cache.py, from its wheel: the one named by
    KVCORE_OLD_MLX_LM_WHEEL, or one kept under build/oldlm, or downloaded
    there now (PyPI). Without it the old-layout tests skip, except in CI."""
    wheel = os.environ.get("KVCORE_OLD_MLX_LM_WHEEL")
    if not wheel:
        keep = pathlib.Path(__file__).resolve().parent.parent / "build" / "oldlm"
        found = sorted(keep.glob("mlx_lm-0.31.2-*.whl"))
        if not found:
            keep.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", OLD_MLX_LM,
                 "-d", str(keep)],
                capture_output=True, text=True,
            )
            found = sorted(keep.glob("mlx_lm-0.31.2-*.whl"))
            if not found:
                message = f"{OLD_MLX_LM} could not be fetched: {proc.stderr[-300:]}"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
        wheel = found[0]
    with zipfile.ZipFile(wheel) as z:
        source = z.read("mlx_lm/models/cache.py")
    path = pathlib.Path(tmp_dir) / "old_cache.py"
    path.write_bytes(source)
    return str(path)

D = 32  # head dim: a multiple of the quantization group size

# --------------------------------------------------------------------------
# helpers


def assert_tree_equal(r, g, what="state"):
    """Nested lists/tuples of arrays, None and scalars: arrays bit for bit,
    scalars with == and the same type, containers of the same length
    (list and tuple are interchangeable: mlx-lm's loaders build lists)."""
    if isinstance(r, mx.array):
        assert_arrays_equal(r, g, what)
    elif r is None:
        assert g is None, f"{what}: expected None, got {g!r}"
    elif isinstance(r, (list, tuple)):
        assert isinstance(g, (list, tuple)), f"{what}: expected a sequence, got {type(g)!r}"
        assert len(r) == len(g), f"{what}: {len(r)} items != {len(g)} items"
        for i, (a, b) in enumerate(zip(r, g)):
            assert_tree_equal(a, b, f"{what}[{i}]")
    else:
        assert type(r) is type(g), f"{what}: type {type(r)!r} != {type(g)!r} ({r!r} vs {g!r})"
        assert r == g, f"{what}: {r!r} != {g!r}"


def snapshot(tree):
    """A copy of a state tree whose arrays no later in-place update can
    change (mlx-lm's caches write into the arrays they hand out)."""
    if isinstance(tree, mx.array):
        c = mx.array(tree)
        mx.eval(c)
        return c
    if isinstance(tree, (list, tuple)):
        return type(tree)(snapshot(x) for x in tree)
    return tree


def kv(seed, S, dtype=mx.float32, B=1, H=2):
    k = int_valued_normal(mx.random.key(seed), (B, H, S, D), dtype)
    v = int_valued_normal(mx.random.key(seed + 5000), (B, H, S, D), dtype)
    return k, v


def feed(c, sizes, seed, dtype=mx.float32, B=1):
    for i, S in enumerate(sizes):
        c.update_and_fetch(*kv(seed + i, S, dtype, B))
    return c


def arr(seed, shape, dtype=mx.float32):
    return int_valued_normal(mx.random.key(seed), shape, dtype)


KINDS = [
    "KVCache",
    "ConcatenateKVCache",
    "RotatingKVCache",
    "QuantizedKVCache",
    "ChunkedKVCache",
    "ArraysCache",
    "CacheList_KV_Arrays",
    "CacheList_Rotating_KV",
    "BatchKVCache",
    "BatchRotatingKVCache",
]


def class_of(kind):
    return "CacheList" if kind.startswith("CacheList") else kind


def build(mod, kind):
    """The same non-trivial cache, from mlx-lm's classes or kvcore's."""
    if kind == "KVCache":
        return feed(mod.KVCache(), [3, 1, 2], 10)
    if kind == "ConcatenateKVCache":
        return feed(mod.ConcatenateKVCache(), [3, 2], 20)
    if kind == "RotatingKVCache":
        c = feed(mod.RotatingKVCache(8, 2), [5] + [1] * 6, 30)
        assert c.offset == 11 and c.offset > c.max_size  # rotated
        return c
    if kind == "QuantizedKVCache":
        return feed(mod.QuantizedKVCache(group_size=32, bits=4), [3, 2], 40, mx.float16)
    if kind == "ChunkedKVCache":
        c = feed(mod.ChunkedKVCache(4), [3, 4], 50)
        c.maybe_trim_front()
        feed(c, [1], 55)
        assert c.start_position == 3 and c.offset == 8
        return c
    if kind == "ArraysCache":
        c = mod.ArraysCache(3, left_padding=[1, 0])
        c[0] = arr(60, (2, 3, 8))
        c[2] = arr(61, (2, 2, 4, 4), mx.bfloat16)  # c[1] stays None
        return c
    if kind == "CacheList_KV_Arrays":
        a = mod.ArraysCache(2)
        a[0] = arr(70, (1, 3, 8))
        a[1] = arr(71, (1, 2, 4, 4))
        return mod.CacheList(feed(mod.KVCache(), [2, 1], 72), a)
    if kind == "CacheList_Rotating_KV":
        return mod.CacheList(feed(mod.RotatingKVCache(4), [1] * 6, 80), feed(mod.KVCache(), [3], 90))
    if kind == "BatchKVCache":
        return feed(mod.BatchKVCache([1, 0]), [3, 1, 2], 100, B=2)
    if kind == "BatchRotatingKVCache":
        c = feed(mod.BatchRotatingKVCache(8, [1, 0]), [5] + [1] * 6, 110, B=2)
        assert c._offset == 11
        return c
    raise AssertionError(kind)


def advance(c, kind, seed=900):
    """The next steps a model would take on the cache; their results."""
    name = type(c).__name__
    if name == "CacheList":
        return [advance(x, type(x).__name__, seed + 10 * i) for i, x in enumerate(c.caches)]
    if name == "ArraysCache":
        out = [c[i] for i in range(len(c.cache))]
        out.append(c.make_mask(3))
        c[0] = arr(seed, c[0].shape, c[0].dtype)
        out.append(c[0])
        return snapshot(out)
    dtype = mx.float16 if name == "QuantizedKVCache" else mx.float32
    B = 2 if name.startswith("Batch") else 1
    out = [snapshot(c.update_and_fetch(*kv(seed, 1, dtype, B)))]
    out.append(snapshot(c.update_and_fetch(*kv(seed + 1, 3, dtype, B))))
    out.append(snapshot(c.offset))
    return out


def updatable_ref(r, kind):
    """The loaded mlx-lm cache r, to compare next updates against; but
    mlx-lm's BatchRotatingKVCache.from_state leaves _lengths unset, so its
    loaded caches cannot be updated (AttributeError): for that one, the
    same cache built afresh."""
    if kind == "BatchRotatingKVCache":
        with pytest.raises(AttributeError, match="_lengths"):
            r.update_and_fetch(*kv(0, 1, B=2))
        return build(ref, kind)
    return r


def assert_same_class(ref_cache, got_cache, mod):
    assert type(got_cache).__name__ == type(ref_cache).__name__
    assert isinstance(got_cache, getattr(mod, type(ref_cache).__name__))


def read_raw(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path, header, data, header_bytes=None):
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


# --------------------------------------------------------------------------
# the builders agree (the premise of every comparison below)


@pytest.mark.parametrize("kind", KINDS)
def test_builders_agree(kind):
    assert_tree_equal(build(ref, kind).state, build(kvcore, kind).state)


# --------------------------------------------------------------------------
# mlx-lm 0.32 layout, both ways


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_lm_file_loads_in_kvcore(kind, tmp_path):
    path = tmp_path / "ref.safetensors"
    r = build(ref, kind)
    ref.save_prompt_cache(str(path), [r])
    (c,) = kvcore.load_prompt_cache(str(path))
    (r2,) = ref.load_prompt_cache(str(path))
    assert type(c).__name__ == class_of(kind)
    assert_same_class(r2, c, kvcore)
    assert_tree_equal(r.state, c.state)
    assert_tree_equal(r2.state, c.state)
    if class_of(kind) == "CacheList":
        assert [type(x).__name__ for x in c.caches] == [type(x).__name__ for x in r.caches]
    assert_tree_equal(advance(updatable_ref(r2, kind), kind), advance(c, kind), "next update")


@pytest.mark.parametrize("kind", KINDS)
def test_kvcore_file_loads_in_mlx_lm(kind, tmp_path):
    path = tmp_path / "kv.safetensors"
    c = build(kvcore, kind)
    kvcore.save_prompt_cache(str(path), [c])
    (r,) = ref.load_prompt_cache(str(path))
    assert_same_class(c, r, ref)
    assert_tree_equal(c.state, r.state)
    assert_tree_equal(build(ref, kind).state, r.state)
    assert_tree_equal(advance(updatable_ref(r, kind), kind), advance(c, kind), "next update")


@pytest.mark.parametrize("kind", KINDS)
def test_kvcore_round_trip(kind, tmp_path):
    path = tmp_path / "kv.safetensors"
    c = build(kvcore, kind)
    kvcore.save_prompt_cache(str(path), [c], {"model": "x"})
    (c2,), meta = kvcore.load_prompt_cache(str(path), return_metadata=True)
    assert meta == {"model": "x"}
    assert_same_class(c, c2, kvcore)
    assert c2 is not c
    assert_tree_equal(c.state, c2.state)
    assert_tree_equal(advance(build(ref, kind), kind), advance(c2, kind), "next update")


@pytest.mark.parametrize("kind", KINDS)
def test_same_file_contents_as_mlx_lm(kind, tmp_path):
    """kvcore writes exactly the tensors and metadata mlx-lm writes."""
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    ref.save_prompt_cache(str(pr), [build(ref, kind)], {"model": "x"})
    kvcore.save_prompt_cache(str(pk), [build(kvcore, kind)], {"model": "x"})
    ar, mr = mx.load(str(pr), return_metadata=True)
    ak, mk = mx.load(str(pk), return_metadata=True)
    assert mk == mr
    assert sorted(ak) == sorted(ar)
    for name in ar:
        assert_arrays_equal(ar[name], ak[name], name)


def test_mixed_file_with_metadata_both_ways(tmp_path):
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    ref.save_prompt_cache(str(pr), [build(ref, k) for k in KINDS], {"model": "x"})
    kvcore.save_prompt_cache(str(pk), [build(kvcore, k) for k in KINDS], {"model": "x"})

    cs, cmeta = kvcore.load_prompt_cache(str(pr), return_metadata=True)
    rs, rmeta = ref.load_prompt_cache(str(pk), return_metadata=True)
    assert cmeta == {"model": "x"} and rmeta == {"model": "x"}
    assert [type(c).__name__ for c in cs] == [class_of(k) for k in KINDS]
    assert [type(r).__name__ for r in rs] == [class_of(k) for k in KINDS]
    assert all(isinstance(c, getattr(kvcore, type(c).__name__)) for c in cs)
    for kind, c, r in zip(KINDS, cs, rs):
        assert_tree_equal(r.state, c.state, kind)
    for kind, c, r in zip(KINDS, cs, rs):
        assert_tree_equal(advance(updatable_ref(r, kind), kind), advance(c, kind),
                          f"{kind} next update")

    # without return_metadata: just the list
    plain = kvcore.load_prompt_cache(str(pk))
    assert isinstance(plain, list) and len(plain) == len(KINDS)


def test_empty_cache_list_and_no_metadata(tmp_path):
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    ref.save_prompt_cache(str(pr), [])
    kvcore.save_prompt_cache(str(pk), [])
    assert kvcore.load_prompt_cache(str(pr), return_metadata=True) == ([], {})
    assert ref.load_prompt_cache(str(pk), return_metadata=True) == ([], {})


EMPTY = [("KVCache", ()), ("ConcatenateKVCache", ()), ("RotatingKVCache", (8, 2)),
         ("QuantizedKVCache", (32, 4)), ("ChunkedKVCache", (4,)), ("ArraysCache", (2,))]


@pytest.mark.parametrize("name,args", EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_caches_both_ways(name, args, tmp_path):
    """Fresh caches (None arrays, "none" tags) load on both sides; but
    mlx-lm cannot load an empty ConcatenateKVCache (its state setter reads
    keys.shape), while kvcore can."""
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    r, c = getattr(ref, name)(*args), getattr(kvcore, name)(*args)
    ref.save_prompt_cache(str(pr), [r])
    kvcore.save_prompt_cache(str(pk), [c])
    (c1,) = kvcore.load_prompt_cache(str(pr))
    (c2,) = kvcore.load_prompt_cache(str(pk))
    assert_tree_equal(r.state, c1.state)
    assert_tree_equal(r.state, c2.state)
    assert c1.empty() and c2.empty()
    if name == "ConcatenateKVCache":
        with pytest.raises(AttributeError):
            ref.load_prompt_cache(str(pk))
    else:
        (r2,) = ref.load_prompt_cache(str(pk))
        assert_tree_equal(r.state, r2.state)
    if name != "ArraysCache":
        dtype = mx.float16 if name == "QuantizedKVCache" else mx.float32
        assert_tree_equal(snapshot(r.update_and_fetch(*kv(7, 3, dtype))),
                          snapshot(c1.update_and_fetch(*kv(7, 3, dtype))), "first update")


def test_nested_cache_lists_both_ways(tmp_path):
    """CacheLists inside CacheLists: a CacheList(CacheList(CacheList(
    QuantizedKVCache))) has array paths 9 parts long ('0.0.0.0.0.0.0.1.2');
    mlx-lm writes and reads it, and so should kvcore (kvcore writes it)."""
    def make(mod):
        inner = feed(mod.QuantizedKVCache(32, 4), [2], 140, mx.float16)
        return [mod.CacheList(mod.CacheList(feed(mod.KVCache(), [2], 141)),
                              feed(mod.ChunkedKVCache(8), [3], 142)),
                mod.CacheList(mod.CacheList(mod.CacheList(inner)))]
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    rs = make(ref)
    ref.save_prompt_cache(str(pr), rs)
    kvcore.save_prompt_cache(str(pk), make(kvcore))
    assert_tree_equal([r.state for r in rs], [r.state for r in ref.load_prompt_cache(str(pk))])
    assert_tree_equal([r.state for r in rs], [c.state for c in kvcore.load_prompt_cache(str(pr))])
    assert_tree_equal([r.state for r in rs], [c.state for c in kvcore.load_prompt_cache(str(pk))])


def test_unicode_metadata(tmp_path):
    meta = {"model": "é✓😀", "ü": "\x00 and \u2028"}
    pr, pk = tmp_path / "ref.safetensors", tmp_path / "kv.safetensors"
    ref.save_prompt_cache(str(pr), [build(ref, "KVCache")], meta)
    kvcore.save_prompt_cache(str(pk), [build(kvcore, "KVCache")], meta)
    assert kvcore.load_prompt_cache(str(pr), return_metadata=True)[1] == meta
    assert kvcore.load_prompt_cache(str(pk), return_metadata=True)[1] == meta
    assert ref.load_prompt_cache(str(pk), return_metadata=True)[1] == meta


def test_dotted_metadata_keys_differ_from_mlx_lm(tmp_path):
    """Documented difference: kvcore keeps user metadata flat, so
    {"a.b": "y"} comes back as {"a.b": "y"}; mlx-lm's loader unflattens
    the dotted key into {"a": {"b": "y"}}."""
    meta = {"a.b": "y", "model": "x"}
    for writer in (ref, kvcore):
        path = tmp_path / f"{writer.__name__}.safetensors"
        writer.save_prompt_cache(str(path), [build(writer, "KVCache")], meta)
        _, km = kvcore.load_prompt_cache(str(path), return_metadata=True)
        _, rm = ref.load_prompt_cache(str(path), return_metadata=True)
        assert km == {"a.b": "y", "model": "x"}
        assert rm == {"a": {"b": "y"}, "model": "x"}


def test_path_like_file_name(tmp_path):
    path = tmp_path / "p.safetensors"
    kvcore.save_prompt_cache(path, [build(kvcore, "KVCache")])
    (c,) = kvcore.load_prompt_cache(path)
    assert_tree_equal(build(ref, "KVCache").state, c.state)


def test_unserializable_state_raises_typed(tmp_path):
    class Weird:
        state = (mx.zeros((1,)), object())

    with pytest.raises(kvcore.CacheValueError, match="arrays, numbers, strings or None"):
        kvcore.save_prompt_cache(str(tmp_path / "w.safetensors"), [Weird()])


# --------------------------------------------------------------------------
# the layout of mlx-lm 0.31.2 (meta_state strings)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """mlx-lm 0.31.2's cache.py, loaded from its file under a private
    package whose .base supplies create_causal_mask."""
    old_cache_py = old_cache_source(tmp_path_factory.mktemp("oldlm"))
    pkg_name = "_kvcore_test_oldlm"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = []
    base = types.ModuleType(pkg_name + ".base")
    base.create_causal_mask = ref_base.create_causal_mask
    sys.modules[pkg_name] = pkg
    sys.modules[pkg_name + ".base"] = base
    spec = importlib.util.spec_from_file_location(pkg_name + ".cache", old_cache_py)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert hasattr(mod.KVCache(), "meta_state")  # really the old one
        yield mod
    finally:
        for n in (spec.name, pkg_name + ".base", pkg_name):
            sys.modules.pop(n, None)


OLD_KINDS = [
    "KVCache",
    "ConcatenateKVCache",
    "RotatingKVCache",
    "QuantizedKVCache",
    "ChunkedKVCache",
    "ChunkedKVCache_trimmed",
    "ArraysCache",
    "CacheList",
    "CacheList_Arrays",
]


def build_old(old, kind):
    if kind == "KVCache":
        return feed(old.KVCache(), [3, 1, 2], 10)
    if kind == "ConcatenateKVCache":
        return feed(old.ConcatenateKVCache(), [3, 2], 20)
    if kind == "RotatingKVCache":
        c = feed(old.RotatingKVCache(8, 2), [5] + [1] * 6, 30)
        assert c.offset == 11
        return c
    if kind == "QuantizedKVCache":
        return feed(old.QuantizedKVCache(group_size=32, bits=4), [3, 2], 40, mx.float16)
    if kind == "ChunkedKVCache":
        return feed(old.ChunkedKVCache(16), [3, 2], 50)
    if kind == "ChunkedKVCache_trimmed":
        # A full 256-step buffer, so the old (buffer-based) maybe_trim_front
        # keeps exactly the valid tokens: start_position 56, 200 held.
        c = feed(old.ChunkedKVCache(200), [128, 128], 60)
        c.maybe_trim_front()
        assert (c.start_position, c.offset, c.keys.shape[2]) == (56, 256, 200)
        return c
    if kind == "ArraysCache":
        c = old.ArraysCache(2)
        c[0] = arr(70, (1, 3, 8))
        c[1] = arr(71, (1, 2, 4, 4), mx.bfloat16)
        return c
    if kind == "CacheList":
        return old.CacheList(feed(old.KVCache(), [2, 1], 80),
                             feed(old.RotatingKVCache(4), [1] * 6, 85))
    if kind == "CacheList_Arrays":
        a = old.ArraysCache(2)
        a[0] = arr(90, (1, 3, 8))
        a[1] = arr(91, (1, 2, 4, 4))
        return old.CacheList(feed(old.KVCache(), [3], 92), a)
    raise AssertionError(kind)


SCALARS = ("offset", "keep", "max_size", "_idx", "group_size", "bits", "chunk_size",
           "start_position")


def check_old_loaded(o, c, what):
    """kvcore's cache c, loaded from the old file of o, is o: same class,
    same scalars, same arrays, same next updates as o itself."""
    name = type(o).__name__
    assert type(c).__name__ == name and isinstance(c, getattr(kvcore, name)), what
    if name == "CacheList":
        assert len(c.caches) == len(o.caches)
        for i, (x, y) in enumerate(zip(o.caches, c.caches)):
            check_old_loaded(x, y, f"{what}.caches[{i}]")
        return
    for attr in SCALARS:
        if hasattr(o, attr):
            assert getattr(c, attr) == getattr(o, attr), f"{what}.{attr}"
    if name == "ArraysCache":
        assert_tree_equal(list(o.state), c.state[0], f"{what} slots")
        assert c.state[1] is None and c.state[2] is None
        assert_tree_equal(advance(o, name), advance(c, name), f"{what} next")
        return
    ok, ov = snapshot(o.state)  # the old state: arrays sliced to the valid part
    ck, cv = c.keys_and_values() if hasattr(c, "keys_and_values") else (c.keys, c.values)
    if name in ("KVCache", "ChunkedKVCache", "QuantizedKVCache"):
        assert_tree_equal(ok, ck, f"{what} keys")
        assert_tree_equal(ov, cv, f"{what} values")
    assert_tree_equal(ok, c.state[0], f"{what} state keys")
    assert_tree_equal(ov, c.state[1], f"{what} state values")
    assert_tree_equal(advance(o, name), advance(c, name), f"{what} next update")


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_old_layout_loads_in_kvcore(old, kind, tmp_path):
    path = tmp_path / "old.safetensors"
    o = build_old(old, kind)
    old.save_prompt_cache(str(path), [o], {"model": "x"})
    assert mx.load(str(path), return_metadata=True)[1].get("2.0") != ""  # old layout
    (c,), meta = kvcore.load_prompt_cache(str(path), return_metadata=True)
    assert meta == {"model": "x"}
    check_old_loaded(o, c, kind)
    # mlx-lm 0.32.2 cannot read the old layout (it takes the user metadata
    # for the class list); kvcore reads both.
    with pytest.raises(KeyError, match="model"):
        ref.load_prompt_cache(str(path))


def test_old_layout_mixed_file(old, tmp_path):
    path = tmp_path / "old.safetensors"
    os_ = [build_old(old, k) for k in OLD_KINDS]
    old.save_prompt_cache(str(path), os_, {"model": "x"})
    cs, meta = kvcore.load_prompt_cache(str(path), return_metadata=True)
    assert meta == {"model": "x"}
    assert [type(c).__name__ for c in cs] == [type(o).__name__ for o in os_]
    for kind, o, c in zip(OLD_KINDS, os_, cs):
        check_old_loaded(o, c, kind)
    with pytest.raises((KeyError, ValueError)):
        ref.load_prompt_cache(str(path))
    # and a kvcore re-save of what was read is the 0.32 layout mlx-lm reads
    p2 = tmp_path / "new.safetensors"
    cs = kvcore.load_prompt_cache(str(path))
    kvcore.save_prompt_cache(str(p2), cs)
    rs = ref.load_prompt_cache(str(p2))
    for kind, c, r in zip(OLD_KINDS, cs, rs):
        assert_tree_equal(c.state, r.state, kind)


def test_old_layout_without_metadata(old, tmp_path):
    path = tmp_path / "old.safetensors"
    o = build_old(old, "RotatingKVCache")
    old.save_prompt_cache(str(path), [o])
    (c,), meta = kvcore.load_prompt_cache(str(path), return_metadata=True)
    assert meta == {}
    check_old_loaded(o, c, "RotatingKVCache")
    # Without user metadata, mlx-lm 0.32.2 misreads the old file silently:
    # no caches at all, the meta_state strings returned as "metadata".
    caches, rmeta = ref.load_prompt_cache(str(path), return_metadata=True)
    assert caches == [] and rmeta == [["2", "8", "11", "5"]]


def test_old_layout_batch_kv_cache(old, tmp_path):
    """mlx-lm 0.31.2 saved BatchKVCache too (state keys/values sliced to
    _idx, offset and left_padding arrays, meta_state ""); kvcore, which has
    BatchKVCache and reads that layout, should read it."""
    path = tmp_path / "old.safetensors"
    o = feed(old.BatchKVCache([1, 0]), [3, 2], 130, B=2)
    old.save_prompt_cache(str(path), [o])
    (o2,) = old.load_prompt_cache(str(path))  # mlx-lm 0.31.2 reads its own file
    (c,) = kvcore.load_prompt_cache(str(path))
    assert type(c).__name__ == "BatchKVCache"
    assert_tree_equal(snapshot(o.state), c.state[:4])
    assert c._idx == o._idx == 5
    assert_tree_equal(advance(o, "BatchKVCache"), advance(c, "BatchKVCache"), "next update")


# --------------------------------------------------------------------------
# forged and corrupt files


def _valid(path):
    """A kvcore file with a KVCache (offset scalar at 0.2, tag at 2.1)."""
    kvcore.save_prompt_cache(str(path), [build(kvcore, "KVCache")])
    return path


def _reforge(path, arrays_edit=None, meta_edit=None):
    """Re-save a valid file's arrays and metadata, edited, with
    mx.save_safetensors (a well-formed file with forged content)."""
    arrays, meta = mx.load(str(_valid(path)), return_metadata=True)
    arrays, meta = dict(arrays), dict(meta)
    if arrays_edit:
        arrays_edit(arrays)
    if meta_edit:
        meta_edit(meta)
    mx.save_safetensors(str(path), arrays, meta)


def _raw_edit(path, edit):
    header, data = read_raw(_valid(path))
    header, data, hb = edit(header, data)
    write_raw(path, header, data, hb)


def _set(updates):
    return lambda meta: meta.update(updates)


def f_empty(p):
    p.write_bytes(b"")


def f_short(p):
    p.write_bytes(b"\x01\x02\x03")


def f_truncated(p):
    blob = _valid(p).read_bytes()
    p.write_bytes(blob[: len(blob) // 2])


def f_header_too_long(p):
    blob = _valid(p).read_bytes()
    p.write_bytes(struct.pack("<Q", len(blob) + 10) + blob[8:])


def f_header_huge(p):
    p.write_bytes(struct.pack("<Q", 2**63 + 5) + b"{}")


def f_header_not_json(p):
    write_raw(p, None, b"", b"this is {not json")


def f_header_not_utf8(p):
    write_raw(p, None, b"", b'{"\xff\xfe": 1}')


def f_header_json_list(p):
    write_raw(p, None, b"", b"[1, 2, 3]")


def f_offsets_past_end(p):
    def e(h, d):
        h["0.0"]["data_offsets"][1] += 1 << 40
        return h, d, None
    _raw_edit(p, e)


def f_offsets_reversed(p):
    def e(h, d):
        h["0.0"]["data_offsets"] = h["0.0"]["data_offsets"][::-1]
        return h, d, None
    _raw_edit(p, e)


def f_shape_bytes_mismatch(p):
    def e(h, d):
        h["0.0"]["shape"] = [1, 2, 256, 64]  # twice the bytes it has
        return h, d, None
    _raw_edit(p, e)


def f_negative_dim(p):
    def e(h, d):
        h["0.2"]["shape"] = [-1]
        return h, d, None
    _raw_edit(p, e)


def f_unknown_dtype(p):
    def e(h, d):
        h["0.0"]["dtype"] = "F128"
        return h, d, None
    _raw_edit(p, e)


def f_entry_not_dict(p):
    def e(h, d):
        h["0.0"] = [1, 2]
        return h, d, None
    _raw_edit(p, e)


def f_metadata_not_strings(p):
    def e(h, d):
        h["__metadata__"]["1.0"] = 5
        return h, d, None
    _raw_edit(p, e)


def f_class_os_system(p):
    _reforge(p, meta_edit=_set({"1.0": "os.system"}))


def f_class_foo(p):
    _reforge(p, meta_edit=_set({"1.0": "Foo"}))


def f_class_dunder(p):
    _reforge(p, meta_edit=_set({"1.0": "__class__"}))


def f_class_mlx_lm_base(p):
    _reforge(p, meta_edit=_set({"1.0": "_BaseCache"}))


def f_class_mlx_lm_lru(p):
    _reforge(p, meta_edit=_set({"1.0": "LRUPromptCache"}))


def f_inner_class_forged(p):
    """A CacheList whose inner class name (a string scalar) is forged."""
    kvcore.save_prompt_cache(str(p), [build(kvcore, "CacheList_Rotating_KV")])
    arrays, meta = mx.load(str(p), return_metadata=True)
    tags = {meta[k]: meta[k[:-1] + "1"] for k in meta if k.count(".") == 2 and k.startswith("2.") and k.endswith(".0")}
    name_path = next(path for path, t in tags.items() if t == "string")
    arrays = dict(arrays)
    arrays[name_path] = mx.array([ord(ch) for ch in "os.system"])
    mx.save_safetensors(str(p), arrays, meta)


def f_tag_unknown_kind(p):
    _reforge(p, meta_edit=_set({"2.1.1": "pickle"}))


def f_tag_missing_array(p):
    _reforge(p, meta_edit=_set({"2.1.0": "0.7"}))


def f_tag_scalar_not_one(p):
    _reforge(p, meta_edit=_set({"2.1.0": "0.0"}))


def f_tag_entry_malformed(p):
    _reforge(p, meta_edit=_set({"2.1.2": "extra"}))


def f_tag_leaf_and_node(p):
    _reforge(p, meta_edit=_set({"2.0": "", "2.1.0": "0.2", "2.1.1": "scalar",
                                      "2.0.0": "x"}))


def f_sparse_array_index(p):
    _reforge(p, arrays_edit=lambda a: a.update({"999999999.0": mx.array([1.0])}))


def f_sparse_inner_index(p):
    def e(a):
        a["0.999999999"] = a.pop("0.1")
    _reforge(p, arrays_edit=e)


def f_sparse_class_index(p):
    _reforge(p, meta_edit=_set({"1.999999999": "KVCache"}))


def f_long_index(p):
    _reforge(p, arrays_edit=lambda a: a.update({"99999999999999999999.0": mx.array([1.0])}))


def f_non_numeric_path(p):
    def e(a):
        a["0.keys"] = a.pop("0.0")
    _reforge(p, arrays_edit=e)


def f_negative_index_path(p):
    _reforge(p, arrays_edit=lambda a: a.update({"-1.0": mx.array([1.0])}))


def f_too_deep_path(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.3" + ".0" * 20: mx.array([1.0])}))


def f_path_leaf_and_node(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.0.1": mx.array([1.0])}))


def f_unknown_meta_key(p):
    _reforge(p, meta_edit=_set({"9.x": "y"}))


def f_wrong_item_count(p):
    def e(a):
        del a["0.2"]
    def m(meta):
        del meta["2.1.0"], meta["2.1.1"]
    _reforge(p, arrays_edit=e, meta_edit=m)


def f_extra_item(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.3": mx.array([1.0])}))


def f_string_out_of_range(p):
    def e(a):
        a["0.2"] = mx.array([0x110000, 65], dtype=mx.int64)
    _reforge(p, arrays_edit=e, meta_edit=_set({"2.1.1": "string"}))


def f_string_negative_code(p):
    def e(a):
        a["0.2"] = mx.array([-1], dtype=mx.int32)
    _reforge(p, arrays_edit=e, meta_edit=_set({"2.1.1": "string"}))


def f_string_float_codes(p):
    def e(a):
        a["0.2"] = mx.array([65.0, 66.0])
    _reforge(p, arrays_edit=e, meta_edit=_set({"2.1.1": "string"}))


def f_offset_negative(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(-5)}))


def f_offset_past_keys(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(257)}))


def f_offset_2_40_int64(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(2**40, dtype=mx.int64)}))


def f_offset_2_40_float(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(2.0**40)}))


def f_offset_fraction(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(3.5)}))


def f_offset_bool(p):
    _reforge(p, arrays_edit=lambda a: a.update({"0.2": mx.array(True)}))


def f_offset_none(p):
    _reforge(p, meta_edit=_set({"2.1.1": "none"}))


def f_rotating_idx_absurd(p):
    kvcore.save_prompt_cache(str(p), [build(kvcore, "RotatingKVCache")])
    arrays, meta = mx.load(str(p), return_metadata=True)
    arrays = dict(arrays)
    arrays["0.5"] = mx.array(2**31 - 1, dtype=mx.int64)  # _idx
    mx.save_safetensors(str(p), arrays, meta)


def f_cachelist_state_not_pairs(p):
    """A CacheList whose state is a bare array, not (state, name) pairs."""
    mx.save_safetensors(str(p), {"0.0": mx.array([1.0])}, {"1.0": "CacheList", "2.0": ""})


def f_old_unknown_class(p):
    mx.save_safetensors(str(p), {"0.0": mx.zeros((1, 1, 2, 4)), "0.1": mx.zeros((1, 1, 2, 4))},
                        {"0.0": "", "2.0": "Foo"})


def f_old_meta_not_int(p):
    z = mx.zeros((1, 1, 2, 4))
    mx.save_safetensors(str(p), {"0.0": z, "0.1": z},
                        {"0.0.0": "0", "0.0.1": "x", "0.0.2": "2", "0.0.3": "2",
                         "2.0": "RotatingKVCache"})


def f_old_meta_count(p):
    z = mx.zeros((1, 1, 2, 4))
    mx.save_safetensors(str(p), {"0.0": z, "0.1": z},
                        {"0.0.0": "2", "2.0": "QuantizedKVCache"})


def f_old_keys_missing(p):
    mx.save_safetensors(str(p), {"0.0": mx.zeros((1, 1, 2, 4))}, {"0.0": "", "2.0": "KVCache"})


# (id, builder, message regex)
FORGERIES = [
    ("empty", f_empty, r"8-byte header length.*0 bytes"),
    ("short", f_short, r"8-byte header length.*3 bytes"),
    ("truncated", f_truncated, r"data offsets inside"),
    ("header_longer_than_file", f_header_too_long, r"header of at most"),
    ("header_length_2_63", f_header_huge, r"header of at most"),
    ("header_not_json", f_header_not_json, r"JSON"),
    ("header_not_utf8", f_header_not_utf8, r"JSON"),
    ("header_json_list", f_header_json_list, r"JSON object"),
    ("offsets_past_end", f_offsets_past_end, r"data offsets inside.*'0\.0'"),
    ("offsets_reversed", f_offsets_reversed, r"data offsets inside.*'0\.0'"),
    ("shape_bytes_mismatch", f_shape_bytes_mismatch, r"bytes for '0\.0'"),
    ("negative_dim", f_negative_dim, r"shape of at most"),
    ("unknown_dtype", f_unknown_dtype, r"known dtype for '0\.0'.*F128"),
    ("entry_not_dict", f_entry_not_dict, r"tensor entry for '0\.0'"),
    ("metadata_not_strings", f_metadata_not_strings, r"string-to-string __metadata__"),
    ("class_os_system", f_class_os_system, r"cache class among.*'os\.system'"),
    ("class_foo", f_class_foo, r"cache class among.*'Foo'"),
    ("class_dunder", f_class_dunder, r"cache class among.*'__class__'"),
    ("class_mlx_lm_base", f_class_mlx_lm_base, r"cache class among.*'_BaseCache'"),
    ("class_mlx_lm_lru", f_class_mlx_lm_lru, r"cache class among.*'LRUPromptCache'"),
    ("inner_class_forged", f_inner_class_forged, r"cache class among.*'os\.system'"),
    ("tag_unknown_kind", f_tag_unknown_kind, r"scalar tag among.*'pickle'"),
    ("tag_missing_array", f_tag_missing_array, r"scalar tag naming a stored array.*'0\.7'"),
    ("tag_scalar_not_one", f_tag_scalar_not_one, r"one element for the scalar at 0\.0"),
    ("tag_entry_malformed", f_tag_entry_malformed, r"\(path, tag\) scalar entries"),
    ("tag_leaf_and_node", f_tag_leaf_and_node, r"path that is not also a leaf|each path once|leading ''"),
    ("sparse_array_index", f_sparse_array_index, r"dense list indices"),
    ("sparse_inner_index", f_sparse_inner_index, r"dense list indices"),
    ("sparse_class_index", f_sparse_class_index, r"dense list indices"),
    ("long_index", f_long_index, r"numeric dotted paths"),
    ("non_numeric_path", f_non_numeric_path, r"numeric dotted paths.*0\.keys"),
    ("negative_index_path", f_negative_index_path, r"numeric dotted paths.*-1\.0"),
    ("too_deep_path", f_too_deep_path, r"paths at most 16 deep"),
    ("path_leaf_and_node", f_path_leaf_and_node, r"path that is not also a leaf|each path once"),
    ("unknown_meta_key", f_unknown_meta_key, r"metadata keys under.*'9\.x'"),
    ("wrong_item_count", f_wrong_item_count, r"KVCache.*3 items but got 2"),
    ("extra_item", f_extra_item, r"KVCache.*3 items but got 4"),
    ("string_out_of_range", f_string_out_of_range, r"code points for the string at 0\.2"),
    ("string_negative_code", f_string_negative_code, r"code points for the string at 0\.2"),
    ("string_float_codes", f_string_float_codes, r"integer array for the string at 0\.2"),
    ("offset_negative", f_offset_negative, r"offset.*-5"),
    ("offset_past_keys", f_offset_past_keys, r"offset.*257"),
    ("offset_2_40_int64", f_offset_2_40_int64, r"offset.*1099511627776"),
    ("offset_2_40_float", f_offset_2_40_float, r"offset as an int"),
    ("offset_fraction", f_offset_fraction, r"offset as an int.*3\.5"),
    ("offset_bool", f_offset_bool, r"offset as an int.*True"),
    ("offset_none", f_offset_none, r"offset"),
    ("rotating_idx_absurd", f_rotating_idx_absurd, r"_idx|idx"),
    ("cachelist_state_not_pairs", f_cachelist_state_not_pairs, r"\(state, class name\)"),
    ("old_unknown_class", f_old_unknown_class, r"cache class among.*'Foo'"),
    ("old_meta_not_int", f_old_meta_not_int, r"integer meta_state values for RotatingKVCache"),
    ("old_meta_count", f_old_meta_count, r"3 meta_state values for QuantizedKVCache"),
    ("old_keys_missing", f_old_keys_missing, r"\(keys, values\) for KVCache"),
]


@pytest.mark.parametrize("name,make,pattern", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_forged_file_raises_typed_error(name, make, pattern, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    make(path)
    with pytest.raises(kvcore.CacheValueError, match=pattern) as ei:
        kvcore.load_prompt_cache(str(path))
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, kvcore.CacheError)
    assert str(ei.value).startswith("[")  # "[context] expected X but got Y"


def test_forged_files_never_crash_in_child_process(tmp_path):
    """All forgeries, loaded in a fresh interpreter: each a typed error,
    and the process exits normally (no abort, no segfault)."""
    files = []
    for name, make, pattern in FORGERIES:
        path = tmp_path / f"{name}.safetensors"
        make(path)
        files.append((name, str(path), pattern))
    code = textwrap.dedent(
        """
        import json, re, sys
        import kvcore
        out = []
        for name, path, pattern in json.loads(sys.argv[1]):
            try:
                kvcore.load_prompt_cache(path)
                out.append([name, "no error", ""])
            except kvcore.CacheValueError as e:
                ok = isinstance(e, ValueError) and re.search(pattern, str(e)) is not None
                out.append([name, "typed" if ok else "typed, wrong message", str(e)])
            except BaseException as e:
                out.append([name, type(e).__name__, str(e)])
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(FORGERIES)
    bad = [r for r in results if r[1] != "typed"]
    assert not bad, bad


def test_huge_sparse_index_does_not_allocate(tmp_path):
    """'999999999.0' must be refused from the key alone, not by building a
    billion-element list."""
    path = tmp_path / "sparse.safetensors"
    arrays = {"0.0": mx.zeros((1, 1, 2, 4)), "0.1": mx.zeros((1, 1, 2, 4)),
              "0.2": mx.array(2), "999999999.0": mx.array([1.0])}
    meta = {"1.0": "KVCache", "1.999999999": "KVCache", "2.0": "", "2.1.0": "0.2",
            "2.1.1": "scalar"}
    mx.save_safetensors(str(path), arrays, meta)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(kvcore.CacheValueError, match="dense list indices"):
            kvcore.load_prompt_cache(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, f"peak Python allocation {peak} bytes"


# --------------------------------------------------------------------------
# python -m kvcore inspect


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "kvcore", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def inspect_file(tmp_path):
    path = tmp_path / "insp.safetensors"
    caches = [build(kvcore, k) for k in ("KVCache", "RotatingKVCache", "QuantizedKVCache",
                                        "ChunkedKVCache", "CacheList_KV_Arrays")]
    kvcore.save_prompt_cache(str(path), caches, {"model": "x"})
    return path


def test_inspect_human(inspect_file):
    proc = run_inspect(str(inspect_file))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "5 layers" in out and "mlx-lm 0.32" in out
    assert "model = x" in out
    lines = out.splitlines()
    layer = {int(l.split(":")[0].split()[1]): l for l in lines if l.startswith("layer ")}
    assert set(layer) == {0, 1, 2, 3, 4}
    assert layer[0].startswith("layer 0: KVCache") and "offset=6" in layer[0]
    assert "RotatingKVCache" in layer[1]
    for s in ("offset=11", "max_size=8", "keep=2"):
        assert s in layer[1], layer[1]
    assert "QuantizedKVCache" in layer[2]
    for s in ("offset=5", "group_size=32", "bits=4"):
        assert s in layer[2], layer[2]
    assert "ChunkedKVCache" in layer[3]
    for s in ("offset=8", "chunk_size=4", "start_position=3"):
        assert s in layer[3], layer[3]
    assert "CacheList [KVCache, ArraysCache]" in layer[4]
    assert "(1, 2, 256, 32)" in out  # KVCache buffer
    assert "(1, 2, 8, 32)" in out  # the rotated buffer
    assert "(1, 3, 8)" in out  # ArraysCache slot inside the CacheList


def test_inspect_json(inspect_file):
    proc = run_inspect(str(inspect_file), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["metadata"] == {"model": "x"}
    assert d["layout"] == "mlx-lm 0.32"
    assert [l["class"] for l in d["layers"]] == [
        "KVCache", "RotatingKVCache", "QuantizedKVCache", "ChunkedKVCache", "CacheList"]
    kv_, rot, q, ch, cl = d["layers"]
    assert kv_["offset"] == 6
    assert [a["shape"] for a in kv_["arrays"]] == [[1, 2, 256, 32], [1, 2, 256, 32]]
    assert (rot["offset"], rot["max_size"], rot["keep"]) == (11, 8, 2)
    assert (q["group_size"], q["bits"], q["offset"]) == (32, 4, 5)
    assert (ch["chunk_size"], ch["start_position"], ch["offset"]) == (4, 3, 8)
    assert cl["inner"] == ["KVCache", "ArraysCache"]
    c = kvcore.load_prompt_cache(str(inspect_file))
    assert d["layers"][0]["bytes"] == c[0].keys.nbytes + c[0].values.nbytes
    assert d["bytes"] == sum(l["bytes"] for l in d["layers"])


def test_inspect_json_batch_caches(tmp_path):
    """Batch caches have an array offset: --json must still be JSON."""
    path = tmp_path / "batch.safetensors"
    kvcore.save_prompt_cache(str(path), [build(kvcore, "BatchKVCache"),
                                         build(kvcore, "BatchRotatingKVCache")])
    proc = run_inspect(str(path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    assert [l["class"] for l in d["layers"]] == ["BatchKVCache", "BatchRotatingKVCache"]


def test_inspect_old_layout(old, tmp_path):
    path = tmp_path / "old.safetensors"
    old.save_prompt_cache(str(path), [build_old(old, "RotatingKVCache")], {"model": "y"})
    proc = run_inspect(str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert "meta_state" in d["layout"]
    assert d["metadata"] == {"model": "y"}
    assert d["layers"][0]["class"] == "RotatingKVCache"
    assert d["layers"][0]["offset"] == 11


@pytest.mark.parametrize("make", [f_truncated, f_class_os_system, f_empty], ids=["truncated", "class", "empty"])
def test_inspect_corrupt_file(make, tmp_path):
    path = tmp_path / "bad.safetensors"
    make(path)
    proc = run_inspect(str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert str(path) in proc.stderr and "expected" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_missing_file(tmp_path):
    proc = run_inspect(str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 1
    assert "nope.safetensors" in proc.stderr and "Traceback" not in proc.stderr
