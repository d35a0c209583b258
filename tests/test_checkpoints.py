"""Prefill checkpoints: LRUPromptCache.insert_checkpoint's rules, and a
prompt that shares only part of an earlier one resuming from the longest
checkpoint inside the shared part, with the tokens and log-probabilities of
mlx-lm recomputing the whole prompt (generate_step, and BatchGenerator as
mlx_lm.server drives it)."""

import importlib
import os
import sys

import mlx.core as mx
import mlx_lm.models.cache as ref
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import falcon_h1, qwen2
from test_batch_generate import QWEN2
from test_models import FALCON_H1, VOCAB, build, patched

import kvcore

gen = importlib.import_module("mlx_lm.generate")

MODEL = ("model-a", None, None)


def rotating(n, max_size=8, seed=0):
    """One RotatingKVCache layer after n tokens (wrapped past max_size)."""
    c = kvcore.RotatingKVCache(max_size=max_size)
    k = mx.random.normal((1, 2, n, 4), key=mx.random.key(seed))
    c.update_and_fetch(k, k + 1)
    return [c]


def toks(n, base=100):
    return list(range(base, base + n))


def held(lru, tokens):
    """Tokens the cache served for this query covers."""
    c, rest = lru.fetch_nearest_cache(MODEL, tokens)
    return 0 if c is None else len(tokens) - len(rest)


def test_checkpoint_is_an_independent_copy_served_as_a_shorter_entry():
    lru = kvcore.LRUPromptCache()
    assert (lru.max_checkpoints, lru.checkpoint_every, lru.n_checkpoints) == (8, 0, 0)
    live = rotating(12)
    snapshot = [c.state for c in live]
    assert lru.insert_checkpoint(MODEL, toks(12), live) is True
    # The caller goes on with its cache; the checkpoint keeps what it held.
    live[0].update_and_fetch(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
    assert (len(lru), lru.n_checkpoints) == (0, 1)
    assert lru.nbytes == rotating(12)[0].nbytes
    stats = lru.stats_by_type()
    assert list(stats) == ["assistant", "user", "system", "checkpoint"]
    assert stats["checkpoint"] == {"n_sequences": 1, "n_bytes": lru.nbytes}
    got, rest = lru.fetch_nearest_cache(MODEL, toks(12) + [1, 2])
    assert rest == [1, 2] and got[0].offset == 12 and got[0] is not live[0]
    for a, b in zip(got[0].state, snapshot[0]):
        assert mx.array_equal(a, b).item()
    # A prompt that leaves the checkpoint's tokens before its end: nothing.
    assert held(lru, toks(11) + [7, 8]) == 0


def test_checkpoints_are_refused_where_they_add_nothing():
    lru = kvcore.LRUPromptCache()
    lru.insert_cache(MODEL, toks(10), rotating(10))
    assert lru.insert_checkpoint(MODEL, toks(10), rotating(10)) is False  # an entry holds them
    assert lru.insert_checkpoint(MODEL, [5], rotating(1)) is False  # too short to match
    assert (len(lru), lru.n_checkpoints) == (1, 0)
    off = kvcore.LRUPromptCache(max_checkpoints=0)
    assert off.insert_checkpoint(MODEL, toks(10), rotating(10)) is False
    assert (off.n_checkpoints, off.nbytes) == (0, 0)
    assert "checkpoint" not in off.stats_by_type()


def test_an_entry_replaces_a_checkpoint_at_its_tokens():
    lru = kvcore.LRUPromptCache(max_size=1)
    assert lru.insert_checkpoint(MODEL, toks(10), rotating(10))
    lru.insert_cache(MODEL, toks(10), rotating(10, seed=1), cache_type="user")
    assert (len(lru), lru.n_checkpoints) == (1, 0)
    assert lru.stats_by_type()["user"]["n_sequences"] == 1
    # Checkpoints are not entries: max_size counts only entries.
    for n in (12, 14, 16):
        assert lru.insert_checkpoint(MODEL, toks(n), rotating(n))
    assert (len(lru), lru.n_checkpoints) == (1, 3)


def test_least_recently_inserted_or_served_checkpoint_goes_first():
    lru = kvcore.LRUPromptCache(max_checkpoints=2)
    for n in (10, 20):
        assert lru.insert_checkpoint(MODEL, toks(n), rotating(n))
    assert held(lru, toks(15)) == 10  # 10 is served, so 20 is the oldest now
    assert lru.insert_checkpoint(MODEL, toks(30), rotating(30))
    assert lru.n_checkpoints == 2
    assert held(lru, toks(25)) == 10 and held(lru, toks(35)) == 30
    lru.max_checkpoints = 1
    assert lru.n_checkpoints == 1 and held(lru, toks(15)) == 0 and held(lru, toks(35)) == 30


def test_checkpoint_every_spaces_them():
    lru = kvcore.LRUPromptCache(checkpoint_every=8)
    assert lru.insert_checkpoint(MODEL, toks(8), rotating(8))
    assert lru.insert_checkpoint(MODEL, toks(12), rotating(12)) is False  # 4 past the last
    assert lru.insert_checkpoint(MODEL, toks(16), rotating(16))
    assert lru.insert_checkpoint(MODEL, toks(16), rotating(16))  # the same tokens, refreshed
    assert lru.n_checkpoints == 2


def test_bytes_run_out_on_checkpoints_before_entries():
    size = {n: rotating(n)[0].nbytes for n in (10, 11, 12)}
    lru = kvcore.LRUPromptCache(max_bytes=size[10] + size[11] + size[12])
    lru.insert_cache(MODEL, toks(10, base=500), rotating(10))
    for n in (10, 11, 12):
        lru.insert_checkpoint(MODEL, toks(n), rotating(n))
    assert (len(lru), lru.n_checkpoints) == (1, 2)
    assert lru.nbytes == size[10] + size[11] + size[12]
    assert held(lru, toks(10) + [1]) == 0 and held(lru, toks(12) + [1]) == 12
    lru.trim_to(n_bytes=size[10])
    assert (len(lru), lru.n_checkpoints, lru.nbytes) == (1, 0, size[10])
    lru.trim_to(n_bytes=0)
    assert (len(lru), lru.nbytes) == (0, 0)


def test_bad_input_changes_nothing():
    lru = kvcore.LRUPromptCache()
    assert lru.insert_checkpoint(MODEL, toks(10), rotating(10))
    before = (lru.n_checkpoints, lru.nbytes)
    with pytest.raises(kvcore.CacheValueError, match="tokens as ints"):
        lru.insert_checkpoint(MODEL, [1, "2", 3], rotating(3))
    with pytest.raises(kvcore.CacheValueError, match="max_checkpoints as an int"):
        lru.max_checkpoints = "8"
    with pytest.raises(kvcore.CacheKeyError, match="cache_type among assistant, user, system"):
        lru.insert_cache(MODEL, toks(12), rotating(12), cache_type="checkpoint")
    with pytest.raises(AttributeError, match="has no attribute"):  # not a cache
        lru.insert_checkpoint(MODEL, toks(12), [object()])
    assert (lru.n_checkpoints, lru.nbytes) == before


def test_checkpoints_outlive_a_restart_on_the_disk_tier(tmp_path):
    lru = kvcore.LRUPromptCache(disk_dir=tmp_path)
    assert lru.insert_checkpoint(MODEL, toks(12), rotating(12))
    assert lru.disk_size == 1
    (name,) = os.listdir(tmp_path)
    _, meta = kvcore.load_prompt_cache(os.path.join(tmp_path, name), return_metadata=True)
    assert meta["kvcore.type"] == "checkpoint" and meta["kvcore.trimmable"] == "0"
    again = kvcore.LRUPromptCache(disk_dir=tmp_path)
    got, rest = again.fetch_nearest_cache(MODEL, toks(12) + [9])
    assert rest == [9] and got[0].offset == 12
    for a, b in zip(got[0].state, rotating(12)[0].state):
        assert mx.array_equal(a, b).item()
    assert (len(again), again.n_checkpoints) == (0, 1)  # back in memory as a checkpoint


# -- generation ---------------------------------------------------------------

STEP = 8  # prefill chunk


@pytest.fixture(scope="module", params=["falcon_h1", "qwen2-window"])
def case(request):
    """A hybrid model (CacheList(ArraysCache, KVCache) layers), and one on a
    16-token sliding window (RotatingKVCache after it wraps)."""
    if request.param == "falcon_h1":
        return build(falcon_h1, FALCON_H1, 21), None
    return build(qwen2, QWEN2, 22), 16


def prompts(seed):
    a = mx.random.randint(0, VOCAB, (40,), key=mx.random.key(seed)).tolist()
    b = a[:30] + mx.random.randint(0, VOCAB, (10,), key=mx.random.key(seed + 1)).tolist()
    return a, b


def steps(model, prompt, cache, n=6, callback=None):
    out = generate_step(mx.array(prompt), model, prompt_cache=cache, prefill_step_size=STEP,
                        prompt_progress_callback=callback)
    return [(t, lp) for (t, lp), _ in zip(out, range(n))]


def assert_same_steps(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert mx.array_equal(a, b).item()


def test_generate_step_resumes_from_the_longest_checkpoint(case):
    model, window = case
    a, b = prompts(3)
    # mlx-lm: its LRU has only a's finished cache, which b cannot use.
    theirs = ref.LRUPromptCache()
    cache = ref.make_prompt_cache(model, window)
    steps(model, a, cache)
    theirs.insert_cache(MODEL, a, cache)
    assert theirs.fetch_nearest_cache(MODEL, b)[0] is None
    want = steps(model, b, ref.make_prompt_cache(model, window))
    with patched():
        ours = kvcore.LRUPromptCache()
        cache = ref.make_prompt_cache(model, window)
        assert type(cache[0]).__module__.startswith("kvcore")
        progress = []
        steps(model, a, cache, callback=ours.prefill_checkpoints(
            MODEL, a, cache, 0, lambda *p: progress.append(p)))
        assert progress[0] == (0, 40) and progress[-1] == (40, 40)  # chained
        ours.insert_cache(MODEL, a, cache)
        # Chunks end at 8, 16, 24, 32 and 39 (the last token goes with the first step).
        assert (len(ours), ours.n_checkpoints) == (1, 5)
        got, rest = ours.fetch_nearest_cache(MODEL, b)
        assert len(b) - len(rest) == 24
        assert_same_steps(steps(model, rest, got), want)


def test_caches_that_stay_trimmable_get_no_checkpoints():
    model = build(qwen2, QWEN2, 22)
    a, b = prompts(5)
    with patched():
        lru = kvcore.LRUPromptCache()
        cache = ref.make_prompt_cache(model)
        steps(model, a, cache, callback=lru.prefill_checkpoints(MODEL, a, cache, 0))
        assert lru.n_checkpoints == 0
        lru.insert_cache(MODEL, a, cache)
        c, rest = lru.fetch_nearest_cache(MODEL, b)  # the entry, trimmed
        assert len(b) - len(rest) == 30


def run_batch(model, lru, prompt, window, max_tokens=6):
    """As mlx_lm.server's batch loop: fetch, insert_segments, next() until
    done; returns the tokens generated and what the fetch covered."""
    bg = gen.BatchGenerator(model, prefill_step_size=STEP, max_kv_size=window)
    cache, rest = lru.fetch_nearest_cache(MODEL, prompt)
    covered = len(prompt) - len(rest)
    (uid,) = bg.insert_segments(segments=[[rest]], max_tokens=[max_tokens], caches=[cache],
                                all_tokens=[prompt[:covered]])
    tokens = []
    while True:
        _, responses = bg.next()
        for r in responses:
            tokens.append(r.token)
            if r.finish_reason is not None:
                lru.insert_cache(MODEL, r.all_tokens[:], r.prompt_cache)
                bg.close()
                return tokens, covered


def test_batch_generator_under_the_server_takes_checkpoints(case):
    model, window = case
    a, b = prompts(7)
    theirs = ref.LRUPromptCache()
    run_batch(model, theirs, a, window)
    want, covered = run_batch(model, theirs, b, window)
    assert covered == 0
    with patched():
        ours = kvcore.LRUPromptCache()
        run_batch(model, ours, a, window)
        # Chunk boundaries 8, 16, 24, 32; 39 is a segment end, which the
        # server stores itself.
        assert ours.n_checkpoints == 4
        got, covered = run_batch(model, ours, b, window)
        assert covered == 24
        assert got == want


def test_stream_generate_under_the_server_takes_checkpoints(case, tmp_path):
    from mlx_lm.utils import load_tokenizer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from bench_server import byte_tokenizer

    model, window = case
    byte_tokenizer(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    a, b = prompts(9)
    with patched():
        lru = kvcore.LRUPromptCache()
        server = importlib.import_module("mlx_lm.server")
        assert server.stream_generate.__kvcore_wraps__ is gen.stream_generate.__kvcore_wraps__
        for prompt in (a, b):
            # mlx_lm.server's _serve_single: fetch, then stream_generate the rest.
            cache, rest = lru.fetch_nearest_cache(MODEL, prompt)
            covered = len(prompt) - len(rest)
            cache = cache or ref.make_prompt_cache(model, window)
            out = [r.token for r in server.stream_generate(
                model, tokenizer, rest, max_tokens=4, prompt_cache=cache, prefill_step_size=STEP)]
            lru.insert_cache(MODEL, prompt + out, cache)
        assert covered == 24
        # Not after a fetch on this thread: generation runs as before.
        n = lru.n_checkpoints
        list(server.stream_generate(model, tokenizer, a, max_tokens=2,
                                    prompt_cache=ref.make_prompt_cache(model, window),
                                    prefill_step_size=STEP))
        assert lru.n_checkpoints == n
    want = [r.token for r in gen.stream_generate(
        model, tokenizer, b, max_tokens=4, prompt_cache=ref.make_prompt_cache(model, window),
        prefill_step_size=STEP)]
    assert out == want
