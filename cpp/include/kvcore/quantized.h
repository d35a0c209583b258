// Quantized full-attention cache: keys and values stored as mx::quantize
// (weights, scales, biases) triples, grown in `step` slots.
#pragma once

#include <tuple>

#include "kvcore/kv.h"

namespace kvcore {

/// (packed uint32 weights, scales, biases), as mx::quantize returns them.
using QuantizedArrays = std::tuple<mx::array, mx::array, mx::array>;
using OptionalQuantized = std::optional<QuantizedArrays>;

/// How keys or values are quantized: mx::quantize's group size and bits.
struct QuantSpec {
  int group_size = 64;
  int bits = 8;
};

/// A triple's arrays are rank 4 and share (B, H, S); weights are uint32;
/// the weights (packed at spec.bits) and the scales and biases (one per
/// spec.group_size) cover one head dim; scales and biases share a float dtype.
void check_triple(const char* ctx, const char* what, const QuantizedArrays& q, QuantSpec spec);

/// Each array of x fits the matching buffer of buf along the sequence axis
/// (check_fits: B, H, last dim and dtype).
void check_triple_fits(
    const char* ctx,
    const char* what,
    const QuantizedArrays& x,
    const QuantizedArrays& buf);

/// The first six of a state's arrays (keys' weights, scales and biases, then
/// the values') as two triples, each all set or all None.
std::pair<OptionalQuantized, OptionalQuantized> triples_from_arrays(
    const char* ctx,
    const std::vector<OptionalArray>& arrays);

/// Throws unless mx::quantize's affine mode takes these settings.
void check_quantization(const char* ctx, int group_size, int bits);
/// check_quantization for the keys' and the values' settings.
void check_specs(const char* ctx, QuantSpec keys, QuantSpec values);
/// Both triples set or both None, each consistent with its spec (check_triple).
void check_triples(
    const char* ctx,
    const OptionalQuantized& keys,
    const OptionalQuantized& values,
    QuantSpec key_spec,
    QuantSpec value_spec);

/// Quantize (..., D) along the last axis, validating D, the settings and
/// the dtype: float16, bfloat16 or float32 (the caches store any dtype;
/// mx::quantize takes only these).
QuantizedArrays quantize(const char* ctx, const mx::array& x, int group_size, int bits);
/// keys and values quantized, each as its spec says.
std::pair<QuantizedArrays, QuantizedArrays> quantize_kv(
    const char* ctx,
    const mx::array& keys,
    const mx::array& values,
    QuantSpec key_spec,
    QuantSpec value_spec);
/// A float cache's buffers (both set, else both None) quantized likewise.
std::pair<OptionalQuantized, OptionalQuantized> quantize_buffers(
    const char* ctx,
    const OptionalArray& keys,
    const OptionalArray& values,
    QuantSpec key_spec,
    QuantSpec value_spec);

class QuantizedKVCache : public Cache {
 public:
  static constexpr int default_step = 256;

  explicit QuantizedKVCache(int group_size = 64, int bits = 8)
      : QuantizedKVCache({group_size, bits}, {group_size, bits}) {}
  /// Keys and values each quantized as their spec says (bits (8, 4), say).
  QuantizedKVCache(QuantSpec keys, QuantSpec values);

  const char* name() const override {
    return "QuantizedKVCache";
  }
  /// Quantize and append keys and values (B, H, S, D); returns the cached
  /// triples up to offset.
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  bool is_trimmable() const override {
    return true;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  /// The six arrays: keys' triple, then values'.
  std::vector<OptionalArray> state() const override;
  /// (offset, group_size, bits).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      int offset,
      int group_size,
      int bits) {
    set(std::move(keys), std::move(values), offset, {group_size, bits}, {group_size, bits});
  }
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      int offset,
      QuantSpec key_spec,
      QuantSpec value_spec);

  bool empty() const override {
    return !keys_;
  }
  size_t nbytes() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedKVCache>(*this);
  }

  const OptionalQuantized& keys() const {
    return keys_;
  }
  const OptionalQuantized& values() const {
    return values_;
  }
  void set_keys(OptionalQuantized keys) {
    keys_ = std::move(keys);
  }
  void set_values(OptionalQuantized values) {
    values_ = std::move(values);
  }
  int offset() const {
    return offset_;
  }
  void set_offset(int offset);
  /// The keys' group size and bits (the values' may differ: value_spec()).
  int group_size() const {
    return key_spec_.group_size;
  }
  int bits() const {
    return key_spec_.bits;
  }
  const QuantSpec& key_spec() const {
    return key_spec_;
  }
  const QuantSpec& value_spec() const {
    return value_spec_;
  }
  /// As SequenceCache::capacity: room for this many tokens at the first
  /// allocation.
  int capacity() const {
    return capacity_;
  }
  void set_capacity(int capacity);
  virtual int step() const {
    return step_;
  }
  void set_step(int step);

 private:
  OptionalQuantized keys_;
  OptionalQuantized values_;
  int offset_ = 0;
  QuantSpec key_spec_;
  QuantSpec value_spec_;
  int step_ = default_step;
  int capacity_ = 0;
};

/// KVCache.to_quantized: the same tokens, quantized (the whole buffer, as
/// mlx-lm does).
QuantizedKVCache to_quantized(const KVCache& cache, QuantSpec keys, QuantSpec values);
inline QuantizedKVCache to_quantized(const KVCache& cache, int group_size = 64, int bits = 4) {
  return to_quantized(cache, {group_size, bits}, {group_size, bits});
}

} // namespace kvcore
