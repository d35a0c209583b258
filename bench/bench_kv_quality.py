"""KV-cache quantization quality on a real model: perplexity of an English
text processed in chunks through the cache (so later tokens read the
quantized keys and values), relative to float keys and values.

Two kinds of rows:
- ``sim``: float simulations, the cache holds keys and values quantized
  then dequantized (``--schemes``; see SCHEMES for what each name means);
- ``affine``: mlx-lm's QuantizedKVCache (``--affine``), as a check that the
  simulation of its layout matches it;
- ``kvcore``: kvcore's caches with their own quantized attention
  (``--kvcore``, once kvcore has the scheme).

On a CPU with mlx's reference BLAS the model's linear layers are slow, so by
default (``--numpy-linears``) they run in numpy on the dequantized weights
and the float attention of the simulations in numpy too: the same function
up to float summation order, for every row alike. ``--mlx`` keeps mlx's own
(use it on a GPU).

    python bench/bench_kv_quality.py --tokens 1024 --schemes float,affine4,rot-chan4
    python bench/bench_kv_quality.py --list

The model defaults to SmolLM2-135M-Instruct converted for mlx-lm under
~/.cache/kvcore/models (kvcore's model helper can replace ``--model``).
The text is the King James Version's Genesis 1-16 (public domain),
bench/data/genesis_kjv.txt, about 11,800 tokens for this tokenizer.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.expanduser("~/.cache/kvcore/models/SmolLM2-135M-Instruct-float32")
DEFAULT_TEXT = os.path.join(HERE, "data", "genesis_kjv.txt")


# ---------------------------------------------------------------------------
# Quantizers (simulation: quantize, then dequantize)

def affine_qdq(x, group, bits):
    """Affine quantize-dequantize of x (float32 numpy) along its last axis in
    groups of `group`: mx.quantize's where it takes the group, else the same
    min/max affine grid in numpy."""
    if group in (32, 64, 128) and x.shape[-1] % group == 0:
        a = mx.array(x)
        w, s, b = mx.quantize(a, group_size=group, bits=bits)
        return np.array(mx.dequantize(w, s, b, group_size=group, bits=bits))
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo = g.min(-1, keepdims=True)
    hi = g.max(-1, keepdims=True)
    scale = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
    q = np.clip(np.round((g - lo) / scale), 0, 2**bits - 1)
    return (q * scale + lo).reshape(shape).astype(np.float32)


_LLOYD = {}


def lloyd_max_levels(bits, iters=200):
    """Lloyd-Max levels for a standard normal (the coordinates of a rotated
    vector scaled by its norm are close to one)."""
    if bits in _LLOYD:
        return _LLOYD[bits]
    from math import erf, exp, pi, sqrt

    n = 2**bits
    pdf = lambda t: exp(-t * t / 2) / sqrt(2 * pi)
    cdf = lambda t: 0.5 * (1 + erf(t / sqrt(2)))
    levels = np.linspace(-2.5, 2.5, n)
    for _ in range(iters):
        edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        new = []
        for a, b in zip(edges[:-1], edges[1:]):
            pa = 0.0 if a == -np.inf else pdf(a)
            pb = 0.0 if b == np.inf else pdf(b)
            mass = (1.0 if b == np.inf else cdf(b)) - (0.0 if a == -np.inf else cdf(a))
            new.append((pa - pb) / max(mass, 1e-12))
        levels = np.array(new)
    _LLOYD[bits] = levels.astype(np.float32)
    return _LLOYD[bits]


def codebook_qdq(x, group, bits):
    """Per-group scale (the group's RMS) times the nearest Lloyd-Max level of a
    standard normal: a non-uniform codebook, as after a rotation."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    mean = g.mean(-1, keepdims=True)
    c = g - mean
    rms = np.sqrt((c * c).mean(-1, keepdims=True)) + 1e-8
    levels = lloyd_max_levels(bits)
    idx = np.abs((c / rms)[..., None] - levels).argmin(-1)
    return (levels[idx] * rms + mean).reshape(shape).astype(np.float32)


def hadamard(x):
    d = x.shape[-1]
    return np.array(mx.hadamard_transform(mx.array(x), scale=1.0 / math.sqrt(d)))


# ---------------------------------------------------------------------------
# Schemes

@dataclass(frozen=True)
class Scheme:
    name: str
    kind: str = "sim"          # sim | float | affine (mlx-lm) | kvcore
    key_bits: int = 4
    value_bits: int = 4
    rotate: bool = False
    keys: str = "token"        # token: groups along the head dim; channel: along tokens
    key_group: int = 64        # head-dim group (token) or tokens per group (channel)
    value_group: int = 64      # head-dim group of the values
    window: int = 0            # newest tokens kept in float beyond the partial group
    sink: int = 0              # first tokens kept in float (the attention sink)
    overlay: bool = False      # the sink quantized in its group as any token, its float copy read
    codebook: bool = False     # Lloyd-Max levels instead of the affine grid
    kvcore: dict = field(default_factory=dict, compare=False, hash=False)

    def bytes_per_token(self, head_dim, scale_bytes=2):
        """Bytes per token per KV head (float16 scales and biases), the float
        residual not counted (at most a group of tokens)."""
        if self.kind == "float":
            return 2 * head_dim * 2
        k = head_dim * self.key_bits / 8
        if self.keys == "channel":
            k += 2 * scale_bytes * head_dim / self.key_group
        else:
            k += 2 * scale_bytes * head_dim / self.key_group
        v = head_dim * self.value_bits / 8 + 2 * scale_bytes * head_dim / self.value_group
        return k + v


def _schemes():
    s = [Scheme("float", kind="float")]
    for b in (8, 4, 3):
        s.append(Scheme(f"affine{b}", kind="affine", key_bits=b, value_bits=b))
        s.append(Scheme(f"sim-affine{b}", key_bits=b, value_bits=b))
    # mlx-lm has no pair of bits: simulated (sim-affine4 equals affine4 exactly).
    s.append(Scheme("affine-k4v2", key_bits=4, value_bits=2))
    for tag, kb, vb in (("4", 4, 4), ("3", 3, 3), ("-k4v2", 4, 2)):
        s.append(Scheme(f"rot{tag}", key_bits=kb, value_bits=vb, rotate=True))
        s.append(Scheme(f"chan{tag}", key_bits=kb, value_bits=vb, keys="channel", key_group=32))
        s.append(Scheme(f"rot-chan{tag}", key_bits=kb, value_bits=vb, rotate=True, keys="channel",
                        key_group=32))
    # 3-bit variations
    base3 = Scheme("rot-chan3", key_bits=3, value_bits=3, rotate=True, keys="channel", key_group=32)
    s += [
        replace(base3, name="rot-chan3-g16", key_group=16),
        replace(base3, name="rot-chan3-w128", window=128),
        replace(base3, name="rot-chan3-v32", value_group=32),
        replace(base3, name="rot-chan3-v16", value_group=16),
        replace(base3, name="rot-chan3-g16-v32", key_group=16, value_group=32),
        replace(base3, name="rot-chan3-cb", codebook=True),
        replace(base3, name="rot-chan3-cb-v32", codebook=True, value_group=32),
        replace(base3, name="chan3-g16-v32", rotate=False, key_group=16, value_group=32),
    ]
    basek4v2 = Scheme("rot-chan-k4v2", key_bits=4, value_bits=2, rotate=True, keys="channel",
                      key_group=32)
    s += [
        replace(basek4v2, name="rot-chan-k4v2-v32", value_group=32),
        replace(basek4v2, name="rot-chan-k4v2-v16", value_group=16),
        replace(basek4v2, name="rot-chan-k4v2-cb", codebook=True),
        replace(basek4v2, name="rot-chan-k4v2-cb-v32", codebook=True, value_group=32),
    ]
    # A float window of the newest tokens, for keys and values alike.
    out = {x.name: x for x in s}
    for name in ("rot4", "chan4", "rot-chan4", "rot3", "chan3", "rot-chan3", "rot-k4v2",
                 "chan-k4v2", "rot-chan-k4v2", "rot-chan3-v32", "rot-chan-k4v2-v32"):
        for w in (32, 64, 128, 256):
            x = replace(out[name], name=f"{name}-w{w}", window=w)
            out[x.name] = x
    # The first tokens (the attention sink) kept in float too.
    for name in ("rot-chan3-w128", "rot-chan3-w64", "rot-chan3", "rot-chan-k4v2-w128", "rot-chan4"):
        for k in (1, 4, 32):
            x = replace(out[name], name=f"{name}-s{k}", sink=k)
            out[x.name] = x
            x = replace(out[name], name=f"{name}-o{k}", sink=k, overlay=True)
            out[x.name] = x
    return out


SCHEMES = _schemes()


def _pair(s):
    if "/" in s:
        a, b = s.split("/")
        return (int(a), int(b))
    return int(s)


def scheme_named(name):
    """A row of SCHEMES, or kvcore's real cache as
    ``kvcore:SCHEME:BITS:GROUP[:WINDOW[:SINK]]`` (BITS and GROUP an int or
    K/V, e.g. ``kvcore:rotated-channel:4/2:32/64:128:1``)."""
    if not name.startswith("kvcore:"):
        return SCHEMES[name]
    _, scheme, bits, group, *window = name.split(":")
    sink = int(window.pop()) if len(window) == 2 else 0
    bits, group = _pair(bits), _pair(group)
    kb, vb = bits if isinstance(bits, tuple) else (bits, bits)
    kg, vg = group if isinstance(group, tuple) else (group, group)
    return Scheme(name, kind="kvcore", key_bits=kb, value_bits=vb, key_group=kg, value_group=vg,
                  keys="channel" if scheme != "affine" else "token",
                  window=int(window[0]) if window else (128 if scheme != "affine" else 0), sink=sink,
                  kvcore=dict(group_size=group, bits=bits, scheme=scheme,
                              **({"window": int(window[0])} if window else {}),
                              **({"sink": sink} if sink else {})))


# ---------------------------------------------------------------------------
# The simulated cache

def _make_sim_cache_class():
    from mlx_lm.models.cache import KVCache

    class SimCache(KVCache):
        """A float cache holding keys and values as the scheme would store
        them (quantized and dequantized), the float residual as it is."""

        def __init__(self, scheme):
            super().__init__()
            self.scheme = scheme
            self.raw_k = None   # rotated float keys, all tokens (numpy)
            self.raw_v = None
            self.sk = None      # stored (dequantized) keys, rotated space
            self.sv = None
            self.k_done = 0     # tokens whose keys are quantized
            self.v_done = 0

        def _qdq(self, x, group, bits):
            f = codebook_qdq if self.scheme.codebook else affine_qdq
            return f(x, group, bits)

        def update_and_fetch(self, keys, values):
            sc = self.scheme
            k = np.array(keys.astype(mx.float32))
            v = np.array(values.astype(mx.float32))
            if sc.rotate:
                k, v = hadamard(k), hadamard(v)
            self.raw_k = k if self.raw_k is None else np.concatenate([self.raw_k, k], 2)
            self.raw_v = v if self.raw_v is None else np.concatenate([self.raw_v, v], 2)
            self.sk = k.copy() if self.sk is None else np.concatenate([self.sk, k], 2)
            self.sv = v.copy() if self.sv is None else np.concatenate([self.sv, v], 2)
            n = self.raw_k.shape[2]
            if not sc.overlay:
                self.k_done = max(self.k_done, min(n, sc.sink))
                self.v_done = max(self.v_done, min(n, sc.sink))
            # keys
            if sc.keys == "channel":
                G = sc.key_group
                s0 = 0 if sc.overlay else sc.sink
                upto = s0 + max(0, n - sc.window - s0) // G * G
                if upto > self.k_done:
                    blk = self.raw_k[:, :, self.k_done:upto, :]           # (B, H, T, D)
                    t = np.swapaxes(blk, 2, 3)                            # groups along tokens
                    self.sk[:, :, self.k_done:upto, :] = np.swapaxes(
                        self._qdq(np.ascontiguousarray(t), G, sc.key_bits), 2, 3)
                    self.k_done = upto
            else:
                upto = max(0 if sc.overlay else sc.sink, n - sc.window)
                if upto > self.k_done:
                    self.sk[:, :, self.k_done:upto, :] = self._qdq(
                        self.raw_k[:, :, self.k_done:upto, :], sc.key_group, sc.key_bits)
                    self.k_done = upto
            # values: per token
            upto = max(0 if sc.overlay else sc.sink, n - sc.window)
            if upto > self.v_done:
                self.sv[:, :, self.v_done:upto, :] = self._qdq(
                    self.raw_v[:, :, self.v_done:upto, :], sc.value_group, sc.value_bits)
                self.v_done = upto
            ko, vo = self.sk, self.sv
            if sc.overlay and sc.sink:
                ko, vo = ko.copy(), vo.copy()
                ko[:, :, : sc.sink] = self.raw_k[:, :, : sc.sink]
                vo[:, :, : sc.sink] = self.raw_v[:, :, : sc.sink]
            if sc.rotate:
                ko, vo = hadamard(ko), hadamard(vo)
            self.offset = n
            return mx.array(ko), mx.array(vo)

    return SimCache


# ---------------------------------------------------------------------------
# Fast path for CPUs with mlx's reference BLAS

class NumpyLinear(nn.Module):
    def __init__(self, weight, bias=None):
        super().__init__()
        self._w = np.ascontiguousarray(weight.T)
        self._b = bias

    def __call__(self, x):
        y = np.array(x.astype(mx.float32)) @ self._w
        if self._b is not None:
            y = y + self._b
        return mx.array(y)


class NumpyEmbedding(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self._w = weight
        self._wt = np.ascontiguousarray(weight.T)

    def __call__(self, ids):
        return mx.array(self._w[np.array(ids)])

    def as_linear(self, x):
        return mx.array(np.array(x.astype(mx.float32)) @ self._wt)


def _dequantized_weight(m):
    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size,
                          bits=m.bits, mode=getattr(m, "mode", "affine"))
    else:
        w = m.weight
    return np.array(w.astype(mx.float32))


def numpy_linears(model):
    """Replace every linear layer and the embedding by numpy equivalents on
    the dequantized weights."""
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            b = m.get("bias")
            swaps.append((name, NumpyLinear(_dequantized_weight(m),
                                            None if b is None else np.array(b))))
        elif isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            swaps.append((name, NumpyEmbedding(_dequantized_weight(m))))
    for name, new in swaps:
        parent = model
        parts = name.split(".")
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
        if isinstance(parent, list):
            parent[int(parts[-1])] = new
        else:
            setattr(parent, parts[-1], new)
    return len(swaps)


def numpy_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Float attention in numpy; quantized triples (mlx-lm's cache) are
    dequantized first, which is what quantized attention computes. kvcore's
    caches get kvcore's own quantized attention (mlx)."""
    if type(cache).__module__.startswith("kvcore"):
        from kvcore._attention import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    if isinstance(keys, tuple):
        g, b = cache.group_size, cache.bits
        keys = mx.dequantize(*keys, group_size=g, bits=b)
        values = mx.dequantize(*values, group_size=g, bits=b)
    q = np.array(queries.astype(mx.float32)) * scale
    k = np.array(keys.astype(mx.float32))
    v = np.array(values.astype(mx.float32))
    B, nq, L, D = q.shape
    nkv, N = k.shape[1], k.shape[2]
    r = nq // nkv
    q = q.reshape(B, nkv, r, L, D)
    s = q @ np.swapaxes(k, -1, -2)[:, :, None]                 # (B, nkv, r, L, N)
    if isinstance(mask, str):
        allowed = np.arange(N - L, N)[:, None] >= np.arange(N)[None, :]
        s = np.where(allowed, s, -np.inf)
    elif mask is not None:
        m = np.array(mask)
        if m.ndim == 4:
            m = m[:, :, None]  # (B, heads, L, N) against (B, kv heads, repeats, L, N)
        s = np.where(m, s, -np.inf) if m.dtype == np.bool_ else s + m
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = (p @ v[:, :, None]).reshape(B, nq, L, v.shape[-1])
    return mx.array(out)


# ---------------------------------------------------------------------------

def make_cache(model, scheme):
    n = len(model.layers)
    if scheme.kind == "float":
        from mlx_lm.models.cache import KVCache
        return [KVCache() for _ in range(n)]
    if scheme.kind == "affine":
        from mlx_lm.models.cache import QuantizedKVCache
        if scheme.key_bits == scheme.value_bits:
            return [QuantizedKVCache(group_size=64, bits=scheme.key_bits) for _ in range(n)]
        import kvcore
        return [kvcore.QuantizedKVCache(group_size=64, bits=(scheme.key_bits, scheme.value_bits))
                for _ in range(n)]
    if scheme.kind == "kvcore":
        import kvcore
        return [kvcore.QuantizedKVCache(**scheme.kvcore) for _ in range(n)]
    SimCache = _make_sim_cache_class()
    return [SimCache(scheme) for _ in range(n)]


def log_softmax_nll(logits, targets):
    x = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model, ids, scheme, chunk):
    cache = make_cache(model, scheme)
    nll = []
    for s in range(0, len(ids) - 1, chunk):
        x = ids[s:s + chunk]
        logits = model(mx.array(x)[None], cache=cache)[0]
        logits = np.array(logits.astype(mx.float32))
        targets = np.array(ids[s + 1:s + 1 + len(x)])
        nll.append(log_softmax_nll(logits[:len(targets)], targets))
    nll = np.concatenate(nll)
    return float(np.exp(nll.mean())), len(nll)


def greedy(model, prompt_ids, scheme, n, reference=None):
    """n greedy tokens after prompt_ids (prefilled in one call). With a
    reference (the float cache's greedy tokens), those are fed instead
    (teacher forcing) and the result is this cache's choice at each step."""
    cache = make_cache(model, scheme)
    logits = model(mx.array(prompt_ids)[None], cache=cache)[0, -1]
    out = []
    for i in range(n):
        t = int(np.argmax(np.array(logits.astype(mx.float32))))
        out.append(t)
        fed = t if reference is None else reference[i]
        logits = model(mx.array([[fed]]), cache=cache)[0, -1]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score")
    ap.add_argument("--chunk", type=int, default=128, help="tokens per forward call")
    ap.add_argument("--schemes", default="float,affine4,rot4,chan4,rot-chan4")
    ap.add_argument("--greedy", type=int, default=0,
                    help="also agreement with float's N greedy tokens (teacher-forced)")
    ap.add_argument("--greedy-prompt", type=int, default=256)
    ap.add_argument("--mlx", action="store_true", help="mlx's own linears and attention")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for s in SCHEMES.values():
            print(s)
        return

    from mlx_lm import load

    model, tok = load(a.model)
    import importlib

    mod = importlib.import_module(type(model).__module__)
    if not a.mlx:
        numpy_linears(model)
        mod.scaled_dot_product_attention = numpy_attention
    elif any(n.startswith("kvcore:") for n in a.schemes.split(",")):
        # kvcore's attention routes kvcore's schemes (and equals mlx-lm's on
        # mlx-lm's caches, bit for bit).
        from kvcore._attention import scaled_dot_product_attention

        mod.scaled_dot_product_attention = scaled_dot_product_attention
    ids = tok.encode(open(a.text).read())[: a.tokens]
    head_dim = model.layers[0].self_attn.head_dim if hasattr(model.layers[0].self_attn, "head_dim") \
        else model.args.hidden_size // model.args.num_attention_heads
    names = a.schemes.split(",")
    print(f"# model {a.model}\n# text {a.text}: {len(ids)} tokens, chunks of {a.chunk}"
          f"{'' if a.mlx else ', numpy linears and attention'}", flush=True)
    base = None
    ref_tokens = None
    for name in names:
        sc = scheme_named(name)
        t0 = time.time()
        ppl, n = perplexity(model, ids, sc, a.chunk)
        if sc.kind == "float":
            base = ppl
        row = {"scheme": name, "ppl": round(ppl, 4), "tokens": n,
               "bytes_per_token_head": sc.bytes_per_token(head_dim),
               "seconds": round(time.time() - t0, 1)}
        if base is not None:
            row["change_pct"] = round(100 * (ppl / base - 1), 2)
        if a.greedy:
            # Agreement: the share of the float cache's greedy tokens this
            # cache also picks, fed the float cache's tokens each step.
            toks = greedy(model, ids[: a.greedy_prompt], sc, a.greedy, ref_tokens)
            if sc.kind == "float":
                ref_tokens = toks
            if ref_tokens is not None:
                row["agreement"] = sum(x == y for x, y in zip(toks, ref_tokens)) / len(toks)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({**row, "model": a.model, "chunk": a.chunk}) + "\n")


if __name__ == "__main__":
    main()
