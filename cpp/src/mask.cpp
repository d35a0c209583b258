#include "kvcore/mask.h"

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

void check_padding(const char* what, const mx::array& pad) {
  if (pad.ndim() != 1) {
    throw ValueError(
        "create_causal_mask",
        std::string(what) + " of rank 1 (B,)",
        "shape " + shape_str(pad.shape()));
  }
  // mlx-lm's empty batch caches hold float32 paddings; any number works.
  if (!mx::issubdtype(pad.dtype(), mx::number)) {
    throw ValueError(
        "create_causal_mask",
        std::string(what) + " of a numeric dtype",
        dtype_str(pad.dtype()));
  }
}

} // namespace

mx::array create_causal_mask(
    int N,
    int offset,
    std::optional<int> window_size,
    const OptionalArray& right_padding,
    const OptionalArray& left_padding) {
  constexpr const char* ctx = "create_causal_mask";
  check_size(ctx, "N", N);
  check_size(ctx, "offset", offset);
  check_size(ctx, "offset + N", 1LL * offset + N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  if (right_padding) {
    check_padding("right_padding", *right_padding);
  }
  if (left_padding) {
    check_padding("left_padding", *left_padding);
  }

  auto rinds = mx::arange(offset + N);
  auto linds = offset ? mx::arange(offset, offset + N) : rinds;
  linds = mx::expand_dims(linds, 1);
  rinds = mx::expand_dims(rinds, 0);
  auto mask = mx::greater_equal(linds, rinds);
  if (window_size) {
    mask = mx::logical_and(
        mask, mx::less(linds, mx::add(rinds, mx::array(*window_size))));
  }
  if (right_padding) {
    auto& rp = *right_padding;
    auto end = mx::subtract(scalar_like(offset + N, rp.dtype(), ctx), rp);
    mask = mx::logical_and(mask, mx::less(rinds, mx::expand_dims(end, {1, 2, 3})));
  }
  if (left_padding) {
    mask = mx::logical_and(
        mask, mx::less_equal(mx::expand_dims(*left_padding, {1, 2, 3}), rinds));
  }
  return mask;
}

Mask create_attention_mask(
    int N,
    int offset,
    bool return_array,
    std::optional<int> window_size) {
  if (window_size) {
    return create_causal_mask(N, offset, window_size);
  }
  check_size("create_attention_mask", "N", N);
  if (N == 1) {
    return std::monostate{};
  }
  if (return_array) {
    return create_causal_mask(N, offset);
  }
  return std::string("causal");
}

} // namespace kvcore
