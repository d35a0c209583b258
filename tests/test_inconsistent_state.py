"""Caches whose attributes were set inconsistently, indices out of range and
ints that do not fit: each gives a typed kvcore error (never a crash or a
silent wrap-around) and a failed call changes nothing. Calls that once
crashed run in a child process."""

import subprocess
import sys
import textwrap

import mlx.core as mx
import pytest
from mlx_lm.models import cache as ref

import kvcore
from conftest import assert_states_equal


def run_child(code):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-800:]}"
    return proc.stdout.strip().splitlines()


CHILD_CASES = {
    "batch filter, keys without values": """
        b = kvcore.BatchKVCache([0]); b.keys = mx.zeros((1, 1, 4, 8))
        b.filter([0])""",
    "batch extend, keys without values": """
        b = kvcore.BatchKVCache([0]); b.keys = mx.zeros((1, 1, 4, 8))
        b.extend(kvcore.BatchKVCache([0]))""",
    "batch filter, offsets longer than the keys' batch": """
        b = kvcore.BatchKVCache([0]); k = mx.ones((1, 1, 3, 8)); b.update_and_fetch(k, k)
        n = 1 << 20
        b.offset = mx.zeros((n,), mx.int32); b.left_padding = mx.zeros((n,), mx.int32)
        b.filter([n - 1]); mx.eval(b.keys)""",
    "batch extract, fewer paddings than rows": """
        b = kvcore.BatchKVCache([0, 0, 0, 0]); k = mx.ones((4, 1, 3, 8)); b.update_and_fetch(k, k)
        b.left_padding = mx.array([0])
        b.extract(1)""",
    "arrays filter, index past the rows": """
        c = kvcore.ArraysCache(1); c[0] = mx.zeros((2, 4))
        c.filter([1 << 24]); mx.eval(c[0])""",
}


@pytest.mark.parametrize("name", sorted(CHILD_CASES))
def test_inconsistent_or_out_of_range_input_is_a_typed_error(name):
    out = run_child(
        "import mlx.core as mx, kvcore\n"
        "try:\n"
        + textwrap.indent(textwrap.dedent(CHILD_CASES[name]).strip(), "    ")
        + "\n    print('no error')\n"
        "except kvcore.CacheError as e:\n"
        "    print(type(e).__name__)\n"
    )
    assert out[-1] in {"CacheValueError", "CacheRuntimeError", "CacheIndexError"}, out


def test_merge_of_caches_with_offsets_but_no_arrays_is_refused():
    c = kvcore.KVCache()
    c.offset = 5
    with pytest.raises(kvcore.CacheValueError, match="offsets without arrays"):
        kvcore.BatchKVCache.merge([c])


def test_failed_rotating_batch_extend_changes_neither_cache():
    def rotated(dtype, steps):
        b = kvcore.BatchRotatingKVCache(3, [0])
        b.update_and_fetch(mx.ones((1, 1, 2, 4), dtype), mx.ones((1, 1, 2, 4), dtype))
        for _ in range(steps):
            b.update_and_fetch(mx.ones((1, 1, 1, 4), dtype), mx.ones((1, 1, 1, 4), dtype))
        return b

    a, o = rotated(mx.float32, 2), rotated(mx.float16, 3)
    before = (a.state, o.state)
    with pytest.raises(kvcore.CacheValueError, match="same heads, head dims and dtype"):
        a.extend(o)
    assert_states_equal(before[0], a.state)
    assert_states_equal(before[1], o.state)


def test_failed_cache_list_filter_changes_no_inner_cache():
    a = kvcore.ArraysCache(1)
    a[0] = mx.arange(8).reshape(2, 4)
    b = kvcore.BatchKVCache([0])
    k = mx.ones((1, 1, 2, 4))
    b.update_and_fetch(k, k)
    cl = kvcore.CacheList(a, b)
    with pytest.raises(kvcore.CacheIndexError):
        cl.filter([1])  # a has two rows, b one
    assert cl[0][0].shape == (2, 4)
    assert cl[0] is a and cl[1] is b
    cl2 = kvcore.CacheList(a, kvcore.ArraysCache(1))
    cl2[1][0] = mx.zeros((2, 3))
    cl2.filter([1])  # succeeds: both inner caches change, in place
    assert a[0].tolist() == [[4, 5, 6, 7]]


def test_ints_that_do_not_fit_the_padding_dtype_raise_like_mlx():
    rp = mx.array([1, 0], mx.uint8)
    with pytest.raises(ValueError):
        ref.create_causal_mask(2, 300, right_padding=rp)  # mlx refuses 302 as uint8
    with pytest.raises(kvcore.CacheValueError, match="fits uint8"):
        kvcore.create_causal_mask(2, 300, right_padding=rp)
    c = kvcore.ArraysCache(1)
    c.lengths = mx.array([5], mx.int8)
    with pytest.raises(kvcore.CacheValueError, match="fits int8"):
        c.advance(300)
    assert c.lengths.tolist() == [5]


def test_rotating_batch_mask_refuses_absurd_n():
    b = kvcore.BatchRotatingKVCache(10, [0])
    k = mx.ones((1, 1, 9, 2))
    b.update_and_fetch(k, k)
    with pytest.raises(kvcore.CacheValueError, match="offset \\+ N"):
        b.make_mask(2**31 - 1)


def test_scalar_slots_cannot_be_extracted_or_extended():
    c = kvcore.ArraysCache(1)
    c[0] = mx.array(1.0)
    with pytest.raises(kvcore.CacheValueError, match="slots with a batch axis"):
        c.extract(0)
    with pytest.raises(kvcore.CacheValueError, match="slots with a batch axis"):
        c.extend(kvcore.ArraysCache(1))


def test_forged_file_details_are_typed_errors(tmp_path):
    # An old-layout KVCache whose keys are 1-D.
    old = tmp_path / "old.safetensors"
    mx.save_safetensors(str(old), {"0.0": mx.zeros((4,)), "0.1": mx.zeros((4,))},
                        {"0.0": "", "2.0": "KVCache"})
    with pytest.raises(kvcore.CacheValueError, match="rank-4 keys and values"):
        kvcore.load_prompt_cache(str(old))
    # A 0.32-layout scalar tag whose path is itself nested.
    new = tmp_path / "new.safetensors"
    c = kvcore.KVCache()
    k = mx.ones((1, 1, 2, 4))
    c.update_and_fetch(k, k)
    kvcore.save_prompt_cache(str(new), [c])
    arrays, meta = mx.load(str(new), return_metadata=True)
    meta["2.1.0.0"] = meta.pop("2.1.0")
    mx.save_safetensors(str(new), arrays, meta)
    with pytest.raises(kvcore.CacheValueError, match="scalar entries"):
        kvcore.load_prompt_cache(str(new))
