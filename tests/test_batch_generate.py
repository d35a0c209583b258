"""End to end: mlx-lm's batch generation (batch_generate, BatchGenerator) on
small random models, with mlx-lm's caches and with kvcore's (through
kvcore.patch_mlx_lm()). Tokens, log-probabilities and the prompt caches
handed back must be identical.

The models: a full-attention Qwen2, the same with max_kv_size (every layer a
sliding window), a gemma3 text model (sliding-window layers beside a global
one), baichuan_m1 (each layer a CacheList of an ArraysCache and a KVCache or
RotatingKVCache) and lfm2 (KVCache layers beside ArraysCache conv layers whose
state follows the prompt lengths during a right-padded prefill). Prompts of different lengths make BatchGenerator
right-pad (prepare/finalize), prompts cut in prefill steps and sequences
joining a running batch make it extend, sequences finishing at different
times make it filter and extract, and caches handed back for a second turn
make it merge histories of different lengths (left padding).
"""

import contextlib
import importlib

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from mlx.utils import tree_map
from mlx_lm.models import baichuan_m1, gemma3_text, lfm2, qwen2
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

import kvcore

# `import mlx_lm.generate as gen` would give the generate() function that
# mlx_lm re-exports under the same name.
gen = importlib.import_module("mlx_lm.generate")

VOCAB = 128

QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "tie_word_embeddings": True,
}

GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "query_pre_attn_scalar": 16,
    "sliding_window": 8,
    "sliding_window_pattern": 3,
    "rope_theta": 10000.0,
    "rope_local_base_freq": 10000.0,
}

BAICHUAN = {
    "model_type": "baichuan_m1",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "sliding_window": 8,
    "sliding_window_layers": [0, 2],
    "conv_window": 2,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

LFM2 = {
    "model_type": "lfm2",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "norm_eps": 1e-5,
    "conv_bias": False,
    "conv_L_cache": 3,
    "block_dim": 64,
    "block_multiple_of": 16,
    "block_ffn_dim_multiplier": 1.0,
    "block_auto_adjust_ff_dim": False,
    "block_ff_dim": 128,
    "layer_types": ["conv", "full_attention", "conv"],
    "rope_theta": 10000.0,
}

QWEN2_WINDOW = 12  # max_kv_size for the "qwen2-rotating" runs


def build(module, config, seed):
    mx.random.seed(seed)
    m = module.Model(module.ModelArgs.from_dict(config))
    # Random weights at init scale make every greedy step pick the same
    # token; scaled up, the model wanders over the vocabulary.
    params = tree_map(lambda p: p * 4, m.parameters())
    m.update(params)
    if module is baichuan_m1:
        # its key/value convolutions start at zero: give them weights
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            attn.conv_k = mx.random.normal(attn.conv_k.shape, key=mx.random.key(100 + i))
            attn.conv_v = mx.random.normal(attn.conv_v.shape, key=mx.random.key(200 + i))
    mx.eval(m.parameters())
    return m


_MODELS = {}


def get_model(name):
    """(model, BatchGenerator keyword arguments) by name, built once."""
    if name not in _MODELS:
        if name.startswith("qwen2"):
            m = _MODELS.get("qwen2", (None,))[0] or build(qwen2, QWEN2, 1234)
            kwargs = {"max_kv_size": QWEN2_WINDOW} if name == "qwen2-rotating" else {}
        elif name == "gemma3":
            m, kwargs = build(gemma3_text, GEMMA3, 4321), {}
        elif name == "baichuan_m1":
            m, kwargs = build(baichuan_m1, BAICHUAN, 99), {}
        elif name == "lfm2":
            m, kwargs = build(lfm2, LFM2, 5), {}
        else:
            raise AssertionError(name)
        _MODELS[name] = (m, kwargs)
    return _MODELS[name]


MODEL_NAMES = ["qwen2", "qwen2-rotating", "gemma3", "baichuan_m1", "lfm2"]
WINDOW = {"qwen2": None, "qwen2-rotating": QWEN2_WINDOW, "gemma3": 8, "baichuan_m1": 8, "lfm2": None}


@pytest.fixture(scope="module")
def tokenizer():
    """A local word-level tokenizer: "t0".."t127" are the model's tokens;
    "<eos>" (128) is one the model cannot emit, so only max_tokens or the
    stop tokens a test picks end a sequence."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab["<eos>"] = VOCAB
    vocab["<unk>"] = VOCAB + 1
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    wrapped = TokenizerWrapper(hf)
    assert wrapped.eos_token_ids == {VOCAB}
    assert wrapped.encode("t3 t9") == [3, 9] and wrapped.decode([3, 9]) == "t3 t9"
    return wrapped


def prompt_of(n, seed):
    return mx.random.randint(0, VOCAB, (n,), key=mx.random.key(seed)).tolist()


# --------------------------------------------------------------------------
# running with mlx-lm's caches or kvcore's, watching what BatchGenerator does


def layer_types(caches):
    out = []
    for c in caches:
        if type(c).__name__ == "CacheList":
            out.append((type(c), tuple(type(x) for x in c.caches)))
        else:
            out.append(type(c))
    return out


def all_types(caches):
    for t in layer_types(caches):
        if isinstance(t, tuple):
            yield t[0]
            yield from t[1]
        else:
            yield t


class Spy:
    """Records the cache classes BatchGenerator merges, extends, filters and
    extracts, by wrapping the mlx_lm.generate functions that do it."""

    def __init__(self):
        self.events = []  # (what, [cache classes])

    def count(self, what):
        return sum(1 for w, _ in self.events if w == what)

    @contextlib.contextmanager
    def watching(self):
        saved = [
            (gen, "_merge_caches", gen._merge_caches),
            (gen, "_extend_cache", gen._extend_cache),
            (gen.GenerationBatch, "filter", gen.GenerationBatch.filter),
            (gen.PromptProcessingBatch, "filter", gen.PromptProcessingBatch.filter),
            (gen.GenerationBatch, "extract_cache", gen.GenerationBatch.extract_cache),
        ]
        merge, extend, gfilter, pfilter, extract = (s[2] for s in saved)
        events = self.events

        def spy_merge(caches):
            out = merge(caches)
            if out:
                events.append(("merge", list(all_types(out))))
            return out

        def spy_extend(a, b):
            if a and b:
                events.append(("extend", list(all_types(a)) + list(all_types(b))))
            return extend(a, b)

        def spy_gfilter(self_, keep):
            if keep and len(keep) < len(self_.uids):
                events.append(("filter", list(all_types(self_.prompt_cache))))
            return gfilter(self_, keep)

        def spy_pfilter(self_, keep):
            if keep and len(keep) < len(self_.uids):
                events.append(("prompt filter", list(all_types(self_.prompt_cache))))
            return pfilter(self_, keep)

        def spy_extract(self_, idx):
            events.append(("batch", list(all_types(self_.prompt_cache))))
            out = extract(self_, idx)
            events.append(("extract", list(all_types(out))))
            return out

        gen._merge_caches = spy_merge
        gen._extend_cache = spy_extend
        gen.GenerationBatch.filter = spy_gfilter
        gen.PromptProcessingBatch.filter = spy_pfilter
        gen.GenerationBatch.extract_cache = spy_extract
        try:
            yield self
        finally:
            for owner, name, obj in saved:
                setattr(owner, name, obj)

    def assert_classes_from(self, module_prefix):
        assert self.events, "BatchGenerator did nothing with caches"
        for what, types in self.events:
            for t in types:
                assert t.__module__.startswith(module_prefix), f"{what}: {t!r} is not {module_prefix}'s"


@contextlib.contextmanager
def caches_of(impl):
    """Run mlx-lm with its own caches ("mlx-lm") or with kvcore's."""
    if impl == "mlx-lm":
        assert ref.BatchKVCache.__module__ == "mlx_lm.models.cache"
        yield
        return
    kvcore.patch_mlx_lm()
    try:
        assert ref.BatchKVCache is kvcore.BatchKVCache
        assert ref.BatchRotatingKVCache is kvcore.BatchRotatingKVCache
        assert ref.KVCache is kvcore.KVCache and gen.make_prompt_cache is kvcore.make_prompt_cache
        yield
    finally:
        kvcore.unpatch_mlx_lm()
    assert ref.BatchKVCache.__module__ == "mlx_lm.models.cache"
    assert gen.make_prompt_cache is ref.make_prompt_cache


def run_both(fn):
    """fn(impl) under mlx-lm's caches, then under kvcore's; each with a spy.
    Returns ((want, spy), (got, spy))."""
    out = []
    for impl in ("mlx-lm", "kvcore"):
        spy = Spy()
        with caches_of(impl), spy.watching():
            result = fn(impl)
        spy.assert_classes_from("mlx_lm" if impl == "mlx-lm" else "kvcore")
        out.append((result, spy))
    return out


# --------------------------------------------------------------------------
# comparing


def assert_tree_equal(a, b, what="tree"):
    """Cache states: nested tuples/lists of arrays, scalars, strings, None."""
    if isinstance(a, mx.array):
        assert isinstance(b, mx.array), f"{what}: {type(b)!r} is not an array"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
        assert mx.array_equal(a, b).item(), f"{what}: values differ"
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: {b!r:.80} is not like {a!r:.80}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{what}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{what}: {b!r} != {a!r}"


def assert_same_prompt_caches(want, got, what="prompt cache"):
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert len(w) == len(g)
        for j, (wc, gc) in enumerate(zip(w, g)):
            assert type(gc).__name__ == type(wc).__name__, f"{what} {i} layer {j}"
            assert type(gc).__module__.startswith("kvcore"), f"{what} {i} layer {j}: {type(gc)!r}"
            assert_tree_equal(wc.state, gc.state, f"{what} {i} layer {j} state")


def assert_same_batch_response(want, got):
    assert got.token_ids == want.token_ids
    assert got.texts == want.texts
    if want.logprobs is not None:
        assert got.logprobs == want.logprobs  # exact floats
    if want.caches is not None:
        assert_same_prompt_caches(want.caches, got.caches)
    # a run that emits one token over and over would prove little
    assert all(len(set(t)) >= min(3, len(t)) for t in want.token_ids), want.token_ids


def rotated_somewhere(caches):
    """Whether some returned sliding-window cache went past its window."""
    for layers in caches:
        for c in layers:
            inner = c.caches if type(c).__name__ == "CacheList" else (c,)
            for x in inner:
                if type(x).__name__ == "RotatingKVCache" and x.offset > x.max_size:
                    return True
    return False


# --------------------------------------------------------------------------
# batch_generate


PROMPT_LENGTHS = [3, 11, 1, 17, 6]
MAX_TOKENS = [20, 6, 30, 12, 25]

BATCHING = {
    # every prompt in one right-padded prefill, finishing at different times
    "one-batch": dict(prefill_batch_size=8, completion_batch_size=8),
    # prompts cut in prefill steps of 4, two at a time, at most three decoding:
    # later prompts join the running batch when others finish
    "staggered": dict(prefill_batch_size=2, completion_batch_size=3, prefill_step_size=4),
    # one at a time
    "singles": dict(prefill_batch_size=1, completion_batch_size=2, prefill_step_size=5),
}


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_generate_matches_mlx_lm(tokenizer, name, batching):
    model, kwargs = get_model(name)
    prompts = [prompt_of(n, seed=n) for n in PROMPT_LENGTHS]

    def go(impl):
        return gen.batch_generate(
            model, tokenizer, prompts, max_tokens=MAX_TOKENS, return_prompt_caches=True,
            return_token_ids=True, return_logprobs=True, **kwargs, **BATCHING[batching],
        )

    (want, rspy), (got, kspy) = run_both(go)
    assert [len(t) for t in want.token_ids] == MAX_TOKENS
    assert_same_batch_response(want, got)
    assert [what for what, _ in kspy.events] == [what for what, _ in rspy.events]
    # sequences finished at different times and left the batch
    assert kspy.count("filter") >= 1 and kspy.count("extract") == len(prompts)
    if batching != "one-batch":
        assert kspy.count("extend") >= 1  # sequences joined a running batch
    batch_types = {t for what, ts in kspy.events if what == "batch" for t in ts}
    if WINDOW[name]:
        assert kvcore.BatchRotatingKVCache in batch_types
        assert rotated_somewhere(got.caches)
    if name != "qwen2-rotating":
        assert kvcore.BatchKVCache in batch_types
    if name == "baichuan_m1":
        assert {kvcore.CacheList, kvcore.ArraysCache} <= batch_types
    if name == "lfm2":
        assert kvcore.ArraysCache in batch_types


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_second_turn_with_returned_prompt_caches(tokenizer, name):
    # Turn 1 hands back each sequence's cache; turn 2 goes on from them with
    # new prompts. The histories differ in length, so their merge is left
    # padded (and rotated windows are merged in temporal order).
    model, kwargs = get_model(name)
    prompts = [prompt_of(n, seed=50 + n) for n in (4, 13, 2, 9)]
    max1 = [15, 4, 22, 9]
    more = [prompt_of(n, seed=80 + n) for n in (3, 1, 7, 5)]

    def go(impl):
        first = gen.batch_generate(model, tokenizer, prompts, max_tokens=max1,
                                   return_prompt_caches=True, return_token_ids=True, **kwargs)
        before = [[tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, c.state)
                   for c in layers] for layers in first.caches]
        # the cache holds all but the last generated token
        prompts2 = [[toks[-1]] + m for toks, m in zip(first.token_ids, more)]
        second = gen.batch_generate(model, tokenizer, prompts2, prompt_caches=first.caches,
                                    max_tokens=[12, 20, 6, 16], return_prompt_caches=True,
                                    return_token_ids=True, return_logprobs=True,
                                    prefill_batch_size=4, completion_batch_size=4, **kwargs)
        # batch_generate does not change the caches it is given
        for i, layers in enumerate(first.caches):
            for j, c in enumerate(layers):
                assert_tree_equal(before[i][j], c.state, f"{impl}: turn-1 cache {i} layer {j}")
        return first, second

    ((want1, want2), rspy), ((got1, got2), kspy) = run_both(go)
    assert_same_batch_response(want1, got1)
    assert_same_batch_response(want2, got2)
    assert [what for what, _ in kspy.events] == [what for what, _ in rspy.events]
    if WINDOW[name]:
        assert rotated_somewhere(got1.caches) and rotated_somewhere(got2.caches)


def test_batch_generate_with_sampling(tokenizer):
    model, kwargs = get_model("gemma3")
    prompts = [prompt_of(n, seed=200 + n) for n in (5, 12, 2)]

    def go(impl):
        mx.random.seed(7)
        return gen.batch_generate(model, tokenizer, prompts, max_tokens=[18, 25, 10],
                                  sampler=make_sampler(temp=0.8), return_token_ids=True,
                                  return_logprobs=True, prefill_batch_size=2,
                                  completion_batch_size=2, **kwargs)

    (want, _), (got, _) = run_both(go)
    assert_same_batch_response(want, got)


# --------------------------------------------------------------------------
# BatchGenerator driven by hand: prompts inserted mid-generation, a
# sequence removed, stop tokens


def drive(model, kwargs, script, stop_tokens=None, max_steps=200):
    """Run a BatchGenerator, calling script[step](g) before a step when the
    script names it; the transcript of everything it reports."""
    g = gen.BatchGenerator(model, stop_tokens=stop_tokens, max_tokens=16,
                           prefill_batch_size=2, completion_batch_size=3,
                           prefill_step_size=6, **kwargs)
    transcript = []
    try:
        for step in range(max_steps):
            if step in script:
                transcript.append(("script", step, script[step](g)))
            prompt_responses, responses = g.next()
            for r in prompt_responses:
                transcript.append(("prompt", r.uid, r.progress, r.end_of_segment, r.end_of_prompt))
            for r in responses:
                transcript.append(("token", r.uid, r.token, r.finish_reason, r.logprobs))
                if r.finish_reason is not None:
                    transcript.append(("cache", r.uid, r.prompt_cache, list(r.all_tokens)))
            if not prompt_responses and not responses and step > max(script, default=0):
                break
        else:
            raise AssertionError("the generator did not finish")
    finally:
        g.close()
    return transcript


def assert_same_transcript(want, got):
    assert len(got) == len(want), f"{len(got)} events != {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        assert w[0] == g[0], f"event {i}: {g[0]} != {w[0]}"
        if w[0] == "token":
            assert g[:4] == w[:4], f"event {i}: {g[:4]} != {w[:4]}"
            assert_tree_equal(w[4], g[4], f"event {i} logprobs")
        elif w[0] == "cache":
            assert g[1] == w[1] and g[3] == w[3], f"event {i}"
            assert_same_prompt_caches([w[2]], [g[2]], f"event {i} cache")
        elif w[0] == "script":
            assert g[:2] == w[:2]
            assert_script_result_equal(w[2], g[2], f"event {i}")
        else:
            assert g == w, f"event {i}: {g} != {w}"


def assert_script_result_equal(w, g, what):
    if isinstance(w, dict):  # remove(..., return_prompt_caches=True)
        assert w.keys() == g.keys(), what
        for uid in w:
            (wc, wt), (gc, gt) = w[uid], g[uid]
            assert list(wt) == list(gt), what
            assert_same_prompt_caches([wc], [gc], f"{what} removed {uid}")
    else:
        assert w == g, what


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_generator_insert_remove_and_stop(name):
    model, kwargs = get_model(name)
    first = [prompt_of(n, seed=300 + n) for n in (7, 2, 15)]
    later = [prompt_of(n, seed=400 + n) for n in (9, 1)]
    segmented = [prompt_of(5, seed=501), prompt_of(4, seed=502)]

    def script():
        return {
            0: lambda g: g.insert(first, max_tokens=[20, 30, 8]),
            4: lambda g: g.insert(later, max_tokens=[25, 12]),
            7: lambda g: g.insert_segments([segmented], max_tokens=[14]),
            9: lambda g: g.remove([1], return_prompt_caches=True),
            12: lambda g: g.extract_cache([0, 3]),
        }

    # Pick a stop token from a first mlx-lm run: one that the first sequence
    # emits after a few tokens, so that it ends early by "stop".
    plain = drive(model, kwargs, script())
    toks0 = [e[2] for e in plain if e[0] == "token" and e[1] == 0]
    stop = next(t for t in toks0[4:] if t not in toks0[:4])

    def go(impl):
        return drive(model, kwargs, script(), stop_tokens=[[stop]])

    (want, rspy), (got, kspy) = run_both(go)
    assert_same_transcript(want, got)
    reasons = {e[3] for e in want if e[0] == "token" and e[3] is not None}
    assert reasons == {"stop", "length"}
    for what in ("merge", "extend", "filter", "extract"):
        assert kspy.count(what) >= 1, (what, kspy.events)
    assert [w for w, _ in kspy.events] == [w for w, _ in rspy.events]
