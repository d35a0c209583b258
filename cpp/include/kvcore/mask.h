// Attention masks, as mlx-lm's models/base.py and models/cache.py build them.
#pragma once

#include <optional>

#include "kvcore/cache.h"

namespace kvcore {

/// Boolean (N, offset + N) mask: query i (at offset + i) sees key j when
/// j <= offset + i, and j > offset + i - window_size with a window. With
/// right or left padding (B,) arrays, a (B, 1, N, offset + N) mask that
/// also hides each sequence's padded keys.
mx::array create_causal_mask(
    int N,
    int offset = 0,
    std::optional<int> window_size = std::nullopt,
    const OptionalArray& right_padding = std::nullopt,
    const OptionalArray& left_padding = std::nullopt);

/// mlx-lm's choice of mask for a plain cache, in its order: the windowed
/// mask array when window_size is set, else none for a single token, else
/// the mask array when return_array, else "causal".
Mask create_attention_mask(
    int N,
    int offset,
    bool return_array = false,
    std::optional<int> window_size = std::nullopt);

} // namespace kvcore
