"""The per-token write lands in the cache's own buffer: after evaluation the
buffer's memory is the same as before the update (MLX donates a buffer whose
only reference is the cache), exactly as with mlx-lm's caches."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as ref

import kvcore


def data_pointer(a):
    view = np.asarray(a)  # shares the array's memory on the CPU
    p = view.__array_interface__["data"][0]
    del view  # a held view would keep the old buffer alive
    return p


MAKERS = {
    "KVCache": (lambda m: m.KVCache(), 1),
    "RotatingKVCache filling": (lambda m: m.RotatingKVCache(64), 1),
    "RotatingKVCache ring full": (lambda m: m.RotatingKVCache(16), 1),
    "BatchKVCache": (lambda m: m.BatchKVCache([0, 1]), 2),
    "BatchRotatingKVCache": (lambda m: m.BatchRotatingKVCache(16, [0, 1]), 2),
    "ChunkedKVCache": (lambda m: m.ChunkedKVCache(64), 1),
}


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="reads CPU memory")
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_single_token_updates_write_in_place_like_mlx_lm(kind):
    make, B = MAKERS[kind]
    moved = {}
    for mod in (ref, kvcore):
        c = make(mod)
        k = mx.ones((B, 2, 20, 4))
        c.update_and_fetch(k, k)
        mx.eval(c.keys, c.values)
        pointers = []
        for i in range(6):
            x = mx.full((B, 2, 1, 4), float(i))
            out = c.update_and_fetch(x, x)
            del out
            mx.eval(c.keys, c.values)
            pointers.append(data_pointer(c.keys))
        # The first update may trim or grow; after it the buffer stays put.
        moved[mod.__name__] = len(set(pointers[1:]))
    assert moved == {"mlx_lm.models.cache": 1, "kvcore": 1}
