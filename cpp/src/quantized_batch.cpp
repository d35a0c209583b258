#include "kvcore/quantized_batch.h"

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "lockstep.h"

namespace kvcore {

namespace {

using lockstep::nth;

bool same(QuantSpec a, QuantSpec b) {
  return a.group_size == b.group_size && a.bits == b.bits;
}

std::string spec_str(QuantSpec k, QuantSpec v) {
  return "group_size (" + std::to_string(k.group_size) + ", " + std::to_string(v.group_size) +
      "), bits (" + std::to_string(k.bits) + ", " + std::to_string(v.bits) + ")";
}

// The error context of update_and_fetch, a literal (no string built per call).
template <class Batch>
constexpr const char* update_ctx() {
  if constexpr (std::is_same_v<Batch, BatchKVCache>) {
    return "QuantizedBatchKVCache.update_and_fetch";
  } else {
    return "QuantizedBatchRotatingKVCache.update_and_fetch";
  }
}

} // namespace

// QuantizedBatchCache -------------------------------------------------------

template <class Batch>
QuantizedBatchCache<Batch>::QuantizedBatchCache(Batch part, QuantSpec keys, QuantSpec values)
    : parts_{part, part, part}, key_spec_(keys), value_spec_(values) {}

template <class Batch>
template <class Op>
void QuantizedBatchCache<Batch>::staged(Op op) {
  lockstep::staged(parts_, op);
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
  check_triples(ctx, keys, values, key_spec, value_spec);
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
  constexpr const char* ctx = update_ctx<Batch>();
  check_kv(ctx, keys, values);
  auto [qk, qv] = quantize_kv(ctx, keys, values, key_spec_, value_spec_);
  return lockstep::update(ctx, parts_, qk, qv);
}

template <class Batch>
std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchCache<Batch>::keys_and_values() const {
  return lockstep::keys_and_values(parts_);
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
  std::vector<OptionalArray> out = lockstep::state_arrays(parts_);
  out.push_back(offset());
  out.push_back(left_padding());
  return out;
}

template <class Batch>
size_t QuantizedBatchCache<Batch>::nbytes() const {
  return lockstep::nbytes(parts_);
}

template <class Batch>
OptionalQuantized QuantizedBatchCache<Batch>::keys() const {
  return lockstep::gather(parts_, false);
}

template <class Batch>
OptionalQuantized QuantizedBatchCache<Batch>::values() const {
  return lockstep::gather(parts_, true);
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

QuantizedBatchKVCache::QuantizedBatchKVCache(
    const std::vector<int>& left_padding,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window,
    int sink)
    : QuantizedBatchKVCache(left_padding, keys, values) {
  check_window("QuantizedBatchKVCache", scheme, window);
  check_sink("QuantizedBatchKVCache", scheme, sink);
  if (scheme != QuantScheme::affine) {
    channel_.emplace(left_padding, keys, values, window, sink);
  }
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  if (channel_) {
    return channel_->update_and_fetch(keys, values);
  }
  return QuantizedBatchCache::update_and_fetch(keys, values);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchKVCache::keys_and_values() const {
  return channel_ ? channel_->keys_and_values() : QuantizedBatchCache::keys_and_values();
}

void QuantizedBatchKVCache::finalize() {
  channel_ ? channel_->finalize() : QuantizedBatchCache::finalize();
}

void QuantizedBatchKVCache::filter(const std::vector<int>& indices) {
  channel_ ? channel_->filter(indices) : QuantizedBatchCache::filter(indices);
}

int QuantizedBatchKVCache::trim(int n) {
  return channel_ ? channel_->trim(n) : QuantizedBatchCache::trim(n);
}

Mask QuantizedBatchKVCache::make_mask(int N, bool return_array, std::optional<int> window_size) const {
  return channel_ ? channel_->make_mask(N, window_size)
                  : QuantizedBatchCache::make_mask(N, return_array, window_size);
}

std::vector<OptionalArray> QuantizedBatchKVCache::state() const {
  return channel_ ? channel_->state() : QuantizedBatchCache::state();
}

bool QuantizedBatchKVCache::empty() const {
  return channel_ ? channel_->empty() : QuantizedBatchCache::empty();
}

size_t QuantizedBatchKVCache::nbytes() const {
  return channel_ ? channel_->nbytes() : QuantizedBatchCache::nbytes();
}

OptionalQuantized QuantizedBatchKVCache::keys() const {
  return channel_ ? channel_->keys() : QuantizedBatchCache::keys();
}

OptionalQuantized QuantizedBatchKVCache::values() const {
  return channel_ ? channel_->values() : QuantizedBatchCache::values();
}

const mx::array& QuantizedBatchKVCache::offset() const {
  return channel_ ? channel_->offset() : QuantizedBatchCache::offset();
}

const mx::array& QuantizedBatchKVCache::left_padding() const {
  return channel_ ? channel_->left_padding() : QuantizedBatchCache::left_padding();
}

int QuantizedBatchKVCache::idx() const {
  return channel_ ? channel_->idx() : QuantizedBatchCache::idx();
}

const OptionalArray& QuantizedBatchKVCache::residual() const {
  static const OptionalArray none;
  return channel_ ? channel_->residual() : none;
}

const OptionalArray& QuantizedBatchKVCache::sink_keys() const {
  static const OptionalArray none;
  return channel_ ? channel_->sink_keys() : none;
}

const OptionalArray& QuantizedBatchKVCache::sink_values() const {
  static const OptionalArray none;
  return channel_ ? channel_->sink_values() : none;
}

const OptionalArray& QuantizedBatchKVCache::value_residual() const {
  static const OptionalArray none;
  return channel_ ? channel_->value_residual() : none;
}

void QuantizedBatchKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& right_padding) {
  if (channel_) {
    channel_->prepare(left_padding, right_padding);
    return;
  }
  staged([&](BatchKVCache& p, int) { p.prepare(left_padding, right_padding); });
}

void QuantizedBatchKVCache::extend(const QuantizedBatchKVCache& other) {
  constexpr const char* ctx = "QuantizedBatchKVCache.extend";
  if (scheme() != other.scheme()) {
    throw ValueError(ctx, std::string("a cache of the scheme '") + scheme_name(scheme()) + "'",
                     std::string("'") + scheme_name(other.scheme()) + "'");
  }
  if (channel_) {
    channel_->extend(*other.channel_);
    return;
  }
  check_same_specs(ctx, other);
  staged([&](BatchKVCache& p, int i) {
    BatchKVCache o = other.parts_[i];
    p.extend(o);
  });
}

QuantizedKVCache QuantizedBatchKVCache::extract(int idx) const {
  if (channel_) {
    return channel_->extract(idx);
  }
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
  if (caches[0]->scheme() != QuantScheme::affine) {
    QuantizedBatchKVCache out(std::vector<int>{}, ks, vs, caches[0]->scheme(), caches[0]->window(),
                              caches[0]->sink());
    out.channel_ = ChannelBatch::merge(caches);
    return out;
  }
  // Each cache's part i as a KVCache over the same offset.
  std::vector<KVCache> views[3];
  for (const auto* c : caches) {
    if (c->scheme() != QuantScheme::affine) {
      throw ValueError(ctx, "caches of one scheme, 'affine'",
                       std::string("'") + scheme_name(c->scheme()) + "'");
    }
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
  return channel_ ? channel_->meta_state() : parts_[0].meta_state();
}

void QuantizedBatchKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedBatchKVCache.state";
  if (meta.size() == 3 || meta.size() == 4) { // rotated_channel, with a sink 4
    const bool sink = meta.size() == 4;
    check_count(ctx, "arrays", arrays.size(), sink ? 12 : 10);
    if (!arrays[6] || !arrays[7]) {
      throw ValueError(ctx, "offset and left_padding arrays", "None");
    }
    if (parse_scheme(ctx, meta[1]) != QuantScheme::rotated_channel) {
      throw ValueError(ctx, "scheme 'rotated-channel' with a window", "'" + meta[1] + "'");
    }
    auto [keys, values] = triples_from_arrays(ctx, arrays);
    set(std::move(keys), std::move(values), *arrays[6], *arrays[7], parse_int(ctx, "_idx", meta[0]),
        arrays[8], arrays[9], key_spec_, value_spec_, parse_int(ctx, "window", meta[2]),
        sink ? parse_int(ctx, "sink", meta[3]) : 0, sink ? arrays[10] : std::nullopt,
        sink ? arrays[11] : std::nullopt);
    return;
  }
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
  channel_.reset();
}

void QuantizedBatchKVCache::set(
    OptionalQuantized keys,
    OptionalQuantized values,
    mx::array offset,
    mx::array left_padding,
    int idx,
    OptionalArray residual,
    OptionalArray value_residual,
    QuantSpec key_spec,
    QuantSpec value_spec,
    int window,
    int sink,
    OptionalArray sink_keys,
    OptionalArray sink_values) {
  ChannelBatch c(std::vector<int>{}, key_spec, value_spec, window);
  c.set(std::move(keys), std::move(values), std::move(offset), std::move(left_padding), idx,
        std::move(residual), std::move(value_residual), key_spec, value_spec, window, sink,
        std::move(sink_keys), std::move(sink_values));
  channel_ = std::move(c);
  for (auto& p : parts_) {
    p = BatchKVCache(std::vector<int>{});
  }
  key_spec_ = key_spec;
  value_spec_ = value_spec;
}

QuantizedBatchKVCache to_quantized(
    const BatchKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window,
    int sink) {
  constexpr const char* ctx = "BatchKVCache.to_quantized";
  check_specs(ctx, keys, values);
  check_sink(ctx, scheme, sink);
  if (scheme != QuantScheme::affine) {
    QuantizedBatchKVCache out(std::vector<int>{}, keys, values, scheme, window, sink);
    out.channel_ = ChannelBatch::from_float(cache, keys, values, window, sink);
    return out;
  }
  auto [qk, qv] = quantize_buffers(ctx, cache.keys(), cache.values(), keys, values);
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
    if (c->scheme() != QuantScheme::affine) {
      // The batch's rings hold whole tokens; these hold groups of them.
      throw ValueError(ctx, "affine caches (a batch of sliding windows takes no other scheme yet)",
                       std::string("a ") + scheme_name(c->scheme()) + " cache");
    }
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
  auto [qk, qv] = quantize_buffers(ctx, cache.keys(), cache.values(), keys, values);
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
