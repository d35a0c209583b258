#include "json.h"

#include <climits>

#include "kvcore/errors.h"

namespace kvcore::json {

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

const char* Value::kind() const {
  static const char* names[] = {"null", "bool", "number", "string", "array", "object"};
  return names[v.index()];
}

const Value* find(const Object& o, std::string_view key) {
  for (const auto& [k, v] : o) {
    if (k == key) {
      return &v;
    }
  }
  return nullptr;
}

namespace {

class Parser {
 public:
  Parser(std::string_view text, const char* ctx, int max_depth)
      : s_(text), ctx_(ctx), max_depth_(max_depth) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) {
      fail("the end of the JSON text");
    }
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& expected) const {
    throw ValueError(
        ctx_, "a JSON safetensors header (" + expected + ")",
        "unparsable JSON at byte " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool eat(char c) {
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect(char c) {
    if (!eat(c)) {
      fail(std::string("'") + c + "'");
    }
  }

  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

  Value value(int depth) {
    if (depth > max_depth_) {
      fail("nesting at most " + std::to_string(max_depth_) + " deep");
    }
    skip_space();
    if (pos_ >= s_.size()) {
      fail("a value");
    }
    char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      Object o;
      if (eat('}')) {
        return Value{std::move(o)};
      }
      do {
        skip_space();
        std::string key = string();
        if (find(o, key) != nullptr) {
          fail("each key once in an object");
        }
        expect(':');
        o.emplace_back(std::move(key), value(depth + 1));
      } while (eat(','));
      expect('}');
      return Value{std::move(o)};
    }
    if (c == '[') {
      ++pos_;
      Array a;
      if (eat(']')) {
        return Value{std::move(a)};
      }
      do {
        a.push_back(value(depth + 1));
      } while (eat(','));
      expect(']');
      return Value{std::move(a)};
    }
    if (c == '"') {
      return Value{string()};
    }
    if (literal("true")) {
      return Value{true};
    }
    if (literal("false")) {
      return Value{false};
    }
    if (literal("null")) {
      return Value{nullptr};
    }
    return Value{integer()};
  }

  int64_t integer() {
    bool negative = pos_ < s_.size() && s_[pos_] == '-';
    if (negative) {
      ++pos_;
    }
    size_t start = pos_;
    uint64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      uint64_t d = static_cast<uint64_t>(s_[pos_] - '0');
      if (v > (static_cast<uint64_t>(INT64_MAX) - d) / 10) {
        fail("an integer within 64 bits");
      }
      v = v * 10 + d;
      ++pos_;
    }
    if (pos_ == start || (s_[start] == '0' && pos_ - start > 1)) {
      fail("a value");
    }
    if (pos_ < s_.size() && (s_[pos_] == '.' || s_[pos_] == 'e' || s_[pos_] == 'E')) {
      fail("integer numbers");
    }
    return negative ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) {
      fail("four hex digits after \\u");
    }
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= c - '0';
      } else if (c >= 'a' && c <= 'f') {
        v |= c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        v |= c - 'A' + 10;
      } else {
        fail("four hex digits after \\u");
      }
    }
    return v;
  }


  // One UTF-8 sequence copied through, checked (no overlongs, surrogates
  // or code points past U+10FFFF).
  void raw_utf8(std::string& out) {
    auto byte = [&](size_t i) { return static_cast<unsigned char>(s_[i]); };
    unsigned char c = byte(pos_);
    int n = c >= 0xF5 ? 0 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (n == 0 || pos_ + n > s_.size()) {
      fail("UTF-8 text");
    }
    uint32_t cp = c & (0x7F >> n);
    for (int i = 1; i < n; ++i) {
      unsigned char b = byte(pos_ + i);
      if ((b & 0xC0) != 0x80) {
        fail("UTF-8 text");
      }
      cp = (cp << 6) | (b & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp < 0xE000))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
      fail("UTF-8 text");
    }
    out.append(s_.substr(pos_, n));
    pos_ += n;
  }

  std::string string() {
    if (pos_ >= s_.size() || s_[pos_] != '"') {
      fail("a string");
    }
    ++pos_;
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) {
        fail("a closing '\"'");
      }
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) {
        fail("no control characters in strings");
      }
      if (c >= 0x80) {
        raw_utf8(out);
        continue;
      }
      ++pos_;
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      if (pos_ >= s_.size()) {
        fail("an escape");
      }
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp < 0xE000) {
            fail("no lone surrogate");
          }
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (!literal("\\u")) {
              fail("a surrogate pair");
            }
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) {
              fail("a surrogate pair");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8_append(out, cp);
          break;
        }
        default:
          fail("a known escape");
      }
    }
  }

  std::string_view s_;
  const char* ctx_;
  int max_depth_;
  size_t pos_ = 0;
};

} // namespace

Value parse(std::string_view text, const char* context, int max_depth) {
  return Parser(text, context, max_depth).document();
}

} // namespace kvcore::json
