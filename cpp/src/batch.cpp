#include "kvcore/batch.h"

#include <algorithm>

#include <mlx/ops.h>

#include "batch_rows.h"
#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

namespace batch_rows {

// mlx.core.array(list_of_ints): int32, or float32 when the list is empty.
mx::array int_array(const std::vector<int>& v) {
  if (v.empty()) {
    return mx::array(std::initializer_list<float>{}, mx::float32);
  }
  return mx::array(v.begin(), mx::Shape{static_cast<int>(v.size())}, mx::int32);
}

std::vector<int> negated(const std::vector<int>& v) {
  std::vector<int> out;
  for (int x : v) out.push_back(-x);
  return out;
}

// `x + n` / `x - n` with a Python int: the array keeps its dtype (and, as
// in mlx, an int that does not fit it is an error, not a wrap-around).
mx::array plus(const mx::array& x, int n) {
  return mx::add(x, scalar_like(n, x.dtype(), "an offset or padding change"));
}
mx::array minus(const mx::array& x, int n) {
  return mx::subtract(x, scalar_like(n, x.dtype(), "an offset or padding change"));
}

std::vector<int> to_ints(const mx::array& a) {
  auto x = mx::astype(a, mx::int32);
  x.eval();
  return std::vector<int>(x.data<int32_t>(), x.data<int32_t>() + x.size());
}

mx::array row_slice(const mx::array& x, int start, int stop) {
  mx::Shape lo(x.ndim(), 0), hi = x.shape();
  lo[0] = start;
  hi[0] = stop;
  return mx::slice(x, lo, hi);
}

// Keys or values made to depend on the padding and offset arrays, so those
// are evaluated with them (as mlx-lm's mx.depends).
mx::array depends_on(const mx::array& x, const mx::array& a, const mx::array& b) {
  return mx::depends({x}, {a, b})[0];
}

// A per-row array waiting for finalize() (right padding, lengths) follows
// the rows through filter and extend, so finalize() meets the batch it
// was prepared for.
OptionalArray take_rows(const OptionalArray& pending, const std::vector<int>& indices) {
  if (!pending) {
    return std::nullopt;
  }
  return mx::take(*pending, mx::astype(int_array(indices), mx::int32), 0);
}

// This batch's pending rows, then the other's; `fill_*` stands in for a
// side with nothing pending (a value that makes finalize() a no-op there).
OptionalArray concat_rows(
    const OptionalArray& mine,
    const mx::array& fill_mine,
    const OptionalArray& theirs,
    const mx::array& fill_theirs) {
  if (!mine && !theirs) {
    return std::nullopt;
  }
  return mx::concatenate({mine ? *mine : fill_mine, theirs ? *theirs : fill_theirs}, 0);
}

void check_rows(const char* ctx, const char* what, const mx::array& v) {
  if (v.ndim() != 1) {
    throw ValueError(ctx, std::string(what) + " of rank 1 (B,)", "shape " + shape_str(v.shape()));
  }
  if (!mx::issubdtype(v.dtype(), mx::integer)) {
    throw ValueError(ctx, std::string(what) + " of an integer dtype", dtype_str(v.dtype()));
  }
}

std::vector<int> check_indices(const char* ctx, const std::vector<int>& idx, int B) {
  for (int i : idx) {
    if (i < 0 || i >= B) {
      throw IndexError(ctx, "batch indices in [0, " + std::to_string(B) + ")", std::to_string(i));
    }
  }
  return idx;
}

Stacked stack_rows(
    const char* ctx,
    const std::vector<std::pair<OptionalArray, OptionalArray>>& kv,
    const std::vector<int>& padding,
    const std::vector<int>& lengths,
    int max_length) {
  int H = 0, Dk = 0, Dv = 0;
  std::optional<mx::Dtype> dt;
  for (const auto& [k, v] : kv) {
    if (!k || !v) continue;
    if (k->ndim() != 4 || v->ndim() != 4 || k->shape(0) != 1 || v->shape(0) != 1) {
      throw ValueError(ctx, "single-sequence caches with (1, H, S, D) arrays",
                       shape_str(k->shape()));
    }
    H = std::max(H, k->shape(1));
    Dk = std::max(Dk, k->shape(3));
    Dv = std::max(Dv, v->shape(3));
    if (!dt) dt = k->dtype();
  }
  if (!dt) {
    throw ValueError(ctx, "a cache with keys and values among those with tokens",
                     "offsets without arrays");
  }
  const int B = static_cast<int>(kv.size());
  check_memory(ctx, std::to_string(B) + " rows of " + std::to_string(max_length) + " tokens",
               double(B) * H * max_length * (Dk + Dv) * mx::size_of(*dt));
  auto keys = mx::zeros({B, H, max_length, Dk}, *dt);
  auto values = mx::zeros({B, H, max_length, Dv}, *dt);
  for (int i = 0; i < B; ++i) {
    const auto& [k, v] = kv[i];
    if (!k || !v || lengths[i] == 0) continue;
    if (k->shape(1) != H || k->shape(3) != Dk || v->shape(3) != Dv) {
      throw ValueError(ctx, "caches of one shape (1, " + std::to_string(H) + ", S, " +
                                std::to_string(Dk) + ")",
                       shape_str(k->shape()));
    }
    int p = padding[i], l = lengths[i];
    keys = mx::slice_update(keys, mx::astype(*k, *dt), mx::Shape{i, 0, p, 0}, mx::Shape{i + 1, H, p + l, Dk});
    values = mx::slice_update(values, mx::astype(*v, *dt), mx::Shape{i, 0, p, 0}, mx::Shape{i + 1, H, p + l, Dv});
  }
  return {keys, values};
}

// mlx-lm's BatchKVCache.merge copies keys[..., :offset, :] of each cache
// into a row of size() slots. That is a KVCache's tokens, and a
// RotatingKVCache's only while its buffer begins with exactly its tokens in
// temporal order: mlx-lm copies a rotated ring in slot order (wrong rows)
// and fails on a buffer longer than max_size; both are refused here.
void check_merge_row(const char* ctx, const SequenceCache& c) {
  if (dynamic_cast<const KVCache*>(&c)) {
    return;
  }
  const auto* r = dynamic_cast<const RotatingKVCache*>(&c);
  if (!r) {
    throw ValueError(ctx, "KVCache or RotatingKVCache caches", c.name());
  }
  if (!r->keys() || !r->values()) {
    return;
  }
  const int slots = r->keys()->shape(2), idx = r->idx(), offset = r->offset();
  // In temporal order the buffer is whole (cursor at its end, or at `keep`
  // after a wrap) or its first idx slots.
  const bool whole = idx == slots || (idx < offset && idx == r->keep());
  const bool scrambled = !whole && idx < offset;
  const int held = whole ? slots : idx;
  if (scrambled || held != r->size() || std::min(offset, slots) != r->size()) {
    throw ValueError(
        ctx,
        "a RotatingKVCache whose buffer begins with its " + std::to_string(r->size()) +
            " tokens in temporal order (not rotated, no longer than max_size)",
        "offset " + std::to_string(offset) + ", _idx " + std::to_string(idx) + " in " +
            std::to_string(slots) + " slots");
  }
}

} // namespace batch_rows

using namespace batch_rows;

const mx::array& ShiftedRows::get() const {
  if (shift_ != 0) {
    base_ = plus(base_, shift_);
    shift_ = 0;
  }
  return base_;
}

mx::array dynamic_roll(const mx::array& x, const mx::array& shifts, int axis) {
  const int n = x.shape(axis);
  mx::Shape sshape = shifts.shape();
  for (int i = axis; i < static_cast<int>(x.ndim()); ++i) sshape.push_back(1);
  mx::Shape ishape{n};
  for (int i = axis + 1; i < static_cast<int>(x.ndim()); ++i) ishape.push_back(1);
  auto idx = mx::subtract(mx::reshape(mx::arange(n), ishape), mx::reshape(shifts, sshape));
  idx = mx::remainder(idx, mx::array(n, idx.dtype()));
  return mx::take_along_axis(x, idx, axis);
}

// BatchCache ---------------------------------------------------------------

BatchCache::BatchCache(const std::vector<int>& left_padding)
    : offset_(int_array(negated(left_padding))), left_padding_(int_array(left_padding)) {}

void BatchCache::set_keys(OptionalArray keys) {
  if (keys && keys->ndim() != 4) {
    throw ValueError(name(), "keys of rank 4 or None", shape_str(keys->shape()));
  }
  keys_ = std::move(keys);
}

void BatchCache::set_values(OptionalArray values) {
  if (values && values->ndim() != 4) {
    throw ValueError(name(), "values of rank 4 or None", shape_str(values->shape()));
  }
  values_ = std::move(values);
}

void BatchCache::set_offset(mx::array offset) {
  check_rows(name(), "offset", offset);
  offset_ = std::move(offset);
}

void BatchCache::set_left_padding(mx::array left_padding) {
  check_rows(name(), "left_padding", left_padding);
  left_padding_ = std::move(left_padding);
}

void BatchCache::set_idx(int idx) {
  idx_ = check_size(name(), "_idx", idx);
}

void BatchCache::set_step(int step) {
  step_ = check_size(name(), "step", step, 1);
}

size_t BatchCache::nbytes() const {
  return nbytes_of(keys_) + nbytes_of(values_);
}

void BatchCache::check_update(
    const char* ctx,
    const mx::array& keys,
    const mx::array& values) const {
  check_kv(ctx, keys, values);
  check_paddings(ctx);
  if (!keys_ && idx_ != 0) {
    throw RuntimeError(ctx, "_idx 0 in a cache without keys", "_idx " + std::to_string(idx_));
  }
  if (keys_) {
    check_fits(ctx, "keys", keys, *keys_);
    check_fits(ctx, "values", values, *values_);
    if (idx_ > keys_->shape(2)) {
      throw RuntimeError(ctx, "_idx <= the buffer length " + std::to_string(keys_->shape(2)),
                         "_idx " + std::to_string(idx_));
    }
  }
  check_size(ctx, "_idx + S", 1LL * idx_ + keys.shape(2));
}

void BatchCache::check_paddings(const char* ctx) const {
  check_pair(ctx, keys_, values_);
  if (left_padding_.size() != offset_.size()) {
    throw RuntimeError(
        ctx, "offset and left_padding for one batch of " + std::to_string(offset_.size()),
        std::to_string(left_padding_.size()) + " paddings");
  }
}

void BatchCache::check_batch(const char* ctx) const {
  check_pair(ctx, keys_, values_);
  size_t B = offset_.size();
  if (left_padding_.size() != B || (keys_ && size_t(keys_->shape(0)) != B)) {
    throw RuntimeError(
        ctx, "offset, left_padding and keys for one batch of " + std::to_string(B),
        std::to_string(left_padding_.size()) + " paddings" +
            (keys_ ? " and keys for " + std::to_string(keys_->shape(0)) : std::string()));
  }
}

void BatchCache::filter(const std::vector<int>& indices) {
  check_batch("filter");
  auto idx = int_array(check_indices("filter", indices, rows()));
  if (indices.empty()) idx = mx::astype(idx, mx::int32);
  OptionalArray k, v;
  if (keys_) {
    k = mx::take(*keys_, idx, 0);
    v = mx::take(*values_, idx, 0);
  }
  auto off = mx::take(offset(), idx, 0);
  auto lp = mx::take(left_padding(), idx, 0);
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ = std::move(off);
  left_padding_ = std::move(lp);
}

void BatchCache::shift_rows_right(const mx::array& shift) {
  if (keys_ && values_) {
    auto shifts = mx::expand_dims(shift, 1);
    auto k = dynamic_roll(*keys_, shifts, 2);
    auto v = dynamic_roll(*values_, shifts, 2);
    keys_ = std::move(k);
    values_ = std::move(v);
  }
  offset_ = mx::subtract(offset(), shift);
  left_padding_ = mx::add(left_padding(), shift);
}

int BatchCache::extract_padding(const char* ctx, int idx) const {
  check_batch(ctx);
  check_indices(ctx, {idx}, rows());
  if (!keys_ || !values_) {
    throw RuntimeError(ctx, "the cache is empty: no keys or values yet");
  }
  return std::max(0, to_ints(left_padding())[idx]);
}

void BatchCache::extend_aligned(BatchCache& other) {
  constexpr const char* ctx = "extend";
  check_batch(ctx);
  other.check_batch(ctx);
  const int max_idx = std::max(idx_, other.idx_);
  int H = 0, D = 0, M = 0, L1 = 0, L2 = 0;
  const mx::array* like = nullptr;
  if (keys_) {
    H = keys_->shape(1), L1 = keys_->shape(2), D = keys_->shape(3), M = values_->shape(3);
    like = &*keys_;
  }
  if (other.keys_) {
    if (keys_ && (other.keys_->shape(1) != H || other.keys_->shape(3) != D ||
                  other.values_->shape(3) != M || other.keys_->dtype() != keys_->dtype())) {
      throw ValueError(ctx, "a cache of the same heads, head dims and dtype",
                       shape_str(other.keys_->shape()) + " " + dtype_str(other.keys_->dtype()));
    }
    H = other.keys_->shape(1), L2 = other.keys_->shape(2), D = other.keys_->shape(3),
    M = other.values_->shape(3);
    if (!like) like = &*other.keys_;
  }
  const int max_size = std::max(L1, L2);
  const mx::Dtype dtype = like->dtype();
  check_memory(ctx, std::to_string(rows() + other.rows()) + " rows of " + std::to_string(max_size) + " tokens",
               double(rows() + other.rows()) * H * max_size * (D + M) * mx::size_of(dtype));
  struct Padded {
    mx::array k, v, lp;
  };
  auto pad = [&](const BatchCache& c) {
    mx::array k = c.keys_ ? *c.keys_ : mx::zeros({c.rows(), H, 0, D}, dtype);
    mx::array v = c.values_ ? *c.values_ : mx::zeros({c.rows(), H, 0, M}, dtype);
    int left = max_idx - c.idx_;
    int right = max_size - k.shape(2) - left;
    if (right < 0) {
      k = seq_slice(k, 0, k.shape(2) + right);
      v = seq_slice(v, 0, v.shape(2) + right);
      right = 0;
    }
    if (left != 0 || right != 0) {
      std::vector<std::pair<int, int>> w{{0, 0}, {0, 0}, {left, right}, {0, 0}};
      k = mx::pad(k, w);
      v = mx::pad(v, w);
    }
    return Padded{k, v, plus(c.left_padding(), left)};
  };
  auto a = pad(*this), b = pad(other);
  auto k = mx::concatenate({a.k, b.k}, 0);
  auto v = mx::concatenate({a.v, b.v}, 0);
  auto off = mx::concatenate({offset(), other.offset()}, 0);
  auto lp = mx::concatenate({a.lp, b.lp}, 0);
  keys_ = std::move(k);
  values_ = std::move(v);
  offset_ = std::move(off);
  left_padding_ = std::move(lp);
  idx_ = max_idx;
}

} // namespace kvcore
