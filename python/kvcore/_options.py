"""The cache options that ``kvcore serve`` and ``kvcore generate`` share:
parsing, checks made before a model loads, and the line that says what is in
force."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

# What mx.quantize (affine) takes, and kvcore's quantized caches with it.
KV_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
KV_SCHEMES = ("affine", "rotated-channel")
# rotated-channel: keys grouped over 32 tokens, values over 64 channels
# (bench/reference/cpu-2core-kv-quality.md).
DEFAULT_GROUP_SIZE = {"affine": 64, "rotated-channel": (32, 64)}
# rotated-channel: the first token kept in float (3 bits: +5.7% perplexity
# without it, +1-2% with it; bench/reference/*-kv-quality.md).
DEFAULT_KV_SINK = 1
DEFAULT_KV_WINDOW = 128
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's
DEFAULT_DISK_BYTES = 20 * 10**9


class UsageError(Exception):
    """A bad command line, said in one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog, err):
    """Print a UsageError as one line; the exit status for it."""
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return 2


def _pair(text, what, allowed):
    """'4' -> 4, '8,4' -> (8, 4), each checked against allowed."""
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected {what} as N or KEYS,VALUES (e.g. 4 or 8,4) but got {text!r}")
    values = [int(p) for p in parts]
    for v in values:
        if v not in allowed:
            raise argparse.ArgumentTypeError(
                f"{what} must be one of {', '.join(map(str, allowed))} (mlx's quantization) "
                f"but got {v}")
    return values[0] if len(values) == 1 else tuple(values)


def kv_bits(text):
    return _pair(text, "KV bits", KV_BITS)


def kv_group_size(text):
    return _pair(text, "KV group size", GROUP_SIZES)


def size(text):
    """Bytes: 1000000, 512M, 20G, 1.5GB (mlx-lm's units: M = 10**6)."""
    t = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("G", 10**9), ("M", 10**6)):
        if t.endswith(unit):
            t, scale = t[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 20G but got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size >= 0 but got {text!r}")
    return int(value * scale)


def non_negative(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer but got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 but got {v}")
    return v


def positive(text):
    v = non_negative(text)
    if v == 0:
        raise argparse.ArgumentTypeError("expected an integer > 0 but got 0")
    return v


def block_tokens(text):
    v = non_negative(text)
    if v > 65536:
        raise argparse.ArgumentTypeError(f"expected at most 65536 tokens per block but got {v}")
    return v


def add_kv_options(parser):
    """Quantization and the sliding window: both commands."""
    g = parser.add_argument_group("KV cache (kvcore)")
    g.add_argument("--kv-bits", type=kv_bits, default=None, metavar="BITS",
                   help="quantize the KV cache: 4, or KEYS,VALUES such as 8,4 "
                        f"(each one of {', '.join(map(str, KV_BITS))}; default: float)")
    g.add_argument("--kv-scheme", choices=KV_SCHEMES, default="affine",
                   help="how --kv-bits quantizes: affine (mlx-lm's layout, the default) or "
                        "rotated-channel (Hadamard-rotated keys and values, keys per channel "
                        "over groups of tokens, the newest tokens in float: near float "
                        "quality at 4 bits)")
    g.add_argument("--kv-group-size", type=kv_group_size, default=None, metavar="N",
                   help="quantization group size, or KEYS,VALUES (32, 64 or 128). affine: "
                        "along the head dimension, which it must divide (default: 64); "
                        "rotated-channel: keys over N tokens, values along the head "
                        "dimension (default: 32,64)")
    g.add_argument("--kv-window", type=non_negative, default=None, metavar="N",
                   help="rotated-channel: the newest N tokens stay in float "
                        f"(default: {DEFAULT_KV_WINDOW}, or --max-kv-size if smaller)")
    g.add_argument("--kv-sink", type=non_negative, default=None, metavar="N",
                   help="rotated-channel: each sequence's first N tokens (the attention "
                        "sink) also kept in float and read in place of their quantized form "
                        f"(default: {DEFAULT_KV_SINK}; 0: none)")
    g.add_argument("--quantized-kv-start", type=non_negative,
                   default=DEFAULT_QUANTIZED_KV_START, metavar="N",
                   help="quantize once a sequence holds N tokens, as mlx-lm "
                        f"(default: {DEFAULT_QUANTIZED_KV_START}; 0: from the first token)")
    g.add_argument("--max-kv-size", type=positive, default=None, metavar="N",
                   help="a sliding window of N tokens per sequence (RotatingKVCache keeping "
                        "its first 4, quantizable with either scheme; default: unbounded)")
    return g


def settle_kv(args):
    """Fill in the defaults that depend on the scheme and refuse settings
    that do not go together (UsageError)."""
    if args.kv_group_size is None:
        args.kv_group_size = DEFAULT_GROUP_SIZE[args.kv_scheme]
    if args.kv_scheme == "affine":
        for flag, value in (("--kv-window", args.kv_window), ("--kv-sink", args.kv_sink)):
            if value is not None:
                raise UsageError(f"{flag} is for --kv-scheme rotated-channel "
                                 "(the affine scheme keeps no float tokens)")
        return args
    if args.kv_window is None:
        # A float window wider than the sliding window would keep tokens no
        # query sees in float.
        args.kv_window = (DEFAULT_KV_WINDOW if args.max_kv_size is None
                          else min(DEFAULT_KV_WINDOW, args.max_kv_size))
    if args.kv_sink is None:
        args.kv_sink = DEFAULT_KV_SINK
    if args.kv_sink > 256:
        raise UsageError(f"--kv-sink takes 0 to 256 tokens, not {args.kv_sink}")
    if args.kv_bits is None:
        raise UsageError("--kv-scheme rotated-channel quantizes: give --kv-bits too")
    if args.max_kv_size is not None and args.kv_sink > 4:
        raise UsageError(f"--kv-sink {args.kv_sink} with --max-kv-size: a sliding window keeps "
                         "its first 4 tokens, and the sink lies within them")
    return args


def quantize_kwargs(args):
    """to_quantized's arguments for these settings."""
    kw = {"group_size": args.kv_group_size, "bits": args.kv_bits}
    if args.kv_scheme != "affine":
        kw.update(scheme=args.kv_scheme, window=args.kv_window, sink=args.kv_sink)
    return kw


def add_prompt_cache_options(group):
    """The server's prefix cache beyond mlx-lm's --prompt-cache-size/-bytes."""
    group.add_argument("--disk-dir", default=None, metavar="DIR",
                       help="keep every prompt-cache entry in DIR too, served after a "
                            "restart (default: none, memory only)")
    group.add_argument("--disk-bytes", type=size, default=DEFAULT_DISK_BYTES, metavar="SIZE",
                       help="bytes of files kept in --disk-dir, oldest removed first "
                            "(default: 20G)")
    group.add_argument("--disk-block-tokens", type=block_tokens, default=256, metavar="N",
                       help="--disk-dir stores keys and values in blocks of N tokens, each "
                            "written once and shared by every entry and process that holds "
                            "it (default: 256; 0: one whole file per entry)")
    group.add_argument("--max-checkpoints", type=non_negative, default=8, metavar="N",
                       help="prefill checkpoints kept for caches that cannot be trimmed "
                            "(default: 8; 0: none)")
    group.add_argument("--checkpoint-every", type=non_negative, default=0, metavar="N",
                       help="at least N tokens between checkpoints (default: 0, every "
                            "prefill chunk)")


def check_disk_dir(path):
    """The directory exists (made if needed) and a file can be written in it."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".kvcore-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--disk-dir {path}: cannot write there ({e.strerror or e})") from None
    return str(p)


def _pair_values(v):
    return v if isinstance(v, tuple) else (v, v)


def head_dims_of(config):
    """(key head dim, value head dim) from a model's config.json, or None."""
    text = config.get("text_config", config)
    hd = text.get("head_dim")
    if hd is None and text.get("hidden_size") and text.get("num_attention_heads"):
        hd = text["hidden_size"] // text["num_attention_heads"]
    if not isinstance(hd, int):
        return None
    return (text.get("k_head_dim", hd), text.get("v_head_dim", hd))


def check_head_dims(args, head_dims):
    """The quantization settings suit the model's (key, value) head dims."""
    keys, values = _pair_values(args.kv_group_size)
    if args.kv_scheme == "rotated-channel":
        for which, d in zip(("keys", "values"), head_dims):
            if d < 2 or d & (d - 1):
                raise UsageError(f"--kv-scheme rotated-channel rotates the head dimension, which "
                                 f"must be a power of two; the model's for {which} is {d}")
        checks = [("values", values, head_dims[1])]  # keys group over tokens
    else:
        checks = [("keys", keys, head_dims[0]), ("values", values, head_dims[1])]
    for which, g, d in checks:
        if d % g:
            raise UsageError(f"--kv-group-size {g} does not divide the model's head "
                             f"dimension for {which} ({d}); use one of "
                             f"{', '.join(str(x) for x in GROUP_SIZES if d % x == 0) or 'none'}")


def check_model_dir(model, args):
    """Checks a local model directory's config.json allows, before loading."""
    if args.kv_bits is None or model is None:
        return
    cfg = Path(model).expanduser() / "config.json"
    if not cfg.is_file():
        return  # a hub name: checked once loaded
    try:
        dims = head_dims_of(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return
    if dims:
        check_head_dims(args, dims)


def check_loaded_model(model, args):
    """The same check on a loaded model (hub names)."""
    if args.kv_bits is None:
        return
    margs = getattr(model, "args", None)
    if margs is None:
        return
    cfg = {k: getattr(margs, k) for k in ("head_dim", "hidden_size", "num_attention_heads")
           if isinstance(getattr(margs, k, None), int)}
    dims = head_dims_of(cfg)
    if dims:
        check_head_dims(args, dims)


def describe_kv(args):
    """The KV part of the startup line."""
    if args.kv_bits is None:
        kv = "float KV cache"
    else:
        kb, vb = _pair_values(args.kv_bits)
        kg, vg = _pair_values(args.kv_group_size)
        bits = f"{kb} bits" if kb == vb else f"keys {kb} bits, values {vb} bits"
        group = f"group {kg}" if kg == vg else f"groups {kg},{vg}"
        start = ("from the first token" if args.quantized_kv_start == 0
                 else f"from token {args.quantized_kv_start}")
        scheme = getattr(args, "kv_scheme", "affine")
        if scheme != "affine":
            group = (f"keys grouped over {kg} tokens, values group {vg}, "
                     f"newest {args.kv_window} tokens in float")
            if args.kv_sink:
                group += f", first {args.kv_sink} in float"
        kv = f"quantized KV cache: {scheme}, {bits}, {group}, {start}"
    window = (f"sliding window {args.max_kv_size} tokens" if args.max_kv_size
              else "no sliding window")
    return f"{kv}; {window}"


def human_bytes(n):
    if n is None or n >= 1 << 62:
        return "unbounded"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def make_caches(model, max_kv_size=None):
    """kvcore's caches for model; with max_kv_size, each plain KVCache layer
    becomes a RotatingKVCache of that size (mlx-lm's make_prompt_cache
    ignores max_kv_size for models that make their own caches, llama
    included)."""
    import kvcore

    caches = kvcore.make_prompt_cache(model, max_kv_size=max_kv_size)
    if max_kv_size is None:
        return caches
    # (mlx-lm's KVCache too: a model module imported before patch_mlx_lm() keeps it)
    return [kvcore.RotatingKVCache(max_size=max_kv_size, keep=4) if type(c).__name__ == "KVCache"
            else c for c in caches]
