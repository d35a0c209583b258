#include "kvcore/cache_list.h"

#include <algorithm>

#include "kvcore/arrays.h"
#include "kvcore/batch.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/quantized_batch.h"
#include "kvcore/rotating.h"

namespace kvcore {

namespace {

[[noreturn]] void no_op(const char* ctx, const Cache& c) {
  throw NotImplementedError(ctx, std::string(c.name()) + " has no such operation");
}

} // namespace

CacheList::CacheList(std::vector<std::shared_ptr<Cache>> caches) : caches_(std::move(caches)) {
  for (size_t i = 0; i < caches_.size(); ++i) {
    if (!caches_[i]) {
      throw ValueError("CacheList", "a cache at every position", "null at " + std::to_string(i));
    }
  }
}

Cache& CacheList::operator[](size_t idx) const {
  if (idx >= caches_.size()) {
    throw IndexError("CacheList", "an index below " + std::to_string(caches_.size()),
                     std::to_string(idx));
  }
  return *caches_[idx];
}

template <class Op>
void CacheList::each(Op op) {
  // A dry run on copies (they share the arrays, so they are cheap) finds
  // any member that would fail before one has changed; the copies are gone
  // before the members themselves run, so in-place writes stay in place.
  for (size_t i = 0; i < caches_.size(); ++i) {
    op(*caches_[i]->copy(), i);
  }
  for (size_t i = 0; i < caches_.size(); ++i) {
    op(*caches_[i], i);
  }
}

bool CacheList::is_trimmable() const {
  return std::all_of(caches_.begin(), caches_.end(), [](const auto& c) { return c->is_trimmable(); });
}

int CacheList::trim(int n) {
  int last = 0;
  each([&](Cache& c, size_t) { last = c.trim(n); });
  return last; // from the real run, which comes second
}

std::vector<OptionalArray> CacheList::state() const {
  std::vector<OptionalArray> out;
  for (const auto& c : caches_) {
    auto s = c->state();
    out.insert(out.end(), s.begin(), s.end());
  }
  return out;
}

void CacheList::restore(const std::vector<OptionalArray>& arrays, const std::vector<std::string>& meta) {
  constexpr const char* ctx = "CacheList.state";
  if (!meta.empty()) {
    throw ValueError(ctx, "no scalars (each member keeps its own)", std::to_string(meta.size()) + " scalars");
  }
  size_t total = 0;
  std::vector<size_t> counts;
  for (const auto& c : caches_) {
    counts.push_back(c->state().size());
    total += counts.back();
  }
  if (arrays.size() != total) {
    throw ValueError(ctx, std::to_string(total) + " arrays", std::to_string(arrays.size()) + " arrays");
  }
  std::vector<size_t> starts;
  for (size_t i = 0, at = 0; i < counts.size(); at += counts[i], ++i) {
    starts.push_back(at);
  }
  each([&](Cache& c, size_t i) {
    std::vector<OptionalArray> mine(arrays.begin() + starts[i], arrays.begin() + starts[i] + counts[i]);
    c.restore(mine, c.meta_state());
  });
}

int CacheList::size() const {
  int n = 0;
  for (const auto& c : caches_) {
    n = std::max(n, c->size());
  }
  return n;
}

bool CacheList::empty() const {
  return caches_.empty() || caches_[0]->empty();
}

size_t CacheList::nbytes() const {
  size_t n = 0;
  for (const auto& c : caches_) {
    n += c->nbytes();
  }
  return n;
}

std::unique_ptr<Cache> CacheList::copy() const {
  std::vector<std::shared_ptr<Cache>> members;
  for (const auto& c : caches_) {
    members.push_back(c->copy());
  }
  return std::make_unique<CacheList>(std::move(members));
}

void CacheList::filter(const std::vector<int>& indices) {
  each([&](Cache& c, size_t) {
    if (auto* b = dynamic_cast<BatchCache*>(&c)) {
      b->filter(indices);
    } else if (auto* a = dynamic_cast<ArraysCache*>(&c)) {
      a->filter(mx::array(indices.data(), {static_cast<int>(indices.size())}, mx::int32));
    } else {
      no_op("CacheList.filter", c);
    }
  });
}

void CacheList::extend(const CacheList& other) {
  constexpr const char* ctx = "CacheList.extend";
  if (other.caches_.size() != caches_.size()) {
    throw ValueError(ctx, std::to_string(caches_.size()) + " caches",
                     std::to_string(other.caches_.size()) + " caches");
  }
  each([&](Cache& c, size_t i) {
    const Cache& o = *other.caches_[i];
    if (std::string(c.name()) != o.name()) {
      throw ValueError(ctx, std::string("a ") + c.name() + " at " + std::to_string(i), o.name());
    }
    // The batch caches' extend realigns its argument: give it a copy.
    auto theirs = o.copy();
    if (auto* b = dynamic_cast<BatchKVCache*>(&c)) {
      b->extend(static_cast<BatchKVCache&>(*theirs));
    } else if (auto* r = dynamic_cast<BatchRotatingKVCache*>(&c)) {
      r->extend(static_cast<BatchRotatingKVCache&>(*theirs));
    } else if (auto* a = dynamic_cast<ArraysCache*>(&c)) {
      a->extend(static_cast<const ArraysCache&>(*theirs));
    } else {
      no_op(ctx, c);
    }
  });
}

CacheList CacheList::extract(int idx) const {
  std::vector<std::shared_ptr<Cache>> out;
  for (const auto& c : caches_) {
    if (auto* b = dynamic_cast<const BatchKVCache*>(c.get())) {
      out.push_back(std::make_shared<KVCache>(b->extract(idx)));
    } else if (auto* r = dynamic_cast<const BatchRotatingKVCache*>(c.get())) {
      out.push_back(std::make_shared<RotatingKVCache>(r->extract(idx)));
    } else if (auto* a = dynamic_cast<const ArraysCache*>(c.get())) {
      out.push_back(std::make_shared<ArraysCache>(a->extract(idx)));
    } else {
      no_op("CacheList.extract", *c);
    }
  }
  return CacheList(std::move(out));
}

void CacheList::finalize() {
  each([](Cache& c, size_t) {
    if (auto* b = dynamic_cast<BatchKVCache*>(&c)) {
      b->finalize();
    } else if (auto* r = dynamic_cast<BatchRotatingKVCache*>(&c)) {
      r->finalize();
    } else if (auto* a = dynamic_cast<ArraysCache*>(&c)) {
      a->finalize();
    } else if (auto* qb = dynamic_cast<QuantizedBatchKVCache*>(&c)) {
      qb->finalize();
    } else if (auto* qr = dynamic_cast<QuantizedBatchRotatingKVCache*>(&c)) {
      qr->finalize();
    }
  });
}

CacheList CacheList::merge(const std::vector<const CacheList*>& lists) {
  constexpr const char* ctx = "CacheList.merge";
  check_non_null_list(ctx, lists);
  size_t n = lists[0]->count();
  std::vector<std::shared_ptr<Cache>> out;
  for (size_t i = 0; i < n; ++i) {
    std::vector<const Cache*> column;
    for (const auto* l : lists) {
      if (l->count() != n) {
        throw ValueError(ctx, std::to_string(n) + " caches in every list",
                         std::to_string(l->count()));
      }
      column.push_back(l->caches_[i].get());
    }
    out.push_back(merge_caches(column));
  }
  return CacheList(std::move(out));
}

namespace {

template <class T>
std::vector<const T*> all_of_class(const char* ctx, const std::vector<const Cache*>& caches) {
  std::vector<const T*> out;
  for (const Cache* c : caches) {
    auto* t = dynamic_cast<const T*>(c);
    if (t == nullptr || std::string(c->name()) != caches[0]->name()) {
      throw ValueError(ctx, std::string("caches of one class (") + caches[0]->name() + ")",
                       c ? c->name() : "null");
    }
    out.push_back(t);
  }
  return out;
}

} // namespace

std::unique_ptr<Cache> merge_caches(const std::vector<const Cache*>& caches) {
  constexpr const char* ctx = "merge_caches";
  check_non_null_list(ctx, caches);
  std::string name = caches[0]->name();
  if (name == "KVCache") {
    return std::make_unique<BatchKVCache>(BatchKVCache::merge(all_of_class<KVCache>(ctx, caches)));
  }
  if (name == "RotatingKVCache") {
    return std::make_unique<BatchRotatingKVCache>(
        BatchRotatingKVCache::merge(all_of_class<RotatingKVCache>(ctx, caches)));
  }
  if (name == "QuantizedKVCache") {
    return std::make_unique<QuantizedBatchKVCache>(
        QuantizedBatchKVCache::merge(all_of_class<QuantizedKVCache>(ctx, caches)));
  }
  if (name == "QuantizedRotatingKVCache") {
    return std::make_unique<QuantizedBatchRotatingKVCache>(
        QuantizedBatchRotatingKVCache::merge(all_of_class<QuantizedRotatingKVCache>(ctx, caches)));
  }
  if (name == "ArraysCache") {
    return std::make_unique<ArraysCache>(ArraysCache::merge(all_of_class<ArraysCache>(ctx, caches)));
  }
  if (name == "CacheList") {
    return std::make_unique<CacheList>(CacheList::merge(all_of_class<CacheList>(ctx, caches)));
  }
  throw NotImplementedError(ctx, name + " has no batch form");
}

} // namespace kvcore
