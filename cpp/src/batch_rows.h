// Row bookkeeping the left-padded batch caches share (batch.cpp defines
// it; batch_kv.cpp and batch_rotating.cpp use it): int lists as arrays,
// offsets moved with the arrays' dtype, rows taken, stacked and checked.
#pragma once

#include <utility>
#include <vector>

#include "kvcore/batch.h"

namespace kvcore::batch_rows {

/// mlx.core.array(list_of_ints): int32, or float32 when the list is empty.
mx::array int_array(const std::vector<int>& v);
/// Each value negated.
std::vector<int> negated(const std::vector<int>& v);
/// `x + n` / `x - n` with a Python int: the array keeps its dtype (and, as
/// in mlx, an int that does not fit it is an error, not a wrap-around).
mx::array plus(const mx::array& x, int n);
mx::array minus(const mx::array& x, int n);
/// An integer array's values (evaluates it).
std::vector<int> to_ints(const mx::array& a);
/// Rows [start, stop) along axis 0.
mx::array row_slice(const mx::array& x, int start, int stop);
/// Keys or values made to depend on the padding and offset arrays, so those
/// are evaluated with them (as mlx-lm's mx.depends).
mx::array depends_on(const mx::array& x, const mx::array& a, const mx::array& b);
/// A per-row array waiting for finalize() (right padding, lengths) follows
/// the rows through filter and extend, so finalize() meets the batch it
/// was prepared for.
OptionalArray take_rows(const OptionalArray& pending, const std::vector<int>& indices);
/// This batch's pending rows, then the other's; `fill_*` stands in for a
/// side with nothing pending (a value that makes finalize() a no-op there).
OptionalArray concat_rows(
    const OptionalArray& mine,
    const mx::array& fill_mine,
    const OptionalArray& theirs,
    const mx::array& fill_theirs);
/// Throws unless v is a rank-1 integer array (one value per row).
void check_rows(const char* ctx, const char* what, const mx::array& v);
/// The indices, each checked to be in [0, B).
std::vector<int> check_indices(const char* ctx, const std::vector<int>& idx, int B);

/// Single-sequence (1, H, *, D) caches stacked into (B, H, max_len, D) rows,
/// each right-aligned: row i gets tokens[i] at [pad_i, pad_i + len_i).
struct Stacked {
  mx::array keys, values;
};
Stacked stack_rows(
    const char* ctx,
    const std::vector<std::pair<OptionalArray, OptionalArray>>& kv,
    const std::vector<int>& padding,
    const std::vector<int>& lengths,
    int max_length);

/// Throws unless the cache can be a row of a merged batch: a KVCache, or a
/// RotatingKVCache whose buffer begins with its tokens in temporal order
/// (mlx-lm copies a rotated ring in slot order, wrong rows, and fails on a
/// buffer longer than max_size).
void check_merge_row(const char* ctx, const SequenceCache& c);

} // namespace kvcore::batch_rows
