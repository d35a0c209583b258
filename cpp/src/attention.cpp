#include "kvcore/attention.h"

#include <mlx/ops.h>
#include <mlx/utils.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

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
  const int repeats = n_q / n_kv;
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
  auto scores = mx::quantized_matmul(q, std::get<0>(k), std::get<1>(k), std::get<2>(k), true,
                                     key_spec.group_size, key_spec.bits);
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
      m = mx::expand_dims(m, -3);
    }
    if (m.dtype() == mx::bool_) {
      scores = mx::where(m, scores,
                         mx::array(static_cast<float>(mx::finfo(scores.dtype()).min), scores.dtype()));
    } else {
      scores = mx::add(scores, m);
    }
  }
  scores = mx::softmax(scores, -1, true);
  auto out = mx::quantized_matmul(scores, std::get<0>(v), std::get<1>(v), std::get<2>(v), false,
                                  value_spec.group_size, value_spec.bits);
  if (repeats > 1) {
    out = mx::reshape(out, {B, n_q, L, out.shape(-1)});
  }
  return out;
}

} // namespace kvcore
