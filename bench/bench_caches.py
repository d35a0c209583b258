"""kvcore against mlx-lm, side by side in one process.

Per-call cost of each cache's hot operations (timed as a decode loop makes
the calls: one per layer cache, then an evaluation, step after step), and
end-to-end decode with
mlx-lm's generate_step on a small random model. The two implementations run
interleaved (their order alternating each repeat) on identical inputs; each
figure is a ratio kvcore / mlx-lm with min and median over repeats.

    python bench/bench_caches.py [--repeats 15] [--calls 256] [--quick]

Writes bench/results/<device>.json, .md and .png (if matplotlib is there).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import cache as ref

import kvcore

B, H, D = 1, 8, 64
DTYPE = mx.float16


def kv(S, b=B):
    k = mx.random.normal((b, H, S, D)).astype(DTYPE)
    v = mx.random.normal((b, H, S, D)).astype(DTYPE)
    mx.eval(k, v)
    return k, v


# Each case: name, how to build and prime a cache from a module (mlx-lm's
# cache module or kvcore), and the call to time.
def update_case(name, make, prefill, S=1):
    step = kv(S)

    def setup(mod):
        c = make(mod)
        if prefill:
            c.update_and_fetch(*kv(prefill))
        mx.eval(c.keys, c.values)
        return c

    def call(c):
        return c.update_and_fetch(*step)

    return name, setup, call


def mask_case(name, make, prefill, N, **kw):
    def setup(mod):
        c = make(mod)
        c.update_and_fetch(*kv(prefill))
        mx.eval(c.keys, c.values)
        return c

    def call(c):
        return c.make_mask(N, **kw)

    return name, setup, call


def state_case(name, make, prefill):
    def setup(mod):
        c = make(mod)
        c.update_and_fetch(*kv(prefill))
        mx.eval(c.keys, c.values)
        return c

    def call(c):
        return type(c).from_state(c.state)

    return name, setup, call


def arrays_case(name):
    conv = mx.zeros((B, 3, 256)).astype(DTYPE)
    ssm = mx.zeros((B, 8, 64, 16)).astype(DTYPE)
    mx.eval(conv, ssm)

    def setup(mod):
        c = mod.ArraysCache(2)
        c[0], c[1] = conv, ssm
        return c

    def call(c):  # what a state-space layer does each step
        a, b = c[0], c[1]
        c[0], c[1] = conv, ssm
        return a

    return name, setup, call


BATCH = 4
PADDING = [3, 0, 7, 1]


def batch_kv(S):
    return kv(S, b=BATCH)


def batch_setup(mod, rotating, prefill=100):
    c = mod.BatchRotatingKVCache(128, PADDING) if rotating else mod.BatchKVCache(PADDING)
    c.update_and_fetch(*batch_kv(prefill))
    mx.eval(c.keys, c.values, c.offset, c.left_padding)
    return c


def batch_update_case(name, rotating, prefill):
    step = batch_kv(1)
    return name, lambda mod: batch_setup(mod, rotating, prefill), lambda c: c.update_and_fetch(*step)


def batch_layer_case(name, rotating, prefill):
    """What one attention layer does with a batch cache per decode step:
    read `offset` for RoPE, then update."""
    step = batch_kv(1)

    def call(c):
        c.offset
        return c.update_and_fetch(*step)

    return name, lambda mod: batch_setup(mod, rotating, prefill), call


def batch_mask_case(name, rotating, N):
    return name, lambda mod: batch_setup(mod, rotating, 200), lambda c: c.make_mask(N)


def fresh_case(name, make_one, op):
    """An operation that changes its cache: each call gets a cache of its own,
    built before the clock starts."""

    def setup(mod):
        return iter([make_one(mod) for _ in range(FRESH_CALLS)])

    def call(caches):
        return op(next(caches))

    return name, setup, call


def merge_case(name, rotating):
    def setup(mod):
        singles = []
        for n in (40, 100, 7, 64):
            c = mod.RotatingKVCache(128) if rotating else mod.KVCache()
            c.update_and_fetch(*kv(n))
            singles.append(c)
        mx.eval([c.state for c in singles])
        return singles

    def call(singles):
        return type(singles[0]).merge(singles).keys

    return name, setup, call


FRESH_CALLS = 64

CASES = [
    update_case("KVCache.update_and_fetch S=1", lambda m: m.KVCache(), 100),
    update_case("KVCache.update_and_fetch S=16", lambda m: m.KVCache(), 100, S=16),
    update_case("RotatingKVCache.update_and_fetch S=1 (ring full)",
                lambda m: m.RotatingKVCache(max_size=128, keep=4), 200),
    update_case("RotatingKVCache.update_and_fetch S=1 (filling)",
                lambda m: m.RotatingKVCache(max_size=4096, keep=4), 100),
    update_case("RotatingKVCache.update_and_fetch S=16",
                lambda m: m.RotatingKVCache(max_size=128, keep=4), 200, S=16),
    update_case("ConcatenateKVCache.update_and_fetch S=1",
                lambda m: m.ConcatenateKVCache(), 100),
    update_case("QuantizedKVCache.update_and_fetch S=1 (8 bits)",
                lambda m: m.QuantizedKVCache(group_size=64, bits=8), 100),
    update_case("QuantizedKVCache.update_and_fetch S=1 (4 bits)",
                lambda m: m.QuantizedKVCache(group_size=64, bits=4), 100),
    update_case("ChunkedKVCache.update_and_fetch S=1",
                lambda m: m.ChunkedKVCache(chunk_size=512), 100),
    arrays_case("ArraysCache 2 slots get+set"),
    batch_update_case("BatchKVCache.update_and_fetch S=1 (4 seqs)", False, 100),
    batch_update_case("BatchRotatingKVCache.update_and_fetch S=1 (4 seqs, ring full)", True, 200),
    batch_layer_case("BatchKVCache layer step: offset + update (4 seqs)", False, 100),
    batch_layer_case("BatchRotatingKVCache layer step: offset + update (4 seqs)", True, 200),
    batch_mask_case("BatchKVCache.make_mask N=1", False, 1),
    batch_mask_case("BatchRotatingKVCache.make_mask N=1", True, 1),
    fresh_case("BatchKVCache.filter", lambda m: batch_setup(m, False),
               lambda c: c.filter([0, 2, 3])),
    fresh_case("BatchKVCache.extend", lambda m: (batch_setup(m, False), batch_setup(m, False, 30)),
               lambda pair: pair[0].extend(pair[1])),
    merge_case("KVCache.merge (4 caches)", False),
    merge_case("RotatingKVCache.merge (4 caches)", True),
    mask_case("KVCache.make_mask N=1", lambda m: m.KVCache(), 100, 1,
              return_array=False, window_size=None),
    mask_case("KVCache.make_mask N=16 array", lambda m: m.KVCache(), 100, 16,
              return_array=True, window_size=None),
    mask_case("RotatingKVCache.make_mask N=1 window", lambda m: m.RotatingKVCache(max_size=128),
              200, 1, window_size=64),
    state_case("KVCache.from_state(state)", lambda m: m.KVCache(), 100),
    state_case("RotatingKVCache.from_state(state)",
               lambda m: m.RotatingKVCache(max_size=128, keep=4), 200),
]


LAYERS = 8  # caches per simulated decode step


def _arrays(out):
    if isinstance(out, mx.array):
        return [out]
    if isinstance(out, (tuple, list)):
        return [a for x in out for a in _arrays(x)]
    return []


def time_calls(setup, call, mod, calls):
    """Per-call time as a decode loop sees it: one call on each of LAYERS
    caches (timed), then everything evaluated (not timed), step after step.
    Caches that a call changes for good get one cache per call instead."""
    first = setup(mod)
    if hasattr(first, "__next__"):
        calls = min(calls, FRESH_CALLS)
        start = time.perf_counter()
        for _ in range(calls):
            out = call(first)
        elapsed = time.perf_counter() - start
        mx.eval(_arrays(out))
        return elapsed / calls * 1e6
    caches = [first] + [setup(mod) for _ in range(LAYERS - 1)]
    steps = max(1, calls // LAYERS)
    elapsed = 0.0
    for _ in range(steps):
        outs = []
        start = time.perf_counter()
        for c in caches:
            outs.append(call(c))
        elapsed += time.perf_counter() - start
        mx.eval(_arrays(outs), [c.state for c in caches if hasattr(c, "state")])
    return elapsed / (steps * LAYERS) * 1e6


def run_case(case, repeats, calls):
    name, setup, call = case
    times = {"mlx-lm": [], "kvcore": []}
    mods = [("mlx-lm", ref), ("kvcore", kvcore)]
    for _ in range(2):  # warm-up
        for label, mod in mods:
            time_calls(setup, call, mod, calls)
    for r in range(repeats):
        for label, mod in (mods if r % 2 == 0 else mods[::-1]):
            times[label].append(time_calls(setup, call, mod, calls))
    ref_med = statistics.median(times["mlx-lm"])
    kv_med = statistics.median(times["kvcore"])
    return {
        "case": name,
        "mlx_lm_us": {"min": min(times["mlx-lm"]), "median": ref_med},
        "kvcore_us": {"min": min(times["kvcore"]), "median": kv_med},
        "ratio_median": kv_med / ref_med,
        "ratio_min": min(times["kvcore"]) / min(times["mlx-lm"]),
    }


def decode_case(repeats, tokens, max_kv_size=None):
    """generate_step on a small random Qwen2 model, tokens/s per cache."""
    from mlx_lm.generate import generate_step

    from kvcore._demo import tiny_qwen2

    model = tiny_qwen2(layers=8)
    prompt = mx.array(list(range(1, 65)))
    rates = {"mlx-lm": [], "kvcore": []}
    peaks = {}
    mods = [("mlx-lm", ref), ("kvcore", kvcore)]
    for r in range(repeats + 1):
        for label, mod in (mods if r % 2 == 0 else mods[::-1]):
            cache = mod.make_prompt_cache(model, max_kv_size=max_kv_size)
            mx.reset_peak_memory()
            start = time.perf_counter()
            for _, _ in zip(generate_step(prompt, model, prompt_cache=cache, max_tokens=tokens),
                            range(tokens)):
                pass
            elapsed = time.perf_counter() - start
            if r > 0:  # the first round warms up
                rates[label].append(tokens / elapsed)
                peaks[label] = max(peaks.get(label, 0), mx.get_peak_memory())
    name = "generate_step tokens/s" + (f" (max_kv_size={max_kv_size})" if max_kv_size else "")
    ref_med = statistics.median(rates["mlx-lm"])
    kv_med = statistics.median(rates["kvcore"])
    return {
        "case": name,
        "mlx_lm_tok_s": {"max": max(rates["mlx-lm"]), "median": ref_med},
        "kvcore_tok_s": {"max": max(rates["kvcore"]), "median": kv_med},
        # A time ratio like the others: below 1 means kvcore is faster.
        "ratio_median": ref_med / kv_med,
        "ratio_min": max(rates["mlx-lm"]) / max(rates["kvcore"]),
        "peak_memory_mb": {k: v / 2**20 for k, v in peaks.items()},
    }


def write_reports(results, meta, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / meta["device"].replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"# kvcore vs mlx-lm ({meta['device']}, mlx {meta['mlx']}, {meta['when']})",
        "",
        "| case | mlx-lm | kvcore | ratio (median) | ratio (min) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "mlx_lm_us" in r:
            a = f"{r['mlx_lm_us']['median']:.2f} us"
            b = f"{r['kvcore_us']['median']:.2f} us"
        else:
            a = f"{r['mlx_lm_tok_s']['median']:.1f} tok/s"
            b = f"{r['kvcore_tok_s']['median']:.1f} tok/s"
        lines.append(f"| {r['case']} | {a} | {b} | {r['ratio_median']:.3f} | {r['ratio_min']:.3f} |")
    lines += ["", "ratio = kvcore time / mlx-lm time (below 1: kvcore is faster)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return stem
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(results) + 1.5))
    names = [r["case"] for r in results][::-1]
    ratios = [r["ratio_median"] for r in results][::-1]
    ax.barh(names, ratios, color=["#3a7" if x < 1 else "#c44" for x in ratios])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.2, color="#888", lw=0.8, ls="--")
    ax.set_xlabel("kvcore time / mlx-lm time (median)")
    ax.set_title(f"kvcore vs mlx-lm, {meta['device']}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    return stem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calls", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    p.add_argument("--only", default="", help="run cases whose name contains this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.quick:
        args.repeats, args.calls, args.decode_tokens = 3, 64, 16
    mx.random.seed(0)
    device = str(mx.default_device())
    meta = {
        "device": f"{device} {platform.machine()}",
        "mlx": mx.__version__,
        "kvcore": kvcore.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "calls_per_repeat": args.calls,
        "when": time.strftime("%Y-%m-%d"),
    }
    cases = [c for c in CASES if args.only in c[0]]
    results = []
    total = len(cases) + 2
    for i, case in enumerate(cases, 1):
        r = run_case(case, args.repeats, args.calls)
        results.append(r)
        print(f"[{i}/{total}] {r['case']}: mlx-lm {r['mlx_lm_us']['median']:.2f} us, "
              f"kvcore {r['kvcore_us']['median']:.2f} us, ratio {r['ratio_median']:.3f}",
              flush=True)
    if not args.only:
        for i, kw in enumerate([{}, {"max_kv_size": 48}], len(cases) + 1):
            r = decode_case(max(3, args.repeats // 3), args.decode_tokens, **kw)
            results.append(r)
            print(f"[{i}/{total}] {r['case']}: mlx-lm {r['mlx_lm_tok_s']['median']:.1f}, "
                  f"kvcore {r['kvcore_tok_s']['median']:.1f}, time ratio {r['ratio_median']:.3f}",
                  flush=True)
    stem = write_reports(results, meta, Path(args.out))
    print(f"wrote {stem}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
