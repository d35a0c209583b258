// Typed errors: every failure says where it happened, what was expected and
// what came instead. The Python bindings map each kind onto the built-in
// exception mlx-lm raises in the same place.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace kvcore {

/// The Python built-in an error corresponds to.
enum class ErrorKind { Value, Runtime, NotImplemented, Index, Type, Key };

/// Base of every exception kvcore throws.
class CacheError : public std::runtime_error {
 public:
  /// "[context] expected <expected> but got <actual>".
  CacheError(
      ErrorKind kind,
      std::string context,
      std::string expected,
      std::string actual);
  /// "[context] <message>", for errors with nothing to compare.
  CacheError(ErrorKind kind, std::string context, std::string message);

  ErrorKind kind() const noexcept {
    return kind_;
  }
  const std::string& context() const noexcept {
    return context_;
  }
  const std::string& expected() const noexcept {
    return expected_;
  }
  const std::string& actual() const noexcept {
    return actual_;
  }

 private:
  ErrorKind kind_;
  std::string context_;
  std::string expected_;
  std::string actual_;
};

/// The same error said from `context` (a cache that delegates to another
/// names itself, not the one it holds).
[[noreturn]] void rethrow_from(const CacheError& e, const std::string& context);

/// Bad argument: shape, dtype, size or a malformed state (Python ValueError).
struct ValueError : CacheError {
  ValueError(std::string context, std::string expected, std::string actual)
      : CacheError(
            ErrorKind::Value,
            std::move(context),
            std::move(expected),
            std::move(actual)) {}
  ValueError(std::string context, std::string message)
      : CacheError(ErrorKind::Value, std::move(context), std::move(message)) {}
};

/// The cache is in a state where the call cannot proceed (RuntimeError).
struct RuntimeError : CacheError {
  RuntimeError(std::string context, std::string expected, std::string actual)
      : CacheError(
            ErrorKind::Runtime,
            std::move(context),
            std::move(expected),
            std::move(actual)) {}
  RuntimeError(std::string context, std::string message)
      : CacheError(ErrorKind::Runtime, std::move(context), std::move(message)) {
  }
};

/// An operation this cache does not offer (NotImplementedError).
struct NotImplementedError : CacheError {
  NotImplementedError(std::string context, std::string message)
      : CacheError(
            ErrorKind::NotImplemented,
            std::move(context),
            std::move(message)) {}
};

/// An index out of range (IndexError).
struct IndexError : CacheError {
  IndexError(std::string context, std::string expected, std::string actual)
      : CacheError(
            ErrorKind::Index,
            std::move(context),
            std::move(expected),
            std::move(actual)) {}
};

/// An argument of the wrong kind of object (TypeError).
struct TypeError : CacheError {
  TypeError(std::string context, std::string expected, std::string actual)
      : CacheError(
            ErrorKind::Type,
            std::move(context),
            std::move(expected),
            std::move(actual)) {}
};

/// A key that names nothing known (KeyError).
struct KeyError : CacheError {
  KeyError(std::string context, std::string expected, std::string actual)
      : CacheError(
            ErrorKind::Key,
            std::move(context),
            std::move(expected),
            std::move(actual)) {}
};

/// Throws ValueError (ctx) unless `items` is non-empty and holds no null
/// pointer: the merges' precondition.
template <class T>
void check_non_null_list(const char* ctx, const std::vector<const T*>& items) {
  if (items.empty()) {
    throw ValueError(ctx, "at least one cache", "none");
  }
  for (const T* p : items) {
    if (p == nullptr) {
      throw ValueError(ctx, "a cache in every entry", "null");
    }
  }
}

} // namespace kvcore
