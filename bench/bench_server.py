"""Time to first token in mlx_lm.server, on mlx-lm's caches and on kvcore's,
for chats that share a long system prompt; and again after a restart, where
kvcore's disk tier serves the prefixes the first run computed.

    python bench/bench_server.py [--system 3000] [--chats 6] [--out FILE]

The model is built here (a Qwen2-shaped config with random weights, a
byte-level tokenizer with a ChatML template), nothing is downloaded. Each
server runs in its own process (bench/serve.py) and is asked through HTTP
with streaming on; time to first token is from sending the request to the
first streamed chunk. Every chat has two turns: the first shares the system
prompt with the other chats, the second extends the first. Prompts are the
same for every server; the phases are

  mlx-lm        mlx_lm.server as installed
  kvcore        patched, with a disk tier in a fresh directory
  mlx-lm again  a new mlx-lm server (its prompt cache starts empty)
  kvcore again  a new kvcore server on the first one's disk directory

Also, in this process: loading one chat's entry from the disk tier against
recomputing its prefill with the model.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(path):
    """A byte-level BPE tokenizer with no merges (one token per byte) and the
    ChatML specials, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
            },
            f,
        )


def make_model_dir(path, layers=8, hidden=256, seed=0):
    """config.json, model.safetensors (random weights) and the tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    config = {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
    }
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # float32: mlx's CPU runs it faster than float16; the caches follow.
    mx.save_safetensors(os.path.join(path, "model.safetensors"), weights)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    byte_tokenizer(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, kvcore, disk_dir=None, log=None, stats=None, extra=()):
        self.port = free_port()
        self.stats_path = stats
        cmd = [sys.executable, os.path.join(HERE, "serve.py"), "--stats", stats]
        if kvcore:
            cmd.append("--kvcore")
        if disk_dir:
            cmd += ["--disk-dir", disk_dir]
        cmd += ["--", "--model", model_dir, "--port", str(self.port), "--prompt-cache-size", "64", *extra]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start")

    def chat(self, messages, max_tokens=4):
        """One streaming request: seconds to the first streamed chunk, the
        reply's text, and the usage the server reports at the end."""
        body = json.dumps({
            "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
        })
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        first, text, usage = None, [], None
        for line in c.getresponse():
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - t0
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for ch in chunk.get("choices", []):
                text.append(ch.get("delta", {}).get("content") or "")
        c.close()
        return first, "".join(text), usage

    def ttft(self, messages, max_tokens=4):
        """Seconds to the first streamed chunk, and the reply's text."""
        first, text, _ = self.chat(messages, max_tokens)
        return first, text

    def stats(self):
        time.sleep(0.5)
        with open(self.stats_path) as f:
            return json.load(f)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def words(rng, n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append("".join(rng.choice(letters) for _ in range(rng.randrange(2, 9))))
    return " ".join(out)[:n]


def workload(system_chars, chats, seed=0):
    rng = random.Random(seed)
    system = words(rng, system_chars)
    return system, [(words(rng, 60), words(rng, 60)) for _ in range(chats)]


def run_phase(server, system, chats):
    """TTFT of each chat's first turn, then of each second turn."""
    first, second = [], []
    replies = []
    for u1, _ in chats:
        t, reply = server.ttft([{"role": "system", "content": system}, {"role": "user", "content": u1}])
        first.append(t)
        replies.append(reply)
    for (u1, u2), reply in zip(chats, replies):
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": u1},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": u2},
        ]
        t, _ = server.ttft(msgs)
        second.append(t)
    return first, second


def disk_vs_recompute(model_dir, disk_dir, system, chats, repeats=5):
    """Median seconds: fetch one chat's first-turn entry from a fresh
    LRUPromptCache over the disk directory; and prefill of the same tokens."""
    import mlx.core as mx
    from mlx_lm import load

    import kvcore

    kvcore.patch_mlx_lm()
    model, tok = load(model_dir)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": chats[0][0]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    key = (model_dir, None, None)  # mlx_lm.server's model_key for --model model_dir
    loads, prefills = [], []
    n_cached = 0
    for _ in range(repeats):
        lru = kvcore.LRUPromptCache(disk_dir=disk_dir)
        t0 = time.perf_counter()
        cache, rest = lru.fetch_nearest_cache(key, prompt)
        if cache is not None:
            mx.eval([c.state for c in cache])
        loads.append(time.perf_counter() - t0)
        n_cached = len(prompt) - len(rest)
        cache = kvcore.make_prompt_cache(model)
        t0 = time.perf_counter()
        toks = mx.array(prompt[:n_cached])[None]
        for i in range(0, n_cached, 2048):
            model(toks[:, i : i + 2048], cache=cache)
            mx.eval([c.state for c in cache])
        prefills.append(time.perf_counter() - t0)
    return n_cached, statistics.median(loads), statistics.median(prefills)


def report(lines, out=None):
    """Print the table, and write it to out if given."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", type=int, default=3000, help="system prompt length (bytes = tokens)")
    ap.add_argument("--chats", type=int, default=6)
    ap.add_argument("--out")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="kvcore-bench-server-")
    model_dir = os.path.join(work, "model")
    disk_dir = os.path.join(work, "disk")
    os.makedirs(model_dir)
    make_model_dir(model_dir)
    system, chats = workload(args.system, args.chats)
    log = open(os.path.join(work, "server.log"), "w")
    results = {}
    try:
        for name, kv, disk in (
            ("mlx-lm", False, None),
            ("kvcore", True, disk_dir),
            ("mlx-lm again", False, None),
            ("kvcore again", True, disk_dir),
        ):
            s = Server(model_dir, kv, disk, log, os.path.join(work, "stats.json"))
            try:
                results[name] = run_phase(s, system, chats) + (s.stats(),)
            finally:
                s.stop()
            print(f"{name}: {results[name][2]}, first turns {['%.3f' % t for t in results[name][0]]}, "
                  f"second turns {['%.3f' % t for t in results[name][1]]}", flush=True)
        n_cached, t_load, t_prefill = disk_vs_recompute(model_dir, disk_dir, system, chats)
    finally:
        log.close()

    def cold_warm(r):
        first, second, stats = r
        return first[0], statistics.median(first[1:]), statistics.median(second), stats

    lines = [
        f"mlx_lm.server, Qwen2-shaped random model (8 layers, hidden 256, 2 KV heads), "
        f"system prompt ~{args.system} tokens, {args.chats} chats x 2 turns, "
        f"time to first token in seconds (streaming HTTP, median where several; the first "
        f"request of a server includes loading the model):",
        "",
        "| server | 1st chat, 1st turn | other chats, 1st turn | 2nd turns | prompt cache after: entries, MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, b, c, st = cold_warm(r)
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} | {st['entries']}, {st['nbytes'] / 1e6:.1f} |")
    lines += [
        "",
        f"Disk tier against recompute, one chat's first turn ({n_cached} tokens): "
        f"load {t_load * 1e3:.1f} ms, prefill {t_prefill * 1e3:.1f} ms "
        f"({t_prefill / max(t_load, 1e-9):.1f}x), median of 5.",
    ]
    report(lines, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
