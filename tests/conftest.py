"""Shared helpers for kvcore's tests.

Import them explicitly: ``from conftest import assert_arrays_equal``.
Each helper is self-contained; helpers for parity checks against mlx-lm.
"""

import threading

import mlx.core as mx
import pytest

# Unsigned integer views used for bit-exact comparison of float arrays.
_BIT_VIEWS = {
    mx.float16: mx.uint16,
    mx.bfloat16: mx.uint16,
    mx.float32: mx.uint32,
}


def assert_arrays_equal(a, b, what="array"):
    """Both are mx.arrays of the same shape and dtype, equal element for
    element and, for floats, bit for bit (so -0.0 != +0.0, NaN must match)."""
    assert isinstance(a, mx.array), f"{what}: expected mx.array, got {type(a)!r}"
    assert isinstance(b, mx.array), f"{what}: expected mx.array, got {type(b)!r}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    bits = _BIT_VIEWS.get(a.dtype)
    if bits is not None:
        equal = mx.array_equal(a.view(bits), b.view(bits)).item()
    else:
        equal = mx.array_equal(a, b).item()
    assert equal, f"{what}: values differ\n{a}\n!=\n{b}"


def assert_states_equal(ref_state, got_state, what="state"):
    """Element-wise comparison of two cache state tuples: arrays exactly,
    None with None, scalars with == (and the same type, so 3 != 3.0/True)."""
    assert isinstance(got_state, tuple), f"{what}: expected a tuple, got {type(got_state)!r}"
    ref_state = tuple(ref_state)
    assert len(ref_state) == len(got_state), (
        f"{what}: {len(ref_state)} items != {len(got_state)} items"
    )
    for i, (r, g) in enumerate(zip(ref_state, got_state)):
        item = f"{what}[{i}]"
        if r is None:
            assert g is None, f"{item}: expected None, got {g!r}"
        elif isinstance(r, mx.array):
            assert_arrays_equal(r, g, item)
        else:
            assert type(r) is type(g), f"{item}: type {type(r)!r} != {type(g)!r}"
            assert r == g, f"{item}: {r!r} != {g!r}"


def assert_masks_equal(ref_mask, got_mask, what="mask"):
    """Masks as caches return them: None, the string "causal", or an array."""
    if ref_mask is None:
        assert got_mask is None, f"{what}: expected None, got {got_mask!r}"
    elif isinstance(ref_mask, str):
        assert isinstance(got_mask, str) and got_mask == ref_mask, (
            f"{what}: expected {ref_mask!r}, got {got_mask!r}"
        )
    else:
        assert_arrays_equal(ref_mask, got_mask, what)


def int_valued_normal(key, shape, dtype, scale=30.0):
    """Integer-valued random data (exact in float16/bfloat16/float32), NaN-free.

    Deterministic in ``key``: calling twice gives two distinct mx.array objects
    with identical contents, so each cache can get its own input arrays.
    """
    x = mx.round(mx.random.normal(shape, key=key) * scale)
    x = x.astype(dtype)
    mx.eval(x)
    return x


def run_in_threads(work, n=4):
    """work(i) on n threads at once; the exceptions they raised."""
    errors = []

    def run(i):
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def memory_limit():
    """A memory limit of 1 GiB: small enough that a huge size must be refused
    before it allocates (kvcore checks every allocation against it)."""
    old = mx.set_memory_limit(1 << 30)
    try:
        yield
    finally:
        mx.set_memory_limit(old)
