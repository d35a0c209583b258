"""Decode speed of a real model over a long context held in float, affine
(mlx-lm's layout) and rotated-channel quantized caches, on kvcore.

The context is synthetic (random keys and values of the model's shapes
written into each layer's cache), so a 16k-token context needs no 16k-token
prefill; the decode steps run the whole model with mlx-lm's attention
routed to kvcore's (``patch_mlx_lm()``). Speed does not depend on the
values held.

    python bench/bench_kv_decode.py --contexts 4096,16384 --steps 16
    python bench/bench_kv_decode.py --caches float,affine:4:64,rotated-channel:4:32/64
    python bench/bench_kv_decode.py --config bench/data/smollm2-135m-config.json

Each cache spec is ``float`` or ``SCHEME:BITS:GROUP`` (BITS may be K/V, e.g.
``4/2``; GROUP likewise). For each context every cache is filled first and
the repeats run the caches in turn, so each repeat gives a step-time ratio
against the ``--baseline`` cache (default the second spec) measured
moments apart; a row's ``time_vs_baseline`` is the median of those ratios.
``--config`` runs a model built from a config.json with random weights
(quantized as the config says): decode speed does not depend on the
weights, and no model directory is needed. Prints one JSON line per
(cache, context).
"""

import argparse
import json
import os
import platform
import time

import mlx.core as mx

DEFAULT_MODEL = os.path.expanduser("~/.cache/kvcore/models/SmolLM2-135M-Instruct-float32")


def pair(s):
    if "/" in s:
        a, b = s.split("/")
        return (int(a), int(b))
    return int(s)


def make_caches(model, spec):
    import kvcore

    n = len(model.layers)
    if spec == "float":
        return [kvcore.KVCache() for _ in range(n)]
    scheme, bits, group, *sink = spec.split(":")  # a fourth part: rotated-channel's sink
    extra = {"sink": int(sink[0])} if sink else {}
    return [kvcore.QuantizedKVCache(group_size=pair(group), bits=pair(bits), scheme=scheme, **extra)
            for _ in range(n)]


def fill(model, caches, context, dtype, chunk=1024):
    attn = model.layers[0].self_attn
    n_kv = attn.n_kv_heads
    head_dim = attn.head_dim if hasattr(attn, "head_dim") else model.args.hidden_size // model.args.num_attention_heads
    key = mx.random.key(0)
    for c in caches:
        for s in range(0, context, chunk):
            m = min(chunk, context - s)
            key, k1, k2 = mx.random.split(key, 3)
            k = mx.random.normal((1, n_kv, m, head_dim), key=k1).astype(dtype)
            v = mx.random.normal((1, n_kv, m, head_dim), key=k2).astype(dtype)
            out = c.update_and_fetch(k, v)
            mx.eval(out)
    return sum(c.nbytes for c in caches)


def decode_rate(model, caches, steps, warmup=2):
    tok = mx.array([[1]])
    for _ in range(warmup):
        logits = model(tok, cache=caches)
        mx.eval(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(tok, cache=caches)
        tok = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(tok)
    return steps / (time.perf_counter() - t0)


def random_model(config_path):
    """The config's model with random weights, quantized as it says."""
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    with open(config_path) as f:
        config = json.load(f)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, config.get("torch_dtype", "float32")))
    q = config.get("quantization")
    if q:
        def spec(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            own = q.get(path)
            return own if isinstance(own, dict) else True

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=spec)
    mx.eval(model.parameters())
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--config", help="a config.json: its model with random weights instead of --model")
    ap.add_argument("--baseline", help="the cache spec ratios are taken against (default: the second)")
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--caches", default="float,affine:4:64,rotated-channel:4:32/64")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="append results to this file")
    a = ap.parse_args()

    import kvcore
    from mlx_lm import load

    kvcore.patch_mlx_lm()
    model = random_model(a.config) if a.config else load(a.model)[0]
    dtype = model.layers[0].self_attn.q_proj.scales.dtype if hasattr(model.layers[0].self_attn.q_proj, "scales") \
        else model.layers[0].self_attn.q_proj.weight.dtype
    device = str(mx.default_device())
    specs = a.caches.split(",")
    baseline = a.baseline or specs[min(1, len(specs) - 1)]
    if baseline not in specs:
        ap.error(f"--baseline {baseline} is not among --caches")
    for context in map(int, a.contexts.split(",")):
        caches = {spec: make_caches(model, spec) for spec in specs}
        nbytes = {spec: fill(model, c, context, dtype) for spec, c in caches.items()}
        rates = {spec: [] for spec in specs}
        for _ in range(a.repeats):
            for spec in specs:
                rates[spec].append(decode_rate(model, caches[spec], a.steps))
        for spec in specs:
            r = sorted(rates[spec])
            ratios = sorted(b / x for x, b in zip(rates[spec], rates[baseline]))
            row = {"cache": spec, "context": context, "tok_per_s_median": round(r[len(r) // 2], 2),
                   "tok_per_s_max": round(r[-1], 2), "time_vs_baseline": round(ratios[len(ratios) // 2], 3),
                   "baseline": baseline, "repeats": a.repeats, "kv_bytes": nbytes[spec],
                   "model": a.config or a.model, "device": device,
                   "machine": platform.node(), "date": time.strftime("%Y-%m-%d")}
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del caches
        mx.clear_cache()

if __name__ == "__main__":
    main()
