"""QuantizedRotatingKVCache(scheme="rotated-channel"): a sliding window on the
rotated-channel scheme.

Keys are quantized in groups of `group_size` tokens, so tokens cannot leave
one at a time: the cache holds a rotated-channel QuantizedKVCache of the
tokens at positions [0, P) (P: keep rounded up to whole key groups) and the
newest tokens; whole quantized groups the window has left behind are dropped
once they add up to max(G, max_size / 8 in whole groups); make_mask hides the
held tokens a float RotatingKVCache(max_size, keep) fed the same updates
would no longer hold.

Checked against the float ring: attention equal to its attention where
nothing is quantized (a float window of 2**20 tokens), equal to attention
over the held tokens dequantized where groups are quantized and dropped, and
near the ring's at 8 bits; dropping by the rule, exactly; states, files and
copies bit for bit; typed errors that change nothing."""

import copy

import mlx.core as mx
import pytest
from conftest import assert_arrays_equal, assert_masks_equal, assert_states_equal
from test_quant_scheme import SCHEME, dequantized, eq, rot
from test_quant_sink import with_sink

import kvcore
from kvcore._attention import scaled_dot_product_attention

FLOAT = 1 << 20  # a window that keeps every token in float (the largest taken)
# Prefill chunks (some longer than the windows below) among single-token decodes.
MIXED = [10, 30, 1, 1, 50, 1, 1, 1, 70, 1, 3, 1] + [1] * 20 + [150] + [1] * 5


def new(max_size=64, keep=4, bits=8, window=0, sink=0, group_size=32):
    return kvcore.QuantizedRotatingKVCache(max_size, keep, group_size, bits, scheme=SCHEME, window=window,
                                           sink=sink)


def steps(sizes, seed=0, H=2, n_q=4, D=64):
    """(queries, keys, values) for updates of sizes[i] tokens; grouped query
    heads (n_q per H)."""
    for i, S in enumerate(sizes):
        k = mx.random.key(seed * 100003 + i)
        kq, kk, kv_ = mx.random.split(k, 3)
        yield (mx.random.normal((1, n_q, S, D), key=kq), mx.random.normal((1, H, S, D), key=kk),
               mx.random.normal((1, H, S, D), key=kv_))


def float_attention(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)


def attention(q, keys, values, cache, mask):
    """mlx-lm's entry point as patch_mlx_lm routes it (the cache's scheme and sink)."""
    return scaled_dot_product_attention(q, keys, values, cache, scale=0.125, mask=mask)


def err(got, want):
    return mx.abs(got - want).max().item()


def close(got, want, tol=1e-5):
    """Equal up to float32 rounding, relative to the outputs' size."""
    return err(got, want) <= tol * (1 + mx.abs(want).max().item())


def flat(state):
    """A state with its (weights, scales, biases) triples spread out."""
    out = []
    for x in state:
        out.extend(x if isinstance(x, tuple) else (x,))
    return tuple(out)


def assert_same_cache(a, b, what="cache"):
    assert_states_equal(flat(a.state), flat(b.state), what)
    assert (a.offset, a._idx, a.dropped, a.keep, a.max_size, a.window, a.sink, a.nbytes) == (
        b.offset, b._idx, b.dropped, b.keep, b.max_size, b.window, b.sink, b.nbytes), what
    for x, y in ((a.sink_keys, b.sink_keys), (a.sink_values, b.sink_values)):
        assert (x is None) == (y is None), what
        if x is not None:
            assert_arrays_equal(x, y, what)


def run_beside_the_ring(q, sizes, *, seed=0, window_size=None, return_array=False, f=None, check=None):
    """Feed q and a float RotatingKVCache (f, or a new one of q's max_size and
    keep) the same updates; per update, check(step, N, offset before, the
    queries, q's output, q's mask, the ring's output, the ring's mask, every
    key and value so far)."""
    f = f or kvcore.RotatingKVCache(q.max_size, q.keep)
    seen_k, seen_v = [], []
    for i, (x, k, v) in enumerate(steps(sizes, seed)):
        o, N = f.offset, k.shape[2]
        assert q.offset == o
        mf = f.make_mask(N, window_size=window_size, return_array=return_array)
        mq = q.make_mask(N, window_size=window_size, return_array=return_array)
        fk, fv = f.update_and_fetch(k, v)
        qk, qv = q.update_and_fetch(k, v)
        seen_k.append(k)
        seen_v.append(v)
        check(i, N, o, x, attention(x, qk, qv, q, mq), mq, float_attention(x, fk, fv, mf), mf,
              mx.concatenate(seen_k, axis=2), mx.concatenate(seen_v, axis=2))
    return f


# -- attention against the float ring


@pytest.mark.parametrize("return_array", [False, True])
@pytest.mark.parametrize("max_size, keep, group", [(64, 0, 32), (64, 4, 32), (50, 3, 32), (40, 4, 64),
                                                   (7, 2, 32), (1, 0, 32)])
def test_with_every_token_in_float_attention_is_the_float_rings(max_size, keep, group, return_array):
    q = new(max_size, keep, window=FLOAT, group_size=group)

    def check(i, N, o, x, got, mq, want, mf, *_):
        if o <= max_size - 1:
            # Nothing has left the ring: its own mask (None, "causal", an array).
            assert_masks_equal(mf, mq, f"update {i} at offset {o}")
        assert close(got, want), (i, N, o, err(got, want))

    run_beside_the_ring(q, MIXED, return_array=return_array, check=check)
    # Nothing quantized, so nothing dropped: every token is still held.
    assert (q.offset, q._idx, q.dropped) == (sum(MIXED),) * 2 + (0,)
    assert q.keys_and_values()[0][1].shape[-1] == 0


@pytest.mark.parametrize("window_size", [5, 16])
def test_a_narrower_window_size_attends_as_the_float_ring(window_size):
    q = new(64, 0, window=FLOAT)

    def check(i, N, o, x, got, mq, want, mf, keys, values):
        assert close(got, want), (i, N, o, err(got, want))

    run_beside_the_ring(q, MIXED, window_size=window_size, check=check)


@pytest.mark.parametrize("window_size", [5, 16])
def test_one_token_under_a_narrower_window_size_attends_the_newest_tokens_with_keep(window_size):
    # With keep > 0 mlx-lm's float ring rolls its one-token window mask over
    # the pinned slots too; the cache states the window's meaning instead:
    # the newest window_size tokens. Several tokens: the float ring's masks.
    q = new(64, 4, window=FLOAT)

    def check(i, N, o, x, got, mq, want, mf, keys, values):
        if N == 1 and o >= window_size:
            want = float_attention(x, keys[:, :, -window_size:], values[:, :, -window_size:], None)
        assert close(got, want), (i, N, o, err(got, want))

    run_beside_the_ring(q, MIXED, window_size=window_size, check=check)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("keep, sink", [(0, 0), (4, 0), (4, 2), (4, 4)])
def test_quantized_attention_is_attention_over_the_held_tokens_dequantized(keep, sink, bits):
    q = new(64, keep, bits=bits, window=0, sink=sink)

    def check(i, N, o, x, got, mq, *_):
        dk, dv = with_sink(q)  # the held tokens, the sink's from its float copies
        assert dk.shape[2] == q._idx
        want = float_attention(x, dk, dv, mq)
        assert close(got, want), (i, N, o, err(got, want))

    run_beside_the_ring(q, MIXED + [1] * 60, seed=1, check=check)
    assert q.dropped > 0 and q.dropped % 32 == 0


@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("keep, sink", [(0, 0), (4, 0), (4, 1)])
def test_at_8_bits_attention_stays_near_the_float_rings(keep, sink, window):
    q = new(64, keep, bits=8, window=window, sink=sink)
    worst = []

    def check(i, N, o, x, got, mq, want, *_):
        worst.append(err(got, want))

    run_beside_the_ring(q, MIXED + [1] * 60, seed=2, check=check)
    assert q.dropped > 0
    assert max(worst) < 0.05, max(worst)


# -- what is held and dropped


def rule(sizes, max_size, keep, G, window):
    """(offset, _idx, dropped) after each update, by the stated rule: before
    an update at offset o, the whole quantized groups after the pinned P
    tokens that lie below o - (max_size - 1 - keep) are dropped once they add
    up to max(G, max_size / 8 in whole groups); an update quantizes the whole
    groups older than the float window."""
    P = -(-keep // G) * G
    threshold = max(G, max_size // 8 // G * G)
    o = held = quantized = dropped = 0
    out = []
    for N in sizes:
        lo = o - (max_size - 1 - keep)
        n = min(lo, quantized + dropped) - (P + dropped)
        n = n // G * G if n > 0 else 0
        if n >= threshold:
            dropped, held, quantized = dropped + n, held - n, quantized - n
        o, held = o + N, held + N
        quantized = max(quantized, max(0, held - window) // G * G)
        out.append((o, held, dropped))
    return out


def test_groups_are_dropped_by_the_rule_worked_by_hand():
    # max_size 64, keep 4, groups of 32, window 0: P = 32; a group may go
    # once it lies below o - 59 (the ring's reach), and goes as soon as one
    # whole group (max(32, 64 / 8 -> 0 groups)) is out of reach.
    q = new(64, 4, bits=4, window=0)
    sizes = [100] + [1] * 100 + [100, 1]
    got = []
    for _, k, v in steps(sizes, seed=3):
        q.update_and_fetch(k, v)
        got.append((q.offset, q._idx, q.dropped))
    by_offset = {t[0]: t for t in got}
    # After the prefill of 100, positions [32, 64) fall out of reach at
    # o = 123 (123 - 59 = 64): dropped by the update at offset 123.
    assert by_offset[100] == (100, 100, 0)
    assert by_offset[123] == (123, 123, 0)
    assert by_offset[124] == (124, 92, 32)
    # Then one group every 32 tokens: [64, 96) at o = 155, [96, 128) at o = 187.
    assert by_offset[155] == (155, 123, 32)
    assert by_offset[156] == (156, 92, 64)
    assert by_offset[188] == (188, 92, 96)
    assert by_offset[200] == (200, 104, 96)
    # 100 tokens at o = 200: nothing below 141 past [0, 32) + [128, ...) is a
    # whole group, so they are all held; the next update drops the 3 groups
    # [128, 224) below 241.
    assert by_offset[300] == (300, 204, 96)
    assert by_offset[301] == (301, 109, 192)
    assert got == rule(sizes, 64, 4, 32, 0)


@pytest.mark.parametrize("max_size, keep, group, window, sizes", [
    (512, 0, 32, 0, [570] + [1] * 72),  # an eighth of 512 is 2 groups: drops of 64
    (64, 0, 32, 0, [10] + [1] * 150),
    (50, 3, 32, 16, MIXED + [1] * 40),
    (40, 33, 32, 5, [1] * 200),  # keep over a group: P = 64
    (200, 4, 64, 0, [300, 1, 1, 130] + [1] * 90),
])
def test_held_and_dropped_tokens_follow_the_rule(max_size, keep, group, window, sizes):
    q = new(max_size, keep, bits=4, window=window, group_size=group)
    got = []
    for _, k, v in steps(sizes, seed=4, H=1):
        q.update_and_fetch(k, v)
        got.append((q.offset, q._idx, q.dropped))
    assert got == rule(sizes, max_size, keep, group, window)
    assert q.dropped > 0


@pytest.mark.parametrize("max_size, keep, window", [(64, 4, 0), (64, 0, 16), (256, 4, 40)])
def test_bytes_stay_bounded_as_the_offset_grows(max_size, keep, window):
    G = 32
    P = -(-keep // G) * G
    bound = P + max_size + max(G, max_size // 8) + G + window
    # The most bytes a rotated-channel QuantizedKVCache holds on its way to
    # that many tokens, one at a time (its buffers grow in steps).
    grown = kvcore.QuantizedKVCache(G, 4, scheme=SCHEME, window=window)
    one, most = mx.zeros((1, 2, 1, 64)), 0
    for _ in range(bound):
        grown.update_and_fetch(one, one)
        most = max(most, grown.nbytes)
    q = new(max_size, keep, bits=4, window=window)
    q.update_and_fetch(*next(steps([max_size]))[1:])
    peaks = [0, 0]  # the most bytes over the first 350 decodes and over the next 350
    for i, (_, k, v) in enumerate(steps([1] * 700, seed=5)):
        q.update_and_fetch(k, v)
        assert q._idx <= bound, (q.offset, q._idx, bound)
        assert q.nbytes <= most, (q.offset, q.nbytes, most)
        peaks[i >= 350] = max(peaks[i >= 350], q.nbytes)
    assert q.offset == max_size + 700 and q.dropped > 0
    assert peaks[1] <= peaks[0]


# -- from a float ring


PREFILLS = [[10], [100], [100, 1, 1, 1], [30, 1, 1, 60, 1], [300]]


@pytest.mark.parametrize("pre", PREFILLS)
def test_to_quantized_of_a_ring_continues_as_the_ring(pre):
    after = [1] * 70 + [20] + [1] * 5
    for window, bound in ((FLOAT, None), (0, 0.05)):
        f = kvcore.RotatingKVCache(64, 4)
        for _, k, v in steps(pre, seed=6):
            f.update_and_fetch(k, v)
        q = f.to_quantized(group_size=32, bits=8, scheme=SCHEME, window=window)
        assert type(q) is kvcore.QuantizedRotatingKVCache and q.scheme == SCHEME and q.window == window
        assert (q.offset, q.keep, q.max_size, q.bits, q.group_size) == (f.offset, 4, 64, 8, 32)
        assert q._idx + q.dropped == q.offset and q.dropped % 32 == 0
        worst = []

        def check(i, N, o, x, got, mq, want, *_):
            if bound is None:
                assert close(got, want), (window, i, N, o, err(got, want))
            worst.append(err(got, want))

        run_beside_the_ring(q, after, seed=7, f=f, check=check)
        if bound is not None:
            assert max(worst) < bound, (window, max(worst))


@pytest.mark.parametrize("window", [128, FLOAT])
def test_to_quantized_of_a_wrapped_ring_under_a_wide_window(window):
    # The ring holds its 4 pinned and newest 60 of 201 tokens: positions
    # [32, 128) are gone. (mlx-lm's generate_step meets this with the
    # default window: max_kv_size=64, quantized_kv_start=150, prefill_step_size=16.)
    f = kvcore.RotatingKVCache(64, 4)
    for _, k, v in steps([200, 1], seed=18):
        f.update_and_fetch(k, v)
    q = f.to_quantized(group_size=32, bits=8, scheme=SCHEME, window=window)
    assert q.offset == 201 and q._idx + q.dropped == 201

    def check(i, N, o, x, got, mq, want, *_):
        assert close(got, want), (i, N, o, err(got, want))

    run_beside_the_ring(q, [1] * 10 + [20], seed=19, f=f, check=check)


def test_to_quantized_of_a_ring_that_has_not_wrapped_holds_what_a_cache_fed_its_tokens_holds():
    for pre in ([10], [30, 1, 1, 20], [63]):
        f, fed = kvcore.RotatingKVCache(64, 4), new(64, 4, bits=4, window=5, sink=2)
        for _, k, v in steps(pre, seed=8):
            f.update_and_fetch(k, v)
            fed.update_and_fetch(k, v)
        q = f.to_quantized(group_size=32, bits=4, scheme=SCHEME, window=5, sink=2)
        assert_same_cache(q, fed, f"to_quantized after {pre}")


def test_to_quantized_of_an_empty_ring_is_an_empty_cache():
    q = kvcore.RotatingKVCache(16, 2).to_quantized(group_size=32, bits=4, scheme=SCHEME, window=0, sink=2)
    assert q.empty() and (q.offset, q._idx, q.dropped, q.sink, q.keep) == (0, 0, 0, 2, 2)
    assert q.keys is None and q.sink_keys is None


# -- the sink


@pytest.mark.parametrize("sink", [1, 4])
def test_the_sink_holds_the_first_tokens_rotated_through_drops(sink):
    sizes = [40] + [1] * 200
    q = new(64, 4, bits=3, window=0, sink=sink)
    alone = kvcore.QuantizedKVCache(group_size=32, bits=3, scheme=SCHEME, window=0, sink=sink)
    first = None
    for i, (_, k, v) in enumerate(steps(sizes, seed=9)):
        q.update_and_fetch(k, v)
        if i == 0:
            alone.update_and_fetch(k, v)
            first = k, v
            eq(q.sink_keys, alone.sink_keys)
            eq(q.sink_values, alone.sink_values)
    assert q.dropped >= 128
    eq(q.sink_keys, alone.sink_keys)
    eq(q.sink_values, alone.sink_values)
    eq(q.sink_keys, rot(first[0][:, :, :sink]))
    # A wrapped ring keeps its first keep tokens: to_quantized takes the sink from them.
    f = kvcore.RotatingKVCache(64, 4)
    for _, k, v in steps(sizes, seed=9):
        f.update_and_fetch(k, v)
    t = f.to_quantized(group_size=32, bits=3, scheme=SCHEME, window=0, sink=sink)
    eq(t.sink_keys, alone.sink_keys)
    eq(t.sink_values, alone.sink_values)


# -- states, files and copies


def filled(sink=0, window=8, sizes=(50,) + (1,) * 100):
    q = new(64, 4, bits=4, window=window, sink=sink)
    for _, k, v in steps(list(sizes), seed=10):
        q.update_and_fetch(k, v)
    return q


@pytest.mark.parametrize("sink", [0, 2])
def test_state_names_everything_and_round_trips_bit_for_bit(sink, tmp_path):
    q = filled(sink)
    st = q.state
    assert len(st) == (15 if sink else 12)
    assert st[2:10] == (150, 4, 64, q._idx, 32, 4, SCHEME, 8)
    assert q.dropped == 150 - q._idx > 0
    (kw, ks, kb, r), (vw, vs, vb, rv) = q.keys_and_values()
    # The held buffers, spare room included: keys' tokens on the last axis, values' on the third.
    for got, want in zip(st[0], (kw, ks, kb)):
        eq(got[..., :want.shape[-1]], want)
    for got, want in zip(st[1], (vw, vs, vb)):
        eq(got[:, :, :want.shape[2]], want)
    eq(st[10], r)
    eq(st[11], rv)
    if sink:
        assert st[12] == sink
        eq(st[13], q.sink_keys)
        eq(st[14], q.sink_values)
    path = str(tmp_path / "c.safetensors")
    kvcore.save_prompt_cache(path, [q, filled(sink, window=0)])
    loaded = kvcore.load_prompt_cache(path)
    copies = {
        "from_state": kvcore.QuantizedRotatingKVCache.from_state(st),
        "file": loaded[0],
        "deepcopy": copy.deepcopy(q),
        "copy": copy.copy(q),
    }
    set_state = new(8, 0, bits=8, window=0)
    set_state.state = st
    copies["state ="] = set_state
    for what, c in copies.items():
        assert type(c) is kvcore.QuantizedRotatingKVCache and c.scheme == SCHEME, what
        assert_same_cache(c, q, what)
    assert_same_cache(loaded[1], filled(sink, window=0), "file's second cache")
    # Each continues as the original does, bit for bit.
    more = list(steps([1, 1, 70] + [1] * 40, seed=11))
    outs = {}
    for what, c in [("original", q)] + list(copies.items()):
        outs[what] = []
        for x, k, v in more:
            m = c.make_mask(k.shape[2])
            kk, vv = c.update_and_fetch(k, v)
            outs[what].append((m, attention(x, kk, vv, c, m)))
    for what in copies:
        for (m1, a1), (m2, a2) in zip(outs[what], outs["original"]):
            assert_masks_equal(m2, m1, what)
            assert_arrays_equal(a1, a2, what)
        assert_same_cache(copies[what], q, what + " after the same updates")


def test_copies_are_independent():
    q = filled(2)
    before = flat(q.state)
    c = copy.deepcopy(q)
    c.update_and_fetch(*next(steps([40], seed=12))[1:])
    assert_states_equal(before, flat(q.state))
    assert c.offset == q.offset + 40


# -- typed errors that change nothing


def assert_refused(c, call, error, message):
    before, offset = flat(c.state), c.offset
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == message
    assert c.offset == offset
    assert_states_equal(before, flat(c.state), "after the refused call")


def test_a_sink_past_keep_is_refused():
    with pytest.raises(kvcore.CacheValueError) as e:
        new(64, 4, sink=5)
    assert str(e.value) == ("[QuantizedRotatingKVCache] expected a sink within keep (4 tokens) on a "
                            "sliding window but got sink 5")
    f = kvcore.RotatingKVCache(64, 2)
    f.update_and_fetch(*next(steps([100]))[1:])
    with pytest.raises(kvcore.CacheValueError) as e:
        f.to_quantized(group_size=32, bits=4, scheme=SCHEME, sink=3)
    assert str(e.value) == ("[QuantizedRotatingKVCache] expected a sink within keep (2 tokens) on a "
                            "sliding window but got sink 3")
    assert f.offset == 100


def test_affine_takes_no_window_or_sink():
    for kw, message in ((dict(sink=1), "expected no sink for the affine scheme but got sink 1"),
                        (dict(window=3), "expected no window for the affine scheme but got window 3")):
        with pytest.raises(kvcore.CacheValueError) as e:
            kvcore.QuantizedRotatingKVCache(64, 4, 32, 4, **kw)
        assert str(e.value) == "[QuantizedRotatingKVCache] " + message


def test_a_state_whose_offset_is_below_its_held_tokens_is_refused():
    q = filled()
    for offset in (117, 0):
        s = list(q.state)
        s[2] = offset
        message = ("[QuantizedRotatingKVCache.state] expected an offset of the 118 held tokens plus tokens "
                   f"the window of 64 (keep 4) has left behind but got offset {offset}")
        assert_refused(q, lambda: setattr(q, "state", tuple(s)), kvcore.CacheValueError, message)
        assert_refused(q, lambda: kvcore.QuantizedRotatingKVCache.from_state(tuple(s)),
                       kvcore.CacheValueError, message)


def test_dropped_tokens_need_not_be_whole_groups():
    # A batch row extracted, or a float ring converted, may have lost any
    # number of tokens: the held ones keep their own groups.
    q = filled()
    s = list(q.state)
    s[2] = 151
    ok = kvcore.QuantizedRotatingKVCache.from_state(tuple(s))
    assert (ok.offset, ok._idx, ok.dropped) == (151, 118, 33)


def test_a_state_whose_dropped_tokens_are_still_in_reach_is_refused():
    # 64 tokens held, none dropped: an offset of 96 says [32, 64) were
    # dropped, but a ring at 96 still holds positions from 37 on.
    q = new(64, 4, bits=4, window=0)
    q.update_and_fetch(*next(steps([64], seed=13))[1:])
    s = list(q.state)
    s[2] = 96
    message = ("[QuantizedRotatingKVCache.state] expected an offset of the 64 held tokens plus tokens "
               "the window of 64 (keep 4) has left behind but got offset 96")
    assert_refused(q, lambda: setattr(q, "state", tuple(s)), kvcore.CacheValueError, message)
    # Whatever the offset: the ring holds 59 tokens past the pinned, 64 held
    # tokens leave only 32 of them.
    s[2] = 128
    message = message.replace("offset 96", "offset 128")
    assert_refused(q, lambda: kvcore.QuantizedRotatingKVCache.from_state(tuple(s)), kvcore.CacheValueError,
                   message)
    # Out of reach, whole groups: a state like any. 118 held tokens after
    # 150, [32, 64) dropped; at 182 [32, 96) dropped, and the ring holds 123 on.
    q = filled()
    s = list(q.state)
    s[2] = 182
    ok = kvcore.QuantizedRotatingKVCache.from_state(tuple(s))
    assert (ok.offset, ok._idx, ok.dropped) == (182, 118, 64)


def test_a_state_holding_no_token_past_the_pinned_ones_is_refused():
    # 32 held tokens are the pinned group alone: tokens dropped after it
    # would leave the newest ones nowhere.
    q = new(64, 4, bits=4, window=FLOAT)
    q.update_and_fetch(*next(steps([32], seed=14))[1:])
    s = list(q.state)
    s[2] = 32 + 320
    message = ("[QuantizedRotatingKVCache.state] expected an offset of the 32 held tokens plus tokens "
               "the window of 64 (keep 4) has left behind but got offset 352")
    assert_refused(q, lambda: setattr(q, "state", tuple(s)), kvcore.CacheValueError, message)


def test_a_state_with_float_tokens_after_dropped_groups_is_taken():
    # Under a wide float window nothing is quantized, yet groups past the
    # pinned ones may be gone (to_quantized of a wrapped ring holds this).
    q = new(64, 4, bits=4, window=FLOAT)
    q.update_and_fetch(*next(steps([100], seed=14))[1:])
    s = list(q.state)
    s[2] = 100 + 64
    q.state = tuple(s)
    assert (q.offset, q._idx, q.dropped) == (164, 100, 64)


def test_trim_after_rotation_is_refused_and_before_it_trims():
    q = filled()
    assert not q.is_trimmable()
    assert_refused(q, lambda: q.trim(1), kvcore.CacheRuntimeError,
                   "[QuantizedRotatingKVCache.trim] expected offset < max_size (nothing rotated out yet) "
                   "but got offset 150 with max_size 64")
    assert q.trim(0) == 0
    c = new(64, 4, bits=4, window=0)
    k, v = next(steps([40], seed=15))[1:]
    c.update_and_fetch(k, v)
    assert c.is_trimmable() and c.trim(10) == 10 and (c.offset, c._idx) == (30, 30)
    # As the QuantizedKVCache it holds: the group trimmed into goes back to float.
    plain = kvcore.QuantizedKVCache(32, 4, scheme=SCHEME, window=0)
    plain.update_and_fetch(k, v)
    plain.trim(10)
    for a, b in zip(c.keys_and_values(), plain.keys_and_values()):
        for x, y in zip(a, b):
            eq(x, y)


def test_a_merge_of_other_window_sizes_is_refused():
    q, other = filled(), new(32, 0, bits=4, window=0)
    other.update_and_fetch(*next(steps([10], seed=16))[1:])
    assert_refused(q, lambda: kvcore.QuantizedRotatingKVCache.merge([q, other]), kvcore.CacheValueError,
                   "[QuantizedBatchRotatingKVCache.merge] expected caches of one scheme and max_size: "
                   "rotated-channel, 64 but got rotated-channel, 32")


@pytest.mark.parametrize("D, dtype", [(32, mx.float32), (128, mx.float32), (64, mx.float16)])
def test_an_update_unlike_the_cache_is_refused(D, dtype):
    # (The held QuantizedKVCache names itself.)
    q = filled()
    k = mx.zeros((1, 2, 1, D), dtype)
    assert_refused(q, lambda: q.update_and_fetch(k, k), kvcore.CacheValueError,
                   "[QuantizedRotatingKVCache.update_and_fetch] expected keys (B, H, S, D) (1, 2, 1, 64) of dtype "
                   f"float32 and values of head dim 64 but got (1, 2, 1, {D}) {str(dtype).split('.')[-1]}, "
                   f"values (1, 2, 1, {D})")


def test_an_update_refused_when_groups_are_due_to_drop_drops_nothing():
    # The drop is staged with the update: a refused update leaves the
    # groups that were due to go.
    q = new(64, 4, bits=4, window=0)
    for _, k, v in steps([100] + [1] * 22, seed=16):
        q.update_and_fetch(k, v)
    assert (q.offset, q._idx, q.dropped) == (122, 122, 0)
    k, v = next(steps([1], seed=17))[1:]
    q.update_and_fetch(k, v)
    assert (q.offset, q._idx, q.dropped) == (123, 123, 0)  # the next update drops [32, 64)
    bad = mx.zeros((1, 2, 1, 32))
    with pytest.raises(kvcore.CacheValueError):
        q.update_and_fetch(bad, bad)
    assert (q.offset, q._idx, q.dropped) == (123, 123, 0)
    q.update_and_fetch(k, v)
    assert (q.offset, q._idx, q.dropped) == (124, 92, 32)


# -- mlx-lm's generate_step


@pytest.fixture(scope="module")
def qwen():
    from mlx_lm.models import qwen2
    from test_quantized_generate import QWEN, build

    return build(qwen2, QWEN, 99)  # weights scaled up: varied greedy tokens


def generate(model, **kw):
    from mlx_lm.generate import generate_step

    cache = kvcore.make_prompt_cache(model, max_kv_size=32)
    prompt = mx.random.randint(0, 128, (70,), key=mx.random.key(1))
    out = []
    for (tok, logprobs), _ in zip(generate_step(prompt, model, prompt_cache=cache, max_tokens=30, **kw),
                                  range(30)):
        out.append((tok, logprobs))
    return out, cache


@pytest.mark.parametrize("prefill_step_size", [2048, 16])
def test_generate_step_with_max_kv_size_quantizes_to_the_rotating_scheme(qwen, prefill_step_size):
    from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

    quantize = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0, prefill_step_size=prefill_step_size)
    patch_mlx_lm(kv_scheme=SCHEME)  # the float window (128) holds every token here
    try:
        want, float_cache = generate(qwen, prefill_step_size=prefill_step_size)
        got, cache = generate(qwen, **quantize)
    finally:
        unpatch_mlx_lm()
    assert [type(c).__name__ for c in float_cache] == ["RotatingKVCache"] * 2
    assert all(type(c) is kvcore.QuantizedRotatingKVCache and c.scheme == SCHEME and c.window == 128
               and (c.keep, c.max_size, c.offset, c.dropped) == (4, 32, 100, 0) for c in cache)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert len({t for t, _ in want}) >= 10
    for (_, a), (_, b) in zip(got, want):
        assert close(a, b, 1e-4)
    patch_mlx_lm(kv_scheme=SCHEME, kv_window=0, kv_sink=1)
    try:
        got, cache = generate(qwen, **quantize)
    finally:
        unpatch_mlx_lm()
    assert all(type(c) is kvcore.QuantizedRotatingKVCache and c.scheme == SCHEME and
               (c.window, c.sink, c.offset, c.dropped) == (0, 1, 100, 32) for c in cache)
    # Quantized to 8 bits (the model's scaled weights magnify the error):
    # the float run's first tokens.
    assert [t for t, _ in got][:8] == [t for t, _ in want][:8]


# -- settings the commands and mlx-lm's generate_step choose


def test_generate_steps_quantizer_keeps_a_sink_within_each_windows_keep():
    # A model's own sliding windows (gemma3's) keep no first token: the
    # commands' sink of 1 is dropped for them, not refused half-way.
    from kvcore._mlx_lm import quantizer

    caches = [kvcore.KVCache(), kvcore.RotatingKVCache(max_size=128, keep=0),
              kvcore.RotatingKVCache(max_size=128, keep=4)]
    k = mx.zeros((1, 2, 300, 64))
    for c in caches:
        c.update_and_fetch(k, k)
    quantizer(SCHEME, window=16, sink=1)(caches, quantized_kv_start=0, kv_group_size=(32, 64), kv_bits=4)
    assert [(type(c).__name__, c.scheme, c.sink) for c in caches] == [
        ("QuantizedKVCache", SCHEME, 1), ("QuantizedRotatingKVCache", SCHEME, 0),
        ("QuantizedRotatingKVCache", SCHEME, 1)]


def test_an_empty_update_keeps_a_state_that_restores():
    # keep = max_size - 1: a drop at an empty update would leave the pinned
    # group alone.
    q = kvcore.QuantizedRotatingKVCache(2, 1, 32, 4, scheme=SCHEME, window=0)
    q.update_and_fetch(mx.zeros((1, 2, 96, 64)), mx.zeros((1, 2, 96, 64)))
    q.update_and_fetch(mx.zeros((1, 2, 0, 64)), mx.zeros((1, 2, 0, 64)))
    assert (q.offset, q._idx, q.dropped) == (96, 96, 0)
    back = kvcore.QuantizedRotatingKVCache.from_state(q.state)
    assert (back.offset, back._idx, back.dropped) == (96, 96, 0)
    q.update_and_fetch(mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64)))
    assert (q.offset, q._idx, q.dropped) == (97, 33, 64)


def test_an_offset_past_two_to_the_thirty_is_refused():
    q = filled()
    s = list(q.state)
    s[2] = 2**31 - 1
    assert_refused(q, lambda: setattr(q, "state", tuple(s)), kvcore.CacheValueError,
                   "[QuantizedRotatingKVCache.state] expected offset in [0, 1073741824] but got "
                   "2147483647")


def test_the_dequantizing_path_takes_an_additive_mask_in_another_dtype():
    # On CUDA attention dequantizes and runs one fused attention: a float32
    # additive mask with float16 queries is cast, as the kernel path adds it.
    q = new(64, 4, bits=8, window=0)
    k = mx.random.normal((1, 2, 100, 64)).astype(mx.float16)
    keys, values = q.update_and_fetch(k, k)
    queries = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
    mask = mx.where(mx.arange(q._idx) % 3 == 0, -1e4, 0.0).astype(mx.float32)
    out = {}
    try:
        for mode in ("kernel", "dequantize"):
            kvcore.set_quantized_matmul(mode)
            out[mode] = scaled_dot_product_attention(queries, keys, values, q, 0.125, mask)
    finally:
        kvcore.set_quantized_matmul("auto")
    assert out["dequantize"].dtype == mx.float16
    assert mx.allclose(out["dequantize"], out["kernel"], atol=5e-3).item()
