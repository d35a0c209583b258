#include "kvcore/chunked.h"

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

ChunkedKVCache::ChunkedKVCache(int chunk_size)
    : chunk_size_(check_size("ChunkedKVCache", "chunk_size", chunk_size, 1)) {}

void ChunkedKVCache::maybe_trim_front() {
  if (!keys_ || !values_) {
    return;
  }
  int valid = offset_ - start_position_;
  if (valid > chunk_size_) {
    int trim = valid - chunk_size_;
    auto k = seq_slice(*keys_, trim, valid);
    auto v = seq_slice(*values_, trim, valid);
    keys_ = std::move(k);
    values_ = std::move(v);
    start_position_ += trim;
  }
}

std::pair<mx::array, mx::array> ChunkedKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  auto [k, v] = write_at(
      "ChunkedKVCache.update_and_fetch", keys, values, offset_ - start_position_);
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ += keys.shape(2);
  return keys_and_values();
}

std::pair<mx::array, mx::array> ChunkedKVCache::keys_and_values() const {
  require_arrays("ChunkedKVCache.keys_and_values");
  int end = offset_ - start_position_;
  return {seq_slice(*keys_, 0, end), seq_slice(*values_, 0, end)};
}

int ChunkedKVCache::trim(int n) {
  check_size("ChunkedKVCache.trim", "n", n);
  n = std::min(offset_ - start_position_, n);
  offset_ -= n;
  return n;
}

std::vector<OptionalArray> ChunkedKVCache::state() const {
  return {keys_, values_};
}

std::vector<std::string> ChunkedKVCache::meta_state() const {
  return {
      std::to_string(offset_),
      std::to_string(chunk_size_),
      std::to_string(start_position_)};
}

void ChunkedKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "ChunkedKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 2);
  check_count(ctx, "scalars", meta.size(), 3);
  set(arrays[0], arrays[1], parse_int(ctx, "offset", meta[0]),
      parse_int(ctx, "chunk_size", meta[1]), parse_int(ctx, "start_position", meta[2]));
}

void ChunkedKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    int offset,
    int chunk_size,
    int start_position) {
  constexpr const char* ctx = "ChunkedKVCache.state";
  check_pair(ctx, keys, values);
  check_size(ctx, "chunk_size", chunk_size, 1);
  check_size(ctx, "start_position", start_position);
  if (offset < start_position) {
    throw ValueError(ctx, "offset >= start_position " + std::to_string(start_position),
                     "offset " + std::to_string(offset));
  }
  check_offset_fits(ctx, keys, offset - start_position);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = offset;
  chunk_size_ = chunk_size;
  start_position_ = start_position;
}

void ChunkedKVCache::set_chunk_size(int chunk_size) {
  chunk_size_ = check_size("ChunkedKVCache.chunk_size", "chunk_size", chunk_size, 1);
}

void ChunkedKVCache::set_start_position(int start_position) {
  start_position_ = check_size("ChunkedKVCache.start_position", "start_position", start_position);
}

} // namespace kvcore
