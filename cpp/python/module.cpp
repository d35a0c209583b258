// The kvcore._ext module: errors, masks and the cache classes.
#include <climits>

#include <mlx/version.h>

#include "common.h"
#include "kvcore/mask.h"

namespace kvcore::py {

namespace {

// kvcore.CacheError and its subclasses, indexed by ErrorKind.
PyObject* error_base = nullptr;
PyObject* error_types[6] = {};

PyObject* new_error(nb::module_& m, const char* name, PyObject* builtin, const char* doc) {
  std::string qual = std::string("kvcore.") + name;
  nb::object bases = builtin
      ? nb::object(nb::make_tuple(nb::handle(error_base), nb::handle(builtin)))
      : nb::borrow(PyExc_Exception);
  PyObject* type = PyErr_NewExceptionWithDoc(qual.c_str(), doc, bases.ptr(), nullptr);
  if (!type) {
    throw nb::python_error();
  }
  m.attr(name) = nb::handle(type);
  return type;
}

} // namespace

StateReader::StateReader(const char* ctx, nb::handle state, size_t expected)
    : ctx_(ctx) {
  if (!nb::isinstance<nb::tuple>(state) && !nb::isinstance<nb::list>(state)) {
    throw ValueError(
        ctx_,
        "a tuple of " + std::to_string(expected) + " items",
        nb::cast<std::string>(nb::str(state.type().attr("__name__"))));
  }
  items_ = nb::tuple(state);
  check_count(ctx, "items", nb::len(items_), expected);
}

QuantScheme scheme_arg(const char* ctx, nb::handle h) {
  if (!nb::isinstance<nb::str>(h)) {
    throw ValueError(ctx, "scheme as a str", nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
  }
  return parse_scheme(ctx, nb::cast<std::string>(h));
}

int window_arg(const char* ctx, QuantScheme scheme, nb::handle window) {
  if (window.is_none()) {
    return scheme == QuantScheme::affine ? 0 : default_window;
  }
  int w = int_arg(ctx, "window", window);
  check_window(ctx, scheme, w);
  return w;
}

void require_affine(const char* ctx, nb::handle scheme) {
  if (scheme_arg(ctx, scheme) != QuantScheme::affine) {
    throw ValueError(ctx, "scheme 'affine' (the only one this kind takes for now)",
                     "'" + nb::cast<std::string>(scheme) + "'");
  }
}

OptionalArray StateReader::array(size_t i, const char* what) const {
  nb::handle item = items_[i];
  if (item.is_none()) {
    return std::nullopt;
  }
  mx::array* a = nullptr;
  if (!nb::try_cast<mx::array*>(item, a, false) || a == nullptr) {
    throw ValueError(
        ctx_,
        std::string(what) + " as an mlx array or None",
        nb::cast<std::string>(nb::str(item.type().attr("__name__"))));
  }
  return *a;
}

int StateReader::integer(size_t i, const char* what) const {
  nb::handle item = items_[i];
  long long v = 0;
  if (PyBool_Check(item.ptr()) || !PyLong_Check(item.ptr()) ||
      !nb::try_cast<long long>(item, v, false)) {
    throw ValueError(
        ctx_,
        std::string(what) + " as an int",
        nb::cast<std::string>(nb::repr(item)));
  }
  if (v < INT_MIN || v > INT_MAX) {
    throw ValueError(ctx_, std::string(what) + " within 32 bits", std::to_string(v));
  }
  return static_cast<int>(v);
}

void register_errors(nb::module_& m) {
  error_base = new_error(
      m, "CacheError", nullptr,
      "Base of every error kvcore raises. Attributes: context, expected, actual.");
  error_types[int(ErrorKind::Value)] = new_error(
      m, "CacheValueError", PyExc_ValueError, "A bad argument or state.");
  error_types[int(ErrorKind::Runtime)] = new_error(
      m, "CacheRuntimeError", PyExc_RuntimeError,
      "The cache cannot do this in its current state.");
  error_types[int(ErrorKind::NotImplemented)] = new_error(
      m, "CacheNotImplementedError", PyExc_NotImplementedError,
      "The cache does not offer this operation.");
  error_types[int(ErrorKind::Index)] = new_error(
      m, "CacheIndexError", PyExc_IndexError, "An index out of range.");
  error_types[int(ErrorKind::Type)] = new_error(
      m, "CacheTypeError", PyExc_TypeError, "An argument of the wrong kind of object.");
  error_types[int(ErrorKind::Key)] = new_error(
      m, "CacheKeyError", PyExc_KeyError, "A key that names nothing known.");
  // KeyError's str() is the repr of its argument; kvcore's message reads
  // as the other errors' do.
  nb::setattr(nb::handle(error_types[int(ErrorKind::Key)]), "__str__",
              nb::handle(PyExc_BaseException).attr("__str__"));

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const CacheError& e) {
      PyObject* type = error_types[int(e.kind())];
      nb::object exc = nb::steal(PyObject_CallFunction(type, "s", e.what()));
      if (!exc.is_valid()) {
        return; // the failed call has set a Python error already
      }
      nb::setattr(exc, "context", nb::str(e.context().c_str()));
      nb::setattr(exc, "expected", nb::str(e.expected().c_str()));
      nb::setattr(exc, "actual", nb::str(e.actual().c_str()));
      PyErr_SetObject(type, exc.ptr());
    }
  });
}

void bind_masks(nb::module_& m) {
  m.def(
      "create_causal_mask",
      [](nb::handle N, nb::handle offset, nb::handle window_size,
         const OptionalArray& right_padding, const OptionalArray& left_padding) {
        constexpr const char* ctx = "create_causal_mask";
        return create_causal_mask(
            int_arg(ctx, "N", N), int_arg(ctx, "offset", offset),
            opt_int_arg(ctx, "window_size", window_size), right_padding, left_padding);
      },
      "N"_a,
      "offset"_a = 0,
      "window_size"_a.none() = nb::none(),
      "right_padding"_a.none() = nb::none(),
      "left_padding"_a.none() = nb::none(),
      nb::sig(
          "def create_causal_mask(N: int, offset: int = 0, "
          "window_size: int | None = None, "
          "right_padding: mlx.core.array | None = None, "
          "left_padding: mlx.core.array | None = None) -> mlx.core.array"),
      R"pbdoc(
        Boolean causal mask for ``N`` queries after ``offset`` cached tokens.

        Args:
            N (int): Number of new (query) tokens.
            offset (int): Tokens already in the cache.
            window_size (int, optional): Each query sees at most this many
              keys, itself included.
            right_padding (array, optional): Per-sequence (B,) counts of
              padded tokens at the end; masks them out.
            left_padding (array, optional): Per-sequence (B,) counts of
              padded tokens at the start; masks them out.

        Returns:
            array: ``(N, offset + N)``, or ``(B, 1, N, offset + N)`` with
            padding; ``True`` where attention is allowed.
      )pbdoc");
  m.def(
      "create_attention_mask",
      [](nb::handle N, nb::handle offset, bool return_array, nb::handle window_size) {
        constexpr const char* ctx = "create_attention_mask";
        return create_attention_mask(
            int_arg(ctx, "N", N), int_arg(ctx, "offset", offset), return_array,
            opt_int_arg(ctx, "window_size", window_size));
      },
      "N"_a,
      "offset"_a,
      "return_array"_a,
      "window_size"_a.none(),
      nb::sig(
          "def create_attention_mask(N: int, offset: int, return_array: bool, "
          "window_size: int | None) -> mlx.core.array | str | None"),
      R"pbdoc(
        The mask a full-attention cache gives its layer.

        Args:
            N (int): Number of new tokens.
            offset (int): Tokens already in the cache.
            return_array (bool): Return an array even where ``"causal"``
              would do.
            window_size (int, optional): Sliding-window width.

        Returns:
            array | str | None: the windowed mask when ``window_size`` is
            set, ``None`` for one token, the mask array when
            ``return_array``, else ``"causal"``.
      )pbdoc");
}

} // namespace kvcore::py

NB_MODULE(_ext, m) {
  m.doc() = "kvcore's native caches (mlx::core C++), shared with mlx.core.";
  m.attr("__mlx_version__") = std::to_string(MLX_VERSION_MAJOR) + "." +
      std::to_string(MLX_VERSION_MINOR) + "." + std::to_string(MLX_VERSION_PATCH);
  nb::module_::import_("mlx.core");
  kvcore::py::register_errors(m);
  kvcore::py::bind_masks(m);
  kvcore::py::bind_kv(m);
  kvcore::py::bind_quantized(m);
  kvcore::py::bind_quantized_rotating(m);
  kvcore::py::bind_arrays(m);
  kvcore::py::bind_batch(m);
  kvcore::py::bind_quantized_batch(m);
  kvcore::py::bind_prefix(m);
  kvcore::py::bind_files(m);
}
