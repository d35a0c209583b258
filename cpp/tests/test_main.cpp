#include <string>

#include "test.h"

// With a name, runs that test alone (ctest registers each test so).
int main(int argc, char** argv) {
  int passed = 0, failed = 0;
  for (auto& c : kvtest::registry()) {
    if (argc > 1 && std::string(argv[1]) != c.name) {
      continue;
    }
    int before = kvtest::failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      kvtest::fail(c.name, 0, std::string("uncaught: ") + e.what());
    }
    bool ok = kvtest::failures() == before;
    std::cout << (ok ? "ok   " : "FAIL ") << c.name << "\n";
    (ok ? passed : failed)++;
  }
  if (argc > 1 && passed + failed == 0) {
    std::cout << "no test named " << argv[1] << "\n";
    return 1;
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
