// Chunked-attention cache (Llama 4): a KVCache that can drop the tokens
// before the current chunk.
#pragma once

#include "kvcore/kv.h"

namespace kvcore {

class ChunkedKVCache : public SequenceCache {
 public:
  explicit ChunkedKVCache(int chunk_size);

  const char* name() const override {
    return "ChunkedKVCache";
  }
  std::pair<mx::array, mx::array> update_and_fetch(
      const mx::array& keys,
      const mx::array& values) override;
  /// keys[..., :offset - start_position, :] and the same of values.
  std::pair<mx::array, mx::array> keys_and_values() const;
  /// Keep at most chunk_size tokens, dropping the oldest.
  void maybe_trim_front();

  bool is_trimmable() const override {
    return true;
  }
  /// Trims within the tokens held (offset - start_position).
  int trim(int n) override;

  /// (keys, values).
  std::vector<OptionalArray> state() const override;
  /// (offset, chunk_size, start_position).
  std::vector<std::string> meta_state() const override;
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;
  void set(
      OptionalArray keys,
      OptionalArray values,
      int offset,
      int chunk_size,
      int start_position);

  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<ChunkedKVCache>(*this);
  }

  int chunk_size() const {
    return chunk_size_;
  }
  void set_chunk_size(int chunk_size);
  /// Absolute position of the first token held.
  int start_position() const {
    return start_position_;
  }
  void set_start_position(int start_position);

 private:
  int chunk_size_;
  int start_position_ = 0;
};

} // namespace kvcore
