#include "kvcore/quant_scheme.h"

#include <cmath>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

const char* scheme_name(QuantScheme scheme) {
  return scheme == QuantScheme::affine ? "affine" : "rotated-channel";
}

QuantScheme parse_scheme(const char* ctx, const std::string& name) {
  if (name == "affine") {
    return QuantScheme::affine;
  }
  if (name == "rotated-channel") {
    return QuantScheme::rotated_channel;
  }
  throw ValueError(ctx, "scheme 'affine' or 'rotated-channel'", "'" + name.substr(0, 80) + "'");
}

void check_window(const char* ctx, QuantScheme scheme, int window) {
  const int most = scheme == QuantScheme::affine ? 0 : (1 << 20);
  if (window < 0 || window > most) {
    throw ValueError(ctx,
                     scheme == QuantScheme::affine
                         ? std::string("no window for the affine scheme")
                         : "a window of 0 to " + std::to_string(most) + " tokens",
                     "window " + std::to_string(window));
  }
}

void check_sink(const char* ctx, QuantScheme scheme, int sink) {
  const int most = scheme == QuantScheme::affine ? 0 : max_sink;
  if (sink < 0 || sink > most) {
    throw ValueError(ctx,
                     scheme == QuantScheme::affine ? std::string("no sink for the affine scheme")
                                                   : "a sink of 0 to " + std::to_string(most) + " tokens",
                     "sink " + std::to_string(sink));
  }
}

void check_rotation(const char* ctx, const char* what, int head_dim) {
  if (head_dim < 2 || head_dim > 16384 || (head_dim & (head_dim - 1)) != 0) {
    throw ValueError(ctx, std::string(what) + " a power of two from 2 to 16384 to rotate",
                     std::to_string(head_dim));
  }
}

void check_scales(
    const char* ctx,
    const std::tuple<mx::array, mx::array, mx::array>& keys,
    const std::tuple<mx::array, mx::array, mx::array>& values) {
  const auto& [kw, ks, kb] = keys;
  const auto& [vw, vs, vb] = values;
  if (kb.dtype() != ks.dtype() || vs.dtype() != ks.dtype() || vb.dtype() != ks.dtype() ||
      !mx::issubdtype(ks.dtype(), mx::floating)) {
    throw ValueError(ctx, "scales and biases of keys and values of one float dtype",
                     dtype_str(ks.dtype()) + ", " + dtype_str(kb.dtype()) + ", " + dtype_str(vs.dtype()) +
                         " and " + dtype_str(vb.dtype()));
  }
  if (kb.shape(-1) != ks.shape(-1) || vb.shape(-1) != vs.shape(-1)) {
    throw ValueError(ctx, "biases of as many groups as the scales",
                     "keys " + shape_str(ks.shape()) + " and " + shape_str(kb.shape()) + ", values " +
                         shape_str(vs.shape()) + " and " + shape_str(vb.shape()));
  }
}

mx::array hadamard(const mx::array& x) {
  return mx::hadamard_transform(x, 1.0f / std::sqrt(static_cast<float>(x.shape(-1))));
}

mx::array dequantize_channel_keys(
    const std::tuple<mx::array, mx::array, mx::array>& keys,
    int start,
    int n,
    int group_size,
    int bits,
    mx::Dtype dtype) {
  auto cols = [](const mx::array& a, int from, int to) {
    mx::Shape lo(a.ndim(), 0), hi = a.shape();
    lo.back() = from;
    hi.back() = to;
    return mx::slice(a, lo, hi);
  };
  const int per_group = group_size * bits / 32;
  const int g0 = start / group_size, g1 = (start + n) / group_size;
  auto w = cols(std::get<0>(keys), g0 * per_group, g1 * per_group);
  auto s = cols(std::get<1>(keys), g0, g1);
  auto b = cols(std::get<2>(keys), g0, g1);
  auto x = mx::dequantize(w, s, b, group_size, bits, "affine", std::nullopt, dtype);
  return mx::swapaxes(x, 2, 3);
}

} // namespace kvcore
