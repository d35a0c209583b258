// Binding helpers shared by every cache class: Python-aware `step`, instance
// creation for from_state/copy on Python subclasses, and state parsing.
#pragma once

#include <climits>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <mlx/array.h>

#include "kvcore/buffer.h"
#include "kvcore/state.h"
#include "kvcore/errors.h"
#include "kvcore/kv.h"
#include "kvcore/quantized.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

// Every nb::handle parameter of kvcore's bindings goes to a checker that
// refuses None with a typed kvcore error (or takes it where mlx-lm does).
// Without this, nanobind refuses None itself with an untyped TypeError
// before the checker runs (std::optional parameters are marked the same way).
template <>
struct nanobind::detail::has_arg_defaults<nanobind::handle> : std::true_type {};

namespace kvcore::py {

/// A Python state (mlx arrays, numbers, strings, None in lists and
/// tuples) as a StateValue; anything else is refused as mlx-lm refuses it.
StateValue state_from_py(nb::handle h, int depth);

/// The C++ cache as Python instances hold it: `step` is read from the
/// Python object (instance, then class), so `KVCache.step = 512`, a
/// subclass's `step = 64` and `cache.step = 16` all work as in mlx-lm. It
/// is consulted only when a buffer grows, never on the per-token path.
/// The `step` a Python object holds (instance, then class) for a C++
/// object with a growth step; `fallback` when it has no Python object yet.
/// A non-int is a ValueError under `ctx`, a step out of range under
/// `range_ctx`.
inline int python_step(
    const std::string& ctx,
    const char* range_ctx,
    nb::object self,
    int fallback) {
  if (!self.is_valid()) {
    return fallback;
  }
  nb::object value = nb::getattr(self, "step");
  long long v = 0;
  if (!nb::try_cast<long long>(value, v, false) || PyBool_Check(value.ptr())) {
    throw ValueError(ctx, "a positive integer", nb::cast<std::string>(nb::repr(value)));
  }
  return check_size(range_ctx, "step", v, 1);
}

template <class T, bool HasStep = requires(const T& t) { t.step(); }>
struct PyCache;

// The constructors forward rather than inherit (`using T::T`): with GCC 13
// an inherited constructor that throws was seen destroying a by-value
// mx::array argument twice.
template <class T>
struct PyCache<T, true> final : T {
  template <class... Args>
  explicit PyCache(Args&&... args) : T(std::forward<Args>(args)...) {}

  int step() const override {
    return python_step(std::string(this->name()) + ".step", this->name(),
                       nb::find(static_cast<const T&>(*this)), T::step());
  }
};

/// Caches without a growth step need nothing from Python.
template <class T>
struct PyCache<T, false> final : T {
  template <class... Args>
  explicit PyCache(Args&&... args) : T(std::forward<Args>(args)...) {}
};

/// A ready instance of `cls` (the bound class or a Python subclass) holding
/// a PyCache<T> built from args, without running Python __init__.
template <class T, class... Args>
nb::object make_instance(nb::handle cls, Args&&... args) {
  static_assert(sizeof(PyCache<T>) == sizeof(T));
  nb::object obj = nb::inst_alloc(cls);
  new (nb::inst_ptr<T>(obj)) PyCache<T>(std::forward<Args>(args)...);
  nb::inst_mark_ready(obj);
  return obj;
}

/// __copy__ / __deepcopy__: the arrays are shared (mlx arrays are
/// immutable); a Python subclass's attributes are copied (deeply for
/// __deepcopy__).
template <class T>
nb::object copy_instance(nb::handle self, nb::handle memo) {
  nb::object out = make_instance<T>(self.type(), *nb::inst_ptr<T>(self));
  nb::object dict = nb::getattr(self, "__dict__", nb::none());
  if (!dict.is_none() && nb::len(dict) > 0) {
    if (!memo.is_valid()) {
      nb::getattr(out, "__dict__").attr("update")(dict);
    } else {
      nb::object deepcopy = nb::module_::import_("copy").attr("deepcopy");
      nb::getattr(out, "__dict__").attr("update")(deepcopy(dict, memo));
    }
  }
  return out;
}

/// Reads a Python state tuple with typed errors.
class StateReader {
 public:
  StateReader(const char* ctx, nb::handle state, size_t expected);
  OptionalArray array(size_t i, const char* what) const;
  int integer(size_t i, const char* what) const;

 private:
  std::string ctx_;
  nb::tuple items_;
};

/// A token count from Python for trim(): any int; counts past INT_MAX mean
/// "all of them" (a cache never holds more), negatives are refused in C++.
inline int count_arg(const char* ctx, nb::handle n) {
  if (!PyLong_Check(n.ptr()) || PyBool_Check(n.ptr())) {
    throw ValueError(ctx, "n as an int", nb::cast<std::string>(nb::repr(n)));
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
  if (overflow > 0 || v > INT_MAX) {
    return INT_MAX;
  }
  if (overflow < 0 || v < INT_MIN) {
    return INT_MIN;
  }
  return static_cast<int>(v);
}

/// An int argument from Python, refused with a typed error (not a
/// TypeError or a wrap-around) when it is not an int or exceeds 32 bits.
inline int int_arg(const char* ctx, const char* what, nb::handle v) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) {
    throw ValueError(ctx, std::string(what) + " as an int", nb::cast<std::string>(nb::repr(v)));
  }
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || x < INT_MIN || x > INT_MAX) {
    throw ValueError(ctx, std::string(what) + " within 32 bits",
                     nb::cast<std::string>(nb::repr(v)));
  }
  return static_cast<int>(x);
}

inline std::optional<int> opt_int_arg(const char* ctx, const char* what, nb::handle v) {
  if (v.is_none()) {
    return std::nullopt;
  }
  return int_arg(ctx, what, v);
}

inline nb::object to_py(const OptionalArray& a) {
  return a ? nb::cast(*a) : nb::none();
}

/// fn as a Python classmethod (through builtins.classmethod: the C call
/// for it is outside the stable ABI).
inline nb::object as_classmethod(nb::handle fn) {
  return nb::module_::import_("builtins").attr("classmethod")(fn);
}

/// Installs fn as the classmethod `merge` of cls.
inline void set_merge(nb::handle cls, nb::object fn) {
  nb::setattr(cls, "merge", as_classmethod(fn));
}

/// A merge's argument: every item of the Python list a kvcore `want`
/// (bound as T), else ValueError naming the type found.
template <class T>
std::vector<const T*> cache_list_arg(const char* ctx, const char* want, nb::handle caches) {
  std::vector<const T*> out;
  for (nb::handle h : caches) {
    const T* p = nullptr;
    if (!nb::try_cast<const T*>(h, p, false) || !p) {
      throw ValueError(ctx, std::string("a list of kvcore ") + want,
                       nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
    }
    out.push_back(p);
  }
  return out;
}

/// Installs `from_state` as a classmethod: builds cls without __init__ and
/// assigns `state`, so a subclass's own state setter is honoured.
template <class T, class... Args>
void def_from_state(nb::handle cls, const char* doc, Args... ctor_args) {
  nb::object fn = nb::cpp_function(
      [=](nb::handle type, nb::handle state) {
        nb::object obj = make_instance<T>(type, ctor_args...);
        nb::setattr(obj, "state", state);
        return obj;
      },
      nb::name("from_state"),
      "cls"_a,
      "state"_a.none(),
      nb::sig("def from_state(cls, state: tuple) -> typing.Self"),
      doc);
  nb::setattr(cls, "from_state", as_classmethod(fn));
}

constexpr const char* kUpdateDoc = R"pbdoc(
  Append new keys and values and return all the cached ones.

  Args:
      keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
      values (array): ``(B, n_kv_heads, S, v_head_dim)``.

  Returns:
      tuple(array, array): The cached keys and values, new ones included.
)pbdoc";

template <class T>
void def_sequence_api(nb::class_<T>& cls);

/// A quantized (weights, scales, biases) triple, or None.
/// The name of h's Python type ("int", "generator").
inline std::string py_type_name(nb::handle h) {
  return nb::cast<std::string>(nb::str(h.type().attr("__name__")));
}

/// A filesystem path from Python: str, bytes or os.PathLike (decoded as
/// os.fsdecode does); anything else is refused with a ValueError, as mlx's
/// loaders refuse it.
inline std::string path_arg(const char* ctx, const char* what, nb::handle h) {
  if (!PyUnicode_Check(h.ptr()) && !PyBytes_Check(h.ptr()) &&
      !nb::hasattr(h.type(), "__fspath__")) {
    throw ValueError(ctx, std::string(what) + " as str, bytes or os.PathLike", py_type_name(h));
  }
  return nb::cast<std::string>(nb::module_::import_("os").attr("fsdecode")(h));
}

/// h as an mlx array, or nullptr when it is not one.
inline mx::array* as_array(nb::handle h) {
  mx::array* a = nullptr;
  return nb::try_cast<mx::array*>(h, a, false) ? a : nullptr;
}

/// An mlx array argument; anything else is a kvcore.CacheTypeError naming
/// the call (`cls.method`) and the argument, not nanobind's overload error.
inline const mx::array& array_param(nb::handle h, const char* cls, const char* method,
                                    const char* what) {
  mx::array* a = as_array(h);
  if (a == nullptr) {
    throw TypeError(std::string(cls) + "." + method, std::string(what) + " as an mlx array",
                    py_type_name(h));
  }
  return *a;
}

/// As array_param, with None for "no array".
inline OptionalArray optional_array_param(nb::handle h, const char* cls, const char* method,
                                          const char* what) {
  if (h.is_none()) {
    return std::nullopt;
  }
  return array_param(h, cls, method, what);
}

/// The other cache of an extend: a T, else a kvcore.CacheTypeError.
template <class T>
T& other_param(nb::handle h, const char* cls) {
  T* p = nullptr;
  if (!nb::try_cast<T*>(h, p, false) || p == nullptr) {
    throw TypeError(std::string(cls) + ".extend", std::string("other as a kvcore ") + cls,
                    py_type_name(h));
  }
  return *p;
}

/// update_and_fetch(keys, values) of a cache T, its arrays checked as above.
template <class T>
auto update_param(T& c, nb::handle keys, nb::handle values) {
  return c.update_and_fetch(array_param(keys, c.name(), "update_and_fetch", "keys"),
                            array_param(values, c.name(), "update_and_fetch", "values"));
}

nb::object to_py(const OptionalQuantized& q);
OptionalQuantized quantized_from_py(const char* ctx, const char* what, nb::handle h);

/// group_size and bits from Python: an int for keys and values alike, or
/// a (keys, values) pair; checked against mx::quantize's choices.
std::pair<QuantSpec, QuantSpec> quant_specs_arg(const char* ctx, nb::handle group_size, nb::handle bits);
/// A quantization scheme's name from Python (quant_scheme.h).
QuantScheme scheme_arg(const char* ctx, nb::handle h);
/// A window from Python: None for the scheme's default.
int window_arg(const char* ctx, QuantScheme scheme, nb::handle window);
/// For the kinds that take only mlx-lm's layout for now: ValueError for
/// any other scheme.
void require_affine(const char* ctx, nb::handle scheme);
/// An int when keys and values agree, else a (keys, values) tuple.
nb::object spec_to_py(int keys, int values);
/// (keys, values) as a quantized cache's update_and_fetch returns them:
/// triples, or under the rotated-channel scheme (weights, scales, biases,
/// residual) each, the residuals the float keys and values.
nb::object fetched_kv(
    QuantScheme scheme,
    const std::pair<QuantizedArrays, QuantizedArrays>& kv,
    const OptionalArray& residual = std::nullopt,
    const OptionalArray& value_residual = std::nullopt);

/// A list of ints from Python (a list, a tuple or a 1-D integer mx.array),
/// or nullopt for None.
std::optional<std::vector<int>> int_list(const char* ctx, const char* what, nb::handle h);

/// int_list where None is refused too.
inline std::vector<int> int_list_required(const char* ctx, const char* what, nb::handle h) {
  if (h.is_none()) {
    throw ValueError(ctx, std::string(what) + " as a list of ints", "None");
  }
  return *int_list(ctx, what, h);
}

/// An mlx array argument, refused with a typed error otherwise.
mx::array array_arg(const char* ctx, const char* what, nb::handle h);

/// A cache fresh from a file as an instance of its kvcore Python class.
nb::object wrap_loaded(nb::handle kvcore, std::shared_ptr<Cache>& c);

void register_errors(nb::module_& m);
void bind_masks(nb::module_& m);
void bind_kv(nb::module_& m);
void bind_quantized(nb::module_& m);
void bind_arrays(nb::module_& m);
void bind_batch(nb::module_& m);
void bind_files(nb::module_& m);
void bind_quantized_rotating(nb::module_& m);
void bind_quantized_batch(nb::module_& m);
void bind_prefix(nb::module_& m);

// What every cache holding one keys and one values buffer shows Python.
template <class T>
void def_buffer_api(nb::class_<T>& cls, int default_step) {
  cls.attr("step") = default_step;
  cls.def("update_and_fetch", &update_param<T>, "keys"_a, "values"_a,
          nb::sig("def update_and_fetch(self, keys: mlx.core.array, values: "
                  "mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]"),
          kUpdateDoc)
      .def("keys_and_values", &T::keys_and_values, "The cached keys and values.")
      .def_prop_rw(
          "keys", [](const T& c) { return to_py(c.keys()); },
          [](T& c, nb::handle a) { c.set_keys(optional_array_param(a, c.name(), "keys", "keys")); },
          nb::for_getter(nb::sig("def keys(self, /) -> mlx.core.array | None")),
          nb::for_setter(nb::sig("def keys(self, keys: mlx.core.array | None, /) -> None")),
          nb::arg("keys").none(), "The keys buffer, or None before the first update.")
      .def_prop_rw(
          "values", [](const T& c) { return to_py(c.values()); },
          [](T& c, nb::handle a) {
            c.set_values(optional_array_param(a, c.name(), "values", "values"));
          },
          nb::for_getter(nb::sig("def values(self, /) -> mlx.core.array | None")),
          nb::for_setter(nb::sig("def values(self, values: mlx.core.array | None, /) -> None")),
          nb::arg("values").none(),
          "The values buffer, or None before the first update.")
      .def_prop_ro("nbytes", &T::nbytes, "Bytes held by the keys and values.")
      .def("empty", &T::empty, "True before the first update.")
      .def("size", &T::size, "Tokens the cache holds (0 where mlx-lm's does not say).")
      .def("is_trimmable", &T::is_trimmable, "Whether ``trim`` can drop tokens.")
      .def("trim", [](T& c, nb::handle n) { return c.trim(count_arg(c.name(), n)); }, "n"_a,
           nb::sig("def trim(self, n: int) -> int"),
           "Drop up to ``n`` tokens from the end; returns how many were dropped.")
      .def("_assign", [](T& self, const T& other) { self = other; }, "other"_a,
           "Take other's contents (a staged copy), as one step.")
      .def("__repr__", [](nb::handle self) {
        const T& c = *nb::inst_ptr<T>(self);
        std::string out = nb::cast<std::string>(nb::str(self.type().attr("__name__"))) + "(";
        if constexpr (std::is_same_v<decltype(c.offset()), int>) {
          out += "offset=" + std::to_string(c.offset());
        } else {
          out += "batch=" + std::to_string(c.offset().size()) + ", _idx=" + std::to_string(c.idx());
        }
        out += ", keys=" + (c.keys() ? shape_str(c.keys()->shape()) + " " + dtype_str(c.keys()->dtype())
                                     : std::string("None"));
        return out + ")";
      })
      .def("__copy__", [](nb::handle self) { return copy_instance<T>(self, nb::handle()); },
           nb::sig("def __copy__(self) -> typing.Self"))
      .def("__deepcopy__", [](nb::handle self, nb::handle memo) {
        return copy_instance<T>(self, memo);
      }, "memo"_a, nb::sig("def __deepcopy__(self, memo: dict) -> typing.Self"));
}

// The single-sequence caches: the buffers and an int offset.
template <class T>
void def_sequence_api(nb::class_<T>& cls) {
  def_buffer_api(cls, SequenceCache::default_step);
  cls.def_prop_rw(
      "offset", &T::offset,
      [](T& c, nb::handle v) { c.set_offset(int_arg(c.name(), "offset", v)); },
      nb::for_setter(nb::sig("def offset(self, value: int, /) -> None")),
      "Tokens seen so far: the position of the next token.");
  cls.def_prop_rw(
      "capacity", &T::capacity,
      [](T& c, nb::handle v) { c.set_capacity(int_arg(c.name(), "capacity", v)); },
      nb::for_setter(nb::sig("def capacity(self, value: int, /) -> None")),
      "Tokens the buffer gets room for when next allocated (0: ``step`` at a time).");
}

} // namespace kvcore::py
