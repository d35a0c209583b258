#include "kvcore/quantized_rotating.h"

#include <algorithm>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"
#include "lockstep.h"

namespace kvcore {

namespace {

// The attention sink lies within the pinned tokens: the window drops the
// rest.
void check_sink_kept(const char* ctx, int sink, int keep) {
  if (sink > keep) {
    throw ValueError(ctx, "a sink within keep (" + std::to_string(keep) + " tokens) on a sliding window",
                     "sink " + std::to_string(sink));
  }
}

} // namespace

QuantizedRotatingKVCache::QuantizedRotatingKVCache(
    int max_size,
    int keep,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window,
    int sink)
    : rings_{RotatingKVCache(max_size, keep), RotatingKVCache(max_size, keep),
             RotatingKVCache(max_size, keep)},
      key_spec_(keys),
      value_spec_(values) {
  constexpr const char* ctx = "QuantizedRotatingKVCache";
  check_specs(ctx, keys, values);
  check_window(ctx, scheme, window);
  check_sink(ctx, scheme, sink);
  if (scheme != QuantScheme::affine) {
    check_sink_kept(ctx, sink, keep);
    channel_.emplace(keys, values, scheme, window, sink);
  }
}

const QuantizedKVCache& QuantizedRotatingKVCache::held() const {
  if (!channel_) {
    throw ValueError("QuantizedRotatingKVCache.held", "a rotated-channel cache", "an affine one");
  }
  return *channel_;
}

int QuantizedRotatingKVCache::pinned() const {
  const int G = key_spec_.group_size;
  return (keep() + G - 1) / G * G;
}

int QuantizedRotatingKVCache::droppable(int o) const {
  // Positions below lo (past the pinned) are out of every later query's
  // reach: the float ring keeps keep + max_size - 1 - keep before an update.
  const int G = key_spec_.group_size, M = max_size(), P = pinned(), d = dropped();
  const long long lo = 1LL * o - (M - 1 - keep());
  const long long quantized_end = 1LL * channel_->quantized_tokens() + d;
  const long long n = (std::min(lo, quantized_end) - (P + d)) / G * G;
  // Dropping copies what is held: wait for an eighth of the window.
  return n >= std::max(G, M / 8 / G * G) ? int(n) : 0;
}

mx::array QuantizedRotatingKVCache::held_positions(int N) const {
  const int n = droppable(offset_), P = pinned(), d = dropped() + n;
  const int T = channel_->offset() - n + N;
  if (T <= P) {
    return mx::arange(0, T, mx::int32);
  }
  return mx::concatenate({mx::arange(0, P, mx::int32), mx::arange(P + d, T + d, mx::int32)});
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  if (!channel_) {
    auto [qk, qv] = quantize_kv(ctx, keys, values, key_spec_, value_spec_);
    return lockstep::update(ctx, rings_, qk, qv);
  }
  const int end = check_size(ctx, "offset + S", 1LL * offset_ + keys.shape(2));
  try {
    // (An empty update drops nothing: the held tokens must include the
    // newest one.)
    if (const int n = keys.shape(2) > 0 ? droppable(offset_) : 0; n > 0) {
      // Staged: a failed update leaves the cache as it was. The buffers
      // keep room for what the window holds at most, no more (a long
      // prefill's room is given back).
      const int G = key_spec_.group_size;
      QuantizedKVCache next = *channel_;
      next.drop_tokens(pinned(), n, pinned() + max_size() + std::max(G, max_size() / 8 / G * G) + 2 * G);
      auto out = next.update_and_fetch(keys, values);
      channel_ = std::move(next);
      offset_ = end;
      last_update_ = std::max(1, keys.shape(2));
      return out;
    }
    auto out = channel_->update_and_fetch(keys, values);
    offset_ = end;
    last_update_ = std::max(1, keys.shape(2));
    return out;
  } catch (const CacheError& e) {
    rethrow_from(e, ctx);
  }
}

Mask QuantizedRotatingKVCache::make_mask(int N, bool return_array, std::optional<int> window_size) const {
  constexpr const char* ctx = "QuantizedRotatingKVCache.make_mask";
  if (!channel_) {
    return rings_[0].make_mask(N, return_array, window_size);
  }
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  const int o = offset_, M = max_size(), K = keep();
  if (o <= M - 1) {
    // Nothing has left the float ring before this update: the tokens held
    // are the ring's, in its order.
    return RotatingKVCache::mask_for(N, o, M, o, return_array, window_size);
  }
  auto p = held_positions(N);
  if (N > 1) {
    // The float ring's columns: the pinned tokens first, then its newest
    // M - 1 - K tokens and the N new ones, windowed by column.
    const int W = (window_size && *window_size) ? *window_size : M;
    auto in_ring = mx::logical_or(mx::less(p, mx::array(K)), mx::greater_equal(p, mx::array(o - (M - 1 - K))));
    auto col = mx::where(mx::less(p, mx::array(K)), p, mx::subtract(p, mx::array(o - (M - 1))));
    auto q = mx::expand_dims(mx::arange(M - 1, M - 1 + N, mx::int32), 1);
    return mx::logical_and(
        in_ring, mx::logical_and(mx::less_equal(col, q), mx::greater(col, mx::subtract(q, mx::array(W)))));
  }
  // One token: the ring holds the K pinned and the newest M - K, of which a
  // narrower window sees its newest.
  if (window_size && o >= *window_size && M > *window_size) {
    return mx::greater(p, mx::array(o - *window_size));
  }
  if (p.shape(0) <= M) {
    return std::monostate{};
  }
  return mx::logical_or(mx::less(p, mx::array(K)), mx::greater_equal(p, mx::array(o + 1 - (M - K))));
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedRotatingKVCache::keys_and_values() const {
  if (channel_) {
    try {
      return channel_->keys_and_values();
    } catch (const CacheError& e) {
      rethrow_from(e, "QuantizedRotatingKVCache.keys_and_values");
    }
  }
  return lockstep::keys_and_values(rings_);
}

int QuantizedRotatingKVCache::trim(int n) {
  if (channel_) {
    constexpr const char* ctx = "QuantizedRotatingKVCache.trim";
    check_size(ctx, "n", n);
    n = std::min(offset_, n);
    if (n > 0 && !is_trimmable()) {
      throw RuntimeError(ctx, "offset < max_size (nothing rotated out yet)",
                         "offset " + std::to_string(offset_) + " with max_size " + std::to_string(max_size()));
    }
    // Nothing is dropped before offset reaches max_size.
    channel_->trim(n);
    offset_ -= n;
    return n;
  }
  // The weights' ring refuses first (after rotation); the others follow it.
  int done = rings_[0].trim(n);
  rings_[1].trim(n);
  rings_[2].trim(n);
  return done;
}

OptionalQuantized QuantizedRotatingKVCache::keys() const {
  return channel_ ? channel_->keys() : lockstep::gather(rings_, false);
}

OptionalQuantized QuantizedRotatingKVCache::values() const {
  return channel_ ? channel_->values() : lockstep::gather(rings_, true);
}

std::vector<OptionalArray> QuantizedRotatingKVCache::state() const {
  return channel_ ? channel_->state() : lockstep::state_arrays(rings_);
}

void QuantizedRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.state";
  check_count(ctx, "scalars", meta.size(), 0);
  if (channel_) {
    // held()'s arrays; the tokens held stay as many.
    QuantizedKVCache held = *channel_;
    held.restore(arrays, channel_->meta_state());
    set_channel(std::move(held), offset_, keep(), max_size());
    return;
  }
  check_count(ctx, "arrays", arrays.size(), 6);
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  set(std::move(keys), std::move(values), offset(), keep(), max_size(), idx(), key_spec_, value_spec_);
}

void QuantizedRotatingKVCache::set_channel(QuantizedKVCache held, int offset, int keep, int max_size) {
  constexpr const char* ctx = "QuantizedRotatingKVCache.state";
  RotatingKVCache ring(max_size, keep); // checks max_size and keep
  if (held.scheme() == QuantScheme::affine) {
    throw ValueError(ctx, "held tokens of the rotated-channel scheme", "an affine QuantizedKVCache");
  }
  check_sink_kept(ctx, held.sink(), keep);
  const int G = held.key_spec().group_size, P = (keep + G - 1) / G * G;
  check_size(ctx, "offset", offset, 0, max_offset);
  const long long d = 1LL * offset - held.offset();
  // Dropped tokens follow the pinned groups, all out of the window's reach
  // (whole groups when the cache dropped them; any number when a batch row
  // or a float ring was converted).
  if (d < 0 || (d > 0 && (held.offset() <= P || P + d > 1LL * offset - (max_size - 1 - keep)))) {
    throw ValueError(ctx,
                     "an offset of the " + std::to_string(held.offset()) + " held tokens plus tokens the window of " +
                         std::to_string(max_size) + " (keep " + std::to_string(keep) + ") has left behind",
                     "offset " + std::to_string(offset));
  }
  for (auto& r : rings_) {
    r = ring;
  }
  key_spec_ = held.key_spec();
  value_spec_ = held.value_spec();
  channel_ = std::move(held);
  offset_ = offset;
  last_update_ = 1;
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
  channel_.reset();
  offset_ = 0;
}

size_t QuantizedRotatingKVCache::nbytes() const {
  return channel_ ? channel_->nbytes() : lockstep::nbytes(rings_);
}

QuantizedRotatingKVCache to_quantized(
    const RotatingKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme,
    int window,
    int sink) {
  constexpr const char* ctx = "RotatingKVCache.to_quantized";
  QuantizedRotatingKVCache out(cache.max_size(), cache.keep(), keys, values, scheme, window, sink);
  if (scheme != QuantScheme::affine) {
    if (!cache.keys() || cache.offset() == 0) {
      return out;
    }
    // The ring's tokens oldest first: positions [0, o) before it rotated,
    // else the K pinned and the newest n - K. Held, they sit at positions
    // [0, P) and [P + d, o), P the pinned groups, d whole groups; the
    // positions the ring no longer has are filled with its first newest
    // token (out of every query's reach, they only shape their groups).
    const int o = cache.offset(), K = cache.keep(), G = keys.group_size;
    auto kt = cache.temporal_order(*cache.keys()), vt = cache.temporal_order(*cache.values());
    const int n = std::min(kt.shape(2), o);
    kt = seq_slice(kt, 0, n);
    vt = seq_slice(vt, 0, n);
    QuantizedKVCache held(keys, values, scheme, window, sink);
    int d = 0;
    if (n < o) {
      const int P = (K + G - 1) / G * G, s = o - (n - K);
      d = s > P ? (s - P) / G * G : 0;
      const int fill = s - K - d;
      auto filler = [&](const mx::array& t) {
        auto first = seq_slice(t, K, K + 1);
        auto shape = first.shape();
        shape[2] = fill;
        return seq_concat({seq_slice(t, 0, K), mx::broadcast_to(first, shape), seq_slice(t, K, n)});
      };
      kt = filler(kt);
      vt = filler(vt);
    }
    try {
      held.update_and_fetch(kt, vt);
    } catch (const CacheError& e) {
      rethrow_from(e, ctx);
    }
    out.set_channel(std::move(held), o, K, cache.max_size());
    // The ring holds max_size - 1 + S tokens after an update of S > 1.
    out.last_update_ = std::max(1, n - cache.max_size() + 1);
    return out;
  }
  auto [qk, qv] = quantize_buffers(ctx, cache.keys(), cache.values(), keys, values);
  out.set(std::move(qk), std::move(qv), cache.offset(), cache.keep(), cache.max_size(),
          cache.idx(), keys, values);
  return out;
}

} // namespace kvcore
