// The disk tier's blocks: the keys and values of a fixed number of tokens
// of every attention layer, named by a hash chained over the model, the
// layers' layout and all tokens up to the block's end, and checked on read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvcore/files.h"
#include "kvcore/kv_store.h"

namespace kvcore {

/// A 64-bit hash of bytes, 8 at a time (corruption, not adversaries).
struct DiskHasher {
  uint64_t h = 0x243F6A8885A308D3ull;
  void add(const void* data, size_t n);
  void mix(uint64_t w);
};

/// "%016x".
std::string hex16(uint64_t v);
/// The hash a disk tier file is named by, over its bytes (streamed or in
/// memory alike).
uint64_t disk_bytes_hash(const std::string& bytes);
uint64_t disk_file_hash(const std::string& path);

/// Tokens as a file's metadata ("<prefix>" = count, "<prefix>.<i>" = up to
/// 2048 comma-separated tokens each) and back; parse throws ValueError.
void put_tokens(Metadata& m, const std::string& prefix, const Tokens& tokens);
Tokens parse_tokens(const Metadata& m, const std::string& prefix);
/// m[key], or ValueError naming the missing key.
std::string meta_get(const Metadata& m, const std::string& key);
int64_t meta_int(const Metadata& m, const std::string& key);

/// The layers' layout a chain is keyed by: count, then per layer the
/// keys' and values' batch, heads, head dim and dtype.
std::string block_layout(const std::vector<LayerKV>& layers);

/// The chain hash of the block holding `tokens` after the block whose
/// chain is `parent` (0 for the first block).
uint64_t block_chain(
    uint64_t parent,
    const std::string& model,
    const std::string& layout,
    int block_tokens,
    const int64_t* tokens,
    size_t n);

/// What a block file's header says; `chain` is recomputed from the rest.
struct BlockHeader {
  std::string model;
  std::string layout;
  int block_tokens = 0;
  int64_t index = 0; ///< 0 for the first block of a chain
  uint64_t parent = 0;
  uint64_t chain = 0;
  Tokens tokens;
};

/// A block's file name, "blk-<chain>-<file hash>.safetensors", and its
/// parts; false if `name` is not one.
std::string block_file_name(uint64_t chain, uint64_t file_hash);
bool parse_block_name(const std::string& name, uint64_t* chain, uint64_t* file_hash);

/// The file of one block: a prompt-cache file of one KVCache per layer
/// holding tokens [index * block_tokens, +block_tokens) (`layers` are those
/// rows, evaluated by this call), its header naming model, layout, block
/// size, index, parent, chain and tokens.
PreparedFile prepare_block(const BlockHeader& header, const std::vector<LayerKV>& layers);

/// The checked header of a block file's metadata (user keys, "kvcore.*"):
/// throws ValueError unless it is a block whose chain hash is that of its
/// parent, model, layout and tokens.
BlockHeader block_header_of(const Metadata& user);
/// The same from a file on disk, reading only its header.
BlockHeader read_block_header(const std::string& path);

/// The layers of block file `name` read as `bytes`, after checking the
/// bytes hash to the name's hash, the header is the block `expect` (model,
/// layout, block size, index, parent, chain and every token), and each
/// layer is a KVCache of the layout's shapes holding block_tokens tokens;
/// evaluated. Throws ValueError saying what was wrong.
std::vector<LayerKV> load_block_bytes(
    const std::string& name,
    std::shared_ptr<const std::string> bytes,
    const BlockHeader& expect);

} // namespace kvcore
