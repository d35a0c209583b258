#include "kvcore/quantized_rotating.h"

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

OptionalQuantized gather(const RotatingKVCache (&rings)[3], bool values) {
  const auto& w = values ? rings[0].values() : rings[0].keys();
  if (!w) {
    return std::nullopt;
  }
  auto part = [&](int i) { return values ? *rings[i].values() : *rings[i].keys(); };
  return QuantizedArrays{part(0), part(1), part(2)};
}

} // namespace

QuantizedRotatingKVCache::QuantizedRotatingKVCache(
    int max_size,
    int keep,
    QuantSpec keys,
    QuantSpec values)
    : rings_{RotatingKVCache(max_size, keep), RotatingKVCache(max_size, keep),
             RotatingKVCache(max_size, keep)},
      key_spec_(keys),
      value_spec_(values) {
  check_quantization("QuantizedRotatingKVCache", keys.group_size, keys.bits);
  check_quantization("QuantizedRotatingKVCache", values.group_size, values.bits);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  auto qk = quantize(ctx, keys, key_spec_.group_size, key_spec_.bits);
  auto qv = quantize(ctx, values, value_spec_.group_size, value_spec_.bits);
  // The weights' ring checks the update against its buffers first; the
  // scales' and biases' rings hold the same (B, H, S) and cursor, so once
  // it has passed they cannot fail, and no ring is left behind the others.
  auto [kw, vw] = rings_[0].update_and_fetch(std::get<0>(qk), std::get<0>(qv));
  auto [ks, vs] = rings_[1].update_and_fetch(std::get<1>(qk), std::get<1>(qv));
  auto [kb, vb] = rings_[2].update_and_fetch(std::get<2>(qk), std::get<2>(qv));
  return {{kw, ks, kb}, {vw, vs, vb}};
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::keys_and_values() const {
  auto [kw, vw] = rings_[0].keys_and_values();
  auto [ks, vs] = rings_[1].keys_and_values();
  auto [kb, vb] = rings_[2].keys_and_values();
  return {{kw, ks, kb}, {vw, vs, vb}};
}

int QuantizedRotatingKVCache::trim(int n) {
  int done = rings_[0].trim(n);
  rings_[1].trim(n);
  rings_[2].trim(n);
  return done;
}

OptionalQuantized QuantizedRotatingKVCache::keys() const {
  return gather(rings_, false);
}

OptionalQuantized QuantizedRotatingKVCache::values() const {
  return gather(rings_, true);
}

std::vector<OptionalArray> QuantizedRotatingKVCache::state() const {
  std::vector<OptionalArray> out;
  for (bool v : {false, true}) {
    for (const auto& r : rings_) {
      out.push_back(v ? r.values() : r.keys());
    }
  }
  return out;
}

void QuantizedRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 6);
  check_count(ctx, "scalars", meta.size(), 0);
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  set(std::move(keys), std::move(values), offset(), keep(), max_size(), idx(), key_spec_, value_spec_);
}

void QuantizedRotatingKVCache::set(
    OptionalQuantized keys,
    OptionalQuantized values,
    int offset,
    int keep,
    int max_size,
    int idx,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.state";
  check_quantization(ctx, key_spec.group_size, key_spec.bits);
  check_quantization(ctx, value_spec.group_size, value_spec.bits);
  if (keys.has_value() != values.has_value()) {
    throw ValueError(ctx, "keys and values both set or both None", "only one set");
  }
  if (keys) {
    check_triple(ctx, "keys", *keys);
    check_triple(ctx, "values", *values);
  }
  // Staged: each ring validates its part; all three are replaced together.
  RotatingKVCache staged[3] = {rings_[0], rings_[1], rings_[2]};
  for (int i = 0; i < 3; ++i) {
    auto part = [&](const OptionalQuantized& q) -> OptionalArray {
      if (!q) {
        return std::nullopt;
      }
      return i == 0 ? std::get<0>(*q) : i == 1 ? std::get<1>(*q) : std::get<2>(*q);
    };
    staged[i].set(part(keys), part(values), offset, keep, max_size, idx);
  }
  for (int i = 0; i < 3; ++i) {
    rings_[i] = std::move(staged[i]);
  }
  key_spec_ = key_spec;
  value_spec_ = value_spec;
}

size_t QuantizedRotatingKVCache::nbytes() const {
  size_t n = 0;
  for (const auto& r : rings_) {
    n += r.nbytes();
  }
  return n;
}

QuantizedRotatingKVCache to_quantized(
    const RotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values) {
  constexpr const char* ctx = "RotatingKVCache.to_quantized";
  QuantizedRotatingKVCache out(cache.max_size(), cache.keep(), keys, values);
  OptionalQuantized qk, qv;
  if (cache.keys() && cache.values()) {
    qk = quantize(ctx, *cache.keys(), keys.group_size, keys.bits);
    qv = quantize(ctx, *cache.values(), values.group_size, values.bits);
  }
  out.set(std::move(qk), std::move(qv), cache.offset(), cache.keep(), cache.max_size(),
          cache.idx(), keys, values);
  return out;
}

} // namespace kvcore
