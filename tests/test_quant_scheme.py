"""QuantizedKVCache(scheme="rotated-channel"): keys and values rotated by an
orthonormal Hadamard transform of the head dim, keys quantized per channel
over groups of `group_size` tokens (stored transposed), values per token, the
newest `window` tokens and the group not yet full in float; attention
computed on the quantized data.

The stored arrays are specified exactly (mx.quantize of the rotated,
transposed keys); attention is checked against float attention over the
dequantized cache."""

import copy

import mlx.core as mx
import numpy as np
import pytest

import kvcore
from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

SCHEME = "rotated-channel"


def rot(x):
    return mx.hadamard_transform(x, scale=1.0 / np.sqrt(x.shape[-1]))


def kv(B=1, H=2, S=8, D=64, seed=0, dtype=mx.float32):
    k = mx.random.normal((B, H, S, D), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((B, H, S, D), key=mx.random.key(seed + 1)).astype(dtype)
    return k, v


def eq(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert mx.array_equal(a, b).item()


def new(bits=4, window=0, **kw):
    return kvcore.QuantizedKVCache(group_size=32, bits=bits, scheme=SCHEME, window=window, **kw)


def dequantized(cache):
    """The cache's keys and values as floats in the model's (unrotated) space."""
    (kw, ks, kb, r), (vw, vs, vb, rv) = cache.keys_and_values()
    kg, vg = (cache.group_size, cache.group_size) if isinstance(cache.group_size, int) else cache.group_size
    kbits, vbits = (cache.bits, cache.bits) if isinstance(cache.bits, int) else cache.bits
    keys, values = [], []
    if ks.shape[-1]:
        keys.append(mx.swapaxes(mx.dequantize(kw, ks, kb, group_size=kg, bits=kbits), 2, 3))
        values.append(mx.dequantize(vw, vs, vb, group_size=vg, bits=vbits))
    if r is not None:
        keys.append(r)
        values.append(rv)
    return rot(mx.concatenate(keys, axis=2)), rot(mx.concatenate(values, axis=2))


@pytest.mark.parametrize("window, quantized", [(0, 64), (10, 64), (40, 32), (128, 0)])
def test_stores_whole_groups_older_than_the_window_and_the_rest_in_float(window, quantized):
    c = new(window=window)
    k, v = kv(S=75)
    (kw, ks, kb, r), (vw, vs, vb, rv) = c.update_and_fetch(k, v)
    ew, es, eb = mx.quantize(mx.swapaxes(rot(k)[:, :, :quantized], 2, 3), group_size=32, bits=4) \
        if quantized else (mx.zeros((1, 2, 64, 0), mx.uint32),) + (mx.zeros((1, 2, 64, 0)),) * 2
    eq(kw, ew), eq(ks, es), eq(kb, eb)
    assert vw.shape[2] == quantized
    if quantized:
        for got, want in zip((vw, vs, vb), mx.quantize(rot(v)[:, :, :quantized], group_size=32, bits=4)):
            eq(got, want)
    eq(r, rot(k)[:, :, quantized:])
    eq(rv, rot(v)[:, :, quantized:])
    assert c.offset == 75 and c.scheme == SCHEME and c.window == window


def test_the_default_window_is_128_tokens():
    c = kvcore.QuantizedKVCache(group_size=32, bits=4, scheme=SCHEME)
    c.update_and_fetch(*kv(S=200))
    assert c.window == 128 and c.residual.shape[2] == 200 - 64


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("sizes", [[1] * 70, [5, 27, 1, 40, 3], [64, 1, 63, 2]])
def test_updates_in_pieces_store_what_one_update_stores(sizes, window):
    k, v = kv(S=sum(sizes), seed=3)
    whole = new(bits=3, window=window)
    whole.update_and_fetch(k, v)
    parts = new(bits=3, window=window)
    at = 0
    for s in sizes:
        parts.update_and_fetch(k[:, :, at:at + s], v[:, :, at:at + s])
        at += s
    (a, b) = whole.keys_and_values(), parts.keys_and_values()
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        if x is None:
            assert y is None
        else:
            eq(x, y)


def test_affine_stays_the_default():
    c = kvcore.QuantizedKVCache(group_size=64, bits=4)
    assert c.scheme == "affine" and c.residual is None and c.window == 0
    k, v = kv(S=3)
    keys, values = c.update_and_fetch(k, v)
    assert len(keys) == 3 and len(c.state) == 5


def _attention_cases():
    for n_q, n_kv in ((4, 2), (2, 2)):
        for L in (1, 5):
            for S in (64, 70, 20):  # whole groups only, groups and residual, residual only
                for mask in (None, "causal", "bool", "additive"):
                    yield n_q, n_kv, L, S, mask


@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("bits", [4, 3, (4, 2)])
def test_attention_matches_attention_over_the_dequantized_cache(bits, window):
    for n_q, n_kv, L, S, mask in _attention_cases():
        c = new(bits=bits, window=window)
        k, v = kv(H=n_kv, S=S, seed=S)
        keys, values = c.update_and_fetch(k, v)
        q = mx.random.normal((1, n_q, L, 64), key=mx.random.key(7))
        m = mask
        if mask == "bool":
            m = mx.random.uniform(shape=(1, 1, L, S), key=mx.random.key(1)) > 0.3
            m[..., -1] = True
        elif mask == "additive":
            m = mx.random.normal((1, 1, L, S), key=mx.random.key(2))
        got = kvcore.quantized_scaled_dot_product_attention(
            q, keys, values, scale=0.125, mask=m, group_size=32, bits=bits, scheme=SCHEME)
        dk, dv = dequantized(c)
        want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=m)
        err = mx.abs(got - want).max().item()
        assert err < 2e-5, (n_q, n_kv, L, S, mask, err)


def test_attention_routed_by_mlx_lms_entry_point():
    from kvcore._attention import scaled_dot_product_attention

    c = new()
    k, v = kv(S=40)
    keys, values = c.update_and_fetch(k, v)
    q = mx.random.normal((1, 4, 1, 64))
    got = scaled_dot_product_attention(q, keys, values, c, scale=0.125, mask=None)
    dk, dv = dequantized(c)
    want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=None)
    assert mx.abs(got - want).max().item() < 2e-5


def _filled(S=75, bits=4, window=0):
    c = new(bits=bits, window=window)
    c.update_and_fetch(*kv(S=S))
    return c


def _assert_same_state(a, b):
    sa, sb = a.state, b.state
    assert len(sa) == len(sb) == 9
    for x, y in zip(sa[0] + sa[1], sb[0] + sb[1]):
        eq(x, y)
    assert sa[2:7] == sb[2:7]
    for x, y in zip(sa[7:], sb[7:]):
        if x is None:
            assert y is None
        else:
            eq(x, y)


def test_state_names_the_scheme_and_round_trips():
    c = _filled(window=20)
    state = c.state
    assert state[2:7] == (75, 32, 4, SCHEME, 20)
    assert state[7].shape == state[8].shape == (1, 2, 43, 64)
    _assert_same_state(c, kvcore.QuantizedKVCache.from_state(state))


def test_files_round_trip_and_name_the_scheme(tmp_path):
    c = _filled()
    path = str(tmp_path / "c.safetensors")
    kvcore.save_prompt_cache(path, [c, _filled(S=64), _filled(window=16)])
    loaded = kvcore.load_prompt_cache(path)
    _assert_same_state(c, loaded[0])
    _assert_same_state(loaded[2], _filled(window=16))
    assert loaded[1].residual is None and loaded[1].offset == 64


def test_a_file_with_an_unknown_scheme_is_refused(tmp_path):
    path = str(tmp_path / "c.safetensors")
    kvcore.save_prompt_cache(path, [_filled()])
    arrays, meta = mx.load(path, return_metadata=True)
    # The scheme is stored as the code points of its name.
    name = [k for k, a in arrays.items() if a.dtype == mx.int32 and a.size == len(SCHEME)]
    assert name
    arrays[name[0]] = mx.array([ord(ch) for ch in "rotated-chanel!"], mx.int32)
    mx.save_safetensors(path, arrays, meta)
    with pytest.raises(kvcore.CacheValueError, match="rotated-chanel!"):
        kvcore.load_prompt_cache(path)


def test_copies_are_independent():
    c = _filled(window=20)
    for clone in (copy.copy(c), copy.deepcopy(c)):
        before = clone.state
        c2 = copy.deepcopy(c)
        c2.update_and_fetch(*kv(S=30, seed=9))
        _assert_same_state(clone, kvcore.QuantizedKVCache.from_state(before))
        assert c.offset == 75


def test_trim_within_the_residual_drops_float_tokens():
    c = _filled(S=75)
    r, rv = c.residual, c.value_residual
    assert c.trim(5) == 5
    assert c.offset == 70
    eq(c.residual, r[:, :, :6])
    eq(c.value_residual, rv[:, :, :6])


def test_trim_into_a_quantized_group_dequantizes_its_kept_tokens_to_the_residual():
    c = _filled(S=75)
    (kw, ks, kb, _), (vw, vs, vb, _) = c.keys_and_values()
    group = mx.swapaxes(mx.dequantize(kw[..., 4:8], ks[..., 1:2], kb[..., 1:2], group_size=32, bits=4), 2, 3)
    values = mx.dequantize(vw[:, :, 32:40], vs[:, :, 32:40], vb[:, :, 32:40], group_size=32, bits=4)
    assert c.trim(35) == 35 and c.offset == 40
    eq(c.residual, group[:, :, :8])
    eq(c.value_residual, values)
    (kw2, ks2, _, _), (vw2, _, _, _) = c.keys_and_values()
    assert ks2.shape[-1] == 1 and vw2.shape[2] == 32
    c.update_and_fetch(*kv(S=30, seed=4))  # refills the group
    assert c.offset == 70 and c.residual.shape[2] == 6
    assert c.trim(100) == 70 and c.offset == 0 and c.residual is None and c.value_residual is None


def test_to_quantized_equals_a_cache_fed_the_same_tokens():
    k, v = kv(S=50)
    f = kvcore.KVCache()
    f.update_and_fetch(k, v)
    q = f.to_quantized(group_size=32, bits=4, scheme=SCHEME, window=0)
    fresh = new()
    fresh.update_and_fetch(k, v)
    _assert_same_state(q, fresh)
    assert q.offset == 50


def test_nbytes_counts_the_quantized_arrays_and_the_residual():
    c = _filled()
    s = c.state
    assert c.nbytes == sum(a.nbytes for a in s[0] + s[1]) + s[7].nbytes + s[8].nbytes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheme="rotated"), "'rotated'"),
        (dict(scheme=3), "int"),
        (dict(scheme=SCHEME, bits=7), "7"),
        (dict(scheme=SCHEME, group_size=48), "48"),
        (dict(scheme=SCHEME, window=-1), "window -1"),
        (dict(window=16), "window 16"),
    ],
)
def test_bad_settings_are_typed_errors_naming_the_value(kwargs, message):
    with pytest.raises(kvcore.CacheValueError, match=message):
        kvcore.QuantizedKVCache(**kwargs)


def test_a_head_dim_that_is_not_a_power_of_two_is_refused_and_the_cache_unchanged():
    c = _filled()
    before = c.state
    k, v = kv(S=3, D=96)
    with pytest.raises(kvcore.CacheValueError, match="power of two.*96"):
        c.update_and_fetch(k, v)
    _assert_same_state(c, kvcore.QuantizedKVCache.from_state(before))


def test_a_dtype_change_is_refused_and_the_cache_unchanged():
    c = _filled()
    before = c.state
    with pytest.raises(kvcore.CacheValueError):
        c.update_and_fetch(*kv(S=40, dtype=mx.float16))
    _assert_same_state(c, kvcore.QuantizedKVCache.from_state(before))


def test_a_state_whose_offset_splits_a_group_is_refused():
    c = _filled()
    s = list(c.state)
    s[2] = 74  # 63 quantized tokens: not whole groups
    with pytest.raises(kvcore.CacheValueError, match="offset 74"):
        c.state = tuple(s)
    assert c.offset == 75


def test_a_state_with_residuals_of_different_lengths_is_refused():
    c = _filled()
    s = list(c.state)
    s[8] = s[8][:, :, :5]
    with pytest.raises(kvcore.CacheValueError, match="residual"):
        c.state = tuple(s)
    assert c.offset == 75


def test_a_batch_of_sliding_windows_takes_the_scheme_without_a_sink():
    # Every kind takes the scheme (tests/test_quant_scheme_rotating.py and
    # tests/test_quant_scheme_batch_rotating.py); a batch of sliding windows
    # pins no first tokens, so it takes no sink, and its merge takes one
    # scheme.
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.BatchRotatingKVCache(8, [0]).to_quantized(32, 4, scheme=SCHEME, sink=1)
    assert str(e.value) == ("[BatchRotatingKVCache.to_quantized] expected no sink (a batch of sliding "
                            "windows pins no first tokens) but got sink 1")
    assert kvcore.BatchRotatingKVCache(8, [0]).to_quantized(32, 4, scheme=SCHEME).scheme == SCHEME
    c = kvcore.QuantizedRotatingKVCache(8, 0, 32, 4, scheme=SCHEME)
    a = kvcore.QuantizedRotatingKVCache(8, 0, 32, 4)
    for x in (c, a):
        x.update_and_fetch(mx.zeros((1, 1, 2, 32)), mx.zeros((1, 1, 2, 32)))
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.QuantizedRotatingKVCache.merge([c, a])
    assert str(e.value) == ("[QuantizedBatchRotatingKVCache.merge] expected caches of one scheme and "
                            "max_size: rotated-channel, 8 but got affine, 8")


QWEN = {
    "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
    "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "vocab_size": 128, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rope_traditional": False, "tie_word_embeddings": True,
}


def _qwen(layers=2):
    from mlx_lm.models import qwen2

    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict({**QWEN, "num_hidden_layers": layers}))
    mx.eval(model.parameters())
    return model


class Dequantizing:
    """A float reference: a rotated-channel cache's contents, dequantized."""

    def __init__(self):
        self.inner = new(window=16)

    @property
    def offset(self):
        return self.inner.offset

    def make_mask(self, *a, **kw):
        return self.inner.make_mask(*a, **kw)

    def update_and_fetch(self, k, v):
        self.inner.update_and_fetch(k, v)
        return dequantized(self.inner)


def test_a_model_on_the_scheme_computes_what_float_attention_over_it_does():
    # One layer: past the first, float rounding in the reference's attention
    # can flip a quantization level of the next layer's keys.
    model = _qwen(layers=1)
    patch_mlx_lm()
    try:
        ours = [new(window=16) for _ in model.layers]
        ref = [Dequantizing() for _ in model.layers]
        tokens = mx.random.randint(0, 128, (1, 90), key=mx.random.key(5))
        for a, b in ((0, 40), (40, 41), (41, 90)):
            x = tokens[:, a:b]
            got, want = model(x, cache=ours), model(x, cache=ref)
            assert mx.abs(got - want).max().item() < 1e-4
    finally:
        unpatch_mlx_lm()


def test_generate_step_quantizes_with_the_scheme_patch_mlx_lm_names():
    from mlx_lm.generate import generate_step

    model = _qwen()
    patch_mlx_lm(kv_scheme=SCHEME)
    try:
        cache = kvcore.make_prompt_cache(model)
        prompt = mx.random.randint(0, 128, (40,), key=mx.random.key(6))
        toks = [t for (t, _), _ in zip(generate_step(
            prompt, model, prompt_cache=cache, kv_bits=4, kv_group_size=32,
            quantized_kv_start=0, max_tokens=5), range(5))]
        assert len(toks) == 5
        assert all(c.scheme == SCHEME and c.offset >= 44 for c in cache)
    finally:
        unpatch_mlx_lm()


def test_patch_mlx_lm_refuses_an_unknown_scheme():
    with pytest.raises(kvcore.CacheValueError, match="'nope'"):
        patch_mlx_lm(kv_scheme="nope")
    from kvcore._mlx_lm import is_patched

    assert not is_patched()


def test_the_prefix_store_serves_a_trimmed_copy_and_keeps_the_entry():
    lru = kvcore.LRUPromptCache(max_size=4)
    tokens = list(range(75))
    caches = [_filled(), _filled(S=75, bits=3)]
    lru.insert_cache("m", tokens, caches)
    got, rest = lru.fetch_nearest_cache("m", tokens[:40] + [500, 501])
    assert rest == [500, 501]
    want = _filled()
    want.trim(35)
    assert got[0].offset == 40 and got[0].scheme == SCHEME
    eq(got[0].residual, want.residual)
    again, _ = lru.fetch_nearest_cache("m", tokens)
    assert again[0].offset == 75
    _assert_same_state(again[0], _filled())


def test_inspect_names_the_scheme_and_window(tmp_path):
    from kvcore._files import describe

    path = str(tmp_path / "c.safetensors")
    kvcore.save_prompt_cache(path, [_filled(window=16), kvcore.QuantizedKVCache(bits=4)])
    layers = describe(path)["layers"]
    assert layers[0]["scheme"] == SCHEME and layers[0]["window"] == 16
    assert "scheme" not in layers[1]


@pytest.fixture
def matmul_mode():
    yield kvcore.set_quantized_matmul
    kvcore.set_quantized_matmul("auto")


@pytest.mark.parametrize("scheme, group, bits", [("affine", 32, (4, 8)),
                                                 ("rotated-channel", (32, 64), (4, 2))])
def test_dequantizing_attention_equals_the_kernel_path(matmul_mode, scheme, group, bits):
    # The path kvcore takes on CUDA, where mlx's quantized_matmul lacks shapes.
    assert kvcore.quantized_matmul_mode() == "auto"
    assert kvcore.dequantizes_in_attention() is False  # the CPU's kernel is trusted
    extra = {} if scheme == "affine" else {"scheme": scheme, "window": 16}
    c = kvcore.QuantizedKVCache(group_size=group, bits=bits, **extra)
    mx.random.seed(3)
    keys, values = c.update_and_fetch(mx.random.normal((1, 2, 90, 64)), mx.random.normal((1, 2, 90, 64)))
    q = mx.random.normal((1, 6, 5, 64))
    kw = dict(scale=0.125, mask="causal", group_size=group, bits=bits, scheme=scheme)
    matmul_mode("kernel")
    kernel = kvcore.quantized_scaled_dot_product_attention(q, keys, values, **kw)
    matmul_mode("dequantize")
    assert kvcore.quantized_matmul_mode() == "dequantize" and kvcore.dequantizes_in_attention()
    dequantized = kvcore.quantized_scaled_dot_product_attention(q, keys, values, **kw)
    assert dequantized.shape == kernel.shape == (1, 6, 5, 64)
    assert mx.allclose(dequantized, kernel, atol=1e-5, rtol=1e-5).item()


@pytest.mark.parametrize("L, mask", [(1, None), (5, "causal"), (5, "array")])
def test_dequantizing_attention_with_a_sink_equals_the_kernel_path(matmul_mode, L, mask):
    # On the dequantizing path the sink's float tokens are written over
    # their dequantized ones and one fused attention runs.
    c = kvcore.QuantizedKVCache(group_size=(32, 64), bits=4, scheme=SCHEME, window=16, sink=2)
    mx.random.seed(4)
    keys, values = c.update_and_fetch(mx.random.normal((1, 2, 90, 64)) * 3,
                                      mx.random.normal((1, 2, 90, 64)))
    q = mx.random.normal((1, 6, L, 64))
    if mask == "array":
        mask = mx.random.uniform(shape=(L, 90)) > 0.3
    kw = dict(scale=0.125, mask=mask, group_size=(32, 64), bits=4, scheme=SCHEME,
              sink=(c.sink_keys, c.sink_values, None))
    matmul_mode("kernel")
    kernel = kvcore.quantized_scaled_dot_product_attention(q, keys, values, **kw)
    matmul_mode("dequantize")
    dequantized = kvcore.quantized_scaled_dot_product_attention(q, keys, values, **kw)
    assert dequantized.shape == kernel.shape == (1, 6, L, 64)
    assert mx.allclose(dequantized, kernel, atol=1e-5, rtol=1e-5).item()
    # The sink matters here: without it the output differs.
    kw["sink"] = None
    assert not mx.allclose(kvcore.quantized_scaled_dot_product_attention(q, keys, values, **kw),
                           dequantized, atol=1e-3).item()


def test_an_unknown_matmul_mode_is_refused(matmul_mode):
    with pytest.raises(kvcore.CacheValueError) as e:
        matmul_mode("cuda")
    assert str(e.value) == "[set_quantized_matmul] expected 'auto', 'kernel' or 'dequantize' but got 'cuda'"
    assert kvcore.quantized_matmul_mode() == "auto"


# -- found by the fuzz (tests/test_bad_calls.py): typed errors, nothing changed


def test_set_quantized_matmul_refuses_a_mode_that_is_not_a_str(matmul_mode):
    # nanobind refused these with its own untyped TypeError.
    matmul_mode("kernel")
    for mode, name in ((5, "int"), (None, "NoneType"), (b"auto", "bytes")):
        with pytest.raises(kvcore.CacheTypeError) as e:
            matmul_mode(mode)
        assert str(e.value) == f"[set_quantized_matmul] expected mode as a str but got {name}"
        assert kvcore.quantized_matmul_mode() == "kernel"


@pytest.mark.parametrize("spoil", ["key biases", "value scales", "value biases"])
def test_a_state_with_scales_and_biases_of_two_dtypes_is_refused(spoil):
    # The dtypes of the scales and biases went unchecked: a state with
    # float16 key biases beside float32 scales was taken.
    c = _filled(window=20)
    before = c.state
    s = list(before)
    (kw, ks, kb), (vw, vs, vb) = s[0], s[1]
    if spoil == "key biases":
        s[0] = (kw, ks, kb.astype(mx.float16))
    elif spoil == "value scales":
        s[1] = (vw, vs.astype(mx.float16), vb)
    else:
        s[1] = (vw, vs, vb.astype(mx.bfloat16))
    for call in (lambda: setattr(c, "state", tuple(s)), lambda: kvcore.QuantizedKVCache.from_state(tuple(s))):
        with pytest.raises(kvcore.CacheValueError) as e:
            call()
        assert str(e.value).startswith(
            "[QuantizedKVCache.state] expected scales and biases of keys and values of one float dtype but got ")
        _assert_same_state(c, kvcore.QuantizedKVCache.from_state(before))


def _attention_args(B=1, n_q=4, L=1, D=64):
    c = _filled(S=75, window=5)
    keys, values = c.keys_and_values()
    q = mx.random.normal((B, n_q, L, D), key=mx.random.key(3))
    return c, q, keys, values


def test_attention_refuses_queries_of_another_batch():
    # A cache of one sequence broadcast against two queries' rows.
    c, q, keys, values = _attention_args(B=2)
    with pytest.raises(kvcore.CacheValueError) as e:
        kvcore.quantized_scaled_dot_product_attention(
            q, keys, values, scale=0.125, mask=None, group_size=32, bits=4, scheme=SCHEME)
    assert str(e.value) == ("[quantized_attention] expected keys and values of the queries' batch 2 "
                            "and 2 heads but got keys (1, 2, 64, 8), values (1, 2, 64, 8)")
    assert c.offset == 75


@pytest.mark.parametrize("bits", [8, (4, 2)])
def test_attention_refuses_bits_the_weights_were_not_packed_at(bits):
    # Weights packed at 4 bits were read at other bits without a word.
    c, q, keys, values = _attention_args()
    with pytest.raises(kvcore.CacheValueError, match=r"^\[quantized_attention\] expected weights, scales "
                       r"and biases of keys at bits"):
        kvcore.quantized_scaled_dot_product_attention(
            q, keys, values, scale=0.125, mask=None, group_size=32, bits=bits, scheme=SCHEME)


def test_attention_refuses_a_mask_that_does_not_fit_the_scores():
    # mlx's broadcast error came through untyped.
    c, q, keys, values = _attention_args(L=2)
    for shape in ((1, 1, 2, 78), (1, 3, 2, 75), (2, 1, 2, 75, 1)):
        with pytest.raises(kvcore.CacheValueError) as e:
            kvcore.quantized_scaled_dot_product_attention(
                q, keys, values, scale=0.125, mask=mx.ones(shape, mx.bool_), group_size=32, bits=4,
                scheme=SCHEME)
        assert str(e.value) == ("[quantized_attention] expected a mask that broadcasts to (B, n_q_heads, "
                                f"L, N) (1, 4, 2, 75) but got shape {tuple(shape)}".replace(",)", ")"))


@pytest.mark.parametrize("scheme", ["affine", SCHEME])
def test_attention_takes_a_mask_per_query_head_with_grouped_heads(scheme):
    # A (B, n_q_heads, L, N) mask did not broadcast against the grouped
    # (B, n_kv_heads, repeats, L, N) scores.
    extra = {"scheme": scheme, "window": 5} if scheme == SCHEME else {}
    c = kvcore.QuantizedKVCache(group_size=32, bits=4, **extra)
    keys, values = c.update_and_fetch(*kv(S=75))
    q = mx.random.normal((1, 4, 2, 64), key=mx.random.key(3))
    mask = mx.random.uniform(shape=(1, 4, 2, 75), key=mx.random.key(4)) > 0.3
    mask[..., 0] = True
    got = kvcore.quantized_scaled_dot_product_attention(
        q, keys, values, scale=0.125, mask=mask, group_size=32, bits=4, scheme=scheme)
    for h in range(4):
        one = kvcore.quantized_scaled_dot_product_attention(
            q[:, h:h + 1], tuple(a[:, h // 2:h // 2 + 1] if a is not None else None for a in keys),
            tuple(a[:, h // 2:h // 2 + 1] if a is not None else None for a in values), scale=0.125,
            mask=mask[:, h:h + 1], group_size=32, bits=4, scheme=scheme)
        assert mx.allclose(got[:, h:h + 1], one, atol=1e-5).item(), h


def test_an_update_of_float_tokens_past_the_memory_limit_is_refused(memory_limit):
    # Only the growth of the quantized buffers was checked: an update that
    # quantizes nothing (all of it inside the window) took 4 GiB of float
    # tokens, lazily, and the cache held them.
    c = new(window=2**20)
    c.update_and_fetch(*kv(S=3))
    before = c.state
    big = mx.zeros((1, 2, 2**20 * 4, 64))  # lazy: never evaluated
    with pytest.raises(kvcore.CacheValueError) as e:
        c.update_and_fetch(big, big)
    assert str(e.value).startswith(
        "[QuantizedKVCache.update_and_fetch] expected an allocation within mlx's memory limit of "
        f"{1 << 30} bytes")
    assert f"but got {3 + 2**22} float tokens of " in str(e.value)
    _assert_same_state(c, kvcore.QuantizedKVCache.from_state(before))
    c.update_and_fetch(*kv(S=2))
    assert c.offset == 5
