#include "kvcore/prompt.h"

#include <algorithm>

#include "kvcore/buffer.h"
#include "kvcore/kv.h"
#include "kvcore/rotating.h"

namespace kvcore {

PromptCache make_prompt_cache(int num_layers, std::optional<int> max_kv_size) {
  check_size("make_prompt_cache", "num_layers", num_layers);
  if (max_kv_size) {
    check_size("make_prompt_cache", "max_kv_size", *max_kv_size, 1);
  }
  PromptCache out;
  for (int i = 0; i < num_layers; ++i) {
    if (max_kv_size) {
      out.push_back(std::make_shared<RotatingKVCache>(*max_kv_size, 4));
    } else {
      out.push_back(std::make_shared<KVCache>());
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
  // On copies first, so a layer that throws leaves all of them as they were.
  PromptCache staged;
  std::vector<int> trimmed;
  for (const auto& c : caches) {
    staged.push_back(c->copy());
    trimmed.push_back(staged.back()->trim(num_tokens));
  }
  caches = std::move(staged);
  return trimmed[0];
}

} // namespace kvcore
