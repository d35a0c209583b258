// The interface every kvcore cache implements.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <mlx/array.h>

namespace kvcore {

namespace mx = mlx::core;

using OptionalArray = std::optional<mx::array>;

/// What an attention layer gets from make_mask: no mask, the string
/// "causal" (the fused kernel's own causal mask) or an explicit mask array.
using Mask = std::variant<std::monostate, std::string, mx::array>;

/// Abstract base of the caches. Offsets count tokens; arrays are
/// (batch, heads, sequence, head_dim) unless a cache says otherwise.
class Cache {
 public:
  virtual ~Cache() = default;

  /// The class name mlx-lm uses for this cache ("KVCache", ...).
  virtual const char* name() const = 0;

  /// Whether trim() can drop tokens from the end.
  virtual bool is_trimmable() const {
    return false;
  }
  /// Drop up to n tokens from the end; returns how many were dropped.
  virtual int trim(int n);

  /// The attention mask for N new tokens (see create_attention_mask).
  /// Caches without one (ChunkedKVCache) throw NotImplementedError.
  virtual Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const;

  /// The arrays of the cache's state (None where unset).
  virtual std::vector<OptionalArray> state() const = 0;
  /// The scalars of the cache's state, as the strings older mlx-lm
  /// releases stored in prompt-cache files.
  virtual std::vector<std::string> meta_state() const {
    return {};
  }
  /// Replace arrays and scalars at once; validates before changing anything.
  virtual void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) = 0;
  void set_state(const std::vector<OptionalArray>& arrays) {
    restore(arrays, meta_state());
  }
  void set_meta_state(const std::vector<std::string>& meta) {
    restore(state(), meta);
  }

  /// Tokens the cache holds (what attention sees), 0 if it cannot say.
  virtual int size() const {
    return 0;
  }
  virtual bool empty() const = 0;
  /// Bytes held by the cache's arrays.
  virtual size_t nbytes() const = 0;
  /// A new cache sharing this one's arrays (mlx arrays are immutable).
  virtual std::unique_ptr<Cache> copy() const = 0;
};

} // namespace kvcore
