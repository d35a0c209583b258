// The disk tier's blocks: the keys and values of a fixed number of tokens
// of every attention layer, named by a hash chained over the model, the
// layers' layout and all tokens up to the block's end, and checked on read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvcore/files.h"
#include "kvcore/prompt_trie.h"
#include "kvcore/quantized.h"

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

/// One attention layer as the disk tier's blocks hold it: a KVCache (its
/// keys and values) or a QuantizedKVCache of either scheme (its keys' and
/// values' triples), over its first `tokens` tokens. A rotated_channel
/// cache's float residual is not part of it: it stays in the entry's tail.
struct BlockLayer {
  bool quantized = false;
  QuantSpec key_spec;
  QuantSpec value_spec;
  QuantScheme scheme = QuantScheme::affine;
  std::vector<mx::array> arrays; ///< keys, values; or the two triples
  int tokens = 0; ///< tokens the arrays hold
  int offset = 0; ///< the cache's offset (tokens plus a residual's)
};

/// Whether c is a KVCache or a QuantizedKVCache (the classes themselves).
bool block_kind(const Cache& c);
/// c as a block layer: a KVCache or a QuantizedKVCache holding tokens
/// (the caller decides which subclasses count: block_kind); nullopt
/// otherwise.
std::optional<BlockLayer> block_layer(const Cache& c);
/// Whether every array of l starts a whole word or group at token `at`
/// (rotated_channel keys pack tokens: blocks must hold whole groups).
bool block_aligned(const BlockLayer& l, int at);
/// l's tokens [from, to).
BlockLayer block_rows(const BlockLayer& l, int from, int to);
/// c (of l's kind, l = block_layer(c)) set to hold `before`'s tokens (rows
/// of its kind, in order), then its own tokens from `from` on (none of them
/// unless `own`; its residual goes with them). Validated by the cache's set.
void rebuild_layer(Cache& c, const BlockLayer& l, const std::vector<const BlockLayer*>& before, int from, bool own);
/// A fresh cache of rows' kind holding just these rows.
std::shared_ptr<Cache> block_cache(const BlockLayer& rows);

/// The layers' layout a chain is keyed by: count, then per layer its kind
/// and quantization, and each array's shape but for its token axis, and
/// dtype (KVCache layers: batch, heads, head dim and dtype of keys and of
/// values).
std::string block_layout(const std::vector<BlockLayer>& layers);

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

/// The file of one block: a prompt-cache file of one cache per layer (of
/// the layer's kind) holding tokens [index * block_tokens, +block_tokens)
/// (`layers` are those rows, evaluated by this call), its header naming
/// model, layout, block size, index, parent, chain and tokens.
PreparedFile prepare_block(const BlockHeader& header, const std::vector<BlockLayer>& layers);

/// The checked header of a block file's metadata (user keys, "kvcore.*"):
/// throws ValueError unless it is a block whose chain hash is that of its
/// parent, model, layout and tokens.
BlockHeader block_header_of(const Metadata& user);
/// The same from a file on disk, reading only its header.
BlockHeader read_block_header(const std::string& path);

/// The layers of block file `name` read as `bytes`, after checking the
/// bytes hash to the name's hash, the header is the block `expect` (model,
/// layout, block size, index, parent, chain and every token), and each
/// layer is a cache of the layout's kind and shapes holding block_tokens
/// tokens (no residual). Not evaluated: `bytes` is checked and stays alive
/// with the arrays. Throws ValueError saying what was wrong.
/// `hashed`: the bytes' hash, where the caller has taken it already.
std::vector<BlockLayer> load_block_bytes(
    const std::string& name,
    std::shared_ptr<const std::string> bytes,
    const BlockHeader& expect,
    std::optional<uint64_t> hashed = std::nullopt);

} // namespace kvcore
