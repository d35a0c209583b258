// A toy decode loop on kvcore's caches: prefill a prompt, then one token a
// step, with a full-attention and a sliding-window cache per layer.
#include <iostream>
#include <memory>
#include <vector>

#include <mlx/mlx.h>

#include <kvcore/kv.h>
#include <kvcore/mask.h>
#include <kvcore/rotating.h>

namespace mx = mlx::core;

int main() {
  const int B = 1, H = 2, D = 16, prompt = 12, steps = 20;
  std::vector<std::unique_ptr<kvcore::SequenceCache>> layers;
  layers.push_back(std::make_unique<kvcore::KVCache>());
  layers.push_back(std::make_unique<kvcore::RotatingKVCache>(/*max_size=*/16, /*keep=*/4));

  auto attend = [](const mx::array& q, const mx::array& k, const mx::array& v,
                   const kvcore::Mask& mask) {
    std::string mode;
    std::optional<mx::array> arr;
    if (auto* s = std::get_if<std::string>(&mask)) mode = *s;
    if (auto* a = std::get_if<mx::array>(&mask)) arr = *a;
    return mx::fast::scaled_dot_product_attention(q, k, v, 0.25f, mode, arr);
  };

  for (int step = 0; step <= steps; ++step) {
    int S = step == 0 ? prompt : 1;
    auto x = mx::random::normal({B, H, S, D});
    for (auto& cache : layers) {
      auto mask = cache->make_mask(S);
      auto [k, v] = cache->update_and_fetch(x, x);
      x = attend(x, k, v, mask);
    }
    mx::eval(x);
  }
  auto& full = static_cast<kvcore::KVCache&>(*layers[0]);
  auto& window = static_cast<kvcore::RotatingKVCache&>(*layers[1]);
  std::cout << "KVCache offset " << full.offset() << ", " << full.nbytes() << " bytes\n";
  std::cout << "RotatingKVCache offset " << window.offset() << ", holds " << window.size()
            << " of max " << window.max_size() << "\n";
  bool ok = full.offset() == prompt + steps && window.size() == 16;
  std::cout << (ok ? "decode example: ok" : "decode example: WRONG") << "\n";
  return ok ? 0 : 1;
}
