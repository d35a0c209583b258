#include "kvcore/errors.h"

namespace kvcore {

CacheError::CacheError(
    ErrorKind kind,
    std::string context,
    std::string expected,
    std::string actual)
    : std::runtime_error(
          "[" + context + "] expected " + expected + " but got " + actual),
      kind_(kind),
      context_(std::move(context)),
      expected_(std::move(expected)),
      actual_(std::move(actual)) {}

CacheError::CacheError(ErrorKind kind, std::string context, std::string message)
    : std::runtime_error("[" + context + "] " + message),
      kind_(kind),
      context_(std::move(context)) {}

void rethrow_from(const CacheError& e, const std::string& context) {
  const std::string what = e.what();
  const size_t cut = what.find("] ");
  const std::string message = cut == std::string::npos ? what : what.substr(cut + 2);
  const bool compared = !e.expected().empty() || !e.actual().empty();
  // The same subclass, so that C++ callers catch what they would have.
  switch (e.kind()) {
    case ErrorKind::Value:
      if (compared) throw ValueError(context, e.expected(), e.actual());
      throw ValueError(context, message);
    case ErrorKind::Runtime:
      if (compared) throw RuntimeError(context, e.expected(), e.actual());
      throw RuntimeError(context, message);
    case ErrorKind::NotImplemented:
      throw NotImplementedError(context, message);
    case ErrorKind::Index:
      if (compared) throw IndexError(context, e.expected(), e.actual());
      break;
    case ErrorKind::Type:
      if (compared) throw TypeError(context, e.expected(), e.actual());
      break;
    case ErrorKind::Key:
      if (compared) throw KeyError(context, e.expected(), e.actual());
      break;
  }
  throw CacheError(e.kind(), context, message);
}

} // namespace kvcore
