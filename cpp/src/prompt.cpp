#include "kvcore/prompt.h"

#include <algorithm>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/rotating.h"

namespace kvcore {

PromptCache make_prompt_cache(
    int num_layers,
    std::optional<int> max_kv_size,
    std::optional<int> capacity) {
  check_size("make_prompt_cache", "num_layers", num_layers);
  if (max_kv_size && *max_kv_size <= 4) {
    // The window keeps its first 4 tokens, so it needs room beside them.
    throw ValueError("make_prompt_cache", "max_kv_size above 4 (the 4 kept tokens)",
                     std::to_string(*max_kv_size));
  }
  PromptCache out;
  for (int i = 0; i < num_layers; ++i) {
    if (max_kv_size) {
      out.push_back(std::make_shared<RotatingKVCache>(*max_kv_size, 4));
    } else {
      out.push_back(std::make_shared<KVCache>(capacity.value_or(0)));
    }
  }
  return out;
}

bool can_trim_prompt_cache(const PromptCache& caches) {
  return std::all_of(caches.begin(), caches.end(), [](const auto& c) { return c && c->is_trimmable(); });
}

int trim_prompt_cache(PromptCache& caches, int num_tokens) {
  if (caches.empty() || !can_trim_prompt_cache(caches)) {
    return 0;
  }
  // A dry run on copies first, so a layer that throws leaves every layer
  // as it was; then the caches themselves are trimmed.
  for (const auto& c : caches) {
    c->copy()->trim(num_tokens);
  }
  int first = caches[0]->trim(num_tokens);
  for (size_t i = 1; i < caches.size(); ++i) {
    caches[i]->trim(num_tokens);
  }
  return first;
}

} // namespace kvcore
