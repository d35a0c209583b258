// State-space slots: a fixed number of arrays per layer (conv and SSM
// states), batched along axis 0, with optional left padding and lengths.
#pragma once

#include "kvcore/cache.h"

namespace kvcore {

class ArraysCache : public Cache {
 public:
  /// `size` slots, all None; left_padding (B,) marks padded prompt starts.
  explicit ArraysCache(int size, OptionalArray left_padding = std::nullopt);

  const char* name() const override {
    return "ArraysCache";
  }

  int slots() const {
    return static_cast<int>(cache_.size());
  }
  /// Slot idx (negative counts from the end, as for a Python list).
  const OptionalArray& get(int idx) const;
  void set(int idx, OptionalArray value);
  const std::vector<OptionalArray>& cache() const {
    return cache_;
  }
  void set_cache(std::vector<OptionalArray> cache);

  const OptionalArray& left_padding() const {
    return left_padding_;
  }
  void set_left_padding(OptionalArray v);
  const OptionalArray& lengths() const {
    return lengths_;
  }
  void set_lengths(OptionalArray v);

  /// Rows: from the first set slot, else the paddings, else 1.
  int batch_size() const;
  /// Keep the rows `indices` (int array, (n,)) of every slot and padding.
  void filter(const mx::array& indices);
  /// Append other's rows; a slot None on one side becomes zeros there.
  void extend(const ArraysCache& other);
  /// Row idx as a one-row cache (without paddings, as mlx-lm).
  ArraysCache extract(int idx) const;
  /// Set per-row lengths (None clears them).
  void prepare(OptionalArray lengths);
  void finalize();
  /// N tokens consumed: lengths and left padding move down by N.
  void advance(int N);
  /// (B, N) mask of the positions inside each row's padding and length,
  /// or none when there is neither.
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;
  /// One cache with a row per input (each a one-row cache or empty).
  static ArraysCache merge(const std::vector<const ArraysCache*>& caches);

  /// The slots, then left_padding, then lengths.
  std::vector<OptionalArray> state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;

  bool empty() const override {
    return cache_.empty() || !cache_[0];
  }
  size_t nbytes() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<ArraysCache>(*this);
  }

 private:
  int index(const char* ctx, int idx) const;

  std::vector<OptionalArray> cache_;
  OptionalArray left_padding_;
  OptionalArray lengths_;
};

} // namespace kvcore
