"""kvcore's quantized attention against float attention over the dequantized
cache, on this machine's default device: one line per shape, with the
largest difference. For backends whose quantized matmul may be wrong or
missing for some shapes (mlx CUDA), before trusting the decode rows.

    python bench/check_kv_attention.py
"""

import itertools
import json
import math

import mlx.core as mx

import kvcore


def rot(x):
    return mx.hadamard_transform(x, scale=1.0 / math.sqrt(x.shape[-1]))


def dequantized(c, kg, vg, kb, vb):
    """The cache's keys and values in float, unrotated; a sink's float
    first tokens in place of their quantized ones."""
    if c.scheme == "affine":
        (kw, ks, kbi), (vw, vs, vbi) = c.keys_and_values()
        return (mx.dequantize(kw, ks, kbi, group_size=kg, bits=kb),
                mx.dequantize(vw, vs, vbi, group_size=vg, bits=vb))
    (kw, ks, kbi, r), (vw, vs, vbi, rv) = c.keys_and_values()
    keys, values = [], []
    if ks.shape[-1]:
        keys.append(mx.swapaxes(mx.dequantize(kw, ks, kbi, group_size=kg, bits=kb), 2, 3))
        values.append(mx.dequantize(vw, vs, vbi, group_size=vg, bits=vb))
    if r is not None:
        keys.append(r)
        values.append(rv)
    keys, values = mx.concatenate(keys, 2), mx.concatenate(values, 2)
    if getattr(c, "sink_keys", None) is not None:
        n = c.sink_keys.shape[2]
        keys = mx.concatenate([c.sink_keys.astype(keys.dtype), keys[:, :, n:]], 2)
        values = mx.concatenate([c.sink_values.astype(values.dtype), values[:, :, n:]], 2)
    return rot(keys), rot(values)


def check(c, q, keys, values, mask, g, bits, scheme, dtype):
    """The largest difference from float attention over the dequantized
    cache (with the same mask)."""
    D = q.shape[-1]
    sink = None if getattr(c, "sink_keys", None) is None else (c.sink_keys, c.sink_values, None)
    got = kvcore.quantized_scaled_dot_product_attention(
        q, keys, values, scale=D ** -0.5, mask=mask, group_size=g, bits=bits, scheme=scheme, sink=sink)
    dk, dv = dequantized(c, g, g, *bits)
    want = mx.fast.scaled_dot_product_attention(q, dk.astype(dtype), dv.astype(dtype), scale=D ** -0.5, mask=mask)
    return mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()


def main():
    dtype = mx.float16 if mx.default_device() == mx.gpu else mx.float32
    worst = 0.0
    for scheme, D, (kb, vb), g, (n_q, n_kv), L, S in itertools.product(
            ("affine", "rotated-channel"), (64, 128), ((4, 4), (3, 3), (4, 2), (8, 8)), (32, 64),
            ((9, 3), (8, 8)), (1, 7, 64), (200, 1000)):
        kw = dict(scheme=scheme) if scheme == "affine" else dict(scheme=scheme, window=64)
        c = kvcore.QuantizedKVCache(group_size=g, bits=(kb, vb), **kw)
        k = mx.random.normal((1, n_kv, S, D)).astype(dtype)
        v = mx.random.normal((1, n_kv, S, D)).astype(dtype)
        keys, values = c.update_and_fetch(k, v)
        q = mx.random.normal((1, n_q, L, D)).astype(dtype)
        mask = "causal" if L > 1 else None
        try:
            err = check(c, q, keys, values, mask, g, (kb, vb), scheme, dtype)
            row = {"error": err}
            worst = max(worst, err)
        except Exception as e:  # a kernel the backend lacks
            row = {"failed": str(e)[:200]}
        print(json.dumps({"scheme": scheme, "D": D, "bits": [kb, vb], "group": g, "heads": [n_q, n_kv],
                          "L": L, "S": S, **row}), flush=True)
    # The sink (float first tokens read in place of their quantized ones)
    # and the sliding window (masks over the tokens held).
    for D, (n_q, n_kv), L, sink, max_size in itertools.product(
            (64, 128), ((9, 3), (8, 8)), (1, 7), (0, 2), (None, 256)):
        kw = dict(scheme="rotated-channel", window=64, sink=sink)
        # A batch of sliding windows (three rows, no sink) where the sink
        # would be.
        B = 3 if sink and max_size else 1
        c = (kvcore.QuantizedKVCache(group_size=32, bits=4, **kw) if max_size is None
             else kvcore.QuantizedBatchRotatingKVCache(max_size, [0, 7, 40], 32, 4, scheme="rotated-channel",
                                                       window=64) if B > 1
             else kvcore.QuantizedRotatingKVCache(max_size, 4, 32, 4, **kw))
        for S in (700, 1, 1, 1):
            k = mx.random.normal((B, n_kv, S, D)).astype(dtype)
            keys, values = c.update_and_fetch(k, mx.random.normal((B, n_kv, S, D)).astype(dtype))
        mask = c.make_mask(L, return_array=True) if max_size else ("causal" if L > 1 else None)
        keys, values = c.update_and_fetch(mx.random.normal((B, n_kv, L, D)).astype(dtype),
                                          mx.random.normal((B, n_kv, L, D)).astype(dtype))
        q = mx.random.normal((B, n_q, L, D)).astype(dtype)
        try:
            err = check(c, q, keys, values, mask, 32, (4, 4), "rotated-channel", dtype)
            row = {"error": err}
            worst = max(worst, err)
        except Exception as e:
            row = {"failed": str(e)[:200]}
        print(json.dumps({"scheme": "rotated-channel", "D": D, "heads": [n_q, n_kv], "L": L, "sink": sink,
                          "max_size": max_size, "batch": B, **row}), flush=True)
    print(json.dumps({"device": str(mx.default_device()), "worst_error": worst}))


if __name__ == "__main__":
    main()
