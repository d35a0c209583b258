"""Peak memory of a chunked prefill into one layer's cache: quantized caches
against the float cache of the same capacity, kvcore and mlx-lm side by
side in one run.

Each case fills one cache with `context` tokens in chunks of `chunk` (as
mlx-lm's generate_step prefills), evaluating after every chunk. The chunk's
keys and values exist before mx.reset_peak_memory(), mx.clear_cache() runs
between cases, and the figure is mx.get_peak_memory() less the memory in use
before the first chunk: what the cache and its temporaries added. Rows give
it, and the cache's final nbytes, as ratios to the peak of the float cache
of the same library and the same capacity (kvcore's KVCache with or without
`capacity=`; mlx-lm's KVCache, which has none). A ratio above 1 is a
quantized prefill that peaks above float.

    python bench/bench_quantized_prefill_peak.py                 # 8k and 32k, chunks 512 and 2048, D 64 and 128
    python bench/bench_quantized_prefill_peak.py --quick         # 8k, chunk 2048, D 128
    python bench/bench_quantized_prefill_peak.py --layout model  # keys and values as a model's attention makes them

--layout model passes (B, L, H, D) arrays transposed to (B, H, L, D), the
strided views mlx-lm's attention layers give the cache, instead of
contiguous ones. Writes a Markdown table to stdout (and --out).
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time

import mlx.core as mx

B, H = 1, 8


def cases(T):
    """(label, library, float reference label, constructor)."""
    import kvcore
    from mlx_lm.models import cache as mc

    def q(bits, scheme="affine", cap=False, group=64):
        kw = {"capacity": T} if cap else {}
        if scheme != "affine":
            kw["scheme"] = scheme
        return lambda: kvcore.QuantizedKVCache(group_size=group, bits=bits, **kw)

    out = [
        ("float", "mlx-lm", "float", mc.KVCache),
        ("affine 8", "mlx-lm", "float", lambda: mc.QuantizedKVCache(group_size=64, bits=8)),
        ("affine 4", "mlx-lm", "float", lambda: mc.QuantizedKVCache(group_size=64, bits=4)),
    ]
    for cap in (False, True):
        tag = ", capacity" if cap else ""
        ref = "float" + tag
        out.append((ref, "kvcore", ref, (lambda: kvcore.KVCache(capacity=T)) if cap else kvcore.KVCache))
        for bits in (8, 4, (8, 4)):
            name = f"({bits[0]}, {bits[1]})" if isinstance(bits, tuple) else str(bits)
            out.append((f"affine {name}{tag}", "kvcore", ref, q(bits, cap=cap)))
        for bits in (4, 3):
            out.append((f"rotated-channel {bits}{tag}", "kvcore", ref,
                        q(bits, "rotated-channel", cap=cap)))
    return out


def make_inputs(D, chunk, layout, seed):
    mx.random.seed(seed)
    if layout == "model":
        shape = (B, chunk, H, D)
        k, v = (mx.random.normal(shape).astype(mx.float16).transpose(0, 2, 1, 3) for _ in range(2))
    else:
        shape = (B, H, chunk, D)
        k, v = (mx.random.normal(shape).astype(mx.float16) for _ in range(2))
    mx.eval(k, v)
    return k, v


def peak_of(make, k, v, context, chunk):
    """(peak less the memory in use before, final nbytes) of one prefill."""
    c = make()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for _ in range(context // chunk):
        out = c.update_and_fetch(k, v)
        mx.eval(out)
        del out
    mx.synchronize()
    peak = mx.get_peak_memory() - before
    nbytes = c.nbytes
    del c
    return peak, nbytes


def machine():
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "")
    except OSError:
        model = ""
    import os

    return f"{platform.machine()} {model}, {os.cpu_count()} cores, mlx {mx.__version__}, device {mx.default_device()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--chunks", default="512,2048")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layout", choices=("contiguous", "model"), default="contiguous")
    ap.add_argument("--quick", action="store_true", help="8k context, chunks of 2048, head dim 128, 2 repeats")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.chunks, args.head_dims, args.repeats = "8192", "2048", "128", 2
    contexts = [int(x) for x in args.contexts.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    dims = [int(x) for x in args.head_dims.split(",")]

    lines = [
        "# Quantized prefill peak",
        "",
        f"`python bench/bench_quantized_prefill_peak.py --layout {args.layout} --repeats {args.repeats}"
        f" --contexts {args.contexts} --chunks {args.chunks} --head-dims {args.head_dims}`",
        "",
        f"{machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
        f"One layer, {B} x {H} KV heads, float16 {args.layout} inputs. Peak: mx.get_peak_memory() less the",
        "memory in use before the first chunk, median over the repeats (max/min spread in brackets when",
        "they differ). Ratios are to the peak of the same library's float cache of the same capacity.",
        "",
    ]
    start = time.perf_counter()
    for D in dims:
        for T in contexts:
            for chunk in chunks:
                k, v = make_inputs(D, chunk, args.layout, seed=D + T + chunk)
                table = cases(T)
                peaks = {(label, lib): [] for label, lib, _, _ in table}
                sizes = {}
                for r in range(args.repeats):
                    # kvcore and mlx-lm alternate which goes first
                    order = table if r % 2 == 0 else table[::-1]
                    for label, lib, _, make in order:
                        p, n = peak_of(make, k, v, T, chunk)
                        peaks[(label, lib)].append(p)
                        sizes[(label, lib)] = n
                print(f"D {D}, context {T}, chunk {chunk}: {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
                lines += [
                    f"## head dim {D}, context {T}, chunks of {chunk}",
                    "",
                    "| library | cache | peak MB | cache MB | peak / float peak | cache / float peak |",
                    "|---|---|---:|---:|---:|---:|",
                ]
                for label, lib, ref, _ in table:
                    ps = peaks[(label, lib)]
                    med = statistics.median(ps)
                    fl = statistics.median(peaks[(ref, lib)])
                    lo, hi = f"{min(ps) / 1e6:.1f}", f"{max(ps) / 1e6:.1f}"
                    spread = f" ({lo}-{hi})" if lo != hi else ""
                    size = sizes[(label, lib)]
                    if fl < 0.01 * sizes[(ref, lib)]:
                        # One chunk fills the float buffer: it shares the input's memory.
                        ratios = "n/a | n/a"
                    else:
                        mark = " **above**" if med > fl else ""
                        ratios = f"{med / fl:.3f}{mark} | {size / fl:.3f}"
                    lines.append(f"| {lib} | {label} | {med / 1e6:.1f}{spread} | {size / 1e6:.1f} | {ratios} |")
                lines.append("")
                del k, v
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
