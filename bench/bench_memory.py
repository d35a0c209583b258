"""Memory: what quantized caches and a reserved capacity save, and what they
cost, with kvcore and mlx-lm side by side in one run wherever mlx-lm can run
the case (mlx-lm quantizes only KVCache, with one int for bits).

1. bytes per cached token of every cache kind at float16, 8, 4 and (8, 4)
   bits (keys 8, values 4), and the ratio to float16;
2. quality: the attention output's relative error on fixed random keys,
   values and queries, and token agreement with the float16 cache over a
   decode on random-weight models (a Qwen2-shaped one, a gemma3_text one
   with sliding-window layers, and the latter with full attention only, which
   mlx-lm can quantize);
3. decode tokens/s with each quantized cache after a 1k (and 16k) context;
4. the peak memory of a 32k-token prefill into one KVCache layer, with and
   without a reserved capacity.

    python bench/bench_memory.py [--quick] [--long] [--repeats 3] [--case-timeout 300]
                                 [--sections bytes,attention,agreement,decode,peak]

Sections 1 and 2 are deterministic and run in this process. Sections 3 and 4
run each case in a child process: a clean peak, and a time limit, so a case
that hangs or fails on a backend (a kernel missing, say) becomes a row that
says so. Decode cases run interleaved, kvcore and mlx-lm alternating which
goes first, for --repeats rounds; each figure is the median (and best) over
them, and the ratio is kvcore time / mlx-lm time as in bench_caches.py.

Writes <out>/<device>-memory.json and .md.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

# Section 1 and 2(a) shapes: one layer of a model with 8 KV heads of 128.
H, D = 8, 128
TOKENS = 1024  # a multiple of the caches' 256-token growth step: no slack
GROUP = 64  # the default group size (mlx-lm's)
SPECS = [("float16", None), ("8 bits", 8), ("4 bits", 4), ("(8, 4) bits", (8, 4))]
LIBS = ("kvcore", "mlx-lm")


def module(lib):
    """kvcore, or mlx-lm's cache module."""
    if lib == "kvcore":
        import kvcore

        return kvcore
    from mlx_lm.models import cache

    return cache


class Missing(Exception):
    """A case the library has no way to run (no such method)."""


def first_line(e):
    """An exception as one short line for a table cell: its first sentence."""
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > 80 and ". " in text:
        text = text[:text.index(". ") + 1]
    return text[:160] if isinstance(e, Missing) else f"{type(e).__name__}: {text}"[:160]


def device_name():
    if mx.default_device().type == mx.gpu:
        try:
            return mx.device_info()["device_name"].replace(" ", "-").lower()
        except Exception:  # noqa: BLE001 - a backend without the call
            return "gpu"
    return f"cpu-{os.cpu_count()}core"


def random_kv(shape, seed):
    k1, k2 = mx.random.split(mx.random.key(seed))
    k = mx.random.normal(shape, key=k1).astype(mx.float16)
    v = mx.random.normal(shape, key=k2).astype(mx.float16)
    mx.eval(k, v)
    return k, v


# -- 1. bytes per token ---------------------------------------------------------

# Each kind: how to build an empty one holding T tokens (the rotating ones
# with a window of exactly T so that every token is held) and its batch size.
KINDS = [
    ("KVCache", lambda m, T: m.KVCache(), 1),
    ("RotatingKVCache", lambda m, T: m.RotatingKVCache(max_size=T), 1),
    ("ChunkedKVCache", lambda m, T: m.ChunkedKVCache(chunk_size=T), 1),
    ("BatchKVCache", lambda m, T: m.BatchKVCache([0, 0]), 2),
    ("BatchRotatingKVCache", lambda m, T: m.BatchRotatingKVCache(T, [0, 0]), 2),
]


def filled(make, lib, T, B):
    c = make(module(lib), T)
    k, v = random_kv((B, H, T, D), seed=1)
    c.update_and_fetch(k, v)
    mx.eval(c.state)
    return c


def quantize(c, lib, group_size, bits):
    """c.to_quantized(...), or the reason there is none as an exception."""
    if not hasattr(c, "to_quantized"):
        if lib == "kvcore":
            raise Missing(f"{type(c).__name__}.to_quantized not available in this build")
        raise Missing(f"mlx-lm has no {type(c).__name__}.to_quantized")
    return c.to_quantized(group_size=group_size, bits=bits)


def bytes_per_token(kinds=KINDS, group_sizes=(GROUP,), specs=SPECS, T=TOKENS):
    """nbytes / tokens held, for every kind, library and quantization."""
    rows = []
    for kind, make, B in kinds:
        for group_size in group_sizes:
            for lib in LIBS:
                base = filled(make, lib, T, B).nbytes / (T * B)
                for label, bits in specs:
                    row = {"kind": kind, "lib": lib, "group_size": group_size, "spec": label}
                    try:
                        c = filled(make, lib, T, B)
                        q = c if bits is None else quantize(c, lib, group_size, bits)
                        mx.eval(q.state)
                        row["bytes_per_token"] = q.nbytes / (T * B)
                        row["ratio"] = row["bytes_per_token"] / base
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        row["error"] = first_line(e)
                    rows.append(row)
    return rows


# -- 2(a). attention error --------------------------------------------------------


def attention(q, keys, values, cache, scale):
    """The attention a model runs on this cache: mx.fast for float caches,
    mlx-lm's quantized attention for one int of bits, kvcore's for a pair."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    import kvcore

    bits = getattr(cache, "bits", None)
    if bits is None:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    if isinstance(bits, tuple):
        return kvcore.scaled_dot_product_attention(q, keys, values, cache=cache, scale=scale, mask=None)
    # mlx-lm's scales its queries in place (`queries *= scale`): hand it a copy.
    return quantized_scaled_dot_product_attention(
        mx.array(q), keys, values, scale=scale, mask=None, group_size=cache.group_size, bits=bits)


def attention_error(group_size=GROUP, T=TOKENS):
    """||o_q - o_f|| / ||o_f|| for one query over T random tokens, 16 query
    heads on 8 KV heads. Each cache holds T - 1 tokens, is quantized, and
    takes the last one as a decode step does, returning what attention reads."""
    rows = []
    kinds = [k for k in KINDS if k[0] != "ChunkedKVCache"]
    q = mx.random.normal((2, 2 * H, 1, D), key=mx.random.key(7)).astype(mx.float16)
    outputs = {}  # (kind, lib, spec) -> output, to compare kvcore's with mlx-lm's
    for kind, make, B in kinds:
        k, v = random_kv((B, H, T, D), seed=8)
        qb = q[:B]
        for lib in LIBS:
            want = None
            for label, bits in SPECS:
                row = {"kind": kind, "lib": lib, "spec": label, "group_size": group_size}
                try:
                    c = make(module(lib), T)
                    c.update_and_fetch(k[:, :, :-1], v[:, :, :-1])
                    if bits is not None:
                        c = quantize(c, lib, group_size, bits)
                    keys, values = c.update_and_fetch(k[:, :, -1:], v[:, :, -1:])
                    out = attention(qb, keys, values, c, D ** -0.5).astype(mx.float32)
                    mx.eval(out)
                    if bits is None:
                        want = out
                    outputs[kind, lib, label] = out
                    err = mx.linalg.norm(out - want) / mx.linalg.norm(want)
                    row["rel_error"] = err.item()
                except Exception as e:  # noqa: BLE001 - reported in the table
                    row["error"] = first_line(e)
                rows.append(row)
    for row in rows:  # kvcore's output against mlx-lm's where both exist
        a = outputs.get((row["kind"], "kvcore", row["spec"]))
        b = outputs.get((row["kind"], "mlx-lm", row["spec"]))
        if row["lib"] == "kvcore" and a is not None and b is not None:
            row["equals_mlx_lm"] = bool(mx.array_equal(a, b).item())
    return rows


# -- 2(b). token agreement on random-weight models ----------------------------------


def qwen2_model():
    """kvcore's demo model: Qwen2-shaped, 4 layers, 2 KV heads of 32, float16."""
    from kvcore._demo import tiny_qwen2

    model = tiny_qwen2(layers=4, seed=0)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def gemma3_model(pattern=2):
    """gemma3_text, 4 layers alternating a 64-token sliding window and full
    attention (pattern 2; pattern 1: full attention only), 2 KV heads of 128,
    float16, random weights."""
    from mlx_lm.models import gemma3_text

    mx.random.seed(0)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=256, num_hidden_layers=4, intermediate_size=512,
        num_attention_heads=4, head_dim=128, num_key_value_heads=2, vocab_size=512,
        sliding_window=64, sliding_window_pattern=pattern, query_pre_attn_scalar=128)
    model = gemma3_text.Model(args)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


# name, builder, group size that divides its head dim. The third is the
# second without its sliding-window layers: the one gemma3_text mlx-lm can
# quantize, to set its figures beside kvcore's on that architecture.
MODELS = [
    ("qwen2 (tiny_qwen2, head dim 32)", qwen2_model, 32),
    ("gemma3_text (window 64, head dim 128)", gemma3_model, 64),
    ("gemma3_text (full attention only)", lambda: gemma3_model(pattern=1), 64),
]
PROMPT = 96  # longer than gemma3's window: its rings have wrapped before decoding


def use(lib):
    """mlx-lm on kvcore's caches, or on its own; returns make_prompt_cache."""
    import kvcore

    if lib == "kvcore":
        kvcore.patch_mlx_lm()
        return kvcore.make_prompt_cache
    kvcore.unpatch_mlx_lm()
    return module("mlx-lm").make_prompt_cache


def generate(model, lib, bits, group_size, prompt, n, temp=0.0):
    """n tokens from generate_step. One int of bits goes through kv_bits with
    quantized_kv_start=0: generate_step prefills all but the last prompt token
    into float caches, quantizes them, and goes on. kv_bits takes no pair, so
    for one this does the same by hand and passes the quantized caches."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    cache = use(lib)(model)
    kw = {}
    if isinstance(bits, tuple):
        model(prompt[None, :-1], cache=cache)
        mx.eval([c.state for c in cache])
        cache = [quantize(c, lib, group_size, bits) for c in cache]
        prompt = prompt[-1:]
    elif bits is not None:
        kw = {"kv_bits": bits, "kv_group_size": group_size, "quantized_kv_start": 0}
    mx.random.seed(42)  # sampling at temp > 0 draws the same noise every run
    steps = generate_step(prompt, model, prompt_cache=cache, max_tokens=n,
                          sampler=make_sampler(temp=temp), **kw)
    return [int(t) for t, _ in steps]


def forced_logits(model, lib, bits, group_size, prompt, stream):
    """Logits at each step of a fixed token stream (teacher forcing): the
    prompt prefilled into float caches, which are then quantized."""
    cache = use(lib)(model)
    out = [model(prompt[None], cache=cache)[0, -1].astype(mx.float32)]
    mx.eval(out)
    if bits is not None:
        cache = [quantize(c, lib, group_size, bits) for c in cache]
    for t in stream:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32))
        mx.eval(out[-1])
    return out


def agreement(tokens):
    """Each cache against kvcore's float16 cache, over `tokens` decode steps:
    greedy tokens (generate_step), sampled tokens (temperature 1, same seed),
    and top-1 and logits under teacher forcing on a random token stream."""
    import kvcore

    rows, meta = [], {}
    try:
        for name, build, group_size in MODELS:
            model = build()
            prompt = mx.random.randint(0, 512, (PROMPT,), key=mx.random.key(3))
            stream = mx.random.randint(0, 512, (tokens,), key=mx.random.key(4)).tolist()
            greedy = generate(model, "kvcore", None, group_size, prompt, tokens)
            sampled = generate(model, "kvcore", None, group_size, prompt, tokens, temp=1.0)
            forced = forced_logits(model, "kvcore", None, group_size, prompt, stream)
            top = [mx.argmax(x).item() for x in forced]
            meta[name] = {"distinct_greedy_tokens": len(set(greedy)),
                          "distinct_sampled_tokens": len(set(sampled)), "group_size": group_size}
            for label, bits in SPECS:
                for lib in LIBS:
                    if lib == "kvcore" and bits is None:
                        continue  # the reference itself
                    row = {"model": name, "lib": lib, "spec": label, "group_size": group_size,
                           "tokens": tokens}
                    try:
                        g = generate(model, lib, bits, group_size, prompt, tokens)
                        s = generate(model, lib, bits, group_size, prompt, tokens, temp=1.0)
                        f = forced_logits(model, lib, bits, group_size, prompt, stream)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        rows.append({**row, "error": first_line(e)})
                        continue
                    for kind, got, want in (("greedy", g, greedy), ("sampled", s, sampled)):
                        same = [a == b for a, b in zip(got, want)]
                        row[f"{kind}_agreement"] = sum(same) / len(same)
                        row[f"first_{kind}_difference"] = same.index(False) if False in same else None
                    row["forced_top1_agreement"] = sum(
                        mx.argmax(x).item() == t for x, t in zip(f, top)) / len(top)
                    row["forced_logit_rel_error"] = statistics.mean(
                        (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item() for a, b in zip(f, forced))
                    rows.append(row)
    finally:
        kvcore.unpatch_mlx_lm()
    return rows, meta


# -- 3 and 4: cases in child processes ------------------------------------------------


def child_decode(spec):
    """generate_step tokens/s on kvcore's tiny_qwen2 after `context` tokens.
    The context is random keys and values written into each layer's cache in
    2048-token chunks (a model prefill of 16k tokens takes minutes on a CPU
    and changes nothing in what a decode step costs), then quantized."""
    from mlx_lm.generate import generate_step

    lib, context, steps = spec["lib"], spec["context"], spec["steps"]
    bits = tuple(spec["bits"]) if isinstance(spec["bits"], list) else spec["bits"]
    model = qwen2_model()
    caches = use(lib)(model)
    heads = model.args.num_key_value_heads
    head_dim = model.args.hidden_size // model.args.num_attention_heads
    for i, c in enumerate(caches):
        for start in range(0, context, 2048):
            n = min(2048, context - start)
            c.update_and_fetch(*random_kv((1, heads, n, head_dim), seed=100 * i + start))
    mx.eval([c.state for c in caches])
    if bits is not None:
        caches = [quantize(c, lib, spec["group_size"], bits) for c in caches]
        mx.eval([c.state for c in caches])

    def rate(n):
        start = time.perf_counter()
        for _ in generate_step(mx.array([1]), model, prompt_cache=caches, max_tokens=n):
            pass
        return n / (time.perf_counter() - start)

    rate(8)  # warm-up (kernels compile on a GPU)
    rates = [rate(steps) for _ in range(spec["blocks"])]
    return {"tok_s": rates, "cache_bytes": sum(c.nbytes for c in caches)}


def child_peak(spec):
    """mx.get_peak_memory() over a prefill of `tokens` tokens into one
    KVCache layer, 2048-token chunks, evaluated after each."""
    T, chunk = spec["tokens"], spec["chunk"]
    m = module("mlx-lm" if spec["lib"] == "mlx-lm" else "kvcore")
    c = m.KVCache(capacity=T) if spec["lib"] == "kvcore, capacity" else m.KVCache()
    k, v = random_kv((1, H, chunk, D), seed=5)
    mx.synchronize()
    mx.reset_peak_memory()
    inputs = mx.get_active_memory()  # the chunk's keys and values
    for _ in range(T // chunk):
        out = c.update_and_fetch(k, v)
        mx.eval(out)
        del out
    mx.synchronize()
    return {"cache_bytes": c.nbytes, "peak_bytes": mx.get_peak_memory(), "input_bytes": inputs}


def run_child(spec, timeout):
    """One case in a fresh interpreter: its result, or {"error": why}."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line.startswith("ERROR "):
            return {"error": "failed: " + line[len("ERROR "):]}
    if p.returncode < 0:
        return {"error": f"failed: killed by signal {-p.returncode}"}
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"failed: {tail[:160]}"}


def decode_speed(contexts, steps, repeats, group_size, timeout):
    """Every (context, cache) case, both libraries, `repeats` rounds of one
    child each, the order of kvcore and mlx-lm alternating; a case that fails
    or times out is not run again."""
    cases = [(ctx, label, bits) for ctx in contexts for label, bits in SPECS]
    rates = {(ctx, label, lib): [] for ctx, label, _ in cases for lib in LIBS}
    errors = {}
    for r in range(repeats):
        for i, (ctx, label, bits) in enumerate(cases):
            for lib in (LIBS if (r + i) % 2 == 0 else LIBS[::-1]):
                key = (ctx, label, lib)
                if key in errors:
                    continue
                spec = {"case": "decode", "lib": lib, "bits": bits, "group_size": group_size,
                        "context": ctx, "steps": steps, "blocks": 2}
                res = run_child(spec, timeout)
                if "error" in res:
                    errors[key] = res["error"]
                else:
                    rates[key] += res["tok_s"]
                done = f"{statistics.median(rates[key]):.1f} tok/s" if rates[key] else errors[key]
                print(f"  decode round {r + 1}/{repeats}: {ctx} tokens, {label}, {lib}: {done}",
                      flush=True)
    rows = []
    for ctx, label, bits in cases:
        row = {"context": ctx, "spec": label, "group_size": group_size, "steps": steps}
        for lib in LIBS:
            key, r = (ctx, label, lib), rates[(ctx, label, lib)]
            if key in errors:
                row[lib] = {"error": errors[key]}
            elif r:
                row[lib] = {"median": statistics.median(r), "max": max(r), "n": len(r)}
        a, b = row.get("kvcore", {}), row.get("mlx-lm", {})
        if "median" in a and "median" in b:
            # A time ratio like bench_caches.py's: below 1 means kvcore is faster.
            row["ratio_median"] = b["median"] / a["median"]
            row["ratio_min"] = b["max"] / a["max"]
        rows.append(row)
    return rows


def prefill_peak(tokens, chunk, timeout):
    rows = []
    for lib in ("kvcore, capacity", "kvcore", "mlx-lm"):
        res = run_child({"case": "peak", "lib": lib, "tokens": tokens, "chunk": chunk}, timeout)
        if "peak_bytes" in res:
            res["peak_over_cache"] = res["peak_bytes"] / res["cache_bytes"]
            res["peak_less_inputs_over_cache"] = (res["peak_bytes"] - res["input_bytes"]) / res["cache_bytes"]
        rows.append({"lib": lib, "tokens": tokens, "chunk": chunk, **res})
        print(f"  peak: {lib}: {res.get('peak_over_cache', res.get('error'))}", flush=True)
    return rows


# -- report ---------------------------------------------------------------------------


def cell(x, f="{:.3f}"):
    return "" if x is None else f.format(x)


def goals(res):
    """The two figures the features are for."""
    out = {}
    four = [r for r in res.get("bytes", []) if r["spec"] == "4 bits" and r["lib"] == "kvcore"
            and r["group_size"] == GROUP and "ratio" in r]
    if four:
        worst = max(r["ratio"] for r in four)
        out["4-bit bytes / float16 bytes (kvcore, every kind, group 64), goal <= 0.3"] = {
            "value": worst, "met": worst <= 0.3}
    cap = [r for r in res.get("peak", []) if r["lib"] == "kvcore, capacity" and "peak_over_cache" in r]
    if cap:
        v = cap[0]["peak_over_cache"]
        out["32k prefill peak / cache bytes with capacity, goal <= 1.1"] = {"value": v, "met": v <= 1.1}
    return out


def markdown(res):
    m = res["meta"]
    out = [f"# Memory: kvcore and mlx-lm ({m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, {m['date']})",
           "", f"`{m['command']}`", ""]
    if res.get("goals"):
        out += ["| goal | measured | met |", "|---|---:|---|"]
        out += [f"| {k} | {v['value']:.3f} | {'yes' if v['met'] else 'no'} |" for k, v in res["goals"].items()]
        out.append("")
    if "bytes" in res:
        out += [f"## Bytes per cached token ({H} KV heads x {D}, float16 input, {TOKENS} tokens held)", "",
                "nbytes / tokens held (batch kinds: 2 sequences, per sequence-token); "
                "x float16 is against the same kind's float16 cache.", "",
                "| kind | group | cache | kvcore bytes/token | x float16 | mlx-lm bytes/token | x float16 |",
                "|---|---:|---|---:|---:|---:|---:|"]
        by = {}
        for r in res["bytes"]:
            by.setdefault((r["kind"], r["group_size"], r["spec"]), {})[r["lib"]] = r
        for (kind, g, spec), d in by.items():
            cells = []
            for lib in LIBS:
                r = d.get(lib, {})
                if "error" in r:
                    cells += [r["error"], ""]
                else:
                    cells += [cell(r.get("bytes_per_token"), "{:.0f}"), cell(r.get("ratio"))]
            out.append(f"| {kind} | {g} | {spec} | " + " | ".join(cells) + " |")
        out.append("")
    if "attention" in res:
        out += [f"## Attention output error ({TOKENS} random keys and values, {H} KV heads x {D}, "
                f"16 query heads, group {GROUP})", "",
                "||o_q - o_f|| / ||o_f||, quantized cache against the same kind's float16 cache; "
                "mlx-lm's quantized attention for one int of bits, kvcore's for a pair.", "",
                "| kind | cache | kvcore rel. error | equals mlx-lm's output | mlx-lm rel. error |",
                "|---|---|---:|---|---:|"]
        by = {}
        for r in res["attention"]:
            if r["spec"] != "float16":
                by.setdefault((r["kind"], r["spec"]), {})[r["lib"]] = r
        for (kind, spec), d in by.items():
            a, b = d.get("kvcore", {}), d.get("mlx-lm", {})
            same = {True: "yes, bit for bit", False: "no"}.get(a.get("equals_mlx_lm"), "")
            out.append(f"| {kind} | {spec} | {a.get('error') or cell(a.get('rel_error'), '{:.4f}')} | {same} | "
                       f"{b.get('error') or cell(b.get('rel_error'), '{:.4f}')} |")
        out.append("")
    if "agreement" in res:
        n = res["agreement"][0]["tokens"] if res["agreement"] else ""
        out += [f"## Token agreement with the float16 cache ({n} decode steps, random-weight float16 models)", "",
                "Against kvcore's float16 run (mlx-lm's float16 row checks that the two float runs agree). "
                "greedy: generate_step's tokens; sampled: temperature 1, same seed; forced: the same random "
                "token stream fed to both, top-1 of each step's logits, and the logits' mean relative error.", ""]
        for name, d in res.get("agreement_models", {}).items():
            out.append(f"- {name}: group size {d['group_size']}; the float16 run's greedy tokens hold "
                       f"{d['distinct_greedy_tokens']} distinct tokens, its sampled ones "
                       f"{d['distinct_sampled_tokens']}.")
        out += ["", "A run that differs once goes on from another context, so after the first difference "
                "(a step index, from 0) agreement is mostly chance.", "",
                "| model | cache | library | greedy | first greedy difference | sampled | "
                "first sampled difference | forced top-1 | forced logit rel. error |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["agreement"]:
            if "error" in r:
                out.append(f"| {r['model']} | {r['spec']} | {r['lib']} | {r['error']} | | | | | |")
                continue
            first = {k: "none" if r[f"first_{k}_difference"] is None else r[f"first_{k}_difference"]
                     for k in ("greedy", "sampled")}
            out.append(f"| {r['model']} | {r['spec']} | {r['lib']} | {r['greedy_agreement']:.3f} | "
                       f"{first['greedy']} | {r['sampled_agreement']:.3f} | {first['sampled']} | "
                       f"{r['forced_top1_agreement']:.3f} | {r['forced_logit_rel_error']:.4f} |")
        out.append("")
    if "decode" in res:
        d0 = res["decode"][0] if res["decode"] else {}
        out += [f"## Decode tokens/s (tiny_qwen2: 4 layers, 2 KV heads x 32, float16; group size "
                f"{d0.get('group_size', '')}; generate_step, {d0.get('steps', '')} tokens a block)", "",
                "Median (best) over blocks and rounds; ratio = kvcore time / mlx-lm time "
                "(below 1: kvcore is faster).", "",
                "| context | cache | kvcore tok/s | mlx-lm tok/s | ratio (median) | ratio (min) |",
                "|---:|---|---:|---:|---:|---:|"]
        for r in res["decode"]:
            cells = []
            for lib in LIBS:
                x = r.get(lib, {})
                cells.append(x["error"] if "error" in x else f"{x['median']:.1f} ({x['max']:.1f})" if x else "")
            out.append(f"| {r['context']} | {r['spec']} | {cells[0]} | {cells[1]} | "
                       f"{cell(r.get('ratio_median'), '{:.2f}')} | {cell(r.get('ratio_min'), '{:.2f}')} |")
        out.append("")
    if "peak" in res:
        p0 = res["peak"][0] if res["peak"] else {}
        out += [f"## Peak memory of a {p0.get('tokens', '')}-token prefill into one KVCache "
                f"({H} x {D}, float16, {p0.get('chunk', '')}-token chunks, B=1)", "",
                "mx.get_peak_memory() after mx.reset_peak_memory() in a fresh process; the peak includes "
                "the chunk's keys and values (inputs).", "",
                "| cache | cache MB | peak MB | peak / cache | (peak - inputs) / cache |",
                "|---|---:|---:|---:|---:|"]
        for r in res["peak"]:
            if "error" in r:
                out.append(f"| {r['lib']} | {r['error']} | | | |")
            else:
                out.append(f"| {r['lib']} | {r['cache_bytes'] / 1e6:.1f} | {r['peak_bytes'] / 1e6:.1f} | "
                           f"{r['peak_over_cache']:.3f} | {r['peak_less_inputs_over_cache']:.3f} |")
        out.append("")
    for k, e in res.get("section_errors", {}).items():
        out += [f"Section {k} failed: {e}", ""]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 64 agreement steps, 1k context only, 16 decode steps, one round")
    p.add_argument("--long", action="store_true",
                   help="decode at 16k context on a CPU too (always on a GPU); at the default steps and "
                        "repeats this takes about 20 minutes on a 2-core CPU")
    p.add_argument("--contexts", default="", help="decode contexts, e.g. 1024,16384 (overrides --long)")
    p.add_argument("--repeats", type=int, default=3, help="decode rounds")
    p.add_argument("--decode-steps", type=int, default=64, help="tokens per timed decode block")
    p.add_argument("--decode-group-size", type=int, default=32, help="tiny_qwen2's head dim is 32")
    p.add_argument("--agreement-tokens", type=int, default=256)
    p.add_argument("--peak-tokens", type=int, default=32768)
    p.add_argument("--case-timeout", type=int, default=300, help="seconds per child process")
    p.add_argument("--sections", default="bytes,attention,agreement,decode,peak",
                   help="comma-separated subset to run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:  # one case of section 3 or 4, its result on stdout
        spec = json.loads(args.child)
        try:
            result = (child_decode if spec["case"] == "decode" else child_peak)(spec)
        except Exception as e:  # noqa: BLE001 - the parent reports it
            print("ERROR " + first_line(e), flush=True)
            return 1
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import mlx_lm

    import kvcore

    on_gpu = mx.default_device().type == mx.gpu
    if args.quick:
        args.agreement_tokens, args.decode_steps, args.repeats = 64, 16, 1
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    else:
        contexts = [1024, 16384] if (on_gpu or args.long) and not args.quick else [1024]
    sections = args.sections.split(",")
    res = {"meta": {
        "device": device_name(),
        "mlx_device": str(mx.default_device()),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "kvcore": kvcore.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python"] + sys.argv),
        "quick": args.quick,
    }}
    mx.random.seed(0)
    jobs = [
        # Every kind at the default group size, then KVCache at the others.
        ("bytes", lambda: bytes_per_token()
         + bytes_per_token(KINDS[:1], group_sizes=(32, 128), specs=SPECS[1:])),
        ("attention", lambda: attention_error()),
        ("agreement", lambda: agreement(args.agreement_tokens)),
        ("decode", lambda: decode_speed(contexts, args.decode_steps, args.repeats,
                                        args.decode_group_size, args.case_timeout)),
        ("peak", lambda: prefill_peak(args.peak_tokens, 2048, args.case_timeout)),
    ]
    for name, job in jobs:
        if name not in sections:
            continue
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        try:
            out = job()
            if name == "agreement":
                out, res["agreement_models"] = out
            res[name] = out
        except Exception as e:  # noqa: BLE001 - a section that fails says so
            res.setdefault("section_errors", {})[name] = first_line(e)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    res["goals"] = goals(res)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{res['meta']['device']}-memory"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
