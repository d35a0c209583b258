// The rotated_channel scheme (quant_scheme.h) on a left-padded batch: what a
// QuantizedBatchKVCache of that scheme holds.
#pragma once

#include "kvcore/batch.h"
#include "kvcore/quantized.h"

namespace kvcore {

/// Rows right-aligned at the write position as in BatchKVCache, keys and
/// values rotated. The key groups run along buffer positions shared by all
/// rows: group j holds positions [j G, (j + 1) G) of every row. Why: a
/// decode step writes one position for every row and the mask is over
/// positions, so column c of the scores must be position c in every row;
/// groups aligned per row (at each row's first token) would need a ragged
/// layout. One transposed triple (B, H, D, packed) then serves the batch.
/// Positions [0, T) are quantized (T a multiple of G, the whole groups older
/// than the window), [T, _idx) are the float residuals. A row's padding
/// never widens a group's range: pad positions are filled with the group's
/// smallest real value before quantizing.
///
/// A row whose tokens move by a whole number of groups (a merge or extend
/// whose left padding is a multiple of G, filter dropping whole groups)
/// keeps its quantized groups as they were, which are its own cache's; a
/// row moved otherwise (its groups no longer fall on the grid) is quantized
/// again from its dequantized tokens. While right padding is pending
/// (prepare) nothing is quantized, so finalize rolls the new tokens in
/// float; the quantized history of a row it moves is quantized again.
///
/// With a sink, each row's first `sink` tokens are also kept in float
/// (sink_keys (B, H, sink, D), slots past a row's tokens unused): row b's
/// token j sits at position left_padding[b] + j, and attention reads the
/// float copy there (attention.h, ChannelSink).
class ChannelBatch {
 public:
  ChannelBatch(const std::vector<int>& left_padding, QuantSpec keys, QuantSpec values, int window, int sink = 0);

  /// Rotate and append keys and values (B, H, S, D); returns the quantized
  /// triples (keys transposed) of positions [0, T); residual() the rest.
  std::pair<QuantizedArrays, QuantizedArrays> update_and_fetch(
      const mx::array& keys,
      const mx::array& values);
  std::pair<QuantizedArrays, QuantizedArrays> keys_and_values() const;

  /// As BatchKVCache::prepare.
  void prepare(
      const std::optional<std::vector<int>>& left_padding,
      const std::optional<std::vector<int>>& right_padding);
  /// Roll right-padded rows so every row ends at the write position.
  void finalize();
  /// Keep the rows `indices`; drop the whole groups of padding all keep.
  void filter(const std::vector<int>& indices);
  /// Append other's rows (same specs and window).
  void extend(const ChannelBatch& other);
  /// Row idx as a rotated_channel QuantizedKVCache of its tokens: its
  /// quantized groups as stored when its padding is whole groups, else its
  /// tokens (dequantized) in the float residual.
  QuantizedKVCache extract(int idx) const;
  /// One batch from rotated_channel QuantizedKVCaches of one spec, window
  /// and sink.
  static ChannelBatch merge(const std::vector<const QuantizedKVCache*>& caches);
  /// The float cache's rows, rotated, quantized as updates would have.
  static ChannelBatch from_float(
      const BatchKVCache& cache,
      QuantSpec keys,
      QuantSpec values,
      int window,
      int sink = 0);

  /// As QuantizedKVCache::trim: a trim into a group returns its kept
  /// tokens, dequantized, to the residual.
  int trim(int n);
  /// Remove positions [0, n), whole quantized groups (what a sliding window
  /// has left behind): every row's left padding falls by n (below 0 where
  /// its first tokens went), offsets stay. No sink. ValueError otherwise.
  void drop_front(int n);
  /// Replace the rows' offsets and left paddings (as many rows; offset =
  /// _idx - left padding for each): a row's padding may be negative, its
  /// first tokens gone.
  void set_rows(mx::array offset, mx::array left_padding);
  /// Whether right padding from prepare waits for finalize.
  bool right_padded() const {
    return right_padding_.has_value();
  }
  Mask make_mask(int N, std::optional<int> window_size) const;

  /// keys' triple, values' triple, offset, left_padding, residual keys,
  /// residual values; with a sink, its keys and values.
  std::vector<OptionalArray> state() const;
  /// (_idx, scheme, window); with a sink, its size.
  std::vector<std::string> meta_state() const;
  /// Validates everything, then replaces the whole contents.
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

  size_t nbytes() const;
  bool empty() const {
    return !keys_;
  }
  int idx() const {
    return idx_;
  }
  const mx::array& offset() const {
    return offset_.get();
  }
  const mx::array& left_padding() const {
    return left_padding_.get();
  }
  const OptionalQuantized& keys() const {
    return keys_;
  }
  const OptionalQuantized& values() const {
    return values_;
  }
  const OptionalArray& residual() const {
    return residual_;
  }
  const OptionalArray& value_residual() const {
    return value_residual_;
  }
  const QuantSpec& key_spec() const {
    return key_spec_;
  }
  const QuantSpec& value_spec() const {
    return value_spec_;
  }
  int window() const {
    return window_;
  }
  int sink() const {
    return sink_;
  }
  /// Each row's first tokens, rotated, in float (B, H, sink, D); None
  /// without a sink or tokens.
  const OptionalArray& sink_keys() const {
    return sink_keys_;
  }
  const OptionalArray& sink_values() const {
    return sink_values_;
  }
  /// Positions whose keys and values are quantized (T).
  int quantized_tokens() const;

 private:
  int rows() const {
    return static_cast<int>(offset_.size());
  }
  /// All keys and values as floats (B, H, _idx, D), rotated.
  std::pair<mx::array, mx::array> dequantized() const;
  /// Quantize the residual's positions up to `to` (a multiple of G).
  void quantize_up_to(int to);
  /// The sink's slots that rotated new tokens (B, H, S, D) written at
  /// positions [at, at + S) fill.
  void capture_sink(const mx::array& keys, const mx::array& values, int at);
  /// Rows stacked and right-aligned at the largest write position.
  static ChannelBatch stack(const char* ctx, std::vector<ChannelBatch> sides);

  OptionalQuantized keys_;
  OptionalQuantized values_;
  OptionalArray residual_;
  OptionalArray value_residual_;
  ShiftedRows offset_;
  ShiftedRows left_padding_;
  OptionalArray right_padding_;
  int idx_ = 0;
  QuantSpec key_spec_;
  QuantSpec value_spec_;
  int window_ = 0;
  int sink_ = 0;
  OptionalArray sink_keys_;
  OptionalArray sink_values_;
  // capture_sink's bound: no row takes a sink token at or past
  // sink_full_at_, computed for the left padding array sink_full_for_ (held,
  // so that its id names it).
  OptionalArray sink_full_for_;
  int sink_full_at_ = 0;
};

} // namespace kvcore
