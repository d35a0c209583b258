// QuantizedBatchKVCache and QuantizedBatchRotatingKVCache; the batch caches'
// to_quantized and the quantized caches' merge.
#include "common.h"
#include "kvcore/quantized_batch.h"

namespace kvcore::py {

namespace {

constexpr const char* kTripleSig =
    "tuple[mlx.core.array, mlx.core.array, mlx.core.array]";

using Fetched = std::pair<QuantizedArrays, QuantizedArrays>;

nb::object fetched(const QuantizedBatchRotatingKVCache& c, const Fetched& kv) {
  return fetched_kv(c.scheme(), kv, c.residual(), c.value_residual());
}

nb::object fetched(const QuantizedBatchKVCache& c, const Fetched& kv) {
  return fetched_kv(c.scheme(), kv, c.residual(), c.value_residual());
}

// What both quantized batch caches show Python.
template <class T>
void def_quantized_batch_api(nb::class_<T>& cls) {
  cls.def("update_and_fetch",
          [](T& c, nb::handle keys, nb::handle values) { return fetched(c, update_param(c, keys, values)); },
          "keys"_a, "values"_a,
          nb::sig("def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) -> tuple[tuple, tuple]"),
          R"pbdoc(
            Quantize new keys and values and add them to the batch.

            Args:
                keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
                values (array): ``(B, n_kv_heads, S, v_head_dim)``.

            Returns:
                tuple: The cached ``(weights, scales, biases)`` of the keys and
                of the values, as the float batch cache returns its arrays.
                ``"rotated-channel"``: ``(weights, scales, biases, residual)``
                for each, as QuantizedKVCache returns them.
          )pbdoc")
      .def("keys_and_values", [](const T& c) { return fetched(c, c.keys_and_values()); },
           "The cached keys and values as ``update_and_fetch`` returns them.")
      .def_prop_ro("keys", [](const T& c) { return to_py(c.keys()); },
                   "The keys' ``(weights, scales, biases)``, or None.")
      .def_prop_ro("values", [](const T& c) { return to_py(c.values()); },
                   "The values' ``(weights, scales, biases)``, or None.")
      .def_prop_ro("offset", [](const T& c) { return c.offset(); },
                   "Per-row positions (B,): tokens seen minus left padding.")
      .def_prop_ro("left_padding", [](const T& c) { return c.left_padding(); },
                   "Per-row left padding (B,).")
      .def_prop_ro("_idx", &T::idx, "The write position.")
      .def_prop_ro("group_size",
                   [](const T& c) { return spec_to_py(c.key_spec().group_size, c.value_spec().group_size); },
                   "The group size, or ``(keys, values)`` when they differ.")
      .def_prop_ro("bits", [](const T& c) { return spec_to_py(c.key_spec().bits, c.value_spec().bits); },
                   "The bits, or ``(keys, values)`` when they differ.")
      .def_prop_ro("nbytes", &T::nbytes, "Bytes held by the quantized buffers.")
      .def("empty", &T::empty, "True before the first update.")
      .def("size", &T::size, "Tokens the cache holds per row (the write position).")
      .def("is_trimmable", &T::is_trimmable, "Whether ``trim`` can drop tokens.")
      .def("trim", [](T& c, nb::handle n) { return c.trim(count_arg(c.name(), n)); }, "n"_a,
           nb::sig("def trim(self, n: int) -> int"),
           "Drop up to ``n`` tokens from the end; returns how many were dropped.")
      .def("finalize", &T::finalize, "Roll right-padded rows to end at the write position.")
      .def("filter",
           [](T& c, nb::handle idx) { c.filter(int_list_required("filter", "batch_indices", idx)); },
           "batch_indices"_a, "Keep only these rows, in place.")
      .def("extend", [](T& c, nb::handle other) { c.extend(other_param<T>(other, c.name())); },
           "other"_a, nb::sig("def extend(self, other: typing.Self) -> None"),
           "Append the other cache's rows (quantized alike), in place.")
      .def("_assign", [](T& self, const T& other) { self = other; }, "other"_a,
           "Take other's contents (a staged copy), as one step.")
      .def("__repr__", [](nb::handle self) {
        const T& c = *nb::inst_ptr<T>(self);
        return nb::cast<std::string>(nb::str(self.type().attr("__name__"))) +
            "(batch=" + std::to_string(c.offset().size()) + ", _idx=" + std::to_string(c.idx()) +
            ", bits=" + nb::cast<std::string>(nb::repr(spec_to_py(c.key_spec().bits, c.value_spec().bits))) + ")";
      })
      .def("__copy__", [](nb::handle self) { return copy_instance<T>(self, nb::handle()); })
      .def("__deepcopy__", [](nb::handle self, nb::handle memo) {
        return copy_instance<T>(self, memo);
      }, "memo"_a);
}

} // namespace

void bind_quantized_batch(nb::module_& m) {
  using QB = QuantizedBatchKVCache;
  auto qb = nb::class_<QB>(
      m, "QuantizedBatchKVCache", nb::dynamic_attr(),
      "BatchKVCache holding keys and values quantized by ``mx.quantize``.");
  qb.def("__init__",
         [](QB* self, nb::handle left_padding, nb::handle group_size, nb::handle bits,
            nb::handle scheme, nb::handle window, nb::handle sink) {
           constexpr const char* ctx = "QuantizedBatchKVCache";
           auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
           auto sc = scheme_arg(ctx, scheme);
           new (self) PyCache<QB>(int_list_required(ctx, "left_padding", left_padding), ks, vs, sc,
                                  window_arg(ctx, sc, window), int_arg(ctx, "sink", sink));
         },
         "left_padding"_a, "group_size"_a = 64, "bits"_a = 8, nb::kw_only(), "scheme"_a = "affine",
         "window"_a.none() = nb::none(), "sink"_a = 0,
         nb::sig("def __init__(self, left_padding: list[int], group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None"),
         R"pbdoc(
           Args:
               left_padding (list[int]): Pad tokens before each row's prompt.
               group_size (int | tuple): 32, 64 or 128, or ``(keys, values)``.
               bits (int | tuple): 2, 3, 4, 5, 6 or 8, or ``(keys, values)``.
               scheme (str): ``"affine"`` or ``"rotated-channel"`` (as
                 QuantizedKVCache's; key groups run along buffer positions
                 shared by all rows).
               window (int, optional): ``"rotated-channel"``: tokens kept in
                 float (default 128).
               sink (int): ``"rotated-channel"``: each row's first tokens kept
                 in float too (as QuantizedKVCache's).
         )pbdoc");
  def_quantized_batch_api(qb);
  qb.def_prop_ro("scheme", [](const QB& c) { return scheme_name(c.scheme()); },
                 "``\"affine\"`` or ``\"rotated-channel\"``.")
      .def_prop_ro("window", &QB::window,
                   "``\"rotated-channel\"``: the newest positions kept in float (0 for affine).")
      .def_prop_ro("sink", &QB::sink, "``\"rotated-channel\"``: each row's first tokens kept in float (0: none).")
      .def_prop_ro("sink_keys", [](const QB& c) { return to_py(c.sink_keys()); },
                   "Each row's first tokens' keys, rotated, in float ``(B, H, sink, D)``, or None.")
      .def_prop_ro("sink_values", [](const QB& c) { return to_py(c.sink_values()); },
                   "Their values, rotated, in float, or None.")
      .def_prop_ro("residual", [](const QB& c) { return to_py(c.residual()); },
                   "``\"rotated-channel\"``: the float keys of the newest positions, rotated, or None.")
      .def_prop_ro("value_residual", [](const QB& c) { return to_py(c.value_residual()); },
                   "``\"rotated-channel\"``: their values, rotated, in float, or None.");
  qb.def("prepare",
         [](QB& c, nb::handle left_padding, nb::handle lengths, nb::handle right_padding) {
           constexpr const char* ctx = "QuantizedBatchKVCache.prepare";
           c.prepare(int_list(ctx, "left_padding", left_padding),
                     int_list(ctx, "right_padding", right_padding));
         },
         nb::kw_only(), "left_padding"_a.none() = nb::none(), "lengths"_a.none() = nb::none(),
         "right_padding"_a.none() = nb::none(), "As BatchKVCache.prepare.")
      .def("make_mask",
           [](const QB& c, nb::handle N, bool return_array, nb::kwargs kw) {
             constexpr const char* ctx = "QuantizedBatchKVCache.make_mask";
             nb::handle w = kw.contains("window_size") ? nb::handle(kw["window_size"]) : nb::none();
             return c.make_mask(int_arg(ctx, "N", N), return_array, opt_int_arg(ctx, "window_size", w));
           },
           "N"_a, "return_array"_a = false, "kwargs"_a,
           nb::sig("def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mlx.core.array"),
           "The attention mask for ``N`` new tokens, as BatchKVCache's.")
      .def("extract",
           [](const QB& c, nb::handle idx) {
             return make_instance<QuantizedKVCache>(
                 nb::module_::import_("kvcore").attr("QuantizedKVCache"),
                 c.extract(int_arg("QuantizedBatchKVCache.extract", "idx", idx)));
           },
           "idx"_a, "Row ``idx`` as a QuantizedKVCache holding only its tokens.")
      .def_prop_rw(
          "state",
          [](const QB& c) {
            nb::tuple out = nb::make_tuple(
                to_py(c.keys()), to_py(c.values()), c.offset(), c.left_padding(), c.idx(),
                spec_to_py(c.key_spec().group_size, c.value_spec().group_size),
                spec_to_py(c.key_spec().bits, c.value_spec().bits));
            if (c.scheme() == QuantScheme::affine) {
              return out;
            }
            out = nb::tuple(out + nb::make_tuple(scheme_name(c.scheme()), c.window(),
                                                 to_py(c.residual()), to_py(c.value_residual())));
            if (c.sink() == 0) {
              return out;
            }
            return nb::tuple(out + nb::make_tuple(c.sink(), to_py(c.sink_keys()), to_py(c.sink_values())));
          },
          [](QB& c, nb::handle v) {
            constexpr const char* ctx = "QuantizedBatchKVCache.state";
            const size_t n = PySequence_Check(v.ptr()) && !nb::isinstance<nb::str>(v) ? nb::len(v) : 0;
            const bool scheme = n == 11 || n == 14, sink = n == 14;
            StateReader r(ctx, v, sink ? 14 : (scheme ? 11 : 7));
            nb::tuple t(v);
            auto [ks, vs] = quant_specs_arg(ctx, t[5], t[6]);
            auto keys = quantized_from_py(ctx, "keys", t[0]);
            auto values = quantized_from_py(ctx, "values", t[1]);
            auto offset = array_arg(ctx, "offset", t[2]);
            auto left_padding = array_arg(ctx, "left_padding", t[3]);
            if (!scheme) {
              c.set(std::move(keys), std::move(values), offset, left_padding, r.integer(4, "_idx"), ks, vs);
              return;
            }
            if (scheme_arg(ctx, t[7]) != QuantScheme::rotated_channel) {
              throw ValueError(ctx, "scheme 'rotated-channel' in an 11-item state",
                               nb::cast<std::string>(nb::repr(t[7])));
            }
            c.set(std::move(keys), std::move(values), offset, left_padding, r.integer(4, "_idx"),
                  r.array(9, "residual"), r.array(10, "value residual"), ks, vs, r.integer(8, "window"),
                  sink ? r.integer(11, "sink") : 0, sink ? r.array(12, "sink keys") : std::nullopt,
                  sink ? r.array(13, "sink values") : std::nullopt);
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, left_padding, _idx, group_size, bits)``; keys and values "
          "are triples. A ``\"rotated-channel\"`` cache adds ``(scheme, window, residual keys, "
          "residual values)``, and with a sink ``(sink, sink keys, sink values)``.");
  def_from_state<QB>(qb, "Build a cache from ``state`` without calling __init__.",
                     std::vector<int>{}, QuantSpec{64, 8}, QuantSpec{64, 8});
  auto merge_qb = [](nb::handle type, nb::handle caches) {
    return make_instance<QB>(type, QB::merge(cache_list_arg<QuantizedKVCache>(
                                       "QuantizedBatchKVCache.merge", "QuantizedKVCache", caches)));
  };
  set_merge(qb, nb::cpp_function(
      merge_qb, nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[QuantizedKVCache]) -> QuantizedBatchKVCache"),
      "One batch cache from QuantizedKVCaches quantized alike, left-padded."));

  using QR = QuantizedBatchRotatingKVCache;
  auto qr = nb::class_<QR>(
      m, "QuantizedBatchRotatingKVCache", nb::dynamic_attr(),
      "BatchRotatingKVCache holding keys and values quantized by ``mx.quantize``.");
  qr.def("__init__",
         [](QR* self, nb::handle max_size, nb::handle left_padding, nb::handle group_size,
            nb::handle bits, nb::handle scheme, nb::handle window) {
           constexpr const char* ctx = "QuantizedBatchRotatingKVCache";
           auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
           auto sc = scheme_arg(ctx, scheme);
           new (self) PyCache<QR>(int_arg(ctx, "max_size", max_size),
                                  int_list_required(ctx, "left_padding", left_padding), ks, vs, sc,
                                  window_arg(ctx, sc, window));
         },
         "max_size"_a, "left_padding"_a, "group_size"_a = 64, "bits"_a = 8, nb::kw_only(),
         "scheme"_a = "affine", "window"_a.none() = nb::none(),
         nb::sig("def __init__(self, max_size: int, left_padding: list[int], group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', window: int | None = None) -> None"),
         R"pbdoc(
           Args:
               max_size (int): Slots in each row's window.
               left_padding (list[int]): Pad tokens before each row's prompt.
               group_size (int | tuple): 32, 64 or 128, or ``(keys, values)``.
               bits (int | tuple): 2, 3, 4, 5, 6 or 8, or ``(keys, values)``.
               scheme (str): ``"affine"`` (a ring of ``mx.quantize``
                 triples) or ``"rotated-channel"`` (as QuantizedBatchKVCache's,
                 the whole groups the window has left behind dropped from the
                 front; no sink).
               window (int, optional): ``"rotated-channel"``: positions kept
                 in float (default 128).
         )pbdoc");
  def_quantized_batch_api(qr);
  qr.def("prepare",
         [](QR& c, nb::handle left_padding, nb::handle lengths, nb::handle right_padding) {
           constexpr const char* ctx = "QuantizedBatchRotatingKVCache.prepare";
           c.prepare(int_list(ctx, "left_padding", left_padding), int_list(ctx, "lengths", lengths),
                     int_list(ctx, "right_padding", right_padding));
         },
         nb::kw_only(), "left_padding"_a.none() = nb::none(), "lengths"_a.none() = nb::none(),
         "right_padding"_a.none() = nb::none(), "As BatchRotatingKVCache.prepare.")
      .def("make_mask",
           [](const QR& c, nb::handle N, nb::handle window_size, bool return_array) {
             constexpr const char* ctx = "QuantizedBatchRotatingKVCache.make_mask";
             return c.make_mask(int_arg(ctx, "N", N), return_array,
                                opt_int_arg(ctx, "window_size", window_size));
           },
           "N"_a, "window_size"_a.none() = nb::none(), "return_array"_a = false,
           nb::sig("def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array"),
           "The attention mask for ``N`` new tokens, as BatchRotatingKVCache's.")
      .def_prop_ro("max_size", &QR::max_size, "Slots in each row's window.")
      .def_prop_ro("scheme", [](const QR& c) { return scheme_name(c.scheme()); },
                   "``\"affine\"`` or ``\"rotated-channel\"``.")
      .def_prop_ro("window", &QR::window, "``\"rotated-channel\"``: positions kept in float (0 for affine).")
      .def_prop_ro("sink", [](const QR&) { return 0; }, "0: a batch of sliding windows has no sink.")
      .def_prop_ro("sink_keys", [](const QR&) { return nb::none(); }, "None (no sink).")
      .def_prop_ro("sink_values", [](const QR&) { return nb::none(); }, "None (no sink).")
      .def_prop_ro("residual", [](const QR& c) { return to_py(c.residual()); },
                   "``\"rotated-channel\"``: the newest keys, rotated, in float, or None.")
      .def_prop_ro("value_residual", [](const QR& c) { return to_py(c.value_residual()); },
                   "``\"rotated-channel\"``: the same positions' values, rotated, in float, or None.")
      .def_prop_ro("_offset", &QR::offset_in_ring, "Tokens written since the start.")
      .def_prop_ro("rotated", &QR::rotated, "Whether the ring has wrapped.")
      .def("extract",
           [](const QR& c, nb::handle idx) {
             return make_instance<QuantizedRotatingKVCache>(
                 nb::module_::import_("kvcore").attr("QuantizedRotatingKVCache"),
                 c.extract(int_arg("QuantizedBatchRotatingKVCache.extract", "idx", idx)));
           },
           "idx"_a, "Row ``idx`` as a QuantizedRotatingKVCache.")
      .def_prop_rw(
          "state",
          [](const QR& c) {
            nb::tuple out = nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(), c.left_padding(),
                                           c.max_size(), c.offset_in_ring(), c.idx(), c.rotated(),
                                           spec_to_py(c.key_spec().group_size, c.value_spec().group_size),
                                           spec_to_py(c.key_spec().bits, c.value_spec().bits));
            if (c.scheme() == QuantScheme::affine) {
              return out;
            }
            return nb::tuple(out + nb::make_tuple(scheme_name(c.scheme()), c.window(), to_py(c.residual()),
                                                  to_py(c.value_residual())));
          },
          [](QR& c, nb::handle v) {
            constexpr const char* ctx = "QuantizedBatchRotatingKVCache.state";
            const size_t n = PySequence_Check(v.ptr()) && !nb::isinstance<nb::str>(v) ? nb::len(v) : 0;
            const bool scheme = n == 14;
            StateReader r(ctx, v, scheme ? 14 : 10);
            nb::tuple t(v);
            nb::handle rot = t[7];
            if (!PyBool_Check(rot.ptr()) && !PyLong_Check(rot.ptr())) {
              throw ValueError(ctx, "rotated as a bool", nb::cast<std::string>(nb::repr(rot)));
            }
            auto [ks, vs] = quant_specs_arg(ctx, t[8], t[9]);
            auto keys = quantized_from_py(ctx, "keys", t[0]);
            auto values = quantized_from_py(ctx, "values", t[1]);
            if (!scheme) {
              c.set(std::move(keys), std::move(values), array_arg(ctx, "offset", t[2]),
                    array_arg(ctx, "left_padding", t[3]), r.integer(4, "max_size"), r.integer(5, "_offset"),
                    r.integer(6, "_idx"), PyObject_IsTrue(rot.ptr()) == 1, ks, vs);
              return;
            }
            if (PyObject_IsTrue(rot.ptr()) == 1) {
              throw ValueError(ctx, "rotated False for the rotated-channel scheme", "True");
            }
            if (scheme_arg(ctx, t[10]) != QuantScheme::rotated_channel) {
              throw ValueError(ctx, "scheme 'rotated-channel' in a 14-item state",
                               nb::cast<std::string>(nb::repr(t[10])));
            }
            ChannelBatch held(std::vector<int>{}, ks, vs, 0);
            try {
              held.set(std::move(keys), std::move(values), array_arg(ctx, "offset", t[2]),
                       array_arg(ctx, "left_padding", t[3]), r.integer(6, "_idx"), r.array(12, "residual"),
                       r.array(13, "value residual"), ks, vs, r.integer(11, "window"));
            } catch (const CacheError& e) {
              rethrow_from(e, ctx);
            }
            c.set_channel(std::move(held), r.integer(4, "max_size"), r.integer(5, "_offset"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, left_padding, max_size, _offset, _idx, rotated, "
          "group_size, bits)``; keys and values are triples. A ``\"rotated-channel\"`` cache adds "
          "``(scheme, window, residual keys, residual values)``.");
  def_from_state<QR>(qr, "Build a cache from ``state`` without calling __init__.", 1,
                     std::vector<int>{}, QuantSpec{64, 8}, QuantSpec{64, 8});
  auto merge_qr = [](nb::handle type, nb::handle caches) {
    return make_instance<QR>(type, QR::merge(cache_list_arg<QuantizedRotatingKVCache>(
                                       "QuantizedBatchRotatingKVCache.merge",
                                       "QuantizedRotatingKVCache", caches)));
  };
  set_merge(qr, nb::cpp_function(
      merge_qr, nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[QuantizedRotatingKVCache]) -> QuantizedBatchRotatingKVCache"),
      "One batch cache from QuantizedRotatingKVCaches quantized alike."));

  // The float batch caches' to_quantized, and the single caches' merge
  // into the quantized batch caches (as BatchGenerator calls them).
  nb::object b_cls = m.attr("BatchKVCache"), r_cls = m.attr("BatchRotatingKVCache");
  nb::object q_cls = m.attr("QuantizedKVCache"), qrot_cls = m.attr("QuantizedRotatingKVCache");
  nb::setattr(b_cls, "to_quantized", nb::cpp_function(
      [qb](const BatchKVCache& c, nb::handle group_size, nb::handle bits, nb::handle scheme,
           nb::handle window, nb::handle sink) {
        constexpr const char* ctx = "BatchKVCache.to_quantized";
        auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
        auto sc = scheme_arg(ctx, scheme);
        return make_instance<QB>(
            qb, to_quantized(c, ks, vs, sc, window_arg(ctx, sc, window), int_arg(ctx, "sink", sink)));
      },
      nb::is_method(), nb::name("to_quantized"), "group_size"_a = 64, "bits"_a = 4, nb::kw_only(),
      "scheme"_a = "affine", "window"_a.none() = nb::none(), "sink"_a = 0,
      nb::sig("def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedBatchKVCache"),
      "The same rows and padding with keys and values quantized (``scheme``, ``window`` and "
      "``sink`` as QuantizedKVCache's)."));
  nb::setattr(r_cls, "to_quantized", nb::cpp_function(
      [qr](const BatchRotatingKVCache& c, nb::handle group_size, nb::handle bits, nb::handle scheme,
           nb::handle window, nb::handle sink) {
        constexpr const char* ctx = "BatchRotatingKVCache.to_quantized";
        auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
        auto sc = scheme_arg(ctx, scheme);
        const int w = window_arg(ctx, sc, window), n = int_arg(ctx, "sink", sink);
        check_sink(ctx, sc, n);
        if (n > 0) {
          throw ValueError(ctx, "no sink (a batch of sliding windows pins no first tokens)",
                           "sink " + std::to_string(n));
        }
        return make_instance<QR>(qr, to_quantized(c, ks, vs, sc, w));
      },
      nb::is_method(), nb::name("to_quantized"), "group_size"_a = 64, "bits"_a = 4, nb::kw_only(),
      "scheme"_a = "affine", "window"_a.none() = nb::none(), "sink"_a = 0,
      nb::sig("def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedBatchRotatingKVCache"),
      "The same rows, ring and padding with keys and values quantized (``scheme`` and "
      "``window`` as QuantizedBatchRotatingKVCache's; no sink)."));
  set_merge(q_cls, nb::cpp_function(
      [qb](nb::handle, nb::handle caches) {
        return make_instance<QB>(qb, QB::merge(cache_list_arg<QuantizedKVCache>(
                                         "QuantizedKVCache.merge", "QuantizedKVCache", caches)));
      },
      nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[QuantizedKVCache]) -> QuantizedBatchKVCache"),
      "A QuantizedBatchKVCache holding these caches as rows."));
  set_merge(qrot_cls, nb::cpp_function(
      [qr](nb::handle, nb::handle caches) {
        return make_instance<QR>(qr, QR::merge(cache_list_arg<QuantizedRotatingKVCache>(
                                         "QuantizedRotatingKVCache.merge",
                                         "QuantizedRotatingKVCache", caches)));
      },
      nb::name("merge"), "cls"_a, "caches"_a,
      nb::sig("def merge(cls, caches: list[QuantizedRotatingKVCache]) -> QuantizedBatchRotatingKVCache"),
      "A QuantizedBatchRotatingKVCache holding these caches as rows."));
}

} // namespace kvcore::py
