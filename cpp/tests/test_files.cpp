// Prompt-cache files in C++: parity with files and results of mlx-lm 0.32.2
// (the fixtures scripts/make_fixtures.py wrote), exact round trips of every
// class, the helpers over a model's caches, and forged or truncated files,
// each a ValueError that names the fault.
#include <cstring>
#include <map>
#include <set>
#include <unordered_map>

#include <mlx/io.h>
#include <mlx/ops.h>

#include "kvcore/kvcore.h"
#include "samples.h"
#include "support.h"
#include "test.h"

namespace mx = mlx::core;
using namespace kvcore;
using kvtest::bit_equal;
using kvtest::same_state;

namespace {

std::string fixture(const std::string& name) {
  return std::string(KVCORE_FIXTURES_DIR) + "/" + name + ".safetensors";
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Fixture parity ------------------------------------------------------------

// What mlx-lm computed, as make_fixtures.py lays it out.
class Expected {
 public:
  explicit Expected(const std::string& path) {
    auto [a, m] = mx::load_safetensors(path);
    arrays_ = std::move(a);
    meta_ = std::move(m);
  }
  bool has_array(const std::string& k) const {
    return arrays_.count(k) > 0;
  }
  const mx::array& array(const std::string& k) const {
    auto it = arrays_.find(k);
    if (it == arrays_.end()) throw std::runtime_error("the fixture lacks array " + k);
    return it->second;
  }
  const std::string& str(const std::string& k) const {
    auto it = meta_.find(k);
    if (it == meta_.end()) throw std::runtime_error("the fixture lacks metadata " + k);
    return it->second;
  }
  int integer(const std::string& k) const {
    return std::stoi(str(k));
  }
  int count_outputs(const std::string& key) const {
    int n = 0;
    while (has_array(key + ".out." + std::to_string(n))) ++n;
    return n;
  }
  /// The dotted paths of the leaves stored under prefix.
  std::set<std::string> leaves(const std::string& prefix) const {
    std::set<std::string> out;
    auto p = prefix + ".";
    for (auto& [k, _] : arrays_) {
      if (starts_with(k, p)) out.insert(k.substr(p.size()));
    }
    for (auto& [k, _] : meta_) {
      if (starts_with(k, p)) out.insert(k.substr(p.size()));
    }
    return out;
  }
  Metadata user() const {
    Metadata out;
    for (auto& [k, v] : meta_) {
      if (starts_with(k, "user.")) out[k.substr(5)] = v;
    }
    return out;
  }

 private:
  std::unordered_map<std::string, mx::array> arrays_;
  std::unordered_map<std::string, std::string> meta_;
};

void flatten(const StateValue& v, const std::string& path, std::map<std::string, const StateValue*>& out) {
  if (v.is_list()) {
    auto& l = v.as_list();
    for (size_t i = 0; i < l.size(); ++i) {
      flatten(l[i], path.empty() ? std::to_string(i) : path + "." + std::to_string(i), out);
    }
    return;
  }
  out[path] = &v;
}

std::string describe(const StateValue& v) {
  if (v.is_int()) return "int " + std::to_string(v.as_int());
  if (v.is_bool()) return std::string("bool ") + (v.as_bool() ? "true" : "false");
  if (v.is_float()) return "float " + std::to_string(v.as_float());
  if (v.is_string()) return "string '" + v.as_string() + "'";
  if (v.is_array()) return "array " + kvtest::shape_text(v.as_array());
  return v.kind();
}

// A leaf that is not an array, against make_fixtures.py's text for it.
bool scalar_matches(const StateValue& v, const std::string& text) {
  auto value = text.substr(text.find(':') + 1);
  if (text == "none") return v.is_none();
  if (starts_with(text, "int:")) return v.is_int() && v.as_int() == std::stoll(value);
  if (starts_with(text, "bool:")) return v.is_bool() && v.as_bool() == (value == "1");
  if (starts_with(text, "float:")) return v.is_float() && v.as_float() == std::strtod(value.c_str(), nullptr);
  if (starts_with(text, "str:")) return v.is_string() && v.as_string() == value;
  return false;
}

// A kvcore state against mlx-lm's, leaf by leaf.
void check_state(const std::string& where, const StateValue& state, const Expected& e, const std::string& prefix) {
  std::map<std::string, const StateValue*> got;
  flatten(state, "", got);
  auto want = e.leaves(prefix);
  for (auto& path : want) {
    auto it = got.find(path);
    if (it == got.end()) {
      kvtest::fail(__FILE__, __LINE__, where + ": no leaf " + path + " in kvcore's state");
      continue;
    }
    auto key = prefix + "." + path;
    if (e.has_array(key)) {
      std::string why;
      if (!it->second->is_array()) {
        kvtest::fail(__FILE__, __LINE__, where + ": leaf " + path + " is " + describe(*it->second) + ", mlx-lm has an array");
      } else if (!bit_equal(it->second->as_array(), e.array(key), &why)) {
        kvtest::fail(__FILE__, __LINE__, where + ": leaf " + path + ": " + why);
      }
    } else if (!scalar_matches(*it->second, e.str(key))) {
      kvtest::fail(__FILE__, __LINE__, where + ": leaf " + path + " is " + describe(*it->second) + ", mlx-lm has " + e.str(key));
    }
  }
  for (auto& [path, v] : got) {
    if (!want.count(path)) {
      kvtest::fail(__FILE__, __LINE__, where + ": kvcore's state has leaf " + path + " (" + describe(*v) + ") that mlx-lm's lacks");
    }
  }
}

std::vector<mx::array> update(Cache& c, const mx::array& k, const mx::array& v) {
  if (auto* s = dynamic_cast<SequenceCache*>(&c)) {
    auto [a, b] = s->update_and_fetch(k, v);
    return {a, b};
  }
  if (auto* s = dynamic_cast<BatchCache*>(&c)) {
    auto [a, b] = s->update_and_fetch(k, v);
    return {a, b};
  }
  if (auto* q = dynamic_cast<QuantizedKVCache*>(&c)) {
    auto [kq, vq] = q->update_and_fetch(k, v);
    return {std::get<0>(kq), std::get<1>(kq), std::get<2>(kq), std::get<0>(vq), std::get<1>(vq), std::get<2>(vq)};
  }
  throw std::runtime_error(std::string(c.name()) + " has no update_and_fetch");
}

std::vector<int> ints(const std::string& csv) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= csv.size()) {
    auto end = csv.find(',', pos);
    if (end == std::string::npos) end = csv.size();
    auto part = csv.substr(pos, end - pos);
    out.push_back(part == "-" ? -1 : std::stoi(part));
    pos = end + 1;
  }
  return out;
}

// The steps mlx-lm took on its loaded cache, replayed on kvcore's.
void replay(const std::string& where, Cache& layer, const Expected& e, const std::string& L) {
  int steps = e.integer(L + ".steps");
  for (int t = 0; t < steps; ++t) {
    auto key = L + ".s" + std::to_string(t);
    auto op = e.str(key + ".op");
    int member = e.integer(key + ".member");
    auto at = where + " step " + std::to_string(t) + " (" + op + (member >= 0 ? " on member " + std::to_string(member) : "") + ")";
    try {
      Cache* target = &layer;
      if (member >= 0) {
        target = &dynamic_cast<CacheList&>(layer)[member];
      }
      if (op == "update") {
        auto got = update(*target, e.array(key + ".in.0"), e.array(key + ".in.1"));
        int n = e.count_outputs(key);
        if (static_cast<int>(got.size()) != n) {
          kvtest::fail(__FILE__, __LINE__, at + ": " + std::to_string(got.size()) + " arrays, mlx-lm " + std::to_string(n));
          continue;
        }
        for (int j = 0; j < n; ++j) {
          std::string why;
          if (!bit_equal(got[j], e.array(key + ".out." + std::to_string(j)), &why)) {
            kvtest::fail(__FILE__, __LINE__, at + ": returned array " + std::to_string(j) + ": " + why);
          }
        }
      } else if (op == "mask") {
        auto a = ints(e.str(key + ".args"));
        std::optional<int> window;
        if (a[2] >= 0) window = a[2];
        auto m = target->make_mask(a[0], a[1] != 0, window);
        auto kind = e.str(key + ".kind");
        std::string got_kind = std::holds_alternative<std::monostate>(m) ? "none"
            : std::holds_alternative<std::string>(m)                     ? std::get<std::string>(m)
                                                                         : "array";
        if (got_kind != kind) {
          kvtest::fail(__FILE__, __LINE__, at + " " + e.str(key + ".args") + ": mask " + got_kind + ", mlx-lm " + kind);
        } else if (kind == "array") {
          std::string why;
          if (!bit_equal(std::get<mx::array>(m), e.array(key + ".out.0"), &why)) {
            kvtest::fail(__FILE__, __LINE__, at + " " + e.str(key + ".args") + ": mask " + why);
          }
        }
      } else if (op == "trim") {
        int got = target->trim(e.integer(key + ".args"));
        if (got != e.integer(key + ".result")) {
          kvtest::fail(__FILE__, __LINE__, at + ": trimmed " + std::to_string(got) + ", mlx-lm " + e.str(key + ".result"));
        }
      } else if (op == "trim_front") {
        dynamic_cast<ChunkedKVCache&>(*target).maybe_trim_front();
      } else if (op == "set") {
        dynamic_cast<ArraysCache&>(*target).set(e.integer(key + ".args"), e.array(key + ".in.0"));
      } else if (op == "advance") {
        dynamic_cast<ArraysCache&>(*target).advance(e.integer(key + ".args"));
      } else {
        kvtest::fail(__FILE__, __LINE__, at + ": unknown op in the fixture");
      }
    } catch (const std::exception& ex) {
      kvtest::fail(__FILE__, __LINE__, at + " threw: " + ex.what());
      return;
    }
  }
}

// Load mlx-lm's file with kvcore, check what came against what mlx-lm
// loaded, replay mlx-lm's steps and check every result and the final state.
void check_fixture(const std::string& name) {
  LoadedPromptCache loaded;
  try {
    loaded = load_prompt_cache(fixture(name));
  } catch (const std::exception& ex) {
    kvtest::fail(__FILE__, __LINE__, name + ": load_prompt_cache threw: " + ex.what());
    return;
  }
  Expected e(fixture(name + ".expected"));
  int layers = e.integer("layers");
  CHECK_EQ(static_cast<int>(loaded.caches.size()), layers);
  CHECK(loaded.metadata == e.user());
  for (int i = 0; i < layers && i < static_cast<int>(loaded.caches.size()); ++i) {
    auto L = "L" + std::to_string(i);
    auto where = name + " layer " + std::to_string(i);
    auto& c = *loaded.caches[i];
    if (c.name() != e.str(L + ".class")) {
      kvtest::fail(__FILE__, __LINE__, where + ": class " + c.name() + ", mlx-lm " + e.str(L + ".class"));
      continue;
    }
    check_state(where + " as loaded", cache_state(c), e, L + ".loaded");
    replay(where, c, e, L);
    check_state(where + " after the steps", cache_state(c), e, L + ".final");
  }
}

const std::vector<std::string>& current_layout_fixtures() {
  static const std::vector<std::string> names = {
      "kv_cache",      "concatenate_kv_cache", "rotating_kv_cache_wrapped", "quantized_kv_cache",
      "chunked_kv_cache", "arrays_cache",      "cache_list",                "batch_kv_cache",
      "batch_rotating_kv_cache", "hybrid_model"};
  return names;
}

// Forged files --------------------------------------------------------------

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

std::string q(const std::string& s) {
  return "\"" + s + "\"";
}

template <class T>
std::string raw(std::initializer_list<T> values) {
  std::string s;
  for (T v : values) s.append(reinterpret_cast<const char*>(&v), sizeof(T));
  return s;
}

// A safetensors file written by hand, so that each test changes one thing.
struct Forged {
  struct Tensor {
    std::string name, dtype, shape, offsets; // dtype, shape, offsets: JSON text
  };
  std::vector<Tensor> tensors;
  std::vector<std::pair<std::string, std::string>> meta; // key, JSON text
  std::optional<std::string> raw_meta;                   // replaces __metadata__
  std::string data;

  std::string header() const {
    std::string h = "{";
    for (auto& t : tensors) {
      h += q(t.name) + ":{\"dtype\":" + t.dtype + ",\"shape\":" + t.shape + ",\"data_offsets\":" + t.offsets + "},";
    }
    std::string m = "{";
    for (size_t i = 0; i < meta.size(); ++i) {
      m += (i ? "," : "") + q(meta[i].first) + ":" + meta[i].second;
    }
    m += "}";
    return h + "\"__metadata__\":" + (raw_meta ? *raw_meta : m) + "}";
  }
  std::string bytes() const {
    auto h = header();
    return le64(h.size()) + h + data;
  }
  Tensor& tensor(const std::string& name) {
    for (auto& t : tensors) {
      if (t.name == name) return t;
    }
    throw std::runtime_error("no tensor " + name);
  }
  void set_meta(const std::string& key, const std::string& json) {
    for (auto& [k, v] : meta) {
      if (k == key) {
        v = json;
        return;
      }
    }
    meta.emplace_back(key, json);
  }
  void erase_meta(const std::string& key) {
    std::erase_if(meta, [&](auto& kv) { return kv.first == key; });
  }
  void erase_tensor(const std::string& name) {
    std::erase_if(tensors, [&](auto& t) { return t.name == name; });
  }
};

// A valid one-layer file: KVCache (keys, values, offset) in 0.32's layout.
Forged valid_kv() {
  Forged f;
  f.tensors = {
      {"0.0", q("F32"), "[1,1,2,2]", "[0,16]"},
      {"0.1", q("F32"), "[1,1,2,2]", "[16,32]"},
      {"0.2", q("I32"), "[]", "[32,36]"},
  };
  f.meta = {{"1.0", q("KVCache")}, {"2.0", q("")}, {"2.1.0", q("0.2")}, {"2.1.1", q("scalar")}};
  f.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8}) + raw<int32_t>({2});
  return f;
}

// A valid one-layer file in the meta_state layout: RotatingKVCache(4) with
// two tokens, user metadata model=x.
Forged valid_old_rotating() {
  Forged f;
  f.tensors = {
      {"0.0", q("F32"), "[1,1,2,2]", "[0,16]"},
      {"0.1", q("F32"), "[1,1,2,2]", "[16,32]"},
  };
  f.meta = {{"0.0.0", q("0")}, {"0.0.1", q("4")}, {"0.0.2", q("2")}, {"0.0.3", q("2")},
            {"1.model", q("x")}, {"2.0", q("RotatingKVCache")}};
  f.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8});
  return f;
}

// The file must fail to load with a kvcore::ValueError whose message holds
// `text`; with `load_context`, its context must be load_prompt_cache's.
void expect_value_error(const char* file, int line, const std::string& bytes, const std::string& text,
                        bool load_context, const std::string& label) {
  auto path = kvtest::temp_file("forged.safetensors");
  kvtest::write_bytes(path, bytes);
  auto what = label.empty() ? std::string() : " [" + label + "]";
  try {
    auto loaded = load_prompt_cache(path);
    kvtest::fail(file, line, "loaded without error" + what + "; expected a ValueError with '" + text + "'");
  } catch (const ValueError& e) {
    if (e.kind() != ErrorKind::Value) {
      kvtest::fail(file, line, "ValueError of another kind" + what);
    }
    if (load_context && !starts_with(e.context(), "load_prompt_cache")) {
      kvtest::fail(file, line, "context '" + e.context() + "', not load_prompt_cache" + what + ": " + e.what());
    }
    if (std::string(e.what()).find(text) == std::string::npos) {
      kvtest::fail(file, line, std::string("message '") + e.what() + "' lacks '" + text + "'" + what);
    }
  } catch (const CacheError& e) {
    kvtest::fail(file, line, std::string("a kvcore error other than ValueError") + what + ": " + e.what());
  } catch (const std::exception& e) {
    kvtest::fail(file, line, std::string("a non-kvcore exception") + what + ": " + e.what());
  }
}

#define CHECK_LOAD_FAILS(bytes, text) expect_value_error(__FILE__, __LINE__, bytes, text, true, "")
#define CHECK_LOAD_FAILS_AT(bytes, text, label) expect_value_error(__FILE__, __LINE__, bytes, text, true, label)
// For faults the cache setters find (their own context).
#define CHECK_LOAD_VALUE_ERROR(bytes, text) expect_value_error(__FILE__, __LINE__, bytes, text, false, "")

LoadedPromptCache load_bytes(const std::string& bytes) {
  auto path = kvtest::temp_file("valid.safetensors");
  kvtest::write_bytes(path, bytes);
  return load_prompt_cache(path);
}

} // namespace

// Parity with mlx-lm 0.32.2 -------------------------------------------------

TEST(fixture_kv_cache_matches_mlx_lm) {
  check_fixture("kv_cache");
}

TEST(fixture_concatenate_kv_cache_matches_mlx_lm) {
  check_fixture("concatenate_kv_cache");
}

TEST(fixture_rotating_kv_cache_wrapped_ring_matches_mlx_lm) {
  check_fixture("rotating_kv_cache_wrapped");
}

TEST(fixture_quantized_kv_cache_matches_mlx_lm) {
  check_fixture("quantized_kv_cache");
}

TEST(fixture_chunked_kv_cache_matches_mlx_lm) {
  check_fixture("chunked_kv_cache");
}

TEST(fixture_arrays_cache_matches_mlx_lm) {
  check_fixture("arrays_cache");
}

TEST(fixture_cache_list_matches_mlx_lm) {
  check_fixture("cache_list");
}

TEST(fixture_batch_kv_cache_matches_mlx_lm) {
  check_fixture("batch_kv_cache");
}

TEST(fixture_batch_rotating_kv_cache_matches_mlx_lm) {
  check_fixture("batch_rotating_kv_cache");
}

TEST(fixture_hybrid_model_with_metadata_matches_mlx_lm) {
  check_fixture("hybrid_model");
}

TEST(fixture_meta_state_layout_converts_as_mlx_lm_states) {
  check_fixture("old_layout");
}

TEST(file_layouts_are_told_apart) {
  auto cur = load_prompt_cache_states(fixture("kv_cache"));
  CHECK(cur.layout == FileLayout::Current);
  CHECK_EQ(cur.layers.size(), size_t(1));
  CHECK(cur.layers.at(0).name == "KVCache");
  auto old = load_prompt_cache_states(fixture("old_layout"));
  CHECK(old.layout == FileLayout::MetaState);
  std::vector<std::string> names;
  for (auto& l : old.layers) names.push_back(l.name);
  CHECK((names == std::vector<std::string>{"KVCache", "RotatingKVCache", "QuantizedKVCache",
                                           "ChunkedKVCache", "ArraysCache", "CacheList"}));
  CHECK(old.metadata == (Metadata{{"model", "old-tiny"}}));
}

TEST(resaving_an_mlx_lm_file_gives_the_same_tensors_and_metadata) {
  for (auto& name : current_layout_fixtures()) {
    auto loaded = load_prompt_cache(fixture(name));
    auto out = kvtest::temp_file("resaved_" + name + ".safetensors");
    save_prompt_cache(out, loaded.caches, loaded.metadata);
    auto ref = read_safetensors_header(fixture(name));
    auto got = read_safetensors_header(out);
    if (got.metadata != ref.metadata) {
      kvtest::fail(__FILE__, __LINE__, name + ": metadata differs from mlx-lm's");
      for (auto& [k, v] : ref.metadata) {
        auto it = got.metadata.find(k);
        if (it == got.metadata.end() || it->second != v) {
          kvtest::fail(__FILE__, __LINE__, name + ":   mlx-lm's " + k + "=" + v);
        }
      }
      for (auto& [k, v] : got.metadata) {
        if (!ref.metadata.count(k)) kvtest::fail(__FILE__, __LINE__, name + ":   kvcore's extra " + k + "=" + v);
      }
    }
    std::map<std::string, std::pair<std::string, std::vector<int64_t>>> a, b;
    for (auto& t : ref.tensors) a[t.name] = {t.dtype, t.shape};
    for (auto& t : got.tensors) b[t.name] = {t.dtype, t.shape};
    if (a != b) {
      kvtest::fail(__FILE__, __LINE__, name + ": tensor names, dtypes or shapes differ from mlx-lm's");
      continue;
    }
    auto ra = mx::load_safetensors(fixture(name)).first;
    auto ga = mx::load_safetensors(out).first;
    for (auto& [k, x] : ra) {
      std::string why;
      if (!bit_equal(ga.at(k), x, &why)) kvtest::fail(__FILE__, __LINE__, name + " tensor " + k + ": " + why);
    }
  }
}

// Round trips ---------------------------------------------------------------

TEST(round_trip_every_class_keeps_states_exactly) {
  auto samples = kvtest::sample_caches();
  PromptCache all;
  for (auto& s : samples) all.push_back(s.cache);
  Metadata meta{{"model", "round-trip"}, {"empty", ""}};
  auto path = kvtest::temp_file("all.safetensors");
  save_prompt_cache(path, all, meta);
  auto loaded = load_prompt_cache(path);
  CHECK(loaded.metadata == meta);
  CHECK_EQ(loaded.caches.size(), samples.size());
  for (size_t i = 0; i < samples.size() && i < loaded.caches.size(); ++i) {
    auto& s = samples[i];
    std::string why;
    if (std::string(loaded.caches[i]->name()) != s.cache->name()) {
      kvtest::fail(__FILE__, __LINE__, s.label + ": loaded as " + loaded.caches[i]->name());
    } else if (!same_state(cache_state(*s.cache), cache_state(*loaded.caches[i]), &why)) {
      kvtest::fail(__FILE__, __LINE__, s.label + ": state differs after the round trip at " + why);
    }
    // Each alone in its own file too.
    auto one = kvtest::temp_file("one.safetensors");
    save_prompt_cache(one, {s.cache});
    auto back = load_prompt_cache(one);
    if (back.caches.size() != 1 || !same_state(cache_state(*s.cache), cache_state(*back.caches[0]), &why)) {
      kvtest::fail(__FILE__, __LINE__, s.label + ": differs after a one-layer round trip at " + why);
    }
    CHECK(back.metadata.empty());
  }
}

TEST(loaded_caches_continue_like_the_originals) {
  auto samples = kvtest::sample_caches();
  for (auto& s : samples) {
    auto path = kvtest::temp_file("cont.safetensors");
    save_prompt_cache(path, {s.cache});
    auto loaded = load_prompt_cache(path);
    auto original = s.cache->copy();
    try {
      for (int S : {1, 3, 1}) {
        auto want = kvtest::next_update(*original, S, 1000 + S);
        auto got = kvtest::next_update(*loaded.caches.at(0), S, 1000 + S);
        CHECK_EQ(got.size(), want.size());
        for (size_t j = 0; j < want.size() && j < got.size(); ++j) {
          std::string why;
          if (!bit_equal(got[j], want[j], &why)) {
            kvtest::fail(__FILE__, __LINE__, s.label + ": update S=" + std::to_string(S) + " array " + std::to_string(j) + ": " + why);
          }
        }
      }
      // The buffers themselves may differ: `step` is not part of a state.
      CHECK_EQ(loaded.caches[0]->size(), original->size());
    } catch (const std::exception& e) {
      kvtest::fail(__FILE__, __LINE__, s.label + ": " + e.what());
    }
  }
}

TEST(metadata_round_trips_unchanged) {
  Metadata meta{{"model", "tiny"}, {"a.b", "dotted key"}, {"unicode", "ünïcödé ✓ 𝄞"},
                {"empty", ""}, {"json", "{\"x\": [1, 2]}"}, {"0", "digit key"}};
  auto path = kvtest::temp_file("meta.safetensors");
  save_prompt_cache(path, {std::make_shared<KVCache>()}, meta);
  CHECK(load_prompt_cache(path).metadata == meta);
}

TEST(empty_prompt_cache_round_trips) {
  auto path = kvtest::temp_file("none.safetensors");
  save_prompt_cache(path, {}, {{"k", "v"}});
  auto loaded = load_prompt_cache(path);
  CHECK(loaded.caches.empty());
  CHECK(loaded.metadata == (Metadata{{"k", "v"}}));
}

TEST(save_appends_the_safetensors_suffix) {
  auto base = kvtest::temp_file("suffixless");
  save_prompt_cache(base, {std::make_shared<KVCache>()});
  CHECK(std::filesystem::exists(base + ".safetensors"));
  CHECK_EQ(load_prompt_cache(base + ".safetensors").caches.size(), size_t(1));
}

TEST(save_refuses_a_null_layer) {
  PromptCache caches{std::make_shared<KVCache>(), nullptr};
  CHECK_THROWS(ValueError, "a cache for every layer", save_prompt_cache(kvtest::temp_file("null"), caches));
}

TEST(state_depth_is_capped_on_save_and_loads_up_to_the_cap) {
  // A KVCache inside n CacheLists: its leaves lie 2n + 2 levels deep.
  auto nest = [](int n) {
    std::shared_ptr<Cache> c = std::make_shared<KVCache>();
    for (int i = 0; i < n; ++i) {
      c = std::make_shared<CacheList>(std::vector<std::shared_ptr<Cache>>{c});
    }
    return c;
  };
  auto ok = kvtest::temp_file("deep_ok.safetensors");
  save_prompt_cache(ok, {nest(7)}); // 16 levels
  auto back = load_prompt_cache(ok);
  std::string why;
  CHECK(same_state(cache_state(*nest(7)), cache_state(*back.caches.at(0)), &why));
  CHECK_THROWS(ValueError, "deep", save_prompt_cache(kvtest::temp_file("deep_bad.safetensors"), {nest(8)}));
}

TEST(read_header_of_an_mlx_lm_file) {
  auto h = read_safetensors_header(fixture("kv_cache"));
  CHECK_EQ(h.file_bytes, static_cast<uint64_t>(std::filesystem::file_size(fixture("kv_cache"))));
  CHECK_EQ(h.tensors.size(), size_t(3));
  bool found = false;
  for (auto& t : h.tensors) {
    if (t.name == "0.0") {
      found = true;
      CHECK(t.dtype == "F16");
      CHECK((t.shape == std::vector<int64_t>{1, 2, 256, 8}));
      CHECK_EQ(t.end - t.begin, uint64_t(2 * 256 * 8 * 2));
    }
  }
  CHECK(found);
  CHECK(h.metadata.at("1.0") == "KVCache");
  CHECK(h.metadata.at("0.model") == "tiny");
}

TEST(missing_file_is_a_value_error) {
  CHECK_THROWS(ValueError, "a readable file", load_prompt_cache(kvtest::temp_file("nope.safetensors")));
  CHECK_THROWS(ValueError, "a readable file", read_safetensors_header(kvtest::temp_file("nope.safetensors")));
}

// Forged and truncated files ------------------------------------------------

TEST(forged_base_files_are_valid) {
  // The files the forgeries below start from load, so each forgery fails
  // for its own fault only.
  auto kv = load_bytes(valid_kv().bytes());
  CHECK_EQ(kv.caches.size(), size_t(1));
  auto* c = dynamic_cast<KVCache*>(kv.caches.at(0).get());
  CHECK(c && c->offset() == 2);
  auto old = load_bytes(valid_old_rotating().bytes());
  auto* r = dynamic_cast<RotatingKVCache*>(old.caches.at(0).get());
  CHECK(r && r->offset() == 2 && r->max_size() == 4 && r->idx() == 2);
  CHECK(old.metadata == (Metadata{{"model", "x"}}));
}

TEST(truncated_files_fail_at_every_length) {
  PromptCache caches;
  for (auto& s : kvtest::sample_caches()) caches.push_back(s.cache);
  auto path = kvtest::temp_file("whole.safetensors");
  save_prompt_cache(path, caches, {{"model", "x"}});
  auto bytes = kvtest::read_bytes(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  // Every length through the header and a little past it, then strides.
  std::vector<size_t> lengths;
  for (size_t n = 0; n < bytes.size(); n += (n < header + 64 ? 1 : 97)) lengths.push_back(n);
  for (size_t back = 1; back <= 8; ++back) lengths.push_back(bytes.size() - back);
  for (auto n : lengths) {
    expect_value_error(__FILE__, __LINE__, bytes.substr(0, n), "load_prompt_cache", true,
                       "truncated to " + std::to_string(n) + " of " + std::to_string(bytes.size()));
  }
  CHECK(lengths.size() > header);
}

TEST(header_length_past_the_file) {
  auto f = valid_kv();
  auto h = f.header();
  auto tail = h + f.data;
  CHECK_LOAD_FAILS(le64(tail.size() + 1) + tail, "a header of at most");
  CHECK_LOAD_FAILS(le64(~0ull) + tail, "a header of at most");
  CHECK_LOAD_FAILS(le64(1ull << 63) + tail, "a header of at most");
  CHECK_LOAD_FAILS(le64(kMaxHeaderBytes + 1) + tail + std::string(kMaxHeaderBytes / 32, ' '), "a header of at most");
  CHECK_LOAD_FAILS(std::string("\x05\x00\x00", 3), "8-byte header length");
  // A length that cuts the JSON short.
  CHECK_LOAD_FAILS(le64(h.size() - 1) + tail, "JSON");
  CHECK_LOAD_FAILS(le64(0) + tail, "JSON");
}

TEST(unparsable_json_headers) {
  for (std::string h : {"", "{", "}", "{\"a\"", "{\"a\":}", "{\"a\":1,}", "[1,]", "{} x", "{'a': 1}",
                        "{\"a\": tru}", "{\"a\": 01}", "{\"a\": 1e}", "{\"a\": \"\\x\"}", "{\"a\": \"\\ud800x\"}",
                        "{\"a\": \"unterminated}", "{\"a\":\"\x01\"}", "nul", "{\"a\": -}", "{\"a\": NaN}"}) {
    expect_value_error(__FILE__, __LINE__, le64(h.size()) + h, "JSON", true, h);
  }
}

TEST(json_nesting_is_bounded) {
  for (size_t depth : {1000, 100000}) {
    std::string h = "{\"a\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
    expect_value_error(__FILE__, __LINE__, le64(h.size()) + h, "nesting", true, std::to_string(depth) + " deep");
  }
  // Shallow nesting parses, and is then no tensor entry.
  std::string h = "{\"a\":" + std::string(8, '[') + std::string(8, ']') + "}";
  CHECK_LOAD_FAILS(le64(h.size()) + h, "a tensor entry");
}

TEST(invalid_utf8_in_the_header) {
  auto f = valid_kv();
  f.set_meta("0.note", "\"\xff\xfe\"");
  CHECK_LOAD_FAILS(f.bytes(), "UTF-8");
  auto g = valid_kv();
  g.set_meta("0.note", "\"\xc0\x80\""); // overlong NUL
  CHECK_LOAD_FAILS(g.bytes(), "UTF-8");
  auto h = valid_kv();
  h.set_meta("0.note", "\"\xed\xa0\x80\""); // a surrogate, encoded
  CHECK_LOAD_FAILS(h.bytes(), "UTF-8");
}

TEST(header_must_be_an_object_of_tensor_objects) {
  for (std::string h : {"[]", "\"x\"", "5", "null", "true"}) {
    expect_value_error(__FILE__, __LINE__, le64(h.size()) + h, "a JSON object as header", true, h);
  }
  auto f = valid_kv();
  f.tensors[0].name = "0.0\":5,\"x"; // "0.0": 5 before the tensor entry
  CHECK_LOAD_FAILS(f.bytes(), "a tensor entry");
}

TEST(unknown_dtypes) {
  for (std::string d : std::vector<std::string>{q("F8"), q("float16"), q("f32"), q(""), "5", "null", "[\"F32\"]"}) {
    auto f = valid_kv();
    f.tensor("0.0").dtype = d;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "a known dtype", true, d);
  }
}

TEST(bad_shapes) {
  for (std::string s : {"[-1,1,2,2]", "\"x\"", "[2147483648]", "[1,1,1,1,1,1,1,1,16]", "null",
                        "[\"4\"]", "[true]", "{}"}) {
    auto f = valid_kv();
    f.tensor("0.0").shape = s;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "shape", true, s);
  }
  // The header's JSON holds integers only: the parser refuses these.
  for (std::string s : {"[1.5]", "[1e3]", "[18446744073709551616]"}) {
    auto f = valid_kv();
    f.tensor("0.0").shape = s;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "integer", true, s);
  }
}

TEST(data_offsets_outside_the_data) {
  for (std::string o : {"[0,1000]", "[16,8]", "[0]", "[0,16,32]", "[-1,15]", "[\"0\",\"16\"]", "null",
                        "[0,9223372036854775807]", "[9223372036854775800,16]", "[36,52]", "[32,48]"}) {
    auto f = valid_kv();
    f.tensor("0.0").offsets = o;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "data offsets", true, o);
  }
  for (std::string o : {"[0,18446744073709551615]", "[0.0,16.0]"}) {
    auto f = valid_kv();
    f.tensor("0.0").offsets = o;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "integer", true, o);
  }
}

TEST(shape_and_byte_size_mismatch) {
  auto f = valid_kv();
  f.tensor("0.0").shape = "[1,1,2,3]";
  CHECK_LOAD_FAILS(f.bytes(), "bytes for");
  auto g = valid_kv();
  g.tensor("0.0").dtype = q("F16");
  CHECK_LOAD_FAILS(g.bytes(), "bytes for");
  auto h = valid_kv();
  h.tensor("0.2").shape = "[2]";
  CHECK_LOAD_FAILS(h.bytes(), "bytes for");
  // A shape whose element count overflows 64 bits.
  auto i = valid_kv();
  i.tensor("0.0").shape = "[2147483647,2147483647,2147483647,2147483647,2147483647,2147483647,2147483647,4]";
  CHECK_LOAD_FAILS(i.bytes(), "bytes for");
}

TEST(unknown_class_names) {
  for (std::string name : {"Evil", "_BaseCache", "kvcache", "", "KVCache ", "__import__", "TokenBuffer"}) {
    auto f = valid_kv();
    f.set_meta("1.0", q(name));
    expect_value_error(__FILE__, __LINE__, f.bytes(), "a cache class among", true, name);
  }
  auto f = valid_kv();
  f.set_meta("1.0", "5");
  CHECK_LOAD_FAILS(f.bytes(), "string-to-string __metadata__");
  auto old = valid_old_rotating();
  old.set_meta("2.0", q("Evil"));
  CHECK_LOAD_FAILS(old.bytes(), "a cache class among");
  // Inside a CacheList's state: the member's class name is a string leaf.
  Forged l;
  l.tensors = {
      {"0.0.0.0", q("F32"), "[1,1,2,2]", "[0,16]"},
      {"0.0.0.1", q("F32"), "[1,1,2,2]", "[16,32]"},
      {"0.0.0.2", q("I32"), "[]", "[32,36]"},
      {"0.0.1", q("I32"), "[4]", "[36,52]"},
  };
  l.meta = {{"1.0", q("CacheList")}, {"2.0", q("")}, {"2.1.0", q("0.0.0.2")}, {"2.1.1", q("scalar")},
            {"2.2.0", q("0.0.1")}, {"2.2.1", q("string")}};
  l.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8}) + raw<int32_t>({2}) + raw<int32_t>({'E', 'v', 'i', 'l'});
  CHECK_LOAD_FAILS(l.bytes(), "a cache class among");
  l.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8}) + raw<int32_t>({2}) + raw<int32_t>({'K', 'V', 'C', 'a'});
  l.tensors[3].shape = "[4]";
  CHECK_LOAD_FAILS(l.bytes(), "a cache class among");
}

TEST(a_cache_list_member_class_string_loads) {
  // The valid form of the CacheList file above.
  Forged l;
  l.tensors = {
      {"0.0.0.0", q("F32"), "[1,1,2,2]", "[0,16]"},
      {"0.0.0.1", q("F32"), "[1,1,2,2]", "[16,32]"},
      {"0.0.0.2", q("I32"), "[]", "[32,36]"},
      {"0.0.1", q("I32"), "[7]", "[36,64]"},
  };
  l.meta = {{"1.0", q("CacheList")}, {"2.0", q("")}, {"2.1.0", q("0.0.0.2")}, {"2.1.1", q("scalar")},
            {"2.2.0", q("0.0.1")}, {"2.2.1", q("string")}};
  l.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8}) + raw<int32_t>({2}) +
      raw<int32_t>({'K', 'V', 'C', 'a', 'c', 'h', 'e'});
  auto loaded = load_bytes(l.bytes());
  auto* list = dynamic_cast<CacheList*>(loaded.caches.at(0).get());
  CHECK(list && list->count() == 1 && std::string((*list)[0].name()) == "KVCache");
}

TEST(non_dense_indices) {
  auto f = valid_kv(); // arrays 0.0, 0.2, 0.3
  f.tensor("0.2").name = "0.3";
  f.tensor("0.1").name = "0.2";
  f.set_meta("2.1.0", q("0.3"));
  CHECK_LOAD_FAILS(f.bytes(), "dense list indices");
  auto g = valid_kv(); // layers 0 and 2
  for (auto& t : g.tensors) t.name[0] = '2';
  g.set_meta("1.1", q("KVCache"));
  g.set_meta("1.2", q("KVCache"));
  g.tensors.push_back({"0.0", q("F32"), "[1,1,2,2]", "[0,16]"});
  g.tensors.push_back({"0.1", q("F32"), "[1,1,2,2]", "[16,32]"});
  g.tensors.push_back({"0.2", q("I32"), "[]", "[32,36]"});
  g.set_meta("2.1.0", q("2.2"));
  g.set_meta("2.2.0", q("0.2"));
  g.set_meta("2.2.1", q("scalar"));
  CHECK_LOAD_FAILS(g.bytes(), "dense list indices");
  auto h = valid_kv(); // class names 1.0 and 1.2
  h.set_meta("1.2", q("KVCache"));
  CHECK_LOAD_FAILS(h.bytes(), "dense list indices");
  auto i = valid_kv(); // scalar tags 2.0 and 2.2
  i.erase_meta("2.1.0");
  i.erase_meta("2.1.1");
  i.set_meta("2.2.0", q("0.2"));
  i.set_meta("2.2.1", q("scalar"));
  CHECK_LOAD_FAILS(i.bytes(), "dense list indices");
  auto j = valid_kv(); // index 1 missing below a CacheList-like path
  j.tensor("0.1").name = "0.1.1";
  CHECK_LOAD_FAILS(j.bytes(), "dense list indices");
}

TEST(too_deep_paths) {
  std::string deep = "0";
  for (int i = 0; i < kMaxDepth; ++i) deep += ".0"; // kMaxDepth + 1 parts
  auto f = valid_kv();
  f.tensor("0.0").name = deep;
  CHECK_LOAD_FAILS(f.bytes(), "deep");
  auto g = valid_kv();
  g.erase_meta("1.0");
  g.set_meta("1." + deep, q("KVCache"));
  CHECK_LOAD_FAILS(g.bytes(), "deep");
  std::string very = "0";
  for (int i = 0; i < 5000; ++i) very += ".0";
  auto h = valid_kv();
  h.tensor("0.0").name = very;
  CHECK_LOAD_FAILS(h.bytes(), "deep");
}

TEST(non_numeric_paths) {
  for (std::string p : {"0.x", "0..1", "a", "0.-1", "0.+1", "0.1234567890", "", ".0", "0.", " 0.0", "0.0 ", "0.1e1", "0.٣"}) {
    auto f = valid_kv();
    f.tensors.push_back({p, q("F32"), "[0]", "[36,36]"});
    expect_value_error(__FILE__, __LINE__, f.bytes(), "numeric dotted paths", true, "'" + p + "'");
  }
}

TEST(a_path_both_leaf_and_list) {
  auto f = valid_kv();
  f.tensors.push_back({"0.0.0", q("F32"), "[0]", "[36,36]"});
  // Which of the two is met first depends on the order the paths are read.
  CHECK_LOAD_FAILS(f.bytes(), "path");
  auto path = kvtest::temp_file("leaf.safetensors");
  kvtest::write_bytes(path, f.bytes());
  try {
    load_prompt_cache(path);
  } catch (const ValueError& e) {
    std::string w = e.what();
    CHECK(w.find("not also a leaf") != std::string::npos || w.find("each path once") != std::string::npos);
  }
}

TEST(bad_scalar_tags) {
  for (std::string tag : {"int", "", "Scalar", "none ", "array"}) {
    auto f = valid_kv();
    f.set_meta("2.1.1", q(tag));
    expect_value_error(__FILE__, __LINE__, f.bytes(), "a scalar tag among", true, tag);
  }
  auto missing = valid_kv();
  missing.set_meta("2.1.0", q("0.9"));
  CHECK_LOAD_FAILS(missing.bytes(), "a scalar tag naming a stored array");
  auto not_pair = valid_kv();
  not_pair.erase_meta("2.1.0");
  not_pair.erase_meta("2.1.1");
  not_pair.set_meta("2.1", q("0.2"));
  CHECK_LOAD_FAILS(not_pair.bytes(), "(path, tag) scalar entries");
  auto triple = valid_kv();
  triple.set_meta("2.1.2", q("x"));
  CHECK_LOAD_FAILS(triple.bytes(), "(path, tag) scalar entries");
  auto nested = valid_kv();
  nested.erase_meta("2.1.1");
  nested.set_meta("2.1.1.0", q("scalar"));
  CHECK_LOAD_FAILS(nested.bytes(), "(path, tag) scalar entries");
  auto lead = valid_kv();
  lead.erase_meta("2.0");
  lead.set_meta("2.0.0", q(""));
  CHECK_LOAD_FAILS(lead.bytes(), "load_prompt_cache");
  auto outside = valid_kv();
  outside.set_meta("3.0", q("x"));
  CHECK_LOAD_FAILS(outside.bytes(), "metadata keys under 0., 1. and 2.");
  auto bare = valid_kv();
  bare.set_meta("0", q("x"));
  CHECK_LOAD_FAILS(bare.bytes(), "metadata keys under 0., 1. and 2.");
}

TEST(scalar_tag_on_an_array_of_several_elements) {
  auto f = valid_kv();
  f.tensor("0.0").shape = "[4]";
  f.tensor("0.2").shape = "[1]";
  f.set_meta("2.1.0", q("0.0"));
  CHECK_LOAD_FAILS(f.bytes(), "one element for the scalar");
}

TEST(string_scalars_with_bad_code_points) {
  auto with_string = [](const std::string& dtype, const std::string& shape, const std::string& bytes) {
    auto f = valid_kv();
    f.tensor("0.2") = {"0.2", q(dtype), shape, "[32," + std::to_string(32 + bytes.size()) + "]"};
    f.set_meta("2.1.1", q("string"));
    f.data = f.data.substr(0, 32) + bytes;
    return f.bytes();
  };
  CHECK_LOAD_FAILS(with_string("I32", "[1]", raw<int32_t>({0x110000})), "code points");
  CHECK_LOAD_FAILS(with_string("I32", "[2]", raw<int32_t>({'a', -1})), "code points");
  CHECK_LOAD_FAILS(with_string("I64", "[1]", raw<int64_t>({1ll << 40})), "code points");
  CHECK_LOAD_FAILS(with_string("U32", "[1]", raw<uint32_t>({0xffffffffu})), "code points");
  CHECK_LOAD_FAILS(with_string("F32", "[1]", raw<float>({65.0f})), "a 1-D integer array");
  CHECK_LOAD_FAILS(with_string("BOOL", "[1]", std::string(1, '\1')), "a 1-D integer array");
  CHECK_LOAD_FAILS(with_string("I32", "[1,1]", raw<int32_t>({65})), "a 1-D integer array");
  CHECK_LOAD_FAILS(with_string("I32", "[]", raw<int32_t>({65})), "a 1-D integer array");
  std::string long_string((kMaxString + 1) * 4, '\0');
  for (size_t i = 0; i < kMaxString + 1; ++i) long_string[4 * i] = 'a';
  CHECK_LOAD_FAILS(with_string("I32", "[" + std::to_string(kMaxString + 1) + "]", long_string), "string");
  // A good string where an int belongs: the state's own check.
  CHECK_LOAD_VALUE_ERROR(with_string("I32", "[1]", raw<int32_t>({'5'})), "offset");
}

TEST(metadata_that_is_not_string_to_string) {
  for (std::string m : {"{\"1.0\": 5}", "{\"1.0\": null}", "{\"1.0\": [\"KVCache\"]}", "{\"1.0\": {\"a\": \"b\"}}",
                        "[]", "\"x\"", "7", "true"}) {
    auto f = valid_kv();
    f.raw_meta = m;
    expect_value_error(__FILE__, __LINE__, f.bytes(), "string-to-string __metadata__", true, m);
  }
}

TEST(states_the_cache_setters_refuse) {
  auto rank3 = valid_kv();
  rank3.tensor("0.0").shape = "[1,2,2]";
  CHECK_LOAD_VALUE_ERROR(rank3.bytes(), "rank 4");
  auto past = valid_kv();
  past.data = past.data.substr(0, 32) + raw<int32_t>({3});
  CHECK_LOAD_VALUE_ERROR(past.bytes(), "offset");
  auto negative = valid_kv();
  negative.data = negative.data.substr(0, 32) + raw<int32_t>({-1});
  CHECK_LOAD_VALUE_ERROR(negative.bytes(), "offset");
  auto huge = valid_kv();
  huge.tensor("0.2") = {"0.2", q("I64"), "[]", "[32,40]"};
  huge.data = huge.data.substr(0, 32) + raw<int64_t>({1ll << 40});
  CHECK_LOAD_VALUE_ERROR(huge.bytes(), "offset");
  auto as_float = valid_kv();
  as_float.tensor("0.2").dtype = q("F32");
  as_float.data = as_float.data.substr(0, 32) + raw<float>({2.0f});
  CHECK_LOAD_VALUE_ERROR(as_float.bytes(), "offset");
  auto as_bool = valid_kv();
  as_bool.tensor("0.2") = {"0.2", q("BOOL"), "[]", "[32,33]"};
  as_bool.data = as_bool.data.substr(0, 32) + std::string(1, '\1');
  CHECK_LOAD_VALUE_ERROR(as_bool.bytes(), "offset");
  auto none_keys = valid_kv(); // keys None, values set
  none_keys.tensor("0.0") = {"0.0", q("F32"), "[0]", "[0,0]"};
  none_keys.set_meta("2.2.0", q("0.0"));
  none_keys.set_meta("2.2.1", q("none"));
  CHECK_LOAD_VALUE_ERROR(none_keys.bytes(), "KVCache");
}

TEST(states_of_the_wrong_arity) {
  auto two = valid_kv(); // (keys, values) without the offset
  two.erase_tensor("0.2");
  two.erase_meta("2.1.0");
  two.erase_meta("2.1.1");
  CHECK_LOAD_VALUE_ERROR(two.bytes(), "KVCache");
  auto four = valid_kv();
  four.tensors.push_back({"0.3", q("F32"), "[0]", "[36,36]"});
  CHECK_LOAD_VALUE_ERROR(four.bytes(), "KVCache");
  auto rot = valid_kv(); // a KVCache state named RotatingKVCache
  rot.set_meta("1.0", q("RotatingKVCache"));
  CHECK_LOAD_VALUE_ERROR(rot.bytes(), "RotatingKVCache");
  auto leaf = valid_kv(); // a layer whose state is an array, not a list
  leaf.tensors = {{"0", q("F32"), "[1,1,2,2]", "[0,16]"}};
  leaf.meta = {{"1.0", q("KVCache")}, {"2.0", q("")}};
  leaf.data = leaf.data.substr(0, 16);
  CHECK_LOAD_VALUE_ERROR(leaf.bytes(), "KVCache");
}

TEST(one_state_per_class_name) {
  auto extra_name = valid_kv();
  extra_name.set_meta("1.1", q("KVCache"));
  CHECK_LOAD_FAILS(extra_name.bytes(), "one state per class name");
  auto no_name = valid_kv();
  no_name.erase_meta("1.0");
  CHECK_LOAD_FAILS(no_name.bytes(), "one state per class name");
}

TEST(forged_meta_state_layout) {
  auto word = valid_old_rotating();
  word.set_meta("0.0.2", q("x"));
  CHECK_LOAD_FAILS(word.bytes(), "integer meta_state values");
  auto spaced = valid_old_rotating();
  spaced.set_meta("0.0.2", q("99999999999999999999"));
  CHECK_LOAD_FAILS(spaced.bytes(), "integer meta_state values");
  auto three = valid_old_rotating();
  three.erase_meta("0.0.3");
  CHECK_LOAD_FAILS(three.bytes(), "4 meta_state values");
  auto bad_idx = valid_old_rotating(); // a cursor past the buffer: the setter's check
  bad_idx.set_meta("0.0.3", q("7"));
  CHECK_LOAD_VALUE_ERROR(bad_idx.bytes(), "_idx");
  auto list = valid_old_rotating(); // CacheList meta_state not ([names], [metas])
  list.set_meta("2.0", q("CacheList"));
  CHECK_LOAD_FAILS(list.bytes(), "CacheList meta_state");
  auto batch = valid_old_rotating();
  batch.set_meta("2.0", q("BatchRotatingKVCache"));
  CHECK_LOAD_FAILS(batch.bytes(), "for BatchRotatingKVCache");
  auto outside = valid_old_rotating();
  outside.set_meta("3.x", q("y"));
  CHECK_LOAD_FAILS(outside.bytes(), "metadata keys under 0., 1. and 2.");
  // A rotated flag that is neither True nor False.
  Forged br;
  br.tensors = {
      {"0.0", q("F32"), "[1,1,2,2]", "[0,16]"},
      {"0.1", q("F32"), "[1,1,2,2]", "[16,32]"},
      {"0.2", q("I32"), "[1]", "[32,36]"},
      {"0.3", q("I32"), "[1]", "[36,40]"},
  };
  br.meta = {{"0.0.0", q("4")}, {"0.0.1", q("2")}, {"0.0.2", q("2")}, {"0.0.3", q("maybe")},
             {"2.0", q("BatchRotatingKVCache")}};
  br.data = raw<float>({1, 2, 3, 4, 5, 6, 7, 8}) + raw<int32_t>({2, 0});
  CHECK_LOAD_FAILS(br.bytes(), "rotated as True or False");
  br.set_meta("0.0.3", q("False"));
  auto ok = load_bytes(br.bytes());
  auto* b = dynamic_cast<BatchRotatingKVCache*>(ok.caches.at(0).get());
  CHECK(b && b->max_size() == 4 && !b->rotated() && b->idx() == 2);
}

TEST(duplicate_json_keys_do_not_crash) {
  // Either reading is defensible (mlx and Python keep the last); any
  // failure must still be a ValueError.
  auto f = valid_kv();
  f.tensors.push_back({"0.0", q("F32"), "[1,1,2,2]", "[16,32]"});
  auto path = kvtest::temp_file("dup.safetensors");
  kvtest::write_bytes(path, f.bytes());
  try {
    auto loaded = load_prompt_cache(path);
    for (auto& c : loaded.caches) {
      for (auto& a : c->state()) {
        if (a) mx::eval(*a);
      }
    }
  } catch (const ValueError&) {
  } catch (const std::exception& e) {
    kvtest::fail(__FILE__, __LINE__, std::string("not a ValueError: ") + e.what());
  }
}

// Helpers over a model's caches ------------------------------------------

namespace {

// A cache whose trim always fails, to show trim_prompt_cache is all or
// nothing.
class FailingTrimCache : public KVCache {
 public:
  int trim(int) override {
    throw RuntimeError("FailingTrimCache.trim", "this test cache never trims");
  }
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<FailingTrimCache>(*this);
  }
};

PromptCache fed_layers(int n) {
  PromptCache caches;
  for (int i = 0; i < n; ++i) {
    auto c = std::make_shared<KVCache>();
    kvtest::feed(*c, {5}, 1, 1, 4, mx::float32, 500 + i);
    caches.push_back(c);
  }
  return caches;
}

} // namespace

TEST(make_prompt_cache_builds_kv_or_rotating_layers) {
  auto plain = make_prompt_cache(3);
  CHECK_EQ(plain.size(), size_t(3));
  for (auto& c : plain) CHECK(dynamic_cast<KVCache*>(c.get()) != nullptr);
  CHECK(plain[0] != plain[1]);
  auto rot = make_prompt_cache(2, 16);
  CHECK_EQ(rot.size(), size_t(2));
  for (auto& c : rot) {
    auto* r = dynamic_cast<RotatingKVCache*>(c.get());
    CHECK(r && r->max_size() == 16 && r->keep() == 4);
  }
  CHECK(make_prompt_cache(0).empty());
  CHECK_THROWS(ValueError, "num_layers", make_prompt_cache(-1));
  CHECK_THROWS(ValueError, "max_kv_size", make_prompt_cache(2, 0));
  CHECK_THROWS(ValueError, "max_kv_size", make_prompt_cache(2, -5));
}

TEST(trim_prompt_cache_trims_every_layer) {
  auto caches = fed_layers(3);
  CHECK(can_trim_prompt_cache(caches));
  CHECK_EQ(trim_prompt_cache(caches, 2), 2);
  for (auto& c : caches) CHECK_EQ(c->size(), 3);
  CHECK_EQ(trim_prompt_cache(caches, 10), 3);
  for (auto& c : caches) CHECK_EQ(c->size(), 0);
  PromptCache none;
  CHECK(can_trim_prompt_cache(none));
  CHECK_EQ(trim_prompt_cache(none, 1), 0);
}

TEST(trim_prompt_cache_acts_on_the_callers_cache_objects) {
  // mlx-lm trims each layer's cache in place; code holding a layer's cache
  // (a model's attention layer, say) sees the trim.
  auto caches = fed_layers(2);
  auto held = caches[0];
  CHECK_EQ(trim_prompt_cache(caches, 2), 2);
  CHECK_EQ(held->size(), 3);
  CHECK(caches[0] == held);
}

TEST(trim_prompt_cache_untrimmable_changes_nothing) {
  auto caches = fed_layers(1);
  auto rot = std::make_shared<RotatingKVCache>(4);
  kvtest::feed(*rot, {1, 1, 1, 1, 1}, 1, 1, 4, mx::float32, 600);
  caches.push_back(rot);
  auto before = kvtest::states_of(caches);
  CHECK(!can_trim_prompt_cache(caches));
  CHECK_EQ(trim_prompt_cache(caches, 2), 0);
  std::string why;
  CHECK(same_state(before, kvtest::states_of(caches), &why));
}

TEST(trim_prompt_cache_failure_leaves_every_layer_as_it_was) {
  auto caches = fed_layers(2);
  auto failing = std::make_shared<FailingTrimCache>();
  kvtest::feed(*failing, {4}, 1, 1, 4, mx::float32, 700);
  caches.insert(caches.begin() + 1, failing);
  auto before = kvtest::states_of(caches);
  CHECK_THROWS(RuntimeError, "never trims", trim_prompt_cache(caches, 2));
  std::string why;
  CHECK(same_state(before, kvtest::states_of(caches), &why));
  CHECK_EQ(caches[0]->size(), 5);
  CHECK_EQ(caches[2]->size(), 5);

  auto fresh = fed_layers(3);
  auto snapshot = kvtest::states_of(fresh);
  CHECK_THROWS(ValueError, "n in [0", trim_prompt_cache(fresh, -1));
  CHECK(same_state(snapshot, kvtest::states_of(fresh), &why));
}

TEST(failed_load_leaves_existing_file_and_caches_alone) {
  auto caches = fed_layers(2);
  auto before = kvtest::states_of(caches);
  auto path = kvtest::temp_file("keep.safetensors");
  save_prompt_cache(path, caches);
  auto bytes = kvtest::read_bytes(path);
  CHECK_THROWS(ValueError, "a cache for every layer", save_prompt_cache(path, {caches[0], nullptr}));
  CHECK(kvtest::read_bytes(path) == bytes);
  std::string why;
  CHECK(same_state(before, kvtest::states_of(caches), &why));
  CHECK(same_state(before, kvtest::states_of(load_prompt_cache(path).caches), &why));
}
