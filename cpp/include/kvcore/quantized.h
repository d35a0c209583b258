// Quantized full-attention cache: keys and values stored as mx::quantize
// (weights, scales, biases) triples, grown in `step` slots.
#pragma once

#include <tuple>

#include "kvcore/kv.h"
#include "kvcore/quant_scheme.h"

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
/// check_triple, and the weights (packed at spec.bits) and the scales and
/// biases (one per spec.group_size) cover one head dim; scales and biases
/// share a float dtype.
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
/// Both triples set or both None, each of the shapes check_triple asks.
void check_triples(const char* ctx, const OptionalQuantized& keys, const OptionalQuantized& values);
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

/// Tokens a rotated_channel update rotates and quantizes at a time (rounded
/// to whole key groups), results bit for bit the whole chunk's: fewer of a
/// long chunk's float temporaries are alive at once. (The affine scheme
/// quantizes a chunk whole: slicing a contiguous input would make
/// mx::quantize copy each piece.)
constexpr int quantize_piece = 256;

class QuantizedKVCache : public Cache {
 public:
  static constexpr int default_step = 256;

  explicit QuantizedKVCache(int group_size = 64, int bits = 8)
      : QuantizedKVCache({group_size, bits}, {group_size, bits}) {}
  /// Keys and values each quantized as their spec says (bits (8, 4), say),
  /// laid out as the scheme says. With rotated_channel the keys' group
  /// size counts tokens (32, 64 or 128 per group), the values' the head
  /// dim, and the newest `window` tokens (and the group not yet full) stay
  /// in float (0 for the affine scheme); so do the first `sink` tokens (the
  /// attention sink): they are quantized in their groups as any token, and
  /// attention reads their float copies in their place.
  QuantizedKVCache(
      QuantSpec keys,
      QuantSpec values,
      QuantScheme scheme = QuantScheme::affine,
      int window = 0,
      int sink = 0);

  const char* name() const override {
    return "QuantizedKVCache";
  }
  /// Quantize and append keys and values (B, H, S, D); returns the cached
  /// triples up to offset. rotated_channel: the keys' triple is transposed
  /// (B, H, D, ...) and holds the whole groups only (residual() the rest).
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  bool is_trimmable() const override {
    return true;
  }
  /// rotated_channel: a trim into a quantized group of keys dequantizes the
  /// group's kept tokens back into the float residual.
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  /// The six arrays: keys' triple, then values'; rotated_channel adds the
  /// residual keys and values, and with a sink the sink's keys and values.
  std::vector<OptionalArray> state() const override;
  /// (offset, group_size, bits); rotated_channel adds the scheme's name and
  /// the window, and with a sink its size.
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
      QuantSpec value_spec) {
    set(std::move(keys), std::move(values), offset, key_spec, value_spec, QuantScheme::affine,
        std::nullopt, std::nullopt, 0);
  }
  /// Validates everything, then replaces the whole contents. The sink's
  /// keys and values (rotated, (B, H, n, D), 1 <= n <= sink: the sequence's
  /// first n tokens) or None.
  void set(
      OptionalQuantized keys,
      OptionalQuantized values,
      int offset,
      QuantSpec key_spec,
      QuantSpec value_spec,
      QuantScheme scheme,
      OptionalArray residual,
      OptionalArray value_residual,
      int window,
      int sink = 0,
      OptionalArray sink_keys = std::nullopt,
      OptionalArray sink_values = std::nullopt);

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
  QuantScheme scheme() const {
    return scheme_;
  }
  /// rotated_channel: the newest keys, rotated, in float (B, H, R, D): the
  /// window and the group not yet full; None when there are none.
  const OptionalArray& residual() const {
    return residual_;
  }
  /// rotated_channel: the values of the same R tokens, rotated, in float.
  const OptionalArray& value_residual() const {
    return value_residual_;
  }
  /// rotated_channel: the newest tokens kept in float.
  int window() const {
    return window_;
  }
  /// rotated_channel: the first tokens kept in float too (0: none).
  int sink() const {
    return sink_;
  }
  /// The sink's keys and values, rotated, (B, H, n, D): the sequence's
  /// first n = min(sink, offset) tokens; None without a sink or tokens.
  const OptionalArray& sink_keys() const {
    return sink_keys_;
  }
  const OptionalArray& sink_values() const {
    return sink_values_;
  }
  /// Tokens whose keys and values are quantized (rotated_channel: offset
  /// less the residual's tokens).
  int quantized_tokens() const {
    return offset_ - (residual_ ? residual_->shape(2) : 0);
  }
  /// rotated_channel: removes the quantized tokens [start, start + n), whole
  /// key groups past the sink's tokens (those a sliding window has left
  /// behind); the tokens after them move down. The buffers keep their room
  /// up to `room` tokens (rounded up to groups), at least what stays.
  /// ValueError for any other span, the cache unchanged.
  void drop_tokens(int start, int n, int room);
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
  // rotated_channel (quantized_channel.cpp).
  std::pair<QuantizedArrays, QuantizedArrays> update_channel(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> channel_keys_and_values() const;
  void trim_channel(int end);
  void set_channel(
      OptionalQuantized keys,
      OptionalQuantized values,
      int offset,
      QuantSpec key_spec,
      QuantSpec value_spec,
      QuantScheme scheme,
      OptionalArray residual,
      OptionalArray value_residual,
      int window,
      int sink,
      OptionalArray sink_keys,
      OptionalArray sink_values);

  OptionalQuantized keys_;
  OptionalQuantized values_;
  int offset_ = 0;
  QuantSpec key_spec_;
  QuantSpec value_spec_;
  QuantScheme scheme_ = QuantScheme::affine;
  OptionalArray residual_;
  OptionalArray value_residual_;
  int window_ = 0;
  int sink_ = 0;
  OptionalArray sink_keys_;
  OptionalArray sink_values_;
  int step_ = default_step;
  int capacity_ = 0;
};

/// KVCache.to_quantized: the same tokens, quantized (affine: the whole
/// buffer, as mlx-lm does; other schemes: the tokens up to offset).
QuantizedKVCache to_quantized(
    const KVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme = QuantScheme::affine,
    int window = 0,
    int sink = 0);
inline QuantizedKVCache to_quantized(const KVCache& cache, int group_size = 64, int bits = 4) {
  return to_quantized(cache, {group_size, bits}, {group_size, bits});
}

} // namespace kvcore
