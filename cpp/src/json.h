// A small JSON reader for safetensors headers, bounded for untrusted input:
// nesting depth is capped, strings must be valid UTF-8 after unescaping,
// numbers must be integers within 64 bits, and an object may not repeat a
// key (so no two readers can disagree on which value counts).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace kvcore::json {

/// Appends code point cp to out as UTF-8.
void utf8_append(std::string& out, uint32_t cp);

struct Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;

struct Value {
  std::variant<std::nullptr_t, bool, int64_t, std::string, Array, Object> v;

  bool is_string() const {
    return std::holds_alternative<std::string>(v);
  }
  bool is_int() const {
    return std::holds_alternative<int64_t>(v);
  }
  bool is_array() const {
    return std::holds_alternative<Array>(v);
  }
  bool is_object() const {
    return std::holds_alternative<Object>(v);
  }
  /// "null", "bool", "number", "string", "array", "object".
  const char* kind() const;
};

/// Parses `text` as one JSON value. Throws ValueError(context, ...) naming
/// the byte offset of the first fault.
Value parse(std::string_view text, const char* context, int max_depth = 64);

/// Member `key` of an object, or null.
const Value* find(const Object& o, std::string_view key);

} // namespace kvcore::json
