#include "kvcore/quantized_batch.h"

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

// Part i of a triple: 0 weights, 1 scales, 2 biases.
const mx::array& nth(const QuantizedArrays& q, int i) {
  return i == 0 ? std::get<0>(q) : i == 1 ? std::get<1>(q) : std::get<2>(q);
}

OptionalArray nth(const OptionalQuantized& q, int i) {
  if (!q) {
    return std::nullopt;
  }
  return nth(*q, i);
}

template <class Part>
OptionalQuantized gather(const Part (&parts)[3], bool values) {
  const auto& w = values ? parts[0].values() : parts[0].keys();
  if (!w) {
    return std::nullopt;
  }
  auto part = [&](int i) { return values ? *parts[i].values() : *parts[i].keys(); };
  return QuantizedArrays{part(0), part(1), part(2)};
}

void check_specs(const char* ctx, QuantSpec keys, QuantSpec values) {
  check_quantization(ctx, keys.group_size, keys.bits);
  check_quantization(ctx, values.group_size, values.bits);
}

bool same(QuantSpec a, QuantSpec b) {
  return a.group_size == b.group_size && a.bits == b.bits;
}

std::string spec_str(QuantSpec k, QuantSpec v) {
  return "group_size (" + std::to_string(k.group_size) + ", " + std::to_string(v.group_size) +
      "), bits (" + std::to_string(k.bits) + ", " + std::to_string(v.bits) + ")";
}

// Both triples set or both None, each consistent.
void check_triples(const char* ctx, const OptionalQuantized& keys, const OptionalQuantized& values) {
  if (keys.has_value() != values.has_value()) {
    throw ValueError(ctx, "keys and values both set or both None", "only one set");
  }
  if (keys) {
    check_triple(ctx, "keys", *keys);
    check_triple(ctx, "values", *values);
  }
}

// Quantize a float buffer pair (both set or both None).
std::pair<OptionalQuantized, OptionalQuantized> quantize_pair(
    const char* ctx,
    const OptionalArray& keys,
    const OptionalArray& values,
    QuantSpec ks,
    QuantSpec vs) {
  if (!keys || !values) {
    return {std::nullopt, std::nullopt};
  }
  return {quantize(ctx, *keys, ks.group_size, ks.bits),
          quantize(ctx, *values, vs.group_size, vs.bits)};
}

} // namespace

// QuantizedBatchCache -------------------------------------------------------

template <class Batch>
QuantizedBatchCache<Batch>::QuantizedBatchCache(Batch part, QuantSpec keys, QuantSpec values)
    : parts_{part, part, part}, key_spec_(keys), value_spec_(values) {}

template <class Batch>
template <class Op>
void QuantizedBatchCache<Batch>::staged(Op op) {
  Batch copies[3] = {parts_[0], parts_[1], parts_[2]};
  for (int i = 0; i < 3; ++i) {
    op(copies[i], i);
  }
  for (int i = 0; i < 3; ++i) {
    parts_[i] = std::move(copies[i]);
  }
}

template <class Batch>
template <class Assign>
void QuantizedBatchCache<Batch>::set_parts(
    const char* ctx,
    OptionalQuantized keys,
    OptionalQuantized values,
    QuantSpec key_spec,
    QuantSpec value_spec,
    Assign assign) {
  check_specs(ctx, key_spec, value_spec);
  check_triples(ctx, keys, values);
  staged([&](Batch& p, int i) { assign(p, nth(keys, i), nth(values, i), i); });
  key_spec_ = key_spec;
  value_spec_ = value_spec;
}

template <class Batch>
void QuantizedBatchCache<Batch>::check_same_specs(
    const char* ctx,
    const QuantizedBatchCache& other) const {
  if (!same(key_spec_, other.key_spec_) || !same(value_spec_, other.value_spec_)) {
    throw ValueError(ctx, "a cache quantized alike: " + spec_str(key_spec_, value_spec_),
                     spec_str(other.key_spec_, other.value_spec_));
  }
}

template <class Batch>
std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchCache<Batch>::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  std::string ctx = std::string(name()) + ".update_and_fetch";
  check_kv(ctx.c_str(), keys, values);
  auto qk = quantize(ctx.c_str(), keys, key_spec_.group_size, key_spec_.bits);
  auto qv = quantize(ctx.c_str(), values, value_spec_.group_size, value_spec_.bits);
  // The weights' part checks the update against its buffers and the batch;
  // the scales' and biases' hold the same (B, H, S) and position, so once
  // it has passed they cannot fail.
  auto [kw, vw] = parts_[0].update_and_fetch(std::get<0>(qk), std::get<0>(qv));
  auto [ks, vs] = parts_[1].update_and_fetch(std::get<1>(qk), std::get<1>(qv));
  auto [kb, vb] = parts_[2].update_and_fetch(std::get<2>(qk), std::get<2>(qv));
  return {{kw, ks, kb}, {vw, vs, vb}};
}

template <class Batch>
std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchCache<Batch>::keys_and_values() const {
  auto [kw, vw] = parts_[0].keys_and_values();
  auto [ks, vs] = parts_[1].keys_and_values();
  auto [kb, vb] = parts_[2].keys_and_values();
  return {{kw, ks, kb}, {vw, vs, vb}};
}

template <class Batch>
void QuantizedBatchCache<Batch>::finalize() {
  staged([](Batch& p, int) { p.finalize(); });
}

template <class Batch>
void QuantizedBatchCache<Batch>::filter(const std::vector<int>& indices) {
  staged([&](Batch& p, int) { p.filter(indices); });
}

template <class Batch>
int QuantizedBatchCache<Batch>::trim(int n) {
  int done = 0;
  staged([&](Batch& p, int i) {
    int d = p.trim(n);
    if (i == 0) {
      done = d;
    }
  });
  return done;
}

template <class Batch>
std::vector<OptionalArray> QuantizedBatchCache<Batch>::state() const {
  std::vector<OptionalArray> out;
  for (bool v : {false, true}) {
    for (const auto& p : parts_) {
      out.push_back(v ? p.values() : p.keys());
    }
  }
  out.push_back(offset());
  out.push_back(left_padding());
  return out;
}

template <class Batch>
size_t QuantizedBatchCache<Batch>::nbytes() const {
  size_t n = 0;
  for (const auto& p : parts_) {
    n += p.nbytes();
  }
  return n;
}

template <class Batch>
OptionalQuantized QuantizedBatchCache<Batch>::keys() const {
  return gather(parts_, false);
}

template <class Batch>
OptionalQuantized QuantizedBatchCache<Batch>::values() const {
  return gather(parts_, true);
}

template class QuantizedBatchCache<BatchKVCache>;
template class QuantizedBatchCache<BatchRotatingKVCache>;

// QuantizedBatchKVCache -----------------------------------------------------

QuantizedBatchKVCache::QuantizedBatchKVCache(
    const std::vector<int>& left_padding,
    QuantSpec keys,
    QuantSpec values)
    : QuantizedBatchCache(BatchKVCache(left_padding), keys, values) {
  check_specs("QuantizedBatchKVCache", keys, values);
}

void QuantizedBatchKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& right_padding) {
  staged([&](BatchKVCache& p, int) { p.prepare(left_padding, right_padding); });
}

void QuantizedBatchKVCache::extend(const QuantizedBatchKVCache& other) {
  check_same_specs("QuantizedBatchKVCache.extend", other);
  staged([&](BatchKVCache& p, int i) {
    BatchKVCache o = other.parts_[i];
    p.extend(o);
  });
}

QuantizedKVCache QuantizedBatchKVCache::extract(int idx) const {
  KVCache rows[3] = {parts_[0].extract(idx), parts_[1].extract(idx), parts_[2].extract(idx)};
  QuantizedKVCache out(key_spec_, value_spec_);
  out.set(QuantizedArrays{*rows[0].keys(), *rows[1].keys(), *rows[2].keys()},
          QuantizedArrays{*rows[0].values(), *rows[1].values(), *rows[2].values()},
          rows[0].offset(), key_spec_, value_spec_);
  return out;
}

QuantizedBatchKVCache QuantizedBatchKVCache::merge(
    const std::vector<const QuantizedKVCache*>& caches) {
  constexpr const char* ctx = "QuantizedBatchKVCache.merge";
  check_non_null_list(ctx, caches);
  const QuantSpec ks = caches[0]->key_spec(), vs = caches[0]->value_spec();
  // Each cache's part i as a KVCache over the same offset.
  std::vector<KVCache> views[3];
  for (const auto* c : caches) {
    if (!same(c->key_spec(), ks) || !same(c->value_spec(), vs)) {
      throw ValueError(ctx, "caches quantized alike: " + spec_str(ks, vs),
                       spec_str(c->key_spec(), c->value_spec()));
    }
    for (int i = 0; i < 3; ++i) {
      KVCache v;
      v.set(nth(c->keys(), i), nth(c->values(), i), c->offset());
      views[i].push_back(std::move(v));
    }
  }
  QuantizedBatchKVCache out(std::vector<int>{}, ks, vs);
  for (int i = 0; i < 3; ++i) {
    std::vector<const KVCache*> ptrs;
    for (const auto& v : views[i]) {
      ptrs.push_back(&v);
    }
    out.parts_[i] = BatchKVCache::merge(ptrs);
  }
  return out;
}

std::vector<std::string> QuantizedBatchKVCache::meta_state() const {
  return parts_[0].meta_state();
}

void QuantizedBatchKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedBatchKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 8);
  check_count(ctx, "scalars", meta.size(), 1);
  if (!arrays[6] || !arrays[7]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  set(std::move(keys), std::move(values), *arrays[6], *arrays[7], parse_int(ctx, "_idx", meta[0]),
      key_spec_, value_spec_);
}

void QuantizedBatchKVCache::set(
    OptionalQuantized keys,
    OptionalQuantized values,
    mx::array offset,
    mx::array left_padding,
    int idx,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  set_parts("QuantizedBatchKVCache.state", std::move(keys), std::move(values), key_spec,
            value_spec, [&](BatchKVCache& p, OptionalArray k, OptionalArray v, int) {
              p.set(std::move(k), std::move(v), offset, left_padding, idx);
            });
}

QuantizedBatchKVCache to_quantized(const BatchKVCache& cache, QuantSpec keys, QuantSpec values) {
  constexpr const char* ctx = "BatchKVCache.to_quantized";
  check_specs(ctx, keys, values);
  auto [qk, qv] = quantize_pair(ctx, cache.keys(), cache.values(), keys, values);
  QuantizedBatchKVCache out(std::vector<int>{}, keys, values);
  for (int i = 0; i < 3; ++i) {
    // The float cache's bookkeeping (offsets, padding, pending right
    // padding) with part i's arrays.
    BatchKVCache p = cache;
    p.set_keys(nth(qk, i));
    p.set_values(nth(qv, i));
    out.parts_[i] = std::move(p);
  }
  return out;
}

// QuantizedBatchRotatingKVCache ---------------------------------------------

QuantizedBatchRotatingKVCache::QuantizedBatchRotatingKVCache(
    int max_size,
    const std::vector<int>& left_padding,
    QuantSpec keys,
    QuantSpec values)
    : QuantizedBatchCache(BatchRotatingKVCache(max_size, left_padding), keys, values) {
  check_specs("QuantizedBatchRotatingKVCache", keys, values);
}

void QuantizedBatchRotatingKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& lengths,
    const std::optional<std::vector<int>>& right_padding) {
  staged([&](BatchRotatingKVCache& p, int) { p.prepare(left_padding, lengths, right_padding); });
}

void QuantizedBatchRotatingKVCache::extend(const QuantizedBatchRotatingKVCache& other) {
  check_same_specs("QuantizedBatchRotatingKVCache.extend", other);
  staged([&](BatchRotatingKVCache& p, int i) {
    BatchRotatingKVCache o = other.parts_[i];
    p.extend(o);
  });
}

QuantizedRotatingKVCache QuantizedBatchRotatingKVCache::extract(int idx) const {
  RotatingKVCache rows[3] = {parts_[0].extract(idx), parts_[1].extract(idx),
                             parts_[2].extract(idx)};
  const RotatingKVCache& r = rows[0];
  QuantizedRotatingKVCache out(r.max_size(), r.keep(), key_spec_, value_spec_);
  out.set(QuantizedArrays{*rows[0].keys(), *rows[1].keys(), *rows[2].keys()},
          QuantizedArrays{*rows[0].values(), *rows[1].values(), *rows[2].values()}, r.offset(),
          r.keep(), r.max_size(), r.idx(), key_spec_, value_spec_);
  return out;
}

QuantizedBatchRotatingKVCache QuantizedBatchRotatingKVCache::merge(
    const std::vector<const QuantizedRotatingKVCache*>& caches) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.merge";
  check_non_null_list(ctx, caches);
  const QuantSpec ks = caches[0]->key_spec(), vs = caches[0]->value_spec();
  std::vector<const RotatingKVCache*> rings[3];
  for (const auto* c : caches) {
    if (!same(c->key_spec(), ks) || !same(c->value_spec(), vs)) {
      throw ValueError(ctx, "caches quantized alike: " + spec_str(ks, vs),
                       spec_str(c->key_spec(), c->value_spec()));
    }
    for (int i = 0; i < 3; ++i) {
      rings[i].push_back(&c->ring(i));
    }
  }
  QuantizedBatchRotatingKVCache out(caches[0]->max_size(), std::vector<int>{}, ks, vs);
  for (int i = 0; i < 3; ++i) {
    out.parts_[i] = BatchRotatingKVCache::merge(rings[i]);
  }
  return out;
}

std::vector<std::string> QuantizedBatchRotatingKVCache::meta_state() const {
  return parts_[0].meta_state();
}

void QuantizedBatchRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 8);
  check_count(ctx, "scalars", meta.size(), 4);
  if (!arrays[6] || !arrays[7]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  set(std::move(keys), std::move(values), *arrays[6], *arrays[7], parse_int(ctx, "max_size", meta[0]),
      parse_int(ctx, "_offset", meta[1]), parse_int(ctx, "_idx", meta[2]),
      parse_int(ctx, "rotated", meta[3]) != 0, key_spec_, value_spec_);
}

void QuantizedBatchRotatingKVCache::set(
    OptionalQuantized keys,
    OptionalQuantized values,
    mx::array offset,
    mx::array left_padding,
    int max_size,
    int offset_in_ring,
    int idx,
    bool rotated,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  set_parts("QuantizedBatchRotatingKVCache.state", std::move(keys), std::move(values), key_spec,
            value_spec, [&](BatchRotatingKVCache& p, OptionalArray k, OptionalArray v, int) {
              p.set(std::move(k), std::move(v), offset, left_padding, max_size, offset_in_ring,
                    idx, rotated);
            });
}

QuantizedBatchRotatingKVCache to_quantized(
    const BatchRotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values) {
  constexpr const char* ctx = "BatchRotatingKVCache.to_quantized";
  check_specs(ctx, keys, values);
  auto [qk, qv] = quantize_pair(ctx, cache.keys(), cache.values(), keys, values);
  QuantizedBatchRotatingKVCache out(cache.max_size(), std::vector<int>{}, keys, values);
  for (int i = 0; i < 3; ++i) {
    BatchRotatingKVCache p = cache;
    p.set_keys(nth(qk, i));
    p.set_values(nth(qv, i));
    out.parts_[i] = std::move(p);
  }
  return out;
}

} // namespace kvcore
