// A seeded mutation fuzzer of load_prompt_cache (and of
// load_prompt_cache_bytes, which must agree with it), then of the disk
// tier's block files (load_block_bytes, read_block_header). Valid prompt-cache files
// (kvcore's own, of every class, and some of mlx-lm's) are mutated byte by
// byte and through their JSON header; loading each must give caches or a
// kvcore::CacheError, never another exception or a crash. What loads is
// evaluated, operated on (update_and_fetch, make_mask, trim) and saved and
// loaded again, which must give the same state.
//
//   kvcore_fuzz_loader [seed [iterations [first]]]
//
// It stops at the first failure; with KVCORE_FUZZ_KEEP_GOING set it reports
// every failure and exits non-zero at the end.
//
// Iteration i draws from its own generator (seed, i), so a failure is
// replayed alone with `kvcore_fuzz_loader seed 1 i`; the failing file is
// also written to the current directory.
#include <functional>
#include <climits>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <mlx/ops.h>

#include "kvcore/kvcore.h"
#include "samples.h"
#include "support.h"

namespace mx = mlx::core;
using namespace kvcore;

namespace {

// Nothing a file this small holds should make an operation this large.
constexpr size_t kMaxElements = size_t(1) << 26;

struct Failure {
  std::string what;
};

struct Counts {
  int loaded = 0;
  int load_errors = 0;
  int op_ok = 0;
  int op_errors = 0;
};

using Rng = std::mt19937_64;

// What the fuzzer was doing, for the failure report.
std::string g_stage;

size_t pick(Rng& rng, size_t n) {
  return n == 0 ? 0 : std::uniform_int_distribution<size_t>(0, n - 1)(rng);
}

uint64_t header_length(const std::string& f) {
  if (f.size() < 8) return 0;
  uint64_t n = 0;
  std::memcpy(&n, f.data(), 8);
  return n;
}

void set_header_length(std::string& f, uint64_t n) {
  if (f.size() < 8) return;
  std::memcpy(f.data(), &n, 8);
}

// The header's JSON when the length in front of it frames it.
bool split(const std::string& f, std::string& header, std::string& rest) {
  uint64_t n = header_length(f);
  if (f.size() < 8 || n > f.size() - 8) return false;
  header = f.substr(8, n);
  rest = f.substr(8 + n);
  return true;
}

std::string join(const std::string& header, const std::string& rest, bool fix_length, uint64_t old) {
  std::string f(8, '\0');
  f += header;
  f += rest;
  set_header_length(f, fix_length ? header.size() : old);
  return f;
}

// A position, mostly inside the header where the checks are.
size_t position(Rng& rng, const std::string& f) {
  if (f.empty()) return 0;
  size_t head = std::min<size_t>(f.size(), 8 + std::min<uint64_t>(header_length(f), f.size()) + 16);
  return pick(rng, 4) ? pick(rng, head) : pick(rng, f.size());
}

// [begin, end) of every run matching `in_run` in s.
template <class Pred>
std::vector<std::pair<size_t, size_t>> runs(const std::string& s, Pred in_run) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t i = 0; i < s.size();) {
    if (!in_run(s, i)) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < s.size() && in_run(s, j)) ++j;
    out.emplace_back(i, j);
    i = j;
  }
  return out;
}

// The contents of the JSON strings of a header (no escapes in kvcore's).
std::vector<std::pair<size_t, size_t>> strings_of(const std::string& h) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t i = 0; i < h.size(); ++i) {
    if (h[i] != '"') continue;
    size_t j = h.find('"', i + 1);
    if (j == std::string::npos) break;
    out.emplace_back(i + 1, j);
    i = j;
  }
  return out;
}

const std::vector<std::string> kNumbers = {
    "0", "1", "-1", "2", "3", "7", "8", "255", "256", "2147483647", "2147483648", "-2147483648",
    "4294967295", "4294967296", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616", "1e308", "1e400", "1.5", "-0", "00", "0.0",
    "1E2", "99999999999999999999999"};

const std::vector<std::string> kWords = {
    "F16", "F32", "BF16", "I32", "I64", "U32", "U8", "BOOL", "F64", "C64", "I8", "U64", "F8", "",
    "KVCache", "RotatingKVCache", "QuantizedKVCache", "ChunkedKVCache", "ConcatenateKVCache",
    "ArraysCache", "CacheList", "BatchKVCache", "BatchRotatingKVCache", "Evil", "scalar",
    "string", "none", "0", "1", "2", "-1", "4", "99999999999", "True", "False", "x", "0.0", "0.1",
    "0.2", "0.0.0", "1.0", "2.0", "2.1.0", "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0", "__metadata__",
    "dtype", "shape", "data_offsets", "\\u0000", "\\ud800", "\xff"};

const char kJsonPunct[] = "{}[],:\" -.0123456789eEtfn";

// One mutation of f; describes itself in `what`.
std::string mutate(Rng& rng, std::string f, std::string& what) {
  std::string header, rest;
  uint64_t old = header_length(f);
  // Weighted toward edits that keep the file parsable, so the checks past
  // the JSON (layout, tags, states) see most of the mutants.
  static const int weights[] = {8, 6, 3, 2, 3, 3, 16, 14, 3, 6, 16};
  std::discrete_distribution<int> kind(std::begin(weights), std::end(weights));
  switch (kind(rng)) {
    case 0: { // bit flip
      if (f.empty()) break;
      size_t at = position(rng, f);
      int bit = static_cast<int>(pick(rng, 8));
      f[at] = static_cast<char>(f[at] ^ (1 << bit));
      what += " flip@" + std::to_string(at) + ":" + std::to_string(bit);
      break;
    }
    case 1: { // byte set
      if (f.empty()) break;
      size_t at = position(rng, f);
      char c = pick(rng, 2) ? kJsonPunct[pick(rng, sizeof kJsonPunct - 1)] : static_cast<char>(pick(rng, 256));
      f[at] = c;
      what += " set@" + std::to_string(at);
      break;
    }
    case 2: { // truncation
      size_t n = pick(rng, f.size() + 1);
      f.resize(n);
      what += " truncate:" + std::to_string(n);
      break;
    }
    case 3: { // header length
      uint64_t choices[] = {0, 1, old - 1, old + 1, f.size() - 8, f.size() - 7, 1ull << 63, ~0ull,
                            kMaxHeaderBytes, kMaxHeaderBytes + 1, old + pick(rng, 64), old - pick(rng, 64),
                            std::uniform_int_distribution<uint64_t>()(rng)};
      uint64_t n = choices[pick(rng, std::size(choices))];
      set_header_length(f, n);
      what += " length:" + std::to_string(n);
      break;
    }
    case 4: { // inserted bytes
      size_t at = position(rng, f);
      std::string bytes;
      for (size_t i = 0, n = 1 + pick(rng, 8); i < n; ++i) {
        bytes += pick(rng, 2) ? kJsonPunct[pick(rng, sizeof kJsonPunct - 1)] : static_cast<char>(pick(rng, 256));
      }
      f.insert(std::min(at, f.size()), bytes);
      if (pick(rng, 2) && split(f, header, rest)) set_header_length(f, old + bytes.size());
      what += " insert@" + std::to_string(at) + "x" + std::to_string(bytes.size());
      break;
    }
    case 5: { // deleted bytes
      if (f.empty()) break;
      size_t at = position(rng, f);
      size_t n = 1 + pick(rng, 16);
      f.erase(at, n);
      if (pick(rng, 2)) set_header_length(f, old - std::min<uint64_t>(old, n));
      what += " delete@" + std::to_string(at) + "x" + std::to_string(n);
      break;
    }
    case 6: { // a number of the header
      if (!split(f, header, rest)) break;
      auto nums = runs(header, [](const std::string& s, size_t i) {
        return (s[i] >= '0' && s[i] <= '9') || (s[i] == '-' && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '9');
      });
      if (nums.empty()) break;
      auto [b, e] = nums[pick(rng, nums.size())];
      std::string repl;
      if (pick(rng, 3) == 0) {
        long long v = std::atoll(header.substr(b, e - b).c_str());
        long long d[] = {-1, 1, -8, 8, 1000};
        repl = std::to_string(v + d[pick(rng, std::size(d))]);
      } else {
        repl = kNumbers[pick(rng, kNumbers.size())];
      }
      header.replace(b, e - b, repl);
      f = join(header, rest, pick(rng, 5) != 0, old);
      what += " number@" + std::to_string(b) + "=" + repl;
      break;
    }
    case 7: { // a string of the header
      if (!split(f, header, rest)) break;
      auto strs = strings_of(header);
      if (strs.empty()) break;
      auto [b, e] = strs[pick(rng, strs.size())];
      std::string repl;
      if (pick(rng, 2)) {
        repl = kWords[pick(rng, kWords.size())];
      } else {
        auto [b2, e2] = strs[pick(rng, strs.size())];
        repl = header.substr(b2, e2 - b2);
      }
      header.replace(b, e - b, repl);
      f = join(header, rest, pick(rng, 5) != 0, old);
      what += " string@" + std::to_string(b) + "=" + repl;
      break;
    }
    case 8: { // JSON punctuation
      if (!split(f, header, rest)) break;
      auto marks = runs(header, [](const std::string& s, size_t i) { return std::strchr("{}[],:", s[i]) && s[i]; });
      if (marks.empty()) break;
      size_t at = marks[pick(rng, marks.size())].first;
      if (pick(rng, 2)) {
        header.erase(at, 1);
      } else {
        header[at] = "{}[],:"[pick(rng, 6)];
      }
      f = join(header, rest, pick(rng, 5) != 0, old);
      what += " punct@" + std::to_string(at);
      break;
    }
    case 9: { // an entry duplicated or dropped: a "key":{...} or "key":"v" span
      if (!split(f, header, rest)) break;
      auto strs = strings_of(header);
      if (strs.size() < 2) break;
      size_t k = pick(rng, strs.size() - 1);
      size_t b = strs[k].first - 1, e = strs[k + 1].first - 1; // up to the next string's quote
      std::string span = header.substr(b, e - b);
      if (pick(rng, 2)) {
        header.erase(b, e - b);
      } else {
        header.insert(b, span);
      }
      f = join(header, rest, pick(rng, 5) != 0, old);
      what += " span@" + std::to_string(b) + "x" + std::to_string(span.size());
      break;
    }
    case 10: { // an int32 of the data (the scalars and the batch offsets)
      if (!split(f, header, rest) || rest.size() < 4) break;
      int32_t values[] = {0, 1, -1, 2, 3, 4, 7, 8, 255, 256, 65536, INT_MAX, INT_MIN, INT_MAX - 1, 1 << 30};
      int32_t v = values[pick(rng, std::size(values))];
      size_t at = 8 + header.size() + (pick(rng, 2) ? (rest.size() - 4) - 4 * pick(rng, std::min<size_t>(16, rest.size() / 4))
                                                     : 4 * pick(rng, rest.size() / 4));
      std::memcpy(f.data() + at, &v, 4);
      what += " int@" + std::to_string(at) + "=" + std::to_string(v);
      break;
    }
  }
  return f;
}

void check_size(const mx::array& a, const std::string& op) {
  if (a.size() > kMaxElements) {
    throw Failure{op + " of a loaded cache would make an array of " + std::to_string(a.size()) + " elements " +
                  kvtest::shape_text(a)};
  }
}

void eval_all(const StateValue& v) {
  if (v.is_array()) {
    check_size(v.as_array(), "state");
    mx::eval(v.as_array());
  } else if (v.is_list()) {
    for (auto& x : v.as_list()) eval_all(x);
  }
}

// Run op, counting kvcore errors as fine; anything else escapes.
template <class Op>
void attempt(Counts& n, const std::string& what, Op op) {
  auto outer = g_stage;
  g_stage = what;
  try {
    op();
    ++n.op_ok;
  } catch (const CacheError&) {
    ++n.op_errors;
  }
  g_stage = outer; // an escaping exception keeps the innermost stage
}

void eval_mask(const Mask& m, const std::string& op) {
  if (auto* a = std::get_if<mx::array>(&m)) {
    check_size(*a, op);
    mx::eval(*a);
  }
}

// Whether the next_update input for c stays small (the file may state huge
// dimensions of zero-size arrays; the input would be the harness's own).
bool small_input(const Cache& c) {
  auto ok = [](const OptionalArray& k) {
    if (!k || k->ndim() != 4) return true;
    return size_t(k->shape(0)) * k->shape(1) * 3 * k->shape(3) * 8 < kMaxElements;
  };
  if (auto* s = dynamic_cast<const SequenceCache*>(&c)) return ok(s->keys()) && ok(s->values());
  if (auto* b = dynamic_cast<const BatchCache*>(&c)) return ok(b->keys()) && ok(b->values()) && b->offset().size() < 4096;
  if (auto* q = dynamic_cast<const QuantizedKVCache*>(&c)) return !q->keys() || ok(std::get<0>(*q->keys()));
  if (auto* l = dynamic_cast<const CacheList*>(&c)) {
    for (auto& m : l->caches()) {
      if (!small_input(*m)) return false;
    }
  }
  return true;
}

void exercise(const Cache& c, Counts& n, uint64_t seed) {
  g_stage = std::string(c.name()) + " size/empty/nbytes/state";
  c.size();
  c.empty();
  c.nbytes();
  for (auto& a : c.state()) {
    if (a) {
      check_size(*a, "state()");
      mx::eval(*a);
    }
  }
  auto masks = [&](const Cache& x) {
    auto at = std::string(x.name()) + ".make_mask";
    attempt(n, at + "(1)", [&] { eval_mask(x.make_mask(1), "make_mask(1)"); });
    attempt(n, at + "(3, return_array)", [&] { eval_mask(x.make_mask(3, true), "make_mask(3, return_array)"); });
    attempt(n, at + "(2, window 2)", [&] { eval_mask(x.make_mask(2, false, 2), "make_mask(2, window 2)"); });
  };
  masks(c);
  attempt(n, std::string(c.name()) + ".trim(1)", [&] {
    auto copy = c.copy();
    copy->trim(1);
    masks(*copy);
  });
  if (small_input(c)) {
    for (int S : {1, 3}) {
      attempt(n, std::string(c.name()) + ".update_and_fetch(S=" + std::to_string(S) + ")", [&] {
        auto copy = c.copy();
        for (auto& a : kvtest::next_update(*copy, S, seed)) {
          check_size(a, "update_and_fetch");
          mx::eval(a);
        }
        masks(*copy);
        eval_all(cache_state(*copy));
      });
    }
  }
  if (auto* l = dynamic_cast<const CacheList*>(&c)) {
    for (auto& m : l->caches()) exercise(*m, n, seed + 1);
  }
}

void run_one(const std::string& bytes, const std::string& dir, uint64_t seed, int i, Counts& n) {
  auto path = dir + "/fuzz.safetensors";
  kvtest::write_bytes(path, bytes);
  LoadedPromptCache loaded;
  // The same bytes loaded from memory (the disk tier's way) must give the
  // same outcome: the same error, or the same caches.
  g_stage = "load_prompt_cache_bytes";
  std::optional<LoadedPromptCache> in_memory;
  std::string memory_error;
  try {
    in_memory = load_prompt_cache_bytes(std::make_shared<const std::string>(bytes));
  } catch (const CacheError& e) {
    memory_error = e.what();
  }
  g_stage = "load_prompt_cache";
  try {
    loaded = load_prompt_cache(path);
  } catch (const CacheError& e) {
    ++n.load_errors;
    if (in_memory || memory_error != e.what()) {
      throw Failure{"from memory: " + (in_memory ? std::string("loaded") : memory_error) +
                    "; from the file: " + e.what()};
    }
    return;
  }
  ++n.loaded;
  if (!in_memory) {
    throw Failure{"loads from the file but not from memory: " + memory_error};
  }
  StateValue::List states;
  g_stage = "cache_state and eval";
  for (auto& c : loaded.caches) {
    auto s = cache_state(*c);
    eval_all(s);
    states.push_back(s);
  }
  std::string differs;
  if (in_memory->metadata != loaded.metadata ||
      !kvtest::same_state(StateValue(states), kvtest::states_of(in_memory->caches), &differs)) {
    throw Failure{"loaded from memory differently from the file " + differs};
  }
  for (auto& c : loaded.caches) exercise(*c, n, seed * 7919 + i);
  // What loaded saves, and loads again the same.
  g_stage = "save and load again";
  auto again = dir + "/again.safetensors";
  save_prompt_cache(again, loaded.caches, loaded.metadata);
  auto back = load_prompt_cache(again);
  std::string why;
  if (back.metadata != loaded.metadata) throw Failure{"metadata changed through a save and load"};
  if (!kvtest::same_state(StateValue(states), kvtest::states_of(back.caches), &why)) {
    throw Failure{"state changed through a save and load at " + why};
  }
}

// The valid files mutations start from.
std::vector<std::string> seeds(const std::string& dir) {
  std::vector<std::string> out;
  auto samples = kvtest::sample_caches();
  PromptCache all;
  for (size_t i = 0; i < samples.size(); ++i) {
    auto path = dir + "/seed" + std::to_string(i) + ".safetensors";
    save_prompt_cache(path, {samples[i].cache}, i % 3 ? Metadata{} : Metadata{{"model", "fuzz"}});
    out.push_back(kvtest::read_bytes(path));
    all.push_back(samples[i].cache);
  }
  auto path = dir + "/all.safetensors";
  save_prompt_cache(path, all, {{"model", "fuzz"}, {"tokens", "1 2 3"}});
  out.push_back(kvtest::read_bytes(path));
  for (const char* name : {"old_layout", "rotating_kv_cache_wrapped", "batch_rotating_kv_cache", "arrays_cache",
                           "concatenate_kv_cache", "hybrid_model"}) {
    auto bytes = kvtest::read_bytes(std::string(KVCORE_FIXTURES_DIR) + "/" + name + ".safetensors");
    if (!bytes.empty()) out.push_back(bytes);
  }
  return out;
}

// Block files: a chain of blocks over a few layouts, each with what a fetch
// expects of it.
struct BlockSeed {
  std::string bytes;
  BlockHeader header;
};

std::vector<BlockSeed> block_seeds(const std::string& dir) {
  std::vector<BlockSeed> out;
  int k = 0;
  // Chain k: two blocks of bt tokens, block j's layers rows(j).
  auto chain = [&](int bt, const std::function<std::vector<BlockLayer>(int64_t)>& rows) {
    BlockHeader h;
    h.model = "fuzz-model";
    h.block_tokens = bt;
    uint64_t parent = 0;
    for (int64_t j = 0; j < 2; ++j) {
      const std::vector<BlockLayer> layers = rows(j);
      h.layout = block_layout(layers);
      h.index = j;
      h.parent = parent;
      h.tokens.clear();
      for (int t = 0; t < bt; ++t) h.tokens.push_back(1000 * k + j * bt + t);
      h.chain = block_chain(parent, h.model, h.layout, bt, h.tokens.data(), h.tokens.size());
      parent = h.chain;
      auto path = dir + "/block" + std::to_string(k) + "_" + std::to_string(j) + ".safetensors";
      write_prepared(path, prepare_block(h, layers));
      out.push_back({kvtest::read_bytes(path), h});
    }
    ++k;
  };
  for (auto dtype : {mx::float16, mx::float32, mx::bfloat16}) {
    for (int layers : {1, 2}) {
      const int bt = 4 + 4 * (k % 2);
      std::vector<BlockLayer> rows;
      for (int l = 0; l < layers; ++l) {
        auto a = mx::astype(mx::reshape(mx::arange(2 * bt * 8), {1, 2, bt, 8}), dtype);
        BlockLayer row;
        row.arrays = {a + l, a - l};
        row.tokens = row.offset = bt;
        rows.push_back(std::move(row));
      }
      chain(bt, [&](int64_t) { return rows; });
    }
  }
  // Quantized layers, one per scheme: blocks of whole key groups.
  for (auto scheme : {QuantScheme::affine, QuantScheme::rotated_channel}) {
    const int bt = 32;
    QuantizedKVCache q({32, 4}, {64, 2}, scheme, 0);
    auto a = mx::astype(mx::reshape(mx::arange(2 * 2 * bt * 64), {1, 2, 2 * bt, 64}), mx::float16) * 0.01;
    q.update_and_fetch(a, -a);
    const BlockLayer whole = *block_layer(q);
    chain(bt, [&](int64_t j) {
      return std::vector<BlockLayer>{block_rows(whole, static_cast<int>(j * bt), static_cast<int>((j + 1) * bt))};
    });
  }
  return out;
}

// A mutated block file must be refused with a kvcore error under its true
// name, and under a name fixed up to its new hash must give the layout's
// layers or a kvcore error; its header read from disk likewise.
void run_block(const std::string& bytes, const BlockSeed& seed, const std::string& dir, Counts& n) {
  const uint64_t original = disk_bytes_hash(seed.bytes);
  g_stage = "load_block_bytes (its name)";
  try {
    load_block_bytes(block_file_name(seed.header.chain, original), std::make_shared<const std::string>(bytes),
                     seed.header);
    if (bytes != seed.bytes) throw Failure{"a changed block file loaded under its old name"};
  } catch (const CacheError&) {
    if (bytes == seed.bytes) throw Failure{"an unchanged block file refused"};
  }
  g_stage = "load_block_bytes (renamed to its hash)";
  try {
    auto layers = load_block_bytes(block_file_name(seed.header.chain, disk_bytes_hash(bytes)),
                                   std::make_shared<const std::string>(bytes), seed.header);
    if (block_layout(layers) != seed.header.layout) throw Failure{"a block of another layout loaded"};
    for (const auto& l : layers) {
      if (l.tokens != seed.header.block_tokens) throw Failure{"a block of another length loaded"};
      mx::eval(l.arrays);
    }
    ++n.loaded;
  } catch (const CacheError&) {
    ++n.load_errors;
  }
  g_stage = "read_block_header";
  auto path = dir + "/fuzz_block.safetensors";
  kvtest::write_bytes(path, bytes);
  try {
    BlockHeader h = read_block_header(path);
    if (h.chain != block_chain(h.parent, h.model, h.layout, h.block_tokens, h.tokens.data(), h.tokens.size())) {
      throw Failure{"a block header whose chain does not hash"};
    }
  } catch (const CacheError&) {
  }
}

} // namespace

int main(int argc, char** argv) {
  uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  int iterations = argc > 2 ? std::atoi(argv[2]) : 3000;
  int first = argc > 3 ? std::atoi(argv[3]) : 0;
  const auto& dir = kvtest::temp_dir().string();
  auto bases = seeds(dir);
  bool keep_going = std::getenv("KVCORE_FUZZ_KEEP_GOING") != nullptr;
  int failures = 0;
  Counts n;
  for (int i = first; i < first + iterations; ++i) {
    Rng rng(seed * 1000003ull + static_cast<uint64_t>(i));
    size_t base = pick(rng, bases.size());
    std::string what = "base " + std::to_string(base) + ":";
    std::string f = bases[base];
    size_t count = pick(rng, 10) < 7 ? 1 : 2 + pick(rng, 2);
    for (size_t m = 0; m < count; ++m) f = mutate(rng, std::move(f), what);
    std::string failure;
    try {
      run_one(f, dir, seed, i, n);
    } catch (const Failure& e) {
      failure = e.what;
    } catch (const CacheError& e) {
      failure = std::string("a kvcore error after a successful load: ") + e.what();
    } catch (const std::exception& e) {
      failure = std::string("a non-kvcore exception: ") + e.what();
    }
    if (!failure.empty()) {
      auto keep = "fuzz_loader_failure_" + std::to_string(seed) + "_" + std::to_string(i) + ".safetensors";
      kvtest::write_bytes(keep, f);
      std::cerr << "FAIL seed " << seed << " iteration " << i << " (" << what << ") in " << g_stage << ": " << failure
                << "\n  the file: " << keep << "; replay: kvcore_fuzz_loader " << seed << " 1 " << i << "\n";
      ++failures;
      if (!keep_going) return 1;
    }
  }
  const auto blocks = block_seeds(dir);
  Counts nb;
  for (int i = first; i < first + iterations / 3; ++i) {
    Rng rng(seed * 2000003ull + static_cast<uint64_t>(i));
    const BlockSeed& b = blocks[pick(rng, blocks.size())];
    std::string what = "block " + std::to_string(b.header.index) + ":";
    std::string f = b.bytes;
    if (pick(rng, 20) > 0) { // 1 in 20 unchanged
      size_t count = pick(rng, 10) < 7 ? 1 : 2 + pick(rng, 2);
      for (size_t m = 0; m < count; ++m) f = mutate(rng, std::move(f), what);
    }
    std::string failure;
    try {
      run_block(f, b, dir, nb);
    } catch (const Failure& e) {
      failure = e.what;
    } catch (const std::exception& e) {
      failure = std::string("a non-kvcore exception: ") + e.what();
    }
    if (!failure.empty()) {
      auto keep = "fuzz_block_failure_" + std::to_string(seed) + "_" + std::to_string(i) + ".safetensors";
      kvtest::write_bytes(keep, f);
      std::cerr << "FAIL seed " << seed << " block iteration " << i << " (" << what << ") in " << g_stage << ": "
                << failure << "\n  the file: " << keep << "\n";
      ++failures;
      if (!keep_going) return 1;
    }
  }
  std::cout << "fuzz_loader seed " << seed << ", " << iterations / 3 << " block files: " << nb.loaded
            << " loaded under their new hash, " << nb.load_errors << " kvcore errors\n";
  std::cout << "fuzz_loader seed " << seed << ", " << iterations << " files: " << n.loaded << " loaded ok, "
            << n.load_errors << " kvcore errors; operations on loaded caches: " << n.op_ok << " ok, "
            << n.op_errors << " kvcore errors";
  if (failures) std::cout << "; " << failures << " FAILURES";
  std::cout << "\n";
  return failures ? 1 : 0;
}
