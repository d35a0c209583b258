// ArraysCache.
#include "common.h"
#include <mlx/ops.h>

#include "kvcore/arrays.h"

namespace kvcore::py {

namespace {

// A list of ints (or an int mx.array) as an int32 row array; None or an
// empty list as None, as mlx-lm's `mx.array(x) if x else None`.
OptionalArray rows_arg(const char* ctx, const char* what, nb::handle h) {
  if (h.is_none()) {
    return std::nullopt;
  }
  mx::array* a = nullptr;
  if (nb::try_cast<mx::array*>(h, a, false) && a) {
    return *a;
  }
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h)) {
    throw ValueError(ctx, std::string(what) + " as a list of ints, an array or None",
                     nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
  }
  std::vector<int> v;
  for (nb::handle x : h) {
    v.push_back(int_arg(ctx, what, x));
  }
  if (v.empty()) {
    return std::nullopt;
  }
  return mx::array(v.begin(), mx::Shape{static_cast<int>(v.size())}, mx::int32);
}

nb::list slots_to_py(const std::vector<OptionalArray>& slots) {
  nb::list out;
  for (const auto& s : slots) {
    out.append(to_py(s));
  }
  return out;
}

std::vector<OptionalArray> slots_from_py(const char* ctx, nb::handle h) {
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h)) {
    throw ValueError(ctx, "the slots as a list of arrays or None",
                     nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
  }
  std::vector<OptionalArray> out;
  for (nb::handle x : h) {
    if (x.is_none()) {
      out.push_back(std::nullopt);
      continue;
    }
    mx::array* a = nullptr;
    if (!nb::try_cast<mx::array*>(x, a, false) || !a) {
      throw ValueError(ctx, "slots holding arrays or None",
                       nb::cast<std::string>(nb::str(x.type().attr("__name__"))));
    }
    out.push_back(*a);
  }
  return out;
}

} // namespace

void bind_arrays(nb::module_& m) {
  using C = ArraysCache;
  auto cls = nb::class_<C>(
      m, "ArraysCache", nb::dynamic_attr(),
      "Per-layer state arrays (conv and SSM states) for state-space models.");
  cls.def("__init__",
          [](C* self, nb::handle size, nb::handle left_padding) {
            new (self) PyCache<C>(int_arg("ArraysCache", "size", size),
                                  rows_arg("ArraysCache", "left_padding", left_padding));
          },
          "size"_a, "left_padding"_a.none() = nb::none(),
          nb::sig("def __init__(self, size: int, left_padding: list[int] | None = None) -> None"),
          R"pbdoc(
            Args:
                size (int): Number of slots.
                left_padding (list[int], optional): Per-row prompt padding.
          )pbdoc")
      .def("__getitem__",
           [](const C& c, nb::handle idx) { return to_py(c.get(int_arg("ArraysCache", "idx", idx))); },
           "idx"_a, nb::sig("def __getitem__(self, idx: int) -> mlx.core.array | None"))
      .def("__setitem__",
           [](C& c, nb::handle idx, nb::handle v) {
             c.set(int_arg("ArraysCache", "idx", idx),
                   optional_array_param(v, "ArraysCache", "__setitem__", "value"));
           },
           "idx"_a, "value"_a.none(),
           nb::sig("def __setitem__(self, idx: int, value: mlx.core.array | None) -> None"))
      .def_prop_rw(
          "cache", [](const C& c) { return slots_to_py(c.cache()); },
          [](C& c, nb::handle h) { c.set_cache(slots_from_py("ArraysCache.cache", h)); },
          "The slots, as a new list.")
      .def_prop_rw(
          "left_padding", [](const C& c) { return to_py(c.left_padding()); },
          [](C& c, nb::handle v) {
            c.set_left_padding(optional_array_param(v, "ArraysCache", "left_padding", "left_padding"));
          },
          nb::arg("value").none())
      .def_prop_rw(
          "lengths", [](const C& c) { return to_py(c.lengths()); },
          [](C& c, nb::handle v) {
            c.set_lengths(optional_array_param(v, "ArraysCache", "lengths", "lengths"));
          },
          nb::arg("value").none())
      .def_prop_ro("batch_size", &C::batch_size)
      .def_prop_rw(
          "state",
          [](const C& c) {
            return nb::make_tuple(slots_to_py(c.cache()), to_py(c.left_padding()),
                                  to_py(c.lengths()));
          },
          [](C& c, nb::handle v) {
            constexpr const char* ctx = "ArraysCache.state";
            StateReader r(ctx, v, 3);
            auto arrays = slots_from_py(ctx, nb::tuple(v)[0]);
            arrays.push_back(r.array(1, "left_padding"));
            arrays.push_back(r.array(2, "lengths"));
            c.restore(arrays, {});
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(slots, left_padding, lengths)``.")
      .def("filter",
           [](C& c, nb::handle idx) {
             auto rows = rows_arg("ArraysCache.filter", "batch_indices", idx);
             c.filter(rows ? *rows : mx::zeros({0}, mx::int32));
           },
           "batch_indices"_a, "Keep only these rows, in place.")
      .def("extend", [](C& c, nb::handle other) { c.extend(other_param<C>(other, "ArraysCache")); },
           "other"_a, nb::sig("def extend(self, other: ArraysCache) -> None"),
           "Append the other cache's rows, in place.")
      .def("extract",
           [](nb::handle self, nb::handle idx) {
             auto& c = *nb::inst_ptr<C>(self);
             return make_instance<C>(nb::module_::import_("kvcore").attr("ArraysCache"),
                                     c.extract(int_arg("ArraysCache.extract", "idx", idx)));
           },
           "idx"_a, "Row ``idx`` as a one-row cache.")
      .def("prepare",
           [](C& c, nb::handle lengths, nb::kwargs) {
             c.prepare(rows_arg("ArraysCache.prepare", "lengths", lengths));
           },
           "lengths"_a.none() = nb::none(), "kwargs"_a)
      .def("finalize", &C::finalize)
      .def("advance",
           [](C& c, nb::handle N) { c.advance(int_arg("ArraysCache.advance", "N", N)); }, "N"_a)
      .def("make_mask",
           [](const C& c, nb::handle N) { return c.make_mask(int_arg("ArraysCache.make_mask", "N", N)); },
           "N"_a, nb::sig("def make_mask(self, N: int) -> mlx.core.array | None"))
      .def("empty", &C::empty)
      .def("size", &C::size)
      .def("is_trimmable", &C::is_trimmable)
      .def_prop_ro("nbytes", &C::nbytes)
      .def("_assign", [](C& self, const C& other) { self = other; }, "other"_a,
           "Take other's contents (a staged copy), as one step.")
      .def("__copy__", [](nb::handle self) { return copy_instance<C>(self, nb::handle()); })
      .def("__deepcopy__",
           [](nb::handle self, nb::handle memo) { return copy_instance<C>(self, memo); }, "memo"_a);
  def_from_state<C>(cls, "Build a cache from ``state`` without calling __init__.", 0);
  nb::object merge = nb::cpp_function(
      [](nb::handle type, nb::handle caches) {
        std::vector<const C*> ptrs;
        for (nb::handle h : caches) {
          ptrs.push_back(&nb::cast<const C&>(h));
        }
        return make_instance<C>(type, C::merge(ptrs));
      },
      nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[ArraysCache]) -> ArraysCache"),
      "One cache with a row per input cache.");
  set_merge(cls, merge);
}

} // namespace kvcore::py
