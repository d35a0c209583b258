// Quantized sliding-window cache: the ring of RotatingKVCache holding
// mx::quantize triples, keys and values each at their own bits.
#pragma once

#include "kvcore/quantized.h"
#include "kvcore/rotating.h"

namespace kvcore {

/// A RotatingKVCache whose keys and values are stored quantized. The ring
/// (cursor, pinned `keep` tokens, temporal order on multi-token updates,
/// trim, masks) is RotatingKVCache's own, run in lockstep over the
/// weights, the scales and the biases, so every result is the float ring's
/// with each token quantized.
class QuantizedRotatingKVCache : public Cache {
 public:
  /// max_size >= 1 slots, 0 <= keep < max_size pinned; keys and values
  /// quantized as `keys` and `values` say.
  QuantizedRotatingKVCache(int max_size, int keep, QuantSpec keys, QuantSpec values);
  QuantizedRotatingKVCache(int max_size, int keep = 0, int group_size = 64, int bits = 4)
      : QuantizedRotatingKVCache(max_size, keep, {group_size, bits}, {group_size, bits}) {}

  const char* name() const override {
    return "QuantizedRotatingKVCache";
  }
  /// Quantize keys and values (B, H, S, D) and add them to the ring; returns
  /// the cached triples (in ring order for one token, temporal otherwise).
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  bool is_trimmable() const override {
    return rings_[0].is_trimmable();
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override {
    return rings_[0].make_mask(N, return_array, window_size);
  }

  /// The six arrays: keys' triple, then values'.
  std::vector<OptionalArray> state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  /// Typed restore: validates, then replaces everything.
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      int offset,
      int keep,
      int max_size,
      int idx,
      QuantSpec key_spec,
      QuantSpec value_spec);

  int size() const override {
    return rings_[0].size();
  }
  bool empty() const override {
    return rings_[0].empty();
  }
  size_t nbytes() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedRotatingKVCache>(*this);
  }

  OptionalQuantized keys() const;
  OptionalQuantized values() const;
  int offset() const {
    return rings_[0].offset();
  }
  int max_size() const {
    return rings_[0].max_size();
  }
  int keep() const {
    return rings_[0].keep();
  }
  int idx() const {
    return rings_[0].idx();
  }
  const QuantSpec& key_spec() const {
    return key_spec_;
  }
  const QuantSpec& value_spec() const {
    return value_spec_;
  }
  /// Ring i (0 weights, 1 scales, 2 biases) as a float ring.
  const RotatingKVCache& ring(int i) const {
    return rings_[i];
  }

 private:
  // Weights, scales and biases: each a ring whose "keys" are the keys'
  // part and "values" the values'.
  RotatingKVCache rings_[3];
  QuantSpec key_spec_;
  QuantSpec value_spec_;
};

/// RotatingKVCache.to_quantized: the same ring (offset, cursor, window),
/// each slot quantized.
QuantizedRotatingKVCache to_quantized(
    const RotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values);

} // namespace kvcore
