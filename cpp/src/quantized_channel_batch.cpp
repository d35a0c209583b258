#include "kvcore/quantized_channel_batch.h"

#include <algorithm>
#include <limits>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"
#include "batch_rows.h"

namespace kvcore {

namespace {

mx::array int_rows(const std::vector<int>& v) {
  return mx::array(v.data(), mx::Shape{static_cast<int>(v.size())}, mx::int32);
}

mx::array row(const mx::array& a, int i) {
  return mx::contiguous(batch_rows::row_slice(a, i, i + 1));
}

template <class F>
QuantizedArrays map3(const QuantizedArrays& q, F f) {
  return {f(std::get<0>(q)), f(std::get<1>(q)), f(std::get<2>(q))};
}

QuantizedArrays concat3(const QuantizedArrays& a, const QuantizedArrays& b, int axis) {
  return {mx::concatenate({std::get<0>(a), std::get<0>(b)}, axis),
          mx::concatenate({std::get<1>(a), std::get<1>(b)}, axis),
          mx::concatenate({std::get<2>(a), std::get<2>(b)}, axis)};
}

OptionalArray tail(const mx::array& x, int from) {
  if (from >= x.shape(2)) {
    return std::nullopt;
  }
  return from == 0 ? x : seq_slice(x, from, x.shape(2));
}

int target(int idx, int window, int G) {
  return std::max(0, idx - window) / G * G;
}

// Keys (B, H, D, 0) and values (B, H, 0, packed): no quantized position yet.
std::pair<QuantizedArrays, QuantizedArrays> no_groups(
    int B, int H, int D, int Dv, QuantSpec values, mx::Dtype dtype) {
  auto z = [&](mx::Shape s, mx::Dtype t) { return mx::zeros(s, t); };
  return {{z({B, H, D, 0}, mx::uint32), z({B, H, D, 0}, dtype), z({B, H, D, 0}, dtype)},
          {z({B, H, 0, Dv * values.bits / 32}, mx::uint32), z({B, H, 0, Dv / values.group_size}, dtype),
           z({B, H, 0, Dv / values.group_size}, dtype)}};
}

// Rotated keys (B, H, n, D) at positions [from, from + n), n a multiple of
// G, quantized per channel over groups of G positions (transposed). A row's
// padding (positions below its left padding) takes the group's smallest real
// value, so it never widens the range the group's real tokens span; a group
// of padding only is zeros.
QuantizedArrays quantize_keys(const mx::array& x, const mx::array& left_padding, int from, QuantSpec spec) {
  const int B = x.shape(0), H = x.shape(1), n = x.shape(2), D = x.shape(3), G = spec.group_size;
  auto pos = mx::reshape(mx::arange(from, from + n, mx::int32), {1, 1, n / G, G, 1});
  auto lp = mx::reshape(mx::astype(left_padding, mx::int32), {B, 1, 1, 1, 1});
  auto real = mx::greater_equal(pos, lp);
  auto g = mx::reshape(x, {B, H, n / G, G, D});
  auto low = mx::min(mx::where(real, g, mx::array(std::numeric_limits<float>::infinity(), x.dtype())), 3, true);
  auto fill = mx::where(mx::any(real, 3, true), low, mx::zeros_like(low));
  auto filled = mx::reshape(mx::where(real, g, fill), {B, H, n, D});
  auto q = mx::quantize(mx::swapaxes(filled, 2, 3), G, spec.bits);
  return {q[0], q[1], q[2]};
}

// x (B, H, n, D): positions [from, from + n) of every row, with each row's
// sink tokens there (positions left_padding + j) taken from the sink's
// float copies (B, H, S, D) instead: float tokens a trim, finalize or merge
// made from dequantized ones.
mx::array with_sink(const mx::array& x, const OptionalArray& sink, const mx::array& left_padding, int from) {
  if (!sink || x.shape(2) == 0) {
    return x;
  }
  const int B = x.shape(0), H = x.shape(1), n = x.shape(2), S = sink->shape(2);
  auto rel = mx::subtract(mx::reshape(mx::arange(from, from + n, mx::int32), {1, 1, n, 1}),
                          mx::reshape(mx::astype(left_padding, mx::int32), {B, 1, 1, 1}));
  auto in = mx::logical_and(mx::greater_equal(rel, mx::array(0, mx::int32)), mx::less(rel, mx::array(S, mx::int32)));
  auto idx = mx::broadcast_to(mx::clip(rel, mx::array(0, mx::int32), mx::array(S - 1, mx::int32)), {B, H, n, x.shape(3)});
  return mx::where(in, mx::take_along_axis(mx::astype(*sink, x.dtype()), idx, 2), x);
}

bool same(QuantSpec a, QuantSpec b) {
  return a.group_size == b.group_size && a.bits == b.bits;
}

void check_rows(const char* ctx, const char* what, const mx::array& v) {
  if (v.ndim() != 1 || !mx::issubdtype(v.dtype(), mx::integer)) {
    throw ValueError(ctx, std::string(what) + " of rank 1 (B,) and an integer dtype",
                     shape_str(v.shape()) + " " + dtype_str(v.dtype()));
  }
}

} // namespace

ChannelBatch::ChannelBatch(
    const std::vector<int>& left_padding,
    QuantSpec keys,
    QuantSpec values,
    int window,
    int sink)
    : offset_(mx::negative(int_rows(left_padding))),
      left_padding_(int_rows(left_padding)),
      key_spec_(keys),
      value_spec_(values),
      window_(window),
      sink_(sink) {
  check_specs("QuantizedBatchKVCache", keys, values);
  check_window("QuantizedBatchKVCache", QuantScheme::rotated_channel, window);
  check_sink("QuantizedBatchKVCache", QuantScheme::rotated_channel, sink);
}

void ChannelBatch::capture_sink(const mx::array& keys, const mx::array& values, int at) {
  if (sink_ == 0) {
    return;
  }
  // Every row's sink is full once the write position reaches the largest
  // left padding plus the sink: read once per padding array, so a decode
  // step past it does nothing here.
  const mx::array& padding = left_padding();
  if (!sink_full_for_ || sink_full_for_->id() != padding.id()) {
    const auto pads = batch_rows::to_ints(padding);
    sink_full_at_ = (pads.empty() ? 0 : *std::max_element(pads.begin(), pads.end())) + sink_;
    sink_full_for_ = padding;
  }
  if (sink_keys_ && at >= sink_full_at_) {
    return;
  }
  const int B = keys.shape(0), H = keys.shape(1), S = keys.shape(2);
  auto sk = sink_keys_ ? *sink_keys_ : mx::zeros({B, H, sink_, keys.shape(3)}, keys.dtype());
  auto sv = sink_values_ ? *sink_values_ : mx::zeros({B, H, sink_, values.shape(3)}, values.dtype());
  // Row b's token j is at position left_padding[b] + j: new token t there.
  auto t = mx::subtract(mx::add(mx::reshape(mx::astype(left_padding(), mx::int32), {B, 1, 1, 1}),
                                mx::reshape(mx::arange(sink_, mx::int32), {1, 1, sink_, 1})),
                        mx::array(at, mx::int32));
  auto in = mx::logical_and(mx::greater_equal(t, mx::array(0, mx::int32)), mx::less(t, mx::array(S, mx::int32)));
  auto idx = mx::clip(t, mx::array(0, mx::int32), mx::array(S - 1, mx::int32));
  auto pick = [&](const mx::array& x, const mx::array& old) {
    auto i = mx::broadcast_to(idx, {B, H, sink_, x.shape(3)});
    return mx::where(in, mx::take_along_axis(x, i, 2), old);
  };
  sink_keys_ = pick(keys, sk);
  sink_values_ = pick(values, sv);
}

int ChannelBatch::quantized_tokens() const {
  return keys_ ? std::get<1>(*keys_).shape(3) * key_spec_.group_size : 0;
}

std::pair<mx::array, mx::array> ChannelBatch::dequantized() const {
  const auto& [kw, ks, kb] = *keys_;
  const auto& [vw, vs, vb] = *values_;
  const int T = quantized_tokens();
  std::vector<mx::array> k, v;
  if (T > 0) {
    k.push_back(dequantize_channel_keys(*keys_, 0, T, key_spec_.group_size, key_spec_.bits, ks.dtype()));
    v.push_back(mx::dequantize(vw, vs, vb, value_spec_.group_size, value_spec_.bits, "affine",
                               std::nullopt, ks.dtype()));
  }
  if (residual_) {
    k.push_back(*residual_);
    v.push_back(*value_residual_);
  }
  if (k.empty()) {
    const int Dv = vs.shape(3) * value_spec_.group_size;
    return {mx::zeros({ks.shape(0), ks.shape(1), 0, ks.shape(2)}, ks.dtype()),
            mx::zeros({ks.shape(0), ks.shape(1), 0, Dv}, ks.dtype())};
  }
  return {seq_concat(k), seq_concat(v)};
}

void ChannelBatch::quantize_up_to(int to) {
  const int T = quantized_tokens(), add = to - T;
  if (add <= 0) {
    return;
  }
  auto qk = quantize_keys(seq_slice(*residual_, 0, add), left_padding(), T, key_spec_);
  auto qv = quantize("QuantizedBatchKVCache", seq_slice(*value_residual_, 0, add),
                     value_spec_.group_size, value_spec_.bits);
  keys_ = concat3(*keys_, qk, -1);
  values_ = concat3(*values_, qv, 2);
  residual_ = tail(*residual_, add);
  value_residual_ = tail(*value_residual_, add);
}

std::pair<QuantizedArrays, QuantizedArrays> ChannelBatch::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedBatchKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  const int B = keys.shape(0), H = keys.shape(1), S = keys.shape(2), D = keys.shape(3);
  const int Dv = values.shape(3);
  if (left_padding_.size() != offset_.size() || B != rows()) {
    throw ValueError(ctx, "keys for the batch of " + std::to_string(rows()) + " rows",
                     shape_str(keys.shape()));
  }
  if (values.dtype() != keys.dtype()) {
    throw ValueError(ctx, "values of the keys' dtype " + dtype_str(keys.dtype()),
                     dtype_str(values.dtype()));
  }
  if (keys.dtype() != mx::float16 && keys.dtype() != mx::bfloat16 && keys.dtype() != mx::float32) {
    throw ValueError(ctx, "keys and values of dtype float16, bfloat16 or float32 to quantize",
                     dtype_str(keys.dtype()));
  }
  check_rotation(ctx, "a key head dim", D);
  check_rotation(ctx, "a value head dim", Dv);
  if (Dv % value_spec_.group_size != 0 || (Dv * value_spec_.bits) % 32 != 0) {
    throw ValueError(ctx, "a value head dim divisible by group_size " +
                              std::to_string(value_spec_.group_size),
                     "head dim " + std::to_string(Dv));
  }
  if (keys_) {
    const auto& ks = std::get<1>(*keys_);
    const auto& vs = std::get<1>(*values_);
    if (ks.shape(1) != H || ks.shape(2) != D || ks.dtype() != keys.dtype() ||
        vs.shape(3) * value_spec_.group_size != Dv) {
      throw ValueError(ctx, "keys (B, H, S, D) like the cache's " +
                                shape_str({ks.shape(0), ks.shape(1), S, ks.shape(2)}) + " " +
                                dtype_str(ks.dtype()) + " and values of head dim " +
                                std::to_string(vs.shape(3) * value_spec_.group_size),
                       shape_str(keys.shape()) + " " + dtype_str(keys.dtype()) + ", values " +
                           shape_str(values.shape()));
    }
  }
  const int end = check_size(ctx, "_idx + S", 1LL * idx_ + S);
  // What the update allocates, before it allocates: the key and value
  // groups (copied whole by the concatenation) and the float residuals.
  const int G = key_spec_.group_size, vg = value_spec_.group_size;
  const int grouped = right_padding_ ? quantized_tokens()
                                     : std::max(quantized_tokens(), target(end, window_, G));
  const double item = keys.itemsize();
  check_memory(ctx, std::to_string(end) + " positions of " + std::to_string(B) + " rows",
               double(B) * H *
                   (double(grouped) * (D * (key_spec_.bits / 8.0 + 2.0 * item / G) +
                                       Dv * (value_spec_.bits / 8.0 + 2.0 * item / vg)) +
                    double(end - grouped) * (D + Dv) * item));

  ChannelBatch next = *this;
  auto pk = hadamard(keys), pv = hadamard(values);
  if (!next.keys_) {
    std::tie(next.keys_, next.values_) = no_groups(B, H, D, Dv, value_spec_, keys.dtype());
  }
  next.residual_ = residual_ ? seq_concat({*residual_, pk}) : pk;
  next.value_residual_ = value_residual_ ? seq_concat({*value_residual_, pv}) : pv;
  next.capture_sink(pk, pv, idx_);
  next.idx_ = end;
  next.offset_.shift(S);
  // Right-padded rows are rolled by finalize: their tokens stay in float
  // until then.
  if (!right_padding_) {
    next.quantize_up_to(target(end, window_, key_spec_.group_size));
  }
  *this = std::move(next);
  return keys_and_values();
}

std::pair<QuantizedArrays, QuantizedArrays> ChannelBatch::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("QuantizedBatchKVCache.keys_and_values", "the cache is empty: no keys or values yet");
  }
  return {*keys_, *values_};
}

void ChannelBatch::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& right_padding) {
  constexpr const char* ctx = "QuantizedBatchKVCache.prepare";
  if (left_padding) {
    if (keys_) {
      throw ValueError(ctx, "Left padding can only be added to an empty BatchKVCache");
    }
    check_count(ctx, "left paddings", left_padding->size(), rows());
  }
  if (right_padding) {
    check_count(ctx, "right paddings", right_padding->size(), rows());
  }
  if (left_padding) {
    auto lp = int_rows(*left_padding);
    auto padded = mx::add(this->left_padding(), lp);
    offset_ = mx::subtract(offset(), lp);
    left_padding_ = std::move(padded);
  }
  if (right_padding && !right_padding->empty() &&
      *std::max_element(right_padding->begin(), right_padding->end()) > 0) {
    right_padding_ = int_rows(*right_padding);
  }
}

void ChannelBatch::finalize() {
  if (!right_padding_) {
    return;
  }
  const auto& pad = *right_padding_;
  ChannelBatch next = *this;
  next.left_padding_ = mx::add(left_padding(), pad);
  next.offset_ = mx::subtract(offset(), pad);
  next.right_padding_.reset();
  if (keys_) {
    auto [k, v] = dequantized();
    auto shifts = mx::expand_dims(pad, 1);
    k = dynamic_roll(k, shifts, 2);
    v = dynamic_roll(v, shifts, 2);
    const int T = quantized_tokens();
    if (T > 0) {
      // Rows that moved left the grid: quantized again from their
      // dequantized tokens; the others keep their groups.
      auto moved = mx::reshape(mx::greater(pad, mx::array(0, pad.dtype())), {rows(), 1, 1, 1});
      auto qk = quantize_keys(seq_slice(k, 0, T), next.left_padding(), 0, key_spec_);
      auto qv = quantize("QuantizedBatchKVCache.finalize", seq_slice(v, 0, T),
                         value_spec_.group_size, value_spec_.bits);
      auto pick = [&](const QuantizedArrays& a, const QuantizedArrays& b) {
        return QuantizedArrays{mx::where(moved, std::get<0>(a), std::get<0>(b)),
                               mx::where(moved, std::get<1>(a), std::get<1>(b)),
                               mx::where(moved, std::get<2>(a), std::get<2>(b))};
      };
      next.keys_ = pick(qk, *keys_);
      next.values_ = pick(qv, *values_);
    }
    next.residual_ = tail(k, T);
    next.value_residual_ = tail(v, T);
    if (next.residual_) { // a row's sink tokens moved past T: float, as they were
      next.residual_ = with_sink(*next.residual_, sink_keys_, next.left_padding(), T);
      next.value_residual_ = with_sink(*next.value_residual_, sink_values_, next.left_padding(), T);
    }
    next.quantize_up_to(target(idx_, window_, key_spec_.group_size));
  }
  *this = std::move(next);
}

void ChannelBatch::filter(const std::vector<int>& indices) {
  constexpr const char* ctx = "filter";
  batch_rows::check_indices(ctx, indices, rows());
  auto idx = int_rows(indices);
  auto take = [&](const mx::array& a) { return mx::take(a, idx, 0); };
  ChannelBatch next = *this;
  if (keys_) {
    next.keys_ = map3(*keys_, take);
    next.values_ = map3(*values_, take);
    if (residual_) {
      next.residual_ = take(*residual_);
      next.value_residual_ = take(*value_residual_);
    }
    if (sink_keys_) {
      next.sink_keys_ = take(*sink_keys_);
      next.sink_values_ = take(*sink_values_);
    }
  }
  next.offset_ = take(offset());
  next.left_padding_ = take(left_padding());
  next.right_padding_ = right_padding_ ? OptionalArray(take(*right_padding_)) : std::nullopt;
  // Drop the padding no row needs any more, in whole groups (the grid
  // stays where it is).
  if (!indices.empty() && next.keys_) {
    auto pads = batch_rows::to_ints(next.left_padding());
    const int G = key_spec_.group_size;
    const int shift = std::max(0, std::min(*std::min_element(pads.begin(), pads.end()), next.idx_)) / G * G;
    if (shift > 0) {
      const int T = next.quantized_tokens(), q = std::min(shift, T);
      const int per_group = G * key_spec_.bits / 32;
      const auto& [kw, ks, kb] = *next.keys_;
      next.keys_ = QuantizedArrays{last_slice(kw, q / G * per_group, kw.shape(3)),
                                   last_slice(ks, q / G, ks.shape(3)), last_slice(kb, q / G, kb.shape(3))};
      next.values_ = map3(*next.values_, [&](const mx::array& a) { return seq_slice(a, q, T); });
      if (shift > T) {
        next.residual_ = tail(*next.residual_, shift - T);
        next.value_residual_ = tail(*next.value_residual_, shift - T);
      }
      next.idx_ -= shift;
      next.left_padding_.shift(-shift);
    }
  }
  *this = std::move(next);
}

ChannelBatch ChannelBatch::stack(const char* ctx, std::vector<ChannelBatch> sides) {
  const ChannelBatch* like = nullptr;
  int max_idx = 0, total = 0;
  for (const auto& s : sides) {
    if (s.left_padding_.size() != s.offset_.size() ||
        (s.keys_ && std::get<1>(*s.keys_).shape(0) != s.rows())) {
      throw RuntimeError(ctx, "offset, left_padding and keys for one batch of " +
                                  std::to_string(s.rows()),
                         std::to_string(s.left_padding_.size()) + " paddings");
    }
    if (s.keys_ && !like) {
      like = &s;
    }
    max_idx = std::max(max_idx, s.idx_);
    total += s.rows();
  }
  ChannelBatch out(std::vector<int>{}, sides[0].key_spec_, sides[0].value_spec_, sides[0].window_,
                   sides[0].sink_);
  std::vector<mx::array> offsets, paddings, pending;
  bool any_pending = false;
  for (const auto& s : sides) {
    offsets.push_back(s.offset());
    any_pending |= s.right_padding_.has_value();
  }
  if (!like) {
    for (const auto& s : sides) {
      paddings.push_back(s.left_padding());
      pending.push_back(s.right_padding_ ? *s.right_padding_ : mx::zeros({s.rows()}, mx::int32));
    }
    out.offset_ = mx::concatenate(offsets, 0);
    out.left_padding_ = mx::concatenate(paddings, 0);
    if (any_pending) {
      out.right_padding_ = mx::concatenate(pending, 0);
    }
    return out;
  }
  const auto& lks = std::get<1>(*like->keys_);
  const int H = lks.shape(1), D = lks.shape(2);
  const int Dv = std::get<1>(*like->values_).shape(3) * like->value_spec_.group_size;
  const mx::Dtype dtype = lks.dtype();
  for (const auto& s : sides) {
    if (s.keys_) {
      const auto& ks = std::get<1>(*s.keys_);
      if (ks.shape(1) != H || ks.shape(2) != D || ks.dtype() != dtype ||
          std::get<1>(*s.values_).shape(3) * s.value_spec_.group_size != Dv) {
        throw ValueError(ctx, "caches of the same heads, head dims and dtype",
                         shape_str(ks.shape()) + " " + dtype_str(ks.dtype()));
      }
    }
  }
  check_memory(ctx, std::to_string(total) + " rows of " + std::to_string(max_idx) + " tokens",
               double(total) * H * max_idx * (D + Dv) * mx::size_of(dtype));
  const int G = out.key_spec_.group_size, per_group = G * out.key_spec_.bits / 32;
  int T = 0;
  for (auto& s : sides) {
    const int d = max_idx - s.idx_, B = s.rows();
    if (!s.keys_ || d % G != 0 || s.quantized_tokens() == 0) {
      // Off the grid, or nothing quantized yet (whole groups of padding in
      // front would then count as quantized positions inside the window):
      // the tokens, dequantized, go to the float residual behind d pad
      // positions and are quantized below.
      mx::array k = mx::zeros({B, H, 0, D}, dtype), v = mx::zeros({B, H, 0, Dv}, dtype);
      if (s.keys_) {
        std::tie(k, v) = s.dequantized();
      }
      std::tie(s.keys_, s.values_) = no_groups(B, H, D, Dv, s.value_spec_, dtype);
      s.residual_ = tail(seq_concat({mx::zeros({B, H, d, D}, dtype), k}), 0);
      s.value_residual_ = tail(seq_concat({mx::zeros({B, H, d, Dv}, dtype), v}), 0);
    } else if (d > 0) {
      // Whole groups of padding in front: the grid moves with the row.
      const auto& [kw, ks, kb] = *s.keys_;
      s.keys_ = QuantizedArrays{
          mx::concatenate({mx::zeros({B, H, D, d / G * per_group}, mx::uint32), kw}, -1),
          mx::concatenate({mx::zeros({B, H, D, d / G}, dtype), ks}, -1),
          mx::concatenate({mx::zeros({B, H, D, d / G}, dtype), kb}, -1)};
      s.values_ = map3(*s.values_, [&](const mx::array& a) { return seq_concat({seq_zeros(a, d), a}); });
    }
    s.left_padding_.shift(d);
    if (s.residual_ && s.quantized_tokens() == 0) { // dequantized above: its sink tokens as they were
      s.residual_ = with_sink(*s.residual_, s.sink_keys_, s.left_padding(), 0);
      s.value_residual_ = with_sink(*s.value_residual_, s.sink_values_, s.left_padding(), 0);
    }
    s.idx_ = max_idx;
    T = std::max(T, s.quantized_tokens());
  }
  std::vector<mx::array> kparts[3], vparts[3], residuals, value_residuals, sinks, sink_values;
  for (auto& s : sides) {
    s.quantize_up_to(T);
    if (out.sink_ > 0) { // a side without tokens has empty slots
      const int B = s.rows();
      sinks.push_back(s.sink_keys_ ? *s.sink_keys_ : mx::zeros({B, H, out.sink_, D}, dtype));
      sink_values.push_back(s.sink_values_ ? *s.sink_values_ : mx::zeros({B, H, out.sink_, Dv}, dtype));
    }
    for (int i = 0; i < 3; ++i) {
      kparts[i].push_back(i == 0 ? std::get<0>(*s.keys_) : i == 1 ? std::get<1>(*s.keys_) : std::get<2>(*s.keys_));
      vparts[i].push_back(i == 0 ? std::get<0>(*s.values_) : i == 1 ? std::get<1>(*s.values_) : std::get<2>(*s.values_));
    }
    if (s.residual_) {
      residuals.push_back(*s.residual_);
      value_residuals.push_back(*s.value_residual_);
    }
    paddings.push_back(s.left_padding());
    pending.push_back(s.right_padding_ ? *s.right_padding_ : mx::zeros({s.rows()}, mx::int32));
  }
  out.keys_ = QuantizedArrays{mx::concatenate(kparts[0], 0), mx::concatenate(kparts[1], 0),
                              mx::concatenate(kparts[2], 0)};
  out.values_ = QuantizedArrays{mx::concatenate(vparts[0], 0), mx::concatenate(vparts[1], 0),
                                mx::concatenate(vparts[2], 0)};
  if (!residuals.empty()) {
    out.residual_ = mx::concatenate(residuals, 0);
    out.value_residual_ = mx::concatenate(value_residuals, 0);
  }
  if (!sinks.empty()) {
    out.sink_keys_ = mx::concatenate(sinks, 0);
    out.sink_values_ = mx::concatenate(sink_values, 0);
  }
  out.offset_ = mx::concatenate(offsets, 0);
  out.left_padding_ = mx::concatenate(paddings, 0);
  if (any_pending) {
    out.right_padding_ = mx::concatenate(pending, 0);
  }
  out.idx_ = max_idx;
  return out;
}

void ChannelBatch::extend(const ChannelBatch& other) {
  constexpr const char* ctx = "QuantizedBatchKVCache.extend";
  if (!same(key_spec_, other.key_spec_) || !same(value_spec_, other.value_spec_) ||
      window_ != other.window_ || sink_ != other.sink_) {
    throw ValueError(ctx, "a rotated-channel cache of the same group_size, bits, window " +
                              std::to_string(window_) + " and sink " + std::to_string(sink_),
                     "window " + std::to_string(other.window_) + ", sink " + std::to_string(other.sink_));
  }
  *this = stack(ctx, {*this, other});
}

ChannelBatch ChannelBatch::merge(const std::vector<const QuantizedKVCache*>& caches) {
  constexpr const char* ctx = "QuantizedBatchKVCache.merge";
  check_non_null_list(ctx, caches);
  const auto& first = *caches[0];
  std::vector<ChannelBatch> sides;
  for (const auto* c : caches) {
    if (c->scheme() != QuantScheme::rotated_channel) {
      throw ValueError(ctx, "caches of one scheme, 'rotated-channel'",
                       std::string("'") + scheme_name(c->scheme()) + "'");
    }
    if (!same(c->key_spec(), first.key_spec()) || !same(c->value_spec(), first.value_spec()) ||
        c->window() != first.window() || c->sink() != first.sink()) {
      auto str = [](const QuantizedKVCache& q) {
        return "group_size (" + std::to_string(q.key_spec().group_size) + ", " +
            std::to_string(q.value_spec().group_size) + "), bits (" + std::to_string(q.key_spec().bits) +
            ", " + std::to_string(q.value_spec().bits) + "), window " + std::to_string(q.window()) + ", sink " +
            std::to_string(q.sink());
      };
      throw ValueError(ctx, "caches quantized alike: " + str(first), str(*c));
    }
    // Sink tokens past the offset (an entry's tail after its disk blocks)
    // are not the cache's: cut.
    const int n = c->sink_keys() ? std::min(c->sink_keys()->shape(2), c->offset()) : 0;
    if (n != std::min(c->sink(), c->offset())) {
      throw ValueError(ctx, "caches holding their first min(sink, offset) tokens in the sink",
                       std::to_string(n) + " sink tokens at offset " + std::to_string(c->offset()));
    }
    ChannelBatch s({0}, c->key_spec(), c->value_spec(), c->window(), c->sink());
    if (c->keys()) {
      auto [k, v] = c->keys_and_values();
      OptionalArray sk, sv;
      if (c->sink() > 0) { // padded to the batch's sink slots
        const auto& ks = std::get<1>(k);
        const int H = ks.shape(1), D = ks.shape(2), Dv = std::get<1>(v).shape(3) * c->value_spec().group_size;
        auto zk = mx::zeros({1, H, c->sink() - n, D}, ks.dtype());
        auto zv = mx::zeros({1, H, c->sink() - n, Dv}, ks.dtype());
        sk = n > 0 ? seq_concat({seq_slice(*c->sink_keys(), 0, n), zk}) : zk;
        sv = n > 0 ? seq_concat({seq_slice(*c->sink_values(), 0, n), zv}) : zv;
      }
      s.set(k, v, int_rows({c->offset()}), int_rows({0}), c->offset(), c->residual(),
            c->value_residual(), c->key_spec(), c->value_spec(), c->window(), c->sink(), sk, sv);
    }
    sides.push_back(std::move(s));
  }
  return stack(ctx, std::move(sides));
}

ChannelBatch ChannelBatch::from_float(
    const BatchKVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    int window,
    int sink) {
  ChannelBatch out(std::vector<int>{}, keys, values, window, sink);
  const int n = cache.keys() && cache.values() ? cache.idx() : 0;
  out.offset_ = n > 0 ? mx::subtract(cache.offset(), mx::array(n, cache.offset().dtype())) : cache.offset();
  out.left_padding_ = cache.left_padding();
  out.right_padding_ = cache.right_padding();
  if (n > 0) {
    out.update_and_fetch(seq_slice(*cache.keys(), 0, n), seq_slice(*cache.values(), 0, n));
  }
  return out;
}

QuantizedKVCache ChannelBatch::extract(int idx) const {
  constexpr const char* ctx = "QuantizedBatchKVCache.extract";
  if (left_padding_.size() != offset_.size()) {
    throw RuntimeError(ctx, "offset and left_padding for one batch", "a mismatch");
  }
  batch_rows::check_indices(ctx, {idx}, rows());
  if (!keys_) {
    throw RuntimeError(ctx, "the cache is empty: no keys or values yet");
  }
  const int lp = std::clamp(batch_rows::to_ints(left_padding())[idx], 0, idx_);
  const int T = quantized_tokens(), G = key_spec_.group_size, per_group = G * key_spec_.bits / 32;
  const auto& [kw, ks, kb] = *keys_;
  const auto& [vw, vs, vb] = *values_;
  const int H = ks.shape(1), D = ks.shape(2), Dv = vs.shape(3) * value_spec_.group_size;
  OptionalQuantized k, v;
  OptionalArray r, rv;
  if (lp % G == 0 && lp <= T) {
    // Its groups are its own: as stored.
    k = QuantizedArrays{last_slice(row(kw, idx), lp / G * per_group, T / G * per_group),
                        last_slice(row(ks, idx), lp / G, T / G), last_slice(row(kb, idx), lp / G, T / G)};
    v = map3(*values_, [&](const mx::array& a) { return seq_slice(row(a, idx), lp, T); });
    if (residual_) {
      r = row(*residual_, idx);
      rv = row(*value_residual_, idx);
    }
  } else {
    // Its groups straddle the grid: its tokens, as stored, in float.
    std::tie(k, v) = no_groups(1, H, D, Dv, value_spec_, ks.dtype());
    auto [fk, fv] = dequantized();
    if (lp < idx_) {
      r = mx::contiguous(seq_slice(row(fk, idx), lp, idx_));
      rv = mx::contiguous(seq_slice(row(fv, idx), lp, idx_));
    }
  }
  // The row's first tokens in the sink: as many as it holds.
  const int n = std::min(sink_, idx_ - lp);
  OptionalArray sk, sv;
  if (n > 0 && sink_keys_) {
    sk = mx::contiguous(seq_slice(row(*sink_keys_, idx), 0, n));
    sv = mx::contiguous(seq_slice(row(*sink_values_, idx), 0, n));
    if (!(lp % G == 0 && lp <= T) && r) { // its float tokens read the sink's exact copies
      r = seq_concat({*sk, seq_slice(*r, n, r->shape(2))});
      rv = seq_concat({*sv, seq_slice(*rv, n, rv->shape(2))});
    }
  }
  QuantizedKVCache out(key_spec_, value_spec_, QuantScheme::rotated_channel, window_, sink_);
  out.set(std::move(k), std::move(v), idx_ - lp, key_spec_, value_spec_, QuantScheme::rotated_channel,
          std::move(r), std::move(rv), window_, sink_, std::move(sk), std::move(sv));
  return out;
}

int ChannelBatch::trim(int n) {
  check_size("QuantizedBatchKVCache.trim", "n", n);
  n = std::min(idx_, n);
  if (n == 0) {
    return 0;
  }
  const int end = idx_ - n, T = quantized_tokens(), G = key_spec_.group_size;
  ChannelBatch next = *this;
  if (end >= T) {
    auto keep = [&](const mx::array& r) -> OptionalArray {
      return end > T ? OptionalArray(seq_slice(r, 0, end - T)) : std::nullopt;
    };
    next.residual_ = keep(*residual_);
    next.value_residual_ = keep(*value_residual_);
  } else {
    // Into the quantized groups: the kept part of the group `end` falls in
    // returns to float, dequantized (as QuantizedKVCache::trim).
    const int kept = end / G * G, per_group = G * key_spec_.bits / 32;
    const auto& [kw, ks, kb] = *keys_;
    const auto& [vw, vs, vb] = *values_;
    OptionalArray rk, rv;
    if (end > kept) {
      rk = seq_slice(dequantize_channel_keys(*keys_, kept, G, G, key_spec_.bits, ks.dtype()), 0, end - kept);
      rv = mx::dequantize(seq_slice(vw, kept, end), seq_slice(vs, kept, end), seq_slice(vb, kept, end),
                          value_spec_.group_size, value_spec_.bits, "affine", std::nullopt, ks.dtype());
    }
    next.keys_ = QuantizedArrays{last_slice(kw, 0, kept / G * per_group), last_slice(ks, 0, kept / G),
                                 last_slice(kb, 0, kept / G)};
    next.values_ = map3(*values_, [&](const mx::array& a) { return seq_slice(a, 0, kept); });
    if (rk) { // the sink's tokens in the kept part of the group: float, as they were
      rk = with_sink(*rk, sink_keys_, left_padding(), kept);
      rv = with_sink(*rv, sink_values_, left_padding(), kept);
    }
    next.residual_ = std::move(rk);
    next.value_residual_ = std::move(rv);
  }
  next.idx_ = end;
  next.offset_.shift(-n);
  *this = std::move(next);
  return n;
}

Mask ChannelBatch::make_mask(int N, std::optional<int> window_size) const {
  constexpr const char* ctx = "QuantizedBatchKVCache.make_mask";
  if (left_padding_.size() != offset_.size()) {
    throw RuntimeError(ctx, "offset and left_padding for one batch", "a mismatch");
  }
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  return create_causal_mask(N, idx_, window_size, std::nullopt, left_padding());
}

std::vector<OptionalArray> ChannelBatch::state() const {
  std::vector<OptionalArray> out;
  for (const auto* q : {&keys_, &values_}) {
    if (*q) {
      out.insert(out.end(), {std::get<0>(**q), std::get<1>(**q), std::get<2>(**q)});
    } else {
      out.insert(out.end(), {std::nullopt, std::nullopt, std::nullopt});
    }
  }
  out.insert(out.end(), {offset(), left_padding(), residual_, value_residual_});
  if (sink_ > 0) {
    out.insert(out.end(), {sink_keys_, sink_values_});
  }
  return out;
}

std::vector<std::string> ChannelBatch::meta_state() const {
  std::vector<std::string> out{std::to_string(idx_), scheme_name(QuantScheme::rotated_channel),
                               std::to_string(window_)};
  if (sink_ > 0) {
    out.push_back(std::to_string(sink_));
  }
  return out;
}

void ChannelBatch::set(
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
  constexpr const char* ctx = "QuantizedBatchKVCache.state";
  check_specs(ctx, key_spec, value_spec);
  check_window(ctx, QuantScheme::rotated_channel, window);
  check_sink(ctx, QuantScheme::rotated_channel, sink);
  if (sink_keys.has_value() != sink_values.has_value() || sink_keys.has_value() != (sink > 0 && keys.has_value())) {
    throw ValueError(ctx, "sink keys and values set exactly when there is a sink and keys",
                     std::string(sink_keys ? "keys" : "no keys") + (sink_values ? " and values" : " and no values") +
                         " for sink " + std::to_string(sink));
  }
  check_triples(ctx, keys, values);
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  if (offset.size() != left_padding.size()) {
    throw ValueError(ctx, "offset and left_padding for one batch size",
                     std::to_string(offset.size()) + ", " + std::to_string(left_padding.size()));
  }
  if (residual.has_value() != value_residual.has_value()) {
    throw ValueError(ctx, "residual keys and values both set or both None", "only one set");
  }
  const int B = static_cast<int>(offset.size());
  if (!keys) {
    if (residual || idx != 0) {
      throw ValueError(ctx, "no residual and _idx 0 without keys", "_idx " + std::to_string(idx));
    }
  } else {
    const auto& [kw, ks, kb] = *keys;
    const auto& [vw, vs, vb] = *values;
    const int G = key_spec.group_size, H = ks.shape(1), D = ks.shape(2), groups = ks.shape(3);
    const int T = groups * G, Dv = vs.shape(3) * value_spec.group_size;
    check_rotation(ctx, "a key head dim", D);
    check_rotation(ctx, "a value head dim", Dv);
    check_scales(ctx, *keys, *values);
    if (ks.shape(0) != B || 1LL * kw.shape(3) != 1LL * groups * G * key_spec.bits / 32 ||
        kb.shape(3) != groups) {
      throw ValueError(ctx, "keys of " + std::to_string(B) + " rows with " +
                                std::to_string(G * key_spec.bits / 32) + " words per group of scales",
                       shape_str(kw.shape()) + " with scales " + shape_str(ks.shape()));
    }
    if (vw.shape(0) != B || vw.shape(1) != H || vw.shape(2) != T ||
        1LL * vw.shape(3) * 32 != 1LL * Dv * value_spec.bits || vs.dtype() != ks.dtype()) {
      throw ValueError(ctx, "values (B, H, T, packed) " + shape_str({B, H, T, Dv * value_spec.bits / 32}) +
                                " of dtype " + dtype_str(ks.dtype()),
                       shape_str(vw.shape()) + " " + dtype_str(vs.dtype()));
    }
    const int R = idx - T;
    if (R < 0 || (R > 0) != residual.has_value()) {
      throw ValueError(ctx, "_idx of the " + std::to_string(T) + " quantized positions plus the residual's",
                       "_idx " + std::to_string(idx));
    }
    if (residual) {
      const auto& r = *residual;
      const auto& rv = *value_residual;
      if (r.ndim() != 4 || r.shape(0) != B || r.shape(1) != H || r.shape(2) != R || r.shape(3) != D ||
          r.dtype() != ks.dtype() || rv.ndim() != 4 || rv.shape(0) != B || rv.shape(1) != H ||
          rv.shape(2) != R || rv.shape(3) != Dv || rv.dtype() != ks.dtype()) {
        throw ValueError(ctx, "residual keys " + shape_str({B, H, R, D}) + " and values " +
                                  shape_str({B, H, R, Dv}) + " of dtype " + dtype_str(ks.dtype()),
                         shape_str(r.shape()) + " and " + shape_str(rv.shape()));
      }
    }
    if (sink_keys) {
      const auto& k = *sink_keys;
      const auto& v = *sink_values;
      if (k.shape() != mx::Shape{B, H, sink, D} || k.dtype() != ks.dtype() ||
          v.shape() != mx::Shape{B, H, sink, Dv} || v.dtype() != ks.dtype()) {
        throw ValueError(ctx, "sink keys " + shape_str({B, H, sink, D}) + " and values " +
                                  shape_str({B, H, sink, Dv}) + " of dtype " + dtype_str(ks.dtype()),
                         shape_str(k.shape()) + " and " + shape_str(v.shape()));
      }
    }
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
  idx_ = idx;
  residual_ = std::move(residual);
  value_residual_ = std::move(value_residual);
  right_padding_.reset();
  key_spec_ = key_spec;
  value_spec_ = value_spec;
  window_ = window;
  sink_ = sink;
  sink_keys_ = std::move(sink_keys);
  sink_values_ = std::move(sink_values);
}

void ChannelBatch::drop_front(int n) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.update_and_fetch";
  const int G = key_spec_.group_size, T = quantized_tokens();
  if (n < 0 || n % G != 0 || n > T || sink_ > 0) {
    throw ValueError(ctx, "whole quantized groups of " + std::to_string(G) + " within the " + std::to_string(T) +
                              " quantized positions of a batch without a sink",
                     std::to_string(n) + " positions, sink " + std::to_string(sink_));
  }
  if (n == 0) {
    return;
  }
  const int words = G * key_spec_.bits / 32;
  const auto& [kw, ks, kb] = *keys_;
  keys_ = QuantizedArrays{last_slice(kw, n / G * words, kw.shape(3)), last_slice(ks, n / G, ks.shape(3)),
                          last_slice(kb, n / G, kb.shape(3))};
  values_ = map3(*values_, [&](const mx::array& a) { return seq_slice(a, n, a.shape(2)); });
  left_padding_.shift(-n);
  idx_ -= n;
}

void ChannelBatch::set_rows(mx::array offset, mx::array left_padding) {
  constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  if (offset.size() != offset_.size() || left_padding.size() != offset_.size()) {
    throw ValueError(ctx, "offset and left_padding of " + std::to_string(rows()) + " rows",
                     std::to_string(offset.size()) + " and " + std::to_string(left_padding.size()));
  }
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
}

size_t ChannelBatch::nbytes() const {
  size_t n = nbytes_of(residual_) + nbytes_of(value_residual_) + nbytes_of(sink_keys_) + nbytes_of(sink_values_);
  for (const auto* q : {&keys_, &values_}) {
    if (*q) {
      n += std::get<0>(**q).nbytes() + std::get<1>(**q).nbytes() + std::get<2>(**q).nbytes();
    }
  }
  return n;
}

} // namespace kvcore
