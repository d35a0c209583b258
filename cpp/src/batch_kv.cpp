#include "kvcore/batch.h"

#include <algorithm>

#include <mlx/ops.h>

#include "batch_rows.h"
#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

using namespace batch_rows;

// BatchKVCache -------------------------------------------------------------

BatchKVCache::BatchKVCache(const std::vector<int>& left_padding) : BatchCache(left_padding) {}

std::pair<mx::array, mx::array> BatchKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchKVCache.update_and_fetch";
  check_update(ctx, keys, values);
  const int S = keys.shape(2), prev = idx_;
  auto kv = write_grown(ctx, keys_, values_, keys, values, prev, [&] {
    return check_size(ctx, "step", this->step(), 1);
  });
  keys_ = std::move(kv.first);
  values_ = std::move(kv.second);
  offset_.shift(S);
  idx_ += S;
  return keys_and_values();
}

std::pair<mx::array, mx::array> BatchKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("BatchKVCache.keys_and_values", "the cache is empty: no keys or values yet");
  }
  return {seq_slice(*keys_, 0, idx_), seq_slice(*values_, 0, idx_)};
}

void BatchKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& right_padding) {
  constexpr const char* ctx = "BatchKVCache.prepare";
  std::optional<mx::array> lp;
  if (left_padding) {
    if (keys_) {
      throw ValueError(ctx, "Left padding can only be added to an empty BatchKVCache");
    }
    check_count(ctx, "left paddings", left_padding->size(), rows());
    lp = int_array(*left_padding);
  }
  if (right_padding) {
    check_count(ctx, "right paddings", right_padding->size(), rows());
  }
  if (lp) {
    left_padding_ = mx::add(this->left_padding(), *lp);
    offset_ = mx::subtract(offset(), *lp);
  }
  if (right_padding && !right_padding->empty() &&
      *std::max_element(right_padding->begin(), right_padding->end()) > 0) {
    right_padding_ = int_array(*right_padding);
  }
}

void BatchKVCache::finalize() {
  if (!right_padding_) {
    return;
  }
  check_batch("BatchKVCache.finalize");
  shift_rows_right(*right_padding_);
  right_padding_.reset();
}

int BatchKVCache::trim(int n) {
  check_size("BatchKVCache.trim", "n", n);
  n = std::min(idx_, n);
  idx_ -= n;
  offset_.shift(-n);
  return n;
}

Mask BatchKVCache::make_mask(int N, bool, std::optional<int> window_size) const {
  constexpr const char* ctx = "BatchKVCache.make_mask";
  check_batch(ctx);
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  return create_causal_mask(N, idx_, window_size, std::nullopt, left_padding());
}

void BatchKVCache::filter(const std::vector<int>& indices) {
  BatchKVCache next = *this; // staged: the padding is read (evaluated) below
  next.BatchCache::filter(indices);
  // Shift left to drop padding no row needs any more. An empty cache's
  // padding is still to be written, so it stays (mlx-lm would take _idx
  // below zero there).
  if (!indices.empty() && next.keys_ && next.values_) {
    auto pads = to_ints(next.left_padding());
    int min_pad = std::min(*std::min_element(pads.begin(), pads.end()), next.idx_);
    if (min_pad > 0) {
      next.keys_ = seq_slice(*next.keys_, min_pad, next.keys_->shape(2));
      next.values_ = seq_slice(*next.values_, min_pad, next.values_->shape(2));
      next.idx_ -= min_pad;
      next.left_padding_.shift(-min_pad);
    }
  }
  next.right_padding_ = take_rows(right_padding_, indices);
  *this = std::move(next);
}

void BatchKVCache::extend(BatchKVCache& other) {
  auto pending = concat_rows(right_padding_, mx::zeros_like(offset()), other.right_padding_,
                             mx::zeros_like(other.offset()));
  if (!keys_ && !other.keys_) {
    left_padding_ = mx::concatenate({left_padding(), other.left_padding()}, 0);
    offset_ = mx::concatenate({offset(), other.offset()}, 0);
  } else {
    extend_aligned(other);
  }
  right_padding_ = std::move(pending);
}

KVCache BatchKVCache::extract(int idx) const {
  const int padding = extract_padding("BatchKVCache.extract", idx);
  auto k = mx::contiguous(seq_slice(row_slice(*keys_, idx, idx + 1), padding, idx_));
  auto v = mx::contiguous(seq_slice(row_slice(*values_, idx, idx + 1), padding, idx_));
  KVCache out;
  out.set(k, v, k.shape(2));
  return out;
}

BatchKVCache BatchKVCache::merge(const std::vector<const SequenceCache*>& caches) {
  constexpr const char* ctx = "BatchKVCache.merge";
  check_non_null_list(ctx, caches);
  std::vector<int> lengths, padding;
  std::vector<std::pair<OptionalArray, OptionalArray>> kv;
  for (const auto* c : caches) {
    check_merge_row(ctx, *c);
    lengths.push_back(c->size());
    kv.emplace_back(
        c->keys() ? OptionalArray(seq_slice(*c->keys(), 0, c->offset())) : std::nullopt,
        c->values() ? OptionalArray(seq_slice(*c->values(), 0, c->offset())) : std::nullopt);
  }
  const int max_length = *std::max_element(lengths.begin(), lengths.end());
  if (max_length == 0) {
    return BatchKVCache(std::vector<int>(caches.size(), 0));
  }
  for (int l : lengths) padding.push_back(max_length - l);
  auto stacked = stack_rows(ctx, kv, padding, lengths, max_length);
  BatchKVCache out(padding);
  out.keys_ = stacked.keys;
  out.values_ = stacked.values;
  out.offset_.shift(max_length);
  out.idx_ = max_length;
  return out;
}

std::vector<OptionalArray> BatchKVCache::state() const {
  return {keys_, values_, offset(), left_padding()};
}

std::vector<std::string> BatchKVCache::meta_state() const {
  return {std::to_string(idx_)};
}

void BatchKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "BatchKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 4);
  check_count(ctx, "scalars", meta.size(), 1);
  if (!arrays[2] || !arrays[3]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  set(arrays[0], arrays[1], *arrays[2], *arrays[3], parse_int(ctx, "_idx", meta[0]));
}

void BatchKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    mx::array offset,
    mx::array left_padding,
    int idx) {
  constexpr const char* ctx = "BatchKVCache.state";
  check_pair(ctx, keys, values);
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  if (offset.size() != left_padding.size()) {
    throw ValueError(ctx, "offset and left_padding for one batch size",
                     std::to_string(offset.size()) + ", " + std::to_string(left_padding.size()));
  }
  check_offset_fits(ctx, keys, idx);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
  idx_ = idx;
}

} // namespace kvcore
