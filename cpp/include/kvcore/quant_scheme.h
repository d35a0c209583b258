// Quantization schemes of the quantized caches, and the mechanics of the
// rotated, per-channel one: keys rotated over the head dim and quantized per
// channel across groups of tokens (stored transposed, the newest partial
// group in float), values rotated and quantized per token.
#pragma once

#include <string>

#include "kvcore/cache.h"

namespace kvcore {

/// How a quantized cache lays out its keys and values.
enum class QuantScheme {
  /// mlx-lm's: keys and values per token, in groups along the head dim.
  affine,
  /// Keys and values rotated by an orthonormal Hadamard transform of the
  /// head dim; keys quantized per channel over groups of group_size tokens
  /// (weights (B, H, D, T * bits / 32)), values per token as in affine; the
  /// newest `window` tokens and the group not yet full kept in float.
  rotated_channel,
};

/// "affine" or "rotated-channel": the name files and Python use.
const char* scheme_name(QuantScheme scheme);
/// The scheme of that name; ValueError naming it otherwise.
QuantScheme parse_scheme(const char* ctx, const std::string& name);

/// Float tokens a rotated_channel cache keeps by default: the newest 128.
constexpr int default_window = 128;

/// Throws ValueError unless the window suits the scheme: 0 for affine, 0 to
/// 1 << 20 for rotated_channel.
void check_window(const char* ctx, QuantScheme scheme, int window);

/// The most first tokens a rotated_channel cache keeps in float (its
/// attention sink, `sink`).
constexpr int max_sink = 256;

/// Throws ValueError unless the sink suits the scheme: 0 for affine, 0 to
/// max_sink for rotated_channel.
void check_sink(const char* ctx, QuantScheme scheme, int sink);

/// Throws ValueError unless the rotation takes this head dim: a power of
/// two from 2 to 16384 (mx::hadamard_transform's sizes of that form).
void check_rotation(const char* ctx, const char* what, int head_dim);

/// Throws ValueError unless the scales and biases of the keys and values
/// share one float dtype and each triple's biases have its scales' groups.
void check_scales(
    const char* ctx,
    const std::tuple<mx::array, mx::array, mx::array>& keys,
    const std::tuple<mx::array, mx::array, mx::array>& values);

/// x rotated over its last axis by the orthonormal (self-inverse) Hadamard
/// matrix: applying it twice gives x back.
mx::array hadamard(const mx::array& x);

/// The tokens of a transposed key buffer (B, H, D, packed) as float keys
/// (B, H, n, D): tokens [start, start + n) of it, n a multiple of
/// group_size. The quantized keys given back, as a trim into a group needs.
mx::array dequantize_channel_keys(
    const std::tuple<mx::array, mx::array, mx::array>& keys,
    int start,
    int n,
    int group_size,
    int bits,
    mx::Dtype dtype);

} // namespace kvcore
