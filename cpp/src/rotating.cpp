#include "kvcore/rotating.h"

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

namespace {

void check_window(const char* ctx, int max_size, int keep) {
  check_size(ctx, "max_size", max_size, 1);
  if (keep < 0 || keep >= max_size) {
    throw ValueError(
        ctx,
        "keep in [0, max_size) = [0, " + std::to_string(max_size) + ")",
        "keep " + std::to_string(keep));
  }
}

} // namespace

RotatingKVCache::RotatingKVCache(int max_size, int keep)
    : keep_(keep), max_size_(max_size) {
  check_window("RotatingKVCache", max_size, keep);
}

std::pair<mx::array, mx::array> RotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "RotatingKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  check_pair(ctx, keys_, values_);
  if (keys_) {
    check_fits(ctx, "keys", keys, *keys_);
    check_fits(ctx, "values", values, *values_);
    if (idx_ < 0 || idx_ > keys_->shape(2)) {
      throw RuntimeError(
          ctx,
          "a ring cursor _idx in [0, " + std::to_string(keys_->shape(2)) + "]",
          "_idx " + std::to_string(idx_));
    }
  }
  check_size(ctx, "offset + S", 1LL * offset_ + keys.shape(2));
  if (keys.shape(2) == 1) {
    return update_in_place(keys, values);
  }
  return update_concat(keys, values);
}

// Temporal order: the pinned `keep` slots, then the oldest tokens (from the
// cursor on), then the newest (between keep and the cursor).
mx::array RotatingKVCache::temporal_order(const mx::array& v) const {
  if (idx_ == v.shape(2)) {
    return v;
  }
  if (idx_ < offset_) {
    return seq_concat(
        {seq_slice(v, 0, keep_),
         seq_slice(v, idx_, v.shape(2)),
         seq_slice(v, keep_, idx_)});
  }
  return seq_slice(v, 0, idx_);
}

// Drop n tokens after the pinned ones, then append.
mx::array RotatingKVCache::drop_oldest(
    int n,
    const mx::array& v,
    const std::optional<mx::array>& append) const {
  std::vector<mx::array> parts;
  if (n > 0) {
    parts = {seq_slice(v, 0, keep_), seq_slice(v, n + keep_, v.shape(2))};
  } else {
    parts = {v};
  }
  if (append) {
    parts.push_back(*append);
  }
  return seq_concat(std::move(parts));
}

std::pair<mx::array, mx::array> RotatingKVCache::update_concat(
    const mx::array& keys,
    const mx::array& values) {
  if (!keys_) {
    keys_ = keys;
    values_ = values;
  } else {
    auto k = temporal_order(*keys_);
    auto v = temporal_order(*values_);
    // Keep max_size - 1 old tokens so every new one sees max_size.
    int trim_size = k.shape(2) - max_size_ + 1;
    k = drop_oldest(trim_size, k, keys);
    v = drop_oldest(trim_size, v, values);
    keys_ = std::move(k);
    values_ = std::move(v);
  }
  offset_ += keys.shape(2);
  idx_ = keys_->shape(2);
  return {*keys_, *values_};
}

std::pair<mx::array, mx::array> RotatingKVCache::update_in_place(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "RotatingKVCache.update_and_fetch";
  const int prev = offset_;
  OptionalArray k = keys_, v = values_;
  int idx = idx_;
  // Still filling the window: grow by up to `step` slots.
  if (!k || (prev >= k->shape(2) && k->shape(2) < max_size_)) {
    grow_ring(ctx, k, v, keys, values, prev, max_size_,
              check_size(ctx, "step", this->step(), 1));
    idx = prev;
  }
  int trim_size = k->shape(2) - max_size_;
  if (trim_size > 0) {
    k = drop_oldest(trim_size, *k);
    v = drop_oldest(trim_size, *v);
    idx = max_size_;
  }
  if (idx == max_size_) {
    idx = keep_;
  }
  if (idx >= k->shape(2)) {
    throw RuntimeError(
        ctx,
        "a ring cursor _idx below the buffer length " +
            std::to_string(k->shape(2)),
        "_idx " + std::to_string(idx));
  }
  auto kw = seq_write(*k, keys, idx);
  auto vw = seq_write(*v, values, idx);
  k.reset();
  v.reset();
  keys_ = std::move(kw);
  values_ = std::move(vw);
  offset_ = prev + 1;
  idx_ = idx + 1;
  return keys_and_values();
}

std::pair<mx::array, mx::array> RotatingKVCache::keys_and_values() const {
  require_arrays("RotatingKVCache.keys_and_values");
  if (offset_ < keys_->shape(2)) {
    return {seq_slice(*keys_, 0, offset_), seq_slice(*values_, 0, offset_)};
  }
  return {*keys_, *values_};
}

int RotatingKVCache::trim(int n) {
  constexpr const char* ctx = "RotatingKVCache.trim";
  check_size(ctx, "n", n);
  n = std::min(offset_, n);
  if (n > 0 && !is_trimmable()) {
    // mlx-lm would move the cursor back over tokens that are gone.
    throw RuntimeError(
        ctx,
        "offset < max_size (nothing rotated out yet)",
        "offset " + std::to_string(offset_) + " with max_size " +
            std::to_string(max_size_));
  }
  offset_ -= n;
  idx_ -= n;
  return n;
}

Mask RotatingKVCache::make_mask(
    int N,
    bool return_array,
    std::optional<int> window_size) const {
  return mask_for(N, offset_, max_size_, idx_, return_array, window_size);
}

Mask RotatingKVCache::mask_for(
    int N,
    int seen,
    int slots,
    int cursor,
    bool return_array,
    std::optional<int> window_size) {
  constexpr const char* ctx = "RotatingKVCache.make_mask";
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  if (N > 1) {
    int window = (window_size && *window_size) ? *window_size : slots;
    int offset = std::min(slots - 1, seen);
    if (1LL * offset + N > window || return_array) {
      return create_causal_mask(N, offset, window);
    }
    return std::string("causal");
  }
  if (!window_size) {
    return std::monostate{};
  }
  int window = *window_size;
  // A window narrower than the ring needs a mask over the ring's slots.
  if (seen >= window && slots > window) {
    int idx = cursor >= slots ? 0 : cursor;
    int mask_size = seen < slots ? seen + 1 : slots;
    auto mask = mx::greater_equal(
        mx::arange(mask_size), mx::array(mask_size - window));
    return mx::roll(mask, idx + 1);
  }
  return std::monostate{};
}

std::vector<OptionalArray> RotatingKVCache::state() const {
  return {keys_, values_};
}

std::vector<std::string> RotatingKVCache::meta_state() const {
  return {
      std::to_string(keep_),
      std::to_string(max_size_),
      std::to_string(offset_),
      std::to_string(idx_)};
}

void RotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "RotatingKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 2);
  check_count(ctx, "scalars", meta.size(), 4);
  set(arrays[0],
      arrays[1],
      parse_int(ctx, "offset", meta[2]),
      parse_int(ctx, "keep", meta[0]),
      parse_int(ctx, "max_size", meta[1]),
      parse_int(ctx, "_idx", meta[3]));
}

void RotatingKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    int offset,
    int keep,
    int max_size,
    int idx) {
  constexpr const char* ctx = "RotatingKVCache.state";
  check_pair(ctx, keys, values);
  check_size(ctx, "offset", offset);
  check_window(ctx, max_size, keep);
  int len = keys ? keys->shape(2) : 0;
  if (idx < 0 || idx > len) {
    throw ValueError(
        ctx,
        "_idx in [0, " + std::to_string(len) + "] (the keys' length)",
        "_idx " + std::to_string(idx));
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = offset;
  keep_ = keep;
  max_size_ = max_size;
  idx_ = idx;
}

void RotatingKVCache::set_idx(int idx) {
  idx_ = check_size("RotatingKVCache._idx", "_idx", idx);
}

void RotatingKVCache::set_keep(int keep) {
  check_window("RotatingKVCache.keep", max_size_, keep);
  keep_ = keep;
}

void RotatingKVCache::set_max_size(int max_size) {
  check_window("RotatingKVCache.max_size", max_size, keep_);
  max_size_ = max_size;
}

} // namespace kvcore
