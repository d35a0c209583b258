// KVCache, ConcatenateKVCache and RotatingKVCache.
#include "common.h"
#include "kvcore/kv.h"
#include "kvcore/quantized.h"
#include "kvcore/rotating.h"
#include "kvcore/quantized_rotating.h"

namespace kvcore::py {

namespace {

constexpr const char* kMaskDoc = R"pbdoc(
  The attention mask for ``N`` new tokens.

  Args:
      N (int): Number of new tokens.
      return_array (bool): Return an array even where ``"causal"`` would do.
      window_size (int, optional): Sliding-window width.

  Returns:
      array | str | None: A boolean mask, ``"causal"`` or ``None``.
)pbdoc";

} // namespace

void bind_kv(nb::module_& m) {
  auto kv = nb::class_<KVCache>(
      m, "KVCache", nb::dynamic_attr(),
      "Full-attention cache: a buffer grown ``step`` slots at a time.");
  kv.def("__init__",
         [](KVCache* self, nb::handle capacity) {
           if (capacity.is_none()) {
             new (self) PyCache<KVCache>();
           } else {
             new (self) PyCache<KVCache>(int_arg("KVCache", "capacity", capacity));
           }
         },
         nb::kw_only(), "capacity"_a.none() = nb::none(),
         nb::sig("def __init__(self, *, capacity: int | None = None) -> None"),
         R"pbdoc(
           Args:
               capacity (int, optional): Tokens to allocate room for at the
                 first update, so that filling up to it never copies the
                 buffer (a long prefill then peaks at the cache's own size).
                 Past it, the cache grows by ``step`` as without.
         )pbdoc");
  def_sequence_api(kv);
  kv.def("make_mask",
         [](const KVCache& c, nb::handle N, bool return_array, nb::handle window_size) {
           return c.make_mask(int_arg("KVCache.make_mask", "N", N), return_array,
                              opt_int_arg("KVCache.make_mask", "window_size", window_size));
         },
         "N"_a, nb::kw_only(), "return_array"_a = false, "window_size"_a.none() = nb::none(),
         nb::sig("def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None"),
         kMaskDoc)
      .def_prop_rw(
          "state",
          [](const KVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset());
          },
          [](KVCache& c, nb::handle v) {
            StateReader r("KVCache.state", v, 3);
            c.set(r.array(0, "keys"), r.array(1, "values"), r.integer(2, "offset"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset)``; the buffers are whole, as mlx-lm keeps them.");
  kv.def("to_quantized",
         [](nb::handle self, nb::handle group_size, nb::handle bits, nb::handle scheme,
            nb::handle window, nb::handle sink) {
           constexpr const char* ctx = "KVCache.to_quantized";
           auto& c = *nb::inst_ptr<KVCache>(self);
           auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
           auto sc = scheme_arg(ctx, scheme);
           int w = window_arg(ctx, sc, window);
           nb::object cls = nb::module_::import_("kvcore").attr("QuantizedKVCache");
           return make_instance<QuantizedKVCache>(cls, to_quantized(c, ks, vs, sc, w, int_arg(ctx, "sink", sink)));
         },
         "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "scheme"_a = "affine",
         "window"_a.none() = nb::none(), "sink"_a = 0,
         nb::sig("def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedKVCache"),
         R"pbdoc(
           The same tokens in a QuantizedKVCache.

           Args:
               group_size (int | tuple): Quantization group size, or
                 ``(keys, values)``.
               bits (int | tuple): Bits per element, or ``(keys, values)``
                 such as ``(8, 4)``.
               scheme (str): ``"affine"`` (mlx-lm's) or ``"rotated-channel"``
                 (see QuantizedKVCache).
               window (int, optional): ``"rotated-channel"``: tokens kept in
                 float (default 128).
               sink (int): ``"rotated-channel"``: first tokens kept in float
                 too (see QuantizedKVCache).

           Returns:
               QuantizedKVCache: With this cache's offset and quantized buffers.
         )pbdoc");
  def_from_state<KVCache>(kv, "Build a cache from ``state`` without calling __init__.");

  auto cat = nb::class_<ConcatenateKVCache>(
      m, "ConcatenateKVCache", nb::dynamic_attr(),
      "Full-attention cache that concatenates on every update.");
  cat.def("__init__", [](ConcatenateKVCache* self) {
    new (self) PyCache<ConcatenateKVCache>();
  });
  def_sequence_api(cat);
  cat.def("make_mask",
          [](const ConcatenateKVCache& c, nb::handle N, bool return_array,
             nb::handle window_size) {
            constexpr const char* ctx = "ConcatenateKVCache.make_mask";
            return c.make_mask(int_arg(ctx, "N", N), return_array,
                               opt_int_arg(ctx, "window_size", window_size));
          },
          "N"_a, nb::kw_only(), "return_array"_a = false, "window_size"_a.none() = nb::none(),
          nb::sig("def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None"),
          kMaskDoc)
      .def_prop_rw(
          "state",
          [](const ConcatenateKVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()));
          },
          [](ConcatenateKVCache& c, nb::handle v) {
            StateReader r("ConcatenateKVCache.state", v, 2);
            c.set(r.array(0, "keys"), r.array(1, "values"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values)``.");
  def_from_state<ConcatenateKVCache>(
      cat, "Build a cache from ``state`` without calling __init__.");

  auto rot = nb::class_<RotatingKVCache>(
      m, "RotatingKVCache", nb::dynamic_attr(),
      "Sliding-window cache: a ring of ``max_size`` slots, the first ``keep`` pinned.");
  rot.def("__init__",
          [](RotatingKVCache* self, nb::handle max_size, nb::handle keep) {
            new (self) PyCache<RotatingKVCache>(
                int_arg("RotatingKVCache", "max_size", max_size),
                int_arg("RotatingKVCache", "keep", keep));
          },
          "max_size"_a, "keep"_a = 0,
          nb::sig("def __init__(self, max_size: int, keep: int = 0) -> None"),
          R"pbdoc(
            Args:
                max_size (int): Slots in the ring (the window), at least 1.
                keep (int): Leading tokens never rotated out, below max_size.
          )pbdoc");
  def_sequence_api(rot);
  rot.def("make_mask",
          [](const RotatingKVCache& c, nb::handle N, nb::handle window_size,
             bool return_array) {
            constexpr const char* ctx = "RotatingKVCache.make_mask";
            return c.make_mask(int_arg(ctx, "N", N), return_array,
                               opt_int_arg(ctx, "window_size", window_size));
          },
          "N"_a, "window_size"_a.none() = nb::none(), "return_array"_a = false,
          nb::sig("def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array | str | None"), kMaskDoc)
      .def_prop_rw("keep", &RotatingKVCache::keep,
                   [](RotatingKVCache& c, nb::handle v) {
                     c.set_keep(int_arg("RotatingKVCache.keep", "keep", v));
                   },
                   "Leading tokens that are never rotated out.")
      .def_prop_rw("_idx", &RotatingKVCache::idx,
                   [](RotatingKVCache& c, nb::handle v) {
                     c.set_idx(int_arg("RotatingKVCache._idx", "_idx", v));
                   },
                   "The ring cursor: where the next single token goes.")
      .def("to_quantized",
           [](nb::handle self, nb::handle group_size, nb::handle bits, nb::handle scheme,
              nb::handle window, nb::handle sink) {
             constexpr const char* ctx = "RotatingKVCache.to_quantized";
             auto& c = *nb::inst_ptr<RotatingKVCache>(self);
             auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
             auto sc = scheme_arg(ctx, scheme);
             int w = window_arg(ctx, sc, window);
             nb::object cls = nb::module_::import_("kvcore").attr("QuantizedRotatingKVCache");
             return make_instance<QuantizedRotatingKVCache>(
                 cls, to_quantized(c, ks, vs, sc, w, int_arg(ctx, "sink", sink)));
           },
           "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "scheme"_a = "affine",
           "window"_a.none() = nb::none(), "sink"_a = 0,
           nb::sig("def to_quantized(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> QuantizedRotatingKVCache"),
           R"pbdoc(
             The same ring (offset, cursor, window), each slot quantized.
             mlx-lm raises NotImplementedError here.

             Args:
                 group_size (int | tuple): Group size, or ``(keys, values)``.
                 bits (int | tuple): Bits, or ``(keys, values)``, e.g. ``(8, 4)``.
                 scheme (str): ``"affine"`` or ``"rotated-channel"`` (see
                   QuantizedRotatingKVCache).
                 window (int, optional): ``"rotated-channel"``: tokens kept
                   in float (default 128).
                 sink (int): ``"rotated-channel"``: first tokens kept in
                   float too, at most ``keep``.

             Returns:
                 QuantizedRotatingKVCache: With this cache's tokens.
           )pbdoc")
      .def_prop_rw(
          "state",
          [](const RotatingKVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(),
                                  c.keep(), c.max_size(), c.idx());
          },
          [](RotatingKVCache& c, nb::handle v) {
            StateReader r("RotatingKVCache.state", v, 6);
            c.set(r.array(0, "keys"), r.array(1, "values"), r.integer(2, "offset"),
                  r.integer(3, "keep"), r.integer(4, "max_size"), r.integer(5, "_idx"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, keep, max_size, _idx)``.");
  rot.def_prop_rw("max_size", &RotatingKVCache::max_size,
                  [](RotatingKVCache& c, nb::handle v) {
                    c.set_max_size(int_arg("RotatingKVCache.max_size", "max_size", v));
                  },
                  "Slots in the ring.");
  def_from_state<RotatingKVCache>(
      rot, "Build a cache from ``state`` without calling __init__.", 1, 0);
}

} // namespace kvcore::py
