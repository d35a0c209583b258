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
  const auto& [w, scales, biases] = q;
  for (const auto* a : {&w, &scales, &biases}) {
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

void check_triple(const char* ctx, const char* what, const QuantizedArrays& q, QuantSpec spec) {
  check_triple(ctx, what, q);
  const auto& [w, scales, biases] = q;
  // The head dim the weights pack at `bits` is the one the scales and
  // biases cover in groups of `group_size`.
  const long long dim = static_cast<long long>(w.shape(3)) * 32 / spec.bits;
  if (scales.shape(3) != biases.shape(3) || dim * spec.bits != 32LL * w.shape(3) ||
      static_cast<long long>(scales.shape(3)) * spec.group_size != dim) {
    throw ValueError(
        ctx,
        std::string(what) + " weights, scales and biases of one head dim at bits " +
            std::to_string(spec.bits) + " and group_size " + std::to_string(spec.group_size),
        "shapes " + shape_str(w.shape()) + ", " + shape_str(scales.shape()) + ", " +
            shape_str(biases.shape()));
  }
  if (scales.dtype() != biases.dtype() || !mx::issubdtype(scales.dtype(), mx::floating)) {
    throw ValueError(ctx, std::string(what) + " scales and biases of one float dtype",
                     dtype_str(scales.dtype()) + " and " + dtype_str(biases.dtype()));
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

void check_triples(
    const char* ctx,
    const OptionalQuantized& keys,
    const OptionalQuantized& values,
    QuantSpec key_spec,
    QuantSpec value_spec) {
  check_triples(ctx, keys, values);
  if (keys) {
    check_triple(ctx, "keys", *keys, key_spec);
    check_triple(ctx, "values", *values, value_spec);
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

QuantizedKVCache::QuantizedKVCache(QuantSpec keys, QuantSpec values, QuantScheme scheme, int window, int sink)
    : key_spec_(keys), value_spec_(values), scheme_(scheme), window_(window), sink_(sink) {
  check_specs("QuantizedKVCache", keys, values);
  check_window("QuantizedKVCache", scheme, window);
  check_sink("QuantizedKVCache", scheme, sink);
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
    check_triple(ctx, "keys", *keys_, key_spec_);
    check_triple(ctx, "values", *values_, value_spec_);
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


std::pair<QuantizedArrays, QuantizedArrays> QuantizedKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("QuantizedKVCache.keys_and_values", "the cache is empty: no keys or values yet");
  }
  auto upto = [this](const mx::array& x) { return seq_slice(x, 0, offset_); };
  if (scheme_ != QuantScheme::affine) {
    return channel_keys_and_values();
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
    trim_channel(end);
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
    out.push_back(value_residual_);
  }
  if (sink_ > 0) {
    out.push_back(sink_keys_);
    out.push_back(sink_values_);
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
    out.push_back(std::to_string(window_));
  }
  if (sink_ > 0) {
    out.push_back(std::to_string(sink_));
  }
  return out;
}

void QuantizedKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "QuantizedKVCache.state";
  // affine: 3 scalars and 6 arrays; rotated_channel: 5 and 8, with a sink 6
  // and 10.
  const bool affine = meta.size() != 5 && meta.size() != 6;
  const bool sink = meta.size() == 6;
  check_count(ctx, "arrays", arrays.size(), affine ? 6 : (sink ? 10 : 8));
  check_count(ctx, "scalars", meta.size(), affine ? 3 : (sink ? 6 : 5));
  auto [keys, values] = triples_from_arrays(ctx, arrays);
  QuantSpec spec{parse_int(ctx, "group_size", meta[1]), parse_int(ctx, "bits", meta[2])};
  if (affine) {
    set(std::move(keys), std::move(values), parse_int(ctx, "offset", meta[0]), spec, spec);
    return;
  }
  const int n = sink ? parse_int(ctx, "sink", meta[5]) : 0;
  if (sink && n == 0) {
    throw ValueError(ctx, "a sink of 1 or more tokens where its arrays are given", "sink 0");
  }
  set(std::move(keys), std::move(values), parse_int(ctx, "offset", meta[0]), spec, spec,
      parse_scheme(ctx, meta[3]), arrays[6], arrays[7], parse_int(ctx, "window", meta[4]), n,
      sink ? arrays[8] : std::nullopt, sink ? arrays[9] : std::nullopt);
}

void QuantizedKVCache::set(
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
  check_specs(ctx, key_spec, value_spec);
  if (scheme != QuantScheme::affine) {
    // Keys grouped per channel run their groups along tokens: set_channel
    // checks those layouts itself.
    check_triples(ctx, keys, values);
    set_channel(std::move(keys), std::move(values), offset, key_spec, value_spec, scheme,
                std::move(residual), std::move(value_residual), window, sink, std::move(sink_keys),
                std::move(sink_values));
    return;
  }
  if (residual || value_residual || window != 0 || sink != 0 || sink_keys || sink_values) {
    throw ValueError(ctx, "no residual, window 0 and no sink for the affine scheme",
                     "window " + std::to_string(window) + ", sink " + std::to_string(sink));
  }
  check_triples(ctx, keys, values, key_spec, value_spec);
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
  sink_ = 0;
  sink_keys_.reset();
  sink_values_.reset();
  residual_.reset();
  value_residual_.reset();
  window_ = 0;
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
    QuantScheme scheme,
    int window,
    int sink) {
  constexpr const char* ctx = "KVCache.to_quantized";
  check_sink(ctx, scheme, sink);
  if (scheme != QuantScheme::affine) {
    check_specs(ctx, keys, values);
    QuantizedKVCache out(keys, values, scheme, window, sink);
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
