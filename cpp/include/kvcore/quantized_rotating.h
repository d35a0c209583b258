// Quantized sliding-window cache: the ring of RotatingKVCache holding
// mx::quantize triples, keys and values each at their own bits.
#pragma once

#include "kvcore/quantized.h"
#include "kvcore/rotating.h"

namespace kvcore {

/// A RotatingKVCache whose keys and values are stored quantized.
///
/// affine (mlx-lm's layout): the ring (cursor, pinned `keep` tokens,
/// temporal order on multi-token updates, trim, masks) is RotatingKVCache's
/// own, run in lockstep over the weights, the scales and the biases, so
/// every result is the float ring's with each token quantized.
///
/// rotated_channel: keys are quantized in groups of tokens, so tokens
/// cannot leave one at a time. The cache holds a QuantizedKVCache of the
/// scheme (`held()`): the groups holding the `keep` pinned tokens, then the
/// newest tokens; whole groups the window has left behind are dropped once
/// they add up to max(group, max_size / 8 in whole groups). make_mask hides
/// the held tokens the float ring would not hold, so each query sees what
/// it sees over a float RotatingKVCache. The attention sink must lie within
/// `keep`.
class QuantizedRotatingKVCache : public Cache {
 public:
  /// rotated_channel: the most tokens a state may say were seen (positions
  /// stay well inside int).
  static constexpr int max_offset = 1 << 30;

  /// max_size >= 1 slots, 0 <= keep < max_size pinned; keys and values
  /// quantized as `keys` and `values` say, laid out as `scheme` says
  /// (`window` and `sink` as for QuantizedKVCache; sink <= keep).
  QuantizedRotatingKVCache(
      int max_size,
      int keep,
      QuantSpec keys,
      QuantSpec values,
      QuantScheme scheme = QuantScheme::affine,
      int window = 0,
      int sink = 0);
  QuantizedRotatingKVCache(int max_size, int keep = 0, int group_size = 64, int bits = 4)
      : QuantizedRotatingKVCache(max_size, keep, {group_size, bits}, {group_size, bits}) {}

  const char* name() const override {
    return "QuantizedRotatingKVCache";
  }
  /// Quantize keys and values (B, H, S, D) and add them to the ring; returns
  /// the cached triples (in ring order for one token, temporal otherwise;
  /// rotated_channel: held()'s, the float residual apart).
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  bool is_trimmable() const override {
    return offset() < max_size();
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  /// The six arrays: keys' triple, then values'; rotated_channel adds
  /// held()'s residuals, and with a sink the sink's keys and values.
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
  /// Typed restore of a rotated_channel cache: `held` (a rotated_channel
  /// QuantizedKVCache: the pinned groups, then the newest tokens) after
  /// `offset` tokens; offset less held's is the dropped tokens, whole
  /// groups the window had left behind.
  void set_channel(QuantizedKVCache held, int offset, int keep, int max_size);

  int size() const override {
    return std::min(offset(), max_size());
  }
  bool empty() const override {
    return channel_ ? channel_->empty() : rings_[0].empty();
  }
  size_t nbytes() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedRotatingKVCache>(*this);
  }

  OptionalQuantized keys() const;
  OptionalQuantized values() const;
  int offset() const {
    return channel_ ? offset_ : rings_[0].offset();
  }
  int max_size() const {
    return rings_[0].max_size();
  }
  int keep() const {
    return rings_[0].keep();
  }
  /// The ring cursor (rotated_channel: the tokens held).
  int idx() const {
    return channel_ ? channel_->offset() : rings_[0].idx();
  }
  QuantScheme scheme() const {
    return channel_ ? channel_->scheme() : QuantScheme::affine;
  }
  /// rotated_channel: the tokens held (ValueError for affine).
  const QuantizedKVCache& held() const;
  /// rotated_channel: tokens held ahead of the newest ones whatever the
  /// window: keep rounded up to whole key groups.
  int pinned() const;
  /// rotated_channel: the tokens of the last update (1 after a restore):
  /// what a float ring holds after it (keep, then max_size - 1 - keep
  /// before it and the update's) is what a batch merge takes, as mlx-lm's.
  int last_update() const {
    return last_update_;
  }
  /// rotated_channel: the tokens the window has dropped, after the pinned.
  int dropped() const {
    return channel_ ? offset_ - channel_->offset() : 0;
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
  friend QuantizedRotatingKVCache to_quantized(
      const RotatingKVCache&,
      QuantSpec,
      QuantSpec,
      QuantScheme,
      int,
      int);

  // Weights, scales and biases: each a ring whose "keys" are the keys'
  // part and "values" the values'.
  // (rotated_channel: empty, holding max_size and keep.)
  RotatingKVCache rings_[3];
  QuantSpec key_spec_;
  QuantSpec value_spec_;
  // rotated_channel: the tokens held and the tokens seen.
  std::optional<QuantizedKVCache> channel_;
  int offset_ = 0;
  int last_update_ = 1;

  // rotated_channel: the tokens to drop before an update at offset o, and
  // held()'s positions after one of N tokens, as a (T,) int32 array.
  int droppable(int o) const;
  mx::array held_positions(int N) const;
};

/// RotatingKVCache.to_quantized: the same ring (offset, cursor, window),
/// each slot quantized (rotated_channel: the ring's tokens in temporal
/// order, held as that scheme holds them).
QuantizedRotatingKVCache to_quantized(
    const RotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme = QuantScheme::affine,
    int window = 0,
    int sink = 0);

} // namespace kvcore
