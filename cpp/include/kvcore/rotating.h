// Sliding-window cache: a ring of max_size slots whose first `keep` slots
// are never overwritten.
#pragma once

#include "kvcore/kv.h"

namespace kvcore {

class RotatingKVCache : public SequenceCache {
 public:
  /// max_size >= 1 slots, the first 0 <= keep < max_size of them pinned.
  explicit RotatingKVCache(int max_size, int keep = 0);

  const char* name() const override {
    return "RotatingKVCache";
  }
  /// One token: written at the ring cursor. Several: the cache is put in
  /// temporal order and trimmed so each new token still sees max_size.
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  std::pair<mx::array, mx::array> keys_and_values() const;

  /// Only while nothing has been rotated out (offset < max_size).
  bool is_trimmable() const override {
    return offset_ < max_size_;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;
  /// make_mask of a ring that has seen `seen` tokens, with `slots` slots
  /// (max_size) and its cursor at `cursor`.
  static Mask mask_for(
      int N,
      int seen,
      int slots,
      int cursor,
      bool return_array,
      std::optional<int> window_size);

  /// (keys, values).
  std::vector<OptionalArray> state() const override;
  /// (keep, max_size, offset, _idx).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  /// Typed restore: validates, then replaces everything.
  void set(
      OptionalArray keys,
      OptionalArray values,
      int offset,
      int keep,
      int max_size,
      int idx);

  int size() const override {
    return std::min(offset_, max_size_);
  }
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<RotatingKVCache>(*this);
  }

  int max_size() const {
    return max_size_;
  }
  int keep() const {
    return keep_;
  }
  /// The ring cursor: the slot the next single token goes to.
  int idx() const {
    return idx_;
  }
  void set_idx(int idx);
  void set_keep(int keep);
  void set_max_size(int max_size);
  /// v (the keys or values buffer) in temporal order, oldest first after
  /// the pinned tokens, cut to the tokens held.
  mx::array temporal_order(const mx::array& v) const;

 private:
  std::pair<mx::array, mx::array> update_in_place(
      const mx::array& keys,
      const mx::array& values);
  std::pair<mx::array, mx::array> update_concat(
      const mx::array& keys,
      const mx::array& values);
  mx::array drop_oldest(
      int n,
      const mx::array& v,
      const std::optional<mx::array>& append = std::nullopt) const;

  int keep_;
  int max_size_;
  int idx_ = 0;
};

} // namespace kvcore
