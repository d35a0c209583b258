#include "kvcore/disk_blocks.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>

#include <mlx/ops.h>
#include <mlx/transforms.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/quantized.h"

namespace kvcore {

namespace {

constexpr const char* kBlock = "LRUPromptCache disk block";
constexpr size_t kTokensPerKey = 2048; // keeps each metadata string short
constexpr int kMaxBlockTokens = 1 << 16;
// A file's hash is taken over chunks of one size, streamed or in memory.
constexpr size_t kHashChunk = 1 << 20;

uint64_t parse_hex(const std::string& s, const char* what) {
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, 16);
  if (s.size() != 16 || ec != std::errc() || end != s.data() + s.size()) {
    throw ValueError(kBlock, std::string(what) + " as 16 hex digits", "'" + s.substr(0, 40) + "'");
  }
  return v;
}

} // namespace

void DiskHasher::add(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    mix(w);
  }
  uint64_t tail = 0;
  std::memcpy(&tail, p + i, n - i);
  mix(tail ^ (static_cast<uint64_t>(n - i) << 56));
}

void DiskHasher::mix(uint64_t w) {
  h = (h ^ w) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
}

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t disk_bytes_hash(const std::string& bytes) {
  DiskHasher h;
  for (size_t at = 0, n = kHashChunk; n == kHashChunk; at += n) { // a last, short chunk, maybe empty
    n = std::min(kHashChunk, bytes.size() - at);
    h.add(bytes.data() + at, n);
  }
  return h.h;
}

uint64_t disk_file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw ValueError(kBlock, "a readable file", "'" + path + "'");
  }
  DiskHasher h;
  std::vector<char> buf(kHashChunk);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.add(buf.data(), static_cast<size_t>(in.gcount()));
  }
  return h.h;
}

std::string meta_get(const Metadata& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) {
    throw ValueError("LRUPromptCache disk tier", "metadata '" + key + "'", "none");
  }
  return it->second;
}

int64_t meta_int(const Metadata& m, const std::string& key) {
  const std::string s = meta_get(m, key);
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) {
    throw ValueError("LRUPromptCache disk tier", key + " as an integer", "'" + s.substr(0, 40) + "'");
  }
  return v;
}

void put_tokens(Metadata& m, const std::string& prefix, const Tokens& tokens) {
  m[prefix] = std::to_string(tokens.size());
  for (size_t at = 0, chunk = 0; at < tokens.size(); at += kTokensPerKey, ++chunk) {
    std::string s;
    for (size_t i = at; i < std::min(tokens.size(), at + kTokensPerKey); ++i) {
      s += (i > at ? "," : "") + std::to_string(tokens[i]);
    }
    m[prefix + "." + std::to_string(chunk)] = std::move(s);
  }
}

Tokens parse_tokens(const Metadata& m, const std::string& prefix) {
  const int64_t n = meta_int(m, prefix);
  if (n < 0 || static_cast<uint64_t>(n) > kMaxEntries * kTokensPerKey) {
    throw ValueError("LRUPromptCache disk tier", "a token count", std::to_string(n));
  }
  Tokens out;
  for (size_t chunk = 0; out.size() < static_cast<size_t>(n); ++chunk) {
    const std::string s = meta_get(m, prefix + "." + std::to_string(chunk));
    size_t at = 0;
    while (at < s.size()) {
      size_t comma = s.find(',', at);
      if (comma == std::string::npos) {
        comma = s.size();
      }
      int64_t v = 0;
      auto [end, ec] = std::from_chars(s.data() + at, s.data() + comma, v);
      if (ec != std::errc() || end != s.data() + comma) {
        throw ValueError("LRUPromptCache disk tier", "a token as an integer",
                         "'" + s.substr(at, std::min<size_t>(40, comma - at)) + "'");
      }
      out.push_back(v);
      at = comma + 1;
    }
    if (s.empty() || out.size() > static_cast<size_t>(n)) {
      throw ValueError("LRUPromptCache disk tier", std::to_string(n) + " tokens", "a malformed token list");
    }
  }
  return out;
}

namespace {

// Where array i of a block layer holds its tokens: along `axis`, `num / den`
// entries per token (rotated_channel keys: packed words and groups).
struct TokenAxis {
  int axis;
  int num;
  int den;
};

TokenAxis token_axis(const BlockLayer& l, size_t i) {
  if (l.quantized && l.scheme != QuantScheme::affine && i < 3) {
    return i == 0 ? TokenAxis{3, l.key_spec.bits, 32} : TokenAxis{3, 1, l.key_spec.group_size};
  }
  return {2, 1, 1};
}

mx::array token_slice(const mx::array& a, TokenAxis t, int from, int to) {
  mx::Shape lo(a.ndim(), 0), hi = a.shape();
  lo[t.axis] = static_cast<int>(int64_t(from) * t.num / t.den);
  hi[t.axis] = static_cast<int>(int64_t(to) * t.num / t.den);
  return mx::slice(a, lo, hi);
}

} // namespace

bool block_kind(const Cache& c) {
  return typeid(c) == typeid(KVCache) || typeid(c) == typeid(QuantizedKVCache);
}

std::optional<BlockLayer> block_layer(const Cache& c) {
  BlockLayer l;
  const auto* q = dynamic_cast<const QuantizedKVCache*>(&c);
  if (q == nullptr) {
    const auto* p = dynamic_cast<const KVCache*>(&c);
    if (p == nullptr) {
      return std::nullopt;
    }
    const auto& kv = *p;
    if (!kv.keys() || !kv.values() || kv.keys()->ndim() != 4 || kv.values()->ndim() != 4) {
      return std::nullopt;
    }
    l.tokens = l.offset = kv.offset();
    l.arrays = {seq_slice(*kv.keys(), 0, l.tokens), seq_slice(*kv.values(), 0, l.tokens)};
    return l;
  }
  if (q->empty()) {
    return std::nullopt;
  }
  l.quantized = true;
  l.key_spec = q->key_spec();
  l.value_spec = q->value_spec();
  l.scheme = q->scheme();
  l.tokens = q->quantized_tokens();
  l.offset = q->offset();
  auto [k, v] = q->keys_and_values();
  l.arrays = {std::get<0>(k), std::get<1>(k), std::get<2>(k), std::get<0>(v), std::get<1>(v), std::get<2>(v)};
  return l;
}

bool block_aligned(const BlockLayer& l, int at) {
  for (size_t i = 0; i < l.arrays.size(); ++i) {
    const TokenAxis t = token_axis(l, i);
    if (int64_t(at) * t.num % t.den != 0) {
      return false;
    }
  }
  return true;
}

BlockLayer block_rows(const BlockLayer& l, int from, int to) {
  BlockLayer out = l;
  for (size_t i = 0; i < l.arrays.size(); ++i) {
    out.arrays[i] = token_slice(l.arrays[i], token_axis(l, i), from, to);
  }
  out.tokens = out.offset = to - from;
  return out;
}

void rebuild_layer(Cache& c, const BlockLayer& l, const std::vector<const BlockLayer*>& before, int from, bool own) {
  std::vector<mx::array> arrays;
  int tokens = own ? l.tokens - from : 0;
  for (const BlockLayer* b : before) {
    tokens += b->tokens;
  }
  for (size_t i = 0; i < l.arrays.size(); ++i) {
    const TokenAxis t = token_axis(l, i);
    std::vector<mx::array> parts;
    for (const BlockLayer* b : before) {
      parts.push_back(b->arrays[i]);
    }
    if (own || parts.empty()) {
      parts.push_back(token_slice(l.arrays[i], t, own ? from : 0, own ? l.tokens : 0));
    }
    arrays.push_back(parts.size() == 1 ? parts[0] : mx::concatenate(parts, t.axis));
  }
  if (!l.quantized) {
    static_cast<KVCache&>(c).set(arrays[0], arrays[1], tokens);
    return;
  }
  auto& q = static_cast<QuantizedKVCache&>(c);
  OptionalArray residual = own ? q.residual() : std::nullopt;
  OptionalArray value_residual = own ? q.value_residual() : std::nullopt;
  const int offset = tokens + (residual ? residual->shape(2) : 0);
  // A sink's first tokens stay with a tail (its own offset may be short of
  // them); a cache rebuilt from its first token keeps those it holds.
  OptionalArray sink_keys = q.sink_keys(), sink_values = q.sink_values();
  if (sink_keys && !before.empty() && sink_keys->shape(2) > offset) {
    sink_keys = offset > 0 ? OptionalArray(seq_slice(*sink_keys, 0, offset)) : std::nullopt;
    sink_values = offset > 0 ? OptionalArray(seq_slice(*sink_values, 0, offset)) : std::nullopt;
  }
  q.set(QuantizedArrays{arrays[0], arrays[1], arrays[2]}, QuantizedArrays{arrays[3], arrays[4], arrays[5]}, offset,
        l.key_spec, l.value_spec, l.scheme, std::move(residual), std::move(value_residual), q.window(), q.sink(),
        std::move(sink_keys), std::move(sink_values));
}

std::shared_ptr<Cache> block_cache(const BlockLayer& rows) {
  std::shared_ptr<Cache> c;
  if (rows.quantized) {
    c = std::make_shared<QuantizedKVCache>(rows.key_spec, rows.value_spec, rows.scheme, 0);
  } else {
    c = std::make_shared<KVCache>();
  }
  BlockLayer empty = rows;
  rebuild_layer(*c, empty, {&rows}, 0, false);
  return c;
}

std::string block_layout(const std::vector<BlockLayer>& layers) {
  std::string s = std::to_string(layers.size());
  for (const auto& l : layers) {
    s += ";";
    if (l.quantized) { // KVCache layers keep the layout of the first block files
      s += std::string("q:") + scheme_name(l.scheme) + ":" + std::to_string(l.key_spec.group_size) + "," +
          std::to_string(l.key_spec.bits) + "," + std::to_string(l.value_spec.group_size) + "," +
          std::to_string(l.value_spec.bits) + ":";
    }
    for (size_t i = 0; i < l.arrays.size(); ++i) {
      const mx::array& a = l.arrays[i];
      const int axis = token_axis(l, i).axis;
      s += i == 0 ? "" : "/";
      for (int d = 0; d < a.ndim(); ++d) {
        if (d != axis) {
          s += std::to_string(a.shape(d)) + ",";
        }
      }
      s += dtype_str(a.dtype());
    }
  }
  return s;
}

uint64_t block_chain(
    uint64_t parent,
    const std::string& model,
    const std::string& layout,
    int block_tokens,
    const int64_t* tokens,
    size_t n) {
  DiskHasher h;
  h.mix(parent);
  h.mix(static_cast<uint64_t>(block_tokens));
  h.mix(model.size());
  h.add(model.data(), model.size());
  h.mix(layout.size());
  h.add(layout.data(), layout.size());
  h.add(tokens, n * sizeof(int64_t));
  return h.h == 0 ? 1 : h.h; // 0 is "no parent"
}

std::string block_file_name(uint64_t chain, uint64_t file_hash) {
  return "blk-" + hex16(chain) + "-" + hex16(file_hash) + ".safetensors";
}

bool parse_block_name(const std::string& name, uint64_t* chain, uint64_t* file_hash) {
  if (name.size() != 49 || name.compare(0, 4, "blk-") != 0 || name[20] != '-' ||
      name.compare(37, 12, ".safetensors") != 0) {
    return false;
  }
  for (size_t i : {size_t(4), size_t(21)}) {
    if (!std::all_of(name.begin() + i, name.begin() + i + 16,
                     [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; })) {
      return false;
    }
  }
  *chain = parse_hex(name.substr(4, 16), "a chain hash");
  *file_hash = parse_hex(name.substr(21, 16), "a file hash");
  return true;
}

PreparedFile prepare_block(const BlockHeader& b, const std::vector<BlockLayer>& layers) {
  Metadata m;
  m["kvcore.block"] = "1";
  m["kvcore.model"] = b.model;
  m["kvcore.layout"] = b.layout;
  m["kvcore.block_tokens"] = std::to_string(b.block_tokens);
  m["kvcore.index"] = std::to_string(b.index);
  m["kvcore.parent"] = hex16(b.parent);
  m["kvcore.chain"] = hex16(b.chain);
  put_tokens(m, "kvcore.tokens", b.tokens);
  PromptCache caches;
  for (const auto& l : layers) {
    if (l.tokens != b.block_tokens) {
      throw ValueError(kBlock, "layers of " + std::to_string(b.block_tokens) + " tokens",
                       std::to_string(l.tokens) + " tokens");
    }
    caches.push_back(block_cache(l));
  }
  return prepare_prompt_cache(caches, m);
}

BlockHeader block_header_of(const Metadata& m) {
  if (meta_get(m, "kvcore.block") != "1") {
    throw ValueError(kBlock, "kvcore.block 1", "'" + meta_get(m, "kvcore.block").substr(0, 40) + "'");
  }
  BlockHeader b;
  b.model = meta_get(m, "kvcore.model");
  b.layout = meta_get(m, "kvcore.layout");
  const int64_t n = meta_int(m, "kvcore.block_tokens");
  if (n < 1 || n > kMaxBlockTokens) {
    throw ValueError(kBlock, "a block size of 1 to " + std::to_string(kMaxBlockTokens), std::to_string(n));
  }
  b.block_tokens = static_cast<int>(n);
  b.index = meta_int(m, "kvcore.index");
  b.parent = parse_hex(meta_get(m, "kvcore.parent"), "a parent");
  b.chain = parse_hex(meta_get(m, "kvcore.chain"), "a chain");
  b.tokens = parse_tokens(m, "kvcore.tokens");
  if (b.tokens.size() != static_cast<size_t>(n) || b.index < 0 || (b.index == 0) != (b.parent == 0)) {
    throw ValueError(kBlock, std::to_string(n) + " tokens, a parent unless first",
                     std::to_string(b.tokens.size()) + " tokens at index " + std::to_string(b.index));
  }
  const uint64_t chain = block_chain(b.parent, b.model, b.layout, b.block_tokens, b.tokens.data(), b.tokens.size());
  if (chain != b.chain) {
    throw ValueError(kBlock, "a chain hash of its parent, model, layout and tokens " + hex16(chain),
                     hex16(b.chain));
  }
  return b;
}

namespace {

Metadata user_metadata(const Metadata& all) {
  Metadata m;
  for (const auto& [k, v] : all) {
    if (k.rfind("0.", 0) == 0) {
      m[k.substr(2)] = v;
    }
  }
  return m;
}

} // namespace

BlockHeader read_block_header(const std::string& path) {
  return block_header_of(user_metadata(read_safetensors_header(path).metadata));
}

std::vector<BlockLayer> load_block_bytes(
    const std::string& name,
    std::shared_ptr<const std::string> bytes,
    const BlockHeader& expect,
    std::optional<uint64_t> hashed) {
  uint64_t chain = 0, hash = 0;
  if (!parse_block_name(name, &chain, &hash) || chain != expect.chain) {
    throw ValueError(kBlock, "a file named for chain " + hex16(expect.chain), "'" + name + "'");
  }
  const uint64_t got = hashed ? *hashed : disk_bytes_hash(*bytes);
  if (got != hash) {
    throw ValueError(kBlock, "file contents hashing to " + hex16(hash), hex16(got));
  }
  LoadedPromptCache loaded = load_prompt_cache_bytes(std::move(bytes), false);
  const BlockHeader b = block_header_of(loaded.metadata);
  if (b.model != expect.model) {
    throw ValueError(kBlock, "a block of model " + expect.model.substr(0, 80), "one of " + b.model.substr(0, 80));
  }
  if (b.layout != expect.layout || b.block_tokens != expect.block_tokens) {
    throw ValueError(kBlock, "layout " + expect.layout.substr(0, 80) + " in blocks of " +
                         std::to_string(expect.block_tokens),
                     b.layout.substr(0, 80) + " in blocks of " + std::to_string(b.block_tokens));
  }
  if (b.index != expect.index || b.parent != expect.parent || b.chain != expect.chain) {
    throw ValueError(kBlock, "block " + std::to_string(expect.index) + " after " + hex16(expect.parent),
                     "block " + std::to_string(b.index) + " after " + hex16(b.parent));
  }
  if (b.tokens != expect.tokens) {
    throw ValueError(kBlock, "the prompt's tokens", "other tokens");
  }
  std::vector<BlockLayer> layers;
  for (const auto& c : loaded.caches) {
    std::optional<BlockLayer> l = block_kind(*c) ? block_layer(*c) : std::nullopt;
    if (!l || l->tokens != b.block_tokens || l->offset != b.block_tokens) {
      throw ValueError(kBlock, "KVCache or QuantizedKVCache layers of " + std::to_string(b.block_tokens) + " tokens",
                       l ? std::to_string(l->tokens) + " tokens of " + std::to_string(l->offset)
                         : std::string("another cache"));
    }
    layers.push_back(std::move(*l));
  }
  if (layers.empty() || block_layout(layers) != b.layout) {
    throw ValueError(kBlock, "layers of layout " + b.layout.substr(0, 80),
                     layers.empty() ? std::string("none") : block_layout(layers).substr(0, 80));
  }
  return layers;
}

} // namespace kvcore
