"""Prompt-cache files across languages, with the C++ example
cpp/examples/prompt_cache.cpp:

1. the files it saves load in kvcore and in mlx-lm (unpatched) to the same
   classes, offsets, state arrays (bit for bit) and metadata;
2. files saved from Python load in it and it decodes on them: the C++ files
   saved again by kvcore.save_prompt_cache and by mlx-lm's
   save_prompt_cache (where it checks the saving run's continuation), and
   caches filled in Python, saved by kvcore and by mlx-lm.

    python scripts/check_cpp_files.py build/example/prompt_cache

Exits 1 naming every check that failed.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx.utils import tree_flatten

import kvcore

MODEL = "kvcore-example-tiny-1"  # what the example writes as metadata "model"
LOAD_STEPS = 4  # steps it decodes on a file that records no continuation

failures = []


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what)
    if not ok:
        failures.append(what)
    return ok


def run(exe, *args):
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        print(out)
    return p.returncode, out


def same_leaf(a, b):
    if isinstance(a, mx.array) or isinstance(b, mx.array):
        return (isinstance(a, mx.array) and isinstance(b, mx.array) and a.dtype == b.dtype
                and a.shape == b.shape and bytes(memoryview(a)) == bytes(memoryview(b)))
    return type(a) is type(b) and a == b


def compare_loads(path, expected_class):
    """The file as kvcore and mlx-lm load it: equal, and what the example saved."""
    name = Path(path).name
    ours, our_meta = kvcore.load_prompt_cache(str(path), return_metadata=True)
    theirs, their_meta = mlx_lm_cache.load_prompt_cache(str(path), return_metadata=True)
    check(len(ours) == len(theirs) > 0, f"{name}: {len(ours)} layers in kvcore, {len(theirs)} in mlx-lm")
    tokens = our_meta.get("tokens", "").split(",")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        where = f"{name} layer {i}"
        check(type(a).__name__ == type(b).__name__ == expected_class,
              f"{where}: class {type(a).__name__} (kvcore), {type(b).__name__} (mlx-lm), "
              f"expected {expected_class}")
        check(a.offset == b.offset == len(tokens),
              f"{where}: offset {a.offset} (kvcore), {b.offset} (mlx-lm), "
              f"expected {len(tokens)} (the tokens the metadata lists)")
        sa, sb = tree_flatten(a.state), tree_flatten(b.state)
        check([p for p, _ in sa] == [p for p, _ in sb] and all(
            same_leaf(x, y) for (_, x), (_, y) in zip(sa, sb)),
            f"{where}: state leaves equal ({len(sa)} in kvcore, {len(sb)} in mlx-lm)")
        if expected_class == "RotatingKVCache":
            check((a.max_size, a.keep, a._idx) == (b.max_size, b.keep, b._idx),
                  f"{where}: max_size, keep, _idx {(a.max_size, a.keep, a._idx)} (kvcore), "
                  f"{(b.max_size, b.keep, b._idx)} (mlx-lm)")
    check(our_meta == their_meta, f"{name}: metadata equal in kvcore and mlx-lm")
    check(our_meta.get("model") == MODEL and {"tokens", "next_token", "continuation"} <= set(our_meta),
          f"{name}: metadata names the model, tokens, next token and continuation "
          f"({sorted(our_meta)})")
    return ours, theirs, our_meta


def load_in_cpp(exe, path, expected, continuation):
    """Runs the example with --load; `expected` is [(class, offset)] per layer."""
    name = Path(path).name
    rc, out = run(exe, "--load", path)
    if not check(rc == 0, f"--load {name}: exit status {rc}"):
        return
    layers = [(c, int(o)) for _, c, o in re.findall(r"^layer (\d+): (\w+) offset (\d+)", out, re.M)]
    check(layers == expected, f"--load {name}: layers {layers}, expected {expected}")
    steps = len(continuation.split(",")) if continuation else LOAD_STEPS
    after = [int(o) for o in re.findall(r"^layer \d+: offset (\d+) after decoding", out, re.M)]
    check(after == [o + steps for _, o in expected],
          f"--load {name}: offsets after {steps} steps {after}")
    if continuation:
        check("tokens equal the saving run's uninterrupted continuation" in out,
              f"--load {name}: decoded the saving run's continuation")


def fill(cache, shape, dtype, chunks, seed):
    """Feeds random keys and values of `shape` (S replaced) in chunks of S."""
    key = mx.random.key(seed)
    for n in chunks:
        key, k1, k2 = mx.random.split(key, 3)
        s = (shape[0], shape[1], n, shape[3])
        cache.update_and_fetch(mx.random.normal(s, key=k1).astype(dtype),
                               mx.random.normal(s, key=k2).astype(dtype))
    return cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", help="the built prompt_cache example")
    args = parser.parse_args()
    exe = Path(args.example).resolve()
    assert mlx_lm_cache.KVCache is not kvcore.KVCache, "mlx-lm is patched; this compares the two"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rc, out = run(exe, "--save", tmp / "cpp.safetensors")
        if not check(rc == 0, f"{exe.name} --save: exit status {rc}"):
            return 1
        loaded = {}
        for file, cls in [("cpp.safetensors", "KVCache"), ("cpp.rotating.safetensors", "RotatingKVCache")]:
            loaded[cls] = compare_loads(tmp / file, cls)

        # Saved again from Python, by each side: the example decodes the
        # saving run's continuation on them.
        for cls, (ours, theirs, meta) in loaded.items():
            expected = [(cls, c.offset) for c in ours]
            f = tmp / f"kvcore-resaved-{cls}.safetensors"
            kvcore.save_prompt_cache(str(f), ours, meta)
            load_in_cpp(exe, f, expected, meta["continuation"])
            f = tmp / f"mlx_lm-resaved-{cls}.safetensors"
            mlx_lm_cache.save_prompt_cache(str(f), theirs, meta)
            load_in_cpp(exe, f, expected, meta["continuation"])

        # Caches filled in Python with the example's shapes.
        ref = loaded["KVCache"][0]
        shape, dtype, n = ref[0].keys.shape, ref[0].keys.dtype, len(ref)
        for side, mod in [("kvcore", kvcore), ("mlx_lm", mlx_lm_cache)]:
            kv = [fill(mod.KVCache(), shape, dtype, [5, 1, 1], i) for i in range(n)]
            rot = [fill(mod.RotatingKVCache(max_size=16, keep=4), shape, dtype, [20, 1, 1, 1], i)
                   for i in range(n)]
            for cls, caches in [("KVCache", kv), ("RotatingKVCache", rot)]:
                f = tmp / f"{side}-python-{cls}.safetensors"
                mod.save_prompt_cache(str(f), caches, {"source": side})
                load_in_cpp(exe, f, [(cls, c.offset) for c in caches], None)

    print(f"\n{len(failures)} failed" if failures else "\ncross-language prompt-cache files: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
