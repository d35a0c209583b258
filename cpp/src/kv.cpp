#include "kvcore/kv.h"

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

// SequenceCache ------------------------------------------------------------

namespace {

void check_rank4(const char* ctx, const OptionalArray& a) {
  if (a && a->ndim() != 4) {
    throw ValueError(ctx, "None or an array of rank 4 (B, n_kv_heads, S, head_dim)",
                     "rank " + std::to_string(a->ndim()) + " " + shape_str(a->shape()));
  }
}

} // namespace

void SequenceCache::set_keys(OptionalArray keys) {
  check_rank4("keys", keys);
  keys_ = std::move(keys);
}

void SequenceCache::set_values(OptionalArray values) {
  check_rank4("values", values);
  values_ = std::move(values);
}

void SequenceCache::set_offset(int offset) {
  offset_ = check_size("offset", "offset", offset);
}

void SequenceCache::set_step(int step) {
  step_ = check_size("step", "step", step, 1);
}

size_t SequenceCache::nbytes() const {
  return nbytes_of(keys_) + nbytes_of(values_);
}

void SequenceCache::require_arrays(const char* ctx) const {
  if (!keys_ || !values_) {
    throw RuntimeError(ctx, "the cache is empty: no keys or values yet");
  }
}

int Cache::trim(int) {
  throw NotImplementedError(name(), "this cache cannot be trimmed");
}

Mask Cache::make_mask(int, bool, std::optional<int>) const {
  throw NotImplementedError(name(), "this cache makes no attention mask");
}

// KVCache ------------------------------------------------------------------

void SequenceCache::set_capacity(int capacity) {
  capacity_ = check_size((std::string(name()) + ".capacity").c_str(), "capacity", capacity);
}

std::pair<mx::array, mx::array> SequenceCache::write_at(
    const char* ctx,
    const mx::array& keys,
    const mx::array& values,
    int prev) const {
  check_kv(ctx, keys, values);
  check_pair(ctx, keys_, values_);
  check_offset_fits(ctx, keys_, prev);
  if (keys_) {
    check_fits(ctx, "keys", keys, *keys_);
    check_fits(ctx, "values", values, *values_);
  }
  check_size(ctx, "offset + S", 1LL * offset_ + keys.shape(2));
  await_buffer_release(capacity_, keys_.has_value(), keys.shape(2));
  return write_grown(ctx, keys_, values_, keys, values, prev, [&] {
    return check_size(ctx, "step", this->step(), 1);
  }, capacity_);
}

std::pair<mx::array, mx::array> KVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  auto [k, v] = write_at("KVCache.update_and_fetch", keys, values, offset_);
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ += keys.shape(2);
  return keys_and_values();
}

std::pair<mx::array, mx::array> KVCache::keys_and_values() const {
  require_arrays("KVCache.keys_and_values");
  if (offset_ < keys_->shape(2)) {
    return {seq_slice(*keys_, 0, offset_), seq_slice(*values_, 0, offset_)};
  }
  return {*keys_, *values_};
}

int KVCache::trim(int n) {
  check_size("KVCache.trim", "n", n);
  n = std::min(offset_, n);
  offset_ -= n;
  return n;
}

Mask KVCache::make_mask(
    int N,
    bool return_array,
    std::optional<int> window_size) const {
  return create_attention_mask(N, offset_, return_array, window_size);
}

std::vector<OptionalArray> KVCache::state() const {
  return {keys_, values_};
}

std::vector<std::string> KVCache::meta_state() const {
  return {std::to_string(offset_)};
}

void KVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "KVCache.state";
  check_count(ctx, "arrays", arrays.size(), 2);
  check_count(ctx, "scalars", meta.size(), 1);
  set(arrays[0], arrays[1], parse_int(ctx, "offset", meta[0]));
}

void KVCache::set(OptionalArray keys, OptionalArray values, int offset) {
  constexpr const char* ctx = "KVCache.state";
  check_pair(ctx, keys, values);
  check_offset_fits(ctx, keys, offset);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = offset;
}

// ConcatenateKVCache ------------------------------------------------------

std::pair<mx::array, mx::array> ConcatenateKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "ConcatenateKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  check_pair(ctx, keys_, values_);
  if (!keys_) {
    keys_ = keys;
    values_ = values;
  } else {
    check_fits(ctx, "keys", keys, *keys_);
    check_fits(ctx, "values", values, *values_);
    check_size(ctx, "offset + S", 1LL * keys_->shape(2) + keys.shape(2));
    auto k = seq_concat({*keys_, keys});
    values_ = seq_concat({*values_, values});
    keys_ = std::move(k);
  }
  offset_ = keys_->shape(2);
  return keys_and_values();
}

std::pair<mx::array, mx::array> ConcatenateKVCache::keys_and_values() const {
  require_arrays("ConcatenateKVCache.keys_and_values");
  return {*keys_, *values_};
}

int ConcatenateKVCache::trim(int n) {
  check_size("ConcatenateKVCache.trim", "n", n);
  n = std::min(offset_, n);
  if (n > 0 && keys_ && values_) {
    auto k = seq_slice(*keys_, 0, offset_ - n);
    auto v = seq_slice(*values_, 0, offset_ - n);
    keys_ = std::move(k);
    values_ = std::move(v);
  }
  offset_ -= n;
  return n;
}

Mask ConcatenateKVCache::make_mask(
    int N,
    bool return_array,
    std::optional<int> window_size) const {
  return create_attention_mask(N, offset_, return_array, window_size);
}

std::vector<OptionalArray> ConcatenateKVCache::state() const {
  return {keys_, values_};
}

void ConcatenateKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "ConcatenateKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 2);
  check_count(ctx, "scalars", meta.size(), 0);
  set(arrays[0], arrays[1]);
}

void ConcatenateKVCache::set(OptionalArray keys, OptionalArray values) {
  check_pair("ConcatenateKVCache.state", keys, values);
  offset_ = keys ? keys->shape(2) : 0;
  keys_ = std::move(keys);
  values_ = std::move(values);
}

} // namespace kvcore
