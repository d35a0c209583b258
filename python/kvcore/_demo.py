"""The demo: a real model (SmolLM2-135M-Instruct unless --model names
another) answers on mlx-lm's caches and on kvcore's with the same greedy
tokens; then what kvcore adds on that model: a second question about the same
document answered from the prefix cache, and the cache's bytes at float and
quantized with the quality each costs."""

import time

DOCUMENT = (
    "Mara Lind keeps bees at the edge of Oakridge, a village in the hills above the river "
    "Sel. She started with two hives in 2015. Today she has thirty-two hives. In summer the "
    "bees move to the heather on the high moor, which gives a dark honey. Mara sells the "
    "honey at the Saturday market. Her dog, a grey sheepdog called Pepper, is afraid of the "
    "bees and stays in the house when the hives are opened."
)
FIRST = "How many hives does Mara have today?"
SECOND = "What is the name of Mara's dog?"


def tiny_qwen2(layers: int = 4, seed: int = 0):
    """A small Qwen2-shaped mlx-lm model with random weights (for tests and
    benches that need no download)."""
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


def _messages(question, document=None):
    content = f"{document}\n\n{question}" if document else question
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}]


def _greedy(model, tokens, cache, max_tokens):
    """Greedy tokens, seconds to the first one, tokens/s after it."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out, t0, first = [], time.perf_counter(), None
    for tok, _ in generate_step(mx.array(tokens), model, prompt_cache=cache, max_tokens=max_tokens):
        if first is None:
            first = time.perf_counter() - t0
        out.append(int(tok))
    rate = (len(out) - 1) / max(time.perf_counter() - t0 - first, 1e-9)
    return out, first, rate


def _answer(tokenizer, tokens, eos):
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens).strip().replace("\n", " ")


def _held(tokens, cache):
    """The tokens a cache holds (generate_step feeds every token it yields)."""
    return tokens[: cache[0].offset]


def _continuation_quality(model, cache, ref, answer):
    """Teacher-forced on the float answer: top-1 agreement with float's
    logits (ref) and mean KL(float || quantized) over the answer's tokens."""
    import mlx.core as mx

    def log_softmax(x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    logits = model(mx.array([answer[:-1]]), cache=cache)[0].astype(mx.float32)
    p = mx.softmax(ref, axis=-1)
    kl = mx.sum(p * (log_softmax(ref) - log_softmax(logits)), axis=-1)
    agree = mx.mean(mx.argmax(logits, axis=-1) == mx.argmax(ref, axis=-1))
    return agree.item(), mx.mean(kl).item()


def run(model=None, tokens: int = 24, repeat: int = 1) -> int:
    try:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models import cache as mlx_lm_cache
    except ImportError:
        print("The demo needs mlx-lm: pip install 'kvcore[demo]'")
        return 1
    import copy

    import kvcore

    from ._model import resolve

    # mlx-lm's own, before patch_mlx_lm() puts kvcore's in their place.
    make_reference_cache = mlx_lm_cache.make_prompt_cache
    ReferenceLRU = mlx_lm_cache.LRUPromptCache
    path = resolve(model)
    t0 = time.perf_counter()
    net, tokenizer = load(path)
    eos = tokenizer.eos_token_id
    print(f"kvcore {kvcore.__version__} on mlx {mx.__version__} ({mx.default_device()}); "
          f"model {path} loaded in {time.perf_counter() - t0:.1f} s")

    # 1. The same answer on mlx-lm's caches and on kvcore's.
    question = "What is the capital of France?"
    prompt = tokenizer.apply_chat_template(_messages(question), add_generation_prompt=True)
    print(f"\n1. {question!r} ({len(prompt)} prompt tokens), greedy, {tokens} tokens:")
    ok = True
    results = {}
    for label in ("mlx-lm", "kvcore"):
        if label == "kvcore":
            kvcore.patch_mlx_lm()  # the model's make_cache() now builds kvcore's caches
        cache = make_reference_cache(net) if label == "mlx-lm" else kvcore.make_prompt_cache(net)
        out, ttft, rate = _greedy(net, prompt, cache, tokens)
        results[label] = out
        kind = f"{type(cache[0]).__module__}.{type(cache[0]).__name__}"
        print(f"   {label:7s}: {_answer(tokenizer, out, eos)!r}  (first token {ttft:.2f} s, "
              f"then {rate:.1f} tok/s; {kind})")
    same = results["mlx-lm"] == results["kvcore"]
    ok &= same
    print(f"   same tokens: {same}")

    # 2. A second question about the same document, from the prefix cache.
    document = " ".join([DOCUMENT] * repeat)
    first = tokenizer.apply_chat_template(_messages(FIRST, document), add_generation_prompt=True)
    second = tokenizer.apply_chat_template(_messages(SECOND, document), add_generation_prompt=True)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    print(f"\n2. The prefix cache: two questions about one document ({len(first)} and "
          f"{len(second)} prompt tokens, {shared} shared)")
    lru = kvcore.LRUPromptCache(max_size=10)
    cache = kvcore.make_prompt_cache(net)
    out1, ttft1, _ = _greedy(net, first, cache, tokens)
    lru.insert_cache(path, _held(first + out1, cache), cache)
    print(f"   Q: {FIRST}\n   A: {_answer(tokenizer, out1, eos)!r}  (first token {ttft1:.2f} s)")
    cold, ttft_cold, _ = _greedy(net, second, kvcore.make_prompt_cache(net), 1)
    hit, rest = lru.fetch_nearest_cache(path, second)
    out2, ttft_warm, _ = _greedy(net, rest, hit, tokens)
    print(f"   Q: {SECOND}\n   A: {_answer(tokenizer, out2, eos)!r}")
    print(f"   time to first token: {ttft_cold:.2f} s computing all {len(second)} tokens, "
          f"{ttft_warm:.2f} s from the prefix cache ({len(second) - len(rest)} tokens reused, "
          f"{len(rest)} computed): {ttft_cold / ttft_warm:.1f}x")
    second_held = _held(second + out2, hit)
    lru.insert_cache(path, second_held, hit)
    kvcore.unpatch_mlx_lm()  # mlx-lm's LRUPromptCache looks up its module's names
    ref = ReferenceLRU(max_size=10)  # holds what it is given, as mlx_lm.server gives it
    ref.insert_cache(path, _held(first + out1, cache), cache)
    ref.insert_cache(path, second_held, hit)
    kvcore.patch_mlx_lm()
    print(f"   both conversations held: kvcore's LRUPromptCache {lru.nbytes / 1e6:.2f} MB "
          f"(the document's keys and values once), mlx-lm's {ref.nbytes / 1e6:.2f} MB")

    # 3. Bytes and quality of quantized caches.
    full = kvcore.make_prompt_cache(net)
    net(mx.array([second[:-1]]), cache=full)
    answer = [second[-1]] + [t for t in out2 if t != eos][: tokens - 1]
    base = copy.deepcopy(full)
    float_logits = net(mx.array([answer[:-1]]), cache=base)[0].astype(mx.float32)
    dtype = str(full[0].keys.dtype).replace("mlx.core.", "")
    print(f"\n3. The KV cache of the second prompt ({len(second) - 1} tokens), quantized after the "
          f"prefill; quality over the {len(answer) - 1} answer tokens, fed as the float cache "
          f"answered:")
    print(f"   {'cache':22s} {'bytes':>10s} {'x float':>8s} {'top-1 agree':>12s} "
          f"{'KL vs float':>12s}")
    float_bytes = sum(c.nbytes for c in full)
    print(f"   {'float (' + dtype + ')':22s} {float_bytes:10d} {1.0:8.3f} {1.0:12.3f} {0.0:12.4f}")
    # rotated-channel with no float window: every whole group of 32 tokens quantized.
    rotated = dict(group_size=(32, 64), scheme="rotated-channel", window=0)
    settings = [("8 bits", dict(group_size=64, bits=8)),
                ("keys 8, values 4 bits", dict(group_size=64, bits=(8, 4))),
                ("4 bits", dict(group_size=64, bits=4)),
                ("4 bits rotated-channel", dict(rotated, bits=4)),
                ("3 bits rotated-channel", dict(rotated, bits=3)),
                # and the first token in float too (the commands' default sink)
                ("3 bits r-c, sink 1", dict(rotated, bits=3, sink=1))]
    for name, kw in settings:
        q = [c.to_quantized(**kw) for c in full]
        nbytes = sum(c.nbytes for c in q)
        agree, kl = _continuation_quality(net, q, float_logits, answer)
        print(f"   {name:22s} {nbytes:10d} {nbytes / float_bytes:8.3f} {agree:12.3f} {kl:12.4f}")
    print("\ndemo:", "ok" if ok else "MISMATCH")
    return 0 if ok else 1
