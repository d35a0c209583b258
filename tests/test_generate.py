"""End to end: mlx-lm's generate_step on a small random Qwen2 model, with
mlx-lm's caches and with kvcore's. Tokens and log-probabilities must be
identical (exact equality) at every step.
"""

import importlib

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen2
from mlx_lm.sample_utils import make_sampler

import kvcore

# `import mlx_lm.generate as gen` would give the generate() function that
# mlx_lm re-exports under the same name.
gen = importlib.import_module("mlx_lm.generate")

CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 128,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "tie_word_embeddings": True,
}
N_LAYERS = CONFIG["num_hidden_layers"]


@pytest.fixture(scope="module")
def model():
    mx.random.seed(1234)
    m = qwen2.Model(qwen2.ModelArgs.from_dict(CONFIG))
    # Random weights at init scale make every greedy step pick the same
    # token; scaled up, the model wanders over the vocabulary.
    m.update(tree_map(lambda p: p * 4, m.parameters()))
    mx.eval(m.parameters())
    assert not hasattr(m, "make_cache")  # so make_prompt_cache decides
    return m


def prompt_of(n, seed=0):
    return mx.random.randint(0, CONFIG["vocab_size"], (n,), key=mx.random.key(seed))


def run(model, prompt, cache, max_tokens=20, temp=None, **kwargs):
    """[(token, logprobs)] from generate_step."""
    if temp is not None:
        mx.random.seed(77)
        kwargs["sampler"] = make_sampler(temp=temp)
    out = []
    for tok, logprobs in generate_step(prompt, model, max_tokens=max_tokens, prompt_cache=cache, **kwargs):
        assert type(logprobs) is mx.array
        mx.eval(logprobs)
        out.append((tok, logprobs))
    return out


def assert_same_run(got, want, min_distinct=3):
    assert len(got) == len(want) > 0
    for i, ((t1, l1), (t2, l2)) in enumerate(zip(got, want)):
        assert t1 == t2, f"token {i}: kvcore {t1} != mlx-lm {t2}"
        assert l1.shape == l2.shape and l1.dtype == l2.dtype
        assert mx.array_equal(l1, l2).item(), (
            f"logprobs differ at step {i}: max |diff| {mx.abs(l1 - l2).max().item()}"
        )
    # A run that only ever emits one token would prove little.
    assert len({t for t, _ in want}) >= min(min_distinct, len(want))


def assert_same_caches(cs, rs):
    assert len(cs) == len(rs)
    for c, r in zip(cs, rs):
        assert c.offset == r.offset
        if hasattr(r, "_idx"):
            assert c._idx == r._idx
        kc, vc = c.keys_and_values() if not c.empty() else (None, None)
        kr, vr = r.keys_and_values() if not r.empty() else (None, None)
        if kr is None:
            assert kc is None
            continue
        assert kc.shape == kr.shape and mx.array_equal(kc, kr).item()
        assert vc.shape == vr.shape and mx.array_equal(vc, vr).item()


# --------------------------------------------------------------------------
# plain generation


CACHES = {
    "KVCache": (
        lambda m: kvcore.make_prompt_cache(m),
        lambda m: ref.make_prompt_cache(m),
    ),
    "KVCache-listed": (
        lambda m: [kvcore.KVCache() for _ in range(N_LAYERS)],
        lambda m: [ref.KVCache() for _ in range(N_LAYERS)],
    ),
    "Rotating16-keep4": (
        lambda m: [kvcore.RotatingKVCache(max_size=16, keep=4) for _ in range(N_LAYERS)],
        lambda m: [ref.RotatingKVCache(max_size=16, keep=4) for _ in range(N_LAYERS)],
    ),
    "Rotating-max_kv_size16": (
        lambda m: kvcore.make_prompt_cache(m, max_kv_size=16),
        lambda m: ref.make_prompt_cache(m, max_kv_size=16),
    ),
    "Rotating-max_kv_size64": (
        lambda m: kvcore.make_prompt_cache(m, max_kv_size=64),
        lambda m: ref.make_prompt_cache(m, max_kv_size=64),
    ),
    "Rotating9-keep0": (
        lambda m: [kvcore.RotatingKVCache(max_size=9) for _ in range(N_LAYERS)],
        lambda m: [ref.RotatingKVCache(max_size=9) for _ in range(N_LAYERS)],
    ),
    "Concatenate": (
        lambda m: [kvcore.ConcatenateKVCache() for _ in range(N_LAYERS)],
        lambda m: [ref.ConcatenateKVCache() for _ in range(N_LAYERS)],
    ),
}


@pytest.mark.parametrize("caches", list(CACHES))
@pytest.mark.parametrize("prefill_step_size", [2048, 4, 7])
@pytest.mark.parametrize("prompt_len", [1, 5, 40])
def test_generate_matches_mlx_lm(model, caches, prefill_step_size, prompt_len):
    make_kv, make_ref = CACHES[caches]
    prompt = prompt_of(prompt_len, seed=prompt_len)
    cs, rs = make_kv(model), make_ref(model)
    assert all(type(c).__module__.startswith("kvcore") for c in cs)
    assert [type(c).__name__ for c in cs] == [type(r).__name__ for r in rs]
    got = run(model, prompt, cs, prefill_step_size=prefill_step_size)
    want = run(model, prompt, rs, prefill_step_size=prefill_step_size)
    assert_same_run(got, want)
    assert_same_caches(cs, rs)
    assert cs[0].offset == prompt_len + 20
    if caches.startswith("Rotating") and prompt_len == 40 and cs[0].max_size < 60:
        assert cs[0].offset > cs[0].max_size  # it did rotate
        assert cs[0].keys.shape[2] == cs[0].max_size


def test_rotating_cache_rotates_during_prefill_and_decode(model):
    # 40-token prompt in chunks of 4 into a 16-slot window, then 30 tokens.
    prompt = prompt_of(40, seed=3)
    cs = [kvcore.RotatingKVCache(max_size=16, keep=4) for _ in range(N_LAYERS)]
    rs = [ref.RotatingKVCache(max_size=16, keep=4) for _ in range(N_LAYERS)]
    got = run(model, prompt, cs, max_tokens=30, prefill_step_size=4)
    want = run(model, prompt, rs, max_tokens=30, prefill_step_size=4)
    assert_same_run(got, want)
    assert_same_caches(cs, rs)
    assert cs[0].offset == 70 and cs[0].keys.shape[2] == 16
    assert not kvcore.can_trim_prompt_cache(cs) and not ref.can_trim_prompt_cache(rs)


@pytest.mark.parametrize("caches", ["KVCache", "Rotating16-keep4"])
def test_generate_with_sampling_matches_mlx_lm(model, caches):
    make_kv, make_ref = CACHES[caches]
    prompt = prompt_of(24, seed=9)
    got = run(model, prompt, make_kv(model), max_tokens=25, temp=1.0, prefill_step_size=5)
    want = run(model, prompt, make_ref(model), max_tokens=25, temp=1.0, prefill_step_size=5)
    assert_same_run(got, want)


def test_generate_float16_model(model):
    m16 = qwen2.Model(qwen2.ModelArgs.from_dict(CONFIG))
    m16.update(tree_map(lambda p: p.astype(mx.float16), model.parameters()))
    mx.eval(m16.parameters())
    prompt = prompt_of(30, seed=4)
    for make_kv, make_ref in (CACHES["KVCache"], CACHES["Rotating16-keep4"]):
        cs, rs = make_kv(m16), make_ref(m16)
        got = run(m16, prompt, cs, prefill_step_size=8)
        want = run(m16, prompt, rs, prefill_step_size=8)
        assert_same_run(got, want)
        assert cs[0].keys.dtype == rs[0].keys.dtype == mx.float16


def test_prompt_cache_reused_across_calls(model):
    # mlx-lm's documented pattern: keep the cache, feed the next turn.
    cs, rs = kvcore.make_prompt_cache(model), ref.make_prompt_cache(model)
    for turn, n in enumerate([12, 1, 7, 3]):
        p = prompt_of(n, seed=100 + turn)
        got = run(model, p, cs, max_tokens=6, prefill_step_size=4)
        want = run(model, p, rs, max_tokens=6, prefill_step_size=4)
        assert_same_run(got, want, min_distinct=2)
        assert_same_caches(cs, rs)


# --------------------------------------------------------------------------
# trim and regenerate


def trim_and_regenerate(model, cs, rs, prompt, n1, k, n2, prefill_step_size=2048):
    first_c = run(model, prompt, cs, max_tokens=n1, prefill_step_size=prefill_step_size)
    first_r = run(model, prompt, rs, max_tokens=n1, prefill_step_size=prefill_step_size)
    assert_same_run(first_c, first_r)
    assert cs[0].offset == rs[0].offset == len(prompt) + n1

    trimmed_c = kvcore.trim_prompt_cache(cs, k)
    trimmed_r = ref.trim_prompt_cache(rs, k)
    assert trimmed_c == trimmed_r
    assert cs[0].offset == rs[0].offset
    # Go on from the token after what is kept.
    nxt = mx.array([first_r[n1 - trimmed_r][0] if trimmed_r else first_r[-1][0]])
    again_c = run(model, nxt, cs, max_tokens=n2)
    again_r = run(model, nxt, rs, max_tokens=n2)
    assert_same_run(again_c, again_r)
    assert cs[0].offset == rs[0].offset
    return trimmed_c, again_c


@pytest.mark.parametrize("k", [1, 5, 15])
@pytest.mark.parametrize("prefill_step_size", [2048, 4])
def test_trim_and_regenerate_kvcache(model, k, prefill_step_size):
    cs, rs = kvcore.make_prompt_cache(model), ref.make_prompt_cache(model)
    assert kvcore.can_trim_prompt_cache(cs) and ref.can_trim_prompt_cache(rs)
    trimmed, _ = trim_and_regenerate(model, cs, rs, prompt_of(20, 5), 15, k, 15, prefill_step_size)
    assert trimmed == k


def test_trim_into_prompt_and_regenerate(model):
    # Trim past the generated tokens into the prompt.
    cs, rs = kvcore.make_prompt_cache(model), ref.make_prompt_cache(model)
    trimmed, _ = trim_and_regenerate(model, cs, rs, prompt_of(20, 6), 10, 10, 12)
    assert trimmed == 10
    cs, rs = kvcore.make_prompt_cache(model), ref.make_prompt_cache(model)
    run(model, prompt_of(20, 6), cs, max_tokens=4)
    run(model, prompt_of(20, 6), rs, max_tokens=4)
    assert kvcore.trim_prompt_cache(cs, 15) == ref.trim_prompt_cache(rs, 15) == 15
    p = prompt_of(6, 8)
    assert_same_run(run(model, p, cs), run(model, p, rs))


def test_trim_more_than_cached(model):
    cs, rs = kvcore.make_prompt_cache(model), ref.make_prompt_cache(model)
    run(model, prompt_of(10, 1), cs, max_tokens=3)
    run(model, prompt_of(10, 1), rs, max_tokens=3)
    assert kvcore.trim_prompt_cache(cs, 100) == ref.trim_prompt_cache(rs, 100) == 13
    assert cs[0].offset == 0
    p = prompt_of(9, 2)
    assert_same_run(run(model, p, cs), run(model, p, rs))


@pytest.mark.parametrize("k", [1, 6])
def test_trim_and_regenerate_rotating_before_rotation(model, k):
    cs = kvcore.make_prompt_cache(model, max_kv_size=64)
    rs = ref.make_prompt_cache(model, max_kv_size=64)
    trimmed, _ = trim_and_regenerate(model, cs, rs, prompt_of(20, 7), 12, k, 10, prefill_step_size=4)
    assert trimmed == k


def test_trim_rotated_cache_refused_then_regenerate(model):
    # Once rotated, neither trims (trim_prompt_cache returns 0); both go on.
    cs = kvcore.make_prompt_cache(model, max_kv_size=16)
    rs = ref.make_prompt_cache(model, max_kv_size=16)
    trimmed, _ = trim_and_regenerate(model, cs, rs, prompt_of(30, 8), 10, 4, 10)
    assert trimmed == 0


def test_trim_concatenate_matches_mlx_lm_kvcache(model):
    # kvcore's ConcatenateKVCache really drops trimmed tokens (mlx-lm's
    # brings them back on the next update), so it must match mlx-lm's
    # KVCache, whose trim is exact.
    cs = [kvcore.ConcatenateKVCache() for _ in range(N_LAYERS)]
    rs = ref.make_prompt_cache(model)
    trimmed, _ = trim_and_regenerate(model, cs, rs, prompt_of(18, 9), 12, 5, 12)
    assert trimmed == 5
    assert cs[0].keys.shape[2] == cs[0].offset


# --------------------------------------------------------------------------
# patch_mlx_lm


@pytest.fixture
def unpatched():
    originals = {name: getattr(ref, name) for name in (
        "KVCache", "ConcatenateKVCache", "RotatingKVCache", "QuantizedKVCache",
        "ChunkedKVCache", "make_prompt_cache", "can_trim_prompt_cache",
        "trim_prompt_cache", "create_attention_mask",
    )}
    gen_originals = {
        name: getattr(gen, name)
        for name in (
            "make_prompt_cache", "can_trim_prompt_cache", "trim_prompt_cache", "QuantizedKVCache",
        )
    }
    assert originals["KVCache"].__module__ == "mlx_lm.models.cache"
    yield originals, gen_originals
    kvcore.unpatch_mlx_lm()
    for name, obj in originals.items():
        assert getattr(ref, name) is obj, f"mlx_lm.models.cache.{name} not restored"
    for name, obj in gen_originals.items():
        assert getattr(gen, name) is obj, f"mlx_lm.generate.{name} not restored"


def test_patch_mlx_lm(model, unpatched, monkeypatch):
    originals, gen_originals = unpatched
    prompt = prompt_of(25, seed=11)
    want = run(model, prompt, None, prefill_step_size=4)
    want_rot = run(model, prompt, None, prefill_step_size=4, max_kv_size=16)

    kvcore.patch_mlx_lm()
    try:
        kvcore.patch_mlx_lm()  # idempotent
        assert ref.KVCache is kvcore.KVCache
        assert ref.RotatingKVCache is kvcore.RotatingKVCache
        assert ref.ConcatenateKVCache is kvcore.ConcatenateKVCache
        assert ref.make_prompt_cache is kvcore.make_prompt_cache
        assert gen.make_prompt_cache is kvcore.make_prompt_cache
        assert gen.trim_prompt_cache is kvcore.trim_prompt_cache

        built = ref.make_prompt_cache(model)
        assert len(built) == N_LAYERS
        assert all(type(c) is kvcore.KVCache for c in built)
        built = ref.make_prompt_cache(model, max_kv_size=16)
        assert all(type(c) is kvcore.RotatingKVCache for c in built)
        assert (built[0].max_size, built[0].keep) == (16, 4)

        # generate_step builds its own cache: record what it builds.
        made = []
        patched_make = gen.make_prompt_cache

        def spy(*args, **kwargs):
            caches = patched_make(*args, **kwargs)
            made.append(caches)
            return caches

        monkeypatch.setattr(gen, "make_prompt_cache", spy)
        got = run(model, prompt, None, prefill_step_size=4)
        got_rot = run(model, prompt, None, prefill_step_size=4, max_kv_size=16)
        monkeypatch.undo()
        assert [type(c) for c in made[0]] == [kvcore.KVCache] * N_LAYERS
        assert [type(c) for c in made[1]] == [kvcore.RotatingKVCache] * N_LAYERS
        assert made[0][0].offset == 45 and made[1][0].offset == 45
        assert_same_run(got, want)
        assert_same_run(got_rot, want_rot)
    finally:
        kvcore.unpatch_mlx_lm()

    kvcore.unpatch_mlx_lm()  # idempotent too
    for name, obj in originals.items():
        assert getattr(ref, name) is obj
    for name, obj in gen_originals.items():
        assert getattr(gen, name) is obj
    assert all(type(c) is originals["KVCache"] for c in ref.make_prompt_cache(model))
    assert_same_run(run(model, prompt, None, prefill_step_size=4), want)


GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "query_pre_attn_scalar": 16,
    "sliding_window": 8,
    "sliding_window_pattern": 3,
    "rope_theta": 10000.0,
    "rope_local_base_freq": 10000.0,
}


@pytest.fixture(scope="module")
def gemma3():
    from mlx_lm.models import gemma3_text

    mx.random.seed(4321)
    m = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(GEMMA3))
    m.update(tree_map(lambda p: p * 4, m.parameters()))
    mx.eval(m.parameters())
    return gemma3_text, m


@pytest.mark.parametrize("prefill_step_size", [2048, 4])
def test_sliding_window_model_with_kvcore_caches(gemma3, prefill_step_size):
    # gemma3: two 8-token sliding-window layers (RotatingKVCache, masks with
    # window_size) and one global layer.
    _, m = gemma3
    rs = m.make_cache()
    assert [type(r) for r in rs] == [ref.RotatingKVCache, ref.RotatingKVCache, ref.KVCache]
    cs = [kvcore.RotatingKVCache(max_size=8), kvcore.RotatingKVCache(max_size=8), kvcore.KVCache()]
    prompt = prompt_of(30, seed=21)
    got = run(m, prompt, cs, max_tokens=20, prefill_step_size=prefill_step_size)
    want = run(m, prompt, rs, max_tokens=20, prefill_step_size=prefill_step_size)
    assert_same_run(got, want)
    assert_same_caches(cs, rs)


def test_patch_swaps_classes_in_loaded_model_modules(gemma3, unpatched):
    mod, m = gemma3
    originals, _ = unpatched
    assert mod.KVCache is originals["KVCache"]
    prompt = prompt_of(30, seed=22)
    want = run(m, prompt, None, max_tokens=20, prefill_step_size=4)
    kvcore.patch_mlx_lm()
    try:
        assert mod.KVCache is kvcore.KVCache
        assert mod.RotatingKVCache is kvcore.RotatingKVCache
        made = m.make_cache()
        assert [type(c) for c in made] == [kvcore.RotatingKVCache] * 2 + [kvcore.KVCache]
        got = run(m, prompt, None, max_tokens=20, prefill_step_size=4)
        assert_same_run(got, want)
    finally:
        kvcore.unpatch_mlx_lm()
    assert mod.KVCache is originals["KVCache"]
    assert mod.RotatingKVCache is originals["RotatingKVCache"]
    assert [type(c) for c in m.make_cache()] == [ref.RotatingKVCache] * 2 + [ref.KVCache]


def test_patch_covers_modules_imported_later(unpatched):
    import sys

    import mlx_lm.models as models_pkg

    originals, _ = unpatched
    name = "mlx_lm.models.cohere2"
    saved = sys.modules.pop(name, None)
    saved_attr = getattr(models_pkg, "cohere2", None)
    kvcore.patch_mlx_lm()
    try:
        # A model module that imports cache classes by name, loaded after
        # the patch, sees kvcore's.
        mod = importlib.import_module(name)
        assert mod.KVCache is kvcore.KVCache
        assert mod.RotatingKVCache is kvcore.RotatingKVCache
    finally:
        kvcore.unpatch_mlx_lm()
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved
        if saved_attr is not None:
            models_pkg.cohere2 = saved_attr
        elif hasattr(models_pkg, "cohere2"):
            del models_pkg.cohere2
    assert ref.KVCache is originals["KVCache"]
    assert importlib.import_module(name).KVCache is originals["KVCache"]
