// CacheList: the members of a hybrid layer handled as one, every change all
// or nothing; merge_caches; the state tree of a list.
#include <mlx/ops.h>

#include "kvcore/kvcore.h"
#include "samples.h"
#include "support.h"
#include "test.h"

namespace mx = mlx::core;
using namespace kvcore;
using kvtest::same_state;

namespace {

using Members = std::vector<std::shared_ptr<Cache>>;

std::shared_ptr<KVCache> kv(int tokens, uint64_t seed) {
  auto c = std::make_shared<KVCache>();
  if (tokens > 0) kvtest::feed(*c, {tokens}, 1, 1, 4, mx::float32, seed);
  return c;
}

std::shared_ptr<RotatingKVCache> wrapped_ring(uint64_t seed) {
  auto c = std::make_shared<RotatingKVCache>(4);
  kvtest::feed(*c, {1, 1, 1, 1, 1, 1}, 1, 1, 4, mx::float32, seed);
  return c;
}

// An ArraysCache of B rows: a conv slot and an unset one.
std::shared_ptr<ArraysCache> ssm(int B, uint64_t seed) {
  auto c = std::make_shared<ArraysCache>(2);
  c->set(0, kvtest::randn({B, 3, 4}, mx::float32, seed));
  return c;
}

std::shared_ptr<BatchKVCache> batch(const std::vector<int>& padding, int S, uint64_t seed) {
  auto c = std::make_shared<BatchKVCache>(padding);
  kvtest::feed(*c, {S}, static_cast<int>(padding.size()), 1, 4, mx::float32, seed);
  return c;
}

bool same(const Cache& a, const Cache& b) {
  std::string why;
  bool ok = std::string(a.name()) == b.name() && same_state(cache_state(a), cache_state(b), &why);
  if (!ok) std::cerr << "  states differ: " << a.name() << " vs " << b.name() << " " << why << "\n";
  return ok;
}

bool unchanged(const StateValue& before, const Cache& c) {
  std::string why;
  bool ok = same_state(before, cache_state(c), &why);
  if (!ok) std::cerr << "  changed: " << why << "\n";
  return ok;
}

} // namespace

TEST(cache_list_refuses_null_members) {
  CHECK_THROWS(ValueError, "null at 1", CacheList(Members{kv(2, 1), nullptr}));
}

TEST(cache_list_index_out_of_range) {
  CacheList l(Members{kv(2, 1)});
  CHECK_EQ(l.count(), size_t(1));
  CHECK_EQ(l[0].size(), 2);
  CHECK_THROWS(IndexError, "an index below 1", l[1]);
}

TEST(cache_list_size_empty_and_nbytes_follow_the_members) {
  auto a = kv(5, 1);
  auto r = wrapped_ring(2);
  auto s = ssm(1, 3);
  CacheList l(Members{a, r, s});
  CHECK_EQ(l.size(), 5);
  CHECK(!l.empty());
  CHECK_EQ(l.nbytes(), a->nbytes() + r->nbytes() + s->nbytes());
  CacheList first_empty(Members{kv(0, 0), kv(3, 4)});
  CHECK_EQ(first_empty.size(), 3);
  CHECK(first_empty.empty()); // the first member's, as mlx-lm
  CacheList none;
  CHECK_EQ(none.size(), 0);
  CHECK(none.empty());
  CHECK_EQ(none.nbytes(), size_t(0));
  CHECK(std::string(none.name()) == "CacheList");
}

TEST(cache_list_trim_trims_every_member_and_returns_the_last) {
  CacheList l(Members{kv(5, 1), kv(3, 2)});
  CHECK(l.is_trimmable());
  CHECK_EQ(l.trim(4), 3);
  CHECK_EQ(l[0].size(), 1);
  CHECK_EQ(l[1].size(), 0);
  CacheList none;
  CHECK(none.is_trimmable());
  CHECK_EQ(none.trim(2), 0);
}

TEST(cache_list_trim_is_all_or_nothing) {
  CacheList l(Members{kv(5, 1), wrapped_ring(2), kv(4, 3)});
  CHECK(!l.is_trimmable());
  auto before = cache_state(l);
  CHECK_THROWS(RuntimeError, "nothing rotated out yet", l.trim(1));
  CHECK(unchanged(before, l));
  CHECK_EQ(l[0].size(), 5);
  CHECK_THROWS(ValueError, "n in [0", l.trim(-1));
  CHECK(unchanged(before, l));
}

TEST(cache_list_state_is_each_members_state_and_class_name) {
  auto a = kv(3, 1);
  auto s = ssm(1, 2);
  CacheList l(Members{a, s});
  StateValue want = StateValue::List{
      StateValue::List{cache_state(*a), "KVCache"},
      StateValue::List{cache_state(*s), "ArraysCache"}};
  std::string why;
  CHECK(same_state(want, cache_state(l), &why));
  auto back = cache_from_state("CacheList", cache_state(l));
  CHECK(same(l, *back));
  auto* list = dynamic_cast<CacheList*>(back.get());
  CHECK(list && list->count() == 2 && dynamic_cast<ArraysCache*>(&(*list)[1]) != nullptr);
}

TEST(cache_list_state_arrays_restore_member_by_member) {
  auto a = kv(3, 1);
  auto s = ssm(1, 2);
  CacheList l(Members{a, s});
  auto arrays = l.state();
  auto mine = a->state();
  auto theirs = s->state();
  CHECK_EQ(arrays.size(), mine.size() + theirs.size());
  CacheList other(Members{kv(0, 0), std::make_shared<ArraysCache>(2)});
  other.restore(arrays, {});
  CHECK_EQ(other[0].size(), 0); // each member keeps its own scalars
  CHECK_EQ(other.state().size(), arrays.size());
  auto k = static_cast<KVCache&>(other[0]).keys();
  CHECK(k && kvtest::bit_equal(*k, *a->keys()));
  auto before = cache_state(l);
  auto fewer = arrays;
  fewer.pop_back();
  CHECK_THROWS(ValueError, "arrays", l.restore(fewer, {}));
  CHECK(unchanged(before, l));
  CHECK_THROWS(ValueError, "no scalars", l.restore(arrays, {"3"}));
  CHECK(unchanged(before, l));
  // The second member's own check fails after the first took its share.
  CacheList two(Members{kv(3, 5), kv(2, 6)});
  auto before_two = cache_state(two);
  auto parts = two.state();
  parts[0] = kvtest::randn({1, 1, 256, 4}, mx::float32, 7);
  parts[1] = kvtest::randn({1, 1, 256, 4}, mx::float32, 8);
  parts[2] = mx::zeros({1, 1, 2}); // keys of rank 3
  CHECK_THROWS(ValueError, "rank 4", two.restore(parts, {}));
  CHECK(unchanged(before_two, two));
}

TEST(cache_list_copy_is_independent) {
  CacheList l(Members{kv(3, 1), ssm(1, 2)});
  auto before = cache_state(l);
  auto c = l.copy();
  auto& copy = static_cast<CacheList&>(*c);
  kvtest::next_update(copy[0], 2, 10);
  static_cast<ArraysCache&>(copy[1]).set(1, mx::ones({1, 2}));
  CHECK(unchanged(before, l));
  CHECK_EQ(copy[0].size(), 5);
  CHECK(&copy[0] != &l[0]);
}

TEST(cache_list_filter_keeps_the_rows_of_every_member) {
  auto b = batch({1, 0, 2}, 4, 1);
  auto s = ssm(3, 2);
  CacheList l(Members{b, s});
  auto want_b = b->copy();
  static_cast<BatchKVCache&>(*want_b).filter({0, 2});
  auto want_s = s->copy();
  static_cast<ArraysCache&>(*want_s).filter(mx::array({0, 2}));
  l.filter({0, 2});
  CHECK(same(l[0], *want_b));
  CHECK(same(l[1], *want_s));
}

TEST(cache_list_filter_failure_leaves_every_member_as_it_was) {
  CacheList l(Members{batch({1, 0}, 3, 1), kv(3, 2)});
  auto before = cache_state(l);
  CHECK_THROWS(NotImplementedError, "KVCache", l.filter({0}));
  CHECK(unchanged(before, l));
  CacheList m(Members{ssm(2, 3), batch({1, 0}, 3, 4)});
  auto before_m = cache_state(m);
  try {
    m.filter({5});
    CHECK(false);
  } catch (const CacheError&) {
  }
  CHECK(unchanged(before_m, m));
}

TEST(cache_list_extend_appends_the_rows_of_every_member) {
  auto b1 = batch({1, 0}, 3, 1);
  auto s1 = ssm(2, 2);
  auto b2 = batch({0}, 2, 3);
  auto s2 = ssm(1, 4);
  CacheList a(Members{b1, s1});
  CacheList b(Members{b2, s2});
  auto other_before = cache_state(b);
  auto want_b = b1->copy();
  auto arg_b = b2->copy();
  static_cast<BatchKVCache&>(*want_b).extend(static_cast<BatchKVCache&>(*arg_b));
  auto want_s = s1->copy();
  static_cast<ArraysCache&>(*want_s).extend(*s2);
  a.extend(b);
  CHECK(same(a[0], *want_b));
  CHECK(same(a[1], *want_s));
  CHECK(unchanged(other_before, b));
  CHECK_EQ(static_cast<ArraysCache&>(a[1]).batch_size(), 3);
}

TEST(cache_list_extend_failures_change_nothing) {
  CacheList a(Members{batch({1, 0}, 3, 1), ssm(2, 2)});
  auto before = cache_state(a);
  CacheList shorter(Members{batch({0}, 2, 3)});
  CHECK_THROWS(ValueError, "2 caches", a.extend(shorter));
  CacheList swapped(Members{ssm(1, 4), batch({0}, 2, 5)});
  CHECK_THROWS(ValueError, "BatchKVCache", a.extend(swapped));
  CHECK(unchanged(before, a));
  // The second member fails after the first extended its copy.
  CacheList wide(Members{batch({0}, 2, 6), std::make_shared<ArraysCache>(2)});
  static_cast<ArraysCache&>(wide[1]).set(0, kvtest::randn({1, 5, 4}, mx::float32, 7));
  try {
    a.extend(wide);
    CHECK(false);
  } catch (const CacheError&) {
  } catch (const std::exception& e) {
    kvtest::fail(__FILE__, __LINE__, std::string("not a kvcore error: ") + e.what());
  }
  CHECK(unchanged(before, a));
  CacheList plain(Members{kv(3, 8)});
  auto plain_before = cache_state(plain);
  CHECK_THROWS(NotImplementedError, "KVCache", plain.extend(CacheList(Members{kv(2, 9)})));
  CHECK(unchanged(plain_before, plain));
}

TEST(cache_list_extract_gives_single_sequence_members) {
  auto b = batch({2, 0}, 4, 1);
  auto s = ssm(2, 2);
  CacheList l(Members{b, s});
  auto before = cache_state(l);
  auto one = l.extract(1);
  CHECK_EQ(one.count(), size_t(2));
  KVCache want_k = b->extract(1);
  ArraysCache want_s = s->extract(1);
  CHECK(same(one[0], want_k));
  CHECK(same(one[1], want_s));
  CHECK(unchanged(before, l));
  CacheList plain(Members{kv(3, 3)});
  CHECK_THROWS(NotImplementedError, "KVCache", plain.extract(0));
  try {
    l.extract(7);
    CHECK(false);
  } catch (const CacheError&) {
  }
}

TEST(cache_list_merge_builds_the_batch_form_of_every_member) {
  auto k1 = kv(3, 1);
  auto k2 = kv(5, 2);
  auto s1 = ssm(1, 3);
  auto s2 = ssm(1, 4);
  CacheList a(Members{k1, s1});
  CacheList b(Members{k2, s2});
  auto merged = CacheList::merge({&a, &b});
  CHECK_EQ(merged.count(), size_t(2));
  auto want_k = BatchKVCache::merge({k1.get(), k2.get()});
  auto want_s = ArraysCache::merge({s1.get(), s2.get()});
  CHECK(same(merged[0], want_k));
  CHECK(same(merged[1], want_s));
  auto via = merge_caches({&a, &b});
  CHECK(same(*via, merged));
  // Row 1 of the merge holds b's tokens again.
  auto row = merged.extract(1);
  CHECK(kvtest::bit_equal(static_cast<KVCache&>(row[0]).keys_and_values().first,
                          k2->keys_and_values().first));
}

TEST(cache_list_merge_refuses_mismatched_lists) {
  CacheList a(Members{kv(3, 1), ssm(1, 2)});
  CacheList b(Members{kv(2, 3)});
  CHECK_THROWS(ValueError, "2 caches in every list", CacheList::merge({&a, &b}));
  CHECK_THROWS(ValueError, "at least one", CacheList::merge({}));
  CacheList c(Members{ssm(1, 4), kv(2, 5)});
  CHECK_THROWS(ValueError, "caches of one class", CacheList::merge({&a, &c}));
}

TEST(cache_list_merge_refuses_a_null_list) {
  CacheList a(Members{kv(3, 1)});
  CHECK_THROWS(ValueError, "null", CacheList::merge({&a, nullptr}));
  CHECK_THROWS(ValueError, "null", CacheList::merge({nullptr, &a}));
}

TEST(merge_caches_picks_the_batch_class) {
  auto k1 = kv(3, 1);
  auto k2 = kv(1, 2);
  auto m = merge_caches({k1.get(), k2.get()});
  CHECK(dynamic_cast<BatchKVCache*>(m.get()) != nullptr);
  CHECK(same(*m, BatchKVCache::merge({k1.get(), k2.get()})));
  auto r1 = wrapped_ring(3);
  auto r2 = std::make_shared<RotatingKVCache>(4);
  kvtest::feed(*r2, {2}, 1, 1, 4, mx::float32, 4);
  auto mr = merge_caches({r1.get(), r2.get()});
  CHECK(dynamic_cast<BatchRotatingKVCache*>(mr.get()) != nullptr);
  CHECK(same(*mr, BatchRotatingKVCache::merge({r1.get(), r2.get()})));
  auto s = ssm(1, 5);
  CHECK(dynamic_cast<ArraysCache*>(merge_caches({s.get(), s.get()}).get()) != nullptr);
  CHECK_THROWS(ValueError, "caches of one class", merge_caches({k1.get(), r1.get()}));
  CHECK_THROWS(ValueError, "a cache in every entry but got null", merge_caches({k1.get(), nullptr}));
  QuantizedKVCache q(32, 4);
  CHECK(dynamic_cast<QuantizedBatchKVCache*>(merge_caches({&q, &q}).get()) != nullptr);
  ConcatenateKVCache cat;
  CHECK_THROWS(NotImplementedError, "ConcatenateKVCache", merge_caches({&cat}));
  CHECK_THROWS(ValueError, "at least one cache", merge_caches({}));
}

TEST(cache_list_finalize_runs_on_batch_members) {
  auto b = std::make_shared<BatchKVCache>(std::vector<int>{0, 0});
  b->prepare(std::nullopt, std::vector<int>{0, 2});
  kvtest::feed(*b, {4}, 2, 1, 4, mx::float32, 1);
  auto want = b->copy();
  static_cast<BatchKVCache&>(*want).finalize();
  auto s = ssm(2, 2);
  s->prepare(mx::array({4, 2}));
  CacheList l(Members{b, s});
  l.finalize();
  CHECK(same(l[0], *want));
  CHECK(!static_cast<ArraysCache&>(l[1]).lengths().has_value());
}

TEST(cache_list_from_state_checks_its_pairs) {
  auto a = kv(2, 1);
  CHECK_THROWS(ValueError, "a tuple of 2 items",
               cache_from_state("CacheList", StateValue::List{StateValue::List{cache_state(*a)}}));
  CHECK_THROWS(ValueError, "a cache class among",
               cache_from_state("CacheList", StateValue::List{StateValue::List{cache_state(*a), "Evil"}}));
  CHECK_THROWS(ValueError, "the class name",
               cache_from_state("CacheList", StateValue::List{StateValue::List{cache_state(*a), 5}}));
  CHECK_THROWS(ValueError, "state", cache_from_state("CacheList", StateValue(3)));
  CHECK_THROWS(ValueError, "a cache class among", cache_from_state("Nope", StateValue::List{}));
  // An empty list is a valid (empty) CacheList state.
  auto empty = cache_from_state("CacheList", StateValue::List{});
  CHECK(dynamic_cast<CacheList*>(empty.get()) && static_cast<CacheList&>(*empty).count() == 0);
}

TEST(cache_list_of_batch_members_round_trips_through_a_file) {
  CacheList l(Members{batch({1, 0}, 3, 1), ssm(2, 2)});
  auto path = kvtest::temp_file("list.safetensors");
  save_prompt_cache(path, {std::make_shared<CacheList>(l)});
  auto back = load_prompt_cache(path);
  CHECK(same(l, *back.caches.at(0)));
}
