"""One rank of the sharded-decode check (launched by tests/test_distributed.py
through ``mlx.launch --backend ring -n 2``; see the README for several
machines).

Each rank builds the same random-weight Qwen2-shaped model and runs it
unsharded for the reference, then shards it over the group (tensor
parallel: each rank holds n_kv_heads / size of the KV heads) and runs it
on kvcore's caches: a prefill, then one fixed token per step (a random
model's greedy output soon repeats one token, so the steps are forced and
the logits compared), and greedy generate_step. It saves its prompt cache
mid-way, loads it back and goes on from the loaded copy. The rank writes
what it saw to OUT/rank<r>.json.

    python shard_decode.py OUT
"""

import json
import os
import sys

import mlx.core as mx

import kvcore

kvcore.patch_mlx_lm()

from mlx_lm.generate import generate_step, generation_stream  # noqa: E402

from kvcore._demo import tiny_qwen2  # noqa: E402

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
STEPS = [26, 43, 383, 279, 50, 288, 41, 97, 169, 399, 37, 51]
FIRST, THEN = 6, 6


def greedy(model, prompt, cache, n):
    tokens = [t for t, _ in generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=n)]
    # generate_step has already started (on its own stream) the step after
    # the last one it yields; let it finish before other collectives start.
    mx.synchronize(generation_stream)
    return tokens


def forced(model, cache, prefill, steps):
    """Last-position logits of the prefill, then of each forced token."""
    # Each step is evaluated before the next is built, as generate_step does:
    # the ranks must run their collectives in one order.
    out = [model(mx.array([prefill]), cache=cache)[0, -1]]
    mx.eval(out[-1])
    for t in steps:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
        mx.eval(out[-1])
    return out


def max_diff(a, b):
    return max(mx.abs(x - y).max().item() for x, y in zip(a, b))


def argmaxes(logits):
    return [mx.argmax(x).item() for x in logits]


def main(out):
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()

    model = tiny_qwen2(layers=2, seed=0)
    reference = greedy(model, PROMPT, kvcore.make_prompt_cache(model), FIRST + THEN)
    ref_logits = forced(model, kvcore.make_prompt_cache(model), PROMPT, STEPS)

    model.shard(group)
    cache = kvcore.make_prompt_cache(model)
    first = greedy(model, PROMPT, cache, FIRST)
    heads = cache[0].keys.shape[1]

    path = os.path.join(out, f"rank{rank}.safetensors")
    kvcore.save_prompt_cache(path, cache, {"rank": str(rank), "size": str(size)})
    loaded, meta = kvcore.load_prompt_cache(path, return_metadata=True)
    same_state = all(
        mx.array_equal(a.keys, b.keys).item() and a.offset == b.offset for a, b in zip(cache, loaded)
    )
    loaded_offset = loaded[0].offset
    # Decode on from the last token, on the loaded caches and on the originals.
    then_loaded = greedy(model, first[-1:], loaded, THEN)
    then_original = greedy(model, first[-1:], cache, THEN)

    # Forced steps: sharded against unsharded, and resumed from a file.
    sharded = kvcore.make_prompt_cache(model)
    half = len(STEPS) // 2
    a = forced(model, sharded, PROMPT, STEPS[:half])
    kvcore.save_prompt_cache(path, sharded)
    resumed = kvcore.load_prompt_cache(path)
    b = forced(model, resumed, [STEPS[half]], STEPS[half + 1:])
    sharded_logits = a + b

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "rank": rank,
                "size": size,
                "reference": reference,
                "sharded": first + then_original,
                "from_file": first + then_loaded,
                "kv_heads": heads,
                "offset": loaded_offset,
                "forced_max_diff": max_diff(sharded_logits, ref_logits),
                "forced_argmax": argmaxes(sharded_logits),
                "forced_argmax_reference": argmaxes(ref_logits),
                "metadata": meta,
                "same_state": same_state,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
