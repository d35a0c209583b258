"""Quality of each KV setting on the real model (SmolLM2-135M-Instruct, or
--model): perplexity of an English text read through the cache in chunks,
and greedy-token agreement with float.

    python bench/bench_quality.py [--tokens 4096] [--chunk 512] [--gen 256]
                                  [--settings float,8,8:4,4,3] [--out FILE.md]

The text is Genesis 1-10, King James Version (public domain;
bench/data/kjv-genesis-1-10.txt, taken from Debian's bible-kjv-text package):
7749 tokens with this model's tokenizer.

- Perplexity: the first --tokens tokens are fed --chunk at a time into one
  cache per setting; a quantized setting's cache is quantized from the first
  token (every key and value is stored quantized as it is written), so every
  token after the first chunk reads the quantized keys and values of all the
  tokens before it. Also: top-1 agreement of each position's prediction with
  float's (teacher-forced).
- Greedy agreement: from the first --prompt tokens of the text, --gen tokens
  are generated greedily per setting; reported are the positions where the
  setting's token equals float's, and how many tokens match before the first
  difference.
"""

import argparse
import json
import math
import os
import platform
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_setting(s):
    if s == "float":
        return None
    if ":" in s:
        k, v = s.split(":")
        return (int(k), int(v))
    return int(s)


def label(bits):
    if bits is None:
        return "float"
    if isinstance(bits, tuple):
        return f"keys {bits[0]}, values {bits[1]} bits"
    return f"{bits} bits"


def make_cache(model, bits, group_size):
    import kvcore

    cache = kvcore.make_prompt_cache(model)
    if bits is None:
        return cache
    return [c.to_quantized(group_size=group_size, bits=bits) for c in cache]


def perplexity(model, tokens, chunk, bits, group_size, progress):
    """(perplexity, argmax of each position, cache bytes)."""
    import mlx.core as mx

    cache = make_cache(model, bits, group_size)
    nll, argmax = 0.0, []
    inputs, targets = tokens[:-1], tokens[1:]
    for start in range(0, len(inputs), chunk):
        x = mx.array([inputs[start:start + chunk]])
        y = mx.array(targets[start:start + chunk])
        logits = model(x, cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        step = -mx.take_along_axis(logp, y[:, None], axis=-1).sum()
        am = mx.argmax(logits, axis=-1)
        mx.eval(step, am)
        nll += step.item()
        argmax += am.tolist()
        progress(min(start + chunk, len(inputs)), len(inputs))
    return math.exp(nll / len(targets)), argmax, sum(c.nbytes for c in cache)


def greedy(model, prompt, n, bits, group_size):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    cache = make_cache(model, bits, group_size)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, prompt_cache=cache,
                                             max_tokens=n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the converted SmolLM2-135M-Instruct")
    p.add_argument("--tokens", type=int, default=4096, help="perplexity tokens")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens for greedy agreement")
    p.add_argument("--gen", type=int, default=256, help="greedy tokens generated")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--settings", default="float,8,8:4,4,3")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.md"))
    args = p.parse_args()

    import mlx.core as mx
    from mlx_lm import load

    import kvcore
    from kvcore._model import resolve

    kvcore.patch_mlx_lm()  # the model's make_cache() builds kvcore's caches
    path = resolve(args.model)
    model, tokenizer = load(path)
    with open(os.path.join(HERE, "data", "kjv-genesis-1-10.txt")) as f:
        text = tokenizer.encode(f.read())
    if len(text) < args.tokens + 1:
        raise SystemExit(f"the text has {len(text)} tokens, fewer than --tokens {args.tokens} + 1")
    tokens = text[: args.tokens + 1]
    prompt = text[: args.prompt]
    settings = [parse_setting(s) for s in args.settings.split(",")]
    if settings[0] is not None:
        settings.insert(0, None)

    rows, ref_argmax, ref_gen = [], None, None
    for bits in settings:
        t0 = time.perf_counter()

        def progress(done, total, name=label(bits)):
            print(f"\r{name}: perplexity {done}/{total} tokens", end="", flush=True)

        ppl, argmax, nbytes = perplexity(model, tokens, args.chunk, bits, args.group_size, progress)
        print(f"\r{label(bits)}: generating {args.gen} tokens" + " " * 20, end="", flush=True)
        gen = greedy(model, prompt, args.gen, bits, args.group_size)
        if bits is None:
            ref_argmax, ref_gen = argmax, gen
        same = sum(a == b for a, b in zip(gen, ref_gen))
        first_diff = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), len(gen))
        row = {
            "setting": label(bits), "bits": bits, "perplexity": ppl,
            "top1_agreement": sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax),
            "greedy_agreement": same / len(gen), "greedy_first_difference": first_diff,
            "cache_bytes": nbytes, "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"\r{row['setting']:22s} perplexity {ppl:8.3f}  top-1 vs float "
              f"{row['top1_agreement']:.3f}  greedy {same}/{len(gen)} (first difference at "
              f"{first_diff})  cache {nbytes / 1e6:.1f} MB  {row['seconds']:.0f} s", flush=True)

    device = f"{platform.machine()} {os.cpu_count()} cores, mlx {mx.__version__} {mx.default_device()}"
    lines = [
        f"# KV quality on {os.path.basename(path)}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {device}. Perplexity of Genesis 1-10 (KJV), first "
        f"{args.tokens} tokens in chunks of {args.chunk}; top-1 agreement with float at each "
        f"of those positions (teacher-forced); greedy agreement over {args.gen} tokens generated "
        f"from its first {args.prompt} tokens. Group size {args.group_size}; a quantized cache "
        "holds every token quantized.",
        "",
        "| KV cache | perplexity | top-1 agreement | greedy agreement | first difference | "
        "cache bytes | x float |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["cache_bytes"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['perplexity']:.3f} | {r['top1_agreement']:.3f} | "
                     f"{r['greedy_agreement']:.3f} | {r['greedy_first_difference']} | "
                     f"{r['cache_bytes']} | {r['cache_bytes'] / base:.3f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
