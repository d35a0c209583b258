// The state tree and the class table: each cache's mlx-lm 0.32 state, out
// and back in.
#include "kvcore/state.h"

#include <algorithm>
#include <charconv>
#include <climits>
#include <functional>
#include <map>
#include <typeinfo>

#include "kvcore/arrays.h"
#include "kvcore/batch.h"
#include "kvcore/buffer.h"
#include "kvcore/cache_list.h"
#include "kvcore/chunked.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/quantized.h"
#include "kvcore/quantized_batch.h"
#include "kvcore/quantized_rotating.h"
#include "kvcore/rotating.h"

namespace kvcore {

StateValue::StateValue(const OptionalArray& a) {
  if (a) {
    v_ = *a;
  }
}

const char* StateValue::kind() const {
  static const char* names[] = {"None", "array", "bool", "int", "float", "str", "list"};
  return names[v_.index()];
}

std::string StateValue::repr() const {
  if (is_bool()) {
    return as_bool() ? "True" : "False";
  }
  if (is_int()) {
    return std::to_string(as_int());
  }
  if (is_float()) {
    char buf[64];
    auto [end, ec] = std::to_chars(buf, buf + sizeof buf, as_float());
    std::string s(buf, ec == std::errc() ? end : buf);
    if (s.find_first_of(".ein") == std::string::npos) {
      s += ".0";
    }
    return s;
  }
  if (is_string()) {
    return ("'" + as_string() + "'").substr(0, 80);
  }
  if (is_array()) {
    return "array " + shape_str(as_array().shape()) + " " + dtype_str(as_array().dtype());
  }
  if (is_list()) {
    return "a list of " + std::to_string(as_list().size());
  }
  return "None";
}

namespace {

[[noreturn]] void wrong_kind(const char* ctx, const std::string& expected, const StateValue& v) {
  throw ValueError(ctx, expected, v.repr());
}

} // namespace

const mx::array& StateValue::array(const char* ctx, const char* what) const {
  if (!is_array()) {
    wrong_kind(ctx, std::string(what) + " as an array", *this);
  }
  return as_array();
}

OptionalArray StateValue::optional_array(const char* ctx, const char* what) const {
  if (is_none()) {
    return std::nullopt;
  }
  if (!is_array()) {
    wrong_kind(ctx, std::string(what) + " as an mlx array or None", *this);
  }
  return as_array();
}

int StateValue::integer(const char* ctx, const char* what) const {
  if (!is_int()) {
    wrong_kind(ctx, std::string(what) + " as an int", *this);
  }
  long long v = as_int();
  if (v < INT_MIN || v > INT_MAX) {
    throw ValueError(ctx, std::string(what) + " within 32 bits", std::to_string(v));
  }
  return static_cast<int>(v);
}

bool StateValue::boolean(const char* ctx, const char* what) const {
  if (is_bool()) {
    return as_bool();
  }
  if (is_int()) {
    return as_int() != 0;
  }
  wrong_kind(ctx, std::string(what) + " as a bool", *this);
}

const std::string& StateValue::string(const char* ctx, const char* what) const {
  if (!is_string()) {
    wrong_kind(ctx, std::string(what) + " as a str", *this);
  }
  return as_string();
}

const StateValue::List& StateValue::list(const char* ctx, const char* what) const {
  if (!is_list()) {
    wrong_kind(ctx, std::string(what) + " as a list", *this);
  }
  return as_list();
}

const StateValue::List& StateValue::list(const char* ctx, const char* what, size_t n) const {
  const List& l = list(ctx, what);
  if (l.size() != n) {
    throw ValueError(
        ctx,
        "a tuple of " + std::to_string(n) + " items",
        std::to_string(l.size()) + " items");
  }
  return l;
}

namespace {

// One entry of the class table: how a class's state is read off a cache
// and how a cache is built from one.
struct ClassEntry {
  std::function<StateValue(const Cache&)> encode;
  std::function<std::unique_ptr<Cache>(const StateValue&)> decode;
};

StateValue quantized_state(const OptionalQuantized& q) {
  if (!q) {
    return {};
  }
  auto& [w, s, b] = *q;
  return StateValue::List{w, s, b};
}

OptionalQuantized quantized_from(const char* ctx, const char* what, const StateValue& v) {
  if (v.is_none()) {
    return std::nullopt;
  }
  const auto& l = v.list(ctx, what, 3);
  return QuantizedArrays{l[0].array(ctx, what), l[1].array(ctx, what), l[2].array(ctx, what)};
}

/// An int when keys and values agree, else [keys, values].
StateValue spec_state(int keys, int values) {
  if (keys == values) {
    return keys;
  }
  return StateValue::List{keys, values};
}

std::pair<int, int> spec_from(const char* ctx, const char* what, const StateValue& v) {
  if (v.is_list()) {
    const auto& l = v.list(ctx, what, 2);
    return {l[0].integer(ctx, what), l[1].integer(ctx, what)};
  }
  int i = v.integer(ctx, what);
  return {i, i};
}

// The cache as the class its name() says (a C++ subclass that renames
// itself without being one is refused, not misread).
template <class T>
const T& as(const Cache& c) {
  auto* p = dynamic_cast<const T*>(&c);
  if (p == nullptr) {
    throw ValueError("cache_state", std::string("a ") + c.name() + " object", typeid(c).name());
  }
  return *p;
}

const std::map<std::string, ClassEntry>& table() {
  static const std::map<std::string, ClassEntry> t = {
      {"KVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<KVCache>(c);
          return StateValue::List{k.keys(), k.values(), k.offset()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "KVCache.state";
          const auto& l = s.list(ctx, "state", 3);
          auto c = std::make_unique<KVCache>();
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"),
                 l[2].integer(ctx, "offset"));
          return c;
        }}},
      {"ConcatenateKVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<ConcatenateKVCache>(c);
          return StateValue::List{k.keys(), k.values()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "ConcatenateKVCache.state";
          const auto& l = s.list(ctx, "state", 2);
          auto c = std::make_unique<ConcatenateKVCache>();
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"));
          return c;
        }}},
      {"RotatingKVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<RotatingKVCache>(c);
          return StateValue::List{k.keys(), k.values(), k.offset(), k.keep(), k.max_size(), k.idx()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "RotatingKVCache.state";
          const auto& l = s.list(ctx, "state", 6);
          auto c = std::make_unique<RotatingKVCache>(1, 0);
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"),
                 l[2].integer(ctx, "offset"), l[3].integer(ctx, "keep"),
                 l[4].integer(ctx, "max_size"), l[5].integer(ctx, "_idx"));
          return c;
        }}},
      {"QuantizedKVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<QuantizedKVCache>(c);
          StateValue::List out{quantized_state(k.keys()), quantized_state(k.values()),
                               k.offset(),
                               spec_state(k.key_spec().group_size, k.value_spec().group_size),
                               spec_state(k.key_spec().bits, k.value_spec().bits)};
          if (k.scheme() != QuantScheme::affine) {
            // A kvcore scheme: its name, window and float residuals.
            out.push_back(std::string(scheme_name(k.scheme())));
            out.push_back(k.window());
            out.push_back(StateValue(k.residual()));
            out.push_back(StateValue(k.value_residual()));
          }
          if (k.sink() > 0) {
            // With a sink: its size and float keys and values.
            out.push_back(k.sink());
            out.push_back(StateValue(k.sink_keys()));
            out.push_back(StateValue(k.sink_values()));
          }
          return out;
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "QuantizedKVCache.state";
          const size_t n = s.is_list() ? s.as_list().size() : 0;
          const bool scheme = n == 9 || n == 12, sink = n == 12;
          const auto& l = s.list(ctx, "state", sink ? 12 : (scheme ? 9 : 5));
          auto [kg, vg] = spec_from(ctx, "group_size", l[3]);
          auto [kb, vb] = spec_from(ctx, "bits", l[4]);
          auto c = std::make_unique<QuantizedKVCache>(64, 8);
          if (scheme) {
            if (!l[5].is_string()) {
              throw ValueError(ctx, "a scheme name as a str", l[5].repr());
            }
            c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                   l[2].integer(ctx, "offset"), {kg, kb}, {vg, vb},
                   parse_scheme(ctx, l[5].as_string()), l[7].optional_array(ctx, "residual"),
                   l[8].optional_array(ctx, "value residual"), l[6].integer(ctx, "window"),
                   sink ? l[9].integer(ctx, "sink") : 0,
                   sink ? l[10].optional_array(ctx, "sink keys") : std::nullopt,
                   sink ? l[11].optional_array(ctx, "sink values") : std::nullopt);
            return c;
          }
          c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                 l[2].integer(ctx, "offset"), {kg, kb}, {vg, vb});
          return c;
        }}},
      {"QuantizedRotatingKVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<QuantizedRotatingKVCache>(c);
          StateValue::List out{quantized_state(k.keys()), quantized_state(k.values()),
                               k.offset(), k.keep(), k.max_size(), k.idx(),
                               spec_state(k.key_spec().group_size, k.value_spec().group_size),
                               spec_state(k.key_spec().bits, k.value_spec().bits)};
          if (k.scheme() != QuantScheme::affine) {
            // As QuantizedKVCache's: the scheme's name, window and residuals
            // (_idx counts the tokens held), and with a sink its arrays.
            const auto& h = k.held();
            out.push_back(std::string(scheme_name(h.scheme())));
            out.push_back(h.window());
            out.push_back(StateValue(h.residual()));
            out.push_back(StateValue(h.value_residual()));
            if (h.sink() > 0) {
              out.push_back(h.sink());
              out.push_back(StateValue(h.sink_keys()));
              out.push_back(StateValue(h.sink_values()));
            }
          }
          return out;
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "QuantizedRotatingKVCache.state";
          const size_t n = s.is_list() ? s.as_list().size() : 0;
          const bool scheme = n == 12 || n == 15, sink = n == 15;
          const auto& l = s.list(ctx, "state", sink ? 15 : (scheme ? 12 : 8));
          auto [kg, vg] = spec_from(ctx, "group_size", l[6]);
          auto [kb, vb] = spec_from(ctx, "bits", l[7]);
          auto c = std::make_unique<QuantizedRotatingKVCache>(1, 0);
          if (scheme) {
            if (!l[8].is_string()) {
              throw ValueError(ctx, "a scheme name as a str", l[8].repr());
            }
            QuantizedKVCache held(64, 8);
            held.set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                     l[5].integer(ctx, "_idx"), {kg, kb}, {vg, vb}, parse_scheme(ctx, l[8].as_string()),
                     l[10].optional_array(ctx, "residual"), l[11].optional_array(ctx, "value residual"),
                     l[9].integer(ctx, "window"), sink ? l[12].integer(ctx, "sink") : 0,
                     sink ? l[13].optional_array(ctx, "sink keys") : std::nullopt,
                     sink ? l[14].optional_array(ctx, "sink values") : std::nullopt);
            c->set_channel(std::move(held), l[2].integer(ctx, "offset"), l[3].integer(ctx, "keep"),
                           l[4].integer(ctx, "max_size"));
            return c;
          }
          c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                 l[2].integer(ctx, "offset"), l[3].integer(ctx, "keep"),
                 l[4].integer(ctx, "max_size"), l[5].integer(ctx, "_idx"), {kg, kb}, {vg, vb});
          return c;
        }}},
      {"QuantizedBatchKVCache",
       {[](const Cache& c) -> StateValue {
          auto& b = as<QuantizedBatchKVCache>(c);
          StateValue::List out{quantized_state(b.keys()), quantized_state(b.values()),
                               b.offset(), b.left_padding(), b.idx(),
                               spec_state(b.key_spec().group_size, b.value_spec().group_size),
                               spec_state(b.key_spec().bits, b.value_spec().bits)};
          if (b.scheme() != QuantScheme::affine) {
            // As QuantizedKVCache's: the scheme's name, window and residuals.
            out.push_back(std::string(scheme_name(b.scheme())));
            out.push_back(b.window());
            out.push_back(StateValue(b.residual()));
            out.push_back(StateValue(b.value_residual()));
          }
          if (b.sink() > 0) {
            out.push_back(b.sink());
            out.push_back(StateValue(b.sink_keys()));
            out.push_back(StateValue(b.sink_values()));
          }
          return out;
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "QuantizedBatchKVCache.state";
          const size_t n = s.is_list() ? s.as_list().size() : 0;
          const bool scheme = n == 11 || n == 14, sink = n == 14;
          const auto& l = s.list(ctx, "state", sink ? 14 : (scheme ? 11 : 7));
          auto [kg, vg] = spec_from(ctx, "group_size", l[5]);
          auto [kb, vb] = spec_from(ctx, "bits", l[6]);
          auto c = std::make_unique<QuantizedBatchKVCache>(std::vector<int>{});
          if (scheme) {
            if (!l[7].is_string() || parse_scheme(ctx, l[7].as_string()) != QuantScheme::rotated_channel) {
              throw ValueError(ctx, "the scheme name 'rotated-channel'", l[7].repr());
            }
            c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                   l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"),
                   l[4].integer(ctx, "_idx"), l[9].optional_array(ctx, "residual"),
                   l[10].optional_array(ctx, "value residual"), {kg, kb}, {vg, vb},
                   l[8].integer(ctx, "window"), sink ? l[11].integer(ctx, "sink") : 0,
                   sink ? l[12].optional_array(ctx, "sink keys") : std::nullopt,
                   sink ? l[13].optional_array(ctx, "sink values") : std::nullopt);
            return c;
          }
          c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                 l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"),
                 l[4].integer(ctx, "_idx"), {kg, kb}, {vg, vb});
          return c;
        }}},
      {"QuantizedBatchRotatingKVCache",
       {[](const Cache& c) -> StateValue {
          auto& b = as<QuantizedBatchRotatingKVCache>(c);
          StateValue::List out{quantized_state(b.keys()), quantized_state(b.values()),
                               b.offset(), b.left_padding(), b.max_size(),
                               b.offset_in_ring(), b.idx(), b.rotated(),
                               spec_state(b.key_spec().group_size, b.value_spec().group_size),
                               spec_state(b.key_spec().bits, b.value_spec().bits)};
          if (b.scheme() != QuantScheme::affine) {
            // As QuantizedBatchKVCache's: the scheme's name, window and residuals.
            out.push_back(std::string(scheme_name(b.scheme())));
            out.push_back(b.window());
            out.push_back(StateValue(b.residual()));
            out.push_back(StateValue(b.value_residual()));
          }
          return out;
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
          const bool scheme = s.is_list() && s.as_list().size() == 14;
          const auto& l = s.list(ctx, "state", scheme ? 14 : 10);
          auto [kg, vg] = spec_from(ctx, "group_size", l[8]);
          auto [kb, vb] = spec_from(ctx, "bits", l[9]);
          auto c = std::make_unique<QuantizedBatchRotatingKVCache>(1, std::vector<int>{});
          if (scheme) {
            if (!l[10].is_string() || parse_scheme(ctx, l[10].as_string()) != QuantScheme::rotated_channel ||
                l[7].boolean(ctx, "rotated")) {
              throw ValueError(ctx, "the scheme name 'rotated-channel' and rotated False",
                               l[10].repr() + ", " + l[7].repr());
            }
            ChannelBatch held(std::vector<int>{}, {kg, kb}, {vg, vb}, 0);
            try {
              held.set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                       l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"), l[6].integer(ctx, "_idx"),
                       l[12].optional_array(ctx, "residual"), l[13].optional_array(ctx, "value residual"),
                       {kg, kb}, {vg, vb}, l[11].integer(ctx, "window"));
            } catch (const CacheError& e) {
              rethrow_from(e, ctx);
            }
            c->set_channel(std::move(held), l[4].integer(ctx, "max_size"), l[5].integer(ctx, "_offset"));
            return c;
          }
          c->set(quantized_from(ctx, "keys", l[0]), quantized_from(ctx, "values", l[1]),
                 l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"),
                 l[4].integer(ctx, "max_size"), l[5].integer(ctx, "_offset"),
                 l[6].integer(ctx, "_idx"), l[7].boolean(ctx, "rotated"), {kg, kb}, {vg, vb});
          return c;
        }}},
      {"ChunkedKVCache",
       {[](const Cache& c) -> StateValue {
          auto& k = as<ChunkedKVCache>(c);
          return StateValue::List{k.keys(), k.values(), k.offset(), k.chunk_size(),
                                  k.start_position()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "ChunkedKVCache.state";
          const auto& l = s.list(ctx, "state", 5);
          auto c = std::make_unique<ChunkedKVCache>(1);
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"),
                 l[2].integer(ctx, "offset"), l[3].integer(ctx, "chunk_size"),
                 l[4].integer(ctx, "start_position"));
          return c;
        }}},
      {"ArraysCache",
       {[](const Cache& c) -> StateValue {
          auto& a = as<ArraysCache>(c);
          StateValue::List slots(a.cache().begin(), a.cache().end());
          return StateValue::List{std::move(slots), a.left_padding(), a.lengths()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "ArraysCache.state";
          const auto& l = s.list(ctx, "state", 3);
          std::vector<OptionalArray> arrays;
          for (const auto& slot : l[0].list(ctx, "the slots")) {
            arrays.push_back(slot.optional_array(ctx, "a slot"));
          }
          arrays.push_back(l[1].optional_array(ctx, "left_padding"));
          arrays.push_back(l[2].optional_array(ctx, "lengths"));
          auto c = std::make_unique<ArraysCache>(0);
          c->restore(arrays, {});
          return c;
        }}},
      {"CacheList",
       {[](const Cache& c) -> StateValue {
          StateValue::List items;
          for (const auto& m : as<CacheList>(c).caches()) {
            items.push_back(StateValue::List{cache_state(*m), m->name()});
          }
          return items;
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "CacheList.state";
          std::vector<std::shared_ptr<Cache>> members;
          for (const auto& item : s.list(ctx, "state")) {
            const auto& pair = item.list(ctx, "a (state, class name) pair", 2);
            members.push_back(cache_from_state(pair[1].string(ctx, "the class name"), pair[0]));
          }
          return std::make_unique<CacheList>(std::move(members));
        }}},
      {"BatchKVCache",
       {[](const Cache& c) -> StateValue {
          auto& b = as<BatchKVCache>(c);
          return StateValue::List{b.keys(), b.values(), b.offset(), b.left_padding(), b.idx()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "BatchKVCache.state";
          const auto& l = s.list(ctx, "state", 5);
          auto c = std::make_unique<BatchKVCache>(std::vector<int>{});
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"),
                 l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"),
                 l[4].integer(ctx, "_idx"));
          return c;
        }}},
      {"BatchRotatingKVCache",
       {[](const Cache& c) -> StateValue {
          auto& b = as<BatchRotatingKVCache>(c);
          return StateValue::List{b.keys(), b.values(), b.offset(), b.left_padding(),
                                  b.max_size(), b.offset_in_ring(), b.idx(), b.rotated()};
        },
        [](const StateValue& s) -> std::unique_ptr<Cache> {
          constexpr const char* ctx = "BatchRotatingKVCache.state";
          const auto& l = s.list(ctx, "state", 8);
          auto c = std::make_unique<BatchRotatingKVCache>(1, std::vector<int>{});
          c->set(l[0].optional_array(ctx, "keys"), l[1].optional_array(ctx, "values"),
                 l[2].array(ctx, "offset"), l[3].array(ctx, "left_padding"),
                 l[4].integer(ctx, "max_size"), l[5].integer(ctx, "_offset"),
                 l[6].integer(ctx, "_idx"), l[7].boolean(ctx, "rotated"));
          return c;
        }}},
  };
  return t;
}

const ClassEntry& entry(const std::string& name, const char* ctx) {
  auto it = table().find(name);
  if (it == table().end()) {
    std::string known;
    for (const auto& n : cache_class_names()) {
      known += (known.empty() ? "" : ", ") + n;
    }
    throw ValueError(ctx, "a cache class among " + known, "'" + name.substr(0, 78) + "'");
  }
  return it->second;
}

} // namespace

StateValue cache_state(const Cache& cache) {
  return entry(cache.name(), "cache_state").encode(cache);
}

std::unique_ptr<Cache> cache_from_state(const std::string& name, const StateValue& state) {
  return entry(name, "load_prompt_cache").decode(state);
}

const std::vector<std::string>& cache_class_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& [k, _] : table()) {
      n.push_back(k);
    }
    return n; // std::map keeps them sorted
  }();
  return names;
}

} // namespace kvcore
