"""mlx-lm models with random weights, run with mlx-lm's caches and with
kvcore's: logits (and greedy tokens) must be identical at every step.

- a Qwen2-shaped model (head_dim 64) under generate_step with a quantized
  KV cache (kv_bits 4 and 8): KVCache.to_quantized mid-run;
- Mamba and Mamba2 (state-space models, ArraysCache), Mamba2 also batched
  with left padding and with lengths;
- Falcon-H1 (CacheList(ArraysCache, KVCache) per layer) and Baichuan-M1
  (CacheList(ArraysCache, RotatingKVCache or KVCache)).

Model modules build their caches by the names they imported from
mlx_lm.models.cache, so the kvcore runs happen under patch_mlx_lm(), and
each test checks that the caches really are kvcore's.
"""

import contextlib
import importlib

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import baichuan_m1, falcon_h1, mamba, mamba2, qwen2

import kvcore

gen = importlib.import_module("mlx_lm.generate")

VOCAB = 128


def build(module, config, seed, scale=4.0):
    mx.random.seed(seed)
    m = module.Model(module.ModelArgs.from_dict(config))
    # Random weights at init scale make greedy decoding repeat one token;
    # scaled up, the model wanders over the vocabulary.
    m.update(tree_map(lambda p: p * scale, m.parameters()))
    mx.eval(m.parameters())
    return m


def prompt_of(n, seed=0, batch=None):
    shape = (n,) if batch is None else (batch, n)
    return mx.random.randint(0, VOCAB, shape, key=mx.random.key(seed))


@contextlib.contextmanager
def patched():
    assert not kvcore._mlx_lm.is_patched()
    kvcore.patch_mlx_lm()
    try:
        yield
    finally:
        kvcore.unpatch_mlx_lm()
    assert ref.KVCache.__module__ == "mlx_lm.models.cache"
    assert ref.ArraysCache.__module__ == "mlx_lm.models.cache"


def all_caches(caches):
    """Every cache, CacheList members included."""
    out = []
    for c in caches:
        out.append(c)
        if type(c).__name__ == "CacheList":
            out.extend(all_caches(c.caches))
    return out


def assert_all_kvcore(caches):
    for c in all_caches(caches):
        assert type(c).__module__.startswith("kvcore"), f"not a kvcore cache: {type(c)!r}"


def assert_all_mlx_lm(caches):
    for c in all_caches(caches):
        assert type(c).__module__ == "mlx_lm.models.cache", f"not an mlx-lm cache: {type(c)!r}"


def step_by_step(model, caches, prompt, n_decode=10, prefill_chunks=None):
    """Prefill (in chunks if given), then greedy decode; the last-position
    logits of every call, evaluated."""
    if prompt.ndim == 1:
        prompt = prompt[None]
    chunks = [prompt] if prefill_chunks is None else [
        prompt[:, i:i + prefill_chunks] for i in range(0, prompt.shape[1], prefill_chunks)
    ]
    out = []
    for chunk in chunks:
        logits = model(chunk, cache=caches)
        mx.eval(logits)
        out.append(logits[:, -1, :])
    for _ in range(n_decode):
        tok = mx.argmax(out[-1], axis=-1)[:, None]
        logits = model(tok, cache=caches)
        mx.eval(logits)
        out.append(logits[:, -1, :])
    return out


def assert_same_logits(got, want, min_distinct=3):
    assert len(got) == len(want) > 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"step {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        )
        assert mx.array_equal(a, b).item(), (
            f"logits differ at step {i}: max |diff| {mx.abs(a - b).max().item()}"
        )
    toks = {tuple(mx.argmax(b, axis=-1).tolist()) for b in want}
    assert len(toks) >= min(min_distinct, len(want)), f"greedy decoding does not vary: {toks}"


def assert_same_state(kv, r, what):
    """Cache states equal, recursing into CacheList and ArraysCache slot lists."""
    assert type(kv).__name__ == type(r).__name__, what
    sk, sr = kv.state, r.state
    if type(r).__name__ == "CacheList":
        for i, (a, b) in enumerate(zip(kv.caches, r.caches)):
            assert_same_state(a, b, f"{what}[{i}]")
        return
    # Nested slot lists and quantized (packed, scales, biases) triples: mlx-lm
    # keeps the latter as a list after to_quantized, a tuple otherwise.
    flat = lambda s: [y for x in s for y in (x if isinstance(x, (list, tuple)) else [x])]  # noqa: E731
    fk, fr = flat(sk), flat(sr)
    assert len(fk) == len(fr), what
    for j, (a, b) in enumerate(zip(fk, fr)):
        if isinstance(b, mx.array):
            assert isinstance(a, mx.array) and a.shape == b.shape and a.dtype == b.dtype, f"{what}.state[{j}]"
            assert mx.array_equal(a, b).item(), f"{what}.state[{j}] differs"
        else:
            assert a == b, f"{what}.state[{j}]: {a!r} != {b!r}"


# --------------------------------------------------------------------------
# Quantized KV cache under generate_step

QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,  # head_dim 64
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def qwen():
    m = build(qwen2, QWEN2, 1234, scale=3.0)
    assert not hasattr(m, "make_cache")
    return m


def run_generate(model, prompt, cache, **kwargs):
    out = []
    for tok, logprobs in generate_step(prompt, model, prompt_cache=cache, **kwargs):
        mx.eval(logprobs)
        out.append((tok, logprobs))
    return out


def run_reference(model, prompt, cache, **kwargs):
    """mlx-lm's own run; on a GPU whose mlx build has no quantized_matmul
    kernel for these shapes, mlx-lm cannot run either, so the test skips."""
    try:
        return run_generate(model, prompt, cache, **kwargs)
    except RuntimeError as e:
        if "quantized_matmul" in str(e) and mx.default_device() != mx.cpu:
            pytest.skip(f"mlx on this device: {e}")
        raise


@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("quantized_kv_start,prefill_step_size", [(0, 2048), (0, 4), (5, 4), (14, 2048)])
def test_generate_with_quantized_kv_cache(qwen, kv_bits, quantized_kv_start, prefill_step_size):
    prompt = prompt_of(13, seed=kv_bits + quantized_kv_start)
    kwargs = dict(max_tokens=12, kv_bits=kv_bits, kv_group_size=64,
                  quantized_kv_start=quantized_kv_start, prefill_step_size=prefill_step_size)
    cs, rs = kvcore.make_prompt_cache(qwen), ref.make_prompt_cache(qwen)
    assert [type(c) for c in cs] == [kvcore.KVCache] * 2
    want = run_reference(qwen, prompt, rs, **kwargs)
    got = run_generate(qwen, prompt, cs, **kwargs)
    assert len(got) == len(want) == 12
    for i, ((t1, l1), (t2, l2)) in enumerate(zip(got, want)):
        assert t1 == t2, f"token {i}: kvcore {t1} != mlx-lm {t2}"
        assert l1.shape == l2.shape and l1.dtype == l2.dtype
        assert mx.array_equal(l1, l2).item(), f"logprobs differ at step {i}"
    assert len({t for t, _ in want}) >= 3
    # generate_step replaced the caches in the list with quantized ones
    assert all(type(r) is ref.QuantizedKVCache for r in rs)
    assert all(type(c) is kvcore.QuantizedKVCache for c in cs), [type(c) for c in cs]
    for c, r in zip(cs, rs):
        # generate_step computes one token ahead of what it yields: 13 + 12.
        assert (c.bits, c.group_size, c.offset) == (r.bits, r.group_size, r.offset) == (kv_bits, 64, 25)
        assert_same_state(c, r, "quantized cache")
        assert c.nbytes == r.nbytes


def test_generate_with_quantized_kv_cache_under_patch(qwen):
    # generate_step builds its own caches (mlx_lm.generate.make_prompt_cache)
    # and quantizes them with KVCache.to_quantized.
    prompt = prompt_of(9, seed=3)
    kwargs = dict(max_tokens=10, kv_bits=4, kv_group_size=64, quantized_kv_start=2, prefill_step_size=3)
    want = run_reference(qwen, prompt, None, **kwargs)
    made = []
    with patched():
        inner = gen.make_prompt_cache
        assert inner is kvcore.make_prompt_cache

        def spy(*a, **k):
            made.append(inner(*a, **k))
            return made[-1]

        gen.make_prompt_cache = spy
        try:
            got = run_generate(qwen, prompt, None, **kwargs)
        finally:
            gen.make_prompt_cache = inner
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, l1), (_, l2) in zip(got, want):
        assert mx.array_equal(l1, l2).item()
    assert [type(c) for c in made[0]] == [kvcore.QuantizedKVCache] * 2


# --------------------------------------------------------------------------
# State-space models: ArraysCache

MAMBA = {
    "model_type": "mamba",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "state_size": 8,
    "num_hidden_layers": 2,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "time_step_rank": 4,
    "tie_word_embeddings": True,
}

MAMBA2 = {
    "model_type": "mamba2",
    "num_heads": 4,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,  # num_heads * head_dim
    "state_size": 16,
    "num_hidden_layers": 2,
    "layer_norm_epsilon": 1e-5,
    "conv_kernel": 4,
    "n_groups": 1,
    "use_bias": False,
    "use_conv_bias": True,
    "tie_word_embeddings": True,
    "time_step_limit": (0.0, float("inf")),
    "time_step_rank": "auto",
}


@pytest.fixture(scope="module")
def mamba_model():
    return build(mamba, MAMBA, 11)


@pytest.fixture(scope="module")
def mamba2_model():
    return build(mamba2, MAMBA2, 12, scale=3.0)


def compare_make_cache_runs(model, module, prompt, n_decode=10, prefill_chunks=None, min_distinct=3):
    rs = model.make_cache()
    assert_all_mlx_lm(rs)
    want = step_by_step(model, rs, prompt, n_decode, prefill_chunks)
    with patched():
        assert module.ArraysCache is kvcore.ArraysCache
        cs = kvcore.make_prompt_cache(model)
        assert_all_kvcore(cs)
        assert [type(c).__name__ for c in cs] == [type(r).__name__ for r in rs]
        got = step_by_step(model, cs, prompt, n_decode, prefill_chunks)
    assert module.ArraysCache is ref.ArraysCache
    assert_same_logits(got, want, min_distinct)
    for i, (c, r) in enumerate(zip(cs, rs)):
        assert_same_state(c, r, f"layer {i}")
    return cs, rs


@pytest.mark.parametrize("prompt_len,chunks", [(12, None), (12, 5), (1, None)])
def test_mamba(mamba_model, prompt_len, chunks):
    cs, _ = compare_make_cache_runs(mamba_model, mamba, prompt_of(prompt_len, seed=prompt_len), 10, chunks)
    assert all(c[0] is not None and c[1] is not None for c in cs)


@pytest.mark.parametrize("prompt_len,chunks", [(12, None), (12, 5), (1, None)])
def test_mamba2(mamba2_model, prompt_len, chunks):
    cs, _ = compare_make_cache_runs(mamba2_model, mamba2, prompt_of(prompt_len, seed=prompt_len), 10, chunks)
    assert all(c[0] is not None and c[1] is not None for c in cs)


def test_mamba2_unpatched_kvcore_caches(mamba2_model):
    # mamba2 only indexes its caches, so kvcore's work without patching.
    prompt = prompt_of(10, seed=5)
    want = step_by_step(mamba2_model, mamba2_model.make_cache(), prompt)
    cs = [kvcore.ArraysCache(size=2) for _ in range(MAMBA2["num_hidden_layers"])]
    assert_same_logits(step_by_step(mamba2_model, cs, prompt), want)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_mamba2_batched_left_padding(mamba2_model, with_lengths):
    # Two rows, the first left-padded by 3: make_mask, advance and (with
    # lengths) the length-aware conv and SSM updates.
    prompt = prompt_of(9, seed=8, batch=2)
    lp = [3, 0]
    L = MAMBA2["num_hidden_layers"]
    rs = [ref.ArraysCache(2, left_padding=lp) for _ in range(L)]
    cs = [kvcore.ArraysCache(2, left_padding=lp) for _ in range(L)]
    if with_lengths:
        for c in rs + cs:
            c.prepare(lengths=[9, 7])
    want = step_by_step(mamba2_model, rs, prompt, 8)
    got = step_by_step(mamba2_model, cs, prompt, 8)
    assert_same_logits(got, want)
    for i, (c, r) in enumerate(zip(cs, rs)):
        assert_same_state(c, r, f"layer {i}")
    assert cs[0].left_padding.tolist() == rs[0].left_padding.tolist() == [3 - 17, -17]


# --------------------------------------------------------------------------
# Hybrid models: CacheList

FALCON_H1 = {
    "model_type": "falcon_h1",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "mamba_d_conv": 4,
    "mamba_d_head": 16,
    "mamba_d_ssm": 64,  # mamba_n_heads * mamba_d_head
    "mamba_d_state": 16,
    "mamba_n_groups": 1,
    "mamba_n_heads": 4,
    "mamba_chunk_size": 16,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
}

BAICHUAN_M1 = {
    "model_type": "baichuan_m1",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "sliding_window": 8,
    "sliding_window_layers": [1, 3],
    "conv_window": 2,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def falcon_model():
    return build(falcon_h1, FALCON_H1, 21)


@pytest.fixture(scope="module")
def baichuan_model():
    return build(baichuan_m1, BAICHUAN_M1, 22)


@pytest.mark.parametrize("prompt_len,chunks", [(12, None), (12, 5), (1, None)])
def test_falcon_h1(falcon_model, prompt_len, chunks):
    cs, rs = compare_make_cache_runs(falcon_model, falcon_h1, prompt_of(prompt_len, seed=30 + prompt_len),
                                     10, chunks)
    for c in cs:
        assert type(c) is kvcore.CacheList
        assert [type(x) for x in c.caches] == [kvcore.ArraysCache, kvcore.KVCache]
        assert c[1].offset == prompt_len + 10
        assert c.size() == prompt_len + 10
    for c, r in zip(cs, rs):
        assert c.nbytes == r.nbytes and c.empty() == r.empty() and c.is_trimmable() == r.is_trimmable()


def test_falcon_h1_unpatched_kvcore_caches(falcon_model):
    # Built by hand, no patching: falcon_h1 only indexes and calls them.
    prompt = prompt_of(11, seed=40)
    want = step_by_step(falcon_model, falcon_model.make_cache(), prompt)
    cs = [kvcore.CacheList(kvcore.ArraysCache(size=2), kvcore.KVCache())
          for _ in range(FALCON_H1["num_hidden_layers"])]
    assert_same_logits(step_by_step(falcon_model, cs, prompt), want)


def test_falcon_h1_cache_state_round_trip_then_continue(falcon_model):
    # Prefill, rebuild every CacheList from its state, decode on.
    prompt = prompt_of(10, seed=41)
    rs = falcon_model.make_cache()
    want = step_by_step(falcon_model, rs, prompt, n_decode=0)
    with patched():
        cs = kvcore.make_prompt_cache(falcon_model)
        assert_all_kvcore(cs)
        got = step_by_step(falcon_model, cs, prompt, n_decode=0)
        cs = [kvcore.CacheList.from_state(c.state) for c in cs]
        assert_all_kvcore(cs)
        rs = [ref.CacheList.from_state(r.state) for r in rs]
        nxt = mx.argmax(want[-1], axis=-1)[:, None]
        for _ in range(8):
            a = falcon_model(nxt, cache=cs)[:, -1, :]
            mx.eval(a)
            got.append(a)
            nxt = mx.argmax(a, axis=-1)[:, None]
    nxt = mx.argmax(want[-1], axis=-1)[:, None]
    for _ in range(8):
        b = falcon_model(nxt, cache=rs)[:, -1, :]
        mx.eval(b)
        want.append(b)
        nxt = mx.argmax(b, axis=-1)[:, None]
    assert_same_logits(got, want)


@pytest.mark.parametrize("prompt_len,chunks", [(14, None), (14, 5), (1, None)])
def test_baichuan_m1(baichuan_model, prompt_len, chunks):
    # Sliding-window layers (RotatingKVCache, 8 slots) rotate within the run.
    cs, _ = compare_make_cache_runs(baichuan_model, baichuan_m1, prompt_of(prompt_len, seed=50 + prompt_len),
                                    10, chunks)
    kinds = [[type(x) for x in c.caches] for c in cs]
    assert kinds == [
        [kvcore.ArraysCache, kvcore.KVCache],
        [kvcore.ArraysCache, kvcore.RotatingKVCache],
        [kvcore.ArraysCache, kvcore.KVCache],
        [kvcore.ArraysCache, kvcore.RotatingKVCache],
    ]
    assert cs[1][1].offset == prompt_len + 10 and cs[1][1].max_size == 8
