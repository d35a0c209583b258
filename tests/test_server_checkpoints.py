"""mlx_lm.server, unchanged, on kvcore's caches (bench/serve.py --kvcore) and
on mlx-lm's, over real HTTP: a hybrid model's requests that part inside the
user message resume from kvcore's prefill checkpoints, with the same replies
as mlx-lm's server recomputing them; and the prompt-cache thread hook stays
with the thread that fetched."""

import os
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))

from bench_checkpoints import make_model_dir  # noqa: E402
from bench_server import Server  # noqa: E402

import kvcore  # noqa: E402
from conftest import run_in_threads  # noqa: E402
from kvcore import _checkpoints  # noqa: E402

STEP = 32


def text_of(server, messages):
    import http.client
    import json

    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"messages": messages, "max_tokens": 6, "temperature": 0.0}
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    out = json.loads(c.getresponse().read())
    c.close()
    return out["choices"][0]["message"]["content"], out["usage"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("falcon")
    make_model_dir(str(d), layers=2, hidden=64)
    return str(d)


def test_server_resumes_hybrid_prompts_from_checkpoints(model_dir, tmp_path):
    system = "You answer questions about the document."
    doc = " ".join(f"line {i} of the document." for i in range(24))  # ~550 tokens
    requests = [[{"role": "system", "content": system},
                 {"role": "user", "content": doc + "\n\nQuestion: " + q}]
                for q in ("what is line three?", "how many lines are there?")]
    got = {}
    for name, patched in (("mlx-lm", False), ("kvcore", True)):
        s = Server(model_dir, patched, None, open(tmp_path / f"{name}.log", "w"),
                   str(tmp_path / "stats.json"), extra=["--prefill-step-size", str(STEP)])
        try:
            got[name] = [text_of(s, m) for m in requests], s.stats()
        finally:
            s.stop()
    (theirs, their_stats), (ours, our_stats) = got["mlx-lm"], got["kvcore"]
    # The same replies: resuming from a checkpoint computes what recomputing does.
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    assert [u["prompt_tokens"] for _, u in ours] == [u["prompt_tokens"] for _, u in theirs]
    cached = lambda usage: usage["prompt_tokens_details"]["cached_tokens"]  # noqa: E731
    # mlx-lm serves the second request only the system prompt's entry.
    system_tokens = cached(theirs[1][1])
    assert 0 < system_tokens < 80
    # kvcore: the last checkpoint before the question, a chunk boundary of
    # the user message's prefill (one token per byte: the prompts part
    # within 40 tokens past the document).
    resumed = cached(ours[1][1]) - system_tokens
    assert resumed % STEP == 0
    assert len(doc) - STEP < resumed <= len(doc) + 40
    assert our_stats["checkpoints"] > 0 and their_stats["checkpoints"] == 0
    assert our_stats["nbytes"] < their_stats["nbytes"]


def test_the_fetch_hook_belongs_to_the_thread_that_fetched():
    lru = kvcore.LRUPromptCache()
    lru.fetch_nearest_cache("m", [1, 2, 3])
    seen = []
    t = threading.Thread(target=lambda: seen.append(_checkpoints.take_fetch()))
    t.start()
    t.join()
    assert seen == [None]  # another thread sees no fetch
    f = _checkpoints.take_fetch()
    assert f[0] is lru and f[1:] == ("m", [1, 2, 3], 0)
    assert _checkpoints.take_fetch() is None  # taken once


def test_concurrent_checkpoints_and_fetches():
    import mlx.core as mx

    lru = kvcore.LRUPromptCache(max_size=4, max_checkpoints=6)

    def work(w):
        for i in range(300):
            toks = [w % 2, 1, 2, 3] + list(range(i % 9))
            c = kvcore.RotatingKVCache(max_size=4)
            c.update_and_fetch(mx.ones((1, 1, len(toks), 2)), mx.ones((1, 1, len(toks), 2)))
            if i % 3 == 0:
                lru.insert_checkpoint("m", toks, [c])
            elif i % 3 == 1:
                lru.insert_cache("m", toks, [c])
            else:
                query = toks + [7]
                got, rest = lru.fetch_nearest_cache("m", query)
                assert got is None or got[0].offset == len(query) - len(rest)

    errors = run_in_threads(work)
    assert errors == []
    assert len(lru) <= 4 and lru.n_checkpoints <= 6
    stats = lru.stats_by_type()
    assert sum(s["n_bytes"] for s in stats.values()) == lru.nbytes
    assert sum(s["n_sequences"] for t, s in stats.items() if t != "checkpoint") == len(lru)
