#include "kvcore/arrays.h"

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

namespace {

void check_rows(const char* ctx, const char* what, const OptionalArray& v) {
  if (v && v->ndim() != 1) {
    throw ValueError(ctx, std::string(what) + " of rank 1 (B,) or None",
                     "shape " + shape_str(v->shape()));
  }
}

// mlx-lm's extend: concatenate rows, standing in zeros for a missing side.
OptionalArray cat_rows(const OptionalArray& a, int a_rows, const OptionalArray& b, int b_rows) {
  if (!a && !b) {
    return std::nullopt;
  }
  const mx::array& like = b ? *b : *a;
  auto zeros = [&](int rows) {
    mx::Shape shape = like.shape();
    shape[0] = rows;
    return mx::zeros(shape, like.dtype());
  };
  if (a && b) {
    mx::Shape sa = a->shape(), sb = b->shape();
    if (a->ndim() != b->ndim() || !std::equal(sa.begin() + 1, sa.end(), sb.begin() + 1)) {
      throw ValueError("ArraysCache.extend", "rows of shape " + shape_str(sa) + " past axis 0",
                       shape_str(sb));
    }
  }
  return mx::concatenate({a ? *a : zeros(a_rows), b ? *b : zeros(b_rows)}, 0);
}

void check_batched_slots(const char* ctx, const std::vector<OptionalArray>& slots) {
  for (const auto& c : slots) {
    if (c && c->ndim() == 0) {
      throw ValueError(ctx, "slots with a batch axis", "a scalar slot");
    }
  }
}

mx::array rows(const mx::array& x, int start, int stop) {
  mx::Shape lo(x.ndim(), 0), hi = x.shape();
  lo[0] = start;
  hi[0] = stop;
  return mx::slice(x, lo, hi);
}

} // namespace

ArraysCache::ArraysCache(int size, OptionalArray left_padding)
    // Slots are per-layer states (a handful); the cap keeps a forged size
    // from allocating without bound.
    : cache_(check_size("ArraysCache", "size", size, 0, 1 << 16), std::nullopt) {
  check_rows("ArraysCache", "left_padding", left_padding);
  left_padding_ = std::move(left_padding);
}

int ArraysCache::index(const char* ctx, int idx) const {
  int n = slots();
  if (idx < -n || idx >= n) {
    throw IndexError(ctx, "a slot index in [" + std::to_string(-n) + ", " + std::to_string(n) + ")",
                     std::to_string(idx));
  }
  return idx < 0 ? idx + n : idx;
}

const OptionalArray& ArraysCache::get(int idx) const {
  return cache_[index("ArraysCache.__getitem__", idx)];
}

void ArraysCache::set(int idx, OptionalArray value) {
  cache_[index("ArraysCache.__setitem__", idx)] = std::move(value);
}

void ArraysCache::set_cache(std::vector<OptionalArray> cache) {
  cache_ = std::move(cache);
}

void ArraysCache::set_left_padding(OptionalArray v) {
  check_rows("ArraysCache.left_padding", "left_padding", v);
  left_padding_ = std::move(v);
}

void ArraysCache::set_lengths(OptionalArray v) {
  check_rows("ArraysCache.lengths", "lengths", v);
  lengths_ = std::move(v);
}

int ArraysCache::batch_size() const {
  for (const auto& c : cache_) {
    if (c) {
      return c->ndim() ? c->shape(0) : 1;
    }
  }
  if (left_padding_) {
    return static_cast<int>(left_padding_->size());
  }
  if (lengths_) {
    return static_cast<int>(lengths_->size());
  }
  return 1;
}

void ArraysCache::filter(const mx::array& indices) {
  constexpr const char* ctx = "ArraysCache.filter";
  if (indices.ndim() != 1 || !mx::issubdtype(indices.dtype(), mx::integer)) {
    throw ValueError(ctx, "integer batch indices of rank 1",
                     dtype_str(indices.dtype()) + " " + shape_str(indices.shape()));
  }
  check_batched_slots(ctx, cache_);
  // mx::take does not check its indices: read them (a few ints) and check
  // them against every array they will index.
  auto idx = mx::astype(indices, mx::int32);
  idx.eval();
  const int32_t* first = idx.data<int32_t>();
  auto check_rows_of = [&](const mx::array& a) {
    for (size_t i = 0; i < idx.size(); ++i) {
      if (first[i] < 0 || first[i] >= a.shape(0)) {
        throw IndexError(ctx, "batch indices in [0, " + std::to_string(a.shape(0)) + ")",
                         std::to_string(first[i]));
      }
    }
  };
  for (const auto& c : cache_) {
    if (c) check_rows_of(*c);
  }
  if (left_padding_) check_rows_of(*left_padding_);
  if (lengths_) check_rows_of(*lengths_);
  std::vector<OptionalArray> next;
  for (const auto& c : cache_) {
    next.push_back(c ? OptionalArray(mx::take(*c, idx, 0)) : std::nullopt);
  }
  OptionalArray lp = left_padding_ ? OptionalArray(mx::take(*left_padding_, idx, 0)) : std::nullopt;
  OptionalArray len = lengths_ ? OptionalArray(mx::take(*lengths_, idx, 0)) : std::nullopt;
  cache_ = std::move(next);
  left_padding_ = std::move(lp);
  lengths_ = std::move(len);
}

void ArraysCache::extend(const ArraysCache& other) {
  if (other.slots() != slots()) {
    throw ValueError("ArraysCache.extend", std::to_string(slots()) + " slots",
                     std::to_string(other.slots()) + " slots");
  }
  check_batched_slots("ArraysCache.extend", cache_);
  check_batched_slots("ArraysCache.extend", other.cache_);
  const int a = batch_size(), b = other.batch_size();
  std::vector<OptionalArray> next;
  for (int i = 0; i < slots(); ++i) {
    next.push_back(cat_rows(cache_[i], a, other.cache_[i], b));
  }
  auto lp = cat_rows(left_padding_, a, other.left_padding_, b);
  auto len = cat_rows(lengths_, a, other.lengths_, b);
  cache_ = std::move(next);
  left_padding_ = std::move(lp);
  lengths_ = std::move(len);
}

ArraysCache ArraysCache::extract(int idx) const {
  check_batched_slots("ArraysCache.extract", cache_);
  int B = batch_size();
  if (idx < 0 || idx >= B) {
    throw IndexError("ArraysCache.extract", "a row in [0, " + std::to_string(B) + ")",
                     std::to_string(idx));
  }
  ArraysCache out(slots());
  for (int i = 0; i < slots(); ++i) {
    if (cache_[i]) {
      out.cache_[i] = rows(*cache_[i], idx, idx + 1);
    }
  }
  return out;
}

void ArraysCache::prepare(OptionalArray lengths) {
  set_lengths(std::move(lengths));
}

void ArraysCache::finalize() {
  lengths_.reset();
  left_padding_.reset();
}

void ArraysCache::advance(int N) {
  auto down = [N](const mx::array& v) {
    return mx::subtract(v, scalar_like(N, v.dtype(), "ArraysCache.advance"));
  };
  OptionalArray len = lengths_ ? OptionalArray(down(*lengths_)) : std::nullopt;
  OptionalArray lp = left_padding_ ? OptionalArray(down(*left_padding_)) : std::nullopt;
  lengths_ = std::move(len);
  left_padding_ = std::move(lp);
}

Mask ArraysCache::make_mask(int N, bool, std::optional<int>) const {
  check_size("ArraysCache.make_mask", "N", N);
  auto pos = mx::arange(N);
  OptionalArray mask;
  if (left_padding_) {
    mask = mx::greater_equal(pos, mx::expand_dims(*left_padding_, 1));
  }
  if (lengths_) {
    auto in_length = mx::less(pos, mx::expand_dims(*lengths_, 1));
    mask = mask ? mx::logical_and(*mask, in_length) : in_length;
  }
  if (!mask) {
    return std::monostate{};
  }
  return *mask;
}

ArraysCache ArraysCache::merge(const std::vector<const ArraysCache*>& caches) {
  constexpr const char* ctx = "ArraysCache.merge";
  check_non_null_list(ctx, caches);
  const int n = caches[0]->slots(), B = static_cast<int>(caches.size());
  for (const auto* c : caches) {
    if (c->slots() != n) {
      throw ValueError(ctx, std::to_string(n) + " slots in every cache",
                       std::to_string(c->slots()));
    }
  }
  for (const auto* c : caches) {
    check_batched_slots(ctx, c->cache_);
  }
  ArraysCache out(n);
  bool all_empty = true;
  for (const auto* c : caches) {
    all_empty = all_empty && c->empty();
  }
  if (all_empty) {
    out.left_padding_ = mx::zeros({B}, mx::int32);
    return out;
  }
  for (int e = 0; e < n; ++e) {
    const mx::array* first = nullptr;
    for (const auto* c : caches) {
      if (c->cache_[e]) {
        first = &*c->cache_[e];
        break;
      }
    }
    if (!first) {
      continue;
    }
    mx::Shape shape = first->shape();
    shape[0] = B;
    auto merged = mx::zeros(shape, first->dtype());
    for (int i = 0; i < B; ++i) {
      const auto& x = caches[i]->cache_[e];
      if (!x) {
        continue;
      }
      mx::Shape want = shape;
      want[0] = 1;
      if (x->shape() != want) {
        throw ValueError(ctx, "one-row slots of shape " + shape_str(want), shape_str(x->shape()));
      }
      mx::Shape lo(shape.size(), 0), hi = shape;
      lo[0] = i;
      hi[0] = i + 1;
      merged = mx::slice_update(merged, mx::astype(*x, first->dtype()), lo, hi);
    }
    out.cache_[e] = merged;
  }
  return out;
}

std::vector<OptionalArray> ArraysCache::state() const {
  auto out = cache_;
  out.push_back(left_padding_);
  out.push_back(lengths_);
  return out;
}

void ArraysCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "ArraysCache.state";
  if (arrays.size() < 2) {
    throw ValueError(ctx, "the slots, left_padding and lengths", std::to_string(arrays.size()) + " arrays");
  }
  check_count(ctx, "scalars", meta.size(), 0);
  check_rows(ctx, "left_padding", arrays[arrays.size() - 2]);
  check_rows(ctx, "lengths", arrays.back());
  cache_.assign(arrays.begin(), arrays.end() - 2);
  left_padding_ = arrays[arrays.size() - 2];
  lengths_ = arrays.back();
}

size_t ArraysCache::nbytes() const {
  size_t n = 0;
  for (const auto& c : cache_) {
    n += nbytes_of(c);
  }
  return n;
}

} // namespace kvcore
