// CacheList: the caches of one hybrid layer (an attention cache beside a
// state-space cache, say), handled as one.
#pragma once

#include <memory>
#include <vector>

#include "kvcore/cache.h"

namespace kvcore {

/// A list of caches of any kind. Every operation that changes the members
/// changes them in place and is all or nothing: it runs first on copies of
/// the members (copies share the arrays, so they are cheap) and on the
/// members only once every copy has succeeded, so a failure leaves the list
/// and every member as they were.
class CacheList : public Cache {
 public:
  CacheList() = default;
  /// Throws ValueError for a null member.
  explicit CacheList(std::vector<std::shared_ptr<Cache>> caches);

  const char* name() const override {
    return "CacheList";
  }

  const std::vector<std::shared_ptr<Cache>>& caches() const {
    return caches_;
  }
  size_t count() const {
    return caches_.size();
  }
  /// Member idx; throws IndexError when out of range.
  Cache& operator[](size_t idx) const;

  /// True when every member is trimmable.
  bool is_trimmable() const override;
  /// Trims every member by n; returns what the last one trimmed (0 for an
  /// empty list), as mlx-lm.
  int trim(int n) override;

  /// The members' arrays, one after another.
  std::vector<OptionalArray> state() const override;
  /// Gives each member its share of `arrays` (as many as its own state
  /// has) with its current scalars; `meta` must be empty.
  void restore(
      const std::vector<OptionalArray>& arrays,
      const std::vector<std::string>& meta) override;

  /// The largest member's size (0 for an empty list).
  int size() const override;
  /// The first member's emptiness (true for an empty list).
  bool empty() const override;
  size_t nbytes() const override;
  /// Copies every member, so the copy's members are independent.
  std::unique_ptr<Cache> copy() const override;

  // Batch operations, for lists of batch caches and ArraysCaches. A member
  // without the operation raises NotImplementedError (nothing changes).

  /// Keep the rows `indices` of every member.
  void filter(const std::vector<int>& indices);
  /// Append other's rows member by member; members must pair up by class.
  void extend(const CacheList& other);
  /// Row idx of every member, as a list of single-sequence caches.
  CacheList extract(int idx) const;
  /// finalize() on every batch member.
  void finalize();
  /// One batch list from single-sequence lists of the same layout.
  static CacheList merge(const std::vector<const CacheList*>& lists);

 private:
  /// Runs op on a copy of each member, then on each member.
  template <class Op>
  void each(Op op);

  std::vector<std::shared_ptr<Cache>> caches_;
};

/// Merge single-sequence caches of one class into its batch form:
/// KVCache -> BatchKVCache, RotatingKVCache -> BatchRotatingKVCache,
/// QuantizedKVCache -> QuantizedBatchKVCache, QuantizedRotatingKVCache ->
/// QuantizedBatchRotatingKVCache, ArraysCache -> ArraysCache, CacheList ->
/// CacheList. Throws
/// NotImplementedError for other classes and ValueError for mixed ones.
std::unique_ptr<Cache> merge_caches(const std::vector<const Cache*>& caches);

} // namespace kvcore
