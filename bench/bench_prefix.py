"""LRUPromptCache: kvcore's (C++ radix tree) against mlx-lm's, in one run.

insert_cache and fetch_nearest_cache (with the fetched arrays evaluated)
for 1k, 8k and 32k-token prompts, on a prompt cache of 8 KVCache layers
(2 KV heads x 64, float16), the case the issue measured. Each figure is the
median over repeats, the two classes interleaved; the ratio is kvcore /
mlx-lm. Then the bytes held for 16 conversations over one shared prefix.

    python bench/bench_prefix.py [--repeats 15]
"""

import argparse
import platform
import statistics
import time

import mlx.core as mx
from mlx_lm.models import cache as ref

import kvcore


def layers(n_tokens, make):
    out = []
    for _ in range(8):
        c = make()
        x = mx.zeros((1, 2, n_tokens, 64), mx.float16)
        c.update_and_fetch(x, x)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fetched(lru, query):
    """Fetch, and build the caches' arrays (kvcore builds them in the call;
    mlx-lm's copies are lazy until used)."""
    cache, _ = lru.fetch_nearest_cache("m", query)
    mx.eval([c.state for c in cache])


def conversations(make_cache, make_lru, n=16, prefix=4096, own=64):
    """Bytes held for n conversations sharing a prefix, each with `own`
    tokens of its own, over one conversation's; keys and values are a
    function of the tokens, as a model's are."""
    shared = [mx.random.normal((1, 2, prefix, 64), key=mx.random.key(layer)).astype(mx.float16) for layer in range(8)]
    lru = make_lru()
    one = None
    for i in range(n):
        toks = list(range(prefix)) + [100_000 + 1000 * i + j for j in range(own)]
        cs = []
        for layer in range(8):
            c = make_cache()
            tail = mx.random.normal((1, 2, own, 64), key=mx.random.key(1000 * i + layer)).astype(mx.float16)
            c.update_and_fetch(shared[layer], shared[layer])
            c.update_and_fetch(tail, tail)
            cs.append(c)
        mx.eval([c.state for c in cs])
        lru.insert_cache("m", toks, cs)
        if one is None:
            one = lru.nbytes
    return one, lru.nbytes


def run(n_tokens, repeats):
    prompt = list(range(n_tokens))
    query = prompt[: n_tokens // 2] + [n_tokens + 1] * 16  # shares half, then diverges
    caches = {"kvcore": layers(n_tokens, kvcore.KVCache), "mlx-lm": layers(n_tokens, ref.KVCache)}
    classes = {"kvcore": kvcore.LRUPromptCache, "mlx-lm": ref.LRUPromptCache}
    times = {(k, op): [] for k in classes for op in ("insert", "fetch")}
    for r in range(repeats):
        order = list(classes) if r % 2 == 0 else list(classes)[::-1]
        for name in order:
            lru = classes[name]()
            # A second entry so the trie has a branch to walk past.
            lru.insert_cache("m", prompt[:100] + [7], caches[name])
            times[(name, "insert")].append(timed(lambda: lru.insert_cache("m", prompt, caches[name])))
            times[(name, "fetch")].append(timed(lambda: fetched(lru, query)))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"# LRUPromptCache, {platform.machine()} {platform.system()}, mlx {mx.__version__}, "
          f"median of {args.repeats}, ms")
    print("| tokens | op | kvcore ms | mlx-lm ms | kvcore / mlx-lm |")
    print("|---:|---|---:|---:|---:|")
    for n in (1024, 8192, 32768):
        res = run(n, args.repeats)
        for op in ("insert", "fetch"):
            a, b = res[("kvcore", op)], res[("mlx-lm", op)]
            print(f"| {n} | {op} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
    print()
    print("16 conversations sharing a 4096-token prefix, 64 tokens each of their own (8 layers, 2 KV heads x 64, float16):")
    print("| | one conversation, MB | sixteen, MB | sixteen / one |")
    print("|---|---:|---:|---:|")
    for name, make_cache, make_lru in (
        ("kvcore", kvcore.KVCache, lambda: kvcore.LRUPromptCache(max_size=64)),
        ("kvcore, share=False", kvcore.KVCache, lambda: kvcore.LRUPromptCache(max_size=64, share=False)),
        ("mlx-lm", ref.KVCache, lambda: ref.LRUPromptCache(max_size=64)),
    ):
        one, sixteen = conversations(make_cache, make_lru)
        print(f"| {name} | {one / 1e6:.2f} | {sixteen / 1e6:.2f} | {sixteen / one:.3f} |")


if __name__ == "__main__":
    main()
