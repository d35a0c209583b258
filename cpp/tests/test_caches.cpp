// C++ tests of the caches against hand-computed expectations.
#include <mlx/fast.h>
#include <mlx/ops.h>
#include <mlx/random.h>

#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/mask.h"
#include "kvcore/rotating.h"
#include "test.h"

namespace mx = mlx::core;
using namespace kvcore;

namespace {

// (1, 1, S, 2) tokens whose values are their positions: token t = [t, t].
mx::array tokens(int first, int S) {
  auto t = mx::astype(mx::arange(first, first + S), mx::float32);
  return mx::broadcast_to(mx::reshape(t, {1, 1, S, 1}), {1, 1, S, 2});
}

// The token positions a (1, 1, S, 2) array holds, read off column 0.
std::vector<int> positions(const mx::array& a) {
  auto col = mx::astype(mx::slice(a, {0, 0, 0, 0}, {1, 1, a.shape(2), 1}), mx::int32);
  col.eval();
  std::vector<int> out(col.data<int32_t>(), col.data<int32_t>() + col.size());
  return out;
}

std::vector<int> range(int a, int b) {
  std::vector<int> v;
  for (int i = a; i < b; ++i) v.push_back(i);
  return v;
}

bool same(const std::vector<int>& a, const std::vector<int>& b) {
  return a == b;
}

} // namespace

TEST(kvcache_grows_in_steps_and_returns_up_to_offset) {
  KVCache c;
  c.set_step(4);
  auto [k, v] = c.update_and_fetch(tokens(0, 3), tokens(0, 3));
  CHECK_EQ(c.offset(), 3);
  CHECK_EQ(c.keys()->shape(2), 4);
  CHECK(same(positions(k), range(0, 3)));
  auto [k2, v2] = c.update_and_fetch(tokens(3, 1), tokens(3, 1));
  CHECK_EQ(c.keys()->shape(2), 4);
  CHECK(same(positions(k2), range(0, 4)));
  auto [k3, v3] = c.update_and_fetch(tokens(4, 5), tokens(4, 5));
  CHECK_EQ(c.offset(), 9);
  CHECK_EQ(c.keys()->shape(2), 12); // 4 + two more steps of 4
  CHECK(same(positions(k3), range(0, 9)));
  CHECK(same(positions(v3), range(0, 9)));
}

TEST(kvcache_trim_then_update_overwrites_trimmed_tokens) {
  KVCache c;
  c.update_and_fetch(tokens(0, 6), tokens(0, 6));
  CHECK_EQ(c.trim(2), 2);
  CHECK_EQ(c.offset(), 4);
  CHECK_EQ(c.trim(100), 4);
  CHECK_EQ(c.offset(), 0);
  auto [k, v] = c.update_and_fetch(tokens(10, 2), tokens(10, 2));
  CHECK(same(positions(k), std::vector<int>{10, 11}));
}

TEST(kvcache_state_round_trip) {
  KVCache a;
  a.update_and_fetch(tokens(0, 5), tokens(0, 5));
  KVCache b;
  b.restore(a.state(), a.meta_state());
  CHECK_EQ(b.offset(), 5);
  auto [k, v] = b.update_and_fetch(tokens(5, 1), tokens(5, 1));
  CHECK(same(positions(k), range(0, 6)));
}

TEST(kvcache_bad_input_throws_and_leaves_cache_unchanged) {
  KVCache c;
  c.update_and_fetch(tokens(0, 2), tokens(0, 2));
  auto keys_before = *c.keys();
  CHECK_THROWS(ValueError, "keys of rank 4", c.update_and_fetch(mx::zeros({1, 2, 2}), tokens(0, 2)));
  CHECK_THROWS(ValueError, "like the cache's", c.update_and_fetch(mx::zeros({1, 2, 1, 2}), mx::zeros({1, 2, 1, 2})));
  CHECK_THROWS(ValueError, "dtype float32", c.update_and_fetch(mx::zeros({1, 1, 1, 2}, mx::float16), mx::zeros({1, 1, 1, 2}, mx::float16)));
  CHECK_THROWS(ValueError, "dtype float32", c.update_and_fetch(mx::zeros({1, 1, 1, 2}, mx::int32), mx::zeros({1, 1, 1, 2}, mx::int32)));
  CHECK_THROWS(ValueError, "n in [0", c.trim(-1));
  CHECK_THROWS(ValueError, "offset in [0, 256]", c.set(c.keys(), c.values(), 300));
  CHECK_EQ(c.offset(), 2);
  CHECK(c.keys()->id() == keys_before.id());
  auto [k, v] = c.update_and_fetch(tokens(2, 1), tokens(2, 1));
  CHECK(same(positions(k), range(0, 3)));
}

TEST(error_carries_context_expected_actual) {
  try {
    RotatingKVCache c(4, 4);
    CHECK(false);
  } catch (const ValueError& e) {
    CHECK(e.kind() == ErrorKind::Value);
    CHECK(e.context() == "RotatingKVCache");
    CHECK(e.expected() == "keep in [0, max_size) = [0, 4)");
    CHECK(e.actual() == "keep 4");
  }
}

TEST(rotating_single_tokens_wrap_around_keeping_the_first) {
  RotatingKVCache c(4, 1);
  c.set_step(2);
  for (int t = 0; t < 4; ++t) {
    c.update_and_fetch(tokens(t, 1), tokens(t, 1));
  }
  CHECK_EQ(c.keys()->shape(2), 4);
  CHECK_EQ(c.idx(), 4);
  auto [k, v] = c.update_and_fetch(tokens(4, 1), tokens(4, 1));
  // Slot 0 is pinned; token 4 replaces the oldest unpinned one (token 1).
  CHECK(same(positions(k), std::vector<int>{0, 4, 2, 3}));
  auto [k2, v2] = c.update_and_fetch(tokens(5, 1), tokens(5, 1));
  CHECK(same(positions(k2), std::vector<int>{0, 4, 5, 3}));
  CHECK_EQ(c.offset(), 6);
  CHECK_EQ(c.size(), 4);
  CHECK(!c.is_trimmable());
}

TEST(rotating_multi_token_update_restores_temporal_order) {
  RotatingKVCache c(4, 1);
  for (int t = 0; t < 6; ++t) {
    c.update_and_fetch(tokens(t, 1), tokens(t, 1));
  }
  auto [k, v] = c.update_and_fetch(tokens(6, 2), tokens(6, 2));
  // keep token 0, then the newest max_size - 1 - keep = 2 old ones, then 6, 7.
  CHECK(same(positions(k), std::vector<int>{0, 4, 5, 6, 7}));
  CHECK_EQ(c.idx(), 5);
  CHECK_EQ(c.offset(), 8);
}

TEST(rotating_trim_refused_once_tokens_rotated_out) {
  RotatingKVCache c(4);
  for (int t = 0; t < 5; ++t) {
    c.update_and_fetch(tokens(t, 1), tokens(t, 1));
  }
  CHECK_THROWS(RuntimeError, "nothing rotated out yet", c.trim(1));
  CHECK_EQ(c.offset(), 5);
  CHECK_EQ(c.trim(0), 0);
}

TEST(rotating_state_validation) {
  RotatingKVCache c(8);
  c.update_and_fetch(tokens(0, 3), tokens(0, 3));
  CHECK_THROWS(ValueError, "_idx in [0, 3]", c.set(c.keys(), c.values(), 3, 0, 8, 9));
  CHECK_THROWS(ValueError, "max_size in [1", c.set(c.keys(), c.values(), 3, 0, 0, 3));
  CHECK_THROWS(ValueError, "both set or both None", c.set(c.keys(), std::nullopt, 3, 0, 8, 3));
  CHECK_THROWS(ValueError, "as a base-10 integer", c.set_meta_state({"0", "8", "x", "3"}));
  CHECK_EQ(c.offset(), 3);
  CHECK_EQ(c.idx(), 3);
}

TEST(concatenate_trim_sticks) {
  ConcatenateKVCache c;
  c.update_and_fetch(tokens(0, 5), tokens(0, 5));
  CHECK_EQ(c.trim(2), 2);
  auto [k, v] = c.update_and_fetch(tokens(9, 1), tokens(9, 1));
  CHECK(same(positions(k), std::vector<int>{0, 1, 2, 9}));
  CHECK_EQ(c.offset(), 4);
}

TEST(causal_mask_with_offset_and_window) {
  auto m = create_causal_mask(2, 3, 2);
  CHECK(m.shape() == mx::Shape({2, 5}));
  auto expect = mx::array({false, false, true, true, false, false, false, false, true, true}, {2, 5});
  CHECK(mx::array_equal(m, expect).item<bool>());
  CHECK_THROWS(ValueError, "N in [0", create_causal_mask(-1));
}

TEST(attention_mask_kinds) {
  CHECK(std::holds_alternative<std::monostate>(create_attention_mask(1, 5)));
  CHECK(std::get<std::string>(create_attention_mask(3, 5)) == "causal");
  CHECK(std::holds_alternative<mx::array>(create_attention_mask(3, 5, true)));
  CHECK(std::holds_alternative<std::monostate>(create_attention_mask(1, 5, true)));
}

TEST(copy_is_independent) {
  KVCache a;
  a.update_and_fetch(tokens(0, 2), tokens(0, 2));
  auto b = a.copy();
  static_cast<KVCache&>(*b).update_and_fetch(tokens(2, 1), tokens(2, 1));
  CHECK_EQ(a.offset(), 2);
  CHECK_EQ(static_cast<KVCache&>(*b).offset(), 3);
  CHECK(same(positions(a.keys_and_values().first), range(0, 2)));
}

#include "kvcore/arrays.h"
#include "kvcore/batch.h"
#include "kvcore/chunked.h"
#include "kvcore/attention.h"
#include "kvcore/quantized.h"
#include "kvcore/quantized_batch.h"
#include "kvcore/quantized_rotating.h"

TEST(quantized_cache_round_trips_through_dequantize) {
  QuantizedKVCache c(32, 8);
  auto x = mx::astype(mx::reshape(mx::arange(64), {1, 1, 2, 32}), mx::float32);
  auto [k, v] = c.update_and_fetch(x, x);
  CHECK_EQ(c.offset(), 2);
  CHECK_EQ(std::get<0>(k).shape(2), 2);
  CHECK_EQ(std::get<0>(*c.keys()).shape(2), 256);
  auto back = mx::dequantize(std::get<0>(k), std::get<1>(k), std::get<2>(k), 32, 8);
  CHECK(mx::allclose(back, x, 0.0, 0.5).item<bool>());
  CHECK_THROWS(ValueError, "head dim divisible by group_size", c.update_and_fetch(mx::zeros({1, 1, 1, 48}), mx::zeros({1, 1, 1, 48})));
  CHECK_EQ(c.offset(), 2);
  CHECK_THROWS(ValueError, "bits in", QuantizedKVCache(64, 7));
}

TEST(rotated_channel_cache_keeps_whole_groups_quantized_and_the_rest_in_float) {
  QuantizedKVCache c({32, 4}, {64, 4}, QuantScheme::rotated_channel, 0);
  auto k = mx::random::normal({1, 2, 75, 64}, mx::float32, 0.0, 1.0, mx::random::key(1));
  auto v = mx::random::normal({1, 2, 75, 64}, mx::float32, 0.0, 1.0, mx::random::key(2));
  auto [qk, qv] = c.update_and_fetch(k, v);
  CHECK_EQ(c.quantized_tokens(), 64);
  CHECK(std::get<0>(qk).shape() == mx::Shape({1, 2, 64, 8}));  // (B, H, D, 64 tokens * 4 / 32)
  CHECK(c.residual()->shape() == mx::Shape({1, 2, 11, 64}));
  // Attention on the quantized data equals float attention over it dequantized.
  auto keys = mx::concatenate(
      std::vector<mx::array>{mx::swapaxes(mx::dequantize(std::get<0>(qk), std::get<1>(qk), std::get<2>(qk), 32, 4), 2, 3),
       *c.residual()}, 2);
  auto values = mx::concatenate(
      std::vector<mx::array>{mx::dequantize(std::get<0>(qv), std::get<1>(qv), std::get<2>(qv), 64, 4), *c.value_residual()}, 2);
  auto q = mx::random::normal({1, 4, 3, 64}, mx::float32, 0.0, 1.0, mx::random::key(3));
  auto got = channel_attention(q, qk, c.residual(), qv, c.value_residual(), 0.125f, std::string("causal"),
                               {32, 4}, {64, 4});
  auto want = mx::fast::scaled_dot_product_attention(q, hadamard(keys), hadamard(values), 0.125f, "causal");
  CHECK(mx::allclose(got, want, 1e-4, 1e-5).item<bool>());
  // State round trip (meta_state carries one group size and bits), and a
  // bad update changes nothing.
  QuantizedKVCache one({32, 4}, {32, 4}, QuantScheme::rotated_channel, 16);
  one.update_and_fetch(k, v);
  QuantizedKVCache back(64, 8);
  back.restore(one.state(), one.meta_state());
  CHECK(back.scheme() == QuantScheme::rotated_channel);
  CHECK_EQ(back.offset(), 75);
  CHECK_EQ(back.window(), 16);
  CHECK(mx::array_equal(*back.residual(), *one.residual()).item<bool>());
  CHECK_THROWS(ValueError, "power of two", c.update_and_fetch(mx::zeros({1, 2, 1, 48}), mx::zeros({1, 2, 1, 48})));
  CHECK_EQ(c.offset(), 75);
  CHECK_THROWS(ValueError, "'nope'", parse_scheme("test", "nope"));
}

TEST(rotated_channel_sink_reads_the_first_tokens_in_float) {
  // The first token an outlier: its float copy is what attention reads.
  auto k = mx::random::normal({1, 2, 75, 64}, mx::float32, 0.0, 1.0, mx::random::key(4));
  auto v = mx::random::normal({1, 2, 75, 64}, mx::float32, 0.0, 1.0, mx::random::key(5));
  auto scale = mx::concatenate(std::vector<mx::array>{mx::full({1, 1, 1, 1}, 30.0f), mx::ones({1, 1, 74, 1})}, 2);
  k = k * scale;
  v = v * scale;
  QuantizedKVCache c({32, 3}, {64, 3}, QuantScheme::rotated_channel, 0, 1);
  QuantizedKVCache plain({32, 3}, {64, 3}, QuantScheme::rotated_channel, 0);
  auto [qk, qv] = c.update_and_fetch(k, v);
  plain.update_and_fetch(k, v);
  CHECK(mx::array_equal(std::get<0>(qk), std::get<0>(plain.keys_and_values().first)).item<bool>());
  CHECK(c.sink_keys()->shape() == mx::Shape({1, 2, 1, 64}));
  auto deq_k = mx::swapaxes(mx::dequantize(std::get<0>(qk), std::get<1>(qk), std::get<2>(qk), 32, 3), 2, 3);
  auto deq_v = mx::dequantize(std::get<0>(qv), std::get<1>(qv), std::get<2>(qv), 64, 3);
  auto slice = [](const mx::array& a, int from, int to) {
    return mx::slice(a, {0, 0, from, 0}, {a.shape(0), a.shape(1), to, a.shape(3)});
  };
  auto keys = mx::concatenate(std::vector<mx::array>{*c.sink_keys(), slice(deq_k, 1, 64), *c.residual()}, 2);
  auto values = mx::concatenate(std::vector<mx::array>{*c.sink_values(), slice(deq_v, 1, 64), *c.value_residual()}, 2);
  auto q = mx::random::normal({1, 4, 3, 64}, mx::float32, 0.0, 1.0, mx::random::key(6));
  auto got = channel_attention(q, qk, c.residual(), qv, c.value_residual(), 0.125f, std::string("causal"),
                               {32, 3}, {64, 3}, ChannelSink{*c.sink_keys(), *c.sink_values(), mx::zeros({1}, mx::int32)});
  auto want = mx::fast::scaled_dot_product_attention(q, hadamard(keys), hadamard(values), 0.125f, "causal");
  CHECK(mx::allclose(got, want, 1e-4, 1e-4).item<bool>());
  // State and meta carry the sink (meta_state: one group size and bits);
  // the affine scheme takes none.
  QuantizedKVCache one({32, 3}, {32, 3}, QuantScheme::rotated_channel, 0, 1);
  one.update_and_fetch(k, v);
  QuantizedKVCache back(64, 8);
  back.restore(one.state(), one.meta_state());
  CHECK_EQ(back.sink(), 1);
  CHECK(mx::array_equal(*back.sink_values(), *one.sink_values()).item<bool>());
  CHECK_THROWS(ValueError, "no sink for the affine scheme", QuantizedKVCache({64, 4}, {64, 4}, QuantScheme::affine, 0, 1));
}

TEST(rotated_channel_sliding_window_drops_whole_groups_and_masks_what_the_ring_lost) {
  // max_size 64, keep 4 (one pinned group of 32), window 0: after a prefill
  // of 100 and 100 single tokens the groups at 32, 64 and 96 are dropped
  // (each once the ring's reach, offset - 59, passes its end).
  QuantizedRotatingKVCache c(64, 4, {32, 8}, {64, 8}, QuantScheme::rotated_channel, 0);
  RotatingKVCache ring(64, 4);
  auto k = mx::random::normal({1, 2, 100, 64}, mx::float32, 0.0, 1.0, mx::random::key(7));
  auto v = mx::random::normal({1, 2, 100, 64}, mx::float32, 0.0, 1.0, mx::random::key(8));
  c.update_and_fetch(k, v);
  ring.update_and_fetch(k, v);
  for (int i = 0; i < 100; ++i) {
    auto x = mx::random::normal({1, 2, 1, 64}, mx::float32, 0.0, 1.0, mx::random::key(100 + i));
    c.update_and_fetch(x, x * 0.5f);
    ring.update_and_fetch(x, x * 0.5f);
  }
  CHECK_EQ(c.offset(), 200);
  CHECK_EQ(c.dropped(), 96);
  CHECK_EQ(c.idx(), 104);
  CHECK(!c.is_trimmable());
  CHECK_THROWS(RuntimeError, "offset < max_size", c.trim(1));
  // The next token sees the ring's 64 tokens among the 105 held.
  auto one = std::get<mx::array>(c.make_mask(1));
  CHECK(one.shape() == mx::Shape({105}));
  CHECK_EQ(mx::sum(one).item<int>(), 64);
  // Attention over a chunk of 5 agrees with the float ring's at 8 bits.
  auto mask = c.make_mask(5);
  auto ring_mask = ring.make_mask(5);
  auto x = mx::random::normal({1, 2, 5, 64}, mx::float32, 0.0, 1.0, mx::random::key(9));
  auto [qk, qv] = c.update_and_fetch(x, x);
  auto [fk, fv] = ring.update_and_fetch(x, x);
  const auto& h = c.held();
  auto q = mx::random::normal({1, 4, 5, 64}, mx::float32, 0.0, 1.0, mx::random::key(10));
  auto got = channel_attention(q, qk, h.residual(), qv, h.value_residual(), 0.125f, mask, {32, 8}, {64, 8});
  auto want = mx::fast::scaled_dot_product_attention(q, fk, fv, 0.125f, "", std::get<mx::array>(ring_mask));
  CHECK(mx::allclose(got, want, 0.0, 0.05).item<bool>());
  // A sink beyond keep is refused; a merge into a batch takes the float
  // ring's 64 tokens (the 4 pinned, then the newest 60).
  CHECK_THROWS(ValueError, "a sink within keep (4 tokens)",
               QuantizedRotatingKVCache(64, 4, {32, 4}, {64, 4}, QuantScheme::rotated_channel, 0, 5));
  auto batch = QuantizedBatchRotatingKVCache::merge({&c});
  CHECK_EQ(batch.idx(), 64);
  CHECK(mx::array_equal(batch.offset(), mx::array({205})).item<bool>());
}

TEST(rotated_channel_batch_of_sliding_windows_drops_groups_and_windows_each_row) {
  // Rows padded by 0 and 20, max_size 64, window 0: a prefill of 100 and
  // 60 single tokens. A group goes from the front when an update starts
  // with the oldest position any row still sees (_idx - 63) past it: at
  // the 1st, 28th and 60th single token.
  QuantizedBatchRotatingKVCache c(64, {0, 20}, {32, 8}, {64, 8}, QuantScheme::rotated_channel, 0);
  BatchRotatingKVCache ring(64, {0, 20});
  auto k = mx::random::normal({2, 2, 100, 64}, mx::float32, 0.0, 1.0, mx::random::key(11));
  c.update_and_fetch(k, k * 0.5f);
  ring.update_and_fetch(k, k * 0.5f);
  for (int i = 0; i < 60; ++i) {
    auto x = mx::random::normal({2, 2, 1, 64}, mx::float32, 0.0, 1.0, mx::random::key(200 + i));
    c.update_and_fetch(x, x);
    ring.update_and_fetch(x, x);
  }
  CHECK_EQ(c.offset_in_ring(), 160);
  CHECK_EQ(c.idx(), 64); // 96 positions dropped
  CHECK(mx::array_equal(c.offset(), mx::array({160, 140})).item<bool>());
  CHECK(mx::array_equal(c.left_padding(), mx::array({-96, -76})).item<bool>());
  CHECK(!c.rotated());
  CHECK_THROWS(RuntimeError, "_offset < max_size", c.trim(1));
  // A chunk of 5 attends what the float batch's rows attend.
  auto mask = c.make_mask(5);
  auto ring_mask = ring.make_mask(5);
  auto x = mx::random::normal({2, 2, 5, 64}, mx::float32, 0.0, 1.0, mx::random::key(12));
  auto [qk, qv] = c.update_and_fetch(x, x);
  auto [fk, fv] = ring.update_and_fetch(x, x);
  auto q = mx::random::normal({2, 4, 5, 64}, mx::float32, 0.0, 1.0, mx::random::key(13));
  auto got = channel_attention(q, qk, c.residual(), qv, c.value_residual(), 0.125f, mask, {32, 8}, {64, 8});
  auto want = mx::fast::scaled_dot_product_attention(q, fk, fv, 0.125f, "", std::get<mx::array>(ring_mask));
  CHECK(mx::allclose(got, want, 0.0, 0.05).item<bool>());
  // A row taken out is a sliding window of its own, all its tokens seen.
  auto row = c.extract(1);
  CHECK(row.scheme() == QuantScheme::rotated_channel);
  CHECK_EQ(row.offset(), 145);
  CHECK_EQ(row.keep(), 0);
}

TEST(rotated_channel_batch_merges_on_one_grid_and_extracts_rows_whole) {
  // Lengths 70 and 38: paddings 0 and 32, whole groups of 32 positions, so
  // each row keeps its own cache's groups.
  std::vector<QuantizedKVCache> singles;
  for (int n : {70, 38}) {
    QuantizedKVCache c({32, 4}, {32, 4}, QuantScheme::rotated_channel, 0);
    c.update_and_fetch(mx::random::normal({1, 2, n, 64}, mx::float32, 0.0, 1.0, mx::random::key(n)),
                       mx::random::normal({1, 2, n, 64}, mx::float32, 0.0, 1.0, mx::random::key(n + 1)));
    singles.push_back(c);
  }
  auto b = QuantizedBatchKVCache::merge({&singles[0], &singles[1]});
  CHECK(b.scheme() == QuantScheme::rotated_channel);
  CHECK_EQ(b.idx(), 70);
  auto [qk, qv] = b.keys_and_values();
  CHECK(std::get<1>(qk).shape() == mx::Shape({2, 2, 64, 2}));  // (B, H, D, 64 positions / 32)
  CHECK(b.residual()->shape() == mx::Shape({2, 2, 6, 64}));
  auto row = b.extract(1);
  CHECK_EQ(row.offset(), 38);
  auto [rk, rv] = row.keys_and_values();
  auto [sk, sv] = singles[1].keys_and_values();
  CHECK(mx::array_equal(std::get<0>(rk), std::get<0>(sk)).item<bool>());
  CHECK(mx::array_equal(std::get<1>(rv), std::get<1>(sv)).item<bool>());
  CHECK(mx::array_equal(*row.residual(), *singles[1].residual()).item<bool>());
  // A mix of schemes is refused; a bad update changes nothing.
  QuantizedKVCache affine(32, 4);
  CHECK_THROWS(ValueError, "one scheme", QuantizedBatchKVCache::merge({&singles[0], &affine}));
  CHECK_THROWS(ValueError, "batch of 2", b.update_and_fetch(mx::zeros({1, 2, 1, 64}), mx::zeros({1, 2, 1, 64})));
  CHECK_EQ(b.idx(), 70);
  // meta_state names the scheme and window; the specs are the cache's own,
  // as for affine batches.
  QuantizedBatchKVCache back(std::vector<int>{}, 32, 4);
  back.restore(b.state(), b.meta_state());
  CHECK(back.scheme() == QuantScheme::rotated_channel);
  CHECK(mx::array_equal(*back.residual(), *b.residual()).item<bool>());
}

TEST(to_quantized_keeps_offset) {
  KVCache c;
  c.update_and_fetch(mx::zeros({1, 2, 5, 64}), mx::zeros({1, 2, 5, 64}));
  auto q = to_quantized(c, 64, 4);
  CHECK_EQ(q.offset(), 5);
  CHECK_EQ(std::get<0>(*q.keys()).shape(3), 8); // 64 * 4 bits / 32
}

TEST(integer_keys_are_stored_but_not_quantized) {
  KVCache c;
  auto x = mx::reshape(mx::arange(5, mx::int32), {1, 1, 5, 1});
  auto [k, v] = c.update_and_fetch(x, x);
  CHECK(k.dtype() == mx::int32);
  CHECK(mx::array_equal(k, x).item<bool>());
  CHECK_THROWS(ValueError, "float16, bfloat16 or float32 to quantize but got int32",
               to_quantized(c, 64, 4));
  QuantizedKVCache q(64, 4);
  CHECK_THROWS(ValueError, "but got int32", q.update_and_fetch(mx::zeros({1, 1, 1, 64}, mx::int32), mx::zeros({1, 1, 1, 64}, mx::int32)));
  CHECK_EQ(q.offset(), 0);
  CHECK(q.empty());
}

TEST(kvcache_merge_takes_unrotated_rotating_caches) {
  KVCache a;
  a.update_and_fetch(tokens(0, 2), tokens(0, 2));
  RotatingKVCache r(4);
  r.update_and_fetch(tokens(0, 4), tokens(0, 4));
  auto b = BatchKVCache::merge({&a, &r});
  CHECK_EQ(b.idx(), 4);
  CHECK(b.keys()->shape() == mx::Shape({2, 1, 4, 2}));
  r.update_and_fetch(tokens(4, 1), tokens(4, 1)); // rotated: slot order is not temporal
  CHECK_THROWS(ValueError, "not rotated", BatchKVCache::merge({&a, &r}));
}

TEST(chunked_cache_trims_front_to_chunk) {
  ChunkedKVCache c(4);
  c.update_and_fetch(tokens(0, 6), tokens(0, 6));
  c.maybe_trim_front();
  CHECK_EQ(c.start_position(), 2);
  auto [k, v] = c.update_and_fetch(tokens(6, 1), tokens(6, 1));
  CHECK(same(positions(k), std::vector<int>{2, 3, 4, 5, 6}));
  CHECK_EQ(c.offset(), 7);
  CHECK_EQ(c.trim(10), 5);
  CHECK_EQ(c.offset(), 2);
}

TEST(arrays_cache_slots_masks_and_merge) {
  ArraysCache c(2, mx::array({1, 0}));
  CHECK_EQ(c.batch_size(), 2);
  c.set(0, mx::ones({2, 3}));
  CHECK_THROWS(IndexError, "slot index", c.get(2));
  auto mask = std::get<mx::array>(c.make_mask(3));
  CHECK(mx::array_equal(mask, mx::array({false, true, true, true, true, true}, {2, 3})).item<bool>());
  auto one = c.extract(1);
  CHECK(one.get(0)->shape() == mx::Shape({1, 3}));
  CHECK(!one.get(1).has_value());
  ArraysCache empty(2);
  auto merged = ArraysCache::merge({&one, &empty});
  CHECK(merged.get(0)->shape() == mx::Shape({2, 3}));
}

TEST(batch_cache_left_padding_mask_and_filter) {
  BatchKVCache c({2, 0});
  auto x = mx::zeros({2, 1, 3, 2});
  c.update_and_fetch(x, x);
  CHECK_EQ(c.idx(), 3);
  auto mask = std::get<mx::array>(c.make_mask(1));
  CHECK(mask.shape() == mx::Shape({2, 1, 1, 4}));
  // Row 0 hides its two pad slots.
  auto row0 = mx::slice(mask, {0, 0, 0, 0}, {1, 1, 1, 4});
  CHECK(mx::array_equal(mx::reshape(row0, {4}), mx::array({false, false, true, true})).item<bool>());
  c.filter({0});
  // The shared padding is dropped: row 0 now starts at its first token.
  CHECK_EQ(c.idx(), 1);
  CHECK_THROWS(IndexError, "batch indices", c.filter({3}));
  auto single = c.extract(0);
  CHECK_EQ(single.offset(), 1);
}

TEST(batch_rotating_decodes_past_the_window) {
  BatchRotatingKVCache c(3, {1, 0});
  auto x = mx::zeros({2, 1, 2, 2});
  c.update_and_fetch(x, x);
  for (int i = 0; i < 4; ++i) {
    c.update_and_fetch(mx::zeros({2, 1, 1, 2}), mx::zeros({2, 1, 1, 2}));
  }
  CHECK(c.rotated());
  CHECK_EQ(c.size(), 3);
  CHECK(!c.is_trimmable());
  CHECK_THROWS(RuntimeError, "nothing rotated out yet", c.trim(1));
  auto single = c.extract(1);
  CHECK_EQ(single.offset(), 6);
}

#include <mlx/memory.h>

#include "kvcore/quantized_rotating.h"

TEST(quantized_rotating_failed_update_moves_no_part) {
  // The weights' part takes a float16 update; the scales' must not: the
  // update is refused before any part is written.
  QuantizedRotatingKVCache c(8, 0, {32, 4}, {32, 4});
  auto x = mx::zeros({1, 2, 2, 32});
  c.update_and_fetch(x, x);
  auto y = mx::zeros({1, 2, 1, 32}, mx::float16);
  CHECK_THROWS(ValueError, "[QuantizedRotatingKVCache.update_and_fetch] expected keys of dtype float32",
               c.update_and_fetch(y, y));
  CHECK_EQ(c.offset(), 2);
  auto [k, v] = c.update_and_fetch(mx::zeros({1, 2, 1, 32}), mx::zeros({1, 2, 1, 32}));
  CHECK_EQ(std::get<0>(k).shape(2), 3);
  CHECK_EQ(std::get<1>(k).shape(2), 3);
  CHECK_EQ(std::get<2>(v).shape(2), 3);
}

TEST(batch_rotating_extend_with_itself_doubles) {
  BatchRotatingKVCache c(8, {1, 0});
  c.update_and_fetch(mx::zeros({2, 1, 3, 2}), mx::zeros({2, 1, 3, 2}));
  c.extend(c);
  CHECK_EQ(c.keys()->shape(0), 4);
  CHECK(c.offset().shape() == mx::Shape{4});
}

TEST(growth_past_the_memory_limit_is_refused_before_allocating) {
  size_t old = mx::set_memory_limit(64 << 20);
  KVCache kv(1 << 20);
  QuantizedKVCache q({64, 4}, {64, 4});
  q.set_capacity(1 << 24);
  auto x = mx::zeros({1, 2, 1, 64});
  CHECK_THROWS(ValueError, "within mlx's memory limit", kv.update_and_fetch(x, x));
  CHECK_THROWS(ValueError, "within mlx's memory limit", q.update_and_fetch(x, x));
  mx::set_memory_limit(old);
  CHECK_EQ(kv.offset(), 0);
  CHECK_EQ(q.offset(), 0);
  CHECK(!q.keys().has_value());
}
