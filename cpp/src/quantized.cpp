#include "kvcore/quantized.h"

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

namespace {

template <class F>
QuantizedArrays map3(const QuantizedArrays& q, F f) {
  return {f(std::get<0>(q)), f(std::get<1>(q)), f(std::get<2>(q))};
}

// Zero slots for S tokens shaped like each array of q.
QuantizedArrays grow3(const QuantizedArrays& q, int prev, int added, int step) {
  return map3(q, [&](const mx::array& x) {
    auto kept = (prev % step != 0) ? seq_slice(x, 0, prev) : x;
    return seq_concat({kept, seq_zeros(x, added)});
  });
}

QuantizedArrays write3(const QuantizedArrays& buf, const QuantizedArrays& x, int at) {
  return {
      seq_write(std::get<0>(buf), std::get<0>(x), at),
      seq_write(std::get<1>(buf), std::get<1>(x), at),
      seq_write(std::get<2>(buf), std::get<2>(x), at)};
}


// --- rotated_channel: keys stored transposed, (B, H, D, packed tokens) ------

mx::array last_axis_slice(const mx::array& a, int from, int to) {
  mx::Shape lo(a.ndim(), 0), hi = a.shape();
  lo.back() = from;
  hi.back() = to;
  return mx::slice(a, lo, hi);
}

// The first `groups` groups of tokens of a transposed key buffer.
QuantizedArrays channel_keys_upto(const QuantizedArrays& buf, int groups, int packed_per_group) {
  return {last_axis_slice(std::get<0>(buf), 0, groups * packed_per_group),
          last_axis_slice(std::get<1>(buf), 0, groups),
          last_axis_slice(std::get<2>(buf), 0, groups)};
}

// x written at column `at` of buf's last axis, after growing buf (kept up to
// `at`) by `grow` columns when grow > 0.
mx::array write_columns(const mx::array& buf, const mx::array& x, int at, int grow) {
  auto b = buf;
  if (grow > 0) {
    auto shape = x.shape();
    shape.back() = grow;
    b = mx::concatenate({last_axis_slice(buf, 0, at), mx::zeros(shape, x.dtype())}, -1);
  }
  mx::Shape lo(x.ndim(), 0), hi = x.shape();
  lo.back() = at;
  hi.back() = at + x.shape(-1);
  return mx::slice_update(b, x, lo, hi);
}

QuantizedArrays write_channel_keys(
    const QuantizedArrays& buf,
    const QuantizedArrays& q,
    int at_group,
    int grow_groups,
    int packed_per_group) {
  return {write_columns(std::get<0>(buf), std::get<0>(q), at_group * packed_per_group,
                        grow_groups * packed_per_group),
          write_columns(std::get<1>(buf), std::get<1>(q), at_group, grow_groups),
          write_columns(std::get<2>(buf), std::get<2>(q), at_group, grow_groups)};
}

// A rotated_channel state: transposed keys (B, H, D, packed), values per
// token, residual (B, H, R, D) with R < group, offset = quantized + R.
void check_channel_state(
    const char* ctx,
    const OptionalQuantized& keys,
    const OptionalQuantized& values,
    int offset,
    QuantSpec key_spec,
    QuantSpec value_spec,
    const OptionalArray& residual) {
  const int G = key_spec.group_size;
  const int R = residual ? residual->shape(2) : 0;
  if (!keys) {
    if (residual || offset != 0) {
      throw ValueError(ctx, "keys and values with an offset or residual keys", "None");
    }
    return;
  }
  const auto& [kw, ks, kb] = *keys;
  const auto& [vw, vs, vb] = *values;
  const int B = kw.shape(0), H = kw.shape(1), D = kw.shape(2);
  check_rotation(ctx, "a key head dim", D);
  const int Dv = vs.shape(3) * value_spec.group_size;
  check_rotation(ctx, "a value head dim", Dv);
  if (kw.shape(3) != ks.shape(3) * G * key_spec.bits / 32 || ks.shape(3) != kb.shape(3)) {
    throw ValueError(ctx, "key weights of " + std::to_string(G * key_spec.bits / 32) +
                              " words per group of scales",
                     shape_str(kw.shape()) + " with scales " + shape_str(ks.shape()));
  }
  if (vw.shape(0) != B || vw.shape(1) != H || vw.shape(3) * 32 != Dv * value_spec.bits ||
      vs.shape(3) != vb.shape(3)) {
    throw ValueError(ctx, "values (B, H) " + shape_str({B, H}) + " with packed weights of " +
                              std::to_string(Dv * value_spec.bits / 32) + " words",
                     shape_str(vw.shape()));
  }
  if (residual) {
    const auto& r = *residual;
    if (r.ndim() != 4 || r.shape(0) != B || r.shape(1) != H || r.shape(3) != D || R < 1 ||
        R >= G || r.dtype() != ks.dtype()) {
      throw ValueError(ctx, "residual keys (B, H, R, D) with 0 < R < " + std::to_string(G) +
                                " of dtype " + dtype_str(ks.dtype()),
                       shape_str(r.shape()) + " " + dtype_str(r.dtype()));
    }
  }
  const int quantized = offset - R;
  if (offset < 0 || quantized < 0 || quantized % G != 0 || quantized > ks.shape(3) * G ||
      offset > vw.shape(2)) {
    throw ValueError(ctx,
                     "an offset of whole key groups (" + std::to_string(ks.shape(3)) + " of " +
                         std::to_string(G) + " tokens at most) plus " + std::to_string(R) +
                         " residual tokens, within the " + std::to_string(vw.shape(2)) +
                         " value slots",
                     "offset " + std::to_string(offset));
  }
}

} // namespace

void check_triple_fits(
    const char* ctx,
    const char* what,
    const QuantizedArrays& x,
    const QuantizedArrays& buf) {
  check_fits(ctx, what, std::get<0>(x), std::get<0>(buf));
  check_fits(ctx, what, std::get<1>(x), std::get<1>(buf));
  check_fits(ctx, what, std::get<2>(x), std::get<2>(buf));
}

void check_triple(const char* ctx, const char* what, const QuantizedArrays& q) {
  const auto& w = std::get<0>(q);
  for (const auto* a : {&std::get<0>(q), &std::get<1>(q), &std::get<2>(q)}) {
    if (a->ndim() != 4 || a->shape(0) != w.shape(0) || a->shape(1) != w.shape(1) ||
        a->shape(2) != w.shape(2)) {
      throw ValueError(
          ctx,
          std::string(what) + " as three rank-4 arrays sharing (B, H, S) " +
              (w.ndim() == 4 ? shape_str({w.shape(0), w.shape(1), w.shape(2)}) : ""),
          "shape " + shape_str(a->shape()));
    }
  }
  if (w.dtype() != mx::uint32) {
    throw ValueError(ctx, std::string(what) + " weights of dtype uint32", dtype_str(w.dtype()));
  }
}


void check_quantization(const char* ctx, int group_size, int bits) {
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw ValueError(ctx, "group_size in {32, 64, 128}", std::to_string(group_size));
  }
  if (bits < 2 || bits > 8 || bits == 7) {
    throw ValueError(ctx, "bits in {2, 3, 4, 5, 6, 8}", std::to_string(bits));
  }
}

void check_specs(const char* ctx, QuantSpec keys, QuantSpec values) {
  check_quantization(ctx, keys.group_size, keys.bits);
  check_quantization(ctx, values.group_size, values.bits);
}

void check_triples(const char* ctx, const OptionalQuantized& keys, const OptionalQuantized& values) {
  if (keys.has_value() != values.has_value()) {
    throw ValueError(ctx, "keys and values both set or both None", "only one set");
  }
  if (keys) {
    check_triple(ctx, "keys", *keys);
    check_triple(ctx, "values", *values);
  }
}

std::pair<QuantizedArrays, QuantizedArrays> quantize_kv(
    const char* ctx,
    const mx::array& keys,
    const mx::array& values,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  return {quantize(ctx, keys, key_spec.group_size, key_spec.bits),
          quantize(ctx, values, value_spec.group_size, value_spec.bits)};
}

std::pair<OptionalQuantized, OptionalQuantized> quantize_buffers(
    const char* ctx,
    const OptionalArray& keys,
    const OptionalArray& values,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  if (!keys || !values) {
    return {std::nullopt, std::nullopt};
  }
  return quantize_kv(ctx, *keys, *values, key_spec, value_spec);
}

QuantizedArrays quantize(const char* ctx, const mx::array& x, int group_size, int bits) {
  // mx::quantize refuses integers itself, but takes float64 and fails only
  // when the result is evaluated.
  if (x.dtype() != mx::float16 && x.dtype() != mx::bfloat16 && x.dtype() != mx::float32) {
    throw ValueError(
        ctx,
        "keys and values of dtype float16, bfloat16 or float32 to quantize",
        dtype_str(x.dtype()));
  }
  int D = x.shape(-1);
  if (D % group_size != 0 || (D * bits) % 32 != 0) {
    throw ValueError(
        ctx,
        "a head dim divisible by group_size " + std::to_string(group_size),
        "head dim " + std::to_string(D));
  }
  auto q = mx::quantize(x, group_size, bits);
  return {q[0], q[1], q[2]};
}

QuantizedKVCache::QuantizedKVCache(QuantSpec keys, QuantSpec values, QuantScheme scheme)
    : key_spec_(keys), value_spec_(values), scheme_(scheme) {
  check_specs("QuantizedKVCache", keys, values);
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  if (scheme_ != QuantScheme::affine) {
    return update_channel(keys, values);
  }
  constexpr const char* ctx = "QuantizedKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  const int B = keys.shape(0), H = keys.shape(1), S = keys.shape(2);
  const int prev = offset_;
  const int end = check_size(ctx, "offset + S", 1LL * prev + S);
  if (keys_.has_value() != values_.has_value()) {
    throw RuntimeError(ctx, "keys and values both set or both None", "only one set");
  }
  if (values.dtype() != keys.dtype()) {
    throw ValueError(ctx, "values of the keys' dtype " + dtype_str(keys.dtype()),
                     dtype_str(values.dtype()));
  }
  auto [qk, qv] = quantize_kv(ctx, keys, values, key_spec_, value_spec_);
  if (keys_) {
    check_triple(ctx, "keys", *keys_);
    check_triple(ctx, "values", *values_);
    check_triple_fits(ctx, "keys", qk, *keys_);
    check_triple_fits(ctx, "values", qv, *values_);
    check_offset_fits(ctx, std::get<0>(*keys_), prev);
  } else if (prev != 0) {
    throw RuntimeError(ctx, "offset 0 in an empty cache", "offset " + std::to_string(prev));
  }

  await_buffer_release(capacity_, keys_.has_value(), S);
  OptionalQuantized kbuf = keys_, vbuf = values_;
  if (!kbuf || prev + S > std::get<0>(*kbuf).shape(2)) {
    const int step = check_size(ctx, "step", this->step(), 1);
    const int kept = kbuf ? (prev % step != 0 ? prev : std::get<0>(*kbuf).shape(2)) : 0;
    const int added = check_size(
        ctx, "buffer growth",
        std::max((1LL * step + S - 1) / step * step, 1LL * capacity_ - kept));
    // Bytes per token of the grown triples: packed weights and the scales
    // and biases of the keys and the values.
    auto per_token = [&](const QuantizedArrays& q) {
      return double(B) * H *
          (std::get<0>(q).shape(3) * 4.0 + 2.0 * std::get<1>(q).shape(3) * keys.itemsize());
    };
    check_memory(ctx, std::to_string(kept + added) + " tokens",
                 double(kept + added) * (per_token(qk) + per_token(qv)));
    if (kbuf) {
      kbuf = grow3(*kbuf, prev, added, step);
      vbuf = grow3(*vbuf, prev, added, step);
    } else {
      // As mlx-lm: both triples' scales and biases take the keys' dtype.
      auto init = [&](int packed, int groups) {
        return QuantizedArrays{
            mx::zeros({B, H, added, packed}, mx::uint32),
            mx::zeros({B, H, added, groups}, keys.dtype()),
            mx::zeros({B, H, added, groups}, keys.dtype())};
      };
      kbuf = init(std::get<0>(qk).shape(3), std::get<1>(qk).shape(3));
      vbuf = init(std::get<0>(qv).shape(3), std::get<1>(qv).shape(3));
    }
  }
  auto k = write3(*kbuf, qk, prev);
  auto v = write3(*vbuf, qv, prev);
  kbuf.reset();
  vbuf.reset();
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ = end;
  return keys_and_values();
}


std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::update_channel(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "QuantizedKVCache.update_and_fetch";
  check_kv(ctx, keys, values);
  const int B = keys.shape(0), H = keys.shape(1), S = keys.shape(2), D = keys.shape(3);
  const int prev = offset_;
  const int end = check_size(ctx, "offset + S", 1LL * prev + S);
  if (values.dtype() != keys.dtype()) {
    throw ValueError(ctx, "values of the keys' dtype " + dtype_str(keys.dtype()),
                     dtype_str(values.dtype()));
  }
  check_rotation(ctx, "a key head dim", D);
  check_rotation(ctx, "a value head dim", values.shape(3));
  auto qv = quantize(ctx, hadamard(values), value_spec_.group_size, value_spec_.bits);
  const int G = key_spec_.group_size, per_group = G * key_spec_.bits / 32;
  const int done = quantized_tokens();
  if (keys_) {
    check_triple(ctx, "keys", *keys_);
    check_triple(ctx, "values", *values_);
    check_triple_fits(ctx, "values", qv, *values_);
    if (std::get<0>(*keys_).shape(2) != D || std::get<1>(*keys_).dtype() != keys.dtype()) {
      throw ValueError(ctx, "keys (B, H, S, D) of head dim " +
                                std::to_string(std::get<0>(*keys_).shape(2)) + " and dtype " +
                                dtype_str(std::get<1>(*keys_).dtype()),
                       shape_str(keys.shape()) + " " + dtype_str(keys.dtype()));
    }
    check_offset_fits(ctx, std::get<0>(*values_), prev);
  } else if (prev != 0) {
    throw RuntimeError(ctx, "offset 0 in an empty cache", "offset " + std::to_string(prev));
  }
  auto rotated = hadamard(keys);
  auto pending = residual_ ? mx::concatenate({*residual_, rotated}, 2) : rotated;
  const int n = pending.shape(2), full = n / G * G;

  const int step = check_size(ctx, "step", this->step(), 1);
  // Values: one slot per token, grown by whole steps as the affine layout.
  const int vcap = values_ ? std::get<0>(*values_).shape(2) : 0;
  const int vgrow = (!values_ || end > vcap)
      ? check_size(ctx, "buffer growth",
                   std::max((1LL * step + S - 1) / step * step, 1LL * capacity_ - prev))
      : 0;
  // Keys: whole groups of tokens, grown by steps rounded up to groups.
  const int kcap = keys_ ? std::get<1>(*keys_).shape(3) : 0;
  const int need = (done + full) / G;
  const int gstep = (step + G - 1) / G;
  const int kgrow = (full > 0 && need > kcap)
      ? check_size(ctx, "buffer growth",
                   std::max((1LL * full / G + gstep - 1) / gstep * gstep,
                            (1LL * capacity_ + G - 1) / G - done / G))
      : 0;
  const double itemsize = keys.itemsize();
  check_memory(ctx, "quantized keys and values",
               double(B) * H *
                   (double(vgrow) * (std::get<0>(qv).shape(3) * 4.0 +
                                     2.0 * std::get<1>(qv).shape(3) * itemsize) +
                    double(kgrow) * D * (per_group * 4.0 + 2.0 * itemsize)));

  OptionalQuantized kbuf = keys_, vbuf = values_;
  if (!kbuf) {
    kbuf = QuantizedArrays{mx::zeros({B, H, D, 0}, mx::uint32), mx::zeros({B, H, D, 0}, keys.dtype()),
                           mx::zeros({B, H, D, 0}, keys.dtype())};
    vbuf = QuantizedArrays{mx::zeros({B, H, 0, std::get<0>(qv).shape(3)}, mx::uint32),
                           mx::zeros({B, H, 0, std::get<1>(qv).shape(3)}, keys.dtype()),
                           mx::zeros({B, H, 0, std::get<1>(qv).shape(3)}, keys.dtype())};
  }
  if (full > 0) {
    auto qk = quantize(ctx, mx::swapaxes(seq_slice(pending, 0, full), 2, 3), G, key_spec_.bits);
    kbuf = write_channel_keys(*kbuf, qk, done / G, kgrow, per_group);
  }
  if (vgrow > 0) {
    vbuf = map3(*vbuf, [&](const mx::array& x) {
      return seq_concat({seq_slice(x, 0, prev), seq_zeros(x, vgrow)});
    });
  }
  auto v = write3(*vbuf, qv, prev);
  OptionalArray residual;
  if (n > full) {
    residual = seq_slice(pending, full, n);
  }
  vbuf.reset();
  keys_ = std::move(kbuf);
  values_ = std::move(v);
  residual_ = std::move(residual);
  offset_ = end;
  return keys_and_values();
}

std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("QuantizedKVCache.keys_and_values", "the cache is empty: no keys or values yet");
  }
  auto upto = [this](const mx::array& x) { return seq_slice(x, 0, offset_); };
  if (scheme_ != QuantScheme::affine) {
    const int t = quantized_tokens(), G = key_spec_.group_size;
    auto keys = channel_keys_upto(*keys_, t / G, G * key_spec_.bits / 32);
    return {keys, offset_ == std::get<0>(*values_).shape(2) ? *values_ : map3(*values_, upto)};
  }
  if (offset_ == std::get<0>(*keys_).shape(2)) {
    return {*keys_, *values_};
  }
  return {map3(*keys_, upto), map3(*values_, upto)};
}

int QuantizedKVCache::trim(int n) {
  check_size("QuantizedKVCache.trim", "n", n);
  n = std::min(offset_, n);
  const int end = offset_ - n;
  if (scheme_ != QuantScheme::affine && n > 0) {
    const int t = quantized_tokens(), G = key_spec_.group_size;
    OptionalArray residual;
    if (end > t) {
      residual = seq_slice(*residual_, 0, end - t);
    } else if (end % G != 0) {
      // The kept part of a quantized group goes back to the float residual.
      auto group = dequantize_channel_keys(*keys_, end / G * G, G, G, key_spec_.bits,
                                           std::get<1>(*keys_).dtype());
      residual = seq_slice(group, 0, end % G);
    }
    residual_ = std::move(residual);
  }
  offset_ = end;
  return n;
}

Mask QuantizedKVCache::make_mask(
    int N,
    bool return_array,
    std::optional<int> window_size) const {
  return create_attention_mask(N, offset_, return_array, window_size);
}

std::vector<OptionalArray> QuantizedKVCache::state() const {
  std::vector<OptionalArray> out;
  for (const auto* q : {&keys_, &values_}) {
    if (*q) {
      out.insert(out.end(), {std::get<0>(**q), std::get<1>(**q), std::get<2>(**q)});
    } else {
      out.insert(out.end(), {std::nullopt, std::nullopt, std::nullopt});
    }
  }
  if (scheme_ != QuantScheme::affine) {
    out.push_back(residual_);
  }
  return out;
}

std::pair<OptionalQuantized, OptionalQuantized> triples_from_arrays(
    const char* ctx,
    const std::vector<OptionalArray>& arrays) {
  if (arrays.size() < 6) {
    throw ValueError(ctx, "at least 6 arrays", std::to_string(arrays.size()));
  }
  auto triple = [&](size_t i) -> OptionalQuantized {
    int set = arrays[i].has_value() + arrays[i + 1].has_value() + arrays[i + 2].has_value();
    if (set == 0) {
      return std::nullopt;
    }
    if (set != 3) {
      throw ValueError(ctx, "a triple of three arrays or of three None", std::to_string(set) + " arrays");
    }
    return QuantizedArrays{*arrays[i], *arrays[i + 1], *arrays[i + 2]};
  };
  return {triple(0), triple(3)};
}

std::vector<std::string> QuantizedKVCache::meta_state() const {
  std::vector<std::string> out = {std::to_string(offset_), std::to_string(key_spec_.group_size),
                                  std::to_string(key_spec_.bits)};
  if (scheme_ != QuantScheme::affine) {
    out.push_back(scheme_name(scheme_));
  }
  return out;
}

void QuantizedKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedKVCache.state";
  const bool affine = meta.size() != 4;
  check_count(ctx, "arrays", arrays.size(), affine ? 6 : 7);
  check_count(ctx, "scalars", meta.size(), affine ? 3 : 4);
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  QuantSpec spec{parse_int(ctx, "group_size", meta[1]), parse_int(ctx, "bits", meta[2])};
  set(std::move(keys), std::move(values), parse_int(ctx, "offset", meta[0]), spec, spec,
      affine ? QuantScheme::affine : parse_scheme(ctx, meta[3]),
      affine ? std::nullopt : arrays[6]);
}

void QuantizedKVCache::set(
    OptionalQuantized keys,
    OptionalQuantized values,
    int offset,
    QuantSpec key_spec,
    QuantSpec value_spec,
    QuantScheme scheme,
    OptionalArray residual) {
  constexpr const char* ctx = "QuantizedKVCache.state";
  check_specs(ctx, key_spec, value_spec);
  check_triples(ctx, keys, values);
  if (scheme != QuantScheme::affine) {
    check_channel_state(ctx, keys, values, offset, key_spec, value_spec, residual);
    keys_ = std::move(keys);
    values_ = std::move(values);
    offset_ = offset;
    key_spec_ = key_spec;
    value_spec_ = value_spec;
    scheme_ = scheme;
    residual_ = std::move(residual);
    return;
  }
  if (residual) {
    throw ValueError(ctx, "no residual keys for the affine scheme",
                     "an array " + shape_str(residual->shape()));
  }
  int len = 0;
  if (keys) {
    len = std::get<0>(*keys).shape(2);
    if (std::get<0>(*values).shape(2) != len ||
        std::get<0>(*values).shape(0) != std::get<0>(*keys).shape(0) ||
        std::get<0>(*values).shape(1) != std::get<0>(*keys).shape(1)) {
      throw ValueError(ctx, "values sharing the keys' (B, H, S)",
                       shape_str(std::get<0>(*values).shape()));
    }
  }
  if (offset < 0 || offset > len) {
    throw ValueError(ctx, "an offset in [0, " + std::to_string(len) + "]",
                     "offset " + std::to_string(offset));
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = offset;
  key_spec_ = key_spec;
  value_spec_ = value_spec;
  scheme_ = QuantScheme::affine;
  residual_.reset();
}

size_t QuantizedKVCache::nbytes() const {
  size_t n = 0;
  for (const auto& a : state()) {
    n += nbytes_of(a);
  }
  return n;
}

void QuantizedKVCache::set_offset(int offset) {
  offset_ = check_size("QuantizedKVCache.offset", "offset", offset);
}

void QuantizedKVCache::set_capacity(int capacity) {
  capacity_ = check_size("QuantizedKVCache.capacity", "capacity", capacity);
}

void QuantizedKVCache::set_step(int step) {
  step_ = check_size("QuantizedKVCache.step", "step", step, 1);
}

QuantizedKVCache to_quantized(
    const KVCache& cache,
    QuantSpec keys,
    QuantSpec values,
    QuantScheme scheme) {
  constexpr const char* ctx = "KVCache.to_quantized";
  if (scheme != QuantScheme::affine) {
    check_specs(ctx, keys, values);
    QuantizedKVCache out(keys, values, scheme);
    if (cache.keys() && cache.values() && cache.offset() > 0) {
      out.update_and_fetch(seq_slice(*cache.keys(), 0, cache.offset()),
                           seq_slice(*cache.values(), 0, cache.offset()));
    }
    return out;
  }
  QuantizedKVCache out(keys, values);
  out.set_offset(cache.offset());
  auto [qk, qv] = quantize_buffers(ctx, cache.keys(), cache.values(), keys, values);
  out.set_keys(std::move(qk));
  out.set_values(std::move(qv));
  return out;
}

} // namespace kvcore
