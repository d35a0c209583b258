#include "kvcore/buffer.h"

#include <algorithm>
#include <climits>

#include <mlx/memory.h>
#include <mlx/ops.h>

#include "kvcore/errors.h"

namespace kvcore {

// Strings built without iostreams: the library stays usable where a
// toolchain links its own copy of libstdc++ (as seen on one GPU machine,
// where an ostringstream in the library crashed inside Python).
std::string shape_str(const mx::Shape& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string dtype_str(mx::Dtype dtype) {
  switch (dtype.val()) {
    case mx::Dtype::Val::bool_: return "bool";
    case mx::Dtype::Val::uint8: return "uint8";
    case mx::Dtype::Val::uint16: return "uint16";
    case mx::Dtype::Val::uint32: return "uint32";
    case mx::Dtype::Val::uint64: return "uint64";
    case mx::Dtype::Val::int8: return "int8";
    case mx::Dtype::Val::int16: return "int16";
    case mx::Dtype::Val::int32: return "int32";
    case mx::Dtype::Val::int64: return "int64";
    case mx::Dtype::Val::float16: return "float16";
    case mx::Dtype::Val::float32: return "float32";
    case mx::Dtype::Val::float64: return "float64";
    case mx::Dtype::Val::bfloat16: return "bfloat16";
    case mx::Dtype::Val::complex64: return "complex64";
  }
  return "dtype " + std::to_string(static_cast<int>(dtype.val()));
}

void check_kv(const char* ctx, const mx::array& keys, const mx::array& values) {
  if (keys.ndim() != 4) {
    throw ValueError(
        ctx,
        "keys of rank 4 (B, n_kv_heads, S, head_dim)",
        "rank " + std::to_string(keys.ndim()) + " " + shape_str(keys.shape()));
  }
  if (values.ndim() != 4) {
    throw ValueError(
        ctx,
        "values of rank 4 (B, n_kv_heads, S, head_dim)",
        "rank " + std::to_string(values.ndim()) + " " +
            shape_str(values.shape()));
  }
  for (int ax = 0; ax < 3; ++ax) {
    if (keys.shape(ax) != values.shape(ax)) {
      throw ValueError(
          ctx,
          "values with the keys' (B, n_kv_heads, S) " +
              shape_str({keys.shape(0), keys.shape(1), keys.shape(2)}),
          "values of shape " + shape_str(values.shape()));
    }
  }
}

void check_pair(
    const char* ctx,
    const OptionalArray& keys,
    const OptionalArray& values) {
  if (keys.has_value() != values.has_value()) {
    throw ValueError(
        ctx,
        "keys and values both set or both None",
        std::string("keys ") + (keys ? "set" : "None") + " and values " +
            (values ? "set" : "None"));
  }
  if (keys) {
    check_kv(ctx, *keys, *values);
  }
}

void check_offset_fits(
    const char* ctx,
    const OptionalArray& keys,
    int offset) {
  int len = keys ? keys->shape(2) : 0;
  if (offset < 0 || offset > len) {
    throw ValueError(
        ctx,
        "an offset in [0, " + std::to_string(len) + "] (the keys' length)",
        "offset " + std::to_string(offset));
  }
}

void check_count(const char* ctx, const char* what, size_t n, size_t expected) {
  if (n != expected) {
    throw ValueError(
        ctx,
        std::to_string(expected) + " " + what,
        std::to_string(n) + " " + what);
  }
}

mx::array scalar_like(long long n, mx::Dtype dtype, const char* what) {
  if (mx::issubdtype(dtype, mx::integer)) {
    long long lo = 0, hi = 0;
    switch (dtype.size()) {
      case 1: lo = mx::issubdtype(dtype, mx::signedinteger) ? -128 : 0;
              hi = mx::issubdtype(dtype, mx::signedinteger) ? 127 : 255; break;
      case 2: lo = mx::issubdtype(dtype, mx::signedinteger) ? -32768 : 0;
              hi = mx::issubdtype(dtype, mx::signedinteger) ? 32767 : 65535; break;
      case 4: lo = mx::issubdtype(dtype, mx::signedinteger) ? INT_MIN : 0;
              hi = mx::issubdtype(dtype, mx::signedinteger) ? INT_MAX : 4294967295LL; break;
      default: lo = mx::issubdtype(dtype, mx::signedinteger) ? LLONG_MIN : 0; hi = LLONG_MAX;
    }
    if (n < lo || n > hi) {
      throw ValueError(what, "a value that fits " + dtype_str(dtype), std::to_string(n));
    }
  }
  return mx::array(n, dtype);
}

int parse_int(const char* ctx, const char* what, const std::string& s) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size()) {
    throw ValueError(ctx, std::string(what) + " as a base-10 integer", "'" + s + "'");
  }
  if (v < INT_MIN || v > INT_MAX) {
    throw ValueError(ctx, std::string(what) + " within 32 bits", s);
  }
  return static_cast<int>(v);
}

void check_fits(
    const char* ctx,
    const char* what,
    const mx::array& x,
    const mx::array& buf) {
  if (x.shape(0) != buf.shape(0) || x.shape(1) != buf.shape(1) ||
      x.shape(3) != buf.shape(3)) {
    throw ValueError(
        ctx,
        std::string(what) + " of shape (" + std::to_string(buf.shape(0)) +
            ", " + std::to_string(buf.shape(1)) + ", S, " +
            std::to_string(buf.shape(3)) + ") like the cache's",
        shape_str(x.shape()));
  }
  if (x.dtype() != buf.dtype()) {
    throw ValueError(
        ctx,
        std::string(what) + " of dtype " + dtype_str(buf.dtype()) +
            " like the cache's",
        dtype_str(x.dtype()));
  }
}

void check_memory(const char* ctx, const std::string& what, double bytes) {
  const double limit = double(mx::get_memory_limit());
  const double in_use = double(mx::get_active_memory());
  if (in_use + bytes > limit) {
    throw ValueError(
        ctx,
        "an allocation within mlx's memory limit of " + std::to_string(size_t(limit)) + " bytes (" +
            std::to_string(size_t(in_use)) + " in use)",
        what + " of " + std::to_string(size_t(bytes)) + " bytes");
  }
}

int check_size(const char* ctx, const char* what, long long n, int min, int max) {
  if (n < min || n > max) {
    throw ValueError(
        ctx,
        std::string(what) + " in [" + std::to_string(min) + ", " + std::to_string(max) + "]",
        std::to_string(n));
  }
  return static_cast<int>(n);
}

mx::array last_slice(const mx::array& x, int start, int stop) {
  mx::Shape lo(x.ndim(), 0), hi = x.shape();
  lo.back() = start;
  hi.back() = stop;
  return mx::slice(x, lo, hi);
}

mx::array seq_slice(const mx::array& buf, int start, int stop) {
  int n = buf.shape(2);
  start = std::clamp(start, 0, n);
  stop = std::clamp(stop, start, n);
  if (start == 0 && stop == n) {
    return buf;
  }
  return mx::slice(
      buf,
      mx::Shape{0, 0, start, 0},
      mx::Shape{buf.shape(0), buf.shape(1), stop, buf.shape(3)});
}

mx::array seq_write(const mx::array& buf, const mx::array& x, int at) {
  return mx::slice_update(
      buf,
      x,
      mx::Shape{0, 0, at, 0},
      mx::Shape{buf.shape(0), buf.shape(1), at + x.shape(2), buf.shape(3)});
}

mx::array seq_concat(std::vector<mx::array> parts) {
  return mx::concatenate(std::move(parts), 2);
}

mx::array seq_zeros(const mx::array& like, int n) {
  return mx::zeros({like.shape(0), like.shape(1), n, like.shape(3)}, like.dtype());
}

mx::array grow_to(
    const char* ctx,
    const std::optional<mx::array>& buf,
    const mx::array& like,
    int prev,
    int S,
    int step,
    int capacity) {
  long long n_steps = (static_cast<long long>(step) + S - 1) / step;
  long long added = n_steps * step;
  std::optional<mx::array> kept;
  if (buf) {
    kept = (prev % step != 0) ? seq_slice(*buf, 0, prev) : *buf;
  }
  const int kept_len = kept ? kept->shape(2) : 0;
  added = std::max(added, 1LL * capacity - kept_len);
  check_size(ctx, "buffer growth", added);
  check_size(ctx, "buffer length", 1LL * kept_len + added);
  double bytes = double(kept_len + added) * like.shape(0) * like.shape(1) * like.shape(3) *
      like.itemsize();
  check_memory(ctx, std::to_string(kept_len + added) + " tokens", bytes);
  auto fresh = seq_zeros(like, static_cast<int>(added));
  if (!kept) {
    return fresh;
  }
  return seq_concat({*kept, fresh});
}

void grow_ring(
    const char* ctx,
    OptionalArray& keys_buf,
    OptionalArray& values_buf,
    const mx::array& keys,
    const mx::array& values,
    int prev,
    int max_size,
    int step) {
  int grow = std::min(step, max_size - prev);
  if (grow <= 0) {
    throw RuntimeError(
        ctx,
        "fewer tokens written than max_size while the buffer is shorter than it",
        std::to_string(prev) + " tokens with a buffer of " +
            std::to_string(keys_buf ? keys_buf->shape(2) : 0));
  }
  const int kept = keys_buf ? keys_buf->shape(2) : 0;
  check_memory(ctx, std::to_string(kept + grow) + " slots",
               double(kept + grow) * keys.shape(0) * keys.shape(1) *
                   (keys.shape(3) * keys.itemsize() + values.shape(3) * values.itemsize()));
  auto add = [grow](const OptionalArray& buf, const mx::array& like) {
    return buf ? seq_concat({*buf, seq_zeros(like, grow)}) : seq_zeros(like, grow);
  };
  auto k = add(keys_buf, keys);
  values_buf = add(values_buf, values);
  keys_buf = std::move(k);
}

size_t nbytes_of(const OptionalArray& a) {
  return a ? a->nbytes() : 0;
}

void await_buffer_release(int capacity, bool has_buffer, int S) {
  if (capacity > 0 && has_buffer && S > 1 &&
      mx::default_device().type == mx::Device::DeviceType::gpu) {
    mx::synchronize();
  }
}

} // namespace kvcore
