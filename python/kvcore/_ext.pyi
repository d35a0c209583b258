"""kvcore's native caches (mlx::core C++), shared with mlx.core."""

import os
from typing import Self

import mlx.core

from kvcore import (
    CacheError as CacheError,
    CacheIndexError as CacheIndexError,
    CacheKeyError as CacheKeyError,
    CacheNotImplementedError as CacheNotImplementedError,
    CacheRuntimeError as CacheRuntimeError,
    CacheTypeError as CacheTypeError,
    CacheValueError as CacheValueError
)
from kvcore._checkpoints import (
    prefill_checkpoints as prefill_checkpoints
)
from kvcore._prefix import (
    _search as search,
    fetch_nearest_cache as fetch_nearest_cache
)


__mlx_version__: str = '0.32.4'

def create_causal_mask(N: int, offset: int = 0, window_size: int | None = None, right_padding: mlx.core.array | None = None, left_padding: mlx.core.array | None = None) -> mlx.core.array:
    """
    Boolean causal mask for ``N`` queries after ``offset`` cached tokens.

    Args:
        N (int): Number of new (query) tokens.
        offset (int): Tokens already in the cache.
        window_size (int, optional): Each query sees at most this many
          keys, itself included.
        right_padding (array, optional): Per-sequence (B,) counts of
          padded tokens at the end; masks them out.
        left_padding (array, optional): Per-sequence (B,) counts of
          padded tokens at the start; masks them out.

    Returns:
        array: ``(N, offset + N)``, or ``(B, 1, N, offset + N)`` with
        padding; ``True`` where attention is allowed.
    """

def create_attention_mask(N: int, offset: int, return_array: bool, window_size: int | None) -> mlx.core.array | str | None:
    """
    The mask a full-attention cache gives its layer.

    Args:
        N (int): Number of new tokens.
        offset (int): Tokens already in the cache.
        return_array (bool): Return an array even where ``"causal"``
          would do.
        window_size (int, optional): Sliding-window width.

    Returns:
        array | str | None: the windowed mask when ``window_size`` is
        set, ``None`` for one token, the mask array when
        ``return_array``, else ``"causal"``.
    """

class KVCache:
    """Full-attention cache: a buffer grown ``step`` slots at a time."""

    def __init__(self, *, capacity: int | None = None) -> None:
        """
        Args:
            capacity (int, optional): Tokens to allocate room for at the
              first update, so that filling up to it never copies the
              buffer (a long prefill then peaks at the cache's own size).
              Past it, the cache grows by ``step`` as without.
        """

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> int:
        """Tokens seen so far: the position of the next token."""

    @offset.setter
    def offset(self, value: int, /) -> None: ...

    @property
    def capacity(self) -> int:
        """
        Tokens the buffer gets room for when next allocated (0: ``step`` at a time).
        """

    @capacity.setter
    def capacity(self, value: int, /) -> None: ...

    def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None:
        """
        The attention mask for ``N`` new tokens.

        Args:
            N (int): Number of new tokens.
            return_array (bool): Return an array even where ``"causal"`` would do.
            window_size (int, optional): Sliding-window width.

        Returns:
            array | str | None: A boolean mask, ``"causal"`` or ``None``.
        """

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset)``; the buffers are whole, as mlx-lm keeps them.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedKVCache:
        """
        The same tokens in a QuantizedKVCache.

        Args:
            group_size (int | tuple): Quantization group size, or
              ``(keys, values)``.
            bits (int | tuple): Bits per element, or ``(keys, values)``
              such as ``(8, 4)``.
            scheme (str): ``"affine"`` (mlx-lm's) or ``"rotated-channel"``
              (see QuantizedKVCache).
            window (int, optional): ``"rotated-channel"``: tokens kept in
              float (default 128).
            sink (int): ``"rotated-channel"``: first tokens kept in float
              too (see QuantizedKVCache).

        Returns:
            QuantizedKVCache: With this cache's offset and quantized buffers.
        """

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[KVCache | RotatingKVCache]) -> BatchKVCache:
        """
        A BatchKVCache holding these caches as rows (KVCaches, or
        RotatingKVCaches whose buffer holds their tokens in order).
        """

class ConcatenateKVCache:
    """Full-attention cache that concatenates on every update."""

    def __init__(self) -> None: ...

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> int:
        """Tokens seen so far: the position of the next token."""

    @offset.setter
    def offset(self, value: int, /) -> None: ...

    @property
    def capacity(self) -> int:
        """
        Tokens the buffer gets room for when next allocated (0: ``step`` at a time).
        """

    @capacity.setter
    def capacity(self, value: int, /) -> None: ...

    def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None:
        """
        The attention mask for ``N`` new tokens.

        Args:
            N (int): Number of new tokens.
            return_array (bool): Return an array even where ``"causal"`` would do.
            window_size (int, optional): Sliding-window width.

        Returns:
            array | str | None: A boolean mask, ``"causal"`` or ``None``.
        """

    @property
    def state(self) -> tuple:
        """``(keys, values)``."""

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

class RotatingKVCache:
    """
    Sliding-window cache: a ring of ``max_size`` slots, the first ``keep`` pinned.
    """

    def __init__(self, max_size: int, keep: int = 0) -> None:
        """
        Args:
            max_size (int): Slots in the ring (the window), at least 1.
            keep (int): Leading tokens never rotated out, below max_size.
        """

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> int:
        """Tokens seen so far: the position of the next token."""

    @offset.setter
    def offset(self, value: int, /) -> None: ...

    @property
    def capacity(self) -> int:
        """
        Tokens the buffer gets room for when next allocated (0: ``step`` at a time).
        """

    @capacity.setter
    def capacity(self, value: int, /) -> None: ...

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array | str | None:
        """
        The attention mask for ``N`` new tokens.

        Args:
            N (int): Number of new tokens.
            return_array (bool): Return an array even where ``"causal"`` would do.
            window_size (int, optional): Sliding-window width.

        Returns:
            array | str | None: A boolean mask, ``"causal"`` or ``None``.
        """

    @property
    def keep(self) -> int:
        """Leading tokens that are never rotated out."""

    @keep.setter
    def keep(self, arg: object | None, /) -> None: ...

    def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedRotatingKVCache:
        """
        The same ring (offset, cursor, window), each slot quantized.
        mlx-lm raises NotImplementedError here.

        Args:
            group_size (int | tuple): Group size, or ``(keys, values)``.
            bits (int | tuple): Bits, or ``(keys, values)``, e.g. ``(8, 4)``.
            scheme (str): ``"affine"`` or ``"rotated-channel"`` (see
              QuantizedRotatingKVCache).
            window (int, optional): ``"rotated-channel"``: tokens kept
              in float (default 128).
            sink (int): ``"rotated-channel"``: first tokens kept in
              float too, at most ``keep``.

        Returns:
            QuantizedRotatingKVCache: With this cache's tokens.
        """

    @property
    def state(self) -> tuple:
        """``(keys, values, offset, keep, max_size, _idx)``."""

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @property
    def max_size(self) -> int:
        """Slots in the ring."""

    @max_size.setter
    def max_size(self, arg: object | None, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[RotatingKVCache]) -> BatchRotatingKVCache:
        """A BatchRotatingKVCache holding these caches as rows."""

class QuantizedKVCache:
    """
    Full-attention cache holding keys and values quantized by ``mx.quantize``.
    """

    def __init__(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, capacity: int | None = None, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None:
        """
        Args:
            group_size (int | tuple): Quantization group size (32, 64 or
              128), or a ``(keys, values)`` pair.
            bits (int | tuple): Bits per element (2, 3, 4, 5, 6 or 8), or a
              ``(keys, values)`` pair such as ``(8, 4)``.
            capacity (int, optional): Tokens to allocate room for at the
              first update.
            scheme (str): ``"affine"`` (mlx-lm's layout) or
              ``"rotated-channel"``: keys and values rotated by a Hadamard
              transform of the head dim (a power of two), keys quantized
              per channel over groups of ``group_size`` tokens, values per
              token; the newest ``window`` tokens and the group not yet
              full stay in float.
            window (int, optional): ``"rotated-channel"``: tokens kept in
              float (default 128; 0 keeps only the partial group).
            sink (int): ``"rotated-channel"``: the first tokens (the
              attention sink), kept in float too and read in place of
              their quantized form (0 to 256; 0: none).
        """

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[tuple, tuple]:
        """
        Quantize and append new keys and values.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple: The cached ``(weights, scales, biases)`` of the keys
            and of the values, up to ``offset``. ``"rotated-channel"``:
            ``(weights, scales, biases, residual)`` for each, the
            quantized tokens (keys' weights transposed: ``(B, H, D,
            tokens * bits / 32)``) and the rotated float residual of the
            newest tokens (or None).
        """

    def keys_and_values(self) -> object:
        """The cached keys and values as ``update_and_fetch`` returns them."""

    @property
    def scheme(self) -> str:
        """``"affine"`` or ``"rotated-channel"``."""

    @property
    def window(self) -> int:
        """``"rotated-channel"``: the newest tokens kept in float (0 for affine)."""

    @property
    def sink(self) -> int:
        """``"rotated-channel"``: the first tokens kept in float too (0: none)."""

    @property
    def sink_keys(self) -> object:
        """
        The sink's keys, rotated, in float ``(B, H, min(sink, offset), D)``, or None.
        """

    @property
    def sink_values(self) -> object:
        """The sink's values, rotated, in float, or None."""

    @property
    def residual(self) -> object:
        """``"rotated-channel"``: the newest keys, rotated, in float, or None."""

    @property
    def value_residual(self) -> object:
        """
        ``"rotated-channel"``: the same tokens' values, rotated, in float, or None.
        """

    @property
    def offset(self) -> int:
        """Tokens seen so far."""

    @offset.setter
    def offset(self, arg: object | None, /) -> None: ...

    @property
    def keys(self) -> object:
        """The keys' ``(weights, scales, biases)`` buffers, or None."""

    @keys.setter
    def keys(self, arg: object | None, /) -> None: ...

    @property
    def values(self) -> object:
        """The values' ``(weights, scales, biases)`` buffers, or None."""

    @values.setter
    def values(self, arg: object | None, /) -> None: ...

    @property
    def group_size(self) -> object:
        """The group size, or ``(keys, values)`` when they differ."""

    @property
    def bits(self) -> object:
        """The bits, or ``(keys, values)`` when they differ."""

    @property
    def capacity(self) -> int:
        """Tokens the buffers get room for when next allocated."""

    @capacity.setter
    def capacity(self, arg: object | None, /) -> None: ...

    @property
    def nbytes(self) -> int: ...

    def empty(self) -> bool: ...

    def size(self) -> int:
        """0, as in mlx-lm (the cache does not report it)."""

    def is_trimmable(self) -> bool: ...

    def trim(self, n: int) -> int: ...

    def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None: ...

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset, group_size, bits)``, keys and values as triples; a ``"rotated-channel"`` cache adds ``(scheme, window, residual keys, residual values)``, and with a sink ``(sink, sink keys, sink values)``.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    def __copy__(self) -> object: ...

    def __deepcopy__(self, memo: object | None) -> object: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> QuantizedBatchKVCache:
        """A QuantizedBatchKVCache holding these caches as rows."""

class ChunkedKVCache:
    """
    Chunked-attention cache: a KVCache that drops tokens before the current chunk.
    """

    def __init__(self, chunk_size: int) -> None: ...

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> int:
        """Tokens seen so far: the position of the next token."""

    @offset.setter
    def offset(self, value: int, /) -> None: ...

    @property
    def capacity(self) -> int:
        """
        Tokens the buffer gets room for when next allocated (0: ``step`` at a time).
        """

    @capacity.setter
    def capacity(self, value: int, /) -> None: ...

    def maybe_trim_front(self) -> None:
        """Keep at most ``chunk_size`` tokens, dropping the oldest."""

    @property
    def chunk_size(self) -> int: ...

    @chunk_size.setter
    def chunk_size(self, arg: object | None, /) -> None: ...

    @property
    def start_position(self) -> int:
        """Absolute position of the first token held."""

    @start_position.setter
    def start_position(self, arg: object | None, /) -> None: ...

    @property
    def state(self) -> tuple:
        """``(keys, values, offset, chunk_size, start_position)``."""

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

def quantized_scaled_dot_product_attention(queries: mlx.core.array, q_keys: tuple, q_values: tuple, scale: float, mask: mlx.core.array | str | None, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', sink: tuple | None = None) -> mlx.core.array:
    """
    mlx-lm's quantized attention, with keys and values at their own bits.

    Args:
        queries (array): ``(B, n_q_heads, L, D)``.
        q_keys (tuple): The keys' ``(weights, scales, biases)``.
        q_values (tuple): The values' ``(weights, scales, biases)``.
        scale (float): Applied to the queries.
        mask (array | str | None): A boolean or additive mask, or ``"causal"``.
        group_size (int | tuple): The group size, or ``(keys, values)``.
        bits (int | tuple): The bits, or ``(keys, values)``, e.g. ``(8, 4)``.
        scheme (str): The cache's scheme. ``"rotated-channel"`` takes
          q_keys and q_values as ``(weights, scales, biases, residual)``
          as its cache returns them, and computes on them without
          dequantizing: queries rotated once, quantized matmuls
          against the keys and the values, matmuls against the float
          residuals, one softmax, the output rotated back.
        sink (tuple, optional): ``"rotated-channel"``: ``(keys, values,
          starts)``, the float first tokens of each row ``(B, H, S, D)``
          and the column of each row's first token ``(B,)`` (None: 0,
          a single sequence's cache); where those tokens are
          quantized, their float keys and values are read instead.

    Returns:
        array: ``(B, n_q_heads, L, v_head_dim)``; with one int for bits and
        group size, equal to mlx-lm's bit for bit (on CUDA, see
        ``set_quantized_matmul``).
    """

def set_quantized_matmul(mode: str) -> None:
    """
    How kvcore's quantized attention multiplies by quantized keys and values.

    Args:
        mode (str): ``"kernel"``: ``mx.quantized_matmul``;
          ``"dequantize"``: a matmul over the dequantized keys and
          values (one layer at a time, in the queries' dtype);
          ``"auto"`` (at start): the kernel, except on a CUDA GPU,
          where mlx 0.32.4's ``quantized_matmul`` lacks most of the
          shapes attention needs and is wrong for some it has.
    """

def quantized_matmul_mode() -> str:
    """The mode ``set_quantized_matmul`` set (``"auto"`` at start)."""

def dequantizes_in_attention() -> bool:
    """
    Whether kvcore's quantized attention dequantizes now: the mode and, for ``"auto"``, the default device.
    """

class QuantizedRotatingKVCache:
    """
    Sliding-window cache holding keys and values quantized by ``mx.quantize``.
    """

    def __init__(self, max_size: int, keep: int = 0, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None:
        """
        Args:
            max_size (int): Slots in the ring (the window), at least 1.
            keep (int): Leading tokens never rotated out, below max_size.
            group_size (int | tuple): 32, 64 or 128; a ``(keys, values)``
              pair to quantize them differently.
            bits (int | tuple): 2, 3, 4, 5, 6 or 8; or a ``(keys,
              values)`` pair, e.g. ``(8, 4)``.
            scheme (str): ``"affine"`` (a ring of ``mx.quantize``
              triples) or ``"rotated-channel"`` (see QuantizedKVCache):
              the groups holding the ``keep`` tokens and the newest
              tokens are held, whole groups the window has left behind
              dropped, and ``make_mask`` hides what the float ring would
              no longer hold.
            window (int, optional): ``"rotated-channel"``: tokens kept in
              float (default 128).
            sink (int): ``"rotated-channel"``: first tokens kept in float
              too, at most ``keep``.
        """

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[tuple, tuple]:
        """
        Quantize new keys and values and add them to the ring.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple: The cached ``(weights, scales, biases)`` of the keys
            and of the values, in the float ring's order.
            ``"rotated-channel"``: ``(weights, scales, biases,
            residual)`` each, as QuantizedKVCache returns them, for the
            tokens held.
        """

    def keys_and_values(self) -> object:
        """The cached keys and values as ``update_and_fetch`` returns them."""

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array | str | None:
        """The attention mask for ``N`` new tokens, as RotatingKVCache's."""

    @property
    def offset(self) -> int:
        """Tokens seen so far."""

    @property
    def max_size(self) -> int:
        """Slots in the ring."""

    @property
    def keep(self) -> int:
        """Leading tokens that are never rotated out."""

    @property
    def scheme(self) -> str:
        """``"affine"`` or ``"rotated-channel"``."""

    @property
    def window(self) -> int:
        """``"rotated-channel"``: the newest tokens kept in float (0 for affine)."""

    @property
    def sink(self) -> int:
        """``"rotated-channel"``: the first tokens kept in float too (0: none)."""

    @property
    def sink_keys(self) -> object:
        """The sink's keys, rotated, in float, or None."""

    @property
    def sink_values(self) -> object:
        """The sink's values, rotated, in float, or None."""

    @property
    def residual(self) -> object:
        """``"rotated-channel"``: the newest keys, rotated, in float, or None."""

    @property
    def value_residual(self) -> object:
        """
        ``"rotated-channel"``: the same tokens' values, rotated, in float, or None.
        """

    @property
    def dropped(self) -> int:
        """
        ``"rotated-channel"``: tokens the window has dropped after the pinned groups.
        """

    @property
    def keys(self) -> object:
        """
        The keys' ``(weights, scales, biases)`` ring (``"rotated-channel"``: the held tokens' buffers), or None.
        """

    @property
    def values(self) -> object:
        """
        The values' ``(weights, scales, biases)`` ring (``"rotated-channel"``: the held tokens' buffers), or None.
        """

    @property
    def group_size(self) -> object:
        """The group size, or ``(keys, values)`` when they differ."""

    @property
    def bits(self) -> object:
        """The bits, or ``(keys, values)`` when they differ."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized rings."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the ring holds."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset, keep, max_size, _idx, group_size, bits)``; keys and values are triples. A ``"rotated-channel"`` cache adds ``(scheme, window, residual keys, residual values)`` (keys and values are then those held, ``_idx`` of them), and with a sink ``(sink, sink keys, sink values)``.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    def __repr__(self) -> str: ...

    def __copy__(self) -> object: ...

    def __deepcopy__(self, memo: object | None) -> object: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[QuantizedRotatingKVCache]) -> QuantizedBatchRotatingKVCache:
        """A QuantizedBatchRotatingKVCache holding these caches as rows."""

class ArraysCache:
    """Per-layer state arrays (conv and SSM states) for state-space models."""

    def __init__(self, size: int, left_padding: list[int] | None = None) -> None:
        """
        Args:
            size (int): Number of slots.
            left_padding (list[int], optional): Per-row prompt padding.
        """

    def __getitem__(self, idx: int) -> mlx.core.array | None: ...

    def __setitem__(self, idx: int, value: mlx.core.array | None) -> None: ...

    @property
    def cache(self) -> list:
        """The slots, as a new list."""

    @cache.setter
    def cache(self, arg: object | None, /) -> None: ...

    @property
    def left_padding(self) -> object: ...

    @left_padding.setter
    def left_padding(self, value: object | None) -> None: ...

    @property
    def lengths(self) -> object: ...

    @lengths.setter
    def lengths(self, value: object | None) -> None: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def state(self) -> tuple:
        """``(slots, left_padding, lengths)``."""

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    def filter(self, batch_indices: object | None) -> None:
        """Keep only these rows, in place."""

    def extend(self, other: ArraysCache) -> None:
        """Append the other cache's rows, in place."""

    def extract(self, idx: object | None) -> object:
        """Row ``idx`` as a one-row cache."""

    def prepare(self, lengths: object | None = None, **kwargs) -> None: ...

    def finalize(self) -> None: ...

    def advance(self, N: object | None) -> None: ...

    def make_mask(self, N: int) -> mlx.core.array | None: ...

    def empty(self) -> bool: ...

    def size(self) -> int: ...

    def is_trimmable(self) -> bool: ...

    @property
    def nbytes(self) -> int: ...

    def __copy__(self) -> object: ...

    def __deepcopy__(self, memo: object | None) -> object: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[ArraysCache]) -> ArraysCache:
        """One cache with a row per input cache."""

def dynamic_roll(x: mlx.core.array, shifts: mlx.core.array, axis: int) -> mlx.core.array:
    """
    Roll each row of ``x`` by its own shift along ``axis``.

    Args:
        x (array): The array.
        shifts (array): Per-row shifts, broadcastable to the leading axes.
        axis (int): The axis to roll.

    Returns:
        array: ``x`` with row ``i`` rolled right by ``shifts[i]``.
    """

class BatchKVCache:
    """Full-attention cache for a batch of left-padded sequences."""

    def __init__(self, left_padding: list[int]) -> None:
        """
        Args:
            left_padding (list[int]): Pad tokens before each row's prompt.
        """

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> mlx.core.array:
        """Per-row positions (B,): tokens seen minus left padding."""

    @offset.setter
    def offset(self, arg: object | None, /) -> None: ...

    @property
    def left_padding(self) -> mlx.core.array:
        """Per-row left padding (B,)."""

    @left_padding.setter
    def left_padding(self, arg: object | None, /) -> None: ...

    def finalize(self) -> None: ...

    def filter(self, batch_indices: object | None) -> None:
        """Keep only these rows, in place."""

    def extend(self, other: Self) -> None:
        """Append the other cache's rows, in place."""

    def prepare(self, *, left_padding: object | None = None, lengths: object | None = None, right_padding: object | None = None) -> None: ...

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mlx.core.array: ...

    def extract(self, idx: object | None) -> object:
        """Row ``idx`` as a KVCache holding only its tokens."""

    @property
    def state(self) -> tuple:
        """``(keys, values, offset, left_padding, _idx)``."""

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[KVCache | RotatingKVCache]) -> BatchKVCache:
        """
        One batch cache from single-sequence KVCaches (or unrotated
        RotatingKVCaches), left-padded.
        """

    def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedBatchKVCache:
        """
        The same rows and padding with keys and values quantized (``scheme``, ``window`` and ``sink`` as QuantizedKVCache's).
        """

class BatchRotatingKVCache:
    """Sliding-window cache for a batch of left-padded sequences."""

    def __init__(self, max_size: int, left_padding: list[int]) -> None: ...

    step: int = 256

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]:
        """
        Append new keys and values and return all the cached ones.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple(array, array): The cached keys and values, new ones included.
        """

    def keys_and_values(self) -> tuple[mlx.core.array, mlx.core.array]:
        """The cached keys and values."""

    @property
    def keys(self, /) -> mlx.core.array | None:
        """The keys buffer, or None before the first update."""

    @keys.setter
    def keys(self, keys: mlx.core.array | None, /) -> None: ...

    @property
    def values(self, /) -> mlx.core.array | None:
        """The values buffer, or None before the first update."""

    @values.setter
    def values(self, values: mlx.core.array | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds (0 where mlx-lm's does not say)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> Self: ...

    def __deepcopy__(self, memo: dict) -> Self: ...

    @property
    def offset(self) -> mlx.core.array:
        """Per-row positions (B,): tokens seen minus left padding."""

    @offset.setter
    def offset(self, arg: object | None, /) -> None: ...

    @property
    def left_padding(self) -> mlx.core.array:
        """Per-row left padding (B,)."""

    @left_padding.setter
    def left_padding(self, arg: object | None, /) -> None: ...

    def finalize(self) -> None: ...

    def filter(self, batch_indices: object | None) -> None:
        """Keep only these rows, in place."""

    def extend(self, other: Self) -> None:
        """Append the other cache's rows, in place."""

    def prepare(self, *, left_padding: object | None = None, lengths: object | None = None, right_padding: object | None = None) -> None: ...

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array: ...

    @property
    def max_size(self) -> int: ...

    @property
    def rotated(self) -> bool: ...

    @rotated.setter
    def rotated(self, arg: object | None, /) -> None: ...

    def extract(self, idx: object | None) -> object:
        """Row ``idx`` as a RotatingKVCache."""

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset, left_padding, max_size, _offset, _idx, rotated)``.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[RotatingKVCache]) -> BatchRotatingKVCache:
        """One batch cache from single-sequence RotatingKVCaches."""

    def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedBatchRotatingKVCache:
        """
        The same rows, ring and padding with keys and values quantized (``scheme`` and ``window`` as QuantizedBatchRotatingKVCache's; no sink).
        """

class QuantizedBatchKVCache:
    """BatchKVCache holding keys and values quantized by ``mx.quantize``."""

    def __init__(self, left_padding: list[int], group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None:
        """
        Args:
            left_padding (list[int]): Pad tokens before each row's prompt.
            group_size (int | tuple): 32, 64 or 128, or ``(keys, values)``.
            bits (int | tuple): 2, 3, 4, 5, 6 or 8, or ``(keys, values)``.
            scheme (str): ``"affine"`` or ``"rotated-channel"`` (as
              QuantizedKVCache's; key groups run along buffer positions
              shared by all rows).
            window (int, optional): ``"rotated-channel"``: tokens kept in
              float (default 128).
            sink (int): ``"rotated-channel"``: each row's first tokens kept
              in float too (as QuantizedKVCache's).
        """

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[tuple, tuple]:
        """
        Quantize new keys and values and add them to the batch.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple: The cached ``(weights, scales, biases)`` of the keys and
            of the values, as the float batch cache returns its arrays.
            ``"rotated-channel"``: ``(weights, scales, biases, residual)``
            for each, as QuantizedKVCache returns them.
        """

    def keys_and_values(self) -> object:
        """The cached keys and values as ``update_and_fetch`` returns them."""

    @property
    def keys(self) -> object:
        """The keys' ``(weights, scales, biases)``, or None."""

    @property
    def values(self) -> object:
        """The values' ``(weights, scales, biases)``, or None."""

    @property
    def offset(self) -> mlx.core.array:
        """Per-row positions (B,): tokens seen minus left padding."""

    @property
    def left_padding(self) -> mlx.core.array:
        """Per-row left padding (B,)."""

    @property
    def group_size(self) -> object:
        """The group size, or ``(keys, values)`` when they differ."""

    @property
    def bits(self) -> object:
        """The bits, or ``(keys, values)`` when they differ."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized buffers."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds per row (the write position)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def finalize(self) -> None:
        """Roll right-padded rows to end at the write position."""

    def filter(self, batch_indices: object | None) -> None:
        """Keep only these rows, in place."""

    def extend(self, other: Self) -> None:
        """Append the other cache's rows (quantized alike), in place."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> object: ...

    def __deepcopy__(self, memo: object | None) -> object: ...

    @property
    def scheme(self) -> str:
        """``"affine"`` or ``"rotated-channel"``."""

    @property
    def window(self) -> int:
        """
        ``"rotated-channel"``: the newest positions kept in float (0 for affine).
        """

    @property
    def sink(self) -> int:
        """
        ``"rotated-channel"``: each row's first tokens kept in float (0: none).
        """

    @property
    def sink_keys(self) -> object:
        """
        Each row's first tokens' keys, rotated, in float ``(B, H, sink, D)``, or None.
        """

    @property
    def sink_values(self) -> object:
        """Their values, rotated, in float, or None."""

    @property
    def residual(self) -> object:
        """
        ``"rotated-channel"``: the float keys of the newest positions, rotated, or None.
        """

    @property
    def value_residual(self) -> object:
        """``"rotated-channel"``: their values, rotated, in float, or None."""

    def prepare(self, *, left_padding: object | None = None, lengths: object | None = None, right_padding: object | None = None) -> None:
        """As BatchKVCache.prepare."""

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mlx.core.array:
        """The attention mask for ``N`` new tokens, as BatchKVCache's."""

    def extract(self, idx: object | None) -> object:
        """Row ``idx`` as a QuantizedKVCache holding only its tokens."""

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset, left_padding, _idx, group_size, bits)``; keys and values are triples. A ``"rotated-channel"`` cache adds ``(scheme, window, residual keys, residual values)``, and with a sink ``(sink, sink keys, sink values)``.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> QuantizedBatchKVCache:
        """One batch cache from QuantizedKVCaches quantized alike, left-padded."""

class QuantizedBatchRotatingKVCache:
    """
    BatchRotatingKVCache holding keys and values quantized by ``mx.quantize``.
    """

    def __init__(self, max_size: int, left_padding: list[int], group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', window: int | None = None) -> None:
        """
        Args:
            max_size (int): Slots in each row's window.
            left_padding (list[int]): Pad tokens before each row's prompt.
            group_size (int | tuple): 32, 64 or 128, or ``(keys, values)``.
            bits (int | tuple): 2, 3, 4, 5, 6 or 8, or ``(keys, values)``.
            scheme (str): ``"affine"`` (a ring of ``mx.quantize``
              triples) or ``"rotated-channel"`` (as QuantizedBatchKVCache's,
              the whole groups the window has left behind dropped from the
              front; no sink).
            window (int, optional): ``"rotated-channel"``: positions kept
              in float (default 128).
        """

    def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[tuple, tuple]:
        """
        Quantize new keys and values and add them to the batch.

        Args:
            keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
            values (array): ``(B, n_kv_heads, S, v_head_dim)``.

        Returns:
            tuple: The cached ``(weights, scales, biases)`` of the keys and
            of the values, as the float batch cache returns its arrays.
            ``"rotated-channel"``: ``(weights, scales, biases, residual)``
            for each, as QuantizedKVCache returns them.
        """

    def keys_and_values(self) -> object:
        """The cached keys and values as ``update_and_fetch`` returns them."""

    @property
    def keys(self) -> object:
        """The keys' ``(weights, scales, biases)``, or None."""

    @property
    def values(self) -> object:
        """The values' ``(weights, scales, biases)``, or None."""

    @property
    def offset(self) -> mlx.core.array:
        """Per-row positions (B,): tokens seen minus left padding."""

    @property
    def left_padding(self) -> mlx.core.array:
        """Per-row left padding (B,)."""

    @property
    def group_size(self) -> object:
        """The group size, or ``(keys, values)`` when they differ."""

    @property
    def bits(self) -> object:
        """The bits, or ``(keys, values)`` when they differ."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized buffers."""

    def empty(self) -> bool:
        """True before the first update."""

    def size(self) -> int:
        """Tokens the cache holds per row (the write position)."""

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop tokens."""

    def trim(self, n: int) -> int:
        """Drop up to ``n`` tokens from the end; returns how many were dropped."""

    def finalize(self) -> None:
        """Roll right-padded rows to end at the write position."""

    def filter(self, batch_indices: object | None) -> None:
        """Keep only these rows, in place."""

    def extend(self, other: Self) -> None:
        """Append the other cache's rows (quantized alike), in place."""

    def __repr__(self) -> str: ...

    def __copy__(self) -> object: ...

    def __deepcopy__(self, memo: object | None) -> object: ...

    def prepare(self, *, left_padding: object | None = None, lengths: object | None = None, right_padding: object | None = None) -> None:
        """As BatchRotatingKVCache.prepare."""

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array:
        """The attention mask for ``N`` new tokens, as BatchRotatingKVCache's."""

    @property
    def max_size(self) -> int:
        """Slots in each row's window."""

    @property
    def scheme(self) -> str:
        """``"affine"`` or ``"rotated-channel"``."""

    @property
    def window(self) -> int:
        """``"rotated-channel"``: positions kept in float (0 for affine)."""

    @property
    def sink(self) -> int:
        """0: a batch of sliding windows has no sink."""

    @property
    def sink_keys(self) -> None:
        """None (no sink)."""

    @property
    def sink_values(self) -> None:
        """None (no sink)."""

    @property
    def residual(self) -> object:
        """``"rotated-channel"``: the newest keys, rotated, in float, or None."""

    @property
    def value_residual(self) -> object:
        """
        ``"rotated-channel"``: the same positions' values, rotated, in float, or None.
        """

    @property
    def rotated(self) -> bool:
        """Whether the ring has wrapped."""

    def extract(self, idx: object | None) -> object:
        """Row ``idx`` as a QuantizedRotatingKVCache."""

    @property
    def state(self) -> tuple:
        """
        ``(keys, values, offset, left_padding, max_size, _offset, _idx, rotated, group_size, bits)``; keys and values are triples. A ``"rotated-channel"`` cache adds ``(scheme, window, residual keys, residual values)``.
        """

    @state.setter
    def state(self, state: tuple, /) -> None: ...

    @classmethod
    def from_state(cls, state: tuple) -> Self:
        """Build a cache from ``state`` without calling __init__."""

    @classmethod
    def merge(cls, caches: list[QuantizedRotatingKVCache]) -> QuantizedBatchRotatingKVCache:
        """One batch cache from QuantizedRotatingKVCaches quantized alike."""

class TokenBuffer:
    """A growing int32 token sequence in one mlx array."""

    def __init__(self, tokens: list[int] | None = None) -> None: ...

    step: int = 256

    def update_and_fetch(self, tokens: list[int]) -> mlx.core.array:
        """Append tokens; returns every token so far."""

    @property
    def state(self) -> mlx.core.array:
        """The whole buffer, unused slots included."""

    @property
    def tokens(self) -> mlx.core.array:
        """The tokens so far."""

class PromptTrie:
    """Token sequences to values, per model (a radix tree)."""

    def __init__(self) -> None: ...

    def add(self, model: object | None, tokens: object | None, value: object | None) -> object:
        """Store value at tokens; returns the value it replaced, or None."""

    def get(self, model: object | None, tokens: object | None) -> object:
        """The value at exactly tokens (KeyError if none)."""

    def pop(self, model: object | None, tokens: object | None) -> object:
        """Remove and return the value at exactly tokens."""

    def pop_prefixes(self, model: object | None, tokens: object | None) -> list:
        """Remove the values at proper prefixes of tokens: [(length, value)]."""

class LRUPromptCache:
    """
    Finished prompt caches by model and tokens, least recently inserted evicted first.
    """

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63, *, share: bool = True, disk_dir: str | bytes | os.PathLike | None = None, disk_bytes: int = 1 << 63, max_checkpoints: int = 8, checkpoint_every: int = 0, disk_block_tokens: int = 256) -> None:
        """
        Args:
            max_size (int): Entries kept.
            max_bytes (int): Bytes kept (``nbytes``).
            share (bool): Keep the keys and values of entries'
                plain ``KVCache`` layers (within ``CacheList`` layers
                too) in one store, each token shared by several entries
                stored once, the other caches beside them held per entry
                (default). ``False`` holds every entry's caches as
                given, as mlx-lm does.
            disk_dir (str | bytes | os.PathLike | None): A directory for the disk
                tier: every inserted entry is also written there, its
                plain ``KVCache`` layers' keys and values as blocks of
                ``disk_block_tokens`` tokens (each written once, shared
                by every entry through it) and the rest as a checked
                prompt-cache file; a fetch that disk covers better than
                memory loads it (after a restart too, and from other
                processes on the directory). Entries are keyed by
                ``repr(model)``; files that fail their checks are
                deleted, never served (``disk_errors``).
            disk_bytes (int): Bytes of files kept, by every process on
                the directory together; least recently used go first.
            max_checkpoints (int): Prefill checkpoints kept (see
                ``insert_checkpoint``); 0 keeps none.
            checkpoint_every (int): The fewest tokens between a
                checkpoint and the stored prefix before it (0: every
                prefill chunk boundary offered).
            disk_block_tokens (int): Tokens per disk block; 0 writes
                each entry as one whole file.
        """

    @property
    def disk_dir(self) -> object: ...

    @property
    def disk_size(self) -> int:
        """Entries on disk (once queued files are written)."""

    @property
    def disk_blocks(self) -> int:
        """Blocks on disk (once queued files are written)."""

    @property
    def disk_blocks_read(self) -> int:
        """Blocks read from disk and served (those memory held are not read)."""

    @property
    def disk_block_tokens(self) -> int:
        """Tokens per disk block (0: whole files)."""

    @property
    def disk_nbytes(self) -> int:
        """Bytes of the disk tier's files (once queued files are written)."""

    @property
    def disk_errors(self) -> list[str]:
        """
        Why files were refused, removed or not written, latest last: one line each, ``"<file name>: <reason>"``.
        """

    def flush(self) -> None:
        """
        Wait until the disk tier has written every entry inserted so far (files are written on a thread of the disk tier's own).
        """

    def close(self) -> int:
        """
        Write what is queued for the disk tier and stop its writer.

        From then on the cache serves and stores in memory only.

        Returns:
            int: How many files the disk tier wrote (0 without one);
            later calls return the same.
        """

    def __enter__(self) -> LRUPromptCache: ...

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        """close()."""

    @property
    def share(self) -> bool: ...

    def __len__(self) -> int:
        """Entries, checkpoints not counted."""

    @property
    def n_checkpoints(self) -> int:
        """Prefill checkpoints held."""

    @property
    def max_checkpoints(self) -> int: ...

    @max_checkpoints.setter
    def max_checkpoints(self, arg: object | None, /) -> None: ...

    @property
    def checkpoint_every(self) -> int: ...

    @checkpoint_every.setter
    def checkpoint_every(self, arg: object | None, /) -> None: ...

    @property
    def nbytes(self) -> int:
        """Bytes held: entries' caches, with shared keys and values counted once."""

    @property
    def max_size(self) -> object: ...

    @max_size.setter
    def max_size(self, arg: object | None, /) -> None: ...

    @property
    def max_bytes(self) -> object: ...

    @max_bytes.setter
    def max_bytes(self, arg: object | None, /) -> None: ...

    def insert_cache(self, model: object, tokens: list[int], prompt_cache: list, *, cache_type: str = 'assistant') -> None:
        """Store a prompt cache for tokens, then evict to the limits."""

    def insert_checkpoint(self, model: object, tokens: list[int], prompt_cache: list) -> bool:
        """
        Keep a copy of a cache part way through its prompt's prefill.

        For caches that cannot be trimmed (a rotating window after it
        wraps, state-space slots), which only exact or shorter entries
        can serve: a later prompt sharing the first ``len(tokens)``
        tokens resumes from the checkpoint. The caller goes on updating
        ``prompt_cache``; the checkpoint is a deep copy.
        ``prefill_checkpoints`` makes the prefill call this.

        Args:
            model: The model key.
            tokens (list[int]): The tokens the cache holds.
            prompt_cache (list): The per-layer caches.

        Returns:
            bool: Whether it was kept (not when ``max_checkpoints`` is
            0, an entry holds these tokens, or a stored prefix is fewer
            than ``checkpoint_every`` tokens back).
        """

    def trim_to(self, *, n_sequences: object | None = None, n_bytes: object | None = None) -> None:
        """Evict down to n_sequences entries and n_bytes."""

    def stats_by_type(self) -> dict:
        """{cache_type: {'n_sequences': ..., 'n_bytes': ...}}."""

def cache_class_names() -> list[str]:
    """The cache classes a prompt-cache file may name."""
