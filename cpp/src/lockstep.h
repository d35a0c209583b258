// The quantized caches built from three float caches run in lockstep: part
// 0 holds the weights, part 1 the scales, part 2 the biases, each as the
// "keys" and "values" of a float cache (QuantizedRotatingKVCache over
// RotatingKVCache, the quantized batch caches over the batch caches).
#pragma once

#include "kvcore/quantized.h"

namespace kvcore::lockstep {

/// Part i of a triple: 0 weights, 1 scales, 2 biases.
inline const mx::array& nth(const QuantizedArrays& q, int i) {
  return i == 0 ? std::get<0>(q) : i == 1 ? std::get<1>(q) : std::get<2>(q);
}

inline OptionalArray nth(const OptionalQuantized& q, int i) {
  if (!q) {
    return std::nullopt;
  }
  return nth(*q, i);
}

/// The keys' (or values') triple gathered from the three parts.
template <class Part>
OptionalQuantized gather(const Part (&parts)[3], bool values) {
  const auto& w = values ? parts[0].values() : parts[0].keys();
  if (!w) {
    return std::nullopt;
  }
  auto part = [&](int i) { return values ? *parts[i].values() : *parts[i].keys(); };
  return QuantizedArrays{part(0), part(1), part(2)};
}

/// Writes quantized keys and values into the parts. Every part's buffers
/// are checked against the update before any part is written: the scales'
/// and biases' dtype follows the new keys', which the weights' part cannot
/// see, so a float16 update into a float32 cache must fail before the
/// weights move on. Past the checks the three writes cannot fail.
template <class Part>
std::pair<QuantizedArrays, QuantizedArrays> update(
    const char* ctx,
    Part (&parts)[3],
    const QuantizedArrays& keys,
    const QuantizedArrays& values) {
  if (auto k = gather(parts, false)) {
    check_triple_fits(ctx, "keys", keys, *k);
  }
  if (auto v = gather(parts, true)) {
    check_triple_fits(ctx, "values", values, *v);
  }
  auto [kw, vw] = parts[0].update_and_fetch(std::get<0>(keys), std::get<0>(values));
  auto [ks, vs] = parts[1].update_and_fetch(std::get<1>(keys), std::get<1>(values));
  auto [kb, vb] = parts[2].update_and_fetch(std::get<2>(keys), std::get<2>(values));
  return {{kw, ks, kb}, {vw, vs, vb}};
}

template <class Part>
std::pair<QuantizedArrays, QuantizedArrays> keys_and_values(const Part (&parts)[3]) {
  auto [kw, vw] = parts[0].keys_and_values();
  auto [ks, vs] = parts[1].keys_and_values();
  auto [kb, vb] = parts[2].keys_and_values();
  return {{kw, ks, kb}, {vw, vs, vb}};
}

/// Copies of the parts, changed by op(part, i), put in place only when all
/// three changes succeeded.
template <class Part, class Op>
void staged(Part (&parts)[3], Op op) {
  Part copies[3] = {parts[0], parts[1], parts[2]};
  for (int i = 0; i < 3; ++i) {
    op(copies[i], i);
  }
  for (int i = 0; i < 3; ++i) {
    parts[i] = std::move(copies[i]);
  }
}

/// The state's arrays: the keys' triple, then the values'.
template <class Part>
std::vector<OptionalArray> state_arrays(const Part (&parts)[3]) {
  std::vector<OptionalArray> out;
  for (bool v : {false, true}) {
    for (const auto& p : parts) {
      out.push_back(v ? p.values() : p.keys());
    }
  }
  return out;
}

template <class Part>
size_t nbytes(const Part (&parts)[3]) {
  size_t n = 0;
  for (const auto& p : parts) {
    n += p.nbytes();
  }
  return n;
}

} // namespace kvcore::lockstep
