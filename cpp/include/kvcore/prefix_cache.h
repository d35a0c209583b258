// The prompt-prefix cache for C++ programs: TokenBuffer, and LRUPromptCache
// over kvcore's own per-layer caches (PromptCache), keyed by a model name.
#pragma once

#include <vector>

#include <mlx/array.h>

#include "kvcore/files.h"
#include "kvcore/prompt.h"
#include "kvcore/lru_prompt_cache.h"

namespace kvcore {

namespace mx = mlx::core;

/// A growing int32 token sequence in one mlx array, grown in `step`
/// slots as KVCache grows (mlx-lm's TokenBuffer).
class TokenBuffer {
 public:
  static constexpr int default_step = 256;

  explicit TokenBuffer(const std::vector<int32_t>& tokens = {});
  virtual ~TokenBuffer() = default;
  TokenBuffer(const TokenBuffer&) = default;
  TokenBuffer& operator=(const TokenBuffer&) = default;

  /// Append tokens; returns every token so far.
  mx::array update_and_fetch(const std::vector<int32_t>& tokens);
  /// The whole buffer, unused slots included.
  const mx::array& state() const {
    return buffer_;
  }
  /// The tokens so far.
  mx::array tokens() const;
  int size() const {
    return size_;
  }
  virtual int step() const {
    return default_step;
  }

 private:
  mx::array buffer_;
  int size_ = 0;
};

/// LRUPromptCache's view of a PromptCache: bytes, trimmability, an
/// independent copy (arrays are shared: mlx arrays are immutable), trim.
struct PromptCacheOps {
  static int64_t nbytes(const PromptCache& caches);
  static bool can_trim(const PromptCache& caches);
  static PromptCache copy(const PromptCache& caches);
  static void trim(PromptCache& caches, int n);
  /// The KVCache layers (not subclasses; CacheList members are held as
  /// given) with keys, at one offset; `rest` as LRUPromptCache says.
  static bool share(const PromptCache& caches, std::vector<LayerKV>* layers, int* offset,
                    std::optional<PromptCache>* rest);
  static PromptCache build(std::vector<LayerKV> layers, int offset, const PromptCache* rest);
  static std::string model_name(const std::string& model) {
    return model;
  }
  static PreparedFile prepare(const PromptCache& caches, const Metadata& metadata);
  static PromptCache from_file(LoadedPromptCache loaded);
  /// Every layer, a CacheList's members in its place: the KVCaches and
  /// QuantizedKVCaches (not subclasses), nullptr for others.
  static std::vector<Cache*> cache_layers(const PromptCache& caches);
};

/// The server's prompt cache for C++: finished per-layer caches by model
/// name and tokens. Every call may run concurrently from several threads.
using PromptCacheLRU = LRUPromptCache<std::string, PromptCache, PromptCacheOps>;

} // namespace kvcore
