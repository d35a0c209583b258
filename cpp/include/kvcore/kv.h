// Full-attention caches: KVCache (step-grown buffer) and ConcatenateKVCache.
#pragma once

#include "kvcore/cache.h"

namespace kvcore {

/// Common ground of the caches that hold one keys and one values array
/// along a sequence axis: the arrays, the token offset and the growth step.
class SequenceCache : public Cache {
 public:
  static constexpr int default_step = 256;

  /// Append keys and values (B, H, S, D) and return everything cached.
  virtual std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) = 0;

  const OptionalArray& keys() const {
    return keys_;
  }
  const OptionalArray& values() const {
    return values_;
  }
  /// Set the raw arrays (None or rank 4), as mlx-lm code assigns them.
  void set_keys(OptionalArray keys);
  void set_values(OptionalArray values);

  /// Tokens seen so far (the RoPE position of the next token).
  int offset() const {
    return offset_;
  }
  void set_offset(int offset);

  /// Slots the buffer grows by. Virtual so the Python binding can honour
  /// a `step` set on a Python class or instance.
  virtual int step() const {
    return step_;
  }
  void set_step(int step);

  /// Tokens the buffer gets room for when it is first allocated (or next
  /// grown), so filling that many never copies it; 0 grows step by step.
  int capacity() const {
    return capacity_;
  }
  /// Throws ValueError for a negative capacity.
  void set_capacity(int capacity);

  bool empty() const override {
    return !keys_;
  }
  size_t nbytes() const override;

 protected:
  /// Throws unless both arrays are set, for calls that need them.
  void require_arrays(const char* ctx) const;
  /// Checks an update against the buffers (shapes, dtypes, that `prev`
  /// lies within them) and returns the buffers with keys and values
  /// written at prev, grown by whole steps first if needed. Changes
  /// nothing: the caller commits.
  std::pair<mx::array, mx::array> write_at(
      const char* ctx,
      const mx::array& keys,
      const mx::array& values,
      int prev) const;

  OptionalArray keys_;
  OptionalArray values_;
  int offset_ = 0;
  int step_ = default_step;
  int capacity_ = 0;
};

/// The standard cache: a buffer grown in `step` slots, written in place.
class KVCache : public SequenceCache {
 public:
  KVCache() = default;
  /// With room for `capacity` tokens at the first update.
  explicit KVCache(int capacity) {
    set_capacity(capacity);
  }

  const char* name() const override {
    return "KVCache";
  }
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  /// keys[..., :offset, :], values[..., :offset, :].
  std::pair<mx::array, mx::array> keys_and_values() const;

  bool is_trimmable() const override {
    return true;
  }
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  /// (keys, values): the whole buffer, as mlx-lm 0.32 keeps it.
  std::vector<OptionalArray> state() const override;
  /// (offset).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  /// Typed restore: validates, then replaces keys, values and offset.
  void set(OptionalArray keys, OptionalArray values, int offset);

  int size() const override {
    return offset_;
  }
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<KVCache>(*this);
  }
};

/// Keeps exactly the tokens seen, concatenating on every update.
class ConcatenateKVCache : public SequenceCache {
 public:
  const char* name() const override {
    return "ConcatenateKVCache";
  }
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  std::pair<mx::array, mx::array> keys_and_values() const;

  bool is_trimmable() const override {
    return true;
  }
  /// Drops the tokens for good (mlx-lm only lowers offset, so its next
  /// update brings them back).
  int trim(int n) override;
  Mask make_mask(
      int N,
      bool return_array = false,
      std::optional<int> window_size = std::nullopt) const override;

  /// (keys, values); the offset is keys' length.
  std::vector<OptionalArray> state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(OptionalArray keys, OptionalArray values);
  // size() stays 0, as in mlx-lm (the base's "cannot say").
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<ConcatenateKVCache>(*this);
  }
};

} // namespace kvcore
