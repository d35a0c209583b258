// Prompt-cache files (see files.h for the layouts and what is checked).
#include "kvcore/files.h"

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <unordered_map>

#include <mlx/io.h>
#include <mlx/io/load.h>
#include <mlx/transforms.h>
#include <mlx/ops.h>

#include "json.h"
#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

constexpr const char* kLoad = "load_prompt_cache";
constexpr const char* kSave = "save_prompt_cache";

/// Python's repr of a short string, cut as the messages cut it.
std::string quoted(const std::string& s) {
  return ("'" + s + "'").substr(0, 80);
}

std::string py_list(const std::vector<long>& v, size_t max) {
  std::string out = "[";
  for (size_t i = 0; i < v.size() && i < max; ++i) {
    out += (i ? ", " : "") + std::to_string(v[i]);
  }
  return out + "]";
}

size_t item_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"U16", 2}, {"I16", 2},
      {"F16", 2},  {"BF16", 2}, {"U32", 4}, {"I32", 4}, {"F32", 4},
      {"U64", 8},  {"I64", 8}, {"F64", 8}, {"C64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// --- the safetensors header ------------------------------------------------

struct File {
  std::FILE* f;
  explicit File(const std::string& path) : f(std::fopen(path.c_str(), "rb")) {
    if (f == nullptr) {
      throw ValueError(kLoad, "a readable file", quoted(path) + " (" + std::strerror(errno) + ")");
    }
  }
  ~File() {
    std::fclose(f);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
};

/// The length of the JSON header from a file's first 8 bytes, within the
/// file's size and kMaxHeaderBytes.
uint64_t header_length(const unsigned char* head, uint64_t size) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) {
    n = (n << 8) | head[i];
  }
  uint64_t limit = std::min(size - 8, kMaxHeaderBytes);
  if (n > limit) {
    throw ValueError(kLoad, "a header of at most " + std::to_string(limit) + " bytes",
                     "a header length of " + std::to_string(n));
  }
  return n;
}

SafetensorsHeader parse_header(const std::string& raw, uint64_t size);

} // namespace

SafetensorsHeader read_safetensors_header(const std::string& path) {
  File file(path);
  if (std::fseek(file.f, 0, SEEK_END) != 0) {
    throw ValueError(kLoad, "a seekable file", quoted(path));
  }
  long end = std::ftell(file.f);
  if (end < 0) {
    throw ValueError(kLoad, "a seekable file", quoted(path));
  }
  uint64_t size = static_cast<uint64_t>(end);
  std::rewind(file.f);
  unsigned char head[8];
  if (size < 8 || std::fread(head, 1, 8, file.f) != 8) {
    throw ValueError(kLoad, "a safetensors file (8-byte header length)", std::to_string(size) + " bytes");
  }
  const uint64_t n = header_length(head, size);
  std::string raw(n, '\0');
  if (n > 0 && std::fread(raw.data(), 1, n, file.f) != n) {
    throw ValueError(kLoad, "a header of " + std::to_string(n) + " bytes", "a short read");
  }
  return parse_header(raw, size);
}

SafetensorsHeader parse_safetensors_header(const std::string& bytes) {
  const uint64_t size = bytes.size();
  if (size < 8) {
    throw ValueError(kLoad, "a safetensors file (8-byte header length)", std::to_string(size) + " bytes");
  }
  const uint64_t n = header_length(reinterpret_cast<const unsigned char*>(bytes.data()), size);
  return parse_header(bytes.substr(8, n), size);
}

namespace {

SafetensorsHeader parse_header(const std::string& raw, uint64_t size) {
  const uint64_t n = raw.size();
  json::Value doc = json::parse(raw, kLoad);
  if (!doc.is_object()) {
    throw ValueError(kLoad, "a JSON object as header", doc.kind());
  }
  const auto& entries = std::get<json::Object>(doc.v);
  if (entries.size() > kMaxEntries) {
    throw ValueError(kLoad, "at most " + std::to_string(kMaxEntries) + " header entries",
                     std::to_string(entries.size()));
  }
  SafetensorsHeader out;
  out.file_bytes = size;
  uint64_t data_size = size - 8 - n;
  check_memory(kLoad, "the file's arrays", double(data_size));
  for (const auto& [name, entry] : entries) {
    if (name == "__metadata__") {
      if (std::holds_alternative<std::nullptr_t>(entry.v)) {
        continue;
      }
      bool ok = entry.is_object();
      if (ok) {
        for (const auto& [k, v] : std::get<json::Object>(entry.v)) {
          ok = ok && v.is_string();
          if (ok) {
            out.metadata[k] = std::get<std::string>(v.v);
          }
        }
      }
      if (!ok) {
        throw ValueError(kLoad, "string-to-string __metadata__", entry.kind());
      }
      continue;
    }
    if (!entry.is_object()) {
      throw ValueError(kLoad, "a tensor entry for " + quoted(name), entry.kind());
    }
    const auto& obj = std::get<json::Object>(entry.v);
    TensorInfo t;
    t.name = name;
    const json::Value* dtype = json::find(obj, "dtype");
    if (dtype == nullptr || !dtype->is_string() || item_size(std::get<std::string>(dtype->v)) == 0) {
      throw ValueError(kLoad, "a known dtype for " + quoted(name),
                       dtype && dtype->is_string() ? quoted(std::get<std::string>(dtype->v))
                                                   : std::string(dtype ? dtype->kind() : "None"));
    }
    t.dtype = std::get<std::string>(dtype->v);
    const json::Value* shape = json::find(obj, "shape");
    bool shape_ok = shape != nullptr && shape->is_array() &&
        std::get<json::Array>(shape->v).size() <= static_cast<size_t>(kMaxNdim);
    if (shape_ok) {
      for (const auto& d : std::get<json::Array>(shape->v)) {
        shape_ok = shape_ok && d.is_int() && std::get<int64_t>(d.v) >= 0 &&
            std::get<int64_t>(d.v) < (int64_t(1) << 31);
        if (shape_ok) {
          t.shape.push_back(std::get<int64_t>(d.v));
        }
      }
    }
    if (!shape_ok) {
      throw ValueError(kLoad,
                       "a shape of at most " + std::to_string(kMaxNdim) + " dims in [0, 2**31) for " +
                           quoted(name),
                       "a malformed shape");
    }
    const json::Value* offsets = json::find(obj, "data_offsets");
    bool off_ok = offsets != nullptr && offsets->is_array() &&
        std::get<json::Array>(offsets->v).size() == 2;
    if (off_ok) {
      const auto& a = std::get<json::Array>(offsets->v);
      off_ok = a[0].is_int() && a[1].is_int() && std::get<int64_t>(a[0].v) >= 0 &&
          std::get<int64_t>(a[0].v) <= std::get<int64_t>(a[1].v) &&
          static_cast<uint64_t>(std::get<int64_t>(a[1].v)) <= data_size;
      if (off_ok) {
        t.begin = static_cast<uint64_t>(std::get<int64_t>(a[0].v));
        t.end = static_cast<uint64_t>(std::get<int64_t>(a[1].v));
      }
    }
    if (!off_ok) {
      throw ValueError(kLoad,
                       "data offsets inside the " + std::to_string(data_size) + " data bytes for " +
                           quoted(name),
                       "offsets outside them");
    }
    // Dims are below 2**31 and at most 8, so count each step is checked
    // against the data size before it can overflow.
    uint64_t bytes = item_size(t.dtype);
    for (int64_t d : t.shape) {
      bytes = d == 0 ? 0 : (bytes > data_size ? bytes : bytes * static_cast<uint64_t>(d));
    }
    if (bytes != t.end - t.begin) {
      throw ValueError(kLoad, std::to_string(bytes) + " bytes for " + quoted(name) + " " + t.dtype +
                           shape_str(mx::Shape(t.shape.begin(), t.shape.end())),
                       std::to_string(t.end - t.begin) + " bytes");
    }
    out.tensors.push_back(std::move(t));
  }
  return out;
}

// --- paths to trees ----------------------------------------------------------

/// Dotted numeric paths ("3.0.1") as nested dense lists, the way mlx's
/// tree_unflatten reads them, but refusing gaps, repeats, a path that is
/// both a leaf and a node, and anything deeper than kMaxDepth: no path can
/// make a list longer than the entries the file has.
class PathTree {
 public:
  explicit PathTree(std::string context) : ctx_(std::move(context)) {}

  void insert(const std::string& path, StateValue value) {
    std::vector<long> parts;
    size_t start = 0;
    while (true) {
      size_t dot = path.find('.', start);
      std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      bool digits = !part.empty() && part.size() <= 9 &&
          part.find_first_not_of("0123456789") == std::string::npos;
      if (!digits) {
        throw ValueError(ctx_, "numeric dotted paths like '0.1'", quoted(path));
      }
      parts.push_back(std::stol(part));
      if (static_cast<int>(parts.size()) > kMaxDepth) {
        throw ValueError(ctx_, "paths at most " + std::to_string(kMaxDepth) + " deep", quoted(path));
      }
      if (dot == std::string::npos) {
        break;
      }
      start = dot + 1;
    }
    Node* node = &root_;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      node = &node->kids[parts[i]];
      if (node->leaf) {
        throw ValueError(ctx_, "a path that is not also a leaf", quoted(path));
      }
    }
    auto [it, fresh] = node->kids.try_emplace(parts.back());
    if (!fresh) {
      throw ValueError(ctx_, "each path once", quoted(path));
    }
    it->second.leaf = std::move(value);
  }

  /// The whole tree as lists (an empty list when nothing was inserted).
  StateValue lists() const {
    return dense(root_, 0);
  }

 private:
  struct Node {
    std::map<long, Node> kids;
    std::optional<StateValue> leaf;
  };

  StateValue dense(const Node& node, int depth) const {
    if (node.leaf) {
      return *node.leaf;
    }
    if (depth > kMaxDepth) {
      throw ValueError(ctx_, "paths at most " + std::to_string(kMaxDepth) + " deep", "deeper paths");
    }
    std::vector<long> keys;
    for (const auto& [k, _] : node.kids) {
      keys.push_back(k);
    }
    if (!keys.empty() && keys.back() != static_cast<long>(keys.size()) - 1) {
      throw ValueError(ctx_, "dense list indices 0..n-1", "indices " + py_list(keys, 8));
    }
    StateValue::List out;
    out.reserve(keys.size());
    for (const auto& [_, kid] : node.kids) {
      out.push_back(dense(kid, depth + 1));
    }
    return out;
  }

  std::string ctx_;
  Node root_;
};

// --- scalars ---------------------------------------------------------------

/// The code points of UTF-8 text (kvcore's own strings, so well formed).
std::vector<int32_t> code_points(const std::string& s) {
  std::vector<int32_t> out;
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (int k = 1; k < n && i + k < s.size(); ++k) {
      cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    }
    out.push_back(static_cast<int32_t>(cp));
    i += n;
  }
  return out;
}

/// A stored scalar array back as the value its tag says.
StateValue decode_scalar(const mx::array& a, const std::string& kind, const std::string& path) {
  if (kind == "none") {
    return {};
  }
  if (kind == "scalar") {
    if (a.size() != 1) {
      throw ValueError(kLoad, "one element for the scalar at " + path, "shape " + shape_str(a.shape()));
    }
    mx::array x = mx::reshape(a, {});
    if (x.dtype() == mx::bool_) {
      // The stored byte, read as a byte: a file may hold any value there,
      // and a bool other than 0 or 1 is undefined in C++. Nonzero is true,
      // as numpy reads it.
      mx::array byte = mx::view(x, mx::uint8);
      byte.eval();
      return StateValue(byte.item<uint8_t>() != 0);
    }
    if (mx::issubdtype(x.dtype(), mx::integer)) {
      if (x.dtype() == mx::uint64) {
        x.eval();
        uint64_t u = x.item<uint64_t>();
        return StateValue(static_cast<long long>(u > INT64_MAX ? INT64_MAX : u));
      }
      x = mx::astype(x, mx::int64);
      x.eval();
      return StateValue(static_cast<long long>(x.item<int64_t>()));
    }
    if (mx::issubdtype(x.dtype(), mx::floating)) {
      x = x.dtype() == mx::float64 ? x : mx::astype(x, mx::float32);
      x.eval();
      return StateValue(x.dtype() == mx::float64 ? x.item<double>() : double(x.item<float>()));
    }
    throw ValueError(kLoad, "a real number for the scalar at " + path, dtype_str(a.dtype()));
  }
  if (kind == "string") {
    // An empty string is saved as mx.array([]), float32.
    if (a.ndim() == 1 && a.size() == 0) {
      return StateValue(std::string());
    }
    if (a.ndim() != 1 || a.size() > kMaxString || !mx::issubdtype(a.dtype(), mx::integer)) {
      throw ValueError(kLoad, "a 1-D integer array for the string at " + path,
                       dtype_str(a.dtype()) + " " + shape_str(a.shape()));
    }
    mx::array x = a.dtype() == mx::uint64 ? mx::minimum(a, mx::array(uint64_t(0x110000)))
                                          : a;
    x = mx::astype(x, mx::int64);
    x.eval();
    std::string out;
    const int64_t* p = x.data<int64_t>();
    for (size_t i = 0; i < x.size(); ++i) {
      int64_t c = p[i];
      if (c < 0 || c >= 0x110000 || (c >= 0xD800 && c < 0xE000)) {
        throw ValueError(kLoad, "code points for the string at " + path, "out-of-range values");
      }
      json::utf8_append(out, static_cast<uint32_t>(c));
    }
    return StateValue(std::move(out));
  }
  throw ValueError(kLoad, "a scalar tag among scalar, string, none", quoted(kind));
}

// --- the two layouts --------------------------------------------------------

struct Split {
  Metadata user;
  std::vector<std::pair<std::string, std::string>> classes, other;
};

/// The metadata keys by their first part: "<user>.<key>" (key non-empty),
/// "<classes>...." and "<other>...."; any other key is refused.
Split split_metadata(const Metadata& meta, char user, char classes, char other) {
  Split out;
  for (const auto& [key, value] : meta) {
    size_t dot = key.find('.');
    std::string rest = dot == std::string::npos ? "" : key.substr(dot + 1);
    char head = dot == 1 ? key[0] : (key.size() == 1 ? key[0] : '\0');
    if (head == user && !rest.empty()) {
      out.user[rest] = value;
    } else if (head == classes) {
      out.classes.emplace_back(rest, value);
    } else if (head == other) {
      out.other.emplace_back(rest, value);
    } else {
      throw ValueError(kLoad, "metadata keys under 0., 1. and 2.", quoted(key));
    }
  }
  return out;
}

StateValue nest_strings(const std::vector<std::pair<std::string, std::string>>& items, const char* ctx) {
  PathTree tree(ctx);
  for (const auto& [path, value] : items) {
    tree.insert(path, StateValue(value));
  }
  return tree.lists();
}

StateValue nest_arrays(std::map<std::string, StateValue> arrays) {
  PathTree tree("load_prompt_cache (arrays)");
  for (auto& [path, value] : arrays) {
    tree.insert(path, std::move(value));
  }
  return tree.lists();
}

std::string class_name(const StateValue& v) {
  if (!v.is_string()) {
    throw ValueError(kLoad, "a cache class name", v.kind());
  }
  const auto& names = cache_class_names();
  if (std::find(names.begin(), names.end(), v.as_string()) == names.end()) {
    std::string known;
    for (const auto& n : names) {
      known += (known.empty() ? "" : ", ") + n;
    }
    throw ValueError(kLoad, "a cache class among " + known, quoted(v.as_string()));
  }
  return v.as_string();
}

/// mlx-lm 0.32: "0.<key>" user metadata, "1.<i>" class names, "2.0" = ""
/// then "2.<k>.0" / "2.<k>.1" the path and tag of each scalar leaf.
PromptCacheStates load_current(std::map<std::string, StateValue> arrays, const Metadata& meta) {
  Split parts = split_metadata(meta, '0', '1', '2');
  StateValue classes = nest_strings(parts.classes, "load_prompt_cache (class names)");
  StateValue tags = nest_strings(parts.other, "load_prompt_cache (scalar tags)");
  const auto& tag_list = tags.as_list();
  if (tag_list.empty() || !tag_list[0].is_string() || !tag_list[0].as_string().empty()) {
    throw ValueError(kLoad, "the scalar list's leading ''",
                     tag_list.empty() ? "[]" : std::string(tag_list[0].kind()));
  }
  for (size_t i = 1; i < tag_list.size(); ++i) {
    const auto& e = tag_list[i];
    if (!e.is_list() || e.as_list().size() != 2 || !e.as_list()[0].is_string() ||
        !e.as_list()[1].is_string()) {
      throw ValueError(kLoad, "(path, tag) scalar entries", e.kind());
    }
    const std::string& path = e.as_list()[0].as_string();
    auto it = arrays.find(path);
    if (it == arrays.end() || !it->second.is_array()) {
      throw ValueError(kLoad, "a scalar tag naming a stored array", quoted(path));
    }
    it->second = decode_scalar(it->second.as_array(), e.as_list()[1].as_string(), path);
  }
  StateValue states = arrays.empty() ? StateValue(StateValue::List{}) : nest_arrays(std::move(arrays));
  const auto& names = classes.as_list();
  const auto& layer_states = states.as_list();
  if (layer_states.size() != names.size()) {
    throw ValueError(kLoad, "one state per class name (" + std::to_string(names.size()) + ")",
                     std::to_string(layer_states.size()) + " states");
  }
  PromptCacheStates out;
  out.metadata = std::move(parts.user);
  for (size_t i = 0; i < names.size(); ++i) {
    out.layers.push_back({class_name(names[i]), layer_states[i]});
  }
  return out;
}

// The meta_state layout: states hold arrays only, scalars are strings.

std::vector<long long> meta_ints(const StateValue& meta, size_t from, size_t count,
                                 const std::string& name) {
  constexpr const char* ctx = "load_prompt_cache (meta_state)";
  std::vector<long long> out;
  const auto& l = meta.as_list();
  for (size_t i = from; i < from + count; ++i) {
    bool ok = l[i].is_string();
    long long v = 0;
    if (ok) {
      std::string s = l[i].as_string();
      size_t b = s.find_first_not_of(" \t\n\r"), e = s.find_last_not_of(" \t\n\r");
      s = b == std::string::npos ? "" : s.substr(b, e - b + 1);
      const char* first = s.data() + (!s.empty() && s[0] == '+' ? 1 : 0);
      auto [ptr, ec] = std::from_chars(first, s.data() + s.size(), v);
      ok = !s.empty() && ec == std::errc() && ptr == s.data() + s.size();
    }
    if (!ok) {
      throw ValueError(ctx, "integer meta_state values for " + name, "a non-integer value");
    }
    out.push_back(v);
  }
  return out;
}

StateValue old_state(const std::string& name, const StateValue& state, const StateValue& meta) {
  constexpr const char* ctx = "load_prompt_cache (meta_state)";
  auto ints = [&](size_t n) {
    if (!meta.is_list() || meta.as_list().size() != n) {
      throw ValueError(ctx, std::to_string(n) + " meta_state values for " + name, meta.kind());
    }
    return meta_ints(meta, 0, n, name);
  };
  if (name == "CacheList") {
    if (!meta.is_list() || meta.as_list().size() != 2 || !meta.as_list()[0].is_list()) {
      throw ValueError(ctx, "CacheList meta_state ([names], [meta_states])", meta.kind());
    }
    const auto& names = meta.as_list()[0].as_list();
    const auto& metas = meta.as_list()[1];
    if (!state.is_list() || state.as_list().size() != names.size()) {
      throw ValueError(ctx, std::to_string(names.size()) + " inner states", state.kind());
    }
    StateValue::List out;
    for (size_t i = 0; i < names.size(); ++i) {
      if (!names[i].is_string()) {
        throw ValueError(ctx, "a cache class this layout knows", names[i].kind());
      }
      StateValue m = metas.is_list() && i < metas.as_list().size() ? metas.as_list()[i] : StateValue("");
      out.push_back(StateValue::List{old_state(names[i].as_string(), state.as_list()[i], m),
                                     names[i]});
    }
    return out;
  }
  if (name == "ArraysCache") {
    return StateValue::List{state, StateValue(), StateValue()};
  }
  auto rank4 = [&](const StateValue& v) { return v.is_array() && v.as_array().ndim() == 4; };
  if (name == "BatchKVCache" || name == "BatchRotatingKVCache") {
    if (!state.is_list() || state.as_list().size() != 4) {
      throw ValueError(ctx, "(keys, values, offset, left_padding) for " + name, state.kind());
    }
    const auto& s = state.as_list();
    if (!rank4(s[0])) {
      throw ValueError(ctx, "rank-4 keys for " + name, s[0].kind());
    }
    if (name == "BatchKVCache") {
      return StateValue::List{s[0], s[1], s[2], s[3], s[0].as_array().shape(2)};
    }
    if (!meta.is_list() || meta.as_list().size() != 4) {
      throw ValueError(ctx, "4 meta_state values for " + name, meta.kind());
    }
    const auto& flag = meta.as_list()[3];
    std::string f = flag.is_string() ? flag.as_string() : "";
    if (f != "True" && f != "False" && f != "1" && f != "0") {
      throw ValueError(ctx, "rotated as True or False", flag.is_string() ? quoted(f) : flag.kind());
    }
    auto v = meta_ints(meta, 0, 3, name);
    return StateValue::List{s[0], s[1], s[2], s[3], v[0], v[1], v[2], f == "True" || f == "1"};
  }
  if (!state.is_list() || state.as_list().size() != 2) {
    throw ValueError(ctx, "(keys, values) for " + name, state.kind());
  }
  const auto& keys = state.as_list()[0];
  const auto& values = state.as_list()[1];
  if (name != "QuantizedKVCache" && !(rank4(keys) && values.is_array())) {
    throw ValueError(ctx, "rank-4 keys and values arrays for " + name, keys.kind());
  }
  if (name == "KVCache") {
    return StateValue::List{keys, values, keys.as_array().shape(2)};
  }
  if (name == "ConcatenateKVCache") {
    return StateValue::List{keys, values};
  }
  if (name == "RotatingKVCache") {
    auto v = ints(4); // keep, max_size, offset, _idx
    return StateValue::List{keys, values, v[2], v[0], v[1], v[3]};
  }
  if (name == "QuantizedKVCache") {
    auto v = ints(3); // offset, group_size, bits
    return StateValue::List{keys, values, v[0], v[1], v[2]};
  }
  if (name == "ChunkedKVCache") {
    auto v = ints(2); // chunk_size, start_position
    // mlx-lm set offset to the tokens held, losing start_position.
    return StateValue::List{keys, values, v[1] + keys.as_array().shape(2), v[0], v[1]};
  }
  throw ValueError(ctx, "a cache class this layout knows", quoted(name));
}

/// mlx-lm <= 0.32.0: "0.<i>..." meta_state strings, "1.<key>" user
/// metadata, "2.<i>" class names; arrays only in the states.
PromptCacheStates load_meta_state(std::map<std::string, StateValue> arrays, const Metadata& meta) {
  Split parts = split_metadata(meta, '1', '2', '0');
  StateValue classes = nest_strings(parts.classes, "load_prompt_cache (class names)");
  StateValue info = nest_strings(parts.other, "load_prompt_cache (meta_state)");
  StateValue states = arrays.empty() ? StateValue(StateValue::List{}) : nest_arrays(std::move(arrays));
  const auto& names = classes.as_list();
  std::vector<std::string> checked;
  for (const auto& n : names) {
    checked.push_back(class_name(n));
  }
  PromptCacheStates out;
  out.metadata = std::move(parts.user);
  out.layout = FileLayout::MetaState;
  const auto& layer_states = states.as_list();
  const auto& metas = info.as_list();
  size_t n = std::min(checked.size(), layer_states.size());
  for (size_t i = 0; i < n; ++i) {
    StateValue m = i < metas.size() ? metas[i] : StateValue("");
    out.layers.push_back({checked[i], old_state(checked[i], layer_states[i], m)});
  }
  if (out.layers.size() != checked.size()) {
    throw ValueError(kLoad, "one state per class name (" + std::to_string(checked.size()) + ")",
                     std::to_string(out.layers.size()) + " states");
  }
  return out;
}

// --- saving ------------------------------------------------------------------

struct Flat {
  std::unordered_map<std::string, mx::array> arrays;
  std::vector<std::pair<std::string, const char*>> tags;
  int deepest = 0;
};

void flatten(const StateValue& v, const std::string& path, int depth, Flat& out) {
  if (v.is_list()) {
    const auto& l = v.as_list();
    for (size_t i = 0; i < l.size(); ++i) {
      flatten(l[i], path.empty() ? std::to_string(i) : path + "." + std::to_string(i), depth + 1, out);
    }
    return;
  }
  out.deepest = std::max(out.deepest, depth);
  auto scalar = [&](mx::array a, const char* tag) {
    out.arrays.insert_or_assign(path, std::move(a));
    out.tags.emplace_back(path, tag);
  };
  if (v.is_array()) {
    out.arrays.insert_or_assign(path, v.as_array());
  } else if (v.is_bool()) {
    scalar(mx::array(v.as_bool()), "scalar");
  } else if (v.is_int()) {
    long long i = v.as_int();
    scalar(i >= INT32_MIN && i <= INT32_MAX ? mx::array(static_cast<int32_t>(i))
                                            : mx::array(static_cast<int64_t>(i)),
           "scalar");
  } else if (v.is_float()) {
    scalar(mx::array(static_cast<float>(v.as_float())), "scalar");
  } else if (v.is_string()) {
    auto cps = code_points(v.as_string());
    int n = static_cast<int>(cps.size());
    scalar(n == 0 ? mx::zeros({0}, mx::float32) : mx::array(cps.data(), {n}, mx::int32), "string");
  } else {
    scalar(mx::zeros({0}, mx::float32), "none");
  }
}

} // namespace

PreparedFile prepare_prompt_cache_states(const std::vector<NamedState>& layers, const Metadata& metadata) {
  Flat flat;
  StateValue::List states;
  for (const auto& layer : layers) {
    states.push_back(layer.state);
  }
  flatten(StateValue(std::move(states)), "", 0, flat);
  if (flat.deepest > kMaxDepth) {
    throw ValueError(kSave, "states at most " + std::to_string(kMaxDepth) + " deep",
                     std::to_string(flat.deepest) + " levels");
  }
  std::unordered_map<std::string, std::string> meta;
  for (const auto& [k, v] : metadata) {
    if (k.empty()) {
      // "0." would not read back as a key under "0.".
      throw ValueError(kSave, "non-empty metadata keys", "''");
    }
    meta["0." + k] = v;
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    meta["1." + std::to_string(i)] = layers[i].name;
  }
  meta["2.0"] = "";
  for (size_t k = 0; k < flat.tags.size(); ++k) {
    std::string key = "2." + std::to_string(k + 1);
    meta[key + ".0"] = flat.tags[k].first;
    meta[key + ".1"] = flat.tags[k].second;
  }
  std::vector<mx::array> all;
  for (auto& [_, a] : flat.arrays) {
    if (!a.flags().row_contiguous) {
      a = mx::contiguous(a);
    }
    all.push_back(a);
  }
  mx::eval(all);
  return {std::move(flat.arrays), std::move(meta)};
}

void write_prepared(const std::string& path, PreparedFile file) {
  try {
    mx::save_safetensors(path, std::move(file.arrays), std::move(file.metadata));
  } catch (const CacheError&) {
    throw;
  } catch (const std::exception& e) {
    // mlx's own error (a missing directory, a full disk) as kvcore's.
    throw RuntimeError("save_prompt_cache", "a file it can write at " + path, e.what());
  }
}

void save_prompt_cache_states(
    const std::string& path,
    const std::vector<NamedState>& layers,
    const Metadata& metadata) {
  write_prepared(path, prepare_prompt_cache_states(layers, metadata));
}

PreparedFile prepare_prompt_cache(const PromptCache& caches, const Metadata& metadata) {
  std::vector<NamedState> layers;
  for (size_t i = 0; i < caches.size(); ++i) {
    if (!caches[i]) {
      throw ValueError(kSave, "a cache for every layer", "null at layer " + std::to_string(i));
    }
    layers.push_back({caches[i]->name(), cache_state(*caches[i])});
  }
  return prepare_prompt_cache_states(layers, metadata);
}

void save_prompt_cache(const std::string& path, const PromptCache& caches, const Metadata& metadata) {
  write_prepared(path, prepare_prompt_cache(caches, metadata));
}

namespace {

/// The states of a file whose header was checked, from mlx's reading of it.
PromptCacheStates states_of(
    const SafetensorsHeader& header,
    const std::function<std::unordered_map<std::string, mx::array>()>& read) {
  std::map<std::string, StateValue> arrays;
  try {
    for (auto& [name, a] : read()) {
      arrays.emplace(name, std::move(a));
    }
  } catch (const CacheError&) {
    throw;
  } catch (const std::exception& e) {
    throw ValueError(kLoad, "a readable safetensors file", std::string("mlx: ") + e.what());
  }
  // mlx's reader saw the text we checked; the metadata is ours.
  const Metadata& meta = header.metadata;
  auto marker = meta.find("2.0");
  bool current = marker != meta.end() && marker->second.empty();
  return current ? load_current(std::move(arrays), meta) : load_meta_state(std::move(arrays), meta);
}

/// mlx's reader over bytes in memory.
class BytesReader : public mx::io::Reader {
 public:
  explicit BytesReader(std::shared_ptr<const std::string> bytes) : bytes_(std::move(bytes)) {}
  bool is_open() const override {
    return true;
  }
  bool good() const override {
    return at_ <= bytes_->size();
  }
  size_t tell() override {
    return at_;
  }
  void seek(int64_t off, std::ios_base::seekdir way) override {
    const int64_t base = way == std::ios_base::beg ? 0
        : way == std::ios_base::end                ? static_cast<int64_t>(bytes_->size())
                                                   : static_cast<int64_t>(at_);
    at_ = static_cast<size_t>(std::max<int64_t>(0, base + off));
  }
  void read(char* data, size_t n) override {
    read(data, n, at_);
    at_ += n;
  }
  void read(char* data, size_t n, size_t offset) override {
    if (offset > bytes_->size() || n > bytes_->size() - offset) {
      throw ValueError(kLoad, std::to_string(n) + " bytes at " + std::to_string(offset),
                       "a file of " + std::to_string(bytes_->size()));
    }
    std::memcpy(data, bytes_->data() + offset, n);
  }
  std::string label() const override {
    return "bytes in memory";
  }

 private:
  std::shared_ptr<const std::string> bytes_;
  size_t at_ = 0;
};

void collect_arrays(const StateValue& v, std::vector<mx::array>& out) {
  if (v.is_array()) {
    out.push_back(v.as_array());
  } else if (v.is_list()) {
    for (const auto& x : v.as_list()) {
      collect_arrays(x, out);
    }
  }
}

} // namespace

PromptCacheStates load_prompt_cache_states(const std::string& path) {
  SafetensorsHeader header = read_safetensors_header(path);
  return states_of(header, [&] { return mx::load_safetensors(path).first; });
}

LoadedPromptCache load_prompt_cache_bytes(std::shared_ptr<const std::string> bytes, bool evaluate) {
  SafetensorsHeader header = parse_safetensors_header(*bytes);
  PromptCacheStates states = states_of(header, [&] {
    return mx::load_safetensors(std::make_shared<BytesReader>(bytes)).first;
  });
  LoadedPromptCache out;
  std::vector<mx::array> arrays;
  for (const auto& layer : states.layers) {
    out.caches.push_back(cache_from_state(layer.name, layer.state));
    collect_arrays(cache_state(*out.caches.back()), arrays);
  }
  try {
    if (evaluate) {
      mx::eval(arrays);
    }
  } catch (const std::exception& e) {
    throw ValueError(kLoad, "a readable safetensors file", std::string("mlx: ") + e.what());
  }
  out.metadata = std::move(states.metadata);
  return out;
}

LoadedPromptCache load_prompt_cache(const std::string& path) {
  PromptCacheStates states = load_prompt_cache_states(path);
  LoadedPromptCache out;
  for (const auto& layer : states.layers) {
    out.caches.push_back(cache_from_state(layer.name, layer.state));
  }
  out.metadata = std::move(states.metadata);
  return out;
}

} // namespace kvcore
