// Small caches of every class in typical states (empty, filled, wrapped,
// nested), and a "next update" that fits any of them: shared by the file
// tests and the loader fuzzer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kvcore/kvcore.h"
#include "support.h"

namespace kvtest {

/// Feed update_and_fetch one (B, H, S, D) input per entry of `sizes`.
template <class C>
C& feed(C& c, const std::vector<int>& sizes, int B, int H, int D, mx::Dtype dtype, uint64_t seed) {
  for (int S : sizes) {
    auto k = randn({B, H, S, D}, dtype, seed++);
    auto v = randn({B, H, S, D}, dtype, seed++);
    c.update_and_fetch(k, v);
  }
  return c;
}

struct Sample {
  std::string label;
  std::shared_ptr<kvcore::Cache> cache;
};

/// One cache of each class, filled, plus the empty and nested forms.
/// Buffers grow in small steps so the files stay small.
inline std::vector<Sample> sample_caches() {
  using namespace kvcore;
  std::vector<Sample> out;
  auto add = [&](std::string label, std::shared_ptr<Cache> c) {
    out.push_back({std::move(label), std::move(c)});
  };

  auto kv = std::make_shared<KVCache>();
  kv->set_step(4);
  feed(*kv, {3, 2}, 1, 2, 4, mx::float16, 1);
  add("KVCache", kv);
  add("KVCache(empty)", std::make_shared<KVCache>());

  auto cat = std::make_shared<ConcatenateKVCache>();
  feed(*cat, {2, 1}, 1, 2, 4, mx::float32, 10);
  add("ConcatenateKVCache", cat);
  add("ConcatenateKVCache(empty)", std::make_shared<ConcatenateKVCache>());

  auto rot = std::make_shared<RotatingKVCache>(6, 2);
  rot->set_step(4);
  feed(*rot, {4, 1, 1, 1, 1, 1}, 1, 1, 4, mx::float32, 20);
  add("RotatingKVCache(wrapped)", rot);
  auto rot_small = std::make_shared<RotatingKVCache>(8, 4);
  feed(*rot_small, {3}, 1, 1, 4, mx::bfloat16, 25);
  add("RotatingKVCache", rot_small);
  add("RotatingKVCache(empty)", std::make_shared<RotatingKVCache>(8, 4));

  auto q = std::make_shared<QuantizedKVCache>(32, 4);
  q->set_step(4);
  feed(*q, {3, 1}, 1, 1, 32, mx::float16, 30);
  add("QuantizedKVCache", q);
  add("QuantizedKVCache(empty)", std::make_shared<QuantizedKVCache>(64, 8));

  auto ch = std::make_shared<ChunkedKVCache>(4);
  ch->set_step(4);
  feed(*ch, {3, 2}, 1, 1, 4, mx::float32, 40);
  ch->maybe_trim_front();
  feed(*ch, {1}, 1, 1, 4, mx::float32, 45);
  add("ChunkedKVCache", ch);

  auto arr = std::make_shared<ArraysCache>(3, mx::array({1, 0}));
  arr->set(0, randn({2, 3, 4}, mx::float32, 50));
  arr->set(2, randn({2, 2, 2}, mx::bfloat16, 51));
  arr->prepare(mx::array({3, 4}));
  add("ArraysCache", arr);
  add("ArraysCache(empty)", std::make_shared<ArraysCache>(2));

  auto inner_kv = std::make_shared<KVCache>();
  inner_kv->set_step(4);
  feed(*inner_kv, {2}, 1, 1, 4, mx::float16, 60);
  auto inner_arr = std::make_shared<ArraysCache>(1);
  inner_arr->set(0, randn({1, 3, 4}, mx::float32, 61));
  add("CacheList", std::make_shared<CacheList>(std::vector<std::shared_ptr<Cache>>{inner_kv, inner_arr}));

  auto deep_rot = std::make_shared<RotatingKVCache>(4);
  feed(*deep_rot, {1, 1, 1, 1, 1}, 1, 1, 4, mx::float32, 70);
  auto deep_ch = std::make_shared<ChunkedKVCache>(8);
  deep_ch->set_step(4);
  feed(*deep_ch, {2}, 1, 1, 4, mx::float32, 72);
  auto inner_list = std::make_shared<CacheList>(std::vector<std::shared_ptr<Cache>>{deep_rot});
  add("CacheList(nested)",
      std::make_shared<CacheList>(std::vector<std::shared_ptr<Cache>>{inner_list, deep_ch}));

  auto b = std::make_shared<BatchKVCache>(std::vector<int>{1, 0});
  b->set_step(4);
  feed(*b, {3, 1}, 2, 1, 4, mx::float16, 80);
  add("BatchKVCache", b);
  add("BatchKVCache(empty)", std::make_shared<BatchKVCache>(std::vector<int>{0, 2}));

  auto br = std::make_shared<BatchRotatingKVCache>(4, std::vector<int>{1, 0});
  br->set_step(4);
  feed(*br, {3, 1, 1, 1}, 2, 1, 4, mx::float32, 90);
  add("BatchRotatingKVCache(rotated)", br);
  add("BatchRotatingKVCache(empty)", std::make_shared<BatchRotatingKVCache>(5, std::vector<int>{2}));
  return out;
}

/// The arrays one more update of S tokens returns, with an input shaped
/// like what the cache holds (B, H, D and dtype), flattened; none for a
/// cache without update_and_fetch. Members of a CacheList each get one.
inline std::vector<mx::array> next_update(kvcore::Cache& c, int S, uint64_t seed) {
  using namespace kvcore;
  std::vector<mx::array> out;
  auto kv_input = [&](const OptionalArray& keys, const OptionalArray& values, int B) {
    int H = 1, Dk = 4, Dv = 4;
    mx::Dtype t = mx::float32;
    if (keys && keys->ndim() == 4 && values && values->ndim() == 4) {
      B = keys->shape(0);
      H = keys->shape(1);
      Dk = keys->shape(3);
      Dv = values->shape(3);
      t = keys->dtype();
    }
    return std::make_pair(randn({B, H, S, Dk}, t, seed), randn({B, H, S, Dv}, t, seed + 1));
  };
  if (auto* s = dynamic_cast<SequenceCache*>(&c)) {
    auto [k, v] = kv_input(s->keys(), s->values(), 1);
    auto [a, b] = s->update_and_fetch(k, v);
    out = {a, b};
  } else if (auto* bc = dynamic_cast<BatchCache*>(&c)) {
    auto [k, v] = kv_input(bc->keys(), bc->values(), static_cast<int>(bc->offset().size()));
    auto [a, b] = bc->update_and_fetch(k, v);
    out = {a, b};
  } else if (auto* q = dynamic_cast<QuantizedKVCache*>(&c)) {
    int B = 1, H = 1, D = q->group_size();
    mx::Dtype t = mx::float16;
    if (q->keys()) {
      auto& w = std::get<0>(*q->keys());
      auto& scales = std::get<1>(*q->keys());
      if (w.ndim() == 4) {
        B = w.shape(0);
        H = w.shape(1);
        D = w.shape(3) * 32 / q->bits();
      }
      t = scales.dtype();
    }
    auto [kq, vq] = q->update_and_fetch(randn({B, H, S, D}, t, seed), randn({B, H, S, D}, t, seed + 1));
    out = {std::get<0>(kq), std::get<1>(kq), std::get<2>(kq),
           std::get<0>(vq), std::get<1>(vq), std::get<2>(vq)};
  } else if (auto* l = dynamic_cast<CacheList*>(&c)) {
    for (size_t i = 0; i < l->count(); ++i) {
      auto part = next_update((*l)[i], S, seed + 10 * (i + 1));
      out.insert(out.end(), part.begin(), part.end());
    }
  }
  return out;
}

} // namespace kvtest
