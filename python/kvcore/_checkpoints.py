"""Prefill checkpoints: how they hook into generation.

A cache that cannot be trimmed (a rotating window after it wraps, the
state-space slots of hybrid models) can only be reused by a prompt that
starts with all of its tokens. While such a cache is prefilled, chunk by
chunk, kvcore stores a copy of it at the chunk boundaries in an
``LRUPromptCache`` (``insert_checkpoint``), so a later prompt that shares
part of it resumes from the longest checkpoint inside the shared part.

- ``LRUPromptCache.prefill_checkpoints(model, tokens, prompt_cache, start)``
  gives a ``prompt_progress_callback`` for mlx-lm's ``generate_step`` and
  ``stream_generate``: they call it after each prefill chunk.
- Under ``patch_mlx_lm()``, mlx-lm's ``stream_generate`` and
  ``BatchGenerator`` do it by themselves for ``mlx_lm.server``: a
  ``fetch_nearest_cache`` records its model key and tokens for the thread
  that made it, and the next generation on that thread whose prompt is the
  fetch's rest takes them (the server fetches, then generates, on its one
  generation thread).
"""

import functools
import threading

_pending = threading.local()


def note_fetch(lru, model, tokens, n_rest):
    """Remember a fetch for the next generation call on this thread."""
    _pending.fetch = (lru, model, tokens, len(tokens) - n_rest) if isinstance(tokens, list) else None


def take_fetch():
    """(lru, model, tokens, start) of this thread's last fetch, once."""
    f = getattr(_pending, "fetch", None)
    _pending.fetch = None
    return f


def _layers(prompt_cache):
    for c in prompt_cache:
        inner = getattr(c, "caches", None)
        if isinstance(inner, (list, tuple)):  # CacheList
            yield from _layers(inner)
        else:
            yield c


def needs_checkpoints(prompt_cache):
    """Whether some layer cannot be trimmed, or stops being trimmable once
    its window wraps (rotating caches have a ``max_size``)."""
    return any(
        not c.is_trimmable() or getattr(c, "max_size", None) is not None
        for c in _layers(prompt_cache)
    )


def _holds(prompt_cache, n):
    """Every layer with an int offset is at token n."""
    for c in _layers(prompt_cache):
        offset = getattr(c, "offset", None)
        if isinstance(offset, int) and offset != n:
            return False
    return True


def prefill_checkpoints(self, model, tokens, prompt_cache, start=0, callback=None):
    """A ``prompt_progress_callback`` that keeps checkpoints of prompt_cache.

    For ``generate_step`` / ``stream_generate`` given ``prompt=tokens[start:]``
    and ``prompt_cache`` holding ``tokens[:start]``: after each prefill chunk
    (``processed`` of ``total`` tokens, short of the end) it calls
    ``insert_checkpoint(model, tokens[:start + processed], prompt_cache)``,
    then ``callback(processed, total)`` if given. When every layer of
    prompt_cache stays trimmable it keeps nothing (a longer entry serves any
    prefix by trimming).

    Args:
        model: The model key.
        tokens (list[int]): The whole prompt.
        prompt_cache (list): The caches being prefilled.
        start (int): Tokens prompt_cache holds already.
        callback: The progress callback to chain, or None.

    Returns:
        Callable[[int, int], None]
    """
    tokens = list(tokens)
    wanted = needs_checkpoints(prompt_cache)

    def progress(processed, total):
        n = start + processed
        if wanted and 0 < processed < total and _holds(prompt_cache, n):
            self.insert_checkpoint(model, tokens[:n], prompt_cache)
        if callback is not None:
            callback(processed, total)

    return progress


def checkpointing_stream_generate(stream_generate):
    """mlx-lm's stream_generate, taking checkpoints while it prefills a prompt
    that this thread's last fetch_nearest_cache left as rest."""

    @functools.wraps(stream_generate)
    def wrapper(model, tokenizer, prompt, *args, **kwargs):
        f = take_fetch()
        cache = kwargs.get("prompt_cache")
        if f is not None and cache is not None and kwargs.get("draft_model") is None and not args:
            lru, key, tokens, start = f
            if isinstance(prompt, list) and tokens[start:] == prompt:
                kwargs["prompt_progress_callback"] = lru.prefill_checkpoints(
                    key, tokens, cache, start, kwargs.get("prompt_progress_callback")
                )
        return stream_generate(model, tokenizer, prompt, *args, **kwargs)

    wrapper.__kvcore_wraps__ = stream_generate
    return wrapper


def checkpointing_batch_generator(base):
    """A subclass of mlx-lm's BatchGenerator that takes checkpoints of a
    sequence's caches at its prefill chunk boundaries, for sequences inserted
    right after a fetch_nearest_cache on the same thread. Segment ends are
    left to the server, which stores them itself."""

    class BatchGenerator(base):
        __doc__ = base.__doc__
        __kvcore_wraps__ = base

        def insert_segments(self, *args, **kwargs):
            uids = super().insert_segments(*args, **kwargs)
            f = take_fetch()
            if f is not None and len(uids) == 1:
                self.__dict__.setdefault("_kvcore_targets", {})[uids[0]] = f[:2]
            return uids

        def remove(self, uids, *args, **kwargs):
            for uid in uids:
                self.__dict__.get("_kvcore_targets", {}).pop(uid, None)
            return super().remove(uids, *args, **kwargs)

        def next(self):
            prompt_responses, generation_responses = super().next()
            targets = self.__dict__.get("_kvcore_targets")
            if targets:
                for r in prompt_responses:
                    target = targets.get(r.uid)
                    if target is None:
                        continue
                    if r.end_of_prompt:
                        del targets[r.uid]
                    elif not r.end_of_segment:
                        self._kvcore_checkpoint(r.uid, *target)
            return prompt_responses, generation_responses

        def _kvcore_checkpoint(self, uid, lru, model):
            if not needs_checkpoints(self._prompt_batch.prompt_cache):
                return
            for cache, tokens in self.extract_cache([uid]).values():
                if _holds(cache, len(tokens)):
                    lru.insert_checkpoint(model, list(tokens), cache)

    BatchGenerator.__name__ = base.__name__
    BatchGenerator.__qualname__ = base.__qualname__
    return BatchGenerator
