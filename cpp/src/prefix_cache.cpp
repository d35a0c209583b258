#include "kvcore/prefix_cache.h"

#include <typeinfo>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/cache_list.h"
#include "kvcore/disk_blocks.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"

namespace kvcore {

TokenBuffer::TokenBuffer(const std::vector<int32_t>& tokens)
    : buffer_(mx::array(tokens.data(), {static_cast<int>(tokens.size())}, mx::int32)),
      size_(static_cast<int>(tokens.size())) {}

mx::array TokenBuffer::update_and_fetch(const std::vector<int32_t>& tokens) {
  constexpr const char* ctx = "TokenBuffer.update_and_fetch";
  const long long end = 1LL * size_ + static_cast<long long>(tokens.size());
  check_size(ctx, "tokens held", end);
  const int start = size_;
  const long long st = step();
  const long long want = ((end + st - 1) / st) * st;
  mx::array buffer = buffer_;
  if (want > buffer.size()) {
    check_size(ctx, "buffer size", want);
    buffer = mx::concatenate(
        {buffer, mx::zeros({static_cast<int>(want - buffer.size())}, mx::int32)}, 0);
  }
  if (!tokens.empty()) {
    mx::array t(tokens.data(), {static_cast<int>(tokens.size())}, mx::int32);
    buffer = mx::slice_update(buffer, t, mx::Shape{start}, mx::Shape{static_cast<int>(end)});
  }
  buffer_ = std::move(buffer);
  size_ = static_cast<int>(end);
  return mx::slice(buffer_, mx::Shape{0}, mx::Shape{size_});
}

mx::array TokenBuffer::tokens() const {
  return mx::slice(buffer_, mx::Shape{0}, mx::Shape{size_});
}

int64_t PromptCacheOps::nbytes(const PromptCache& caches) {
  int64_t n = 0;
  for (const auto& c : caches) {
    n += static_cast<int64_t>(c->nbytes());
  }
  return n;
}

bool PromptCacheOps::can_trim(const PromptCache& caches) {
  return can_trim_prompt_cache(caches);
}

PromptCache PromptCacheOps::copy(const PromptCache& caches) {
  PromptCache out;
  out.reserve(caches.size());
  for (const auto& c : caches) {
    out.push_back(std::shared_ptr<Cache>(c->copy()));
  }
  return out;
}

void PromptCacheOps::trim(PromptCache& caches, int n) {
  trim_prompt_cache(caches, n);
}

namespace {

const KVCache* plain_kv(const std::shared_ptr<Cache>& c) {
  return typeid(*c) == typeid(KVCache) ? static_cast<const KVCache*>(c.get()) : nullptr;
}

} // namespace

bool PromptCacheOps::share(const PromptCache& caches, std::vector<LayerKV>* layers, int* offset,
                           std::optional<PromptCache>* rest) {
  layers->clear();
  PromptCache others;
  bool mixed = false;
  for (const auto& c : caches) {
    const KVCache* kv = plain_kv(c);
    if (kv == nullptr) {
      mixed = true;
      others.push_back(std::shared_ptr<Cache>(c->copy()));
      continue;
    }
    if (!kv->keys() || !kv->values() || (!layers->empty() && kv->offset() != *offset)) {
      return false; // an empty KVCache would be taken for a slot to fill
    }
    *offset = kv->offset();
    layers->push_back({*kv->keys(), *kv->values()});
    others.push_back(std::make_shared<KVCache>());
  }
  *rest = mixed ? std::optional<PromptCache>(std::move(others)) : std::nullopt;
  return !layers->empty();
}

PromptCache PromptCacheOps::build(std::vector<LayerKV> layers, int offset, const PromptCache* rest) {
  PromptCache out;
  if (rest == nullptr) {
    for (size_t i = 0; i < layers.size(); ++i) {
      out.push_back(std::make_shared<KVCache>());
    }
  } else {
    out = copy(*rest);
  }
  size_t next = 0;
  for (auto& c : out) {
    if (plain_kv(c) != nullptr && next < layers.size()) {
      static_cast<KVCache&>(*c).set(std::move(layers[next].keys), std::move(layers[next].values), offset);
      ++next;
    }
  }
  return out;
}

} // namespace kvcore

namespace kvcore {

PreparedFile PromptCacheOps::prepare(const PromptCache& caches, const Metadata& metadata) {
  return prepare_prompt_cache(caches, metadata);
}

PromptCache PromptCacheOps::from_file(LoadedPromptCache loaded) {
  return std::move(loaded.caches);
}

std::vector<Cache*> PromptCacheOps::cache_layers(const PromptCache& caches) {
  std::vector<Cache*> out;
  for (const auto& c : caches) {
    if (const auto* list = dynamic_cast<const CacheList*>(c.get())) {
      auto inner = cache_layers(list->caches());
      out.insert(out.end(), inner.begin(), inner.end());
    } else {
      out.push_back(block_kind(*c) ? c.get() : nullptr);
    }
  }
  return out;
}

} // namespace kvcore
