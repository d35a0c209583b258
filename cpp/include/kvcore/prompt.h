// Helpers over a model's list of per-layer caches, as mlx-lm's.
#pragma once

#include <optional>

#include "kvcore/files.h"

namespace kvcore {

/// A cache per layer for a model that has no make_cache of its own: a
/// KVCache each, or a RotatingKVCache(max_kv_size, keep=4) each when a size
/// is given. Throws ValueError for a negative num_layers or a max_kv_size
/// of 4 or less (no room beside the kept tokens). A capacity makes each
/// KVCache allocate room for that many tokens at its first update.
PromptCache make_prompt_cache(
    int num_layers,
    std::optional<int> max_kv_size = std::nullopt,
    std::optional<int> capacity = std::nullopt);

/// Whether every layer's cache can be trimmed.
bool can_trim_prompt_cache(const PromptCache& caches);

/// Trim every layer by num_tokens; returns the tokens trimmed from the
/// first layer, or 0 when the caches cannot be trimmed or there are none.
/// The caches are trimmed in place, all or nothing: a dry run on copies
/// comes first, so a layer that would fail leaves every layer as it was.
int trim_prompt_cache(PromptCache& caches, int num_tokens);

} // namespace kvcore
