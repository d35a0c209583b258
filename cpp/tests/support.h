// Helpers shared by the file and CacheList tests: exact comparison of
// arrays and state trees, temporary files, deterministic inputs.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <mlx/ops.h>
#include <mlx/random.h>
#include <mlx/transforms.h>

#include "kvcore/state.h"

namespace kvtest {

namespace mx = mlx::core;

inline std::string shape_text(const mx::array& a) {
  std::string s = "(";
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

inline std::string dtype_text(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

/// Same dtype, same shape, same bytes: the comparison "bit for bit" means.
inline bool bit_equal(const mx::array& a, const mx::array& b, std::string* why = nullptr) {
  auto say = [&](const std::string& s) {
    if (why) *why = s;
    return false;
  };
  if (a.dtype() != b.dtype()) {
    return say("dtype " + dtype_text(a.dtype()) + " vs " + dtype_text(b.dtype()));
  }
  if (a.shape() != b.shape()) {
    return say("shape " + shape_text(a) + " vs " + shape_text(b));
  }
  if (a.size() == 0) {
    return true;
  }
  auto x = mx::contiguous(a);
  auto y = mx::contiguous(b);
  mx::eval({x, y});
  if (std::memcmp(x.data<uint8_t>(), y.data<uint8_t>(), x.nbytes()) != 0) {
    return say("different values at shape " + shape_text(a) + " " + dtype_text(a.dtype()));
  }
  return true;
}

/// Deep equality of state trees: same kinds, scalars, list lengths, and
/// bit-equal arrays. `why` names the first difference by its dotted path.
inline bool same_state(
    const kvcore::StateValue& a,
    const kvcore::StateValue& b,
    std::string* why = nullptr,
    const std::string& path = "") {
  auto say = [&](const std::string& s) {
    if (why) *why = (path.empty() ? "<root>" : path) + ": " + s;
    return false;
  };
  if (std::string(a.kind()) != b.kind()) {
    return say(std::string(a.kind()) + " vs " + b.kind());
  }
  if (a.is_array()) {
    std::string w;
    return bit_equal(a.as_array(), b.as_array(), &w) || say(w);
  }
  if (a.is_bool()) {
    return a.as_bool() == b.as_bool() || say("bool differs");
  }
  if (a.is_int()) {
    return a.as_int() == b.as_int() ||
        say(std::to_string(a.as_int()) + " vs " + std::to_string(b.as_int()));
  }
  if (a.is_float()) {
    double x = a.as_float(), y = b.as_float();
    return std::memcmp(&x, &y, sizeof(double)) == 0 ||
        say(std::to_string(a.as_float()) + " vs " + std::to_string(b.as_float()));
  }
  if (a.is_string()) {
    return a.as_string() == b.as_string() ||
        say("'" + a.as_string() + "' vs '" + b.as_string() + "'");
  }
  if (a.is_list()) {
    auto& x = a.as_list();
    auto& y = b.as_list();
    if (x.size() != y.size()) {
      return say("list of " + std::to_string(x.size()) + " vs " + std::to_string(y.size()));
    }
    for (size_t i = 0; i < x.size(); ++i) {
      auto sub = path.empty() ? std::to_string(i) : path + "." + std::to_string(i);
      if (!same_state(x[i], y[i], why, sub)) return false;
    }
  }
  return true;
}

/// The state of every layer, for "nothing changed" checks.
template <class Caches>
kvcore::StateValue states_of(const Caches& caches) {
  kvcore::StateValue::List out;
  for (auto& c : caches) out.push_back(kvcore::cache_state(*c));
  return kvcore::StateValue(std::move(out));
}

/// A fresh directory for this process's files, removed at exit.
inline const std::filesystem::path& temp_dir() {
  struct Dir {
    std::filesystem::path p;
    Dir() {
      std::string t = (std::filesystem::temp_directory_path() / "kvcore_test_XXXXXX").string();
      if (!mkdtemp(t.data())) {
        std::perror("mkdtemp");
        std::abort();
      }
      p = t;
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(p, ec);
    }
  };
  static Dir d;
  return d.p;
}

inline std::string temp_file(const std::string& name) {
  return (temp_dir() / name).string();
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// Deterministic normal samples of a dtype.
inline mx::array randn(const mx::Shape& shape, mx::Dtype dtype, uint64_t seed) {
  return mx::astype(mx::random::normal(shape, mx::float32, mx::random::key(seed)), dtype);
}

} // namespace kvtest
