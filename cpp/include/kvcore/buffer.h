// Shared pieces of the caches: argument checks, the step-grown sequence
// buffer and the sequence-axis slices every cache uses.
#pragma once

#include <climits>
#include <string>

#include <mlx/array.h>

#include "kvcore/cache.h"

namespace kvcore {

/// "(1, 8, 16, 64)".
std::string shape_str(const mx::Shape& shape);
std::string dtype_str(mx::Dtype dtype);

/// keys and values are rank 4 and agree on B, H and S. Any dtype: storing
/// tokens needs none in particular (as in mlx-lm); quantizing checks its own.
void check_kv(const char* ctx, const mx::array& keys, const mx::array& values);

/// A cache's or a state's (keys, values): both None, or both set and
/// passing check_kv.
void check_pair(
    const char* ctx,
    const OptionalArray& keys,
    const OptionalArray& values);

/// The buffers can take an update at offset (offset <= their length; 0
/// when there are none).
void check_offset_fits(
    const char* ctx,
    const OptionalArray& keys,
    int offset);

/// A state of `what` holds n items where `expected` were due.
void check_count(const char* ctx, const char* what, size_t n, size_t expected);

/// The int n as a scalar of dtype (mlx's weak typing of a Python int in
/// `array + n`); refuses an n the integer dtype cannot hold.
mx::array scalar_like(long long n, mx::Dtype dtype, const char* what);

/// A base-10 integer scalar from a meta_state string.
int parse_int(const char* ctx, const char* what, const std::string& s);

/// x fits into buf along the sequence axis: same B, H, head dim and dtype.
void check_fits(
    const char* ctx,
    const char* what,
    const mx::array& x,
    const mx::array& buf);

/// Throws ValueError when allocating `bytes` more (`what`: what for) would
/// take mlx past its memory limit, counting what mlx holds already: every
/// allocation whose size a caller or a file chooses is checked first.
void check_memory(const char* ctx, const std::string& what, double bytes);

/// A size read from the user: min <= n <= max (by default a Shape element).
int check_size(
    const char* ctx,
    const char* what,
    long long n,
    int min = 0,
    int max = INT_MAX);

/// buf[..., start:stop, :].
mx::array seq_slice(const mx::array& buf, int start, int stop);
/// x[..., start:stop] (the last axis).
mx::array last_slice(const mx::array& x, int start, int stop);
/// buf with x written at buf[..., at:at+S, :] (in place when buf is unique).
mx::array seq_write(const mx::array& buf, const mx::array& x, int at);
/// Concatenate along the sequence axis.
mx::array seq_concat(std::vector<mx::array> parts);
/// Zeros shaped like x but with S = n along the sequence axis.
mx::array seq_zeros(const mx::array& like, int n);

/// Make room for S more tokens after prev in a step-grown buffer, the way
/// mlx-lm's KVCache does: keep buf[..., :prev, :] and append zeros in whole
/// steps. A capacity larger than that makes the buffer capacity long at
/// once, so filling it later never copies it. Throws ValueError (under
/// ctx, the caller's name) when the new buffer could not fit in mlx's
/// memory limit.
mx::array grow_to(
    const char* ctx,
    const std::optional<mx::array>& buf,
    const mx::array& like,
    int prev,
    int S,
    int step,
    int capacity = 0);

/// True when buf is missing or too short for prev + S tokens.
inline bool needs_growth(const std::optional<mx::array>& buf, int prev, int S) {
  return !buf || prev + S > buf->shape(2);
}

/// The (keys, values) buffers with the new tokens written at prev, grown
/// by whole steps (or to `capacity`) first where needed. step() is asked only when growing
/// (for a Python cache it reads a Python attribute). Changes nothing.
template <class StepFn>
std::pair<mx::array, mx::array> write_grown(
    const char* ctx,
    const OptionalArray& keys_buf,
    const OptionalArray& values_buf,
    const mx::array& keys,
    const mx::array& values,
    int prev,
    StepFn step,
    int capacity = 0) {
  const int S = keys.shape(2);
  if (needs_growth(keys_buf, prev, S)) {
    const int n = step();
    return {
        seq_write(grow_to(ctx, keys_buf, keys, prev, S, n, capacity), keys, prev),
        seq_write(grow_to(ctx, values_buf, values, prev, S, n, capacity), values, prev)};
  }
  return {seq_write(*keys_buf, keys, prev), seq_write(*values_buf, values, prev)};
}

/// A ring still filling up (the rotating caches' single-token writes, once
/// the buffers are missing or full below max_size): append up to `step`
/// zero slots, never past max_size. prev is the tokens written so far.
void grow_ring(
    const char* ctx,
    OptionalArray& keys_buf,
    OptionalArray& values_buf,
    const mx::array& keys,
    const mx::array& values,
    int prev,
    int max_size,
    int step);

size_t nbytes_of(const OptionalArray& a);

/// Before a multi-token write (S > 1) into an existing reserved buffer
/// (capacity > 0) on a GPU: wait for the work already submitted. The write
/// is in place only when nothing else holds the buffer, and mlx's GPU
/// backends let go of the previous step's inputs only after mx.eval has
/// returned; without the wait a prefill chunk copies the whole buffer
/// (peaks of 2 to 3 times the cache measured on CUDA, 1.0 with it). Never
/// on the per-token path, never on the CPU (where the write is in place).
void await_buffer_release(int capacity, bool has_buffer, int S);

} // namespace kvcore
