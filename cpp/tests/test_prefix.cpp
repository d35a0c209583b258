// The prompt-prefix cache from C++: PromptTrie's matching, PromptCacheLRU
// over kvcore caches (fresh copies, trimming, eviction, threads), and
// TokenBuffer.
#include <filesystem>
#include <thread>

#include <mlx/ops.h>

#include "kvcore/kvcore.h"
#include "samples.h"
#include "test.h"

namespace mx = mlx::core;
using namespace kvcore;

namespace {

PromptCache layers(int tokens, int n = 2) {
  PromptCache out;
  for (int i = 0; i < n; ++i) {
    auto c = std::make_shared<KVCache>();
    kvtest::feed(*c, {tokens}, 1, 1, 4, mx::float32, 7 + i);
    out.push_back(c);
  }
  return out;
}

int offset_of(const PromptCache& c) {
  return dynamic_cast<const KVCache&>(*c[0]).offset();
}

} // namespace

TEST(trie_exact_shorter_longer) {
  PromptTrie<std::string, int> t;
  CHECK(!t.add("m", {1, 2, 3, 4}, 1));
  CHECK(!t.add("m", {1, 2}, 2));
  CHECK(!t.add("m", {1, 2, 3, 9, 9}, 3));
  CHECK_EQ(*t.add("m", {1, 2}, 4), 2);
  auto r = t.search("m", {1, 2, 3, 4});
  CHECK(r.exact && *r.exact == Tokens({1, 2, 3, 4}));
  r = t.search("m", {1, 2, 3, 7});
  CHECK(!r.exact);
  CHECK(r.shorter && *r.shorter == Tokens({1, 2}));
  CHECK(r.longer && *r.longer == Tokens({1, 2, 3, 4})); // the shorter of the two extensions
  CHECK_EQ(r.common_prefix, 3);
  CHECK(!t.search("other", {1, 2}).exact);
  CHECK_EQ(*t.pop("m", {1, 2, 3, 4}), 1);
  CHECK(t.get("m", {1, 2, 3, 4}) == nullptr);
  CHECK_EQ(*t.get("m", {1, 2, 3, 9, 9}), 3);
  auto popped = t.pop_prefixes("m", {1, 2, 3, 9, 9});
  CHECK_EQ(popped.size(), size_t(1));
  CHECK_EQ(popped[0].first, 2);
  CHECK(t.get("m", {1, 2}) == nullptr);
}

TEST(lru_fetch_gives_fresh_trimmed_copies) {
  PromptCacheLRU lru;
  Tokens prompt{1, 2, 3, 4, 5, 6};
  lru.insert_cache("model", prompt, layers(6));
  CHECK_EQ(lru.size(), 1);
  CHECK_EQ(lru.nbytes(), PromptCacheOps::nbytes(layers(6)));
  auto [c, rest] = lru.fetch_nearest_cache("model", {1, 2, 3, 9});
  CHECK(c.has_value());
  CHECK_EQ(offset_of(*c), 3);
  CHECK(rest == Tokens({9}));
  // The copy is the caller's: changing it leaves the stored entry whole.
  (*c)[0]->trim(3);
  auto [again, rest2] = lru.fetch_nearest_cache("model", prompt);
  CHECK_EQ(offset_of(*again), 6);
  CHECK(rest2.empty());
  auto [none, all] = lru.fetch_nearest_cache("other", prompt);
  CHECK(!none.has_value());
  CHECK(all == prompt);
}

// Caches whose keys at position p are tokens[p], values -tokens[p].
PromptCache token_layers(const Tokens& tokens, int n = 2) {
  std::vector<float> v(tokens.begin(), tokens.end());
  mx::array k = mx::broadcast_to(
      mx::reshape(mx::array(v.data(), {static_cast<int>(v.size())}), {1, 1, -1, 1}),
      {1, 2, static_cast<int>(v.size()), 4});
  PromptCache out;
  for (int i = 0; i < n; ++i) {
    auto c = std::make_shared<KVCache>();
    c->update_and_fetch(k, mx::negative(k));
    out.push_back(c);
  }
  return out;
}

TEST(lru_shares_prefix_tokens) {
  PromptCacheLRU lru(8);
  Tokens a(600), b;
  for (int i = 0; i < 600; ++i) a[i] = i;
  b.assign(a.begin(), a.begin() + 590);
  for (int i = 0; i < 10; ++i) b.push_back(1000 + i);
  lru.insert_cache("m", a, token_layers(a));
  const int64_t one = lru.nbytes();
  lru.insert_cache("m", b, token_layers(b));
  CHECK(lru.nbytes() < one * 11 / 10); // b adds a 10-token tail
  auto [c, rest] = lru.fetch_nearest_cache("m", b);
  CHECK(rest.empty());
  const auto& kv = dynamic_cast<const KVCache&>(*(*c)[1]);
  CHECK_EQ(kv.offset(), 600);
  auto [keys, values] = kv.keys_and_values();
  mx::array want = mx::reshape(mx::array(std::vector<float>(b.begin(), b.end()).data(), {600}), {1, 1, 600, 1});
  CHECK(mx::array_equal(mx::slice(keys, {0, 1, 0, 3}, {1, 2, 600, 4}), want).item<bool>());
  CHECK(mx::array_equal(values, mx::negative(keys)).item<bool>());
  lru.trim_to(0, std::nullopt);
  CHECK_EQ(lru.nbytes(), 0);
}

TEST(lru_disk_tier_survives_a_restart) {
  const std::string dir = "kvcore_test_disk_tier";
  std::filesystem::remove_all(dir);
  Tokens a{1, 2, 3, 4, 5}, b{1, 2, 3, 9};
  {
    PromptCacheLRU lru(1, PromptCacheLRU::kUnlimited, true, dir);
    lru.insert_cache("m", a, token_layers(a));
    lru.insert_cache("m", b, token_layers(b));
    CHECK_EQ(lru.size(), 1);
    CHECK_EQ(lru.close(), 2);
    CHECK_EQ(lru.disk_size(), 2);
    lru.insert_cache("m", {7, 7}, token_layers({7, 7})); // closed: memory only
    CHECK_EQ(lru.close(), 2);
  }
  PromptCacheLRU lru(4, PromptCacheLRU::kUnlimited, true, dir);
  CHECK_EQ(lru.disk_size(), 2);
  auto [c, rest] = lru.fetch_nearest_cache("m", a);
  CHECK(c.has_value() && rest.empty());
  CHECK_EQ(offset_of(*c), 5);
  // Loaded, checked and evaluated on this thread: nothing lazy is kept.
  const auto& kv = dynamic_cast<const KVCache&>(*(*c)[0]);
  CHECK(kv.keys()->is_available() && kv.values()->is_available());
  auto [none, all] = lru.fetch_nearest_cache("other", a);
  CHECK(!none.has_value());
  CHECK(lru.disk_errors().empty());
  CHECK_EQ(lru.close(), 0);
  std::filesystem::remove_all(dir);
}

TEST(lru_disk_blocks_hold_quantized_layers) {
  // Both schemes as blocks of 32 tokens, one inside a CacheList; after a
  // restart the caches come back bit for bit, their blocks read from disk.
  const std::string dir = "kvcore_test_disk_quantized_blocks";
  std::filesystem::remove_all(dir);
  Tokens toks;
  for (int i = 0; i < 70; ++i) {
    toks.push_back(100 + i);
  }
  auto k = mx::random::normal({1, 2, 70, 64}, mx::float16, 0.0, 1.0, mx::random::key(3));
  auto affine = std::make_shared<QuantizedKVCache>(QuantSpec{64, 4}, QuantSpec{32, 8});
  auto channel = std::make_shared<QuantizedKVCache>(QuantSpec{32, 4}, QuantSpec{64, 2},
                                                    QuantScheme::rotated_channel, 0);
  affine->update_and_fetch(k, -k);
  channel->update_and_fetch(k, k * 2);
  PromptCache caches{affine, std::make_shared<CacheList>(std::vector<std::shared_ptr<Cache>>{channel})};
  {
    PromptCacheLRU lru(4, PromptCacheLRU::kUnlimited, true, dir, PromptCacheLRU::kUnlimited, 8, 0, 32);
    lru.insert_cache("m", toks, caches);
    lru.close();
    CHECK_EQ(lru.disk_blocks(), 2);
  }
  PromptCacheLRU lru(4, PromptCacheLRU::kUnlimited, true, dir, PromptCacheLRU::kUnlimited, 8, 0, 32);
  auto [c, rest] = lru.fetch_nearest_cache("m", toks);
  CHECK(c.has_value() && rest.empty());
  CHECK_EQ(lru.disk_blocks_read(), 2);
  CHECK(lru.disk_errors().empty());
  const auto& got_a = dynamic_cast<const QuantizedKVCache&>(*(*c)[0]);
  const auto& got_c =
      dynamic_cast<const QuantizedKVCache&>(*dynamic_cast<const CacheList&>(*(*c)[1]).caches()[0]);
  for (auto [got, want] : {std::pair{&got_a, affine.get()}, std::pair{&got_c, channel.get()}}) {
    CHECK_EQ(got->offset(), 70);
    CHECK(got->scheme() == want->scheme() && got->value_spec().bits == want->value_spec().bits);
    // Evaluated on this thread: nothing lazy is kept.
    for (const auto& a : got->state()) {
      CHECK(!a || a->is_available());
    }
    auto [gk, gv] = got->keys_and_values();
    auto [wk, wv] = want->keys_and_values();
    for (auto [x, y] : {std::pair{std::get<0>(gk), std::get<0>(wk)}, std::pair{std::get<1>(gk), std::get<1>(wk)},
                        std::pair{std::get<0>(gv), std::get<0>(wv)}, std::pair{std::get<2>(gv), std::get<2>(wv)}}) {
      CHECK(mx::array_equal(x, y).item<bool>());
    }
  }
  CHECK(mx::array_equal(*got_c.residual(), *channel->residual()).item<bool>());
  std::filesystem::remove_all(dir);
}

TEST(lru_evicts_by_count_and_bytes) {
  PromptCacheLRU lru(2);
  lru.insert_cache("m", {1}, layers(1));
  lru.insert_cache("m", {2}, layers(1));
  lru.insert_cache("m", {3}, layers(1));
  CHECK_EQ(lru.size(), 2);
  CHECK(!lru.fetch_nearest_cache("m", {1}).first.has_value());
  CHECK_THROWS(KeyError, "cache_type among assistant, user, system",
               lru.insert_cache("m", {4}, layers(1), "tool"));
  CHECK_EQ(lru.size(), 2);
  lru.trim_to(std::nullopt, 0);
  CHECK_EQ(lru.size(), 0);
  CHECK_EQ(lru.nbytes(), 0);
}

TEST(lru_concurrent_calls) {
  PromptCacheLRU lru(6);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&lru, w] {
      for (int i = 0; i < 40; ++i) {
        Tokens t{w, i % 5, i % 3};
        if (i % 2 == 0) {
          lru.insert_cache("m", t, layers(3, 1));
        } else {
          auto [c, rest] = lru.fetch_nearest_cache("m", t);
          if (c) {
            (void)offset_of(*c);
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  int64_t n = 0, bytes = 0;
  for (const auto& [type, s] : lru.stats_by_type()) {
    n += s.n_sequences;
    bytes += s.n_bytes;
  }
  CHECK_EQ(n, lru.size());
  CHECK_EQ(bytes, lru.nbytes());
  CHECK(lru.size() <= 6);
}

// One RotatingKVCache layer past its 8-token window: not trimmable.
PromptCache window_layers(int tokens) {
  auto c = std::make_shared<RotatingKVCache>(8, 0);
  kvtest::feed(*c, {tokens}, 1, 1, 4, mx::float32, 11);
  return {c};
}

int window_offset(const PromptCache& c) {
  return dynamic_cast<const RotatingKVCache&>(*c[0]).offset();
}

TEST(lru_checkpoints_serve_shorter_prompts) {
  PromptCacheLRU lru(4, PromptCacheLRU::kUnlimited, true, "", PromptCacheLRU::kUnlimited,
                     /*max_checkpoints=*/2);
  Tokens a;
  for (int i = 0; i < 40; ++i) a.push_back(i);
  auto prefix = [&a](int n) { return Tokens(a.begin(), a.begin() + n); };
  PromptCache live = window_layers(16);
  CHECK(lru.insert_checkpoint("m", prefix(16), live));
  kvtest::feed(dynamic_cast<RotatingKVCache&>(*live[0]), {3}, 1, 1, 4, mx::float32, 12); // the caller goes on
  CHECK(lru.insert_checkpoint("m", prefix(24), window_layers(24)));
  lru.insert_cache("m", a, window_layers(40));
  CHECK_EQ(lru.size(), 1);
  CHECK_EQ(lru.checkpoint_count(), 2);
  Tokens b = prefix(30);
  b.push_back(99);
  auto [c, rest] = lru.fetch_nearest_cache("m", b);
  CHECK(c.has_value());
  CHECK_EQ(window_offset(*c), 24);
  CHECK_EQ(rest.size(), size_t(7));
  auto [c16, rest16] = lru.fetch_nearest_cache("m", prefix(20));
  CHECK_EQ(window_offset(*c16), 16); // still 16: a copy was kept
  // 24 was served before 16, so 24 is the oldest; a third checkpoint evicts it.
  CHECK(lru.insert_checkpoint("m", prefix(32), window_layers(32)));
  auto [c2, rest2] = lru.fetch_nearest_cache("m", b);
  CHECK_EQ(window_offset(*c2), 16);
  CHECK(!lru.insert_checkpoint("m", a, window_layers(40))); // an entry holds a
  int64_t bytes = 0;
  for (const auto& [type, s] : lru.stats_by_type()) bytes += s.n_bytes;
  CHECK_EQ(bytes, lru.nbytes());
  lru.trim_to(std::nullopt, 0);
  CHECK_EQ(lru.checkpoint_count(), 0);
  CHECK_EQ(lru.nbytes(), 0);
}

TEST(lru_checkpoints_concurrent_with_fetches) {
  PromptCacheLRU lru(4, PromptCacheLRU::kUnlimited, true, "", PromptCacheLRU::kUnlimited, 5);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&lru, w] {
      for (int i = 0; i < 30; ++i) {
        Tokens t{w % 2, 1, 2, 3, i % 7};
        if (i % 3 == 0) {
          lru.insert_checkpoint("m", t, window_layers(5));
        } else if (i % 3 == 1) {
          lru.insert_cache("m", t, window_layers(5));
        } else {
          t.push_back(9);
          auto [c, rest] = lru.fetch_nearest_cache("m", t);
          if (c) { // an entry or checkpoint, or a longer trimmable one trimmed
            const int o = window_offset(*c);
            CHECK(o == 4 || o == 5);
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(lru.size() <= 4);
  CHECK(lru.checkpoint_count() <= 5);
  int64_t bytes = 0;
  for (const auto& [type, s] : lru.stats_by_type()) bytes += s.n_bytes;
  CHECK_EQ(bytes, lru.nbytes());
}

TEST(lru_shares_kv_layers_beside_other_caches) {
  // [RotatingKVCache, KVCache] layers (a sliding-window layer beside a
  // global one): the KVCache's keys and values are stored once.
  auto mixed = [](const Tokens& t) {
    PromptCache c = window_layers(static_cast<int>(t.size()));
    c.push_back(token_layers(t, 1)[0]);
    return c;
  };
  Tokens a(600), b;
  for (int i = 0; i < 600; ++i) a[i] = i;
  b.assign(a.begin(), a.begin() + 590);
  for (int i = 0; i < 10; ++i) b.push_back(1000 + i);
  PromptCacheLRU lru(8);
  lru.insert_cache("m", a, mixed(a));
  const int64_t one = lru.nbytes();
  CHECK_EQ(one, PromptCacheOps::nbytes(mixed(a)));
  lru.insert_cache("m", b, mixed(b));
  CHECK(lru.nbytes() < one * 13 / 10);
  auto [c, rest] = lru.fetch_nearest_cache("m", b);
  CHECK(c.has_value() && rest.empty());
  CHECK_EQ(window_offset(*c), 600);
  const auto& kv = dynamic_cast<const KVCache&>(*(*c)[1]);
  CHECK_EQ(kv.offset(), 600);
  auto [keys, values] = kv.keys_and_values();
  auto [want_k, want_v] = dynamic_cast<const KVCache&>(*mixed(b)[1]).keys_and_values();
  CHECK(mx::array_equal(keys, want_k).item<bool>());
  CHECK(mx::array_equal(values, want_v).item<bool>());
  lru.trim_to(0, std::nullopt);
  CHECK_EQ(lru.nbytes(), 0);
}

TEST(token_buffer_grows_by_step) {
  TokenBuffer b({5, 6});
  auto t = b.update_and_fetch({7, 8, 9});
  CHECK_EQ(t.size(), size_t(5));
  CHECK_EQ(b.state().size(), size_t(256));
  CHECK_EQ(b.tokens().size(), size_t(5));
  auto x = mx::astype(t, mx::int32);
  x.eval();
  CHECK_EQ(x.data<int32_t>()[4], 9);
}
