// A small test harness: TEST(name) registers a case, CHECK records a
// failure and goes on, REQUIRE_THROWS checks the exception type and text.
#pragma once

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace kvtest {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) {
    registry().push_back({name, std::move(fn)});
  }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": FAILED: " << what << "\n";
}

} // namespace kvtest

#define KV_CAT2(a, b) a##b
#define KV_CAT(a, b) KV_CAT2(a, b)
#define TEST(name)                                                   \
  static void name();                                                \
  static kvtest::Register KV_CAT(reg_, name)(#name, name);           \
  static void name()

#define CHECK(cond)                                \
  do {                                             \
    if (!(cond)) kvtest::fail(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_EQ(a, b)                                                      \
  do {                                                                      \
    auto _a = (a);                                                          \
    auto _b = (b);                                                          \
    if (!(_a == _b))                                                        \
      kvtest::fail(__FILE__, __LINE__,                                      \
                   std::string(#a " == " #b ": ") + std::to_string(_a) +    \
                       " vs " + std::to_string(_b));                        \
  } while (0)

// Runs stmt, expecting exception type E whose what() contains `text`.
#define CHECK_THROWS(E, text, stmt)                                         \
  do {                                                                      \
    bool _thrown = false;                                                   \
    try {                                                                   \
      stmt;                                                                 \
    } catch (const E& _e) {                                                 \
      _thrown = true;                                                       \
      if (std::string(_e.what()).find(text) == std::string::npos)           \
        kvtest::fail(__FILE__, __LINE__,                                    \
                     std::string("message '") + _e.what() +                 \
                         "' lacks '" + text + "'");                         \
    } catch (const std::exception& _e) {                                    \
      _thrown = true;                                                       \
      kvtest::fail(__FILE__, __LINE__,                                      \
                   std::string("wrong exception: ") + _e.what());           \
    }                                                                       \
    if (!_thrown)                                                           \
      kvtest::fail(__FILE__, __LINE__, "no exception from " #stmt);         \
  } while (0)
