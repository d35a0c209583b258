#include "kvcore/attention.h"

#include <atomic>

#include <mlx/backend/cuda/cuda.h>
#include <mlx/fast.h>
#include <mlx/ops.h>
#include <mlx/utils.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

// scores (..., L, N) with the mask applied: "causal" lets the last L of the
// N keys see what precedes them; a bool array says where allowed, another
// is added. Grouped-query scores carry an extra axis before (L, N).
mx::array masked(mx::array scores, const Mask& mask, int repeats) {
  if (!std::holds_alternative<std::monostate>(mask)) {
    mx::array m = std::holds_alternative<std::string>(mask) ? mx::array(false)
                                                            : std::get<mx::array>(mask);
    if (std::holds_alternative<std::string>(mask)) {
      const int qL = scores.shape(-2), kL = scores.shape(-1);
      auto q_idx = mx::arange(kL - qL, kL);
      auto k_idx = mx::arange(kL);
      m = mx::greater_equal(mx::expand_dims(q_idx, 1), mx::expand_dims(k_idx, 0));
    }
    if (repeats > 1 && m.ndim() > 3) {
      // Scores are (B, n_kv, repeats, L, N): a mask per query head splits
      // its heads the same way.
      m = m.shape(-3) == 1 ? mx::expand_dims(m, -3)
                           : mx::reshape(m, {m.shape(0), m.shape(1) / repeats, repeats, m.shape(2), m.shape(3)});
    }
    if (m.dtype() == mx::bool_) {
      scores = mx::where(m, scores,
                         mx::array(static_cast<float>(mx::finfo(scores.dtype()).min), scores.dtype()));
    } else {
      scores = mx::add(scores, m);
    }
  }
  return scores;
}

// Throws ValueError unless an array mask broadcasts to the scores'
// (B, n_q_heads, L, N) shape.
void check_mask(const char* ctx, const Mask& mask, const mx::Shape& scores) {
  if (!std::holds_alternative<mx::array>(mask)) {
    return;
  }
  const auto& m = std::get<mx::array>(mask);
  bool fits = m.ndim() <= 4;
  for (int i = 1; fits && i <= m.ndim(); ++i) {
    fits = m.shape(-i) == 1 || m.shape(-i) == scores[4 - i];
  }
  if (!fits) {
    throw ValueError(ctx, "a mask that broadcasts to (B, n_q_heads, L, N) " + shape_str(scores),
                     "shape " + shape_str(m.shape()));
  }
}

std::atomic<QuantizedMatmul> matmul_mode{QuantizedMatmul::automatic};

// mx::quantized_matmul, or on a backend whose kernel cannot be trusted a
// matmul over the dequantized weights: mlx 0.32.4's CUDA quantized_matmul
// lacks most of the shapes attention needs and gives wrong scores for some
// it has (head dim 64, group 32, several query rows). The dequantized
// weights are one layer's keys or values in the query dtype, freed after
// the step.
mx::array qmatmul(bool dequantize, const mx::array& x, const mx::array& w, const mx::array& scales,
                  const mx::array& biases, bool transpose, QuantSpec spec) {
  if (!dequantize) {
    return mx::quantized_matmul(x, w, scales, biases, transpose, spec.group_size, spec.bits);
  }
  auto full = mx::astype(mx::dequantize(w, scales, biases, spec.group_size, spec.bits), x.dtype());
  return mx::matmul(x, transpose ? mx::swapaxes(full, -1, -2) : full);
}

// channel_attention where the quantized matmul cannot be trusted: the keys
// and values dequantized, rotated, with the sink's first S0 float tokens
// written over theirs and the float residual after them, then one fused
// attention. A decode step is a handful of kernels, not one per term.
mx::array dequantized_channel_attention(
    const mx::array& queries,
    const QuantizedArrays& keys,
    const OptionalArray& key_residual,
    const QuantizedArrays& values,
    const OptionalArray& value_residual,
    float scale,
    const Mask& mask,
    QuantSpec key_spec,
    QuantSpec value_spec,
    int S0,
    const std::optional<ChannelSink>& sink) {
  const auto dtype = queries.dtype();
  const auto& [kw, ks, kb] = keys;
  const auto& [vw, vs, vb] = values;
  std::vector<mx::array> kparts, vparts;
  if (ks.shape(3) > 0) {
    // Keys come (B, H, D, T): the sink's columns are written in that layout.
    auto k = mx::dequantize(kw, ks, kb, key_spec.group_size, key_spec.bits, "affine", std::nullopt, dtype);
    auto v = mx::dequantize(vw, vs, vb, value_spec.group_size, value_spec.bits, "affine", std::nullopt, dtype);
    if (S0 > 0) {
      auto sk = mx::swapaxes(mx::astype(seq_slice(sink->keys, 0, S0), dtype), 2, 3);
      mx::Shape lo(4, 0), hi = k.shape();
      hi.back() = S0;
      k = mx::slice_update(k, sk, lo, hi);
      v = seq_write(v, mx::astype(seq_slice(sink->values, 0, S0), dtype), 0);
    }
    kparts.push_back(mx::swapaxes(k, 2, 3));
    vparts.push_back(v);
  }
  if (key_residual) {
    kparts.push_back(mx::astype(*key_residual, dtype));
    vparts.push_back(mx::astype(*value_residual, dtype));
  }
  auto k = kparts.size() == 1 ? mx::contiguous(kparts[0]) : seq_concat(std::move(kparts));
  auto v = vparts.size() == 1 ? vparts[0] : seq_concat(std::move(vparts));
  std::string mode;
  std::optional<mx::array> mask_arr;
  if (std::holds_alternative<std::string>(mask)) {
    mode = "causal";
  } else if (std::holds_alternative<mx::array>(mask)) {
    // An additive mask in the queries' dtype, as the fused attention takes it.
    mode = "array";
    const auto& m = std::get<mx::array>(mask);
    mask_arr = m.dtype() == mx::bool_ ? m : mx::astype(m, dtype);
  }
  auto out = mx::fast::scaled_dot_product_attention(hadamard(queries), k, v, scale, mode, mask_arr);
  return hadamard(out);
}

} // namespace

void set_quantized_matmul(QuantizedMatmul mode) {
  matmul_mode.store(mode);
}

QuantizedMatmul quantized_matmul_mode() {
  return matmul_mode.load();
}

bool dequantizes_in_attention() {
  switch (matmul_mode.load()) {
    case QuantizedMatmul::kernel:
      return false;
    case QuantizedMatmul::dequantize:
      return true;
    case QuantizedMatmul::automatic:
      break;
  }
  return mx::default_device() == mx::Device::gpu && mx::cu::is_available();
}

mx::array quantized_attention(
    const mx::array& queries,
    const QuantizedArrays& keys,
    const QuantizedArrays& values,
    float scale,
    const Mask& mask,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  constexpr const char* ctx = "quantized_attention";
  check_specs(ctx, key_spec, value_spec);
  check_triple(ctx, "keys", keys, key_spec);
  check_triple(ctx, "values", values, value_spec);
  if (queries.ndim() != 4) {
    throw ValueError(ctx, "queries of rank 4 (B, n_q_heads, L, D)", shape_str(queries.shape()));
  }
  const int B = queries.shape(0), n_q = queries.shape(1), L = queries.shape(2), D = queries.shape(3);
  const int n_kv = std::get<0>(keys).shape(1);
  if (n_kv == 0 || n_q % n_kv != 0) {
    throw ValueError(ctx, "query heads a multiple of the " + std::to_string(n_kv) + " kv heads",
                     std::to_string(n_q) + " query heads");
  }
  check_mask(ctx, mask, {B, n_q, L, std::get<0>(keys).shape(2)});
  const int repeats = n_q / n_kv;
  const bool dequantize = dequantizes_in_attention(); // once per call, not per matmul
  auto q = mx::multiply(queries, mx::array(scale, queries.dtype()));
  auto expand = [&](const QuantizedArrays& t) {
    if (repeats == 1) {
      return t;
    }
    return QuantizedArrays{mx::expand_dims(std::get<0>(t), -3), mx::expand_dims(std::get<1>(t), -3),
                           mx::expand_dims(std::get<2>(t), -3)};
  };
  auto k = expand(keys);
  auto v = expand(values);
  if (repeats > 1) {
    q = mx::reshape(q, {B, n_kv, repeats, L, D});
  }
  auto scores = qmatmul(dequantize, q, std::get<0>(k), std::get<1>(k), std::get<2>(k), true, key_spec);
  scores = masked(scores, mask, repeats);
  scores = mx::softmax(scores, -1, true);
  auto out = qmatmul(dequantize, scores, std::get<0>(v), std::get<1>(v), std::get<2>(v), false, value_spec);
  if (repeats > 1) {
    out = mx::reshape(out, {B, n_q, L, out.shape(-1)});
  }
  return out;
}

mx::array channel_attention(
    const mx::array& queries,
    const QuantizedArrays& keys,
    const OptionalArray& key_residual,
    const QuantizedArrays& values,
    const OptionalArray& value_residual,
    float scale,
    const Mask& mask,
    QuantSpec key_spec,
    QuantSpec value_spec,
    const std::optional<ChannelSink>& sink) {
  constexpr const char* ctx = "quantized_attention";
  check_specs(ctx, key_spec, value_spec);
  check_triple(ctx, "keys", keys);
  check_triple(ctx, "values", values);
  if (queries.ndim() != 4) {
    throw ValueError(ctx, "queries of rank 4 (B, n_q_heads, L, D)", shape_str(queries.shape()));
  }
  const int B = queries.shape(0), n_q = queries.shape(1), L = queries.shape(2), D = queries.shape(3);
  const auto& [kw, ks, kb] = keys;
  const auto& [vw, vs, vb] = values;
  const int n_kv = kw.shape(1);
  if (n_kv == 0 || n_q % n_kv != 0) {
    throw ValueError(ctx, "query heads a multiple of the " + std::to_string(n_kv) + " kv heads",
                     std::to_string(n_q) + " query heads");
  }
  if (kw.shape(2) != D) {
    throw ValueError(ctx, "queries of the keys' head dim " + std::to_string(kw.shape(2)),
                     shape_str(queries.shape()));
  }
  check_rotation(ctx, "a head dim", D);
  const int quantized = ks.shape(3) * key_spec.group_size;
  if (vw.shape(2) != quantized) {
    throw ValueError(ctx, std::to_string(quantized) + " quantized value tokens, as the keys",
                     std::to_string(vw.shape(2)));
  }
  if (kw.shape(0) != B || vw.shape(0) != B || vw.shape(1) != n_kv) {
    throw ValueError(ctx, "keys and values of the queries' batch " + std::to_string(B) + " and " +
                              std::to_string(n_kv) + " heads",
                     "keys " + shape_str(kw.shape()) + ", values " + shape_str(vw.shape()));
  }
  const int Dv = vs.shape(3) * value_spec.group_size;
  if (32LL * kw.shape(3) != 1LL * ks.shape(3) * key_spec.group_size * key_spec.bits ||
      kb.shape(3) != ks.shape(3) || 32LL * vw.shape(3) != 1LL * Dv * value_spec.bits ||
      vb.shape(3) != vs.shape(3)) {
    throw ValueError(ctx,
                     "weights, scales and biases of keys at bits " + std::to_string(key_spec.bits) +
                         " and group_size " + std::to_string(key_spec.group_size) + " and of values at bits " +
                         std::to_string(value_spec.bits) + " and group_size " +
                         std::to_string(value_spec.group_size),
                     "keys " + shape_str(kw.shape()) + ", " + shape_str(ks.shape()) + ", values " +
                         shape_str(vw.shape()) + ", " + shape_str(vs.shape()));
  }
  if (key_residual.has_value() != value_residual.has_value()) {
    throw ValueError(ctx, "residual keys and values both set or both None", "only one set");
  }
  const int R = key_residual ? key_residual->shape(2) : 0;
  if (key_residual &&
      (key_residual->ndim() != 4 || key_residual->shape(0) != B || key_residual->shape(1) != n_kv ||
       key_residual->shape(3) != D || value_residual->ndim() != 4 || value_residual->shape(0) != B ||
       value_residual->shape(1) != n_kv || value_residual->shape(2) != R ||
       value_residual->shape(3) != Dv)) {
    throw ValueError(ctx, "residual keys (B, " + std::to_string(n_kv) + ", R, " + std::to_string(D) +
                              ") and values of the same R",
                     shape_str(key_residual->shape()) + " and " + shape_str(value_residual->shape()));
  }
  if (quantized + R == 0) {
    throw ValueError(ctx, "at least one cached token", "none");
  }
  const int S = sink ? sink->keys.shape(2) : 0;
  if (sink &&
      (sink->keys.ndim() != 4 || sink->keys.shape(0) != B || sink->keys.shape(1) != n_kv ||
       sink->keys.shape(3) != D || sink->values.ndim() != 4 || sink->values.shape(0) != B ||
       sink->values.shape(1) != n_kv || sink->values.shape(2) != S || sink->values.shape(3) != Dv ||
       (sink->start && (sink->start->ndim() != 1 || sink->start->shape(0) != B ||
                        !mx::issubdtype(sink->start->dtype(), mx::integer))))) {
    throw ValueError(ctx, "sink keys (B, " + std::to_string(n_kv) + ", S, " + std::to_string(D) +
                              "), values of the same S and integer starts (B,) or None",
                     shape_str(sink->keys.shape()) + ", " + shape_str(sink->values.shape()) +
                         (sink->start ? " and " + shape_str(sink->start->shape()) + " " +
                                            dtype_str(sink->start->dtype())
                                      : std::string()));
  }
  check_mask(ctx, mask, {B, n_q, L, quantized + R});
  const int repeats = n_q / n_kv;
  const bool dequantize = dequantizes_in_attention(); // once per call, not per matmul
  const bool rows_at_zero = S > 0 && !sink->start;
  if (dequantize && (S == 0 || quantized == 0 || rows_at_zero)) {
    return dequantized_channel_attention(queries, keys, key_residual, values, value_residual, scale, mask,
                                         key_spec, value_spec, rows_at_zero ? std::min(S, quantized) : 0,
                                         sink);
  }
  // One rotation of the queries: (H q) . (H k) = q . k.
  auto q = mx::multiply(hadamard(queries), mx::array(scale, queries.dtype()));
  auto expand = [&](const mx::array& a) { return repeats > 1 ? mx::expand_dims(a, -3) : a; };
  if (repeats > 1) {
    q = mx::reshape(q, {B, n_kv, repeats, L, D});
  }
  // The sink's columns among the quantized ones. Rows starting at column 0
  // (no `start`): columns [0, S'), S' = min(S, T). Otherwise hit[j] where row
  // b's column is its sink token j (B, 1, [1,] 1, T).
  const int S0 = rows_at_zero ? std::min(S, quantized) : 0;
  std::vector<mx::array> hits;
  if (S > 0 && quantized > 0 && !rows_at_zero) {
    mx::Shape at(repeats > 1 ? 5 : 4, 1);
    at[0] = B;
    auto start = mx::reshape(mx::astype(*sink->start, mx::int32), at);
    at[0] = 1;
    at.back() = quantized;
    auto col = mx::reshape(mx::arange(quantized, mx::int32), at);
    for (int j = 0; j < S; ++j) {
      hits.push_back(mx::equal(col, mx::add(start, mx::array(j, mx::int32))));
    }
  }
  std::vector<mx::array> parts;
  if (quantized > 0) {
    auto sq = qmatmul(dequantize, q, expand(kw), expand(ks), expand(kb), false, key_spec);
    if (S0 > 0 || !hits.empty()) { // the sink's float scores in place of its quantized ones
      auto sk = S0 > 0 ? seq_slice(sink->keys, 0, S0) : sink->keys;
      auto ss = mx::astype(mx::matmul(q, mx::swapaxes(expand(mx::astype(sk, q.dtype())), -1, -2)), sq.dtype());
      if (S0 > 0) {
        mx::Shape lo(sq.ndim(), 0), hi = sq.shape();
        hi.back() = S0;
        sq = mx::slice_update(sq, ss, lo, hi);
      }
      for (size_t j = 0; j < hits.size(); ++j) {
        sq = mx::where(hits[j], last_slice(ss, j, j + 1), sq);
      }
    }
    parts.push_back(sq);
  }
  if (R > 0) {
    parts.push_back(mx::matmul(q, mx::swapaxes(expand(*key_residual), -1, -2)));
  }
  auto scores = parts.size() == 1 ? parts[0] : mx::concatenate(parts, -1);
  scores = mx::softmax(masked(scores, mask, repeats), -1, true);
  std::optional<mx::array> out;
  if (quantized > 0) {
    auto p = R > 0 ? last_slice(scores, 0, quantized) : scores;
    out = qmatmul(dequantize, p, expand(vw), expand(vs), expand(vb), false, value_spec);
    // The sink's float values in place of their quantized ones: each sink
    // column's weight times (float - dequantized) value.
    if (S0 > 0) {
      auto vq = mx::dequantize(seq_slice(vw, 0, S0), seq_slice(vs, 0, S0), seq_slice(vb, 0, S0), value_spec.group_size,
                               value_spec.bits, "affine", std::nullopt, p.dtype());
      auto diff = expand(mx::subtract(mx::astype(seq_slice(sink->values, 0, S0), p.dtype()), vq));
      *out = mx::add(*out, mx::matmul(last_slice(p, 0, S0), diff));
    }
    for (size_t j = 0; j < hits.size(); ++j) {
      auto idx = mx::minimum(mx::add(mx::astype(*sink->start, mx::int32), mx::array(static_cast<int>(j), mx::int32)),
                             mx::array(quantized - 1, mx::int32));
      auto at = mx::broadcast_to(mx::reshape(idx, {B, 1, 1, 1}), {B, n_kv, 1, vw.shape(3)});
      auto sat = mx::broadcast_to(mx::reshape(idx, {B, 1, 1, 1}), {B, n_kv, 1, vs.shape(3)});
      auto vq = mx::dequantize(mx::take_along_axis(vw, at, 2), mx::take_along_axis(vs, sat, 2),
                               mx::take_along_axis(vb, sat, 2), value_spec.group_size, value_spec.bits, "affine",
                               std::nullopt, p.dtype());
      mx::Shape lo(4, 0);
      lo[2] = static_cast<int>(j);
      auto vf = mx::slice(sink->values, lo, {B, n_kv, static_cast<int>(j) + 1, Dv});
      auto diff = expand(mx::subtract(mx::astype(vf, p.dtype()), vq)); // (B, n_kv, [1,] 1, Dv)
      auto wj = mx::sum(mx::where(hits[j], p, mx::array(0.0f, p.dtype())), -1, true);
      *out = mx::add(*out, mx::multiply(wj, diff));
    }
  }
  if (R > 0) {
    auto p = last_slice(scores, quantized, scores.shape(-1));
    auto r = mx::matmul(p, mx::astype(expand(*value_residual), p.dtype()));
    out = out ? mx::add(*out, r) : r;
  }
  auto o = *out;
  if (repeats > 1) {
    o = mx::reshape(o, {B, n_q, L, o.shape(-1)});
  }
  return hadamard(o);
}

} // namespace kvcore
