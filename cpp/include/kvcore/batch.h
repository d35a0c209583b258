// Left-padded batch caches: a batch of sequences sharing one buffer, each
// row right-aligned at the write position with its own padding and offset.
#pragma once

#include <type_traits>

#include "kvcore/kv.h"
#include "kvcore/rotating.h"

namespace kvcore {

/// A per-row array (offsets, paddings) with a pending whole-batch shift that
/// is added only when the array is read: the per-token `offset += 1` and
/// `left_padding -= 1` then cost no mlx op (and grow no graph) until a
/// mask or RoPE reads them. Integer sums, so the values are mlx-lm's.
class ShiftedRows {
 public:
  explicit ShiftedRows(mx::array base) : base_(std::move(base)) {}
  ShiftedRows& operator=(mx::array a) {
    base_ = std::move(a);
    shift_ = 0;
    return *this;
  }
  /// The array with the shift applied (folded in once, then cached).
  const mx::array& get() const;
  operator const mx::array&() const {
    return get();
  }
  void shift(int n) {
    shift_ += n;
  }
  size_t size() const {
    return base_.size();
  }
  mx::Dtype dtype() const {
    return base_.dtype();
  }

 private:
  mutable mx::array base_;
  mutable int shift_ = 0;
};

/// x rolled right along `axis` by a per-row shift: shifts (B, 1).
mx::array dynamic_roll(const mx::array& x, const mx::array& shifts, int axis);

/// What the two batch caches share: the buffers, per-row offset and left
/// padding arrays, the write position and the growth step.
class BatchCache : public Cache {
 public:
  static constexpr int default_step = 256;

  const OptionalArray& keys() const {
    return keys_;
  }
  const OptionalArray& values() const {
    return values_;
  }
  void set_keys(OptionalArray keys);
  void set_values(OptionalArray values);
  /// Per-row token positions (B,): tokens seen minus left padding.
  const mx::array& offset() const {
    return offset_.get();
  }
  void set_offset(mx::array offset);
  /// Per-row left padding (B,).
  const mx::array& left_padding() const {
    return left_padding_.get();
  }
  void set_left_padding(mx::array left_padding);
  /// The write position along the sequence axis.
  int idx() const {
    return idx_;
  }
  void set_idx(int idx);

  virtual int step() const {
    return step_;
  }
  void set_step(int step);

  bool empty() const override {
    return !keys_;
  }
  size_t nbytes() const override;

  virtual std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) = 0;
  /// Keep the rows `indices` (a list the caller has in hand).
  virtual void filter(const std::vector<int>& indices);

 protected:
  BatchCache(const std::vector<int>& left_padding);
  int rows() const {
    return static_cast<int>(offset_.size());
  }
  /// keys and values are a pair, offsets and paddings one per row. The
  /// buffers' batch may differ (mlx-lm stores any); row-wise operations
  /// then refuse through check_batch.
  void check_paddings(const char* ctx) const;
  /// As check_paddings, and the buffers hold one row per padding.
  void check_batch(const char* ctx) const;
  /// Checks an update: shapes and dtypes against the buffers.
  void check_update(const char* ctx, const mx::array& keys, const mx::array& values) const;
  /// mlx-lm's extend: both caches' buffers right-aligned at the larger
  /// write position and padded to one length, then stacked.
  void extend_aligned(BatchCache& other);
  /// finalize()'s move of each row's tokens right by shift[row] slots along
  /// the sequence: the buffers rolled, the shift added to the left padding
  /// and taken from the offset.
  void shift_rows_right(const mx::array& shift);
  /// extract(idx)'s checks (one row per padding, idx a row, keys and
  /// values set); the row's left padding, at least 0.
  int extract_padding(const char* ctx, int idx) const;

  OptionalArray keys_;
  OptionalArray values_;
  ShiftedRows offset_;
  ShiftedRows left_padding_;
  int idx_ = 0;
  int step_ = default_step;
};

class BatchKVCache : public BatchCache {
 public:
  /// left_padding: how many pad tokens start each row's prompt.
  explicit BatchKVCache(const std::vector<int>& left_padding);

  const char* name() const override {
    return "BatchKVCache";
  }
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  /// keys[..., :_idx, :] and values[..., :_idx, :].
  std::pair<mx::array, mx::array> keys_and_values() const;

  /// More left padding (empty cache only); right padding to undo in
  /// finalize() for right-padded prompts.
  void prepare(
      const std::optional<std::vector<int>>& left_padding,
      const std::optional<std::vector<int>>& right_padding);
  /// Roll right-padded rows so every row ends at the write position.
  void finalize();
  const OptionalArray& right_padding() const {
    return right_padding_;
  }

  bool is_trimmable() const override {
    return true;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  void filter(const std::vector<int>& indices) override;
  void extend(BatchKVCache& other);
  /// Row idx as a KVCache holding only its tokens.
  KVCache extract(int idx) const;
  /// One batch cache from single-sequence caches, left-padded to the
  /// longest. Like mlx-lm's, it also takes RotatingKVCaches, as long as
  /// their buffer starts with exactly their tokens in temporal order (not
  /// rotated, not over-long); others are refused.
  static BatchKVCache merge(const std::vector<const SequenceCache*>& caches);
  template <class T>
    requires std::is_base_of_v<SequenceCache, T>
  static BatchKVCache merge(const std::vector<const T*>& caches) {
    return merge(std::vector<const SequenceCache*>(caches.begin(), caches.end()));
  }

  /// (keys, values); arrays of state also: offset, left_padding.
  std::vector<OptionalArray> state() const override;
  /// (_idx).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(
      OptionalArray keys,
      OptionalArray values,
      mx::array offset,
      mx::array left_padding,
      int idx);

  int size() const override {
    return idx_;
  }
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<BatchKVCache>(*this);
  }

 private:
  OptionalArray right_padding_;
};

class BatchRotatingKVCache : public BatchCache {
 public:
  BatchRotatingKVCache(int max_size, const std::vector<int>& left_padding);

  const char* name() const override {
    return "BatchRotatingKVCache";
  }
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  std::pair<mx::array, mx::array> keys_and_values() const;

  void prepare(
      const std::optional<std::vector<int>>& left_padding,
      const std::optional<std::vector<int>>& lengths,
      const std::optional<std::vector<int>>& right_padding);
  void finalize();

  bool is_trimmable() const override {
    return offset_in_ring_ < max_size_;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  void filter(const std::vector<int>& indices) override;
  void extend(BatchRotatingKVCache& other);
  RotatingKVCache extract(int idx) const;
  static BatchRotatingKVCache merge(const std::vector<const RotatingKVCache*>& caches);

  /// (keys, values, offset, left_padding).
  std::vector<OptionalArray> state() const override;
  /// (max_size, _offset, _idx, rotated).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(
      OptionalArray keys,
      OptionalArray values,
      mx::array offset,
      mx::array left_padding,
      int max_size,
      int offset_in_ring,
      int idx,
      bool rotated);

  int size() const override {
    return std::min(offset_in_ring_, max_size_);
  }
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<BatchRotatingKVCache>(*this);
  }

  int max_size() const {
    return max_size_;
  }
  /// Tokens written since the start (mlx-lm's `_offset`).
  int offset_in_ring() const {
    return offset_in_ring_;
  }
  void set_offset_in_ring(int v);
  bool rotated() const {
    return rotated_;
  }
  void set_rotated(bool v) {
    rotated_ = v;
  }
  const OptionalArray& lengths() const {
    return lengths_;
  }

 private:
  void temporal_order();
  std::pair<mx::array, mx::array> update_in_place(const mx::array& k, const mx::array& v);
  std::pair<mx::array, mx::array> update_concat(const mx::array& k, const mx::array& v);

  int max_size_;
  int offset_in_ring_ = 0;
  bool rotated_ = false;
  OptionalArray lengths_;
};

} // namespace kvcore
