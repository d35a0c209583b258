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

/// A triple's arrays are rank 4 and share (B, H, S); weights are uint32.
void check_triple(const char* ctx, const char* what, const QuantizedArrays& q);

/// Throws unless mx::quantize's affine mode takes these settings.
void check_quantization(const char* ctx, int group_size, int bits);

/// Quantize (..., D) along the last axis, validating D and the settings.
QuantizedArrays quantize(const char* ctx, const mx::array& x, int group_size, int bits);

class QuantizedKVCache : public Cache {
 public:
  static constexpr int default_step = 256;

  explicit QuantizedKVCache(int group_size = 64, int bits = 8);

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
      int bits);

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
  int group_size() const {
    return group_size_;
  }
  int bits() const {
    return bits_;
  }
  virtual int step() const {
    return step_;
  }
  void set_step(int step);

 private:
  OptionalQuantized keys_;
  OptionalQuantized values_;
  int offset_ = 0;
  int group_size_;
  int bits_;
  int step_ = default_step;
};

/// KVCache.to_quantized: the same tokens, quantized (the whole buffer, as
/// mlx-lm does).
QuantizedKVCache to_quantized(const KVCache& cache, int group_size = 64, int bits = 4);

} // namespace kvcore
