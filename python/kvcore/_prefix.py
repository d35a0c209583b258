"""PromptTrie.search's result, as mlx-lm's dataclass (the search itself is
C++), and LRUPromptCache's hooks for prefill checkpoints (_checkpoints)."""

import atexit
from dataclasses import dataclass
from typing import Any, List, Optional

from . import _checkpoints, _ext


@dataclass
class PromptTrieResult:
    model: Any
    exact: Optional[List[int]]  # the tokens themselves hold a value
    shorter: Optional[List[int]]  # the longest shorter prefix holding one
    longer: Optional[List[int]]  # the shortest stored extension
    common_prefix: int  # tokens shared with any stored sequence


def _search(self, model: Any, tokens: List[int]) -> PromptTrieResult:
    """Exact, shorter and longer matches of tokens, as mlx-lm's."""
    exact, shorter, longer, common_prefix = self._search(model, tokens)
    return PromptTrieResult(model, exact, shorter, longer, common_prefix)


_ext.PromptTrie.search = _search


_fetch_nearest_cache = _ext.LRUPromptCache.fetch_nearest_cache


def _fetch_and_note(self, model, tokens):
    cache, rest = _fetch_nearest_cache(self, model, tokens)
    _checkpoints.note_fetch(self, model, tokens, len(rest))
    return cache, rest


_fetch_and_note.__doc__ = _fetch_nearest_cache.__doc__
_fetch_and_note.__name__ = "fetch_nearest_cache"
_ext.LRUPromptCache.fetch_nearest_cache = _fetch_and_note
_ext.LRUPromptCache.prefill_checkpoints = _checkpoints.prefill_checkpoints

# Disk tiers write on threads of their own: finish before the interpreter goes.
atexit.register(_ext._flush_disk_tiers)
