"""The demo: a Qwen2-shaped model with random weights (no download) generates
greedily on mlx-lm's caches and on kvcore's; the tokens must be the same."""

import time


def tiny_qwen2(layers: int = 4, seed: int = 0):
    """A small Qwen2-shaped mlx-lm model with random weights."""
    import mlx.core as mx
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=128,
        num_hidden_layers=layers,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


def _generate(model, prompt, cache, tokens):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    # Sampled at temperature 1 from one seed: same logits, same tokens.
    mx.random.seed(42)
    sampler = make_sampler(temp=1.0)
    out, start = [], time.perf_counter()
    steps = generate_step(prompt, model, prompt_cache=cache, max_tokens=tokens, sampler=sampler)
    for (tok, _), _ in zip(steps, range(tokens)):
        out.append(int(tok))
    mx.eval()
    return out, time.perf_counter() - start


def run(tokens: int = 64, layers: int = 4, window: int = 32) -> int:
    try:
        import mlx.core as mx
        from mlx_lm.models import cache as mlx_lm_cache
    except ImportError:
        print("The demo needs mlx-lm: pip install 'kvcore[demo]'")
        return 1
    import kvcore

    model = tiny_qwen2(layers)
    prompt = mx.array([1, 5, 9, 13, 17, 21, 25, 29] * 6)
    print(f"kvcore {kvcore.__version__} on mlx {mx.__version__} ({mx.default_device()})")
    print(f"model: Qwen2-shaped, {layers} layers, random weights; prompt {prompt.size} tokens")
    _generate(model, prompt, mlx_lm_cache.make_prompt_cache(model), 4)  # warm-up
    ok = True
    for label, ref_cache, kv_cache in [
        ("KVCache", mlx_lm_cache.make_prompt_cache(model),
         kvcore.make_prompt_cache(model)),
        (f"RotatingKVCache(max_size={window})",
         mlx_lm_cache.make_prompt_cache(model, max_kv_size=window),
         kvcore.make_prompt_cache(model, max_kv_size=window)),
    ]:
        ref_tokens, ref_s = _generate(model, prompt, ref_cache, tokens)
        kv_tokens, kv_s = _generate(model, prompt, kv_cache, tokens)
        same = ref_tokens == kv_tokens
        ok &= same
        print(f"\n{label}: {tokens} tokens")
        print(f"  mlx-lm : {ref_tokens[:16]} ... {tokens / ref_s:7.1f} tok/s")
        print(f"  kvcore : {kv_tokens[:16]} ... {tokens / kv_s:7.1f} tok/s")
        print(f"  same tokens: {same}; kvcore cache offset {kv_cache[0].offset}, "
              f"{sum(c.nbytes for c in kv_cache)} bytes")
    print("\ndemo:", "ok" if ok else "MISMATCH")
    return 0 if ok else 1
