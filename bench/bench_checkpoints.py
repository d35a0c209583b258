"""Prefill checkpoints in mlx_lm.server, for a hybrid model whose caches
cannot be trimmed: time to first token and tokens served from the prompt
cache, on mlx-lm's caches and on kvcore's, and again after a restart.

    python bench/bench_checkpoints.py [--system 400] [--doc 3000] [--requests 5]
                                      [--prefill-step 512] [--out FILE]
    python bench/bench_checkpoints.py --in-process [--lengths 2048 8192] [--repeats 3]

The model is a Falcon-H1-shaped config with random weights (each layer a
state-space mixer beside attention: CacheList(ArraysCache, KVCache)) and a
byte-level tokenizer, built here. Every request asks about one shared
document: [system, user: document + a question of its own]. The prompts
share everything up to the question, inside the user message, so no
segment end falls there: mlx-lm can serve only the system prompt's entry
(the state-space slots cannot be trimmed back to the shared part); kvcore
resumes from the last prefill checkpoint before the question. Phases, each
a fresh server process (bench/serve.py):

  mlx-lm         mlx_lm.server as installed
  kvcore         patched, with a disk tier in a fresh directory
  kvcore again   a new kvcore server on that disk directory, asked new
                 questions about the same document (so no whole prompt is
                 on disk: the checkpoints are what it can reuse)

--in-process needs no server, tokenizer or HTTP (it runs on the GPU machine
too, bench/gpu_run_checkpoints.sh): for prompts of each length, mlx-lm's
caches against kvcore's, interleaved, with generate_step: the prefill of a
prompt A (kvcore taking checkpoints as it goes: their cost), then the time
to the first token of a prompt B that shares all of A but its last 64
tokens (mlx-lm recomputes B; kvcore fetches the last checkpoint and
prefills the rest).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_server import Server, byte_tokenizer, report, words  # noqa: E402


def falcon_config(layers=4, hidden=256):
    heads, head_dim = 8, 32
    return {
        "model_type": "falcon_h1",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "vocab_size": 512,
        "mamba_d_conv": 4,
        "mamba_d_head": 32,
        "mamba_d_ssm": 256,  # mamba_n_heads * mamba_d_head
        "mamba_d_state": 32,
        "mamba_n_groups": 1,
        "mamba_n_heads": 8,
        "mamba_chunk_size": 128,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    }


def make_model_dir(path, layers=4, hidden=256, seed=0):
    """config.json, model.safetensors (random weights) and the tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import falcon_h1

    config = falcon_config(layers, hidden)
    mx.random.seed(seed)
    model = falcon_h1.Model(falcon_h1.ModelArgs.from_dict(config))
    mx.save_safetensors(os.path.join(path, "model.safetensors"), dict(tree_flatten(model.parameters())))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    byte_tokenizer(path)


def ask(server, messages, max_tokens=4):
    """(seconds to the first streamed chunk, prompt tokens served from the
    prompt cache) for one streaming request."""
    first, _, usage = server.chat(messages, max_tokens)
    return first, ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")


def in_process(lengths, repeats, step, out):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models import falcon_h1

    import kvcore

    config = falcon_config()
    mx.random.seed(0)
    model = falcon_h1.Model(falcon_h1.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    n_layers = config["num_hidden_layers"]

    def kvcore_caches():
        return [kvcore.CacheList(kvcore.ArraysCache(size=2), kvcore.KVCache()) for _ in range(n_layers)]

    def first_token(prompt, cache, callback=None):
        t0 = time.perf_counter()
        tok, _ = next(generate_step(mx.array(prompt), model, prompt_cache=cache,
                                    prefill_step_size=step, prompt_progress_callback=callback))
        return time.perf_counter() - t0

    rows = []
    for n in lengths:
        rng = random.Random(n)
        a = [rng.randrange(512) for _ in range(n)]
        b = a[:-64] + [rng.randrange(512) for _ in range(64)]
        t = {k: [] for k in ("prefill mlx-lm", "prefill kvcore", "b mlx-lm", "b kvcore")}
        covered = 0
        for r in range(repeats + 1):  # the first round warms up
            got = {}
            got["prefill mlx-lm"] = first_token(a, model.make_cache())
            got["b mlx-lm"] = first_token(b, model.make_cache())
            lru = kvcore.LRUPromptCache()
            cache = kvcore_caches()
            got["prefill kvcore"] = first_token(a, cache, lru.prefill_checkpoints("m", a, cache, 0))
            t0 = time.perf_counter()
            cache, rest = lru.fetch_nearest_cache("m", b)
            covered = len(b) - len(rest)
            got["b kvcore"] = time.perf_counter() - t0 + first_token(rest, cache)
            checkpoints, nbytes = lru.n_checkpoints, lru.nbytes
            if r > 0:
                for k, v in got.items():
                    t[k].append(v)
            print(n, r, {k: round(v, 4) for k, v in got.items()}, flush=True)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append((n, med, covered, checkpoints, nbytes))
    import platform

    device = str(mx.default_device())
    lines = [
        f"generate_step on a Falcon-H1-shaped random model (4 layers, hidden 256), prefill step {step}, "
        f"{device} ({platform.machine()}), median of {repeats} interleaved repeats. Prefill of A: kvcore "
        f"taking checkpoints as it goes, mlx-lm not. B shares all of A but its last 64 tokens: mlx-lm "
        f"recomputes it, kvcore fetches its last checkpoint (included) and prefills the rest.",
        "",
        "| tokens | prefill A mlx-lm | kvcore / mlx-lm | checkpoints, MB held | B to first token mlx-lm | kvcore | mlx-lm / kvcore | B tokens from the checkpoint |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, med, covered, checkpoints, nbytes in rows:
        lines.append(
            f"| {n} | {med['prefill mlx-lm'] * 1e3:.1f} ms | {med['prefill kvcore'] / med['prefill mlx-lm']:.2f} | "
            f"{checkpoints}, {nbytes / 1e6:.1f} | {med['b mlx-lm'] * 1e3:.1f} ms | {med['b kvcore'] * 1e3:.1f} ms | "
            f"{med['b mlx-lm'] / med['b kvcore']:.1f}x | {covered} |"
        )
    report(lines, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", type=int, default=400, help="system prompt bytes (= tokens)")
    ap.add_argument("--doc", type=int, default=3000, help="shared document bytes")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--prefill-step", type=int, default=512, help="the server's --prefill-step-size")
    ap.add_argument("--out")
    ap.add_argument("--in-process", action="store_true", help="generate_step only, no server (see above)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.in_process:
        return in_process(args.lengths, args.repeats, args.prefill_step, args.out)

    rng = random.Random(0)
    system, doc = words(rng, args.system), words(rng, args.doc)

    def requests_of(n):
        return [[{"role": "system", "content": system},
                 {"role": "user", "content": doc + "\n\nQuestion: " + words(rng, 80)}]
                for _ in range(n)]

    requests = requests_of(args.requests)
    after_restart = requests_of(args.requests)

    work = tempfile.mkdtemp(prefix="kvcore-bench-checkpoints-")
    model_dir, disk_dir = os.path.join(work, "model"), os.path.join(work, "disk")
    os.makedirs(model_dir)
    make_model_dir(model_dir)
    log = open(os.path.join(work, "server.log"), "w")
    extra = ["--prefill-step-size", str(args.prefill_step)]
    results = {}
    try:
        for name, kv, disk in (("mlx-lm", False, None), ("kvcore", True, disk_dir),
                               ("kvcore again", True, disk_dir)):
            s = Server(model_dir, kv, disk, log, os.path.join(work, "stats.json"), extra=extra)
            try:
                got = [ask(s, m) for m in (after_restart if name == "kvcore again" else requests)]
                results[name] = (got, s.stats())
            finally:
                s.stop()
            print(f"{name}: {got} {results[name][1]}", flush=True)
    finally:
        log.close()

    lines = [
        f"mlx_lm.server, Falcon-H1-shaped random model (4 layers, hidden 256, each a state-space "
        f"mixer beside attention), prefill step {args.prefill_step}; {args.requests} requests over "
        f"one ~{args.doc}-token document after a ~{args.system}-token system prompt, each with its "
        f"own ~80-token question. Time to first token in seconds (streaming HTTP; median where "
        f"several; the first request of a server includes loading the model) and prompt tokens "
        f"served from the prompt cache (after the restart, new questions):",
        "",
        "| server | 1st request | later requests | cached tokens, later requests | prompt cache after: entries, checkpoints, MB |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (got, st) in results.items():
        later = got[1:]
        cached_first = got[0][1] or 0
        lines.append(
            f"| {name} | {got[0][0]:.3f} ({cached_first} cached) | {statistics.median(t for t, _ in later):.3f} | "
            f"{statistics.median(c or 0 for _, c in later):.0f} of ~{args.system + args.doc + 110} | "
            f"{st['entries']}, {st['checkpoints']}, {st['nbytes'] / 1e6:.1f} |"
        )
    report(lines, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
