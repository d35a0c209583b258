"""kvcore's caches as Python objects: array types, zero copy, the native
module, the mlx version guard, copying and subclassing.

Each test runs mlx-lm's cache next to kvcore's and compares.
"""

import copy
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx_lm.models.base as ref_base
import mlx_lm.models.cache as ref
import numpy as np
import pytest

import kvcore

KINDS = ["KVCache", "ConcatenateKVCache", "RotatingKVCache"]
ROT_ARGS = (8, 2)


def rand(S, seed, shape=(1, 2), d=4, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((*shape, S, d)).astype(dtype)


def args_for(kind):
    return ROT_ARGS if kind == "RotatingKVCache" else ()


def make(kind):
    return getattr(kvcore, kind)(*args_for(kind)), getattr(ref, kind)(*args_for(kind))


def update_both(c, r, S, seed):
    """One update of both caches with the same data; results compared at
    once (mlx-lm may later overwrite the arrays it returned)."""
    k, v = rand(S, seed), rand(S, seed + 1)
    ck, cv = c.update_and_fetch(mx.array(k), mx.array(v))
    rk, rv = r.update_and_fetch(mx.array(k), mx.array(v))
    assert_equal_arrays(ck, rk)
    assert_equal_arrays(cv, rv)
    return ck, cv


def feed(c, r, lengths, seed=0):
    for i, S in enumerate(lengths):
        update_both(c, r, S, seed + 2 * i)


def assert_equal_arrays(a, b):
    assert type(a) is mx.array, type(a)
    assert type(b) is mx.array, type(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert mx.array_equal(a, b).item()


def assert_same_state(c, r):
    assert c.offset == r.offset
    cs, rs = c.state, r.state
    assert len(cs) == len(rs)
    for x, y in zip(cs, rs):
        if isinstance(y, mx.array):
            assert_equal_arrays(x, y)
        else:
            assert x == y


def ptr(a):
    """Data pointer of an evaluated array: equal pointers, same buffer."""
    mx.eval(a)
    return np.asarray(memoryview(a)).ctypes.data


LENGTHS = {"short": [3, 1], "rotated": [5, 1, 1, 1, 1, 1, 1, 3, 1]}


# --------------------------------------------------------------------------
# types of what comes back


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("S", [1, 4])
def test_returned_arrays_are_mlx_arrays(kind, S):
    c, r = make(kind)
    for i, n in enumerate([S, 1, S, 1, 1, 1, 1, 1, 1]):
        ck, cv = update_both(c, r, n, 10 * i)
        assert type(ck) is mx.array and type(cv) is mx.array
        kk, vv = c.keys_and_values()
        rk, rv = r.keys_and_values()
        assert_equal_arrays(kk, rk)
        assert_equal_arrays(vv, rv)
        assert type(c.keys) is mx.array and type(c.values) is mx.array
        for x in c.state:
            assert type(x) in (mx.array, int)
        assert_same_state(c, r)
        assert type(c.offset) is int
        assert c.nbytes == r.nbytes
        assert c.size() == r.size() or kind == "ConcatenateKVCache"  # mlx-lm: 0
        assert c.empty() is False and r.empty() is False
        m = c.make_mask(3, return_array=True, window_size=None)
        assert type(m) is mx.array
        assert_equal_arrays(m, r.make_mask(3, return_array=True, window_size=None))


def test_fresh_cache_attributes_like_mlx_lm():
    for kind in KINDS:
        c, r = make(kind)
        assert c.keys is None and r.keys is None
        assert c.values is None and r.values is None
        assert c.offset == r.offset == 0
        assert c.empty() and r.empty()
        assert c.nbytes == r.nbytes == 0
        assert c.is_trimmable() == r.is_trimmable()
        assert type(c.state) is tuple
        assert c.state[:2] == (None, None)
    rot = kvcore.RotatingKVCache(8, 2)
    assert rot.state == (None, None, 0, 2, 8, 0) == ref.RotatingKVCache(8, 2).state
    assert kvcore.KVCache().state == (None, None, 0) == ref.KVCache().state


def test_mask_functions_return_mlx_arrays():
    for N, off, win in [(3, 0, None), (4, 6, None), (4, 6, 3), (1, 5, 2)]:
        got = kvcore.create_causal_mask(N, off, win)
        assert type(got) is mx.array
        assert_equal_arrays(got, ref_base.create_causal_mask(N, off, window_size=win))
    lp, rp = mx.array([0, 2]), mx.array([1, 0])
    got = kvcore.create_causal_mask(3, 2, right_padding=rp, left_padding=lp)
    assert type(got) is mx.array and got.shape == (2, 1, 3, 5)
    assert_equal_arrays(got, ref_base.create_causal_mask(3, 2, right_padding=rp, left_padding=lp))
    got = kvcore.create_attention_mask(3, 2, True, None)
    assert type(got) is mx.array
    assert_equal_arrays(got, ref.create_attention_mask(3, 2, True, None))
    assert kvcore.create_attention_mask(3, 2, False, None) == "causal"


# --------------------------------------------------------------------------
# zero copy in


def test_concatenate_first_update_keeps_input_buffer():
    k, v = mx.array(rand(5, 1)), mx.array(rand(5, 2))
    mx.eval(k, v)
    c = kvcore.ConcatenateKVCache()
    rk, rv = c.update_and_fetch(k, v)
    assert mx.array_equal(c.keys, k).item() and mx.array_equal(c.values, v).item()
    assert mx.array_equal(rk, k).item() and mx.array_equal(rv, v).item()
    # The very same data: no copy was made on the way in or out.
    assert ptr(c.keys) == ptr(k) and ptr(c.values) == ptr(v)
    assert ptr(rk) == ptr(k) and ptr(rv) == ptr(v)
    assert ptr(c.state[0]) == ptr(k)
    # (the pointer check can fail: a copy has its own buffer)
    assert ptr(k + 0) != ptr(k)
    # mlx-lm keeps the very object.
    r = ref.ConcatenateKVCache()
    r.update_and_fetch(k, v)
    assert r.keys is k
    # A second update concatenates into a new buffer; the input is untouched.
    k2 = mx.array(rand(2, 3))
    before = np.array(k)
    c.update_and_fetch(k2, k2)
    assert np.array_equal(np.array(k), before)
    assert c.keys.shape == (1, 2, 7, 4)


def test_rotating_first_multi_token_update_keeps_input_buffer():
    k, v = mx.array(rand(5, 1)), mx.array(rand(5, 2))
    mx.eval(k, v)
    c, r = kvcore.RotatingKVCache(8, 2), ref.RotatingKVCache(8, 2)
    ck, cv = c.update_and_fetch(k, v)
    r.update_and_fetch(k, v)
    assert r.keys is k  # mlx-lm stores the input itself
    assert mx.array_equal(c.keys, k).item()
    assert ptr(c.keys) == ptr(k) and ptr(ck) == ptr(k) and ptr(cv) == ptr(v)


@pytest.mark.parametrize("kind", KINDS)
def test_state_assignment_is_zero_copy(kind):
    src, _ = make(kind)
    src.update_and_fetch(mx.array(rand(5, 1)), mx.array(rand(5, 2)))
    state = src.state
    k, v = state[0], state[1]
    mx.eval(k, v)
    c = getattr(kvcore, kind).from_state(state)
    assert ptr(c.keys) == ptr(k) and ptr(c.values) == ptr(v)
    d, _ = make(kind)
    d.state = state
    assert ptr(d.keys) == ptr(k) and ptr(d.values) == ptr(v)
    r = getattr(ref, kind).from_state(state)
    assert_same_state(c, r)


def test_kvcache_update_writes_into_its_buffer():
    # KVCache copies into its step-sized buffer (so no identity with the
    # input), but the contents are the input's, exactly as in mlx-lm.
    c, r = make("KVCache")
    k = mx.array(rand(3, 5))
    ck, _ = c.update_and_fetch(k, k)
    rk, _ = r.update_and_fetch(k, k)
    assert_equal_arrays(ck, k)
    assert_equal_arrays(ck, rk)
    assert c.keys.shape == r.keys.shape == (1, 2, 256, 4)


# --------------------------------------------------------------------------
# the native module


def test_ext_module_takes_mlx_arrays():
    ext = kvcore._ext
    assert ext.KVCache is kvcore.KVCache
    assert ext.RotatingKVCache is kvcore.RotatingKVCache
    assert ext.ConcatenateKVCache is kvcore.ConcatenateKVCache
    assert ext.__mlx_version__ == mx.__version__
    for kind in KINDS:
        c = getattr(ext, kind)(*args_for(kind))
        r = getattr(ref, kind)(*args_for(kind))
        for dtype in (np.float32, np.float16):
            if dtype is np.float16:
                c = getattr(ext, kind)(*args_for(kind))
                r = getattr(ref, kind)(*args_for(kind))
            for S in (3, 1, 1):
                k = mx.array(rand(S, S, dtype=dtype))
                ck, cv = c.update_and_fetch(k, k)
                rk, rv = r.update_and_fetch(k, k)
                assert_equal_arrays(ck, rk)
                assert ck.dtype == k.dtype
        # bfloat16 has no numpy twin: built in mlx directly
        c = getattr(ext, kind)(*args_for(kind))
        r = getattr(ref, kind)(*args_for(kind))
        kb = mx.array(rand(3, 4)).astype(mx.bfloat16)
        assert_equal_arrays(c.update_and_fetch(kb, kb)[0], r.update_and_fetch(kb, kb)[0])
    m = ext.create_causal_mask(3, 2, 2, mx.array([0, 1]), mx.array([1, 0]))
    assert type(m) is mx.array
    assert_equal_arrays(
        m,
        ref_base.create_causal_mask(
            3, 2, window_size=2, right_padding=mx.array([0, 1]), left_padding=mx.array([1, 0])
        ),
    )


def test_ext_rejects_non_arrays_cleanly():
    c = kvcore.KVCache()
    for bad in (np.ones((1, 2, 3, 4), np.float32), [[1.0]], "keys", None, 3):
        with pytest.raises(TypeError):
            c.update_and_fetch(bad, bad)
    assert c.empty() and c.offset == 0
    k = mx.ones((1, 2, 3, 4))
    assert_equal_arrays(c.update_and_fetch(k, k)[0], k)


def test_import_against_other_mlx_version_fails():
    code = textwrap.dedent(
        """
        import mlx.core
        real = mlx.core.__version__
        mlx.core.__version__ = "0.0.0"
        try:
            import kvcore
        except ImportError as e:
            print("IMPORTERROR", real)
            print(e)
            raise SystemExit(3)
        print("IMPORTED")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-1000:])
    first, message = proc.stdout.split("\n", 1)
    assert first == f"IMPORTERROR {mx.__version__}"
    assert "0.0.0" in message
    assert mx.__version__ in message
    # ... and with the right version the same interpreter setup imports fine.
    ok = subprocess.run(
        [sys.executable, "-c", "import mlx.core, kvcore; print(kvcore.KVCache.__name__)"],
        capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "KVCache", ok.stderr[-1000:]


# --------------------------------------------------------------------------
# copying


@pytest.mark.parametrize(
    "kind, history",
    [
        pytest.param(kind, history, id=f"{kind}-{history}")
        for kind in KINDS
        for history in ("empty", "short", "rotated")
        if history != "rotated" or kind == "RotatingKVCache"
    ],
)
@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
def test_copies_are_independent(kind, history, copier):
    c, r = make(kind)
    feed(c, r, LENGTHS.get(history, []))
    d = copier(c)
    assert type(d) is type(c) and d is not c
    assert_same_state(d, c)
    for attr in ("keep", "max_size", "_idx"):
        if hasattr(c, attr):
            assert getattr(d, attr) == getattr(c, attr)
    saved = [np.array(x) if isinstance(x, mx.array) else x for x in c.state]

    # Update the copy like an mlx-lm copy; the original does not move.
    rd = copy.deepcopy(r)
    for i, S in enumerate([1, 3, 1, 1]):
        update_both(d, rd, S, 50 + 2 * i)
    assert_same_state(d, rd)
    now = [np.array(x) if isinstance(x, mx.array) else x for x in c.state]
    assert len(now) == len(saved)
    for a, b in zip(saved, now):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
        else:
            assert a == b
    assert_same_state(c, r)

    # And the original carries on like mlx-lm's, unaffected by the copy.
    for i, S in enumerate([1, 2, 1]):
        update_both(c, r, S, 80 + 2 * i)
    assert_same_state(c, r)


@pytest.mark.parametrize("kind", KINDS)
def test_trim_on_copy_leaves_original(kind):
    c, r = make(kind)
    feed(c, r, [4, 1])
    d = copy.deepcopy(c)
    assert d.trim(3) == 3
    assert c.offset == r.offset == 5
    assert_same_state(c, r)


# --------------------------------------------------------------------------
# Python subclasses


class MyCache(kvcore.KVCache):
    def __init__(self, name="layer0"):
        super().__init__()
        self.name = name
        self.history = []

    def update_and_fetch(self, keys, values):
        self.history.append(keys.shape[2])
        return super().update_and_fetch(keys, values)


class RefMyCache(ref.KVCache):
    def __init__(self, name="layer0"):
        super().__init__()
        self.name = name
        self.history = []

    def update_and_fetch(self, keys, values):
        self.history.append(keys.shape[2])
        return super().update_and_fetch(keys, values)


def test_subclass_basic():
    c, r = MyCache("attn"), RefMyCache("attn")
    assert isinstance(c, kvcore.KVCache) and isinstance(c, MyCache)
    assert type(c) is MyCache
    feed(c, r, [3, 1, 1])
    assert c.history == r.history == [3, 1, 1]
    assert c.name == "attn"
    assert_same_state(c, r)
    assert c.make_mask(1, return_array=False, window_size=None) is None


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
def test_subclass_copy_keeps_type_and_attributes(copier):
    c, r = MyCache("attn"), RefMyCache("attn")
    feed(c, r, [3, 1])
    d = copier(c)
    rd = copier(r)
    assert type(d) is MyCache
    assert d.name == "attn"
    assert d.history == [3, 1]
    if copier is copy.deepcopy:
        assert d.history is not c.history
    else:
        assert d.history is c.history  # shallow, as for any Python object
    assert_same_state(d, c)
    update_both(d, rd, 2, 99)
    assert c.offset == 4 and d.offset == 6
    assert d.history[-1] == 2
    assert_same_state(d, rd)
    if copier is copy.deepcopy:
        assert c.history == [3, 1]


def test_subclass_deepcopy_memo_shared_objects():
    shared = {"tag": 1}
    a, b = MyCache(), MyCache()
    a.meta = b.meta = shared
    a2, b2 = copy.deepcopy([a, b])
    assert type(a2) is MyCache and type(b2) is MyCache
    assert a2.meta is b2.meta and a2.meta is not shared
    assert a2.meta == shared


def test_subclass_from_state():
    c, r = MyCache(), RefMyCache()
    feed(c, r, [5, 1])
    d = MyCache.from_state(c.state)
    rd = RefMyCache.from_state(r.state)
    assert type(d) is MyCache and type(rd) is RefMyCache
    assert not hasattr(d, "name") and not hasattr(rd, "name")  # no __init__
    assert_same_state(d, rd)
    d.history = []
    rd.history = []
    update_both(d, rd, 1, 7)
    assert_same_state(d, rd)


@pytest.mark.parametrize("kind", ["RotatingKVCache", "ConcatenateKVCache"])
def test_other_subclasses_from_state_and_copy(kind):
    base, refbase = getattr(kvcore, kind), getattr(ref, kind)
    Sub = type("Sub", (base,), {"extra": "class-level"})
    RefSub = type("RefSub", (refbase,), {})
    c, r = Sub(*args_for(kind)), RefSub(*args_for(kind))
    c.tag = [1]
    feed(c, r, LENGTHS["rotated"] if kind == "RotatingKVCache" else [3, 1])
    d = Sub.from_state(c.state)
    assert type(d) is Sub and d.extra == "class-level"
    assert_same_state(d, RefSub.from_state(r.state))
    e = copy.deepcopy(c)
    assert type(e) is Sub and e.tag == [1] and e.tag is not c.tag
    assert_same_state(e, r)


def test_subclass_state_property_is_honoured_by_from_state():
    seen = []

    class Tagged(kvcore.KVCache):
        @property
        def state(self):
            return (*kvcore.KVCache.state.fget(self), self.tag)

        @state.setter
        def state(self, v):
            seen.append(len(v))
            *inner, self.tag = v
            kvcore.KVCache.state.fset(self, tuple(inner))

    class RefTagged(ref.KVCache):
        @property
        def state(self):
            return (*ref.KVCache.state.fget(self), self.tag)

        @state.setter
        def state(self, v):
            *inner, self.tag = v
            ref.KVCache.state.fset(self, tuple(inner))

    c, r = kvcore.KVCache(), ref.KVCache()
    feed(c, r, [3, 1])
    t = Tagged.from_state((*c.state, "hello"))
    rt = RefTagged.from_state((*r.state, "hello"))
    assert seen == [4]
    assert type(t) is Tagged and t.tag == rt.tag == "hello"
    assert len(t.state) == 4 and t.state[3] == "hello"
    assert t.offset == rt.offset == 4
    update_both(t, rt, 1, 3)
    assert_same_state(t, rt)
    # A state setter that rejects is honoured too.

    class Refuses(kvcore.KVCache):
        @property
        def state(self):
            return kvcore.KVCache.state.fget(self)

        @state.setter
        def state(self, v):
            raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="nope"):
        Refuses.from_state(c.state)


# --------------------------------------------------------------------------
# step


def growth(c, r, lengths):
    shapes = []
    for i, S in enumerate(lengths):
        update_both(c, r, S, 3 * i)
        assert c.keys.shape == r.keys.shape
        shapes.append(c.keys.shape[2])
    assert_same_state(c, r)
    return shapes


ONE_AT_A_TIME = [1] * 10


def test_subclass_step_class_attribute():
    class Small(kvcore.KVCache):
        step = 4

    class RefSmall(ref.KVCache):
        step = 4

    shapes = growth(Small(), RefSmall(), ONE_AT_A_TIME + [5, 1])
    # S=5 at offset 10: cut to 10, add two steps (as mlx-lm)
    assert shapes == [4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 18, 18]


def test_subclass_step_rotating():
    class Small(kvcore.RotatingKVCache):
        step = 3

    class RefSmall(ref.RotatingKVCache):
        step = 3

    shapes = growth(Small(8, 2), RefSmall(8, 2), ONE_AT_A_TIME)
    assert shapes == [3, 3, 3, 6, 6, 6, 8, 8, 8, 8]


def test_instance_step():
    c, r = kvcore.KVCache(), ref.KVCache()
    c.step = r.step = 8
    assert c.step == 8 and kvcore.KVCache.step == 256
    shapes = growth(c, r, ONE_AT_A_TIME + [9])
    assert shapes == [8] * 8 + [16, 16, 26]
    other = kvcore.KVCache()
    assert other.step == 256
    k = mx.ones((1, 2, 1, 4))
    other.update_and_fetch(k, k)
    assert other.keys.shape[2] == 256


def test_instance_step_on_subclass_overrides_class():
    class Small(kvcore.KVCache):
        step = 4

    c, r = Small(), ref.KVCache()
    c.step = r.step = 2
    assert growth(c, r, [1, 1, 1]) == [2, 2, 4]


@pytest.mark.parametrize("kind", ["KVCache", "RotatingKVCache"])
def test_class_step_changes_later_growth(kind):
    cls, refcls = getattr(kvcore, kind), getattr(ref, kind)
    saved, refsaved = cls.__dict__["step"], refcls.__dict__["step"]
    assert saved == refsaved == 256
    args = (40, 2) if kind == "RotatingKVCache" else ()
    try:
        cls.step = refcls.step = 16
        c, r = cls(*args), refcls(*args)
        assert c.step == 16
        shapes = growth(c, r, [1] * 18)
        assert shapes[0] == 16 and shapes[-1] == 32
        # Existing instances see it at their next growth, as in mlx-lm.
        cls.step = refcls.step = 4
        more = growth(c, r, [1] * 16)
        assert more[-1] == (36 if kind == "KVCache" else 36)

        class Sub(cls):
            pass

        assert Sub.step == 4
    finally:
        cls.step = saved
        refcls.step = refsaved
    assert cls.step == 256
    fresh, rfresh = cls(*args), refcls(*args)
    assert growth(fresh, rfresh, [1])[0] == (256 if kind == "KVCache" else 40)


# --------------------------------------------------------------------------
# arrays handed out stay valid (run apart: a failure here can be a crash)


def run_isolated(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            "c.update_and_fetch(mx.zeros((1, 2, 300, 4)), mx.zeros((1, 2, 300, 4)))",
            id="update",
        ),
        pytest.param("c.keys = None; c.values = None", id="set-None"),
        pytest.param(
            "o = type(c)(*args); o.update_and_fetch(mx.ones((1, 2, 2, 4)), mx.ones((1, 2, 2, 4))); "
            "c.state = o.state",
            id="set-state",
        ),
        pytest.param("c.trim(2)", id="trim"),
        pytest.param("del c", id="del"),
    ],
)
def test_held_keys_survive_cache_changes(kind, change):
    # `held = cache.keys` must stay a valid array whatever the cache does
    # next; mlx-lm's held array is unaffected by rebinding the attribute.
    code = f"""
        import gc
        import numpy as np
        import mlx.core as mx
        import kvcore
        import mlx_lm.models.cache as ref
        args = {args_for(kind)!r}
        out = []
        for mod in (ref, kvcore):
            c = getattr(mod, {kind!r})(*args)
            k = mx.array(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
            c.update_and_fetch(k, k)
            held = c.keys
            held_v = c.values
            before = (held.shape, np.array(held).tolist())
            {change}
            gc.collect()
            mx.eval(held, held_v)
            after = (held.shape, np.array(held).tolist(), held_v.shape)
            out.append((before, after))
            print(mod.__name__, "ok", flush=True)
        print("SAME" if out[0] == out[1] else f"DIFFERENT ref={{out[0][1][0]}} kvcore={{out[1][1][0]}}")
    """
    proc = run_isolated(code)
    assert proc.returncode == 0, (
        f"process died (rc {proc.returncode}) after `{change}`: "
        f"{proc.stdout[-300:]} {proc.stderr[-500:]}"
    )
    assert proc.stdout.strip().splitlines()[-1] == "SAME", proc.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_returned_arrays_survive_cache_reset(kind):
    code = f"""
        import numpy as np
        import mlx.core as mx
        import kvcore
        c = kvcore.{kind}(*{args_for(kind)!r})
        k = mx.array(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
        rk, rv = c.update_and_fetch(k, k)
        st = c.state
        c.keys = None; c.values = None
        c.state = kvcore.{kind}(*{args_for(kind)!r}).state
        print(float(rk.sum()), float(st[0].sum()), rk.shape)
    """
    proc = run_isolated(code)
    assert proc.returncode == 0, f"process died (rc {proc.returncode}): {proc.stderr[-500:]}"
    total, state_total, _ = proc.stdout.strip().split(" ", 2)
    assert float(total) == float(sum(range(24)))


def test_type_stub_covers_the_extension():
    # python/kvcore/_ext.pyi is generated from the module
    # (python -m nanobind.stubgen -m kvcore._ext -o python/kvcore/_ext.pyi);
    # a binding added without regenerating it fails here.
    import pathlib

    stub = (pathlib.Path(kvcore.__file__).parent / "_ext.pyi").read_text()
    for name in dir(kvcore._ext):
        if name.startswith("_") or name.startswith("Cache"):
            continue
        assert (f"class {name}" in stub) or (f"def {name}(" in stub), name


def test_repr_names_class_offset_and_buffer():
    c = kvcore.KVCache()
    assert repr(c) == "KVCache(offset=0, keys=None)"
    k = mx.zeros((1, 2, 3, 4), mx.float16)
    c.update_and_fetch(k, k)
    assert repr(c) == "KVCache(offset=3, keys=(1, 2, 256, 4) float16)"
    b = kvcore.BatchKVCache([1, 0])
    assert repr(b) == "BatchKVCache(batch=2, _idx=0, keys=None)"
