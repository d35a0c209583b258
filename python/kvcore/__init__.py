"""kvcore: KV caches for MLX language models, in C++.

A drop-in for ``mlx_lm.models.cache``: the same classes, signatures,
attributes and results, each hot call a single native call.
"""

from ._version_check import check_mlx_version as _check_mlx_version

_check_mlx_version()

from ._ext import (  # noqa: E402
    CacheError,
    CacheIndexError,
    CacheKeyError,
    CacheNotImplementedError,
    CacheRuntimeError,
    CacheTypeError,
    CacheValueError,
    ArraysCache,
    BatchKVCache,
    BatchRotatingKVCache,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    LRUPromptCache,
    PromptTrie,
    TokenBuffer,
    QuantizedBatchKVCache,
    QuantizedBatchRotatingKVCache,
    QuantizedKVCache,
    QuantizedRotatingKVCache,
    RotatingKVCache,
    create_attention_mask,
    create_causal_mask,
    dequantizes_in_attention,
    dynamic_roll,
    quantized_matmul_mode,
    quantized_scaled_dot_product_attention,
    set_quantized_matmul,
)
from ._cache_list import CacheList  # noqa: E402
from ._prefix import PromptTrieResult  # noqa: E402
from ._attention import scaled_dot_product_attention  # noqa: E402
from ._files import load_prompt_cache, save_prompt_cache  # noqa: E402
from ._prompt import (  # noqa: E402
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from ._mlx_lm import patch_mlx_lm, unpatch_mlx_lm  # noqa: E402
from ._build_info import KVCORE_VERSION as __version__  # noqa: E402

__all__ = [
    "CacheError",
    "CacheList",
    "CacheIndexError",
    "CacheKeyError",
    "CacheNotImplementedError",
    "CacheRuntimeError",
    "CacheTypeError",
    "CacheValueError",
    "ArraysCache",
    "BatchKVCache",
    "BatchRotatingKVCache",
    "ChunkedKVCache",
    "ConcatenateKVCache",
    "KVCache",
    "LRUPromptCache",
    "PromptTrie",
    "PromptTrieResult",
    "TokenBuffer",
    "QuantizedBatchKVCache",
    "QuantizedBatchRotatingKVCache",
    "QuantizedKVCache",
    "QuantizedRotatingKVCache",
    "RotatingKVCache",
    "can_trim_prompt_cache",
    "create_attention_mask",
    "create_causal_mask",
    "dequantizes_in_attention",
    "dynamic_roll",
    "load_prompt_cache",
    "make_prompt_cache",
    "patch_mlx_lm",
    "quantized_matmul_mode",
    "quantized_scaled_dot_product_attention",
    "save_prompt_cache",
    "scaled_dot_product_attention",
    "set_quantized_matmul",
    "trim_prompt_cache",
    "unpatch_mlx_lm",
]
