#include "kvcore/batch.h"

#include <algorithm>

#include <mlx/ops.h>

#include "batch_rows.h"
#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

using namespace batch_rows;

// BatchRotatingKVCache -----------------------------------------------------

BatchRotatingKVCache::BatchRotatingKVCache(int max_size, const std::vector<int>& left_padding)
    : BatchCache(left_padding),
      max_size_(check_size("BatchRotatingKVCache", "max_size", max_size, 1)) {}

void BatchRotatingKVCache::temporal_order() {
  if (rotated_ && keys_ && values_) {
    auto k = mx::roll(*keys_, -idx_, 2);
    auto v = mx::roll(*values_, -idx_, 2);
    keys_ = std::move(k);
    values_ = std::move(v);
    idx_ = keys_->shape(2);
    rotated_ = false;
  }
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchRotatingKVCache.update_and_fetch";
  check_update(ctx, keys, values);
  if (keys.shape(2) == 1) {
    if (lengths_) {
      throw RuntimeError(
          ctx, "finalize() should be called before decoding with BatchRotatingKVCache");
    }
    return update_in_place(keys, values);
  }
  if (lengths_ && keys_) {
    check_batch(ctx); // right-padded rows are rolled, each by its own shift
  }
  return update_concat(keys, values);
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_concat(
    const mx::array& keys,
    const mx::array& values) {
  const int S = keys.shape(2);
  if (!keys_) {
    keys_ = keys;
    values_ = values;
  } else {
    // Work on copies of the members; commit together at the end.
    BatchRotatingKVCache next = *this;
    next.temporal_order();
    auto& k = *next.keys_;
    auto& v = *next.values_;
    if (k.shape(2) > next.idx_) {
      k = seq_slice(k, 0, next.idx_);
      v = seq_slice(v, 0, next.idx_);
    }
    if (next.lengths_) {
      // Roll right-padded rows so padding never evicts real tokens.
      auto roll = mx::maximum(mx::array(0, next.offset_.dtype()),
                              mx::subtract(next.offset(), *next.lengths_));
      auto shifts = mx::expand_dims(roll, 1);
      k = dynamic_roll(k, shifts, 2);
      v = dynamic_roll(v, shifts, 2);
      next.left_padding_ = mx::add(next.left_padding(), roll);
      next.offset_ = mx::subtract(next.offset(), roll);
    }
    // Keep max_size - 1 old tokens so every new one sees max_size.
    int trim_size = next.idx_ - max_size_ + 1;
    if (trim_size > 0) {
      next.left_padding_.shift(-trim_size);
      k = seq_slice(k, trim_size, k.shape(2));
      v = seq_slice(v, trim_size, v.shape(2));
    }
    k = seq_concat({k, keys});
    v = seq_concat({v, values});
    *this = std::move(next);
  }
  offset_.shift(S);
  offset_in_ring_ += S;
  idx_ = keys_->shape(2);
  // As mlx-lm: evaluating the keys evaluates the paddings and offsets too.
  keys_ = depends_on(*keys_, left_padding(), offset());
  return {*keys_, *values_};
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_in_place(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchRotatingKVCache.update_and_fetch";
  const int S = keys.shape(2), prev = offset_in_ring_;
  OptionalArray k = keys_, v = values_;
  int idx = idx_;
  bool rotated = rotated_;
  ShiftedRows lp = left_padding_;
  if (!k || (prev >= k->shape(2) && k->shape(2) < max_size_)) {
    grow_ring(ctx, k, v, keys, values, prev, max_size_,
              check_size(ctx, "step", this->step(), 1));
    idx = prev;
  }
  int trim_size = k->shape(2) - max_size_;
  if (trim_size > 0) {
    k = seq_slice(*k, trim_size, k->shape(2));
    v = seq_slice(*v, trim_size, v->shape(2));
    idx = max_size_;
    lp.shift(-trim_size);
  }
  if (idx == max_size_) {
    rotated = true;
    idx = 0;
  }
  if (rotated) {
    lp.shift(-S);
  }
  if (idx + S > k->shape(2)) {
    throw RuntimeError(ctx, "a write position inside the buffer of " + std::to_string(k->shape(2)),
                       "_idx " + std::to_string(idx));
  }
  auto kw = seq_write(*k, keys, idx);
  auto vw = seq_write(*v, values, idx);
  k.reset();
  v.reset();
  // mlx-lm adds `mx.depends(keys, (left_padding, offset))` here so that the
  // per-token padding and offset ops get evaluated; with the shifts pending
  // in ShiftedRows there are no such ops to evaluate.
  keys_ = std::move(kw);
  values_ = std::move(vw);
  left_padding_ = std::move(lp);
  offset_.shift(S);
  rotated_ = rotated;
  offset_in_ring_ += S;
  idx_ = idx + S;
  return keys_and_values();
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("BatchRotatingKVCache.keys_and_values",
                       "the cache is empty: no keys or values yet");
  }
  if (offset_in_ring_ < keys_->shape(2)) {
    return {seq_slice(*keys_, 0, offset_in_ring_), seq_slice(*values_, 0, offset_in_ring_)};
  }
  return {*keys_, *values_};
}

void BatchRotatingKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& lengths,
    const std::optional<std::vector<int>>& right_padding) {
  constexpr const char* ctx = "BatchRotatingKVCache.prepare";
  std::optional<mx::array> lp;
  if (left_padding) {
    if (keys_) {
      throw ValueError(ctx, "Left padding can only be added to an empty BatchRotatingKVCache");
    }
    check_count(ctx, "left paddings", left_padding->size(), rows());
    lp = int_array(*left_padding);
  }
  bool pad_right = right_padding && !right_padding->empty() &&
      *std::max_element(right_padding->begin(), right_padding->end()) > 0;
  if (right_padding) {
    check_count(ctx, "right paddings", right_padding->size(), rows());
  }
  if (pad_right) {
    if (!lengths) {
      throw ValueError(ctx, "lengths with right_padding", "None");
    }
    check_count(ctx, "lengths", lengths->size(), rows());
  }
  if (lp) {
    left_padding_ = mx::add(this->left_padding(), *lp);
    offset_ = mx::subtract(offset(), *lp);
  }
  if (pad_right) {
    lengths_ = mx::add(int_array(*lengths), offset());
  }
}

void BatchRotatingKVCache::finalize() {
  if (!lengths_) {
    return;
  }
  check_batch("BatchRotatingKVCache.finalize");
  shift_rows_right(mx::maximum(mx::array(0, offset_.dtype()), mx::subtract(offset(), *lengths_)));
  lengths_.reset();
}

int BatchRotatingKVCache::trim(int n) {
  constexpr const char* ctx = "BatchRotatingKVCache.trim";
  check_size(ctx, "n", n);
  n = std::min(offset_in_ring_, n);
  if (n > 0 && !is_trimmable()) {
    throw RuntimeError(ctx, "_offset < max_size (nothing rotated out yet)",
                       "_offset " + std::to_string(offset_in_ring_) + " with max_size " +
                           std::to_string(max_size_));
  }
  offset_in_ring_ -= n;
  idx_ -= n;
  offset_.shift(-n);
  return n;
}

Mask BatchRotatingKVCache::make_mask(
    int N,
    bool,
    std::optional<int> window_size) const {
  constexpr const char* ctx = "BatchRotatingKVCache.make_mask";
  check_batch(ctx);
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  auto lp = left_padding();
  int window = (window_size && *window_size) ? *window_size : max_size_;
  int offset = std::min(max_size_ - 1, offset_in_ring_);
  check_size(ctx, "offset + N", 1LL * offset + N);
  auto rinds = mx::arange(offset + N);
  auto linds = offset ? mx::arange(offset, offset + N) : rinds;
  linds = mx::expand_dims(linds, 1);
  rinds = mx::expand_dims(rinds, 0);
  auto mask = mx::greater_equal(linds, rinds);
  mask = mx::logical_and(mask, mx::less(linds, mx::add(rinds, mx::array(window))));
  int trim_size = idx_ - max_size_ + (N > 1 ? 1 : 0);
  if (trim_size > 0) {
    lp = minus(lp, trim_size);
  }
  bool rotated = N == 1 && (rotated_ || idx_ >= max_size_);
  if (rotated) {
    lp = minus(lp, 1);
  }
  mask = mx::logical_and(mask, mx::greater_equal(rinds, mx::expand_dims(lp, {1, 2, 3})));
  if (rotated) {
    int idx = idx_ >= max_size_ ? 0 : idx_;
    mask = mx::roll(mask, idx + 1, -1);
  }
  return mask;
}

void BatchRotatingKVCache::filter(const std::vector<int>& indices) {
  BatchRotatingKVCache next = *this;
  next.BatchCache::filter(indices);
  next.lengths_ = take_rows(lengths_, indices);
  *this = std::move(next);
}

void BatchRotatingKVCache::extend(BatchRotatingKVCache& other) {
  if (other.max_size_ != max_size_) {
    throw ValueError("BatchRotatingKVCache.extend", "a batch of max_size " + std::to_string(max_size_),
                     "max_size " + std::to_string(other.max_size_));
  }
  // A row with no lengths pending rolls by nothing: its lengths are its offset.
  auto pending = concat_rows(lengths_, offset(), other.lengths_, other.offset());
  if (!keys_ && !other.keys_) {
    left_padding_ = mx::concatenate({left_padding(), other.left_padding()}, 0);
    offset_ = mx::concatenate({offset(), other.offset()}, 0);
    lengths_ = std::move(pending);
    return;
  }
  // Staged on copies: both caches change only if the extend succeeds.
  BatchRotatingKVCache a = *this, b = other;
  if (a.rotated_ != b.rotated_ || a.idx_ != b.idx_) {
    a.temporal_order();
    b.temporal_order();
  }
  int ring = std::max(a.offset_in_ring_, b.offset_in_ring_);
  a.extend_aligned(b);
  a.offset_in_ring_ = ring;
  a.lengths_ = std::move(pending);
  *this = std::move(a);
  if (&other != this) { // extending a cache with itself doubles it
    other = std::move(b);
  }
}

RotatingKVCache BatchRotatingKVCache::extract(int idx) const {
  constexpr const char* ctx = "BatchRotatingKVCache.extract";
  const int padding = extract_padding(ctx, idx);
  int offset = to_ints(this->offset())[idx];
  auto k = row_slice(*keys_, idx, idx + 1);
  auto v = row_slice(*values_, idx, idx + 1);
  int end = idx_;
  if (rotated_) {
    k = mx::roll(k, -idx_, 2);
    v = mx::roll(v, -idx_, 2);
    end = max_size_;
  }
  k = mx::contiguous(seq_slice(k, padding, end));
  v = mx::contiguous(seq_slice(v, padding, end));
  RotatingKVCache out(max_size_);
  out.set(k, v, check_size(ctx, "the row's offset", offset), 0, max_size_, k.shape(2));
  return out;
}

BatchRotatingKVCache BatchRotatingKVCache::merge(const std::vector<const RotatingKVCache*>& caches) {
  constexpr const char* ctx = "BatchRotatingKVCache.merge";
  check_non_null_list(ctx, caches);
  const int max_size = caches[0]->max_size();
  std::vector<int> offsets, lengths, padding;
  std::vector<std::pair<OptionalArray, OptionalArray>> kv;
  for (const auto* c : caches) {
    if (c->max_size() != max_size) {
      throw ValueError(ctx, "BatchRotatingKVCache can only merge caches with the same maximum size");
    }
    offsets.push_back(c->offset());
    int l = c->size();
    if (c->keys() && c->values() && l > 0) {
      auto k = c->temporal_order(*c->keys());
      auto v = c->temporal_order(*c->values());
      // The ring may hold fewer tokens than its offset says (an empty
      // update after an over-long one, an offset set past the buffer):
      // the row takes what it holds.
      l = std::min(l, k.shape(2));
      kv.emplace_back(seq_slice(k, k.shape(2) - l, k.shape(2)), seq_slice(v, v.shape(2) - l, v.shape(2)));
    } else {
      kv.emplace_back(std::nullopt, std::nullopt);
    }
    lengths.push_back(l);
  }
  const int max_length = *std::max_element(lengths.begin(), lengths.end());
  if (max_length == 0) {
    return BatchRotatingKVCache(max_size, std::vector<int>(caches.size(), 0));
  }
  for (int l : lengths) padding.push_back(max_length - l);
  auto stacked = stack_rows(ctx, kv, padding, lengths, max_length);
  BatchRotatingKVCache out(max_size, padding);
  out.keys_ = stacked.keys;
  out.values_ = stacked.values;
  out.offset_ = int_array(offsets);
  out.idx_ = max_length;
  out.offset_in_ring_ = max_length;
  return out;
}

std::vector<OptionalArray> BatchRotatingKVCache::state() const {
  return {keys_, values_, offset(), left_padding()};
}

std::vector<std::string> BatchRotatingKVCache::meta_state() const {
  return {std::to_string(max_size_), std::to_string(offset_in_ring_), std::to_string(idx_),
          rotated_ ? "1" : "0"};
}

void BatchRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "BatchRotatingKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 4);
  check_count(ctx, "scalars", meta.size(), 4);
  if (!arrays[2] || !arrays[3]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  set(arrays[0], arrays[1], *arrays[2], *arrays[3], parse_int(ctx, "max_size", meta[0]),
      parse_int(ctx, "_offset", meta[1]), parse_int(ctx, "_idx", meta[2]),
      parse_int(ctx, "rotated", meta[3]) != 0);
}

void BatchRotatingKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    mx::array offset,
    mx::array left_padding,
    int max_size,
    int offset_in_ring,
    int idx,
    bool rotated) {
  constexpr const char* ctx = "BatchRotatingKVCache.state";
  check_pair(ctx, keys, values);
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  check_size(ctx, "max_size", max_size, 1);
  check_size(ctx, "_offset", offset_in_ring);
  if (offset.size() != left_padding.size()) {
    throw ValueError(ctx, "offset and left_padding for one batch size",
                     std::to_string(offset.size()) + ", " + std::to_string(left_padding.size()));
  }
  check_offset_fits(ctx, keys, idx);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
  max_size_ = max_size;
  offset_in_ring_ = offset_in_ring;
  idx_ = idx;
  rotated_ = rotated;
}

void BatchRotatingKVCache::set_offset_in_ring(int v) {
  offset_in_ring_ = check_size("BatchRotatingKVCache._offset", "_offset", v);
}

} // namespace kvcore
