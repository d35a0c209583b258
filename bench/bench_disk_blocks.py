"""The disk tier's blocks, measured.

1. Bytes written over a growing conversation (20 and 100 turns of 256
   tokens; 4 layers, 2 KV heads x 64, float16), against the final cache's
   bytes; and with whole-entry files (disk_block_tokens=0) for 20 turns.
2. Disk bytes of 16 conversations over a 4096-token shared prefix (64 tokens
   each of their own), against one conversation.
3. Time to first token after a restart for a long prompt served from disk,
   against recomputing it, on a small random Llama-shaped model; the
   tier's read throughput against Python's sequential read of the same
   files (page cache dropped for them with posix_fadvise before each cold
   read, and warm).
4. Two processes on one directory, each inserting its conversations and
   fetching the other's: tokens served, blocks read from the other's files.

    python bench/bench_disk_blocks.py [--ttft-tokens 8192] [--out bench/reference/NAME]

Runs on the CPU here and on the GPU machine (bench/gpu_run_disk_blocks.sh).
"""

import argparse
import copy
import datetime
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import tempfile
import time

import mlx.core as mx

import kvcore

LAYERS, HEADS, DIM = 4, 2, 64
# Quantized caches go to disk as blocks of their own bytes.
QUANTIZED = {
    "affine 4-bit": dict(group_size=64, bits=4),
    "rotated-channel 4-bit": dict(group_size=(32, 64), bits=4, scheme="rotated-channel"),
    "rotated-channel 4-bit, window 0": dict(group_size=(32, 64), bits=4, scheme="rotated-channel", window=0),
}


def token_kv(n, seed=0):
    """Keys and values of n tokens per layer; a prefix of a longer
    conversation's are the same arrays (as a model's are)."""
    return [(mx.random.normal((1, HEADS, n, DIM), key=mx.random.key(seed * 100 + l)).astype(mx.float16),
             mx.random.normal((1, HEADS, n, DIM), key=mx.random.key(seed * 100 + 50 + l)).astype(mx.float16))
            for l in range(LAYERS)]


def caches_of(kv, n, quantize=None):
    out = []
    for k, v in kv:
        c = kvcore.KVCache()
        c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        out.append(c.to_quantized(**quantize) if quantize else c)
    mx.eval([c.state for c in out])
    return out


def cache_bytes(n):
    return LAYERS * 2 * HEADS * n * DIM * 2


def held_bytes(caches):
    """The bytes a list of caches holds up to its offset (a quantized
    cache's triples and float residual)."""
    def nbytes(x):
        return sum(nbytes(y) for y in x) if isinstance(x, (tuple, list)) else (x.nbytes if x is not None else 0)
    n = 0
    for c in caches:
        if isinstance(c, kvcore.QuantizedKVCache):
            n += nbytes(c.keys_and_values()) + nbytes([c.residual, c.value_residual])
        else:
            n += nbytes([c.keys[..., : c.offset, :], c.values[..., : c.offset, :]])
    return n


def files_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def growing(turns, per_turn=256, block_tokens=256, first=256, quantize=None):
    """Bytes written over `turns` turns (every new file's size), the
    directory's bytes at the end and the final cache's bytes."""
    total = first + per_turn * (turns - 1)
    kv = token_kv(total)
    toks = random.Random(0).choices(range(50000), k=total)
    d = tempfile.mkdtemp(prefix="kvblocks-")
    seen, written = {}, 0
    lru = kvcore.LRUPromptCache(max_size=4, disk_dir=d, disk_block_tokens=block_tokens)
    n = first
    for turn in range(turns):
        caches = caches_of(kv, n, quantize)
        lru.insert_cache("m", toks[:n], caches)
        lru.flush()
        for f in os.listdir(d):
            if f not in seen:
                seen[f] = os.path.getsize(os.path.join(d, f))
                written += seen[f]
        n += per_turn
        if turns >= 50 and turn % 20 == 19:
            print(f"  turn {turn + 1}/{turns}", flush=True)
    lru.close()
    final = held_bytes(caches)
    out = (written, files_bytes(d), final)
    shutil.rmtree(d)
    return out


def shared_prefix(n=16, prefix=4096, own=64):
    kv = token_kv(prefix)
    shared = random.Random(1).choices(range(50000), k=prefix)
    d1, dn = tempfile.mkdtemp(prefix="kvone-"), tempfile.mkdtemp(prefix="kvmany-")
    one = kvcore.LRUPromptCache(disk_dir=d1)
    many = kvcore.LRUPromptCache(max_size=n, disk_dir=dn)
    for i in range(n):
        mine = token_kv(own, seed=1000 + i)
        caches = []
        for (k, v), (k2, v2) in zip(kv, mine):
            c = kvcore.KVCache()
            c.update_and_fetch(mx.concatenate([k, k2], axis=2), mx.concatenate([v, v2], axis=2))
            caches.append(c)
        toks = shared + [60000 + 1000 * i + j for j in range(own)]
        many.insert_cache("m", toks, caches)
        if i == 0:
            one.insert_cache("m", toks, caches)
    one.close()
    many.close()
    out = (files_bytes(d1), files_bytes(dn))
    shutil.rmtree(d1)
    shutil.rmtree(dn)
    return out


def drop_cached(d):
    """Drop the page cache's copy of d's files (clean pages; no root needed)."""
    for f in os.listdir(d):
        fd = os.open(os.path.join(d, f), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(d):
    t = time.perf_counter()
    n = 0
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb", buffering=0) as fh:
            n += len(fh.read())
    return n, time.perf_counter() - t


def ttft(n_tokens, repeats, recompute_repeats):
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama

    config = dict(model_type="llama", hidden_size=256, num_hidden_layers=LAYERS, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=HEADS, head_dim=DIM, rms_norm_eps=1e-5,
                  vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    rng = random.Random(n_tokens)
    prompt = [rng.randrange(512) for _ in range(n_tokens)]

    def first_token(toks, cache):
        tok, _ = next(generate_step(mx.array(toks), model, prompt_cache=cache, prefill_step_size=2048))
        return int(tok)

    d = tempfile.mkdtemp(prefix="kvttft-")
    cache = [kvcore.KVCache() for _ in range(LAYERS)]
    t = time.perf_counter()
    tok = first_token(prompt, cache)
    mx.synchronize()
    # The stored prompt's own prefill is the first recompute sample (the
    # query below is it plus two tokens).
    rows = {"recompute": [time.perf_counter() - t], "disk cold": [], "disk warm": [], "read cold": [],
            "read warm": []}
    print(f"  prefill of {n_tokens} tokens: {rows['recompute'][0]:.2f} s", flush=True)
    stored = prompt + [tok]  # generate_step has run the first token through the cache too
    assert cache[0].offset == len(stored)
    with kvcore.LRUPromptCache(disk_dir=d) as lru:
        lru.insert_cache("m", stored, cache)
    nbytes = files_bytes(d)
    query = stored + [7]
    # What the cache in memory gives: the disk's must be the same token.
    want = first_token([7], copy.deepcopy(cache))
    for r in range(repeats):
        if r < recompute_repeats - 1:
            t = time.perf_counter()
            first_token(query, [kvcore.KVCache() for _ in range(LAYERS)])
            rows["recompute"].append(time.perf_counter() - t)
        for kind in ("cold", "warm"):
            if kind == "cold":
                drop_cached(d)
            t = time.perf_counter()
            lru = kvcore.LRUPromptCache(disk_dir=d)  # a restart
            cache, rest = lru.fetch_nearest_cache("m", query)
            t_fetch = time.perf_counter() - t
            got = first_token(rest, cache)
            rows["disk " + kind].append(time.perf_counter() - t)
            rows["read " + kind].append(t_fetch)
            assert rest == [7] and got == want and lru.disk_errors == [], (rest, got, want, lru.disk_errors)
        print(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
    seq = {}
    for kind in ("cold", "warm"):
        samples = []
        for _ in range(repeats):
            if kind == "cold":
                drop_cached(d)
            n, s = sequential_read(d)
            samples.append(n / s)
        seq[kind] = statistics.median(samples)
    sizes = sorted(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    shutil.rmtree(d)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return med, seq, nbytes, sizes


def two_process_worker(who, d, rounds, barrier, out):
    other = 1 - who
    shared = random.Random(5).choices(range(50000), k=1024)
    kv_shared = token_kv(1024, seed=5)

    def conv(w, r):
        toks = shared + random.Random(100 * w + r).choices(range(50000), k=600)
        own = token_kv(600, seed=200 + 100 * w + r)
        caches = []
        for (k, v), (k2, v2) in zip(kv_shared, own):
            c = kvcore.KVCache()
            c.update_and_fetch(mx.concatenate([k, k2], axis=2), mx.concatenate([v, v2], axis=2))
            caches.append(c)
        mx.eval([c.state for c in caches])
        return toks, caches

    lru = kvcore.LRUPromptCache(max_size=2, disk_dir=d)
    served = 0
    asked = 0
    for r in range(rounds):
        toks, caches = conv(who, r)
        lru.insert_cache("m", toks, caches)
        lru.flush()
        barrier.wait()
        theirs, want = conv(other, r)
        got, rest = lru.fetch_nearest_cache("m", theirs + [1])
        n = len(theirs) + 1 - len(rest)
        if got is not None and n == len(theirs):
            for c, w in zip(got, want):
                assert mx.array_equal(c.state[0][..., : c.offset, :], w.state[0][..., : w.offset, :]).item()
        served += n
        asked += len(theirs)
        barrier.wait()
    out.put((who, served, asked, lru.disk_blocks_read, lru.disk_errors))
    lru.close()


def two_processes(rounds=8):
    d = tempfile.mkdtemp(prefix="kvtwo-")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=two_process_worker, args=(w, d, rounds, barrier, out)) for w in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(d)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ttft-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recompute-repeats", type=int, default=None,
                    help="prefills timed (the stored prompt's included); default --repeats")
    ap.add_argument("--turns", type=int, nargs="*", default=[20, 100])
    ap.add_argument("--out", default=None, help="write a Markdown report to OUT.md")
    args = ap.parse_args()
    device = str(mx.default_device())
    lines = [f"# Disk tier blocks: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, {device}, "
             f"mlx {mx.__version__}, {datetime.date.today().isoformat()}", ""]
    lines += ["## Bytes written over a growing conversation",
              f"{LAYERS} layers, {HEADS} KV heads x {DIM}, float16; 256 tokens a turn (first turn 256), "
              "every new file's bytes summed after each turn.", "",
              "| turns | tokens | cache | blocks of | written MB | final cache MB | written / final | "
              "directory MB |",
              "|---:|---:|---|---:|---:|---:|---:|---:|"]
    t0 = min(args.turns)
    cases = [(t, 256, "float16") for t in args.turns] + [(t0, 0, "float16")] + [
        (t0, 256, name) for name in QUANTIZED]
    for turns, bt, name in cases:
        print(f"growing conversation: {turns} turns, blocks of {bt}, {name}", flush=True)
        written, left, final = growing(turns, block_tokens=bt, quantize=QUANTIZED.get(name))
        lines.append(f"| {turns} | {256 * turns} | {name} | {bt or 'whole files'} | {written / 1e6:.1f} | "
                     f"{final / 1e6:.1f} | {written / final:.3f} | {left / 1e6:.1f} |")
    print("an unaligned conversation: 300 tokens a turn", flush=True)
    written, left, final = growing(min(args.turns), per_turn=300, first=300)
    lines += ["", f"Turns of 300 tokens ({min(args.turns)} turns; each tail rewrites its partial block): "
              f"written {written / 1e6:.1f} MB for a final cache of {final / 1e6:.1f} MB, "
              f"{written / final:.3f}x.", ""]
    print("16 conversations over a shared prefix", flush=True)
    one, many = shared_prefix()
    lines += ["## 16 conversations over a 4096-token shared prefix (64 tokens each of their own)", "",
              "| one conversation MB | sixteen MB | sixteen / one |", "|---:|---:|---:|",
              f"| {one / 1e6:.2f} | {many / 1e6:.2f} | {many / one:.3f} |", ""]
    print(f"time to first token after a restart, {args.ttft_tokens} tokens", flush=True)
    recompute_repeats = args.repeats if args.recompute_repeats is None else args.recompute_repeats
    med, seq, nbytes, sizes = ttft(args.ttft_tokens, args.repeats, recompute_repeats)
    lines += [f"## Time to first token after a restart, {args.ttft_tokens}-token prompt",
              "Random Llama-shaped model (4 layers, hidden 256, 2 KV heads x 64; its float32 weights make float32 caches); the request is the "
              "stored prompt plus one token. From disk: a new LRUPromptCache on the directory (its scan included), "
              "fetch_nearest_cache, then the first token. Cold: the files' pages dropped with "
              f"posix_fadvise(DONTNEED) first. Median of {args.repeats} (recompute: of "
              f"{max(1, min(args.repeats, recompute_repeats))}, the stored prompt's own prefill the first).", "",
              "| recompute s | from disk, cold s | from disk, warm s | recompute / disk (cold) |",
              "|---:|---:|---:|---:|",
              f"| {med['recompute']:.3f} | {med['disk cold']:.3f} | {med['disk warm']:.3f} | "
              f"{med['recompute'] / med['disk cold']:.1f}x |", "",
              f"Read throughput: {len(sizes)} files, {nbytes / 1e6:.1f} MB (blocks of {sizes[-1] / 1e6:.2f} MB and a "
              f"tail of {sizes[0] / 1e3:.1f} kB). The tier's figure is the restart and fetch together (bytes / "
              "time); Python's, open and read of each file.", "",
              "| | cold GB/s | warm GB/s |", "|---|---:|---:|",
              f"| the tier (scan, read, check, evaluate, assemble) | {nbytes / med['read cold'] / 1e9:.2f} | "
              f"{nbytes / med['read warm'] / 1e9:.2f} |",
              f"| Python sequential read of the same files | {seq['cold'] / 1e9:.2f} | {seq['warm'] / 1e9:.2f} |", ""]
    print("two processes", flush=True)
    results = two_processes()
    lines += ["## Two processes on one directory",
              "Each inserts 8 conversations (a 1024-token shared prefix and 600 tokens of its own), and after each "
              "round fetches the other's newest conversation (plus one token).", "",
              "| process | tokens asked | tokens served | blocks read from disk (the other's) | disk errors |",
              "|---:|---:|---:|---:|---:|"]
    for who, served, asked, read, errors in results:
        lines.append(f"| {who} | {asked} | {served} | {read} | {len(errors)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
