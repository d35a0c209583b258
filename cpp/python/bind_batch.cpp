// BatchKVCache, BatchRotatingKVCache, and KVCache/RotatingKVCache.merge.
#include <mlx/ops.h>

#include "common.h"
#include "kvcore/batch.h"

namespace kvcore::py {

std::optional<std::vector<int>> int_list(const char* ctx, const char* what, nb::handle h) {
  if (h.is_none()) {
    return std::nullopt;
  }
  mx::array* a = nullptr;
  if (nb::try_cast<mx::array*>(h, a, false) && a) {
    if (a->ndim() != 1 || !mx::issubdtype(a->dtype(), mx::integer)) {
      throw ValueError(ctx, std::string(what) + " as a 1-D integer array",
                       dtype_str(a->dtype()) + " " + shape_str(a->shape()));
    }
    auto x = mx::astype(*a, mx::int32);
    x.eval();
    return std::vector<int>(x.data<int32_t>(), x.data<int32_t>() + x.size());
  }
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h)) {
    throw ValueError(ctx, std::string(what) + " as a list of ints",
                     nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
  }
  std::vector<int> out;
  for (nb::handle x : h) {
    out.push_back(int_arg(ctx, what, x));
  }
  return out;
}

mx::array array_arg(const char* ctx, const char* what, nb::handle h) {
  mx::array* a = as_array(h);
  if (a == nullptr) {
    throw ValueError(ctx, std::string(what) + " as an mlx array", py_type_name(h));
  }
  return *a;
}

namespace {

// BatchKVCache.merge's rows: KVCaches, or RotatingKVCaches as mlx-lm's
// merge reads them (checked in C++).
std::vector<const SequenceCache*> sequence_singles(const char* ctx, nb::handle caches) {
  std::vector<const SequenceCache*> out;
  for (nb::handle h : caches) {
    const KVCache* kv = nullptr;
    const RotatingKVCache* rot = nullptr;
    if (nb::try_cast<const KVCache*>(h, kv, false) && kv) {
      out.push_back(kv);
    } else if (nb::try_cast<const RotatingKVCache*>(h, rot, false) && rot) {
      out.push_back(rot);
    } else {
      throw ValueError(ctx, "a list of kvcore KVCache or RotatingKVCache",
                       nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
    }
  }
  return out;
}

// What both batch caches show Python.
template <class T>
void def_batch_api(nb::class_<T>& cls) {
  def_buffer_api(cls, BatchCache::default_step);
  cls.def_prop_rw("offset", [](const T& c) { return c.offset(); },
                   [](T& c, nb::handle v) { c.set_offset(array_arg(c.name(), "offset", v)); },
                   "Per-row positions (B,): tokens seen minus left padding.")
      .def_prop_rw("left_padding", [](const T& c) { return c.left_padding(); },
                   [](T& c, nb::handle v) {
                     c.set_left_padding(array_arg(c.name(), "left_padding", v));
                   },
                   "Per-row left padding (B,).")
      .def_prop_rw("_idx", &T::idx,
                   [](T& c, nb::handle v) { c.set_idx(int_arg(c.name(), "_idx", v)); })
      .def("finalize", &T::finalize)
      .def("filter",
           [](T& c, nb::handle idx) { c.filter(int_list_required("filter", "batch_indices", idx)); },
           "batch_indices"_a, "Keep only these rows, in place.")
      .def("extend", [](T& c, nb::handle other) { c.extend(other_param<T>(other, c.name())); },
           "other"_a, nb::sig("def extend(self, other: typing.Self) -> None"),
           "Append the other cache's rows, in place.");
}

} // namespace

void bind_batch(nb::module_& m) {
  m.def("dynamic_roll", &dynamic_roll, "x"_a, "shifts"_a, "axis"_a,
        nb::sig("def dynamic_roll(x: mlx.core.array, shifts: mlx.core.array, axis: int) -> mlx.core.array"),
        R"pbdoc(
          Roll each row of ``x`` by its own shift along ``axis``.

          Args:
              x (array): The array.
              shifts (array): Per-row shifts, broadcastable to the leading axes.
              axis (int): The axis to roll.

          Returns:
              array: ``x`` with row ``i`` rolled right by ``shifts[i]``.
        )pbdoc");
  auto b = nb::class_<BatchKVCache>(
      m, "BatchKVCache", nb::dynamic_attr(),
      "Full-attention cache for a batch of left-padded sequences.");
  b.def("__init__",
        [](BatchKVCache* self, nb::handle left_padding) {
          new (self) PyCache<BatchKVCache>(int_list_required("BatchKVCache", "left_padding", left_padding));
        },
        "left_padding"_a, nb::sig("def __init__(self, left_padding: list[int]) -> None"),
        R"pbdoc(
          Args:
              left_padding (list[int]): Pad tokens before each row's prompt.
        )pbdoc");
  def_batch_api(b);
  b.def("prepare",
        [](BatchKVCache& c, nb::handle left_padding, nb::handle lengths, nb::handle right_padding) {
          constexpr const char* ctx = "BatchKVCache.prepare";
          c.prepare(int_list(ctx, "left_padding", left_padding),
                    int_list(ctx, "right_padding", right_padding));
        },
        nb::kw_only(), "left_padding"_a.none() = nb::none(), "lengths"_a.none() = nb::none(),
        "right_padding"_a.none() = nb::none())
      .def_prop_ro("_right_padding", [](const BatchKVCache& c) { return to_py(c.right_padding()); })
      .def("make_mask",
           [](const BatchKVCache& c, nb::handle N, bool return_array, nb::kwargs kw) {
             constexpr const char* ctx = "BatchKVCache.make_mask";
             nb::handle w = kw.contains("window_size") ? nb::handle(kw["window_size"]) : nb::none();
             return c.make_mask(int_arg(ctx, "N", N), return_array, opt_int_arg(ctx, "window_size", w));
           },
           "N"_a, "return_array"_a = false, "kwargs"_a,
           nb::sig("def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mlx.core.array"))
      .def("extract",
           [](const BatchKVCache& c, nb::handle idx) {
             return make_instance<KVCache>(nb::module_::import_("kvcore").attr("KVCache"),
                                           c.extract(int_arg("BatchKVCache.extract", "idx", idx)));
           },
           "idx"_a, "Row ``idx`` as a KVCache holding only its tokens.")
      .def_prop_rw(
          "state",
          [](const BatchKVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(), c.left_padding(),
                                  c.idx());
          },
          [](BatchKVCache& c, nb::handle v) {
            constexpr const char* ctx = "BatchKVCache.state";
            StateReader r(ctx, v, 5);
            auto off = r.array(2, "offset"), lp = r.array(3, "left_padding");
            if (!off || !lp) throw ValueError(ctx, "offset and left_padding arrays", "None");
            c.set(r.array(0, "keys"), r.array(1, "values"), *off, *lp, r.integer(4, "_idx"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, left_padding, _idx)``.");
  def_from_state<BatchKVCache>(b, "Build a cache from ``state`` without calling __init__.",
                               std::vector<int>{});
  auto merge_kv = [](nb::handle type, nb::handle caches) {
    return make_instance<BatchKVCache>(
        type, BatchKVCache::merge(sequence_singles("BatchKVCache.merge", caches)));
  };
  set_merge(b,
      nb::cpp_function(merge_kv, nb::name("merge"), "cls"_a, "caches"_a,
                       nb::sig("def merge(cls, caches: list[KVCache | RotatingKVCache]) -> BatchKVCache"),
                       "One batch cache from single-sequence KVCaches (or unrotated\n"
                       "RotatingKVCaches), left-padded."));

  auto r = nb::class_<BatchRotatingKVCache>(
      m, "BatchRotatingKVCache", nb::dynamic_attr(),
      "Sliding-window cache for a batch of left-padded sequences.");
  r.def("__init__",
        [](BatchRotatingKVCache* self, nb::handle max_size, nb::handle left_padding) {
          constexpr const char* ctx = "BatchRotatingKVCache";
          new (self) PyCache<BatchRotatingKVCache>(int_arg(ctx, "max_size", max_size),
                                                   int_list_required(ctx, "left_padding", left_padding));
        },
        "max_size"_a, "left_padding"_a,
        nb::sig("def __init__(self, max_size: int, left_padding: list[int]) -> None"));
  def_batch_api(r);
  r.def("prepare",
        [](BatchRotatingKVCache& c, nb::handle left_padding, nb::handle lengths,
           nb::handle right_padding) {
          constexpr const char* ctx = "BatchRotatingKVCache.prepare";
          c.prepare(int_list(ctx, "left_padding", left_padding), int_list(ctx, "lengths", lengths),
                    int_list(ctx, "right_padding", right_padding));
        },
        nb::kw_only(), "left_padding"_a.none() = nb::none(), "lengths"_a.none() = nb::none(),
        "right_padding"_a.none() = nb::none())
      .def("make_mask",
           [](const BatchRotatingKVCache& c, nb::handle N, nb::handle window_size, bool return_array) {
             constexpr const char* ctx = "BatchRotatingKVCache.make_mask";
             return c.make_mask(int_arg(ctx, "N", N), return_array,
                                opt_int_arg(ctx, "window_size", window_size));
           },
           "N"_a, "window_size"_a.none() = nb::none(), "return_array"_a = false,
           nb::sig("def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array"))
      .def_prop_ro("max_size", &BatchRotatingKVCache::max_size)
      .def_prop_rw("_offset", &BatchRotatingKVCache::offset_in_ring,
                   [](BatchRotatingKVCache& c, nb::handle v) {
                     c.set_offset_in_ring(int_arg("BatchRotatingKVCache._offset", "_offset", v));
                   })
      .def_prop_rw("rotated", &BatchRotatingKVCache::rotated,
                   [](BatchRotatingKVCache& c, nb::handle v) {
                     if (!PyBool_Check(v.ptr())) {
                       throw ValueError("BatchRotatingKVCache.rotated", "rotated as a bool",
                                        nb::cast<std::string>(nb::repr(v)));
                     }
                     c.set_rotated(v.ptr() == Py_True);
                   })
      .def_prop_ro("_lengths", [](const BatchRotatingKVCache& c) { return to_py(c.lengths()); })
      .def("extract",
           [](const BatchRotatingKVCache& c, nb::handle idx) {
             return make_instance<RotatingKVCache>(
                 nb::module_::import_("kvcore").attr("RotatingKVCache"),
                 c.extract(int_arg("BatchRotatingKVCache.extract", "idx", idx)));
           },
           "idx"_a, "Row ``idx`` as a RotatingKVCache.")
      .def_prop_rw(
          "state",
          [](const BatchRotatingKVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(), c.left_padding(),
                                  c.max_size(), c.offset_in_ring(), c.idx(), c.rotated());
          },
          [](BatchRotatingKVCache& c, nb::handle v) {
            constexpr const char* ctx = "BatchRotatingKVCache.state";
            StateReader rd(ctx, v, 8);
            auto off = rd.array(2, "offset"), lp = rd.array(3, "left_padding");
            if (!off || !lp) throw ValueError(ctx, "offset and left_padding arrays", "None");
            nb::handle rot = nb::tuple(v)[7];
            if (!PyBool_Check(rot.ptr()) && !PyLong_Check(rot.ptr())) {
              throw ValueError(ctx, "rotated as a bool", nb::cast<std::string>(nb::repr(rot)));
            }
            c.set(rd.array(0, "keys"), rd.array(1, "values"), *off, *lp, rd.integer(4, "max_size"),
                  rd.integer(5, "_offset"), rd.integer(6, "_idx"), PyObject_IsTrue(rot.ptr()) == 1);
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, left_padding, max_size, _offset, _idx, rotated)``.");
  def_from_state<BatchRotatingKVCache>(
      r, "Build a cache from ``state`` without calling __init__.", 1, std::vector<int>{});
  auto merge_rot = [](nb::handle type, nb::handle caches) {
    return make_instance<BatchRotatingKVCache>(
        type, BatchRotatingKVCache::merge(
                  cache_list_arg<RotatingKVCache>("BatchRotatingKVCache.merge", "RotatingKVCache", caches)));
  };
  set_merge(r,
      nb::cpp_function(merge_rot, nb::name("merge"), "cls"_a, "caches"_a,
                       nb::sig("def merge(cls, caches: list[RotatingKVCache]) -> BatchRotatingKVCache"),
                       "One batch cache from single-sequence RotatingKVCaches."));

  // KVCache.merge / RotatingKVCache.merge build the batch caches.
  nb::object kv_cls = m.attr("KVCache"), rot_cls = m.attr("RotatingKVCache");
  set_merge(kv_cls,
      nb::cpp_function([b](nb::handle, nb::handle caches) {
        return make_instance<BatchKVCache>(
            b, BatchKVCache::merge(sequence_singles("KVCache.merge", caches)));
      }, nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[KVCache | RotatingKVCache]) -> BatchKVCache"),
      "A BatchKVCache holding these caches as rows (KVCaches, or\n"
      "RotatingKVCaches whose buffer holds their tokens in order)."));
  set_merge(rot_cls,
      nb::cpp_function([r](nb::handle, nb::handle caches) {
        return make_instance<BatchRotatingKVCache>(
            r, BatchRotatingKVCache::merge(cache_list_arg<RotatingKVCache>("RotatingKVCache.merge", "RotatingKVCache", caches)));
      }, nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[RotatingKVCache]) -> BatchRotatingKVCache"),
      "A BatchRotatingKVCache holding these caches as rows."));
}

} // namespace kvcore::py
