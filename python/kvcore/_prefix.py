"""PromptTrie.search's result, as mlx-lm's dataclass (the search itself is
C++)."""

from dataclasses import dataclass
from typing import Any, List, Optional

from . import _ext


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
