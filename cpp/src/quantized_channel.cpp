// QuantizedKVCache under the rotated_channel scheme (quant_scheme.h): keys
// stored transposed (B, H, D, packed tokens) in whole groups of tokens,
// values per token (B, H, T, packed), both rotated; the newest tokens (the
// window and the group not yet full) in float residuals of equal length.
#include <algorithm>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/quantized.h"

namespace kvcore {

namespace {

// x written at column `at` of buf's last axis, after growing buf (kept up to
// `at`) by `grow` columns when grow > 0. A first allocation (at 0) is the
// zeros alone, not a copy of them.
mx::array write_last_slice(const mx::array& buf, const mx::array& x, int at, int grow) {
  auto b = buf;
  if (grow > 0) {
    auto shape = x.shape();
    shape.back() = grow;
    b = mx::zeros(shape, x.dtype());
    if (at > 0) {
      b = mx::concatenate({last_slice(buf, 0, at), b}, -1);
    }
  }
  mx::Shape lo(x.ndim(), 0), hi = x.shape();
  lo.back() = at;
  hi.back() = at + x.shape(-1);
  return mx::slice_update(b, x, lo, hi);
}

// A per-token buffer kept up to `at` and grown by `grow` tokens (buf itself
// when grow is 0; the zeros alone at 0).
mx::array grow_tokens(const mx::array& buf, const mx::array& like, int at, int grow) {
  if (grow == 0) {
    return buf;
  }
  return at > 0 ? seq_concat({seq_slice(buf, 0, at), seq_zeros(like, grow)}) : seq_zeros(like, grow);
}

QuantizedArrays empty_triple(int B, int H, int rows, int packed, int groups, mx::Dtype dtype, bool transposed) {
  auto shape = [&](int last) {
    return transposed ? mx::Shape{B, H, rows, last} : mx::Shape{B, H, 0, last};
  };
  return {mx::zeros(shape(transposed ? 0 : packed), mx::uint32),
          mx::zeros(shape(transposed ? 0 : groups), dtype),
          mx::zeros(shape(transposed ? 0 : groups), dtype)};
}

// Tokens [from, to) of [residual | rotated new tokens], rotating only the
// new ones that fall in the range; None when the range is empty.
OptionalArray rotated_span(const OptionalArray& residual, const mx::array& x, int from, int to) {
  if (from >= to) {
    return std::nullopt;
  }
  const int R = residual ? residual->shape(2) : 0;
  std::vector<mx::array> parts;
  if (from < R) {
    parts.push_back(seq_slice(*residual, from, std::min(to, R)));
  }
  if (to > R) {
    parts.push_back(hadamard(seq_slice(x, std::max(from, R) - R, to - R)));
  }
  return parts.size() == 1 ? parts[0] : seq_concat(std::move(parts));
}

} // namespace

void QuantizedKVCache::set_channel(
    OptionalQuantized keys,
    OptionalQuantized values,
    int offset,
    QuantSpec key_spec,
    QuantSpec value_spec,
    QuantScheme scheme,
    OptionalArray residual,
    OptionalArray value_residual,
    int window,
    int sink,
    OptionalArray sink_keys,
    OptionalArray sink_values) {
  constexpr const char* ctx = "QuantizedKVCache.state";
  check_window(ctx, scheme, window);
  check_sink(ctx, scheme, sink);
  if (sink_keys.has_value() != sink_values.has_value() || (sink_keys && sink == 0)) {
    throw ValueError(ctx, "sink keys and values both set (with a sink) or both None",
                     std::string(sink_keys ? "keys" : "no keys") + (sink_values ? " and values" : " and no values") +
                         " for sink " + std::to_string(sink));
  }
  const int G = key_spec.group_size;
  if (residual.has_value() != value_residual.has_value()) {
    throw ValueError(ctx, "residual keys and values both set or both None", "only one set");
  }
  const int R = residual ? residual->shape(2) : 0;
  if (!keys) {
    if (residual || offset != 0 || sink_keys) {
      throw ValueError(ctx, "keys and values with an offset, residual or sink", "None");
    }
  } else {
    const auto& [kw, ks, kb] = *keys;
    const auto& [vw, vs, vb] = *values;
    const int B = kw.shape(0), H = kw.shape(1), D = kw.shape(2);
    const int Dv = vs.shape(3) * value_spec.group_size;
    check_rotation(ctx, "a key head dim", D);
    check_rotation(ctx, "a value head dim", Dv);
    if (kw.shape(3) != ks.shape(3) * G * key_spec.bits / 32 || ks.shape(3) != kb.shape(3)) {
      throw ValueError(ctx, "key weights of " + std::to_string(G * key_spec.bits / 32) +
                                " words per group of scales",
                       shape_str(kw.shape()) + " with scales " + shape_str(ks.shape()));
    }
    check_scales(ctx, *keys, *values);
    if (vw.shape(0) != B || vw.shape(1) != H ||
        1LL * vw.shape(3) * 32 != 1LL * Dv * value_spec.bits) {
      throw ValueError(ctx, "values of (B, H) " + shape_str({B, H}) + " with " +
                                std::to_string(Dv * value_spec.bits / 32) + " packed words",
                       shape_str(vw.shape()));
    }
    if (residual) {
      const auto& r = *residual;
      const auto& rv = *value_residual;
      if (r.ndim() != 4 || r.shape(0) != B || r.shape(1) != H || r.shape(3) != D ||
          r.dtype() != ks.dtype() || rv.ndim() != 4 || rv.shape(0) != B || rv.shape(1) != H ||
          rv.shape(2) != R || rv.shape(3) != Dv || rv.dtype() != ks.dtype()) {
        throw ValueError(ctx, "residual keys (B, H, R, " + std::to_string(D) + ") and values (B, H, R, " +
                                  std::to_string(Dv) + ") of dtype " + dtype_str(ks.dtype()),
                         shape_str(r.shape()) + " and " + shape_str(rv.shape()));
      }
    }
    if (sink_keys) {
      // The sequence's first n tokens (an entry's tail, after its blocks,
      // keeps them whatever its own offset).
      const auto& k = *sink_keys;
      const auto& v = *sink_values;
      const int n = k.ndim() == 4 ? k.shape(2) : 0;
      if (k.ndim() != 4 || k.shape(0) != B || k.shape(1) != H || n < 1 || n > sink || k.shape(3) != D ||
          k.dtype() != ks.dtype() || v.ndim() != 4 || v.shape(0) != B || v.shape(1) != H || v.shape(2) != n ||
          v.shape(3) != Dv || v.dtype() != ks.dtype()) {
        throw ValueError(ctx, "sink keys (B, H, 1 to " + std::to_string(sink) + ", " + std::to_string(D) +
                                  ") and values (B, H, the same, " + std::to_string(Dv) +
                                  ") of dtype " + dtype_str(ks.dtype()),
                         shape_str(k.shape()) + " " + dtype_str(k.dtype()) + " and " + shape_str(v.shape()) + " " +
                             dtype_str(v.dtype()));
      }
    }
    const int quantized = offset - R;
    if (offset < 0 || quantized < 0 || quantized % G != 0 || quantized > ks.shape(3) * G ||
        quantized > vw.shape(2)) {
      throw ValueError(ctx,
                       "an offset of whole key groups (at most " + std::to_string(ks.shape(3)) +
                           " of " + std::to_string(G) + " tokens, " +
                           std::to_string(vw.shape(2)) + " value slots) plus the " +
                           std::to_string(R) + " residual tokens",
                       "offset " + std::to_string(offset));
    }
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = offset;
  key_spec_ = key_spec;
  value_spec_ = value_spec;
  scheme_ = scheme;
  residual_ = std::move(residual);
  value_residual_ = std::move(value_residual);
  window_ = window;
  sink_ = sink;
  sink_keys_ = std::move(sink_keys);
  sink_values_ = std::move(sink_values);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::update_channel(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  const int B = keys.shape(0), H = keys.shape(1), S = keys.shape(2), D = keys.shape(3);
  const int Dv = values.shape(3);
  const int end = check_size(ctx, "offset + S", 1LL * offset_ + S);
  if (values.dtype() != keys.dtype()) {
    throw ValueError(ctx, "values of the keys' dtype " + dtype_str(keys.dtype()),
                     dtype_str(values.dtype()));
  }
  check_rotation(ctx, "a key head dim", D);
  check_rotation(ctx, "a value head dim", Dv);
  const int G = key_spec_.group_size, per_group = G * key_spec_.bits / 32;
  if (Dv % value_spec_.group_size != 0 || (Dv * value_spec_.bits) % 32 != 0) {
    throw ValueError(ctx, "a value head dim divisible by group_size " +
                              std::to_string(value_spec_.group_size),
                     "head dim " + std::to_string(Dv));
  }
  if (keys.dtype() != mx::float16 && keys.dtype() != mx::bfloat16 && keys.dtype() != mx::float32) {
    throw ValueError(ctx, "keys and values of dtype float16, bfloat16 or float32 to quantize",
                     dtype_str(keys.dtype()));
  }
  const int done = quantized_tokens();
  if (keys_) {
    const auto& ks = std::get<1>(*keys_);
    const auto& vs = std::get<1>(*values_);
    if (ks.shape(0) != B || ks.shape(1) != H || ks.shape(2) != D || ks.dtype() != keys.dtype() ||
        vs.shape(0) != B || vs.shape(1) != H || vs.shape(3) * value_spec_.group_size != Dv) {
      throw ValueError(ctx, "keys (B, H, S, D) " + shape_str({ks.shape(0), ks.shape(1), S, ks.shape(2)}) +
                                " of dtype " + dtype_str(ks.dtype()) + " and values of head dim " +
                                std::to_string(vs.shape(3) * value_spec_.group_size),
                       shape_str(keys.shape()) + " " + dtype_str(keys.dtype()) + ", values " +
                           shape_str(values.shape()));
    }
  } else if (offset_ != 0) {
    throw RuntimeError(ctx, "offset 0 in an empty cache", "offset " + std::to_string(offset_));
  }

  // The tokens in line: the float residual (R, rotated), then the new ones,
  // rotated only where they are used. Whole groups older than the window
  // are quantized; the rest stays float.
  const int R = residual_ ? residual_->shape(2) : 0;
  const int target = std::max(0, end - window_) / G * G;
  const int add = std::max(0, target - done);
  // The float tokens the update rotates and joins to the residual.
  check_memory(ctx, std::to_string(end - done) + " float tokens",
               double(B) * H * (end - done) * (D + Dv) * keys.itemsize());

  await_buffer_release(capacity_, keys_.has_value(), S);
  OptionalQuantized kbuf = keys_, vbuf = values_;
  if (!kbuf) {
    kbuf = empty_triple(B, H, D, 0, 0, keys.dtype(), true);
    vbuf = empty_triple(B, H, 0, Dv * value_spec_.bits / 32, Dv / value_spec_.group_size,
                        keys.dtype(), false);
  }
  if (add > 0) {
    const int step = check_size(ctx, "step", this->step(), 1);
    const int gstep = (step + G - 1) / G * G;  // a step of whole groups
    const int kcap = std::get<1>(*kbuf).shape(3) * G, vcap = std::get<0>(*vbuf).shape(2);
    const int room = check_size(ctx, "buffer growth",
                                std::max((1LL * add + gstep - 1) / gstep * gstep,
                                         (1LL * capacity_ + G - 1) / G * G - done));
    const int kgrow = done + add > kcap ? room : 0;
    const int vgrow = done + add > vcap ? room : 0;
    const double item = keys.itemsize();
    check_memory(ctx, std::to_string(done + room) + " quantized tokens",
                 double(B) * H *
                     (double(kgrow) * D * (key_spec_.bits / 8.0 + 2.0 * item / G) +
                      double(vgrow) * Dv * (value_spec_.bits / 8.0 + 2.0 * item / value_spec_.group_size)));
    // The span goes in pieces of whole groups, each rotated, laid out
    // transposed for the keys (one copy) and quantized on its own: the
    // float temporaries are a piece's, not the whole chunk's.
    const int piece = std::max(G, quantize_piece / G * G);
    auto [kw, ks, kb] = *kbuf;
    const auto& [vw0, vs0, vb0] = *vbuf;
    auto vw = grow_tokens(vw0, vw0, done, vgrow);
    auto vs = grow_tokens(vs0, vs0, done, vgrow);
    auto vb = grow_tokens(vb0, vb0, done, vgrow);
    for (int at = 0; at < add; at += piece) {
      const int n = std::min(piece, add - at), grow = at == 0 ? kgrow : 0;
      auto [qw, qs, qb] = quantize(ctx, mx::swapaxes(*rotated_span(residual_, keys, at, at + n), 2, 3), G,
                                   key_spec_.bits);
      kw = write_last_slice(kw, qw, (done + at) / G * per_group, grow / G * per_group);
      ks = write_last_slice(ks, qs, (done + at) / G, grow / G);
      kb = write_last_slice(kb, qb, (done + at) / G, grow / G);
      auto [w, sc, b] = quantize(ctx, *rotated_span(value_residual_, values, at, at + n),
                                 value_spec_.group_size, value_spec_.bits);
      vw = seq_write(vw, w, done + at);
      vs = seq_write(vs, sc, done + at);
      vb = seq_write(vb, b, done + at);
    }
    kbuf = QuantizedArrays{std::move(kw), std::move(ks), std::move(kb)};
    vbuf = QuantizedArrays{std::move(vw), std::move(vs), std::move(vb)};
  }
  // The new residual holds only its own tokens (never a view that keeps a
  // whole rotated chunk alive).
  auto rk = rotated_span(residual_, keys, add, R + S);
  auto rv = rotated_span(value_residual_, values, add, R + S);
  // The sink's first tokens, rotated, as they arrive (copies, as above).
  OptionalArray sk = sink_keys_, sv = sink_values_;
  if (sk && sk->shape(2) > offset_) { // tokens past the offset (a tail's) are not this sequence's
    sk = offset_ > 0 ? OptionalArray(seq_slice(*sk, 0, offset_)) : std::nullopt;
    sv = offset_ > 0 ? OptionalArray(seq_slice(*sv, 0, offset_)) : std::nullopt;
  }
  if (offset_ < sink_ && (sk ? sk->shape(2) : 0) == offset_) {
    const int n = std::min(S, sink_ - offset_);
    auto k = mx::contiguous(hadamard(seq_slice(keys, 0, n)));
    auto v = mx::contiguous(hadamard(seq_slice(values, 0, n)));
    sk = sk ? seq_concat({*sk, k}) : k;
    sv = sv ? seq_concat({*sv, v}) : v;
  }
  keys_ = std::move(kbuf);
  values_ = std::move(vbuf);
  residual_ = std::move(rk);
  value_residual_ = std::move(rv);
  sink_keys_ = std::move(sk);
  sink_values_ = std::move(sv);
  offset_ = end;
  return channel_keys_and_values();
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::channel_keys_and_values() const {
  const int t = quantized_tokens(), G = key_spec_.group_size;
  const auto& [kw, ks, kb] = *keys_;
  QuantizedArrays k{last_slice(kw, 0, t / G * G * key_spec_.bits / 32), last_slice(ks, 0, t / G),
                    last_slice(kb, 0, t / G)};
  const auto& [vw, vs, vb] = *values_;
  if (t == vw.shape(2)) {
    return {k, *values_};
  }
  return {k, {seq_slice(vw, 0, t), seq_slice(vs, 0, t), seq_slice(vb, 0, t)}};
}

void QuantizedKVCache::trim_channel(int end) {
  const int t = quantized_tokens(), G = key_spec_.group_size;
  if (sink_keys_) { // the sink keeps its tokens below `end`
    const int n = std::min(sink_keys_->shape(2), end);
    sink_keys_ = n > 0 ? OptionalArray(seq_slice(*sink_keys_, 0, n)) : std::nullopt;
    sink_values_ = n > 0 ? OptionalArray(seq_slice(*sink_values_, 0, n)) : std::nullopt;
  }
  if (end >= t) {
    auto keep = [&](const mx::array& r) -> OptionalArray {
      return end > t ? OptionalArray(seq_slice(r, 0, end - t)) : std::nullopt;
    };
    residual_ = keep(*residual_);
    value_residual_ = keep(*value_residual_);
    return;
  }
  // Into the quantized tokens: whole groups below `end` stay; the kept part
  // of the group `end` falls in returns to float (as stored, dequantized).
  const int kept = end / G * G;
  OptionalArray rk, rv;
  if (end > kept) {
    auto dtype = std::get<1>(*keys_).dtype();
    rk = seq_slice(dequantize_channel_keys(*keys_, kept, G, G, key_spec_.bits, dtype), 0, end - kept);
    const auto& [vw, vs, vb] = *values_;
    rv = mx::dequantize(seq_slice(vw, kept, end), seq_slice(vs, kept, end), seq_slice(vb, kept, end),
                        value_spec_.group_size, value_spec_.bits, "affine", std::nullopt, dtype);
    if (sink_keys_ && kept == 0) { // the sink's tokens return to float as they were
      const int n = std::min(sink_keys_->shape(2), end);
      rk = seq_concat({*sink_keys_, seq_slice(*rk, n, end)});
      rv = seq_concat({*sink_values_, seq_slice(*rv, n, end)});
    }
  }
  residual_ = std::move(rk);
  value_residual_ = std::move(rv);
}

void QuantizedKVCache::drop_tokens(int start, int n, int room) {
  constexpr const char* ctx = "QuantizedKVCache.drop_tokens";
  const int G = key_spec_.group_size, t = quantized_tokens();
  const int sunk = sink_keys_ ? sink_keys_->shape(2) : 0;
  if (scheme_ != QuantScheme::rotated_channel || start < sunk || n < 0 || start % G != 0 ||
      n % G != 0 || 1LL * start + n > t) {
    throw ValueError(ctx,
                     "whole groups of " + std::to_string(G) + " quantized tokens within [" +
                         std::to_string(sunk) + ", " + std::to_string(t) + ") of a rotated-channel cache",
                     "[" + std::to_string(start) + ", " + std::to_string(1LL * start + n) + ") of a " +
                         scheme_name(scheme_) + " cache");
  }
  if (n == 0) {
    return;
  }
  // The room kept: what was there, no more than `room` (whole groups), no
  // less than what stays.
  const int kcap = std::get<1>(*keys_).shape(3) * G, vcap = std::get<0>(*values_).shape(2);
  const int want = std::max(t - n, (std::max(room, 0) + G - 1) / G * G);
  // Columns [lo, hi) of the last axis (keys) or tokens (values) cut out;
  // the buffer then holds `keep` columns (zeros past what stays).
  auto cut_last = [](const mx::array& a, int lo, int hi, int keep) {
    std::vector<mx::array> parts{last_slice(a, 0, lo), last_slice(a, hi, std::min(a.shape(-1), keep + hi - lo))};
    const int have = lo + parts[1].shape(-1);
    if (keep > have) {
      auto shape = a.shape();
      shape.back() = keep - have;
      parts.push_back(mx::zeros(shape, a.dtype()));
    }
    return mx::concatenate(parts, -1);
  };
  auto cut_tokens = [](const mx::array& a, int lo, int hi, int keep) {
    std::vector<mx::array> parts{seq_slice(a, 0, lo), seq_slice(a, hi, std::min(a.shape(2), keep + hi - lo))};
    const int have = lo + parts[1].shape(2);
    if (keep > have) {
      parts.push_back(seq_zeros(a, keep - have));
    }
    return seq_concat(std::move(parts));
  };
  const int kkeep = std::max(t - n, std::min(kcap, want)), vkeep = std::max(t - n, std::min(vcap, want));
  const int words = G * key_spec_.bits / 32;
  const auto& [kw, ks, kb] = *keys_;
  const auto& [vw, vs, vb] = *values_;
  QuantizedArrays k{cut_last(kw, start / G * words, (start + n) / G * words, kkeep / G * words),
                    cut_last(ks, start / G, (start + n) / G, kkeep / G),
                    cut_last(kb, start / G, (start + n) / G, kkeep / G)};
  QuantizedArrays v{cut_tokens(vw, start, start + n, vkeep), cut_tokens(vs, start, start + n, vkeep),
                    cut_tokens(vb, start, start + n, vkeep)};
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ -= n;
}

} // namespace kvcore
