#include "kvcore/quantized_rotating.h"

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "lockstep.h"

namespace kvcore {

QuantizedRotatingKVCache::QuantizedRotatingKVCache(
    int max_size,
    int keep,
    QuantSpec keys,
    QuantSpec values)
    : rings_{RotatingKVCache(max_size, keep), RotatingKVCache(max_size, keep),
             RotatingKVCache(max_size, keep)},
      key_spec_(keys),
      value_spec_(values) {
  check_specs("QuantizedRotatingKVCache", keys, values);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  auto [qk, qv] = quantize_kv(ctx, keys, values, key_spec_, value_spec_);
  return lockstep::update(ctx, rings_, qk, qv);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::keys_and_values() const {
  return lockstep::keys_and_values(rings_);
}

int QuantizedRotatingKVCache::trim(int n) {
  // The weights' ring refuses first (after rotation); the others follow it.
  int done = rings_[0].trim(n);
  rings_[1].trim(n);
  rings_[2].trim(n);
  return done;
}

OptionalQuantized QuantizedRotatingKVCache::keys() const {
  return lockstep::gather(rings_, false);
}

OptionalQuantized QuantizedRotatingKVCache::values() const {
  return lockstep::gather(rings_, true);
}

std::vector<OptionalArray> QuantizedRotatingKVCache::state() const {
  return lockstep::state_arrays(rings_);
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
  check_specs(ctx, key_spec, value_spec);
  check_triples(ctx, keys, values, key_spec, value_spec);
  // Each ring validates its part; all three are replaced together.
  lockstep::staged(rings_, [&](RotatingKVCache& r, int i) {
    r.set(lockstep::nth(keys, i), lockstep::nth(values, i), offset, keep, max_size, idx);
  });
  key_spec_ = key_spec;
  value_spec_ = value_spec;
}

size_t QuantizedRotatingKVCache::nbytes() const {
  return lockstep::nbytes(rings_);
}

QuantizedRotatingKVCache to_quantized(
    const RotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values) {
  constexpr const char* ctx = "RotatingKVCache.to_quantized";
  QuantizedRotatingKVCache out(cache.max_size(), cache.keep(), keys, values);
  auto [qk, qv] = quantize_buffers(ctx, cache.keys(), cache.values(), keys, values);
  out.set(std::move(qk), std::move(qv), cache.offset(), cache.keep(), cache.max_size(),
          cache.idx(), keys, values);
  return out;
}

} // namespace kvcore
