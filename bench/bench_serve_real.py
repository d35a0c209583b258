"""``kvcore serve`` against ``mlx_lm.server`` on the real model
(SmolLM2-135M-Instruct, or --model), concurrent clients over a shared system
prompt, a few turns each.

    python bench/bench_serve_real.py [--clients 8] [--turns 3] [--system 400]
                                     [--max-tokens 32] [--out bench/results/serve-real.md]

Phases (each a fresh server on a free port):

  mlx-lm            mlx_lm.server, float KV
  kvcore            kvcore serve, float KV
  mlx-lm 4 bits     mlx_lm.server --kv-bits 4 --quantized-kv-start 0 (it serves
                    one request at a time: _is_batchable wants kv_bits None)
  kvcore 4 bits     kvcore serve --kv-bits 4 --quantized-kv-start 0 (batched
                    on QuantizedBatchKVCache)

Every client sends its turns one after another (streaming, temperature 0);
the clients run at once. Time to first token is from sending a request to its
first streamed chunk. Tokens/s is all completion tokens over the phase's wall
time. The prompt cache's bytes come from kvcore's /metrics and, for mlx-lm,
from bench/serve.py's --stats (the same mlx_lm.server, its LRUPromptCache
watched). The system prompt is the start of Genesis (King James Version,
bench/data/kjv-genesis-1-10.txt); --system is its length in words.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_server import Server as _HttpClient, free_port  # noqa: E402

QUESTIONS = [
    "Summarize the first sentence.", "Who is speaking here?", "What is created first?",
    "Name one thing that is divided.", "What is the light called?", "What does God see?",
    "What is the firmament?", "What happens on the second day?", "Name a creature.",
    "What grows on the earth?", "What rules the day?", "Why is this text old?",
]
FOLLOW_UPS = ["Say more.", "Give one example.", "Answer in one word.", "Why?"]


class Server:
    chat = _HttpClient.chat  # one streaming HTTP client for the server benches

    def __init__(self, argv, log, stats=None):
        self.port = free_port()
        self.stats_path = stats
        self.proc = subprocess.Popen(argv + ["--port", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server {argv} did not start")
                time.sleep(0.5)

    def cache_stats(self):
        if self.stats_path:
            time.sleep(0.5)
            with open(self.stats_path) as f:
                s = json.load(f)
            return s["entries"], s["nbytes"]
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=120) as r:
            text = r.read().decode()
        got = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.labels.get("tier") == "memory":
                    got[s.name] = s.value
        return int(got["kvcore_prompt_cache_entries"]), int(got["kvcore_prompt_cache_bytes"])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client_turns(server, system, question, turns, max_tokens, out):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    for t in range(turns):
        try:
            ttft, text, usage = server.chat(messages, max_tokens=max_tokens)
        except Exception as e:  # reported with the server's log by run_phase
            out.append({"turn": t, "error": f"{type(e).__name__}: {e}"})
            return
        out.append({"turn": t, "ttft": ttft, "completion_tokens": usage["completion_tokens"],
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]}]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_phase(name, argv, args, system, log, stats=None):
    server = Server(argv, log, stats)
    try:
        # Warm-up on an unrelated prompt: the first request pays for lazy loading.
        server.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
        records, threads = [], []
        t0 = time.perf_counter()
        for c in range(args.clients):
            th = threading.Thread(target=client_turns, args=(
                server, system, QUESTIONS[c % len(QUESTIONS)], args.turns, args.max_tokens, records))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        entries, nbytes = server.cache_stats()
    finally:
        server.stop()
    errors = [r["error"] for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    if errors:
        log.flush()
        with open(log.name) as f:
            tail = f.read()[-3000:]
        print(f"{name}: {len(errors)} client(s) failed, e.g. {errors[0]}\nserver log tail:\n{tail}",
              flush=True)
    if not records:
        raise RuntimeError(f"{name}: no request succeeded")
    ttfts = [r["ttft"] for r in records]
    later = [r["ttft"] for r in records if r["turn"] > 0]
    row = {
        "phase": name, "requests": len(records), "failed_clients": len(errors),
        "ttft_median": statistics.median(ttfts), "ttft_p90": percentile(ttfts, 0.9),
        "later_turns_ttft_median": statistics.median(later) if later else None,
        "tokens_per_s": sum(r["completion_tokens"] for r in records) / wall,
        "wall_s": wall,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "cached_tokens": sum(r["cached_tokens"] for r in records),
        "cache_entries": entries, "cache_bytes": nbytes,
    }
    print(f"{name:14s} ttft median {row['ttft_median']:.2f} s, p90 {row['ttft_p90']:.2f} s; "
          f"{row['tokens_per_s']:.2f} tok/s; cached {row['cached_tokens']}/{row['prompt_tokens']} "
          f"prompt tokens; prompt cache {entries} entries, {nbytes / 1e6:.1f} MB", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the converted SmolLM2-135M-Instruct")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system", type=int, default=400, help="system prompt length, words")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--phases", default="mlx-lm,kvcore,mlx-lm-4,kvcore-4")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serve-real.md"))
    args = p.parse_args()

    from kvcore._model import resolve

    model = resolve(args.model)
    with open(os.path.join(HERE, "data", "kjv-genesis-1-10.txt")) as f:
        words = f.read().split()
    system = " ".join(words[: args.system])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kvcore-bench-serve-")
    q4 = ["--kv-bits", "4", "--quantized-kv-start", "0"]
    phases = {
        "mlx-lm": ([sys.executable, os.path.join(HERE, "serve.py"), "--stats",
                    os.path.join(tmp, "mlx.json"), "--", "--model", model], True),
        "kvcore": ([sys.executable, "-m", "kvcore", "serve", "--model", model], False),
        "mlx-lm-4": ([sys.executable, os.path.join(HERE, "serve.py"), "--stats",
                      os.path.join(tmp, "mlx4.json"), "--", "--model", model, *q4], True),
        "kvcore-4": ([sys.executable, "-m", "kvcore", "serve", "--model", model, *q4], False),
    }
    rows = []
    with open(os.path.join(tmp, "servers.log"), "w") as log:
        for name in args.phases.split(","):
            argv, mlx = phases[name]
            stats = argv[argv.index("--stats") + 1] if mlx else None
            rows.append(run_phase(name, argv, args, system, log, stats))

    import mlx.core as mx

    device = f"{platform.machine()} {os.cpu_count()} cores, mlx {mx.__version__} {mx.default_device()}"
    lines = [
        f"# kvcore serve vs mlx_lm.server on {os.path.basename(model)}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {device}; {args.clients} clients x {args.turns} turns, "
        f"system prompt {args.system} words of Genesis (KJV), {args.max_tokens} tokens per reply, "
        "temperature 0, streaming.",
        "",
        "| server | requests | TTFT median (s) | TTFT p90 (s) | later turns TTFT median (s) | "
        "tokens/s | cached / prompt tokens | prompt cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        later = "" if r["later_turns_ttft_median"] is None else f"{r['later_turns_ttft_median']:.2f}"
        lines.append(
            f"| {r['phase']} | {r['requests']} | {r['ttft_median']:.2f} | {r['ttft_p90']:.2f} | "
            f"{later} | {r['tokens_per_s']:.2f} | {r['cached_tokens']} / {r['prompt_tokens']} | "
            f"{r['cache_entries']} entries, {r['cache_bytes'] / 1e6:.1f} MB |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
