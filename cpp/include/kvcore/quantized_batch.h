// Quantized batch caches: BatchKVCache and BatchRotatingKVCache holding
// mx::quantize triples, keys and values each at their own bits.
#pragma once

#include "kvcore/batch.h"
#include "kvcore/quantized.h"
#include "kvcore/quantized_channel_batch.h"
#include "kvcore/quantized_rotating.h"

namespace kvcore {

/// What both quantized batch caches share. `Batch` (BatchKVCache or
/// BatchRotatingKVCache) runs its bookkeeping (left padding, offsets, the
/// write position, the ring, right padding between prepare and finalize)
/// in lockstep over three parts: the weights, the scales and the biases.
/// Every result is the float batch cache's with each token quantized.
///
/// All or nothing: update_and_fetch is checked on the weights' part first
/// (the others hold the same (B, H, S) and cursor, so they cannot fail
/// after it); every other change runs on copies that replace the parts only
/// when all three succeeded.
template <class Batch>
class QuantizedBatchCache : public Cache {
 public:
  /// Quantize keys and values (B, H, S, D) and add them; returns the cached
  /// triples as the float cache returns its arrays.
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  /// Roll right-padded rows so every row ends at the write position.
  void finalize();
  /// Keep the rows `indices`.
  void filter(const std::vector<int>& indices);

  bool is_trimmable() const override {
    return parts_[0].is_trimmable();
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override {
    return parts_[0].make_mask(N, return_array, window_size);
  }

  /// The six arrays (keys' triple, then values'), offset, left_padding.
  std::vector<OptionalArray> state() const override;
  int size() const override {
    return parts_[0].size();
  }
  bool empty() const override {
    return parts_[0].empty();
  }
  size_t nbytes() const override;

  OptionalQuantized keys() const;
  OptionalQuantized values() const;
  const mx::array& offset() const {
    return parts_[0].offset();
  }
  const mx::array& left_padding() const {
    return parts_[0].left_padding();
  }
  int idx() const {
    return parts_[0].idx();
  }
  const QuantSpec& key_spec() const {
    return key_spec_;
  }
  const QuantSpec& value_spec() const {
    return value_spec_;
  }
  /// Part i (0 weights, 1 scales, 2 biases) as a float batch cache.
  const Batch& part(int i) const {
    return parts_[i];
  }

 protected:
  QuantizedBatchCache(Batch part, QuantSpec keys, QuantSpec values);
  /// Copies of the parts, changed by `op(part, i)`, then put in place.
  template <class Op>
  void staged(Op op);
  /// Replaces the parts: each part i takes its share of keys and values
  /// through `assign(part, keys_i, values_i, i)`; all or nothing.
  template <class Assign>
  void set_parts(
      const char* ctx,
      OptionalQuantized keys,
      OptionalQuantized values,
      QuantSpec key_spec,
      QuantSpec value_spec,
      Assign assign);
  /// Throws unless other quantizes as this cache does.
  void check_same_specs(const char* ctx, const QuantizedBatchCache& other) const;

  Batch parts_[3];
  QuantSpec key_spec_;
  QuantSpec value_spec_;
};

/// Under the affine scheme, BatchKVCache in lockstep (QuantizedBatchCache);
/// under rotated_channel, a ChannelBatch (quantized_channel_batch.h), to
/// which every method below passes the call.
class QuantizedBatchKVCache : public QuantizedBatchCache<BatchKVCache> {
 public:
  QuantizedBatchKVCache(const std::vector<int>& left_padding, QuantSpec keys, QuantSpec values);
  /// window and sink: as QuantizedKVCache's (0 for affine).
  QuantizedBatchKVCache(
      const std::vector<int>& left_padding,
      QuantSpec keys,
      QuantSpec values,
      QuantScheme scheme,
      int window,
      int sink = 0);
  explicit QuantizedBatchKVCache(
      const std::vector<int>& left_padding,
      int group_size = 64,
      int bits = 8)
      : QuantizedBatchKVCache(left_padding, {group_size, bits}, {group_size, bits}) {}

  const char* name() const override {
    return "QuantizedBatchKVCache";
  }
  /// rotated_channel: the keys' triple is transposed and holds the
  /// quantized positions only (residual() the rest), as QuantizedKVCache's.
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;
  /// As BatchKVCache::prepare.
  void prepare(
      const std::optional<std::vector<int>>& left_padding,
      const std::optional<std::vector<int>>& right_padding);
  void finalize();
  void filter(const std::vector<int>& indices);
  /// Append other's rows; both must quantize alike (scheme and window too).
  void extend(const QuantizedBatchKVCache& other);
  /// Row idx as a QuantizedKVCache holding only its tokens.
  QuantizedKVCache extract(int idx) const;
  /// One batch cache from QuantizedKVCaches that quantize alike (one
  /// scheme), left-padded to the longest.
  static QuantizedBatchKVCache merge(const std::vector<const QuantizedKVCache*>& caches);

  bool is_trimmable() const override {
    return true;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;
  /// affine: the six arrays, offset, left_padding; rotated_channel adds the
  /// residual keys and values.
  std::vector<OptionalArray> state() const override;
  int size() const override {
    return idx();
  }
  bool empty() const override;
  size_t nbytes() const override;
  OptionalQuantized keys() const;
  OptionalQuantized values() const;
  const mx::array& offset() const;
  const mx::array& left_padding() const;
  int idx() const;
  QuantScheme scheme() const {
    return channel_ ? QuantScheme::rotated_channel : QuantScheme::affine;
  }
  int window() const {
    return channel_ ? channel_->window() : 0;
  }
  int sink() const {
    return channel_ ? channel_->sink() : 0;
  }
  /// rotated_channel with a sink: each row's first tokens in float
  /// (B, H, sink, D), or None.
  const OptionalArray& sink_keys() const;
  const OptionalArray& sink_values() const;
  /// rotated_channel: the float keys and values of positions [T, _idx).
  const OptionalArray& residual() const;
  const OptionalArray& value_residual() const;

  /// (_idx); rotated_channel adds the scheme's name and the window (and a
  /// sink's size).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  /// Typed restore: validates, then replaces everything.
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      mx::array offset,
      mx::array left_padding,
      int idx,
      QuantSpec key_spec,
      QuantSpec value_spec);
  /// Typed restore of a rotated_channel cache: validates, then replaces
  /// everything.
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      mx::array offset,
      mx::array left_padding,
      int idx,
      OptionalArray residual,
      OptionalArray value_residual,
      QuantSpec key_spec,
      QuantSpec value_spec,
      int window,
      int sink = 0,
      OptionalArray sink_keys = std::nullopt,
      OptionalArray sink_values = std::nullopt);
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedBatchKVCache>(*this);
  }

 private:
  friend QuantizedBatchKVCache to_quantized(
      const BatchKVCache&,
      QuantSpec,
      QuantSpec,
      QuantScheme,
      int,
      int);

  std::optional<ChannelBatch> channel_;
};

/// Under the affine scheme, BatchRotatingKVCache in lockstep
/// (QuantizedBatchCache). Under rotated_channel, a ChannelBatch holding the
/// newest positions: whole key groups the window has left behind are
/// dropped from the front (rows' left padding then falls below 0, offsets
/// stay), and make_mask windows each row over buffer positions as
/// BatchRotatingKVCache's does, so every query attends the tokens it does
/// there. No sink (a batch of sliding windows pins no first tokens).
class QuantizedBatchRotatingKVCache : public QuantizedBatchCache<BatchRotatingKVCache> {
 public:
  QuantizedBatchRotatingKVCache(
      int max_size,
      const std::vector<int>& left_padding,
      QuantSpec keys,
      QuantSpec values,
      QuantScheme scheme = QuantScheme::affine,
      int window = 0);
  QuantizedBatchRotatingKVCache(
      int max_size,
      const std::vector<int>& left_padding,
      int group_size = 64,
      int bits = 8)
      : QuantizedBatchRotatingKVCache(
            max_size, left_padding, {group_size, bits}, {group_size, bits}) {}

  const char* name() const override {
    return "QuantizedBatchRotatingKVCache";
  }
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;
  /// As BatchRotatingKVCache::prepare.
  void prepare(
      const std::optional<std::vector<int>>& left_padding,
      const std::optional<std::vector<int>>& lengths,
      const std::optional<std::vector<int>>& right_padding);
  void finalize();
  void filter(const std::vector<int>& indices);
  void extend(const QuantizedBatchRotatingKVCache& other);
  QuantizedRotatingKVCache extract(int idx) const;
  static QuantizedBatchRotatingKVCache merge(
      const std::vector<const QuantizedRotatingKVCache*>& caches);

  bool is_trimmable() const override {
    return offset_in_ring() < max_size();
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;
  std::vector<OptionalArray> state() const override;
  int size() const override {
    return std::min(offset_in_ring(), max_size());
  }
  bool empty() const override;
  size_t nbytes() const override;
  OptionalQuantized keys() const;
  OptionalQuantized values() const;
  const mx::array& offset() const;
  const mx::array& left_padding() const;
  int idx() const;
  QuantScheme scheme() const {
    return channel_ ? QuantScheme::rotated_channel : QuantScheme::affine;
  }
  int window() const {
    return channel_ ? channel_->window() : 0;
  }
  /// rotated_channel: the float keys and values of the newest positions.
  const OptionalArray& residual() const;
  const OptionalArray& value_residual() const;
  /// rotated_channel: the ChannelBatch (ValueError for affine).
  const ChannelBatch& held() const;

  /// (max_size, _offset, _idx, rotated); rotated_channel adds the scheme's
  /// name and the window.
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      mx::array offset,
      mx::array left_padding,
      int max_size,
      int offset_in_ring,
      int idx,
      bool rotated,
      QuantSpec key_spec,
      QuantSpec value_spec);
  /// Typed restore of a rotated_channel cache: `held` its positions, after
  /// offset_in_ring positions in all (the rest dropped, whole groups out of
  /// the window's reach).
  void set_channel(ChannelBatch held, int max_size, int offset_in_ring);
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedBatchRotatingKVCache>(*this);
  }

  int max_size() const {
    return parts_[0].max_size();
  }
  /// Positions written since the start (mlx-lm's `_offset`).
  int offset_in_ring() const {
    return channel_ ? channel_->idx() + dropped_ : parts_[0].offset_in_ring();
  }
  bool rotated() const {
    return channel_ ? false : parts_[0].rotated();
  }

 private:
  friend QuantizedBatchRotatingKVCache to_quantized(
      const BatchRotatingKVCache&,
      QuantSpec,
      QuantSpec,
      QuantScheme,
      int);

  // rotated_channel: the positions to drop before an update.
  int droppable() const;

  std::optional<ChannelBatch> channel_;
  int dropped_ = 0;
};

/// BatchKVCache.to_quantized: the same rows, padding and bookkeeping (a
/// pending right padding included), each slot quantized (rotated_channel:
/// the tokens up to _idx, as updates would have quantized them).
QuantizedBatchKVCache to_quantized(
    const BatchKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme = QuantScheme::affine,
    int window = 0,
    int sink = 0);
/// BatchRotatingKVCache.to_quantized, likewise (rotated_channel: the
/// ring's positions in temporal order; no right padding pending).
QuantizedBatchRotatingKVCache to_quantized(
    const BatchRotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme = QuantScheme::affine,
    int window = 0);

} // namespace kvcore
