// A cache's state as mlx-lm 0.32 keeps it (`cache.state`): a tree of lists
// whose leaves are arrays, numbers, strings or None. Prompt-cache files store
// these trees; the class table turns a (class name, state) pair back into a
// cache and is the only place a name from a file is ever looked up.
#pragma once

#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "kvcore/cache.h"

namespace kvcore {

class StateValue {
 public:
  using List = std::vector<StateValue>;

  /// None.
  StateValue() = default;
  StateValue(mx::array a) : v_(std::move(a)) {}
  /// None when unset.
  StateValue(const OptionalArray& a);
  StateValue(bool b) : v_(b) {}
  StateValue(int i) : v_(static_cast<long long>(i)) {}
  StateValue(long long i) : v_(i) {}
  StateValue(double d) : v_(d) {}
  StateValue(std::string s) : v_(std::move(s)) {}
  StateValue(const char* s) : v_(std::string(s)) {}
  StateValue(List l) : v_(std::move(l)) {}

  bool is_none() const {
    return std::holds_alternative<std::monostate>(v_);
  }
  bool is_array() const {
    return std::holds_alternative<mx::array>(v_);
  }
  bool is_bool() const {
    return std::holds_alternative<bool>(v_);
  }
  bool is_int() const {
    return std::holds_alternative<long long>(v_);
  }
  bool is_float() const {
    return std::holds_alternative<double>(v_);
  }
  bool is_string() const {
    return std::holds_alternative<std::string>(v_);
  }
  bool is_list() const {
    return std::holds_alternative<List>(v_);
  }

  // Typed reads for decoding a state: each throws ValueError naming `ctx`
  // and `what` when the node is of another kind.

  /// An array; None is refused.
  const mx::array& array(const char* ctx, const char* what) const;
  /// An array or None.
  OptionalArray optional_array(const char* ctx, const char* what) const;
  /// An int within 32 bits (a bool is not an int here).
  int integer(const char* ctx, const char* what) const;
  /// A bool, or an int read as one.
  bool boolean(const char* ctx, const char* what) const;
  const std::string& string(const char* ctx, const char* what) const;
  /// A list of exactly `n` items.
  const List& list(const char* ctx, const char* what, size_t n) const;
  /// A list of any length.
  const List& list(const char* ctx, const char* what) const;

  /// Unchecked access, for code that has asked is_*() first.
  const mx::array& as_array() const {
    return std::get<mx::array>(v_);
  }
  bool as_bool() const {
    return std::get<bool>(v_);
  }
  long long as_int() const {
    return std::get<long long>(v_);
  }
  double as_float() const {
    return std::get<double>(v_);
  }
  const std::string& as_string() const {
    return std::get<std::string>(v_);
  }
  const List& as_list() const {
    return std::get<List>(v_);
  }

  /// "array", "int", "list", ...: for error messages.
  const char* kind() const;
  /// The value as Python would print it (arrays by shape and dtype, lists
  /// by length): for error messages.
  std::string repr() const;

 private:
  std::variant<std::monostate, mx::array, bool, long long, double, std::string, List> v_;
};

/// mlx-lm 0.32's `state` of `cache`: for a KVCache (keys, values, offset);
/// for a CacheList a list of (state, class name) pairs. Throws ValueError
/// for a cache whose class is not in the table.
StateValue cache_state(const Cache& cache);

/// A new cache of class `name` holding `state`, for the classes
/// `cache_class_names()` lists and no other. Throws ValueError for an
/// unknown name or a malformed state (wrong arity, kinds or shapes); the
/// cache setters' own checks apply.
std::unique_ptr<Cache> cache_from_state(
    const std::string& name,
    const StateValue& state);

/// The class names a state or a file may name, sorted.
const std::vector<std::string>& cache_class_names();

} // namespace kvcore
