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
  if (!e.expected().empty() || !e.actual().empty()) {
    throw CacheError(e.kind(), context, e.expected(), e.actual());
  }
  // "[old context] message": the message alone.
  const std::string what = e.what();
  const size_t cut = what.find("] ");
  throw CacheError(e.kind(), context, cut == std::string::npos ? what : what.substr(cut + 2));
}

} // namespace kvcore
