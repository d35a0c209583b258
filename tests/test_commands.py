"""The pieces of ``kvcore serve`` and ``kvcore generate`` that need no
server: option parsing, the caches they make, the startup line and the
metrics text. (tests/test_serve.py runs the commands on the real model.)"""

import argparse
import types

import mlx.core as mx
import pytest

import kvcore
from kvcore import _options
from kvcore._serve import Stats, metrics_text


@pytest.mark.parametrize("text, value", [("4", 4), ("8,4", (8, 4)), ("3", 3), ("2,8", (2, 8))])
def test_kv_bits_take_one_value_or_a_keys_values_pair(text, value):
    assert _options.kv_bits(text) == value


@pytest.mark.parametrize("text, message", [
    ("7", "KV bits must be one of 2, 3, 4, 5, 6, 8 (mlx's quantization) but got 7"),
    ("8,1", "KV bits must be one of 2, 3, 4, 5, 6, 8 (mlx's quantization) but got 1"),
    ("8,4,2", "expected KV bits as N or KEYS,VALUES (e.g. 4 or 8,4) but got '8,4,2'"),
    ("four", "expected KV bits as N or KEYS,VALUES (e.g. 4 or 8,4) but got 'four'"),
])
def test_bad_kv_bits_say_what_is_allowed(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        _options.kv_bits(text)
    assert str(e.value) == message


def test_group_size_must_be_one_mlx_takes():
    assert _options.kv_group_size("64,32") == (64, 32)
    with pytest.raises(argparse.ArgumentTypeError) as e:
        _options.kv_group_size("48")
    assert str(e.value) == ("KV group size must be one of 32, 64, 128 (mlx's quantization) "
                            "but got 48")


@pytest.mark.parametrize("text, value", [("1000", 1000), ("512M", 512 * 10**6),
                                         ("20G", 20 * 10**9), ("1.5GB", 15 * 10**8)])
def test_sizes_use_mlx_lm_units(text, value):
    assert _options.size(text) == value


def _kv_args(**kw):
    base = dict(kv_bits=4, kv_group_size=None, kv_scheme="affine", kv_window=None, kv_sink=None,
                max_kv_size=None, quantized_kv_start=0)
    return _options.settle_kv(types.SimpleNamespace(**{**base, **kw}))


def test_the_float_window_defaults_to_no_more_than_the_sliding_window():
    assert _kv_args(kv_scheme="rotated-channel").kv_window == 128
    assert _kv_args(kv_scheme="rotated-channel", max_kv_size=64).kv_window == 64
    assert _kv_args(kv_scheme="rotated-channel", max_kv_size=4096).kv_window == 128
    assert _kv_args(kv_scheme="rotated-channel", max_kv_size=64, kv_window=200).kv_window == 200


def test_group_size_is_checked_against_each_head_dimension():
    _options.check_head_dims(_kv_args(kv_group_size=(64, 32)), (64, 32))
    with pytest.raises(_options.UsageError) as e:
        _options.check_head_dims(_kv_args(kv_group_size=64), (128, 96))
    assert str(e.value) == ("--kv-group-size 64 does not divide the model's head dimension for "
                            "values (96); use one of 32")


def test_rotated_channel_groups_keys_over_tokens_and_wants_power_of_two_heads():
    args = _kv_args(kv_scheme="rotated-channel")
    assert (args.kv_group_size, args.kv_window, args.kv_sink) == ((32, 64), 128, 1)
    assert _options.quantize_kwargs(args) == {"group_size": (32, 64), "bits": 4,
                                              "scheme": "rotated-channel", "window": 128, "sink": 1}
    # A key group of 128 tokens on a head dim of 64: keys group along tokens.
    _options.check_head_dims(_kv_args(kv_scheme="rotated-channel", kv_group_size=(128, 32)),
                             (64, 64))
    with pytest.raises(_options.UsageError) as e:
        _options.check_head_dims(args, (96, 96))
    assert str(e.value) == ("--kv-scheme rotated-channel rotates the head dimension, which must "
                            "be a power of two; the model's for keys is 96")
    assert _options.quantize_kwargs(_kv_args()) == {"group_size": 64, "bits": 4}


@pytest.mark.parametrize("kw, message", [
    (dict(kv_window=64), "--kv-window is for --kv-scheme rotated-channel (the affine scheme "
                         "keeps no float tokens)"),
    (dict(kv_sink=1), "--kv-sink is for --kv-scheme rotated-channel (the affine scheme "
                      "keeps no float tokens)"),
    (dict(kv_scheme="rotated-channel", kv_sink=300), "--kv-sink takes 0 to 256 tokens, not 300"),
    (dict(kv_scheme="rotated-channel", kv_bits=None),
     "--kv-scheme rotated-channel quantizes: give --kv-bits too"),
    (dict(kv_scheme="rotated-channel", max_kv_size=512, kv_sink=5),
     "--kv-sink 5 with --max-kv-size: a sliding window keeps its first 4 tokens, and the "
     "sink lies within them"),
])
def test_settings_that_do_not_go_together_are_refused(kw, message):
    with pytest.raises(_options.UsageError) as e:
        _kv_args(**kw)
    assert str(e.value) == message


def test_head_dims_come_from_the_config():
    assert _options.head_dims_of({"hidden_size": 576, "num_attention_heads": 9}) == (64, 64)
    assert _options.head_dims_of({"head_dim": 128, "hidden_size": 1}) == (128, 128)
    assert _options.head_dims_of({"text_config": {"head_dim": 256}}) == (256, 256)
    assert _options.head_dims_of({}) is None


def test_startup_line_names_bits_group_start_and_window():
    args = types.SimpleNamespace(kv_bits=(8, 4), kv_group_size=64, quantized_kv_start=0,
                                 max_kv_size=4096, kv_scheme="affine")
    assert _options.describe_kv(args) == (
        "quantized KV cache: affine, keys 8 bits, values 4 bits, group 64, from the first token; "
        "sliding window 4096 tokens")
    args = types.SimpleNamespace(kv_bits=4, kv_group_size=(32, 64), quantized_kv_start=5000,
                                 max_kv_size=None, kv_scheme="rotated-channel", kv_window=128, kv_sink=0)
    assert _options.describe_kv(args) == (
        "quantized KV cache: rotated-channel, 4 bits, keys grouped over 32 tokens, values group "
        "64, newest 128 tokens in float, from token 5000; no sliding window")
    args.kv_sink = 1
    assert _options.describe_kv(args) == (
        "quantized KV cache: rotated-channel, 4 bits, keys grouped over 32 tokens, values group "
        "64, newest 128 tokens in float, first 1 in float, from token 5000; no sliding window")
    args = types.SimpleNamespace(kv_bits=None, kv_group_size=64, quantized_kv_start=5000,
                                 max_kv_size=None)
    assert _options.describe_kv(args) == "float KV cache; no sliding window"


def _tiny_llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=3,
                           intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=32, num_key_value_heads=2)
    return llama.Model(args)


def test_max_kv_size_makes_rotating_caches_for_models_that_make_their_own():
    model = _tiny_llama()
    assert hasattr(model, "make_cache")  # mlx-lm's make_prompt_cache ignores max_kv_size here
    caches = _options.make_caches(model, 64)
    assert [type(c) for c in caches] == [kvcore.RotatingKVCache] * 3
    assert [(c.max_size, c.keep) for c in caches] == [(64, 4)] * 3
    assert all(type(c).__name__ == "KVCache" for c in _options.make_caches(model))


def test_metrics_text_parses_as_prometheus_text(tmp_path):
    parser = pytest.importorskip("prometheus_client.parser")
    lru = kvcore.LRUPromptCache(4, disk_dir=str(tmp_path))
    cache = [kvcore.KVCache()]
    cache[0].update_and_fetch(mx.ones((1, 2, 5, 8)), mx.ones((1, 2, 5, 8)))
    lru.insert_cache("m", [1, 2, 3, 4, 5], cache)
    stats = Stats()
    stats.tokens_cached, stats.tokens_computed, stats.requests = 4, 9, 2
    stats.batch_max = {"QuantizedBatchKVCache": 3}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in parser.text_string_to_metric_families(metrics_text(lru, stats))
               for s in f.samples}
    assert samples[("kvcore_prompt_cache_entries", (("tier", "memory"),))] == 1
    assert samples[("kvcore_prompt_cache_entries", (("tier", "disk"),))] == 1
    assert samples[("kvcore_prompt_cache_bytes", (("tier", "memory"),))] == lru.nbytes
    assert samples[("kvcore_prompt_cache_bytes", (("tier", "disk"),))] == lru.disk_nbytes
    assert samples[("kvcore_prompt_tokens_total", (("source", "cache"),))] == 4
    assert samples[("kvcore_prompt_tokens_total", (("source", "computed"),))] == 9
    assert samples[("kvcore_prompt_cache_lookups_total", ())] == 2
    assert samples[("kvcore_batch_sequences_max", (("cache", "QuantizedBatchKVCache"),))] == 3
    assert samples[("kvcore_disk_errors", ())] == 0


def test_serve_batches_quantized_requests_for_both_schemes():
    from kvcore._serve import _batch_takes

    # kvcore serve keeps continuous batching when kvcore's batch caches
    # take the settings (mlx_lm.server serves kv_bits one at a time).
    for scheme in ("affine", "rotated-channel"):
        assert _batch_takes(kvcore, _kv_args(kv_scheme=scheme)) is True
