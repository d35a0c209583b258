#include "kvcore/quantized_batch.h"

#include <algorithm>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"
#include "batch_rows.h"
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

namespace {

// The tokens BatchRotatingKVCache::merge takes from a float RotatingKVCache
// of c's tokens (its newest min(offset, max_size) in temporal order: the
// ring holds its `keep` first tokens, then the newest max_size - keep after
// a single token, or max_size - 1 - keep and the update's after an update
// of several), quantized again by a fresh rotated-channel cache without a
// sink (the sink's tokens read from their float copies first).
QuantizedKVCache ring_tokens(const QuantizedRotatingKVCache& c) {
  const QuantizedKVCache& h = c.held();
  QuantizedKVCache out(h.key_spec(), h.value_spec(), QuantScheme::rotated_channel, h.window(), 0);
  if (h.empty() || h.offset() == 0) {
    return out;
  }
  const int t = h.quantized_tokens(), G = h.key_spec().group_size;
  const auto dtype = std::get<1>(*h.keys()).dtype();
  std::vector<mx::array> k, v;
  if (t > 0) {
    const auto& [vw, vs, vb] = *h.values();
    k.push_back(dequantize_channel_keys(*h.keys(), 0, t / G * G, G, h.key_spec().bits, dtype));
    v.push_back(mx::dequantize(seq_slice(vw, 0, t), seq_slice(vs, 0, t), seq_slice(vb, 0, t),
                               h.value_spec().group_size, h.value_spec().bits, "affine", std::nullopt, dtype));
  }
  if (h.residual()) {
    k.push_back(*h.residual());
    v.push_back(*h.value_residual());
  }
  auto keys = seq_concat(k), values = seq_concat(v);
  if (h.sink_keys()) {
    const int n = std::min(h.sink_keys()->shape(2), h.offset());
    keys = seq_concat({seq_slice(*h.sink_keys(), 0, n), seq_slice(keys, n, keys.shape(2))});
    values = seq_concat({seq_slice(*h.sink_values(), 0, n), seq_slice(values, n, values.shape(2))});
  }
  const int o = c.offset(), K = c.keep(), M = c.max_size(), d = c.dropped();
  if (o > M) {
    // The ring's Lf tokens are the pinned then the newest Lf - K (held from
    // o - (Lf - K) less the dropped tokens); the merge takes the last M.
    const long long Lf = std::min<long long>(o, std::max<long long>(M, 1LL * M - 1 + c.last_update()));
    const int newest = static_cast<int>(std::min<long long>(Lf - K, M)), pinned = M - newest;
    const int from = o - newest - d, held = keys.shape(2);
    std::vector<mx::array> kp{seq_slice(keys, from, held)}, vp{seq_slice(values, from, held)};
    if (pinned > 0) { // the last `pinned` of the K first tokens
      kp.insert(kp.begin(), seq_slice(keys, K - pinned, K));
      vp.insert(vp.begin(), seq_slice(values, K - pinned, K));
    }
    keys = seq_concat(std::move(kp));
    values = seq_concat(std::move(vp));
  }
  // Held rotated: rotated back, as the update rotates.
  out.update_and_fetch(hadamard(keys), hadamard(values));
  return out;
}

} // namespace

QuantizedBatchRotatingKVCache::QuantizedBatchRotatingKVCache(
    int max_size,
    const std::vector<int>& left_padding,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window)
    : QuantizedBatchCache(BatchRotatingKVCache(max_size, left_padding), keys, values) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache";
  check_specs(ctx, keys, values);
  check_window(ctx, scheme, window);
  if (scheme != QuantScheme::affine) {
    channel_.emplace(left_padding, keys, values, window);
  }
}

const ChannelBatch& QuantizedBatchRotatingKVCache::held() const {
  if (!channel_) {
    throw ValueError("QuantizedBatchRotatingKVCache.held", "a rotated-channel cache", "an affine one");
  }
  return *channel_;
}

int QuantizedBatchRotatingKVCache::droppable() const {
  // Positions below idx - (max_size - 1) are out of every later query's
  // window (BatchRotatingKVCache keeps max_size - 1 before an update);
  // none while right padding waits for finalize.
  if (channel_->right_padded()) {
    return 0;
  }
  const int G = key_spec_.group_size, M = max_size();
  const int n = std::min(channel_->idx() - (M - 1), channel_->quantized_tokens()) / G * G;
  return n >= std::max(G, M / 8 / G * G) ? n : 0;
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  if (!channel_) {
    return QuantizedBatchCache::update_and_fetch(keys, values);
  }
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.update_and_fetch";
  if (channel_->right_padded() && keys.ndim() == 4 && keys.shape(2) == 1) {
    // As BatchRotatingKVCache: a single token decodes, and decoding waits
    // for the rows to be rolled.
    throw RuntimeError(ctx, "finalize() should be called before decoding with QuantizedBatchRotatingKVCache");
  }
  try {
    if (const int n = keys.ndim() == 4 && keys.shape(2) > 0 ? droppable() : 0; n > 0) {
      ChannelBatch next = *channel_; // staged: a failed update changes nothing
      next.drop_front(n);
      auto out = next.update_and_fetch(keys, values);
      channel_ = std::move(next);
      dropped_ += n;
      return out;
    }
    return channel_->update_and_fetch(keys, values);
  } catch (const CacheError& e) {
    rethrow_from(e, ctx);
  }
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedBatchRotatingKVCache::keys_and_values() const {
  return channel_ ? channel_->keys_and_values() : QuantizedBatchCache::keys_and_values();
}

void QuantizedBatchRotatingKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& lengths,
    const std::optional<std::vector<int>>& right_padding) {
  if (channel_) {
    // The rows' lengths are what their right padding leaves: finalize
    // rolls each row by its padding.
    try {
      channel_->prepare(left_padding, right_padding);
    } catch (const CacheError& e) {
      rethrow_from(e, "QuantizedBatchRotatingKVCache.prepare");
    }
    return;
  }
  staged([&](BatchRotatingKVCache& p, int) { p.prepare(left_padding, lengths, right_padding); });
}

void QuantizedBatchRotatingKVCache::finalize() {
  channel_ ? channel_->finalize() : QuantizedBatchCache::finalize();
}

void QuantizedBatchRotatingKVCache::filter(const std::vector<int>& indices) {
  if (!channel_) {
    QuantizedBatchCache::filter(indices);
    return;
  }
  // Whole groups of padding every kept row has are cut: they count as
  // dropped positions.
  const int before = channel_->idx();
  channel_->filter(indices);
  dropped_ += before - channel_->idx();
}

int QuantizedBatchRotatingKVCache::trim(int n) {
  if (!channel_) {
    return QuantizedBatchCache::trim(n);
  }
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.trim";
  check_size(ctx, "n", n);
  if (std::min(n, offset_in_ring()) > 0 && !is_trimmable()) {
    throw RuntimeError(ctx, "_offset < max_size (nothing rotated out yet)",
                       "_offset " + std::to_string(offset_in_ring()) + " with max_size " + std::to_string(max_size()));
  }
  return channel_->trim(n); // nothing dropped before _offset reaches max_size
}

Mask QuantizedBatchRotatingKVCache::make_mask(int N, bool return_array, std::optional<int> window_size) const {
  if (!channel_) {
    return QuantizedBatchCache::make_mask(N, return_array, window_size);
  }
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.make_mask";
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  // Each row's positions after the update's drop, windowed as
  // BatchRotatingKVCache windows them.
  const int n = droppable();
  return create_causal_mask(N, channel_->idx() - n, (window_size && *window_size) ? *window_size : max_size(),
                            std::nullopt, mx::subtract(channel_->left_padding(), mx::array(n, mx::int32)));
}

std::vector<OptionalArray> QuantizedBatchRotatingKVCache::state() const {
  return channel_ ? channel_->state() : QuantizedBatchCache::state();
}

bool QuantizedBatchRotatingKVCache::empty() const {
  return channel_ ? channel_->empty() : QuantizedBatchCache::empty();
}

size_t QuantizedBatchRotatingKVCache::nbytes() const {
  return channel_ ? channel_->nbytes() : QuantizedBatchCache::nbytes();
}

OptionalQuantized QuantizedBatchRotatingKVCache::keys() const {
  return channel_ ? channel_->keys() : QuantizedBatchCache::keys();
}

OptionalQuantized QuantizedBatchRotatingKVCache::values() const {
  return channel_ ? channel_->values() : QuantizedBatchCache::values();
}

const mx::array& QuantizedBatchRotatingKVCache::offset() const {
  return channel_ ? channel_->offset() : QuantizedBatchCache::offset();
}

const mx::array& QuantizedBatchRotatingKVCache::left_padding() const {
  return channel_ ? channel_->left_padding() : QuantizedBatchCache::left_padding();
}

int QuantizedBatchRotatingKVCache::idx() const {
  return channel_ ? channel_->idx() : QuantizedBatchCache::idx();
}

const OptionalArray& QuantizedBatchRotatingKVCache::residual() const {
  static const OptionalArray none;
  return channel_ ? channel_->residual() : none;
}

const OptionalArray& QuantizedBatchRotatingKVCache::value_residual() const {
  static const OptionalArray none;
  return channel_ ? channel_->value_residual() : none;
}

void QuantizedBatchRotatingKVCache::extend(const QuantizedBatchRotatingKVCache& other) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.extend";
  check_same_specs(ctx, other);
  if (channel_.has_value() != other.channel_.has_value() || other.max_size() != max_size()) {
    auto article = [](QuantScheme s) { return s == QuantScheme::affine ? "an " : "a "; };
    throw ValueError(ctx, article(scheme()) + std::string(scheme_name(scheme())) + " batch of max_size " +
                              std::to_string(max_size()),
                     article(other.scheme()) + std::string(scheme_name(other.scheme())) + " one of max_size " +
                         std::to_string(other.max_size()));
  }
  if (channel_) {
    const int written = std::max(offset_in_ring(), other.offset_in_ring());
    ChannelBatch next = *channel_;
    try {
      next.extend(*other.channel_);
    } catch (const CacheError& e) {
      rethrow_from(e, ctx);
    }
    channel_ = std::move(next);
    dropped_ = std::max(0, written - channel_->idx());
    return;
  }
  staged([&](BatchRotatingKVCache& p, int i) {
    BatchRotatingKVCache o = other.parts_[i];
    p.extend(o);
  });
}

QuantizedRotatingKVCache QuantizedBatchRotatingKVCache::extract(int idx) const {
  if (channel_) {
    constexpr const char* ctx = "QuantizedBatchRotatingKVCache.extract";
    QuantizedKVCache row = [&] {
      try {
        return channel_->extract(idx);
      } catch (const CacheError& e) {
        rethrow_from(e, ctx);
      }
    }();
    // Its tokens before the held ones went with the dropped positions (a
    // row still in its padding has none: refused, as the float batch does).
    const int seen = check_size(ctx, "the row's offset", batch_rows::to_ints(offset())[idx]);
    QuantizedRotatingKVCache out(max_size(), 0, key_spec_, value_spec_, QuantScheme::rotated_channel,
                                 channel_->window());
    out.set_channel(std::move(row), seen, 0, max_size());
    return out;
  }
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
  const QuantScheme scheme = caches[0]->scheme();
  for (const auto* c : caches) {
    if (c->scheme() != scheme || c->max_size() != caches[0]->max_size()) {
      throw ValueError(ctx, std::string("caches of one scheme and max_size: ") + scheme_name(scheme) + ", " +
                                std::to_string(caches[0]->max_size()),
                       std::string(scheme_name(c->scheme())) + ", " + std::to_string(c->max_size()));
    }
    if (!same(c->key_spec(), ks) || !same(c->value_spec(), vs)) {
      throw ValueError(ctx, "caches quantized alike: " + spec_str(ks, vs),
                       spec_str(c->key_spec(), c->value_spec()));
    }
  }
  if (scheme != QuantScheme::affine) {
    // A cache with pinned tokens or a sink becomes the float ring's tokens,
    // as BatchRotatingKVCache::merge takes them (the batch pins none).
    std::vector<QuantizedKVCache> rebuilt;
    rebuilt.reserve(caches.size());
    std::vector<const QuantizedKVCache*> held;
    std::vector<int> seen;
    for (const auto* c : caches) {
      if (c->keep() > 0 || c->held().sink() > 0) {
        rebuilt.push_back(ring_tokens(*c));
        held.push_back(&rebuilt.back());
      } else {
        held.push_back(&c->held());
      }
      seen.push_back(c->offset());
    }
    auto batch = [&] {
      try {
        return ChannelBatch::merge(held);
      } catch (const CacheError& e) {
        rethrow_from(e, ctx);
      }
    }();
    // Rows count all their tokens: a row whose first ones were dropped has
    // its padding below its held tokens' (those positions are outside its
    // window: it holds at least max_size - 1 tokens).
    std::vector<int> pads;
    for (int o : seen) {
      pads.push_back(batch.idx() - o);
    }
    batch.set_rows(mx::array(seen.data(), {static_cast<int>(seen.size())}, mx::int32),
                   mx::array(pads.data(), {static_cast<int>(pads.size())}, mx::int32));
    // As BatchRotatingKVCache::merge: the positions written start at the
    // batch's (_offset is _idx).
    QuantizedBatchRotatingKVCache out(caches[0]->max_size(), std::vector<int>{}, ks, vs);
    out.channel_ = std::move(batch);
    return out;
  }
  std::vector<const RotatingKVCache*> rings[3];
  for (const auto* c : caches) {
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
  auto out = parts_[0].meta_state();
  if (channel_) {
    out = {std::to_string(max_size()), std::to_string(offset_in_ring()), std::to_string(idx()), "0",
           scheme_name(QuantScheme::rotated_channel), std::to_string(channel_->window())};
  }
  return out;
}

void QuantizedBatchRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
  const bool channel = meta.size() == 6;
  check_count(ctx, "arrays", arrays.size(), channel ? 10 : 8);
  check_count(ctx, "scalars", meta.size(), channel ? 6 : 4);
  if (!arrays[6] || !arrays[7]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  if (channel) {
    if (parse_scheme(ctx, meta[4]) != QuantScheme::rotated_channel) {
      throw ValueError(ctx, "scheme 'rotated-channel' in a 6-scalar meta_state", "'" + meta[4] + "'");
    }
    ChannelBatch held(std::vector<int>{}, key_spec_, value_spec_, 0);
    try {
      held.set(std::move(keys), std::move(values), *arrays[6], *arrays[7], parse_int(ctx, "_idx", meta[2]),
               arrays[8], arrays[9], key_spec_, value_spec_, parse_int(ctx, "window", meta[5]));
    } catch (const CacheError& e) {
      rethrow_from(e, ctx);
    }
    set_channel(std::move(held), parse_int(ctx, "max_size", meta[0]), parse_int(ctx, "_offset", meta[1]));
    return;
  }
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
  channel_.reset();
  dropped_ = 0;
}

void QuantizedBatchRotatingKVCache::set_channel(ChannelBatch held, int max_size, int offset_in_ring) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
  BatchRotatingKVCache ring(max_size, std::vector<int>(held.offset().size(), 0)); // checks max_size
  const long long d = 1LL * offset_in_ring - held.idx();
  // _offset counts the positions held and those gone before them (left
  // behind by the window, or padding a filter cut).
  if (held.sink() > 0 || d < 0 || offset_in_ring > QuantizedRotatingKVCache::max_offset) {
    throw ValueError(ctx,
                     "a batch without a sink whose _offset is its " + std::to_string(held.idx()) +
                         " positions plus those gone before them (at most " +
                         std::to_string(QuantizedRotatingKVCache::max_offset) + ")",
                     "_offset " + std::to_string(offset_in_ring) + ", sink " + std::to_string(held.sink()));
  }
  for (auto& p : parts_) {
    p = ring;
  }
  key_spec_ = held.key_spec();
  value_spec_ = held.value_spec();
  channel_ = std::move(held);
  dropped_ = static_cast<int>(d);
}

QuantizedBatchRotatingKVCache to_quantized(
    const BatchRotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window) {
  constexpr const char* ctx = "BatchRotatingKVCache.to_quantized";
  check_specs(ctx, keys, values);
  if (scheme != QuantScheme::affine) {
    if (cache.lengths()) {
      throw RuntimeError(ctx, "no right padding pending (call finalize first) for the rotated-channel scheme",
                         "right padding pending");
    }
    QuantizedBatchRotatingKVCache out(cache.max_size(), std::vector<int>{}, keys, values, scheme, window);
    const int B = static_cast<int>(cache.left_padding().size());
    ChannelBatch held(std::vector<int>(B, 0), keys, values, window);
    if (cache.keys() && (cache.rotated() || cache.idx() > 0)) {
      // The ring's positions oldest first.
      auto order = [&](const mx::array& a) {
        return cache.rotated() ? mx::roll(a, -cache.idx(), 2) : seq_slice(a, 0, cache.idx());
      };
      auto k = order(*cache.keys()), v = order(*cache.values());
      // Rows' left padding counts from the oldest position the ring holds
      // (below 0 where a row's first tokens went): what lies before a
      // row's first held token is padding (never attended).
      const int n = k.shape(2);
      std::vector<int> real;
      for (int p : batch_rows::to_ints(cache.left_padding())) {
        real.push_back(std::clamp(p, 0, n));
      }
      ChannelBatch fresh(real, keys, values, window);
      try {
        fresh.update_and_fetch(k, v);
        fresh.set_rows(cache.offset(), cache.left_padding());
      } catch (const CacheError& e) {
        rethrow_from(e, ctx);
      }
      out.set_channel(std::move(fresh), cache.max_size(), cache.offset_in_ring());
      return out;
    }
    out.channel_ = std::move(held);
    out.channel_->set_rows(cache.offset(), cache.left_padding());
    return out;
  }
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
