#include "kvcore/batch.h"

#include <algorithm>

#include <mlx/ops.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"
#include "kvcore/mask.h"

namespace kvcore {

namespace {

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

// Single-sequence (1, H, *, D) caches stacked into (B, H, max_len, D) rows,
// each right-aligned: row i gets tokens[i] at [pad_i, pad_i + len_i).
struct Stacked {
  mx::array keys, values;
};

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

} // namespace

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

// BatchKVCache -------------------------------------------------------------

BatchKVCache::BatchKVCache(const std::vector<int>& left_padding) : BatchCache(left_padding) {}

std::pair<mx::array, mx::array> BatchKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchKVCache.update_and_fetch";
  check_update(ctx, keys, values);
  const int S = keys.shape(2), prev = idx_;
  auto kv = write_grown(ctx, keys_, values_, keys, values, prev, [&] {
    return check_size(ctx, "step", this->step(), 1);
  });
  keys_ = std::move(kv.first);
  values_ = std::move(kv.second);
  offset_.shift(S);
  idx_ += S;
  return keys_and_values();
}

std::pair<mx::array, mx::array> BatchKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("BatchKVCache.keys_and_values", "the cache is empty: no keys or values yet");
  }
  return {seq_slice(*keys_, 0, idx_), seq_slice(*values_, 0, idx_)};
}

void BatchKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& right_padding) {
  constexpr const char* ctx = "BatchKVCache.prepare";
  std::optional<mx::array> lp;
  if (left_padding) {
    if (keys_) {
      throw ValueError(ctx, "Left padding can only be added to an empty BatchKVCache");
    }
    check_count(ctx, "left paddings", left_padding->size(), rows());
    lp = int_array(*left_padding);
  }
  if (right_padding) {
    check_count(ctx, "right paddings", right_padding->size(), rows());
  }
  if (lp) {
    left_padding_ = mx::add(this->left_padding(), *lp);
    offset_ = mx::subtract(offset(), *lp);
  }
  if (right_padding && !right_padding->empty() &&
      *std::max_element(right_padding->begin(), right_padding->end()) > 0) {
    right_padding_ = int_array(*right_padding);
  }
}

void BatchKVCache::finalize() {
  if (!right_padding_) {
    return;
  }
  check_batch("BatchKVCache.finalize");
  const auto& pad = *right_padding_;
  if (keys_ && values_) {
    auto shifts = mx::expand_dims(pad, 1);
    auto k = dynamic_roll(*keys_, shifts, 2);
    auto v = dynamic_roll(*values_, shifts, 2);
    keys_ = std::move(k);
    values_ = std::move(v);
  }
  offset_ = mx::subtract(offset(), pad);
  left_padding_ = mx::add(left_padding(), pad);
  right_padding_.reset();
}

int BatchKVCache::trim(int n) {
  check_size("BatchKVCache.trim", "n", n);
  n = std::min(idx_, n);
  idx_ -= n;
  offset_.shift(-n);
  return n;
}

Mask BatchKVCache::make_mask(int N, bool, std::optional<int> window_size) const {
  constexpr const char* ctx = "BatchKVCache.make_mask";
  check_batch(ctx);
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  return create_causal_mask(N, idx_, window_size, std::nullopt, left_padding());
}

void BatchKVCache::filter(const std::vector<int>& indices) {
  BatchKVCache next = *this; // staged: the padding is read (evaluated) below
  next.BatchCache::filter(indices);
  // Shift left to drop padding no row needs any more. An empty cache's
  // padding is still to be written, so it stays (mlx-lm would take _idx
  // below zero there).
  if (!indices.empty() && next.keys_ && next.values_) {
    auto pads = to_ints(next.left_padding());
    int min_pad = std::min(*std::min_element(pads.begin(), pads.end()), next.idx_);
    if (min_pad > 0) {
      next.keys_ = seq_slice(*next.keys_, min_pad, next.keys_->shape(2));
      next.values_ = seq_slice(*next.values_, min_pad, next.values_->shape(2));
      next.idx_ -= min_pad;
      next.left_padding_.shift(-min_pad);
    }
  }
  next.right_padding_ = take_rows(right_padding_, indices);
  *this = std::move(next);
}

void BatchKVCache::extend(BatchKVCache& other) {
  auto pending = concat_rows(right_padding_, mx::zeros_like(offset()), other.right_padding_,
                             mx::zeros_like(other.offset()));
  if (!keys_ && !other.keys_) {
    left_padding_ = mx::concatenate({left_padding(), other.left_padding()}, 0);
    offset_ = mx::concatenate({offset(), other.offset()}, 0);
  } else {
    extend_aligned(other);
  }
  right_padding_ = std::move(pending);
}

KVCache BatchKVCache::extract(int idx) const {
  constexpr const char* ctx = "BatchKVCache.extract";
  check_batch(ctx);
  check_indices(ctx, {idx}, rows());
  if (!keys_ || !values_) {
    throw RuntimeError(ctx, "the cache is empty: no keys or values yet");
  }
  int padding = std::max(0, to_ints(left_padding())[idx]);
  auto k = mx::contiguous(seq_slice(row_slice(*keys_, idx, idx + 1), padding, idx_));
  auto v = mx::contiguous(seq_slice(row_slice(*values_, idx, idx + 1), padding, idx_));
  KVCache out;
  out.set(k, v, k.shape(2));
  return out;
}

BatchKVCache BatchKVCache::merge(const std::vector<const SequenceCache*>& caches) {
  constexpr const char* ctx = "BatchKVCache.merge";
  check_non_null_list(ctx, caches);
  std::vector<int> lengths, padding;
  std::vector<std::pair<OptionalArray, OptionalArray>> kv;
  for (const auto* c : caches) {
    check_merge_row(ctx, *c);
    lengths.push_back(c->size());
    kv.emplace_back(
        c->keys() ? OptionalArray(seq_slice(*c->keys(), 0, c->offset())) : std::nullopt,
        c->values() ? OptionalArray(seq_slice(*c->values(), 0, c->offset())) : std::nullopt);
  }
  const int max_length = *std::max_element(lengths.begin(), lengths.end());
  if (max_length == 0) {
    return BatchKVCache(std::vector<int>(caches.size(), 0));
  }
  for (int l : lengths) padding.push_back(max_length - l);
  auto stacked = stack_rows(ctx, kv, padding, lengths, max_length);
  BatchKVCache out(padding);
  out.keys_ = stacked.keys;
  out.values_ = stacked.values;
  out.offset_.shift(max_length);
  out.idx_ = max_length;
  return out;
}

std::vector<OptionalArray> BatchKVCache::state() const {
  return {keys_, values_, offset(), left_padding()};
}

std::vector<std::string> BatchKVCache::meta_state() const {
  return {std::to_string(idx_)};
}

void BatchKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "BatchKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 4);
  check_count(ctx, "scalars", meta.size(), 1);
  if (!arrays[2] || !arrays[3]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  set(arrays[0], arrays[1], *arrays[2], *arrays[3], parse_int(ctx, "_idx", meta[0]));
}

void BatchKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    mx::array offset,
    mx::array left_padding,
    int idx) {
  constexpr const char* ctx = "BatchKVCache.state";
  check_pair(ctx, keys, values);
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  if (offset.size() != left_padding.size()) {
    throw ValueError(ctx, "offset and left_padding for one batch size",
                     std::to_string(offset.size()) + ", " + std::to_string(left_padding.size()));
  }
  check_offset_fits(ctx, keys, idx);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
  idx_ = idx;
}

// BatchRotatingKVCache -----------------------------------------------------

BatchRotatingKVCache::BatchRotatingKVCache(int max_size, const std::vector<int>& left_padding)
    : BatchCache(left_padding),
      max_size_(check_size("BatchRotatingKVCache", "max_size", max_size, 1)) {}

void BatchRotatingKVCache::temporal_order() {
  if (rotated_ && keys_ && values_) {
    auto k = mx::roll(*keys_, -idx_, 2);
    auto v = mx::roll(*values_, -idx_, 2);
    keys_ = std::move(k);
    values_ = std::move(v);
    idx_ = keys_->shape(2);
    rotated_ = false;
  }
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_and_fetch(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchRotatingKVCache.update_and_fetch";
  check_update(ctx, keys, values);
  if (keys.shape(2) == 1) {
    if (lengths_) {
      throw RuntimeError(
          ctx, "finalize() should be called before decoding with BatchRotatingKVCache");
    }
    return update_in_place(keys, values);
  }
  if (lengths_ && keys_) {
    check_batch(ctx); // right-padded rows are rolled, each by its own shift
  }
  return update_concat(keys, values);
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_concat(
    const mx::array& keys,
    const mx::array& values) {
  const int S = keys.shape(2);
  if (!keys_) {
    keys_ = keys;
    values_ = values;
  } else {
    // Work on copies of the members; commit together at the end.
    BatchRotatingKVCache next = *this;
    next.temporal_order();
    auto& k = *next.keys_;
    auto& v = *next.values_;
    if (k.shape(2) > next.idx_) {
      k = seq_slice(k, 0, next.idx_);
      v = seq_slice(v, 0, next.idx_);
    }
    if (next.lengths_) {
      // Roll right-padded rows so padding never evicts real tokens.
      auto roll = mx::maximum(mx::array(0, next.offset_.dtype()),
                              mx::subtract(next.offset(), *next.lengths_));
      auto shifts = mx::expand_dims(roll, 1);
      k = dynamic_roll(k, shifts, 2);
      v = dynamic_roll(v, shifts, 2);
      next.left_padding_ = mx::add(next.left_padding(), roll);
      next.offset_ = mx::subtract(next.offset(), roll);
    }
    // Keep max_size - 1 old tokens so every new one sees max_size.
    int trim_size = next.idx_ - max_size_ + 1;
    if (trim_size > 0) {
      next.left_padding_.shift(-trim_size);
      k = seq_slice(k, trim_size, k.shape(2));
      v = seq_slice(v, trim_size, v.shape(2));
    }
    k = seq_concat({k, keys});
    v = seq_concat({v, values});
    *this = std::move(next);
  }
  offset_.shift(S);
  offset_in_ring_ += S;
  idx_ = keys_->shape(2);
  // As mlx-lm: evaluating the keys evaluates the paddings and offsets too.
  keys_ = depends_on(*keys_, left_padding(), offset());
  return {*keys_, *values_};
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::update_in_place(
    const mx::array& keys,
    const mx::array& values) {
  constexpr const char* ctx = "BatchRotatingKVCache.update_and_fetch";
  const int S = keys.shape(2), prev = offset_in_ring_;
  OptionalArray k = keys_, v = values_;
  int idx = idx_;
  bool rotated = rotated_;
  ShiftedRows lp = left_padding_;
  if (!k || (prev >= k->shape(2) && k->shape(2) < max_size_)) {
    grow_ring(ctx, k, v, keys, values, prev, max_size_,
              check_size(ctx, "step", this->step(), 1));
    idx = prev;
  }
  int trim_size = k->shape(2) - max_size_;
  if (trim_size > 0) {
    k = seq_slice(*k, trim_size, k->shape(2));
    v = seq_slice(*v, trim_size, v->shape(2));
    idx = max_size_;
    lp.shift(-trim_size);
  }
  if (idx == max_size_) {
    rotated = true;
    idx = 0;
  }
  if (rotated) {
    lp.shift(-S);
  }
  if (idx + S > k->shape(2)) {
    throw RuntimeError(ctx, "a write position inside the buffer of " + std::to_string(k->shape(2)),
                       "_idx " + std::to_string(idx));
  }
  auto kw = seq_write(*k, keys, idx);
  auto vw = seq_write(*v, values, idx);
  k.reset();
  v.reset();
  // mlx-lm adds `mx.depends(keys, (left_padding, offset))` here so that the
  // per-token padding and offset ops get evaluated; with the shifts pending
  // in ShiftedRows there are no such ops to evaluate.
  keys_ = std::move(kw);
  values_ = std::move(vw);
  left_padding_ = std::move(lp);
  offset_.shift(S);
  rotated_ = rotated;
  offset_in_ring_ += S;
  idx_ = idx + S;
  return keys_and_values();
}

std::pair<mx::array, mx::array> BatchRotatingKVCache::keys_and_values() const {
  if (!keys_ || !values_) {
    throw RuntimeError("BatchRotatingKVCache.keys_and_values",
                       "the cache is empty: no keys or values yet");
  }
  if (offset_in_ring_ < keys_->shape(2)) {
    return {seq_slice(*keys_, 0, offset_in_ring_), seq_slice(*values_, 0, offset_in_ring_)};
  }
  return {*keys_, *values_};
}

void BatchRotatingKVCache::prepare(
    const std::optional<std::vector<int>>& left_padding,
    const std::optional<std::vector<int>>& lengths,
    const std::optional<std::vector<int>>& right_padding) {
  constexpr const char* ctx = "BatchRotatingKVCache.prepare";
  std::optional<mx::array> lp;
  if (left_padding) {
    if (keys_) {
      throw ValueError(ctx, "Left padding can only be added to an empty BatchRotatingKVCache");
    }
    check_count(ctx, "left paddings", left_padding->size(), rows());
    lp = int_array(*left_padding);
  }
  bool pad_right = right_padding && !right_padding->empty() &&
      *std::max_element(right_padding->begin(), right_padding->end()) > 0;
  if (right_padding) {
    check_count(ctx, "right paddings", right_padding->size(), rows());
  }
  if (pad_right) {
    if (!lengths) {
      throw ValueError(ctx, "lengths with right_padding", "None");
    }
    check_count(ctx, "lengths", lengths->size(), rows());
  }
  if (lp) {
    left_padding_ = mx::add(this->left_padding(), *lp);
    offset_ = mx::subtract(offset(), *lp);
  }
  if (pad_right) {
    lengths_ = mx::add(int_array(*lengths), offset());
  }
}

void BatchRotatingKVCache::finalize() {
  if (!lengths_) {
    return;
  }
  check_batch("BatchRotatingKVCache.finalize");
  auto roll = mx::maximum(mx::array(0, offset_.dtype()), mx::subtract(offset(), *lengths_));
  if (keys_ && values_) {
    auto shifts = mx::expand_dims(roll, 1);
    auto k = dynamic_roll(*keys_, shifts, 2);
    auto v = dynamic_roll(*values_, shifts, 2);
    keys_ = std::move(k);
    values_ = std::move(v);
  }
  left_padding_ = mx::add(left_padding(), roll);
  offset_ = mx::subtract(offset(), roll);
  lengths_.reset();
}

int BatchRotatingKVCache::trim(int n) {
  constexpr const char* ctx = "BatchRotatingKVCache.trim";
  check_size(ctx, "n", n);
  n = std::min(offset_in_ring_, n);
  if (n > 0 && !is_trimmable()) {
    throw RuntimeError(ctx, "_offset < max_size (nothing rotated out yet)",
                       "_offset " + std::to_string(offset_in_ring_) + " with max_size " +
                           std::to_string(max_size_));
  }
  offset_in_ring_ -= n;
  idx_ -= n;
  offset_.shift(-n);
  return n;
}

Mask BatchRotatingKVCache::make_mask(
    int N,
    bool,
    std::optional<int> window_size) const {
  constexpr const char* ctx = "BatchRotatingKVCache.make_mask";
  check_batch(ctx);
  check_size(ctx, "N", N);
  if (window_size) {
    check_size(ctx, "window_size", *window_size);
  }
  auto lp = left_padding();
  int window = (window_size && *window_size) ? *window_size : max_size_;
  int offset = std::min(max_size_ - 1, offset_in_ring_);
  check_size(ctx, "offset + N", 1LL * offset + N);
  auto rinds = mx::arange(offset + N);
  auto linds = offset ? mx::arange(offset, offset + N) : rinds;
  linds = mx::expand_dims(linds, 1);
  rinds = mx::expand_dims(rinds, 0);
  auto mask = mx::greater_equal(linds, rinds);
  mask = mx::logical_and(mask, mx::less(linds, mx::add(rinds, mx::array(window))));
  int trim_size = idx_ - max_size_ + (N > 1 ? 1 : 0);
  if (trim_size > 0) {
    lp = minus(lp, trim_size);
  }
  bool rotated = N == 1 && (rotated_ || idx_ >= max_size_);
  if (rotated) {
    lp = minus(lp, 1);
  }
  mask = mx::logical_and(mask, mx::greater_equal(rinds, mx::expand_dims(lp, {1, 2, 3})));
  if (rotated) {
    int idx = idx_ >= max_size_ ? 0 : idx_;
    mask = mx::roll(mask, idx + 1, -1);
  }
  return mask;
}

void BatchRotatingKVCache::filter(const std::vector<int>& indices) {
  BatchRotatingKVCache next = *this;
  next.BatchCache::filter(indices);
  next.lengths_ = take_rows(lengths_, indices);
  *this = std::move(next);
}

void BatchRotatingKVCache::extend(BatchRotatingKVCache& other) {
  if (other.max_size_ != max_size_) {
    throw ValueError("BatchRotatingKVCache.extend", "a batch of max_size " + std::to_string(max_size_),
                     "max_size " + std::to_string(other.max_size_));
  }
  // A row with no lengths pending rolls by nothing: its lengths are its offset.
  auto pending = concat_rows(lengths_, offset(), other.lengths_, other.offset());
  if (!keys_ && !other.keys_) {
    left_padding_ = mx::concatenate({left_padding(), other.left_padding()}, 0);
    offset_ = mx::concatenate({offset(), other.offset()}, 0);
    lengths_ = std::move(pending);
    return;
  }
  // Staged on copies: both caches change only if the extend succeeds.
  BatchRotatingKVCache a = *this, b = other;
  if (a.rotated_ != b.rotated_ || a.idx_ != b.idx_) {
    a.temporal_order();
    b.temporal_order();
  }
  int ring = std::max(a.offset_in_ring_, b.offset_in_ring_);
  a.extend_aligned(b);
  a.offset_in_ring_ = ring;
  a.lengths_ = std::move(pending);
  *this = std::move(a);
  if (&other != this) { // extending a cache with itself doubles it
    other = std::move(b);
  }
}

RotatingKVCache BatchRotatingKVCache::extract(int idx) const {
  constexpr const char* ctx = "BatchRotatingKVCache.extract";
  check_batch(ctx);
  check_indices(ctx, {idx}, rows());
  if (!keys_ || !values_) {
    throw RuntimeError(ctx, "the cache is empty: no keys or values yet");
  }
  int padding = std::max(0, to_ints(left_padding())[idx]);
  int offset = to_ints(this->offset())[idx];
  auto k = row_slice(*keys_, idx, idx + 1);
  auto v = row_slice(*values_, idx, idx + 1);
  int end = idx_;
  if (rotated_) {
    k = mx::roll(k, -idx_, 2);
    v = mx::roll(v, -idx_, 2);
    end = max_size_;
  }
  k = mx::contiguous(seq_slice(k, padding, end));
  v = mx::contiguous(seq_slice(v, padding, end));
  RotatingKVCache out(max_size_);
  out.set(k, v, check_size(ctx, "the row's offset", offset), 0, max_size_, k.shape(2));
  return out;
}

BatchRotatingKVCache BatchRotatingKVCache::merge(const std::vector<const RotatingKVCache*>& caches) {
  constexpr const char* ctx = "BatchRotatingKVCache.merge";
  check_non_null_list(ctx, caches);
  const int max_size = caches[0]->max_size();
  std::vector<int> offsets, lengths, padding;
  std::vector<std::pair<OptionalArray, OptionalArray>> kv;
  for (const auto* c : caches) {
    if (c->max_size() != max_size) {
      throw ValueError(ctx, "BatchRotatingKVCache can only merge caches with the same maximum size");
    }
    offsets.push_back(c->offset());
    int l = c->size();
    if (c->keys() && c->values() && l > 0) {
      auto k = c->temporal_order(*c->keys());
      auto v = c->temporal_order(*c->values());
      // The ring may hold fewer tokens than its offset says (an empty
      // update after an over-long one, an offset set past the buffer):
      // the row takes what it holds.
      l = std::min(l, k.shape(2));
      kv.emplace_back(seq_slice(k, k.shape(2) - l, k.shape(2)), seq_slice(v, v.shape(2) - l, v.shape(2)));
    } else {
      kv.emplace_back(std::nullopt, std::nullopt);
    }
    lengths.push_back(l);
  }
  const int max_length = *std::max_element(lengths.begin(), lengths.end());
  if (max_length == 0) {
    return BatchRotatingKVCache(max_size, std::vector<int>(caches.size(), 0));
  }
  for (int l : lengths) padding.push_back(max_length - l);
  auto stacked = stack_rows(ctx, kv, padding, lengths, max_length);
  BatchRotatingKVCache out(max_size, padding);
  out.keys_ = stacked.keys;
  out.values_ = stacked.values;
  out.offset_ = int_array(offsets);
  out.idx_ = max_length;
  out.offset_in_ring_ = max_length;
  return out;
}

std::vector<OptionalArray> BatchRotatingKVCache::state() const {
  return {keys_, values_, offset(), left_padding()};
}

std::vector<std::string> BatchRotatingKVCache::meta_state() const {
  return {std::to_string(max_size_), std::to_string(offset_in_ring_), std::to_string(idx_),
          rotated_ ? "1" : "0"};
}

void BatchRotatingKVCache::restore(
    const std::vector<OptionalArray>& arrays,
    const std::vector<std::string>& meta) {
  constexpr const char* ctx = "BatchRotatingKVCache.state";
  check_count(ctx, "arrays", arrays.size(), 4);
  check_count(ctx, "scalars", meta.size(), 4);
  if (!arrays[2] || !arrays[3]) {
    throw ValueError(ctx, "offset and left_padding arrays", "None");
  }
  set(arrays[0], arrays[1], *arrays[2], *arrays[3], parse_int(ctx, "max_size", meta[0]),
      parse_int(ctx, "_offset", meta[1]), parse_int(ctx, "_idx", meta[2]),
      parse_int(ctx, "rotated", meta[3]) != 0);
}

void BatchRotatingKVCache::set(
    OptionalArray keys,
    OptionalArray values,
    mx::array offset,
    mx::array left_padding,
    int max_size,
    int offset_in_ring,
    int idx,
    bool rotated) {
  constexpr const char* ctx = "BatchRotatingKVCache.state";
  check_pair(ctx, keys, values);
  check_rows(ctx, "offset", offset);
  check_rows(ctx, "left_padding", left_padding);
  check_size(ctx, "max_size", max_size, 1);
  check_size(ctx, "_offset", offset_in_ring);
  if (offset.size() != left_padding.size()) {
    throw ValueError(ctx, "offset and left_padding for one batch size",
                     std::to_string(offset.size()) + ", " + std::to_string(left_padding.size()));
  }
  check_offset_fits(ctx, keys, idx);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ = std::move(offset);
  left_padding_ = std::move(left_padding);
  max_size_ = max_size;
  offset_in_ring_ = offset_in_ring;
  idx_ = idx;
  rotated_ = rotated;
}

void BatchRotatingKVCache::set_offset_in_ring(int v) {
  offset_in_ring_ = check_size("BatchRotatingKVCache._offset", "_offset", v);
}

} // namespace kvcore
