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

} // namespace kvcore
