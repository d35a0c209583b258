"""QuantizedBatchRotatingKVCache(scheme="rotated-channel"): a batch of sliding
windows on the rotated-channel scheme.

The batch holds the engine of QuantizedBatchKVCache's scheme (key groups
along buffer positions shared by all rows, the newest positions in float).
Whole quantized groups below _idx - (max_size - 1), out of every later
query's window, are dropped from the front once they add up to max(G,
max_size / 8 in whole groups), never while right padding from prepare waits
for finalize: every row's left padding falls by as many (below 0 once its
first tokens are gone), offsets stay (RoPE), _idx falls and _offset keeps
counting. make_mask windows each row over the held positions as a float
BatchRotatingKVCache's mask does.

Checked against a float kvcore.BatchRotatingKVCache fed the same updates and
against each row's own sliding window over its tokens (`Rows` below: a query
at a row's position p attends that row's tokens in (p - max_size, p]):
attention equal where nothing is quantized (a float window of 2**20), equal
to attention over the held positions dequantized and near the float batch at
8 bits where groups are quantized and dropped; the bookkeeping by the rule,
exactly; merge, extract, filter, extend, prepare/finalize and to_quantized
against the float batch's; states, files and copies bit for bit; typed errors
that change nothing; mlx-lm's BatchGenerator.

Only the rows' real queries are compared (a query at a pad position attends
nothing real). One difference is by design of the float batch, not of this
cache: a multi-token update after the float ring has wrapped by single
tokens masks one more of the oldest tokens of a row whose padding is still
in the ring (mlx-lm's BatchRotatingKVCache does the same: its mask is made
before the update trims the ring); there the float batch is not compared,
the rows' own windows are (test_a_chunk_after_single_tokens_wrapped_the_ring_sees_the_rows_window)."""

import copy

import mlx.core as mx
import pytest
from conftest import assert_arrays_equal, assert_masks_equal, assert_states_equal
from test_quant_scheme import SCHEME, dequantized
from test_quant_scheme_rotating import FLOAT, MIXED, attention, close, err, flat, float_attention

import kvcore

G, H, D, NQ = 32, 2, 64, 4
LP = [0, 5, 17]
QBR = kvcore.QuantizedBatchRotatingKVCache


def new(max_size=64, left_padding=LP, bits=8, window=0, group_size=G):
    return QBR(max_size, list(left_padding), group_size, bits, scheme=SCHEME, window=window)


def steps(B, sizes, seed=0):
    """(queries, keys, values) for updates of sizes[i] positions of B rows;
    NQ query heads over H key heads."""
    for i, S in enumerate(sizes):
        kq, kk, kv_ = mx.random.split(mx.random.key(seed * 100003 + i), 3)
        yield (mx.random.normal((B, NQ, S, D), key=kq), mx.random.normal((B, H, S, D), key=kk),
               mx.random.normal((B, H, S, D), key=kv_))


def tokens(n, seed):
    """keys and values of n tokens of one sequence."""
    kk, kv_ = mx.random.split(mx.random.key(7919 * seed + 1), 2)
    return mx.random.normal((1, H, n, D), key=kk), mx.random.normal((1, H, n, D), key=kv_)


class Rows:
    """Each row's own tokens (pad positions left out) and the attention of
    a sliding window of max_size over them: the reference every batch here
    is held to."""

    def __init__(self, max_size, left_padding=(), history=()):
        self.M = max_size
        self.keys = [k for k, _ in history] + [mx.zeros((1, H, 0, D)) for _ in left_padding]
        self.values = [v for _, v in history] + [mx.zeros((1, H, 0, D)) for _ in left_padding]
        self.pads = [0] * len(history) + list(left_padding)  # pad positions still to come
        self.room = None  # prepare's lengths: real tokens each row takes before its right padding
        self.last = None

    def __len__(self):
        return len(self.keys)

    def prepare(self, lengths=None, left_padding=None):
        if left_padding is not None:
            self.pads = [p + n for p, n in zip(self.pads, left_padding)]
        if lengths is not None:
            self.room = list(lengths)

    def finalize(self):
        self.room = None

    def filter(self, idx):
        self.keys, self.values = [self.keys[i] for i in idx], [self.values[i] for i in idx]
        self.pads = [self.pads[i] for i in idx]
        self.room = None if self.room is None else [self.room[i] for i in idx]

    def extend(self, other):
        self.keys, self.values, self.pads = (self.keys + other.keys, self.values + other.values,
                                             self.pads + other.pads)

    def row(self, i):
        return Rows(self.M, history=[(self.keys[i], self.values[i])])

    def feed(self, k, v):
        """An update of the batch; remembers where each row's real queries are."""
        self.last = []
        for r in range(len(self)):
            S = k.shape[2]
            skip = min(self.pads[r], S)
            self.pads[r] -= skip
            n = S - skip
            if self.room is not None:
                n = min(n, self.room[r])
                self.room[r] -= n
            before = self.keys[r].shape[2]
            self.keys[r] = mx.concatenate([self.keys[r], k[r:r + 1, :, skip:skip + n]], axis=2)
            self.values[r] = mx.concatenate([self.values[r], v[r:r + 1, :, skip:skip + n]], axis=2)
            self.last.append((skip, n, before))

    def attention(self, x, window_size=None):
        """Per row, (the update's real queries as a slice, their attention
        over the row's own window), or None for a row with none."""
        w = min(window_size or self.M, self.M)
        out = []
        for r, (skip, n, before) in enumerate(self.last):
            if n == 0:
                out.append(None)
                continue
            T = before + n
            p, kpos = mx.arange(before, T)[:, None], mx.arange(T)[None]
            mask = (kpos <= p) & (kpos > p - w)
            out.append((slice(skip, skip + n),
                        float_attention(x[r:r + 1, :, skip:skip + n], self.keys[r], self.values[r], mask)))
        return out


def quirk(f, N):
    """The float batch's mask for this update hides a real token (see the
    docstring): N > 1 after it wrapped by single tokens, a row still padded."""
    return (isinstance(f, kvcore.BatchRotatingKVCache) and N > 1 and f.rotated
            and max(f.left_padding.tolist()) > 0)


def run_beside(q, f, rows, sizes, *, seed=0, window_size=None, check):
    """Feed q, the float batch f (or None) and rows the same updates; per
    update check(i, N, x, q's output, q's mask, [(row, its real queries,
    q's answer, f's answer or None, the row's own window's)]). q and f may
    be single sliding windows (a batch of one row)."""
    B = q.offset.size if isinstance(q.offset, mx.array) else 1
    for i, (x, k, v) in enumerate(steps(B, sizes, seed)):
        N = k.shape[2]
        mq = q.make_mask(N, window_size=window_size)
        skip_f = quirk(f, N)
        mf = f.make_mask(N, window_size=window_size) if f is not None else None
        qk, qv = q.update_and_fetch(k, v)
        got = attention(x, qk, qv, q, mq)
        want = None
        if f is not None:
            fk, fv = f.update_and_fetch(k, v)
            if not skip_f:
                want = float_attention(x, fk, fv, mf)
        rows.feed(k, v)
        per_row = []
        for r, a in enumerate(rows.attention(x, window_size)):
            if a is not None:
                s, own = a
                per_row.append((r, s, got[r:r + 1, :, s], None if want is None else want[r:r + 1, :, s], own))
        check(i, N, x, got, mq, per_row)


def exact(what=""):
    """A check: every real query's attention equals the float batch's and
    its row's own window's (float32 rounding)."""
    def check(i, N, x, got, mq, per_row):
        for r, s, g, w, own in per_row:
            if w is not None:
                assert close(g, w), (what, i, N, r, err(g, w))
            assert close(g, own), (what, i, N, r, err(g, own))
    return check


def near(q, worst):
    """A check: attention equals float attention over the held positions
    dequantized, under q's own mask; its distance to the float batch and to
    the rows' windows goes to worst."""
    def check(i, N, x, got, mq, per_row):
        dk, dv = dequantized(q)
        assert dk.shape[2] == q._idx
        over = float_attention(x, dk, dv, mq)
        for r, s, g, w, own in per_row:
            assert close(g, over[r:r + 1, :, s]), (i, N, r, err(g, over[r:r + 1, :, s]))
            worst.extend(err(g, a) for a in (w, own) if a is not None)
    return check


def masks_before_the_ring_fills(q, f):
    """A check to run before each update: while nothing has left the float
    ring (_offset <= max_size - 1) both masks are the same array."""
    def check(N, window_size=None):
        if f._offset <= f.max_size - 1:
            assert_masks_equal(f.make_mask(N, window_size=window_size), q.make_mask(N, window_size=window_size),
                               f"make_mask({N}) at _offset {f._offset}")
    return check


# -- attention against the float batch


@pytest.mark.parametrize("max_size, group", [(64, 32), (50, 32), (64, 64), (7, 32)])
def test_with_every_position_in_float_attention_is_the_float_batchs(max_size, group):
    q, f = new(max_size, window=FLOAT, group_size=group), kvcore.BatchRotatingKVCache(max_size, LP)
    rows = Rows(max_size, LP)
    same_mask = masks_before_the_ring_fills(q, f)
    check = exact()

    def both(i, N, *a):
        check(i, N, *a)
        assert q.offset.tolist() == f.offset.tolist() and q._offset == f._offset, i

    for i, S in enumerate(MIXED):
        same_mask(S)
        run_beside(q, f, rows, [S], seed=i, check=both)
    # Nothing quantized, so nothing dropped: every position is still held.
    assert (q._idx, q._offset) == (sum(MIXED),) * 2 and q.left_padding.tolist() == LP
    assert q.offset.tolist() == [sum(MIXED) - p for p in LP]
    assert q.keys_and_values()[0][1].shape[-1] == 0 and q.rotated is False


@pytest.mark.parametrize("window_size", [5, 16])
def test_a_narrower_window_size_attends_as_the_float_batch(window_size):
    q, f = new(64, window=FLOAT), kvcore.BatchRotatingKVCache(64, LP)
    rows = Rows(64, LP)
    same_mask = masks_before_the_ring_fills(q, f)
    for i, S in enumerate(MIXED):
        same_mask(S, window_size)
        run_beside(q, f, rows, [S], seed=100 + i, window_size=window_size, check=exact(window_size))


# -- from a float batch


PREFILLS = [[10], [30, 1, 1, 20], [100], [100, 1, 1, 1], [40] + [1] * 40]


def float_batch(pre, seed=6, max_size=64, left_padding=LP):
    """A float BatchRotatingKVCache after updates of pre positions, and the
    rows' tokens."""
    f, rows = kvcore.BatchRotatingKVCache(max_size, list(left_padding)), Rows(max_size, left_padding)
    for _, k, v in steps(len(left_padding), pre, seed):
        f.update_and_fetch(k, v)
        rows.feed(k, v)
    return f, rows


@pytest.mark.parametrize("pre", PREFILLS)
@pytest.mark.parametrize("window", [FLOAT, 0])
def test_to_quantized_of_a_float_batch_continues_as_it(pre, window):
    f, rows = float_batch(pre)
    assert f.rotated == (sum(pre) > 64 and pre[-1] == 1)  # wrapped by single tokens, or not
    q = f.to_quantized(G, 8, scheme=SCHEME, window=window)
    assert type(q) is QBR and (q.scheme, q.window, q.max_size, q.group_size, q.bits) == (SCHEME, window, 64, G, 8)
    assert (q.rotated, q.sink, q.sink_keys, q.sink_values) == (False, 0, None, None)
    # The ring's positions oldest first; rows and _offset as the float batch's.
    assert q._idx == (64 if f.rotated else f._idx) and q._offset == f._offset
    assert q.offset.tolist() == f.offset.tolist() and q.left_padding.tolist() == f.left_padding.tolist()
    worst = []
    check = exact(pre) if window == FLOAT else near(q, worst)
    run_beside(q, f, rows, [1] * 70 + [20] + [1] * 5, seed=7, check=check)
    assert q.offset.tolist() == f.offset.tolist() and q._offset == f._offset
    if window == 0:
        assert q._offset > q._idx  # groups dropped
        assert max(worst) < 0.05, max(worst)


def test_to_quantized_of_an_empty_float_batch_is_an_empty_cache():
    f = kvcore.BatchRotatingKVCache(16, [2, 0])
    q = f.to_quantized(G, 4, scheme=SCHEME, window=0)
    assert q.empty() and q.keys is None and (q._idx, q._offset) == (0, 0)
    assert q.offset.tolist() == [-2, 0] and q.left_padding.tolist() == [2, 0]


# -- quantized and dropped groups


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_is_attention_over_the_held_positions_dequantized(bits):
    q, worst = new(64, bits=bits, window=0), []
    run_beside(q, None, Rows(64, LP), MIXED + [1] * 60, seed=1, check=near(q, worst))
    assert q._offset - q._idx > 0 and (q._offset - q._idx) % G == 0
    assert q.left_padding.tolist() == [p - (q._offset - q._idx) for p in LP]


@pytest.mark.parametrize("window", [0, 16])
def test_at_8_bits_attention_stays_near_the_float_batchs(window):
    q, f = new(64, bits=8, window=window), kvcore.BatchRotatingKVCache(64, LP)
    worst = []
    run_beside(q, f, Rows(64, LP), MIXED + [1] * 60, seed=2, check=near(q, worst))
    assert q._offset > q._idx and q.offset.tolist() == f.offset.tolist()
    assert max(worst) < 0.05, max(worst)


def rule(sizes, max_size, G, window):
    """(_offset, _idx) after each update, by the stated rule: before an
    update at _idx i, the whole quantized groups below i - (max_size - 1) are
    dropped once they add up to max(G, max_size / 8 in whole groups); an
    update quantizes the whole groups older than the float window."""
    threshold = max(G, max_size // 8 // G * G)
    idx = quantized = dropped = 0
    out = []
    for N in sizes:
        n = max(0, min(idx - (max_size - 1), quantized)) // G * G
        if n >= threshold:
            idx, quantized, dropped = idx - n, quantized - n, dropped + n
        idx += N
        quantized = max(quantized, max(0, idx - window) // G * G)
        out.append((idx + dropped, idx))
    return out


def test_positions_are_dropped_by_the_rule_worked_by_hand():
    # max_size 64, groups of 32, window 0: a group may go once it lies
    # below _idx - 63, and goes as soon as one whole group (max(32, 64 / 8
    # -> 0 groups)) is out of reach.
    q = new(64, bits=4, window=0)
    sizes = [100] + [1] * 100 + [100, 1]
    got = {}
    for _, k, v in steps(3, sizes, seed=3):
        q.update_and_fetch(k, v)
        got[q._offset] = (q._idx, q.offset.tolist(), q.left_padding.tolist())
    # The prefill of 100 quantizes [0, 96); the next update drops [0, 32)
    # (below 100 - 63 = 37): every row loses its first 32 positions.
    assert got[100] == (100, [100, 95, 83], [0, 5, 17])
    assert got[101] == (69, [101, 96, 84], [-32, -27, -15])
    # Then one group every 32 positions: before the update at _offset 127
    # (_idx 95) [32, 64) lies below 95 - 63.
    assert got[127] == (95, [127, 122, 110], [-32, -27, -15])
    assert got[128] == (64, [128, 123, 111], [-64, -59, -47])
    assert got[160] == (64, [160, 155, 143], [-96, -91, -79])
    assert got[192] == (64, [192, 187, 175], [-128, -123, -111])
    assert got[200] == (72, [200, 195, 183], [-128, -123, -111])
    # 100 positions at _idx 72: nothing below 9 is a whole group, so all are
    # held; the next update drops the 3 groups below 172 - 63 = 109.
    assert got[300] == (172, [300, 295, 283], [-128, -123, -111])
    assert got[301] == (77, [301, 296, 284], [-224, -219, -207])
    assert list(got.items())[-1][0] == 301
    assert [(o, i) for o, (i, _, _) in got.items()] == rule(sizes, 64, 32, 0)


@pytest.mark.parametrize("max_size, group, window, sizes", [
    (512, 32, 0, [570] + [1] * 72),  # an eighth of 512 is 2 groups: drops of 64
    (64, 32, 0, [10] + [1] * 150),
    (50, 32, 16, MIXED + [1] * 40),
    (7, 32, 5, [1] * 120),  # a window smaller than a group
    (200, 64, 0, [300, 1, 1, 130] + [1] * 90),
])
def test_held_and_dropped_positions_follow_the_rule(max_size, group, window, sizes):
    q = new(max_size, bits=4, window=window, group_size=group)
    got = []
    for _, k, v in steps(3, sizes, seed=4):
        q.update_and_fetch(k, v)
        got.append((q._offset, q._idx))
        assert q.left_padding.tolist() == [p - (q._offset - q._idx) for p in LP]
        assert q.offset.tolist() == [q._offset - p for p in LP]
    assert got == rule(sizes, max_size, group, window)
    assert q._offset > q._idx


@pytest.mark.parametrize("max_size, window", [(64, 0), (64, 16), (256, 40)])
def test_bytes_stay_bounded_as_the_offset_grows(max_size, window):
    threshold = max(G, max_size // 8 // G * G)
    bound = max(max_size - 1, window + 2 * G) + threshold + G + 1
    # The most bytes a rotated-channel QuantizedBatchKVCache of the same rows
    # holds on its way to that many positions, one at a time.
    grown = kvcore.QuantizedBatchKVCache(LP, G, 4, scheme=SCHEME, window=window)
    one, most = mx.zeros((3, H, 1, D)), 0
    for _ in range(bound):
        grown.update_and_fetch(one, one)
        most = max(most, grown.nbytes)
    q = new(max_size, bits=4, window=window)
    q.update_and_fetch(*next(steps(3, [max_size]))[1:])
    peaks = [0, 0]  # the most bytes over the first 350 decodes and over the next 350
    for i, (_, k, v) in enumerate(steps(3, [1] * 700, seed=5)):
        q.update_and_fetch(k, v)
        assert q._idx <= bound, (q._offset, q._idx, bound)
        assert q.nbytes <= most, (q._offset, q.nbytes, most)
        peaks[i >= 350] = max(peaks[i >= 350], q.nbytes)
    assert q._offset == max_size + 700 and q._offset - q._idx > 500
    assert peaks[1] <= peaks[0]


# -- merge, extract, filter, extend


def sliding_windows(lengths, keep, sink, window, seed=0, max_size=64, bits=8):
    """Rotated-channel QuantizedRotatingKVCaches and float RotatingKVCaches
    fed the same tokens (a prefill of lengths[i], then 37 one at a time),
    and Rows of each ring's tokens as BatchRotatingKVCache.merge takes them
    (the pinned keep, then the newest)."""
    qs, fs, history = [], [], []
    for i, n in enumerate(lengths):
        q = kvcore.QuantizedRotatingKVCache(max_size, keep, G, bits, scheme=SCHEME, window=window, sink=sink)
        f = kvcore.RotatingKVCache(max_size, keep)
        k, v = tokens(n + 37, 10 * seed + i)
        for a, b in [(0, n)] + [(j, j + 1) for j in range(n, n + 37)]:
            q.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
            f.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
        if n + 37 > max_size:
            k = mx.concatenate([k[:, :, :keep], k[:, :, n + 37 - (max_size - keep):]], axis=2)
            v = mx.concatenate([v[:, :, :keep], v[:, :, n + 37 - (max_size - keep):]], axis=2)
        qs.append(q)
        fs.append(f)
        history.append((k, v))
    return qs, fs, Rows(max_size, history=history)


@pytest.mark.parametrize("keep, sink", [(0, 0), (4, 1)])
@pytest.mark.parametrize("window", [FLOAT, 0])
def test_merge_of_sliding_windows_continues_as_the_float_batchs_merge(keep, sink, window):
    # Lengths 67, 137 and 237 (the last two wrapped); with keep 4 and a sink
    # each cache becomes its float ring's 64 tokens, as mlx-lm's merge takes them.
    qs, fs, rows = sliding_windows([30, 100, 200], keep, sink, window)
    held = [q._idx if keep == 0 else min(q.offset, 64) for q in qs]
    b, fb = QBR.merge(qs), kvcore.BatchRotatingKVCache.merge(fs)
    assert type(b) is QBR and (b.scheme, b.window, b.max_size, b.rotated, b.sink) == (SCHEME, window, 64, False, 0)
    assert b.offset.tolist() == fb.offset.tolist() == [67, 137, 237]
    # _offset is _idx (as BatchRotatingKVCache.merge); a row whose first
    # tokens are gone has its padding below 0.
    assert b._idx == b._offset == max(held)
    assert b.left_padding.tolist() == [b._idx - o for o in (67, 137, 237)]
    worst = []
    run_beside(b, fb, rows, [1] * 40 + [9] + [1] * 30, seed=8,
               check=exact() if window == FLOAT else near(b, worst))
    assert b.offset.tolist() == fb.offset.tolist()
    if window == 0:
        assert b._offset > b._idx
        assert max(worst) < 0.05, max(worst)


def test_merge_of_a_pinning_window_right_after_a_long_prefill_is_the_float_batchs_merge():
    k, v = tokens(100, 30)
    q = kvcore.QuantizedRotatingKVCache(64, 4, G, 8, scheme=SCHEME, window=FLOAT)
    f = kvcore.RotatingKVCache(64, 4)
    q.update_and_fetch(k, v)
    f.update_and_fetch(k, v)
    b, fb = QBR.merge([q]), kvcore.BatchRotatingKVCache.merge([f])
    assert b.offset.tolist() == fb.offset.tolist() == [100] and b._idx == fb._idx == 64
    # Its newest 64 tokens, rotated back and quantized again: float rounding.
    dk, dv = dequantized(b)
    assert mx.allclose(dk, fb.keys, atol=1e-5).item() and mx.allclose(dv, fb.values, atol=1e-5).item()
    # After single tokens the ring holds its 4 first and newest 60: so does the merge.
    for c in (q, f):
        c.update_and_fetch(*tokens(1, 31))
    b, fb = QBR.merge([q]), kvcore.BatchRotatingKVCache.merge([f])
    dk, dv = dequantized(b)
    assert mx.allclose(dk, fb.keys, atol=1e-5).item() and mx.allclose(dv, fb.values, atol=1e-5).item()


@pytest.mark.parametrize("keep, sink", [(0, 0), (4, 1)])
@pytest.mark.parametrize("window", [FLOAT, 0])
def test_extract_continues_as_the_float_batchs_row(keep, sink, window):
    qs, fs, rows = sliding_windows([30, 100, 200], keep, sink, window, seed=1)
    b, fb = QBR.merge(qs), kvcore.BatchRotatingKVCache.merge(fs)
    run_beside(b, fb, rows, [1] * 20 + [5], seed=9, check=exact() if window == FLOAT else near(b, []))
    for i in range(3):
        e, fe = b.extract(i), fb.extract(i)
        assert type(e) is kvcore.QuantizedRotatingKVCache
        assert (e.scheme, e.window, e.keep, e.max_size, e.sink, e.group_size, e.bits) == (
            SCHEME, window, 0, 64, 0, G, 8)
        assert e.offset == fe.offset == b.offset[i].item() and e._idx + e.dropped == e.offset
        # The row's held positions, its padding left out.
        dk, dv = dequantized(b)
        ek, ev = dequantized(e)
        p = max(0, b.left_padding[i].item())
        assert_arrays_equal(ek, dk[i:i + 1, :, p:])
        assert_arrays_equal(ev, dv[i:i + 1, :, p:])
        worst = []
        run_beside(e, fe, rows.row(i), [1] * 40 + [7] + [1] * 10, seed=10 + i,
                   check=exact(i) if window == FLOAT else near(e, worst))
        assert e.offset == fe.offset
        assert max(worst, default=0) < 0.05
    assert b.offset.tolist() == fb.offset.tolist()  # the batch as it was


@pytest.mark.parametrize("window", [FLOAT, 0])
def test_filter_and_extend_continue_as_the_float_batchs(window):
    qs, fs, rows = sliding_windows([30, 100, 200], 0, 0, window, seed=2)
    b, fb = QBR.merge(qs), kvcore.BatchRotatingKVCache.merge(fs)
    worst = []
    check = exact() if window == FLOAT else near(b, worst)
    run_beside(b, fb, rows, [1] * 10, seed=11, check=check)
    written = b._offset
    for keep in ([2, 0], [1]):
        b.filter(keep)
        fb.filter(keep)
        rows.filter(keep)
        assert b.offset.tolist() == fb.offset.tolist() and b._offset == written
        assert b.left_padding.tolist() == [b._idx - o for o in b.offset.tolist()]
        run_beside(b, fb, rows, [1] * 30 + [9] + [1] * 5, seed=12 + len(keep), check=check)
        written = b._offset
    # A shorter batch (two caches, one pinning 4 tokens) extends it, and it
    # extends another.
    qs2, fs2, rows2 = sliding_windows([10, 70], 4, 1, window, seed=3)
    o, fo = QBR.merge(qs2), kvcore.BatchRotatingKVCache.merge(fs2)
    short = (copy.deepcopy(o), copy.deepcopy(fo), copy.deepcopy(rows2))
    b.extend(o)
    fb.extend(fo)
    rows.extend(rows2)
    assert b.offset.tolist() == fb.offset.tolist() and b._offset == max(written, o._offset)
    run_beside(b, fb, rows, [1] * 40 + [7] + [1] * 5, seed=14, check=check)
    s, fs_, rows_s = short
    s.extend(b)
    fs_.extend(fb)
    rows_s.extend(rows)
    assert s.offset.tolist() == fs_.offset.tolist() and s._offset == b._offset
    run_beside(s, fs_, rows_s, [1] * 20 + [3] + [1] * 5, seed=15,
               check=exact() if window == FLOAT else near(s, worst))
    assert max(worst, default=0) < 0.05


# -- prepare / finalize


@pytest.mark.parametrize("history", [[0, 0, 0], [30, 100, 200]])
@pytest.mark.parametrize("window", [FLOAT, 0])
def test_right_padded_prompts_attend_as_the_float_batch(history, window):
    # As mlx-lm's BatchGenerator prefills: prepare(lengths, right_padding),
    # the padded prompts in chunks (longer than the window), finalize.
    qs, fs, rows = sliding_windows([n for n in history if n], 0, 0, window, seed=4)
    if not qs:  # empty sliding windows
        qs = [kvcore.QuantizedRotatingKVCache(64, 0, G, 8, scheme=SCHEME, window=window) for _ in history]
        fs = [kvcore.RotatingKVCache(64, 0) for _ in history]
        rows = Rows(64, history=[(mx.zeros((1, H, 0, D)),) * 2 for _ in history])
    b, fb = QBR.merge(qs), kvcore.BatchRotatingKVCache.merge(fs)
    lengths = [40, 13, 90]
    right = [max(lengths) - n for n in lengths]
    b.prepare(lengths=lengths, right_padding=right)
    fb.prepare(lengths=lengths, right_padding=right)
    rows.prepare(lengths=lengths)
    before = b.keys_and_values()[0][1].shape[-1] if not b.empty() else 0
    gone = b._offset - b._idx

    def pending(i, N, x, got, mq, per_row):
        # Nothing dropped or quantized while the right padding waits.
        assert b._offset - b._idx == gone
        assert (b.keys_and_values()[0][1].shape[-1] if not b.empty() else 0) == before
        check(i, N, x, got, mq, per_row)

    check = exact() if window == FLOAT else near(b, [])
    run_beside(b, fb, rows, [50, 40], seed=16, check=pending)
    b.finalize()
    fb.finalize()
    rows.finalize()
    assert b.offset.tolist() == fb.offset.tolist() == [n + 37 + m if n else m for n, m in zip(history, lengths)]
    assert b.left_padding.tolist() == [b._idx - o for o in b.offset.tolist()]
    if not any(history):
        assert b.left_padding.tolist() == fb.left_padding.tolist() == right
    worst = []
    run_beside(b, fb, rows, [1] * 70 + [9] + [1] * 5, seed=17, check=exact() if window == FLOAT else near(b, worst))
    assert b.offset.tolist() == fb.offset.tolist()
    if window == 0:
        assert b._offset - b._idx > gone  # dropping again
        assert max(worst) < 0.05, max(worst)


def test_left_padding_prepared_on_an_empty_batch_is_the_float_batchs():
    b, fb = new(64, [0, 0], window=FLOAT), kvcore.BatchRotatingKVCache(64, [0, 0])
    b.prepare(left_padding=[3, 0])
    fb.prepare(left_padding=[3, 0])
    assert b.left_padding.tolist() == fb.left_padding.tolist() == [3, 0]
    assert b.offset.tolist() == fb.offset.tolist() == [-3, 0]
    run_beside(b, fb, Rows(64, [3, 0]), [20] + [1] * 60 + [4], seed=18, check=exact())


def test_a_chunk_after_single_tokens_wrapped_the_ring_sees_the_rows_window():
    # The float batch (as mlx-lm's) makes its mask for 9 tokens before the
    # update trims its wrapped ring by one position, so a row still padded
    # loses its oldest token in the window; this cache's mask is made for the
    # positions it holds after its update: each row attends its own window.
    q, f = new(64, [0, 30], window=FLOAT), kvcore.BatchRotatingKVCache(64, [0, 30])
    rows = Rows(64, [0, 30])
    run_beside(q, f, rows, [40] + [1] * 30, check=exact())
    assert f.rotated and f.left_padding.tolist()[1] > 0
    assert quirk(f, 9)
    run_beside(q, f, rows, [9] + [1] * 10 + [5], seed=1, check=exact())


# -- states, files and copies


def filled(window=8, bits=4, sizes=(50,) + (1,) * 100 + (40,) + (1,) * 10, left_padding=LP, seed=19):
    q = new(64, left_padding, bits=bits, window=window)
    for _, k, v in steps(len(left_padding), list(sizes), seed):
        q.update_and_fetch(k, v)
    return q


def assert_same_cache(a, b, what="cache"):
    assert_states_equal(flat(a.state), flat(b.state), what)
    assert (a._idx, a._offset, a.max_size, a.window, a.scheme, a.group_size, a.bits, a.nbytes, a.rotated) == (
        b._idx, b._offset, b.max_size, b.window, b.scheme, b.group_size, b.bits, b.nbytes, b.rotated), what
    assert_arrays_equal(a.offset, b.offset, what)
    assert_arrays_equal(a.left_padding, b.left_padding, what)


def test_state_names_everything_and_round_trips_bit_for_bit(tmp_path):
    q = filled()
    st = q.state
    assert len(st) == 14
    assert st[4:12] == (64, q._offset, q._idx, False, G, 4, SCHEME, 8)
    assert q._offset == 200 and 0 < q._idx < q._offset
    gone = q._offset - q._idx
    assert_arrays_equal(st[2], q.offset)
    assert_arrays_equal(st[3], q.left_padding)
    assert st[2].tolist() == [200 - p for p in LP] and st[3].tolist() == [p - gone for p in LP]
    (kw, ks, kb, r), (vw, vs, vb, rv) = q.keys_and_values()
    # The held buffers, spare room included: keys' positions on the last axis, values' on the third.
    for got, want in zip(st[0], (kw, ks, kb)):
        assert_arrays_equal(got[..., :want.shape[-1]], want)
    for got, want in zip(st[1], (vw, vs, vb)):
        assert_arrays_equal(got[:, :, :want.shape[2]], want)
    assert_arrays_equal(st[12], r)
    assert_arrays_equal(st[13], rv)
    assert r.shape[2] == q._idx - ks.shape[-1] * G >= 8
    assert q.nbytes == sum(a.nbytes for a in st[0] + st[1]) + r.nbytes + rv.nbytes
    path = str(tmp_path / "c.safetensors")
    other = filled(window=0, bits=8, left_padding=[2, 0])
    affine = QBR(64, [1, 0], G, 4)
    affine.update_and_fetch(*next(steps(2, [70]))[1:])
    kvcore.save_prompt_cache(path, [q, other, affine])
    loaded = kvcore.load_prompt_cache(path)
    set_state = new(8, [0], bits=8, window=0)
    set_state.state = st
    copies = {
        "from_state": QBR.from_state(st),
        "file": loaded[0],
        "deepcopy": copy.deepcopy(q),
        "copy": copy.copy(q),
        "state =": set_state,
    }
    for what, c in copies.items():
        assert type(c) is QBR and c.scheme == SCHEME, what
        assert_same_cache(c, q, what)
    assert_same_cache(loaded[1], other, "file's second cache")
    assert loaded[2].scheme == "affine" and len(loaded[2].state) == 10
    assert_states_equal(flat(loaded[2].state), flat(affine.state), "file's affine cache")
    from kvcore._files import describe

    layer = describe(path)["layers"][0]
    assert (layer["class"], layer["scheme"], layer["window"], layer["max_size"]) == (
        "QuantizedBatchRotatingKVCache", SCHEME, 8, 64)
    # Each continues as the original does, bit for bit.
    more = list(steps(3, [1, 1, 70] + [1] * 40, seed=20))
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
    assert q._offset - q._idx > gone  # dropping went on


def test_copies_are_independent():
    q = filled()
    before = flat(q.state)
    c = copy.deepcopy(q)
    c.update_and_fetch(*next(steps(3, [40], seed=21))[1:])
    assert_states_equal(before, flat(q.state))
    assert c._offset == q._offset + 40


# -- trim


@pytest.mark.parametrize("window", [FLOAT, 0])
def test_trim_before_the_ring_fills_trims_as_the_float_batch(window):
    q, f = new(64, window=window), kvcore.BatchRotatingKVCache(64, LP)
    rows = Rows(64, LP)
    run_beside(q, f, rows, [50], seed=22, check=exact() if window == FLOAT else near(q, []))
    assert q.is_trimmable() and f.is_trimmable()
    assert q.trim(10) == f.trim(10) == 10  # into a quantized group at window 0: back to float
    assert (q._idx, q._offset) == (f._idx, f._offset) == (40, 40)
    assert q.offset.tolist() == f.offset.tolist() == [40, 35, 23] and q.left_padding.tolist() == LP
    if window == 0:
        (_, ks, _, r), _ = q.keys_and_values()
        assert ks.shape[-1] * G == 32 and r.shape[2] == 8
    # The rows lose their last 10 tokens.
    for i, n in enumerate([40, 35, 23]):
        rows.keys[i], rows.values[i] = rows.keys[i][:, :, :n], rows.values[i][:, :, :n]
    worst = []
    run_beside(q, f, rows, [1] * 40 + [9] + [1] * 5, seed=23, check=exact() if window == FLOAT else near(q, worst))
    assert max(worst, default=0) < 0.05


# -- typed errors that change nothing


def assert_refused(c, call, error, message):
    before = flat(c.state)
    offset, lp, idx, written = c.offset.tolist(), c.left_padding.tolist(), c._idx, c._offset
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == message
    assert (c.offset.tolist(), c.left_padding.tolist(), c._idx, c._offset) == (offset, lp, idx, written)
    assert_states_equal(before, flat(c.state), "after the refused call")


def refused_state(c, st, message):
    """state = st and from_state(st) refused with message, c unchanged."""
    assert_refused(c, lambda: setattr(c, "state", st), kvcore.CacheValueError, message)
    assert_refused(c, lambda: QBR.from_state(st), kvcore.CacheValueError, message)


def with_item(st, i, x):
    st = list(st)
    st[i] = x
    return tuple(st)


def test_a_state_whose_offset_is_below_its_positions_is_refused():
    q = filled()
    refused_state(q, with_item(q.state, 5, q._idx - 1),
                  "[QuantizedBatchRotatingKVCache.state] expected a batch without a sink whose _offset is its "
                  f"{q._idx} positions plus those gone before them (at most 1073741824) but got _offset "
                  f"{q._idx - 1}, sink 0")


def test_a_state_counting_positions_gone_before_its_held_ones_is_taken():
    # _offset counts the positions held and those gone before them (left
    # behind by the window, or padding a filter cut); beyond 2**30 refused.
    q = filled(sizes=(62,))
    for written in (63, 62 + 32):
        ok = QBR.from_state(with_item(q.state, 5, written))
        assert (ok._idx, ok._offset) == (62, written)
        assert ok.offset.tolist() == q.offset.tolist() and ok.left_padding.tolist() == LP
    refused_state(q, with_item(q.state, 5, 2**31 - 1),
                  "[QuantizedBatchRotatingKVCache.state] expected a batch without a sink whose _offset is its 62 "
                  "positions plus those gone before them (at most 1073741824) but got _offset 2147483647, sink 0")


def test_a_state_rotated_or_of_an_unknown_scheme_or_window_is_refused():
    q = filled()
    st = q.state
    for i, x, message in [
        (7, True, "expected rotated False for the rotated-channel scheme but got True"),
        (10, "nope", "expected scheme 'affine' or 'rotated-channel' but got 'nope'"),
        (11, -1, "expected a window of 0 to 1048576 tokens but got window -1"),
    ]:
        refused_state(q, with_item(st, i, x), "[QuantizedBatchRotatingKVCache.state] " + message)


def test_a_fourteen_item_state_naming_the_affine_scheme_is_refused():
    q = filled()
    refused_state(q, with_item(q.state, 10, "affine"),
                  "[QuantizedBatchRotatingKVCache.state] expected scheme 'rotated-channel' in a 14-item state "
                  "but got 'affine'")



def test_the_state_of_a_filtered_batch_round_trips(tmp_path):
    q = new(64, [90, 0], bits=4, window=0)
    q.update_and_fetch(*next(steps(2, [100], seed=29))[1:])
    q.filter([0])  # row 0's 90 pad positions: two whole groups cut
    assert (q._idx, q._offset, q.offset.tolist(), q.left_padding.tolist()) == (36, 100, [10], [26])
    assert_same_cache(QBR.from_state(q.state), q)
    path = str(tmp_path / "f.safetensors")
    kvcore.save_prompt_cache(path, [q])
    assert_same_cache(kvcore.load_prompt_cache(path)[0], q)


def test_one_position_with_right_padding_pending_is_refused_as_the_float_batchs():
    q, f = new(64, [0, 0], window=FLOAT), kvcore.BatchRotatingKVCache(64, [0, 0])
    for c in (q, f):
        c.update_and_fetch(*next(steps(2, [10], seed=31))[1:])
        c.prepare(lengths=[2, 3], right_padding=[1, 0])
    one = next(steps(2, [1], seed=32))[1:]
    with pytest.raises(kvcore.CacheRuntimeError) as e:
        f.update_and_fetch(*one)
    assert str(e.value) == ("[BatchRotatingKVCache.update_and_fetch] finalize() should be called before decoding "
                            "with BatchRotatingKVCache")
    assert_refused(q, lambda: q.update_and_fetch(*one), kvcore.CacheRuntimeError,
                   "[QuantizedBatchRotatingKVCache.update_and_fetch] finalize() should be called before "
                   "decoding with QuantizedBatchRotatingKVCache")

def test_trim_after_rotation_is_refused():
    q = filled()
    assert not q.is_trimmable() and q.trim(0) == 0
    assert_refused(q, lambda: q.trim(1), kvcore.CacheRuntimeError,
                   "[QuantizedBatchRotatingKVCache.trim] expected _offset < max_size (nothing rotated out yet) "
                   "but got _offset 200 with max_size 64")
    # _offset counts the positions written, held or not: one past max_size - 1 is too late.
    q = filled(sizes=(64,))
    assert (q._idx, q._offset, q.is_trimmable()) == (64, 64, False)
    assert_refused(q, lambda: q.trim(3), kvcore.CacheRuntimeError,
                   "[QuantizedBatchRotatingKVCache.trim] expected _offset < max_size (nothing rotated out yet) "
                   "but got _offset 64 with max_size 64")


@pytest.mark.parametrize("shape, dtype, message", [
    ((3, H, 1, 32), mx.float32, "expected keys (B, H, S, D) like the cache's (3, 2, 1, 64) float32 and values of "
                                "head dim 64 but got (3, 2, 1, 32) float32, values (3, 2, 1, 32)"),
    ((3, H, 1, D), mx.float16, "expected keys (B, H, S, D) like the cache's (3, 2, 1, 64) float32 and values of "
                               "head dim 64 but got (3, 2, 1, 64) float16, values (3, 2, 1, 64)"),
    ((3, H + 1, 1, D), mx.float32, "expected keys (B, H, S, D) like the cache's (3, 2, 1, 64) float32 and values "
                                   "of head dim 64 but got (3, 3, 1, 64) float32, values (3, 3, 1, 64)"),
    ((2, H, 1, D), mx.float32, "expected keys for the batch of 3 rows but got (2, 2, 1, 64)"),
    ((3, H, 1, 48), mx.float32, "expected a key head dim a power of two from 2 to 16384 to rotate but got 48"),
])
def test_an_update_unlike_the_cache_is_refused(shape, dtype, message):
    q = filled()
    k = mx.zeros(shape, dtype)
    assert_refused(q, lambda: q.update_and_fetch(k, k), kvcore.CacheValueError,
                   "[QuantizedBatchRotatingKVCache.update_and_fetch] " + message)


def test_an_update_refused_when_positions_are_due_to_drop_drops_nothing():
    # The drop is staged with the update: a refused update leaves the
    # positions that were due to go.
    q = new(64, bits=4, window=0)
    q.update_and_fetch(*next(steps(3, [100], seed=24))[1:])
    assert (q._offset, q._idx) == (100, 100)  # the next update drops [0, 32)
    assert q.make_mask(1).shape == (3, 1, 1, 69)
    bad = mx.zeros((3, H, 1, 32))
    assert_refused(q, lambda: q.update_and_fetch(bad, bad), kvcore.CacheValueError,
                   "[QuantizedBatchRotatingKVCache.update_and_fetch] expected keys (B, H, S, D) like the cache's "
                   "(3, 2, 1, 64) float32 and values of head dim 64 but got (3, 2, 1, 32) float32, "
                   "values (3, 2, 1, 32)")
    q.update_and_fetch(*next(steps(3, [1], seed=25))[1:])
    assert (q._offset, q._idx) == (101, 69)


def test_to_quantized_with_a_sink_or_right_padding_pending_is_refused():
    f, _ = float_batch([30])
    before = f.state
    for kw in (dict(sink=1), dict(sink=3, window=0)):
        with pytest.raises(kvcore.CacheValueError) as e:
            f.to_quantized(G, 4, scheme=SCHEME, **kw)
        assert str(e.value) == ("[BatchRotatingKVCache.to_quantized] expected no sink (a batch of sliding windows "
                                f"pins no first tokens) but got sink {kw['sink']}")
    assert_states_equal(before, f.state)
    f.prepare(lengths=[3, 2, 1], right_padding=[0, 1, 2])
    f.update_and_fetch(*next(steps(3, [3], seed=26))[1:])
    before = f.state
    with pytest.raises(kvcore.CacheRuntimeError) as e:
        f.to_quantized(G, 4, scheme=SCHEME)
    assert str(e.value) == ("[BatchRotatingKVCache.to_quantized] expected no right padding pending (call finalize "
                            "first) for the rotated-channel scheme but got right padding pending")
    assert_states_equal(before, f.state)
    f.finalize()
    assert f.to_quantized(G, 4, scheme=SCHEME).offset.tolist() == f.offset.tolist()


def test_extend_with_another_scheme_max_size_or_window_is_refused_and_changes_neither():
    q = filled()
    affine = QBR(64, [0], G, 4)
    others = [
        (affine, "expected a rotated-channel batch of max_size 64 but got an affine one of max_size 64"),
        (new(32, [0], bits=4, window=8), "expected a rotated-channel batch of max_size 64 but got a "
                                         "rotated-channel one of max_size 32"),
        (new(64, [0], bits=4, window=3), "expected a rotated-channel cache of the same group_size, bits, "
                                         "window 8 and sink 0 but got window 3, sink 0"),
        (new(64, [0], bits=8, window=8), "expected a cache quantized alike: group_size (32, 32), bits (4, 4) "
                                         "but got group_size (32, 32), bits (8, 8)"),
    ]
    for other, message in others:
        other.update_and_fetch(*next(steps(1, [5], seed=27))[1:])
        before = flat(other.state)
        assert_refused(q, lambda: q.extend(other), kvcore.CacheValueError,
                       "[QuantizedBatchRotatingKVCache.extend] " + message)
        assert_states_equal(before, flat(other.state))
    assert_refused(affine, lambda: affine.extend(q), kvcore.CacheValueError,
                   "[QuantizedBatchRotatingKVCache.extend] expected an affine batch of max_size 64 but got a "
                   "rotated-channel one of max_size 64")


def test_a_merge_of_other_schemes_or_window_sizes_is_refused():
    a = kvcore.QuantizedRotatingKVCache(64, 0, G, 4, scheme=SCHEME, window=0)
    for other, got in ((kvcore.QuantizedRotatingKVCache(64, 0, G, 4), "affine, 64"),
                       (kvcore.QuantizedRotatingKVCache(32, 0, G, 4, scheme=SCHEME, window=0), "rotated-channel, 32")):
        for c in (a, other):
            c.update_and_fetch(*tokens(5, 28))
        with pytest.raises(kvcore.CacheValueError) as e:
            QBR.merge([a, other])
        assert str(e.value) == ("[QuantizedBatchRotatingKVCache.merge] expected caches of one scheme and max_size: "
                                f"rotated-channel, 64 but got {got}")


# -- mlx-lm's BatchGenerator


@pytest.fixture(scope="module")
def qwen():
    from mlx_lm.models import qwen2
    from test_quantized_generate import QWEN, build

    return build(qwen2, QWEN, 99)  # weights scaled up: varied greedy tokens (head dim 32)


M_KV = 32  # max_kv_size: every row wraps in its prefill or its decode


def generate_batch(model, schedule, caches, n):
    """BatchGenerator (prefill steps of 16) over schedule: [(prompt, max
    tokens, steps to run before inserting it)]; caches() the per-layer
    caches of a request. Returns each request's [(token, logprobs)] and the
    (type, scheme, rows, _idx, _offset) of the first layer's running batch
    after each step."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=n, completion_batch_size=4, prefill_batch_size=4,
                         prefill_step_size=16, max_kv_size=M_KV)
    out, seen, uids = {}, [], []

    def step():
        for r in gen.next_generated():
            out[r.uid].append((r.token, r.logprobs))
        batch = gen._generation_batch.prompt_cache
        if batch:
            c = batch[0]
            seen.append((type(c).__name__, getattr(c, "scheme", None), c.offset.size, c._idx, c._offset))

    try:
        for prompt, m, wait in schedule:
            for _ in range(wait):
                step()
            (uid,) = gen.insert([prompt], max_tokens=[m], caches=[caches()])
            uids.append(uid)
            out[uid] = []
        for _ in range(8 * n):
            step()
            if all(len(out[u]) == m for u, (_, m, _) in zip(uids, schedule)):
                break
    finally:
        gen.close()
    return [out[u] for u in uids], seen


def generate_alone(model, prompt, caches, n):
    from mlx_lm.generate import generate_step

    return [(t, p) for t, p in generate_step(mx.array(prompt), model, prompt_cache=caches(), max_tokens=n,
                                             prefill_step_size=16)]


def prompts_of(*lengths):
    return [mx.random.randint(0, 128, (n,), key=mx.random.key(n)).tolist() for n in lengths]


@pytest.mark.parametrize("arrivals", [(0, 0, 0), (0, 3, 5)])
def test_batch_generator_with_max_kv_size_decodes_as_the_float_batch(qwen, arrivals):
    # Three requests of prompts 50, 23 and 37 tokens, all at once or the
    # later two joining the running batch (extend); they finish at different
    # steps (filter). The caches are mlx-lm's (make_prompt_cache: a ring of
    # 32 pinning 4 tokens per layer), as floats or quantized to the scheme;
    # merged, each batch pins nothing. With every position in float the
    # quantized batch's tokens are the float batch's and each sequence's own
    # (alone, through a rotated-channel sliding window that pins nothing,
    # prefilled in the same steps). Quantized to 8 bits (the model's scaled
    # weights magnify the error), the first tokens.
    from kvcore._mlx_lm import patch_mlx_lm, unpatch_mlx_lm

    prompts = prompts_of(50, 23, 37)
    n = 30
    schedule = list(zip(prompts, [30, 20, 25], arrivals))
    patch_mlx_lm(kv_scheme=SCHEME)
    try:
        want, seen_float = generate_batch(qwen, schedule, lambda: kvcore.make_prompt_cache(qwen, max_kv_size=M_KV), n)
        runs = {}
        for window in (FLOAT, 0):
            runs[window] = generate_batch(qwen, schedule, lambda: [
                c.to_quantized(group_size=G, bits=8, scheme=SCHEME, window=window)
                for c in kvcore.make_prompt_cache(qwen, max_kv_size=M_KV)], n)
        alone = [generate_alone(qwen, p, lambda: [
            kvcore.QuantizedRotatingKVCache(M_KV, 0, G, 8, scheme=SCHEME, window=FLOAT) for _ in qwen.layers], m)
            for p, m, _ in schedule]
    finally:
        unpatch_mlx_lm()
    assert {s[:2] for s in seen_float} == {("BatchRotatingKVCache", None)}
    got, seen = runs[FLOAT]
    assert {s[:2] for s in seen} == {("QuantizedBatchRotatingKVCache", SCHEME)}
    assert max(s[4] for s in seen) > 2 * M_KV
    # Rows joined (extend) and left (filter) the running batch as the float one's.
    assert [s[2] for s in seen] == [s[2] for s in seen_float]
    assert {s[2] for s in seen} == {1, 2, 3} and (seen[0][2] == 1 or not arrivals[1])
    tokens_of = lambda run: [[t for t, _ in r] for r in run]  # noqa: E731
    assert [len(t) for t in tokens_of(got)] == [30, 20, 25]
    assert tokens_of(got) == tokens_of(want) == tokens_of(alone)
    assert len({t for r in tokens_of(want) for t in r}) >= 20
    for g, w in zip(got, want):
        for (_, a), (_, b) in zip(g, w):
            assert close(a, b, 1e-4)
    got, seen = runs[0]
    assert {s[:2] for s in seen} == {("QuantizedBatchRotatingKVCache", SCHEME)}
    assert any(s[4] - s[3] > 0 for s in seen)  # groups dropped
    assert [len(t) for t in tokens_of(got)] == [30, 20, 25]
    assert [t[:3] for t in tokens_of(got)] == [t[:3] for t in tokens_of(want)]
