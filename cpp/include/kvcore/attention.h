// Attention over a quantized cache, for keys and values at their own bits.
#pragma once

#include "kvcore/quantized.h"

namespace kvcore {

/// How quantized attention multiplies by the quantized keys and values.
enum class QuantizedMatmul {
  /// The kernel, except on CUDA, where mlx 0.32.4's quantized_matmul lacks
  /// shapes or is wrong: there, dequantize.
  automatic,
  /// Always mx::quantized_matmul.
  kernel,
  /// Always a matmul over the dequantized keys and values.
  dequantize,
};

/// Sets the mode for every later call (process-wide; automatic at start).
void set_quantized_matmul(QuantizedMatmul mode);
/// The mode set.
QuantizedMatmul quantized_matmul_mode();
/// Whether quantized attention dequantizes now (the mode, and for automatic
/// the default device).
bool dequantizes_in_attention();

/// mlx-lm's quantized_scaled_dot_product_attention, with the keys and the
/// values each quantized as their spec says: softmax(scale * q k^T + mask) v
/// computed by mx::quantized_matmul on the triples, grouped-query heads
/// repeated as mlx-lm does. queries (B, n_q_heads, L, D); the triples hold
/// n_kv_heads dividing n_q_heads. mask: none, "causal" (the last L of the
/// keys see what precedes them) or an array (bool: where allowed; else
/// added). With equal specs the result is mlx-lm's, bit for bit. Throws
/// ValueError on shapes that do not fit.
mx::array quantized_attention(
    const mx::array& queries,
    const QuantizedArrays& keys,
    const QuantizedArrays& values,
    float scale,
    const Mask& mask,
    QuantSpec key_spec,
    QuantSpec value_spec);

/// Attention over a rotated_channel cache (quant_scheme.h) without
/// dequantizing it: the queries rotated once, scores against the transposed
/// per-channel keys by mx::quantized_matmul (transpose=false) and against
/// the float residual keys by a matmul, one softmax over both, the values
/// by mx::quantized_matmul plus a matmul over the residual values, the
/// output rotated back. keys (B, n_kv, D, packed) and values (B, n_kv, T,
/// packed) hold the T quantized tokens, the residuals (B, n_kv, R, D) the
/// newest R (or None). Masks as quantized_attention. Throws ValueError on
/// shapes that do not fit.
///
/// With a sink, each row's first tokens are read in float where they are
/// quantized: row b's sink token j sits at column start[b] + j (j without
/// `start`: a single sequence's cache), and where that column is below T
/// its score is the float key's and its value the float value's.
struct ChannelSink {
  mx::array keys; ///< (B, n_kv, S, D), rotated
  mx::array values; ///< (B, n_kv, S, Dv), rotated
  std::optional<mx::array> start; ///< (B,) integer: each row's first token's column
};
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
    const std::optional<ChannelSink>& sink = std::nullopt);

} // namespace kvcore
