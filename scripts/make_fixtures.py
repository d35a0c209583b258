#!/usr/bin/env python3
"""Write the prompt-cache fixtures of the C++ tests (cpp/tests/fixtures/)
with mlx-lm 0.32.2. Run once; the files are committed:

    python scripts/make_fixtures.py [out_dir]

Each fixture <name> is two files:

<name>.safetensors
    A prompt cache: mlx-lm's save_prompt_cache of caches fed a fixed
    sequence of updates from fixed random inputs (mx.random.seed). The file
    old_layout.safetensors is instead written by hand in the layout of
    mlx-lm 0.32.0 and before (per-layer meta_state strings), as kvcore's
    _load_old reads it.

<name>.expected.safetensors
    What the C++ test checks on the cache it loads, all computed by mlx-lm
    on the cache mlx-lm loads from the same file. Metadata:
        layers, user.<k>              layer count, the user metadata
        L<i>.class, L<i>.steps        class name, number of steps
        L<i>.s<t>.op                  update | mask | trim | trim_front |
                                      set | advance
        L<i>.s<t>.member              -1, or the CacheList member it targets
        L<i>.s<t>.args                mask: "N,return_array,window|-";
                                      trim: n; set: slot; advance: N
        L<i>.s<t>.result              trim: what it returned
        L<i>.s<t>.kind                mask: none | causal | array
        L<i>.loaded.<path>,           the state right after loading and
        L<i>.final.<path>             after the steps: "int:5", "bool:1",
                                      "float:0.5", "str:KVCache", "none"
                                      for the leaves that are not arrays
    Arrays:
        L<i>.s<t>.in.<j>              update inputs (keys, values) or the
                                      array `set` stores
        L<i>.s<t>.out.<j>             what update_and_fetch returned,
                                      flattened (6 arrays for quantized), or
                                      the mask array
        L<i>.loaded.<path>,           the array leaves of the states
        L<i>.final.<path>
    <path> is mlx.utils.tree_flatten's dotted path into the 0.32 state.

mlx-lm's loaded BatchRotatingKVCache lacks _lengths (from_state skips
__init__) and cannot be updated; it is set to None, as __init__ would.
"""

import os
import sys

import mlx.core as mx
import mlx_lm
import mlx_lm.models.cache as ref
from mlx.utils import tree_flatten

assert mlx_lm.__version__ == "0.32.2", mlx_lm.__version__

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "cpp", "tests", "fixtures")

# The masks asked of every cache that makes them: (N, return_array, window).
MASKS = [(1, False, None), (3, False, None), (3, True, None), (1, False, 4), (3, False, 4)]


def rand(shape, dtype):
    return mx.random.normal(shape).astype(dtype)


class Layer:
    """One layer's cache with the input geometry of its updates."""

    def __init__(self, cache, B=1, H=2, D=8, dtype=mx.float16, members=None):
        self.cache = cache
        self.B, self.H, self.D, self.dtype = B, H, D, dtype
        self.members = members  # Layers, for a CacheList

    def geometry(self, member):
        return self if member < 0 else self.members[member]


def feed(layer, sizes):
    for S in sizes:
        k = rand((layer.B, layer.H, S, layer.D), layer.dtype)
        v = rand((layer.B, layer.H, S, layer.D), layer.dtype)
        layer.cache.update_and_fetch(k, v)
    return layer


def scalar_text(x):
    if x is None:
        return "none"
    if isinstance(x, bool):
        return f"bool:{int(x)}"
    if isinstance(x, int):
        return f"int:{x}"
    if isinstance(x, float):
        return f"float:{x!r}"
    if isinstance(x, str):
        return f"str:{x}"
    raise TypeError(type(x))


def snapshot(x):
    """x as it is now: mlx-lm's in-place slice writes rebind the cache's
    arrays (and the arrays update_and_fetch returned), so keep a handle of
    their current value."""
    return mx.array(x)


def put_state(arrays, meta, prefix, state):
    leaves = tree_flatten(state)
    assert leaves, f"{prefix}: an empty state cannot be described"
    for path, x in leaves:
        if isinstance(x, mx.array):
            arrays[f"{prefix}.{path}"] = snapshot(x)
        else:
            meta[f"{prefix}.{path}"] = scalar_text(x)


def flat(x):
    if isinstance(x, mx.array):
        return [x]
    out = []
    for y in x:
        out += flat(y)
    return out


def run_steps(cache, geometry, steps, L, arrays, meta):
    """Apply steps to mlx-lm's loaded cache, recording inputs and results."""
    meta[f"{L}.steps"] = str(len(steps))
    for t, step in enumerate(steps):
        op, member, rest = step[0], step[1], step[2:]
        target = cache if member < 0 else cache.caches[member]
        g = geometry.geometry(member)
        key = f"{L}.s{t}"
        meta[f"{key}.op"] = op
        meta[f"{key}.member"] = str(member)
        if op == "update":
            (S,) = rest
            k = rand((g.B, g.H, S, g.D), g.dtype)
            v = rand((g.B, g.H, S, g.D), g.dtype)
            arrays[f"{key}.in.0"], arrays[f"{key}.in.1"] = k, v
            for j, a in enumerate(flat(target.update_and_fetch(k, v))):
                arrays[f"{key}.out.{j}"] = snapshot(a)
        elif op == "mask":
            N, ra, ws = rest
            meta[f"{key}.args"] = f"{N},{int(ra)},{'-' if ws is None else ws}"
            if isinstance(target, ref.ArraysCache):
                m = target.make_mask(N)
            else:
                m = target.make_mask(N, return_array=ra, window_size=ws)
            if m is None:
                meta[f"{key}.kind"] = "none"
            elif isinstance(m, str):
                meta[f"{key}.kind"] = m
            else:
                meta[f"{key}.kind"] = "array"
                arrays[f"{key}.out.0"] = snapshot(m)
        elif op == "trim":
            (n,) = rest
            meta[f"{key}.args"] = str(n)
            meta[f"{key}.result"] = str(target.trim(n))
        elif op == "trim_front":
            target.maybe_trim_front()
        elif op == "set":
            slot, shape, dtype = rest
            meta[f"{key}.args"] = str(slot)
            arrays[f"{key}.in.0"] = x = rand(shape, dtype)
            target[slot] = x
        elif op == "advance":
            (N,) = rest
            meta[f"{key}.args"] = str(N)
            target.advance(N)
        else:
            raise ValueError(op)


def masks(member=-1):
    return [("mask", member, *m) for m in MASKS]


def write_expected(name, layers, loaded, steps, user):
    arrays, meta = {}, {"layers": str(len(layers))}
    for k, v in user.items():
        meta[f"user.{k}"] = v
    for i, (layer, cache, layer_steps) in enumerate(zip(layers, loaded, steps)):
        L = f"L{i}"
        meta[f"{L}.class"] = type(cache).__name__
        put_state(arrays, meta, f"{L}.loaded", cache.state)
        run_steps(cache, layer, layer_steps, L, arrays, meta)
        put_state(arrays, meta, f"{L}.final", cache.state)
    mx.eval(arrays)
    mx.save_safetensors(os.path.join(OUT, f"{name}.expected.safetensors"), arrays, meta)


def fixture(name, seed, build, steps, user=None):
    """Save the layers build() makes with mlx-lm, load them back with mlx-lm
    and record steps on what it loaded."""
    user = user or {}
    mx.random.seed(seed)
    layers = build()
    path = os.path.join(OUT, f"{name}.safetensors")
    ref.save_prompt_cache(path, [l.cache for l in layers], user)
    loaded, got_user = ref.load_prompt_cache(path, return_metadata=True)
    assert got_user == user and len(loaded) == len(layers)
    for c in loaded:
        if isinstance(c, ref.BatchRotatingKVCache):
            c._lengths = None
    write_expected(name, layers, loaded, steps, user)


def build_kv():
    return [feed(Layer(ref.KVCache()), [5, 1, 2])]


def build_concatenate():
    return [feed(Layer(ref.ConcatenateKVCache(), dtype=mx.float32), [3, 2])]


def build_rotating():
    # keep 2 of 8 slots; 6 + 5 single tokens: the ring has wrapped (offset
    # 11, cursor 5), so the physical order is not the temporal one.
    layer = feed(Layer(ref.RotatingKVCache(max_size=8, keep=2), dtype=mx.float32),
                 [6, 1, 1, 1, 1, 1])
    assert (layer.cache.offset, layer.cache._idx) == (11, 5)
    return [layer]


def build_quantized():
    return [feed(Layer(ref.QuantizedKVCache(group_size=32, bits=8), H=1, D=32), [3, 1])]


def build_chunked():
    layer = feed(Layer(ref.ChunkedKVCache(chunk_size=6), H=1), [4, 3])
    layer.cache.maybe_trim_front()
    feed(layer, [1])
    assert (layer.cache.offset, layer.cache.start_position) == (8, 1)
    return [layer]


def build_arrays():
    c = ref.ArraysCache(2, left_padding=[1, 0])
    c[0] = rand((2, 3, 4), mx.float32)
    c[1] = rand((2, 2, 4, 4), mx.float32)
    return [Layer(c, B=2)]


def build_cache_list():
    kv = feed(Layer(ref.KVCache(), H=1), [4])
    arr = ref.ArraysCache(2)
    arr[0] = rand((1, 3, 8), mx.float32)
    arr[1] = rand((1, 2, 4, 4), mx.float32)
    return [Layer(ref.CacheList(kv.cache, arr), members=[kv, Layer(arr)])]


def build_batch_kv():
    return [feed(Layer(ref.BatchKVCache(left_padding=[1, 0]), B=2, H=1), [4, 1, 1])]


def build_batch_rotating():
    layer = feed(Layer(ref.BatchRotatingKVCache(max_size=6, left_padding=[2, 0]),
                       B=2, H=1, dtype=mx.bfloat16), [5, 1, 1, 1, 1])
    assert layer.cache.rotated and layer.cache._offset == 9
    return [layer]


def build_hybrid():
    # A hybrid model as make_prompt_cache(max_kv_size=16) would give it an
    # attention layer, beside an SSM layer with an unset slot.
    arr = ref.ArraysCache(3)
    arr[0] = rand((1, 3, 8), mx.float32)
    arr[2] = rand((1, 2, 4), mx.float32)
    return [
        feed(Layer(ref.RotatingKVCache(max_size=16, keep=4)), [5, 1]),
        Layer(arr),
        feed(Layer(ref.RotatingKVCache(max_size=16, keep=4)), [5, 1]),
    ]


def old_layout():
    """The layout of mlx-lm 0.32.0 and before, hand-written: metadata
    "0.<i>..." per-layer meta_state strings, "1.<k>" user metadata, "2.<i>"
    class names; arrays the per-layer states, sliced to the tokens held.
    The expected side is mlx-lm 0.32.2's from_state of the 0.32 state each
    layer converts to."""
    mx.random.seed(11)

    def sliced(x, n):
        return x[..., :n, :]

    kv = feed(Layer(ref.KVCache(), H=1), [3, 2]).cache
    rot = feed(Layer(ref.RotatingKVCache(max_size=8, keep=2), dtype=mx.float32),
               [6, 1, 1, 1, 1, 1]).cache
    q = feed(Layer(ref.QuantizedKVCache(group_size=32, bits=4), H=1, D=32), [2, 1]).cache
    ch = feed(Layer(ref.ChunkedKVCache(chunk_size=6), H=1, dtype=mx.float32), [4, 3]).cache
    ch.maybe_trim_front()
    assert (ch.offset, ch.start_position) == (7, 1)
    arr = ref.ArraysCache(2)
    arr[0] = rand((1, 3, 8), mx.float32)
    arr[1] = rand((1, 2, 4, 4), mx.float32)
    inner_kv = feed(Layer(ref.KVCache(), H=1), [2]).cache
    inner_rot = feed(Layer(ref.RotatingKVCache(max_size=4)), [1] * 6).cache

    held = ch.offset - ch.start_position
    # (class, old state, old meta_state, the 0.32 state it stands for, geometry)
    layers = [
        ("KVCache",
         [sliced(kv.keys, kv.offset), sliced(kv.values, kv.offset)], "",
         (sliced(kv.keys, kv.offset), sliced(kv.values, kv.offset), kv.offset),
         Layer(None, H=1)),
        ("RotatingKVCache", [rot.keys, rot.values],
         [str(x) for x in (rot.keep, rot.max_size, rot.offset, rot._idx)],
         rot.state, Layer(None, dtype=mx.float32)),
        ("QuantizedKVCache",
         [[sliced(x, q.offset) for x in q.keys], [sliced(x, q.offset) for x in q.values]],
         [str(q.offset), str(q.group_size), str(q.bits)],
         ([sliced(x, q.offset) for x in q.keys], [sliced(x, q.offset) for x in q.values],
          q.offset, q.group_size, q.bits),
         Layer(None, H=1, D=32)),
        ("ChunkedKVCache",
         [sliced(ch.keys, held), sliced(ch.values, held)],
         [str(ch.chunk_size), str(ch.start_position)],
         (sliced(ch.keys, held), sliced(ch.values, held), ch.offset, ch.chunk_size,
          ch.start_position),
         Layer(None, H=1, dtype=mx.float32)),
        ("ArraysCache", list(arr.cache), "", (list(arr.cache), None, None), Layer(None)),
        ("CacheList",
         [[sliced(inner_kv.keys, inner_kv.offset), sliced(inner_kv.values, inner_kv.offset)],
          [inner_rot.keys, inner_rot.values]],
         [["KVCache", "RotatingKVCache"],
          ["", [str(x) for x in (inner_rot.keep, inner_rot.max_size, inner_rot.offset,
                                 inner_rot._idx)]]],
         [((sliced(inner_kv.keys, inner_kv.offset), sliced(inner_kv.values, inner_kv.offset),
            inner_kv.offset), "KVCache"),
          (inner_rot.state, "RotatingKVCache")],
         Layer(None, members=[Layer(None, H=1), Layer(None)])),
    ]
    user = {"model": "old-tiny"}
    arrays = dict(tree_flatten([l[1] for l in layers]))
    meta = dict(tree_flatten([[l[2] for l in layers], user, [l[0] for l in layers]]))
    assert meta.get("2.0") != ""
    mx.eval(arrays)
    mx.save_safetensors(os.path.join(OUT, "old_layout.safetensors"), arrays, meta)

    loaded = [getattr(ref, name).from_state(state) for name, _, _, state, _ in layers]
    steps = [
        [("update", -1, 1), *masks()],
        [("update", -1, 1), ("update", -1, 3), *masks()],
        [("update", -1, 1), ("trim", -1, 1), ("update", -1, 2)],
        [("update", -1, 1), ("trim_front", -1), ("update", -1, 2)],
        [("mask", -1, 2, False, None), ("set", -1, 0, (1, 3, 8), mx.float32)],
        [("update", 0, 1), ("update", 1, 1), ("update", 1, 2)],
    ]
    write_expected("old_layout", [l[4] for l in layers], loaded, steps, user)


def main():
    os.makedirs(OUT, exist_ok=True)
    fixture("kv_cache", 1, build_kv, [[
        *masks(), ("update", -1, 1), ("update", -1, 3), ("trim", -1, 2), ("update", -1, 1),
        *masks()]], user={"model": "tiny", "note": "ünïcödé ✓"})
    fixture("concatenate_kv_cache", 2, build_concatenate, [[
        *masks(), ("update", -1, 1), ("update", -1, 2), *masks()]])
    fixture("rotating_kv_cache_wrapped", 3, build_rotating, [[
        *masks(), ("update", -1, 1), ("update", -1, 1), *masks(), ("update", -1, 3),
        ("update", -1, 1), *masks()]])
    fixture("quantized_kv_cache", 4, build_quantized, [[
        *masks(), ("update", -1, 1), ("update", -1, 2), ("trim", -1, 1), ("update", -1, 1),
        *masks()]])
    fixture("chunked_kv_cache", 5, build_chunked, [[
        ("update", -1, 1), ("trim_front", -1), ("update", -1, 2), ("trim", -1, 1),
        ("update", -1, 1), ("trim_front", -1)]])
    fixture("arrays_cache", 6, build_arrays, [[
        ("mask", -1, 3, False, None), ("set", -1, 1, (2, 2, 4, 4), mx.float32),
        ("advance", -1, 1), ("mask", -1, 3, False, None), ("mask", -1, 1, False, None)]])
    fixture("cache_list", 7, build_cache_list, [[
        ("update", 0, 1), *masks(0), ("set", 1, 0, (1, 3, 8), mx.float32),
        ("mask", 1, 2, False, None), ("update", 0, 2)]])
    fixture("batch_kv_cache", 8, build_batch_kv, [[
        *masks(), ("update", -1, 1), ("update", -1, 2), ("trim", -1, 1), ("update", -1, 1),
        *masks()]])
    fixture("batch_rotating_kv_cache", 9, build_batch_rotating, [[
        *masks(), ("update", -1, 1), *masks(), ("update", -1, 2), ("update", -1, 1),
        *masks()]])
    fixture("hybrid_model", 10, build_hybrid, [
        [("trim", -1, 2), ("update", -1, 1), *masks()],
        [("mask", -1, 1, False, None), ("set", -1, 1, (1, 5), mx.float32)],
        [("update", -1, 3), ("update", -1, 1), ("trim", -1, 1), *masks()],
    ], user={"model": "hybrid-tiny", "tokens": "1 2 3 4 5 6"})
    old_layout()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.abspath(OUT)}")


if __name__ == "__main__":
    main()
