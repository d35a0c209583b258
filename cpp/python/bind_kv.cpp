// KVCache, ConcatenateKVCache and RotatingKVCache.
#include "common.h"
#include "kvcore/kv.h"
#include "kvcore/rotating.h"

namespace kvcore::py {

namespace {

constexpr const char* kUpdateDoc = R"pbdoc(
  Append new keys and values and return all the cached ones.

  Args:
      keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
      values (array): ``(B, n_kv_heads, S, v_head_dim)``.

  Returns:
      tuple(array, array): The cached keys and values, new ones included.
)pbdoc";

constexpr const char* kMaskDoc = R"pbdoc(
  The attention mask for ``N`` new tokens.

  Args:
      N (int): Number of new tokens.
      return_array (bool): Return an array even where ``"causal"`` would do.
      window_size (int, optional): Sliding-window width.

  Returns:
      array | str | None: A boolean mask, ``"causal"`` or ``None``.
)pbdoc";

// What every keys/values cache shows Python.
template <class T>
void def_sequence_api(nb::class_<T>& cls) {
  cls.attr("step") = SequenceCache::default_step;
  cls.def("update_and_fetch", &T::update_and_fetch, "keys"_a, "values"_a,
          nb::sig("def update_and_fetch(self, keys: mlx.core.array, values: "
                  "mlx.core.array) -> tuple[mlx.core.array, mlx.core.array]"),
          kUpdateDoc)
      .def("keys_and_values", &T::keys_and_values,
           "The cached keys and values, up to ``offset``.")
      .def_prop_rw(
          "offset", &T::offset, &T::set_offset,
          "Tokens seen so far: the position of the next token.")
      .def_prop_rw(
          "keys", &T::keys, [](T& c, OptionalArray a) { c.set_keys(std::move(a)); },
          nb::arg("keys").none(), "The keys buffer, or None before the first update.")
      .def_prop_rw(
          "values", &T::values,
          [](T& c, OptionalArray a) { c.set_values(std::move(a)); },
          nb::arg("values").none(),
          "The values buffer, or None before the first update.")
      .def_prop_ro("nbytes", &T::nbytes, "Bytes held by the keys and values.")
      .def("empty", &T::empty, "True before the first update.")
      .def("size", &T::size, "Tokens the cache holds.")
      .def("is_trimmable", &T::is_trimmable, "Whether ``trim`` can drop tokens.")
      .def("trim", &T::trim, "n"_a,
           "Drop up to ``n`` tokens from the end; returns how many were dropped.")
      .def("__copy__", [](nb::handle self) { return copy_instance<T>(self, nb::handle()); })
      .def("__deepcopy__", [](nb::handle self, nb::handle memo) {
        return copy_instance<T>(self, memo);
      }, "memo"_a);
}

} // namespace

void bind_kv(nb::module_& m) {
  auto kv = nb::class_<KVCache>(
      m, "KVCache", nb::dynamic_attr(),
      "Full-attention cache: a buffer grown ``step`` slots at a time.");
  kv.def("__init__", [](KVCache* self) { new (self) PyCache<KVCache>(); });
  def_sequence_api(kv);
  kv.def("make_mask",
         [](const KVCache& c, int N, bool return_array, std::optional<int> window_size) {
           return c.make_mask(N, return_array, window_size);
         },
         "N"_a, nb::kw_only(), "return_array"_a = false, "window_size"_a = nb::none(),
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
          "``(keys, values, offset)``; the buffers are whole, as mlx-lm keeps them.");
  def_from_state<KVCache>(kv, "Build a cache from ``state`` without calling __init__.");

  auto cat = nb::class_<ConcatenateKVCache>(
      m, "ConcatenateKVCache", nb::dynamic_attr(),
      "Full-attention cache that concatenates on every update.");
  cat.def("__init__", [](ConcatenateKVCache* self) {
    new (self) PyCache<ConcatenateKVCache>();
  });
  def_sequence_api(cat);
  cat.def("make_mask",
          [](const ConcatenateKVCache& c, int N, bool return_array,
             std::optional<int> window_size) {
            return c.make_mask(N, return_array, window_size);
          },
          "N"_a, nb::kw_only(), "return_array"_a = false, "window_size"_a = nb::none(),
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
          "``(keys, values)``.");
  def_from_state<ConcatenateKVCache>(
      cat, "Build a cache from ``state`` without calling __init__.");

  auto rot = nb::class_<RotatingKVCache>(
      m, "RotatingKVCache", nb::dynamic_attr(),
      "Sliding-window cache: a ring of ``max_size`` slots, the first ``keep`` pinned.");
  rot.def("__init__",
          [](RotatingKVCache* self, int max_size, int keep) {
            new (self) PyCache<RotatingKVCache>(max_size, keep);
          },
          "max_size"_a, "keep"_a = 0,
          R"pbdoc(
            Args:
                max_size (int): Slots in the ring (the window), at least 1.
                keep (int): Leading tokens never rotated out, below max_size.
          )pbdoc");
  def_sequence_api(rot);
  rot.def("make_mask",
          [](const RotatingKVCache& c, int N, std::optional<int> window_size,
             bool return_array) { return c.make_mask(N, return_array, window_size); },
          "N"_a, "window_size"_a = nb::none(), "return_array"_a = false, kMaskDoc)
      .def_prop_rw("keep", &RotatingKVCache::keep, &RotatingKVCache::set_keep,
                   "Leading tokens that are never rotated out.")
      .def_prop_rw("_idx", &RotatingKVCache::idx, &RotatingKVCache::set_idx,
                   "The ring cursor: where the next single token goes.")
      .def("to_quantized",
           [](const RotatingKVCache&, int, int) -> nb::object {
             throw NotImplementedError(
                 "RotatingKVCache.to_quantized", "RotatingKVCache Quantization NYI");
           },
           "group_size"_a = 64, "bits"_a = 4, "Not available for a rotating cache.")
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
          "``(keys, values, offset, keep, max_size, _idx)``.");
  rot.def_prop_rw("max_size", &RotatingKVCache::max_size,
                  &RotatingKVCache::set_max_size, "Slots in the ring.");
  def_from_state<RotatingKVCache>(
      rot, "Build a cache from ``state`` without calling __init__.", 1, 0);
}

} // namespace kvcore::py
