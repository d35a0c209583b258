"""LRUPromptCache: kvcore's (C++ radix tree) against mlx-lm's, in one run.

insert_cache and fetch_nearest_cache for 1k, 8k and 32k-token prompts, on
a prompt cache of 8 KVCache layers (2 KV heads x 64, float16), the case the
issue measured. Each figure is the median over repeats, the two classes
interleaved; the ratio is kvcore / mlx-lm.

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
            times[(name, "fetch")].append(timed(lambda: lru.fetch_nearest_cache("m", query)))
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


if __name__ == "__main__":
    main()
