"""mlx-lm's generate_step with kv_bits on sliding-window caches, and with
different key and value bits.

mlx-lm cannot run these (RotatingKVCache.to_quantized raises
NotImplementedError), so the reference is mlx-lm's own float ring whose
results are quantized (a ring moves whole tokens and quantization works
per token, so that is exactly what a quantized ring must return), with
mlx-lm's attention. Tokens and log-probabilities must be equal bit for bit.
"""

import mlx.core as mx
import mlx_lm.models.base as base
import mlx_lm.models.cache as ref
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma3_text, qwen2

import kvcore


def _spec(v):
    return v if isinstance(v, tuple) else (v, v)


class RefQuantizedRing(ref.RotatingKVCache):
    def __init__(self, ring, group_size, bits):
        super().__init__(max_size=ring.max_size, keep=ring.keep)
        self.keys, self.values = ring.keys, ring.values
        self.offset, self._idx = ring.offset, ring._idx
        self.group_size, self.bits = group_size, bits
        (self._kg, self._vg), (self._kb, self._vb) = _spec(group_size), _spec(bits)

    @property
    def to_quantized(self):  # quantized already, as mlx-lm's QuantizedKVCache
        raise AttributeError("to_quantized")

    def update_and_fetch(self, k, v):
        k, v = super().update_and_fetch(k, v)
        return (tuple(mx.quantize(k, self._kg, self._kb)), tuple(mx.quantize(v, self._vg, self._vb)))


class RefRing(ref.RotatingKVCache):
    def to_quantized(self, group_size=64, bits=4):
        return RefQuantizedRing(self, group_size, bits)


QWEN = {
    "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
    "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "vocab_size": 128, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rope_traditional": False, "tie_word_embeddings": True,
}
GEMMA3 = {
    "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 3,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "vocab_size": 128, "query_pre_attn_scalar": 32, "sliding_window": 8,
    "sliding_window_pattern": 3, "rope_theta": 10000.0, "rope_local_base_freq": 10000.0,
}


def build(module, config, seed):
    mx.random.seed(seed)
    m = module.Model(module.ModelArgs.from_dict(config))
    m.update(tree_map(lambda p: p * 4, m.parameters()))
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def qwen():
    return build(qwen2, QWEN, 99)


@pytest.fixture(scope="module")
def gemma():
    return build(gemma3_text, GEMMA3, 98)


def run(model, prompt, cache, **kwargs):
    out = []
    for tok, logprobs in generate_step(prompt, model, prompt_cache=cache, **kwargs):
        mx.eval(logprobs)
        out.append((tok, logprobs))
    return out


def assert_same(got, want):
    assert len(got) == len(want) > 0
    for i, ((t1, l1), (t2, l2)) in enumerate(zip(got, want)):
        assert t1 == t2, f"token {i}: kvcore {t1} != reference {t2}"
        assert mx.array_equal(l1, l2).item(), f"logprobs differ at step {i}"
    assert len({t for t, _ in want}) >= 3


def prompt(n, seed):
    return mx.random.randint(0, 128, (n,), key=mx.random.key(seed))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("prefill_step_size", [2048, 8])
def test_generate_step_kv_bits_with_max_kv_size(qwen, bits, prefill_step_size):
    """generate_step(kv_bits=..., max_kv_size=...): a crash in mlx-lm."""
    kw = dict(max_tokens=24, kv_bits=bits, kv_group_size=32, quantized_kv_start=0,
              prefill_step_size=prefill_step_size)
    got_cache = [kvcore.RotatingKVCache(max_size=16, keep=4) for _ in range(2)]
    want_cache = [RefRing(max_size=16, keep=4) for _ in range(2)]
    got = run(qwen, prompt(30, 1), got_cache, **kw)
    want = run(qwen, prompt(30, 1), want_cache, **kw)
    assert_same(got, want)
    assert all(type(c) is kvcore.QuantizedRotatingKVCache for c in got_cache)
    assert [c.offset for c in got_cache] == [c.offset for c in want_cache]
    with pytest.raises(NotImplementedError):
        run(qwen, prompt(30, 1), [ref.RotatingKVCache(max_size=16, keep=4) for _ in range(2)], **kw)


def test_sliding_window_model_generates_with_kv_bits(gemma):
    """gemma3_text (two 8-token windows, one global layer) with kv_bits."""
    kw = dict(max_tokens=24, kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    got_cache = [kvcore.RotatingKVCache(max_size=8), kvcore.RotatingKVCache(max_size=8),
                 kvcore.KVCache()]
    want_cache = [RefRing(max_size=8), RefRing(max_size=8), ref.KVCache()]
    got = run(gemma, prompt(20, 2), got_cache, **kw)
    want = run(gemma, prompt(20, 2), want_cache, **kw)
    assert_same(got, want)
    assert [type(c).__name__ for c in got_cache] == [
        "QuantizedRotatingKVCache", "QuantizedRotatingKVCache", "QuantizedKVCache"]
    # Patched, the model's own make_cache gives kvcore caches and the same run.
    kvcore.patch_mlx_lm()
    try:
        patched = run(gemma, prompt(20, 2), None, **kw)
    finally:
        kvcore.unpatch_mlx_lm()
    assert_same(patched, want)


def test_different_key_and_value_bits(gemma, monkeypatch):
    """bits=(8, 4): mlx-lm's attention cannot take a pair, so the model goes
    through kvcore's (patch_mlx_lm() routes it); the cache part is checked
    against the reference ring quantized at the same bits."""
    monkeypatch.setattr(gemma3_text, "scaled_dot_product_attention",
                        kvcore.scaled_dot_product_attention)
    kw = dict(max_tokens=24, kv_bits=(8, 4), kv_group_size=32, quantized_kv_start=0)
    got_cache = [kvcore.RotatingKVCache(max_size=8), kvcore.RotatingKVCache(max_size=8),
                 kvcore.KVCache()]
    want_cache = [RefRing(max_size=8), RefRing(max_size=8), kvcore.KVCache()]
    got = run(gemma, prompt(20, 3), got_cache, **kw)
    want = run(gemma, prompt(20, 3), want_cache, **kw)
    assert_same(got, want)
    assert got_cache[0].bits == (8, 4) and got_cache[2].bits == (8, 4)


def test_kvcore_attention_equals_mlx_lm_at_one_bits():
    mx.random.seed(5)
    q = mx.random.normal((1, 4, 3, 64)).astype(mx.float16)
    k = mx.random.normal((1, 2, 10, 64)).astype(mx.float16)
    v = mx.random.normal((1, 2, 10, 64)).astype(mx.float16)
    qk, qv = tuple(mx.quantize(k, 64, 4)), tuple(mx.quantize(v, 64, 4))
    for mask in (None, "causal", mx.ones((3, 10), dtype=mx.bool_),
                 mx.zeros((1, 1, 3, 10), dtype=mx.float16)):
        # mlx-lm scales its queries argument in place: each call gets a copy.
        want = base.quantized_scaled_dot_product_attention(mx.array(q), qk, qv, scale=0.125,
                                                           mask=mask, group_size=64, bits=4)
        got = kvcore.quantized_scaled_dot_product_attention(mx.array(q), qk, qv, scale=0.125, mask=mask,
                                                            group_size=64, bits=4)
        assert mx.array_equal(want, got).item()


def test_mixed_bits_attention_is_per_part():
    """(8, 4) scores with the 8-bit keys and mixes the 4-bit values."""
    mx.random.seed(6)
    q = mx.random.normal((1, 2, 1, 64))
    k = mx.random.normal((1, 2, 7, 64))
    v = mx.random.normal((1, 2, 7, 64))
    qk, qv = tuple(mx.quantize(k, 64, 8)), tuple(mx.quantize(v, 64, 4))
    got = kvcore.quantized_scaled_dot_product_attention(q, qk, qv, scale=1.0, mask=None,
                                                        group_size=64, bits=(8, 4))
    kd = mx.dequantize(*qk, group_size=64, bits=8)
    vd = mx.dequantize(*qv, group_size=64, bits=4)
    want = mx.softmax(q @ kd.swapaxes(-1, -2), axis=-1, precise=True) @ vd
    assert mx.allclose(got, want, atol=1e-4).item()
