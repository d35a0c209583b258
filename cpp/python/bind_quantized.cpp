// QuantizedKVCache and ChunkedKVCache.
#include "common.h"
#include "kvcore/chunked.h"
#include "kvcore/quantized.h"

namespace kvcore::py {

namespace {

nb::object fetched(const QuantizedKVCache& c, const std::pair<QuantizedArrays, QuantizedArrays>& kv) {
  return fetched_kv(c.scheme(), kv, c.residual(), c.value_residual());
}

} // namespace

void bind_quantized(nb::module_& m) {
  auto q = nb::class_<QuantizedKVCache>(
      m, "QuantizedKVCache", nb::dynamic_attr(),
      "Full-attention cache holding keys and values quantized by ``mx.quantize``.");
  q.attr("step") = QuantizedKVCache::default_step;
  q.def("__init__",
        [](QuantizedKVCache* self, nb::handle group_size, nb::handle bits, nb::handle capacity,
           nb::handle scheme, nb::handle window, nb::handle sink) {
          constexpr const char* ctx = "QuantizedKVCache";
          auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
          auto sc = scheme_arg(ctx, scheme);
          auto* c = new (self) PyCache<QuantizedKVCache>(ks, vs, sc, window_arg(ctx, sc, window),
                                                         int_arg(ctx, "sink", sink));
          if (!capacity.is_none()) {
            c->set_capacity(int_arg(ctx, "capacity", capacity));
          }
        },
        "group_size"_a = 64, "bits"_a = 8, nb::kw_only(), "capacity"_a.none() = nb::none(),
        "scheme"_a = "affine", "window"_a.none() = nb::none(), "sink"_a = 0,
        nb::sig("def __init__(self, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, capacity: int | None = None, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None"),
        R"pbdoc(
          Args:
              group_size (int | tuple): Quantization group size (32, 64 or
                128), or a ``(keys, values)`` pair.
              bits (int | tuple): Bits per element (2, 3, 4, 5, 6 or 8), or a
                ``(keys, values)`` pair such as ``(8, 4)``.
              capacity (int, optional): Tokens to allocate room for at the
                first update.
              scheme (str): ``"affine"`` (mlx-lm's layout) or
                ``"rotated-channel"``: keys and values rotated by a Hadamard
                transform of the head dim (a power of two), keys quantized
                per channel over groups of ``group_size`` tokens, values per
                token; the newest ``window`` tokens and the group not yet
                full stay in float.
              window (int, optional): ``"rotated-channel"``: tokens kept in
                float (default 128; 0 keeps only the partial group).
              sink (int): ``"rotated-channel"``: the first tokens (the
                attention sink), kept in float too and read in place of
                their quantized form (0 to 256; 0: none).
        )pbdoc")
      .def("update_and_fetch",
           [](QuantizedKVCache& c, nb::handle keys, nb::handle values) {
             return fetched(c, update_param(c, keys, values));
           },
           "keys"_a, "values"_a,
           nb::sig("def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) "
                   "-> tuple[tuple, tuple]"),
           R"pbdoc(
             Quantize and append new keys and values.

             Args:
                 keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
                 values (array): ``(B, n_kv_heads, S, v_head_dim)``.

             Returns:
                 tuple: The cached ``(weights, scales, biases)`` of the keys
                 and of the values, up to ``offset``. ``"rotated-channel"``:
                 ``(weights, scales, biases, residual)`` for each, the
                 quantized tokens (keys' weights transposed: ``(B, H, D,
                 tokens * bits / 32)``) and the rotated float residual of the
                 newest tokens (or None).
           )pbdoc")
      .def("keys_and_values",
           [](const QuantizedKVCache& c) { return fetched(c, c.keys_and_values()); },
           "The cached keys and values as ``update_and_fetch`` returns them.")
      .def_prop_ro("scheme", [](const QuantizedKVCache& c) { return scheme_name(c.scheme()); },
                   "``\"affine\"`` or ``\"rotated-channel\"``.")
      .def_prop_ro("window", &QuantizedKVCache::window,
                   "``\"rotated-channel\"``: the newest tokens kept in float (0 for affine).")
      .def_prop_ro("sink", &QuantizedKVCache::sink,
                   "``\"rotated-channel\"``: the first tokens kept in float too (0: none).")
      .def_prop_ro("sink_keys", [](const QuantizedKVCache& c) { return to_py(c.sink_keys()); },
                   "The sink's keys, rotated, in float ``(B, H, min(sink, offset), D)``, or None.")
      .def_prop_ro("sink_values", [](const QuantizedKVCache& c) { return to_py(c.sink_values()); },
                   "The sink's values, rotated, in float, or None.")
      .def_prop_ro("residual", [](const QuantizedKVCache& c) { return to_py(c.residual()); },
                   "``\"rotated-channel\"``: the newest keys, rotated, in float, or None.")
      .def_prop_ro("value_residual", [](const QuantizedKVCache& c) { return to_py(c.value_residual()); },
                   "``\"rotated-channel\"``: the same tokens' values, rotated, in float, or None.")
      .def_prop_rw("offset", &QuantizedKVCache::offset,
                   [](QuantizedKVCache& c, nb::handle v) {
                     c.set_offset(int_arg("QuantizedKVCache.offset", "offset", v));
                   },
                   "Tokens seen so far.")
      .def_prop_rw(
          "keys", [](const QuantizedKVCache& c) { return to_py(c.keys()); },
          [](QuantizedKVCache& c, nb::handle h) {
            c.set_keys(quantized_from_py("QuantizedKVCache.keys", "keys", h));
          },
          "The keys' ``(weights, scales, biases)`` buffers, or None.")
      .def_prop_rw(
          "values", [](const QuantizedKVCache& c) { return to_py(c.values()); },
          [](QuantizedKVCache& c, nb::handle h) {
            c.set_values(quantized_from_py("QuantizedKVCache.values", "values", h));
          },
          "The values' ``(weights, scales, biases)`` buffers, or None.")
      .def_prop_ro("group_size",
                   [](const QuantizedKVCache& c) {
                     return spec_to_py(c.key_spec().group_size, c.value_spec().group_size);
                   },
                   "The group size, or ``(keys, values)`` when they differ.")
      .def_prop_ro("bits",
                   [](const QuantizedKVCache& c) {
                     return spec_to_py(c.key_spec().bits, c.value_spec().bits);
                   },
                   "The bits, or ``(keys, values)`` when they differ.")
      .def_prop_rw("capacity", &QuantizedKVCache::capacity,
                   [](QuantizedKVCache& c, nb::handle v) {
                     c.set_capacity(int_arg("QuantizedKVCache", "capacity", v));
                   },
                   "Tokens the buffers get room for when next allocated.")
      .def_prop_ro("nbytes", &QuantizedKVCache::nbytes)
      .def("empty", &QuantizedKVCache::empty)
      .def("size", &QuantizedKVCache::size, "0, as in mlx-lm (the cache does not report it).")
      .def("is_trimmable", &QuantizedKVCache::is_trimmable)
      .def("trim", [](QuantizedKVCache& c, nb::handle n) {
             return c.trim(count_arg("QuantizedKVCache.trim", n));
           }, "n"_a, nb::sig("def trim(self, n: int) -> int"))
      .def("make_mask",
           [](const QuantizedKVCache& c, nb::handle N, bool return_array, nb::handle window_size) {
             constexpr const char* ctx = "QuantizedKVCache.make_mask";
             return c.make_mask(int_arg(ctx, "N", N), return_array,
                                opt_int_arg(ctx, "window_size", window_size));
           },
           "N"_a, nb::kw_only(), "return_array"_a = false, "window_size"_a.none() = nb::none(),
           nb::sig("def make_mask(self, N: int, *, return_array: bool = False, window_size: int | None = None) -> mlx.core.array | str | None"))
      .def_prop_rw(
          "state",
          [](const QuantizedKVCache& c) {
            nb::tuple out = nb::make_tuple(
                to_py(c.keys()), to_py(c.values()), c.offset(),
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
          [](QuantizedKVCache& c, nb::handle v) {
            constexpr const char* ctx = "QuantizedKVCache.state";
            const size_t n = PySequence_Check(v.ptr()) && !nb::isinstance<nb::str>(v) ? nb::len(v) : 0;
            const bool scheme = n == 9 || n == 12, sink = n == 12;
            StateReader r(ctx, v, sink ? 12 : (scheme ? 9 : 5));
            nb::tuple t(v);
            auto keys = quantized_from_py(ctx, "keys", t[0]);
            auto values = quantized_from_py(ctx, "values", t[1]);
            int offset = r.integer(2, "offset");
            auto [ks, vs] = quant_specs_arg(ctx, t[3], t[4]);
            if (!scheme) {
              c.set(std::move(keys), std::move(values), offset, ks, vs);
              return;
            }
            auto sc = scheme_arg(ctx, t[5]);
            c.set(std::move(keys), std::move(values), offset, ks, vs, sc, r.array(7, "residual"),
                  r.array(8, "value residual"), r.integer(6, "window"), sink ? r.integer(9, "sink") : 0,
                  sink ? r.array(10, "sink keys") : std::nullopt, sink ? r.array(11, "sink values") : std::nullopt);
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, group_size, bits)``, keys and values as triples; "
          "a ``\"rotated-channel\"`` cache adds ``(scheme, window, residual keys, residual values)``, "
          "and with a sink ``(sink, sink keys, sink values)``.")
      .def("_assign", [](QuantizedKVCache& self, const QuantizedKVCache& other) { self = other; }, "other"_a,
           "Take other's contents (a staged copy), as one step.")
      .def("__copy__", [](nb::handle self) { return copy_instance<QuantizedKVCache>(self, nb::handle()); })
      .def("__deepcopy__", [](nb::handle self, nb::handle memo) {
        return copy_instance<QuantizedKVCache>(self, memo);
      }, "memo"_a);
  def_from_state<QuantizedKVCache>(q, "Build a cache from ``state`` without calling __init__.", 64, 8);

  auto ch = nb::class_<ChunkedKVCache>(
      m, "ChunkedKVCache", nb::dynamic_attr(),
      "Chunked-attention cache: a KVCache that drops tokens before the current chunk.");
  ch.def("__init__", [](ChunkedKVCache* self, nb::handle chunk_size) {
    new (self) PyCache<ChunkedKVCache>(int_arg("ChunkedKVCache", "chunk_size", chunk_size));
  }, "chunk_size"_a, nb::sig("def __init__(self, chunk_size: int) -> None"));
  def_sequence_api(ch);
  ch.def("maybe_trim_front", &ChunkedKVCache::maybe_trim_front,
         "Keep at most ``chunk_size`` tokens, dropping the oldest.")
      .def_prop_rw("chunk_size", &ChunkedKVCache::chunk_size,
                   [](ChunkedKVCache& c, nb::handle v) {
                     c.set_chunk_size(int_arg("ChunkedKVCache.chunk_size", "chunk_size", v));
                   })
      .def_prop_rw("start_position", &ChunkedKVCache::start_position,
                   [](ChunkedKVCache& c, nb::handle v) {
                     c.set_start_position(
                         int_arg("ChunkedKVCache.start_position", "start_position", v));
                   },
                   "Absolute position of the first token held.")
      .def_prop_rw(
          "state",
          [](const ChunkedKVCache& c) {
            return nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(),
                                  c.chunk_size(), c.start_position());
          },
          [](ChunkedKVCache& c, nb::handle v) {
            StateReader r("ChunkedKVCache.state", v, 5);
            c.set(r.array(0, "keys"), r.array(1, "values"), r.integer(2, "offset"),
                  r.integer(3, "chunk_size"), r.integer(4, "start_position"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, chunk_size, start_position)``.");
  def_from_state<ChunkedKVCache>(ch, "Build a cache from ``state`` without calling __init__.", 1);
}

} // namespace kvcore::py
