// QuantizedRotatingKVCache, and the quantized helpers every quantized
// cache's binding shares.
#include "common.h"
#include "kvcore/attention.h"
#include "kvcore/quantized_rotating.h"

namespace kvcore::py {

nb::object to_py(const OptionalQuantized& q) {
  return q ? nb::cast(*q) : nb::none();
}

OptionalQuantized quantized_from_py(const char* ctx, const char* what, nb::handle h) {
  if (h.is_none()) {
    return std::nullopt;
  }
  StateReader r(ctx, h, 3);
  auto w = r.array(0, what), s = r.array(1, what), b = r.array(2, what);
  if (!w || !s || !b) {
    throw ValueError(ctx, std::string(what) + " as three arrays", "None in the triple");
  }
  return QuantizedArrays{*w, *s, *b};
}

namespace {

std::pair<int, int> int_or_pair(const char* ctx, const char* what, nb::handle h) {
  if (nb::isinstance<nb::tuple>(h) || nb::isinstance<nb::list>(h)) {
    if (nb::len(h) != 2) {
      throw ValueError(ctx, std::string(what) + " as an int or a (keys, values) pair",
                       nb::cast<std::string>(nb::repr(h)));
    }
    return {int_arg(ctx, what, h[0]), int_arg(ctx, what, h[1])};
  }
  int v = int_arg(ctx, what, h);
  return {v, v};
}

} // namespace

std::pair<QuantSpec, QuantSpec> quant_specs_arg(
    const char* ctx,
    nb::handle group_size,
    nb::handle bits) {
  auto [kg, vg] = int_or_pair(ctx, "group_size", group_size);
  auto [kb, vb] = int_or_pair(ctx, "bits", bits);
  std::pair<QuantSpec, QuantSpec> specs{{kg, kb}, {vg, vb}};
  check_specs(ctx, specs.first, specs.second);
  return specs;
}

nb::object spec_to_py(int keys, int values) {
  if (keys == values) {
    return nb::int_(keys);
  }
  return nb::make_tuple(keys, values);
}

nb::object fetched_kv(
    QuantScheme scheme,
    const std::pair<QuantizedArrays, QuantizedArrays>& kv,
    const OptionalArray& residual,
    const OptionalArray& value_residual) {
  const auto& [k, v] = kv;
  if (scheme == QuantScheme::affine) {
    return nb::make_tuple(to_py(OptionalQuantized(k)), to_py(OptionalQuantized(v)));
  }
  return nb::make_tuple(nb::make_tuple(std::get<0>(k), std::get<1>(k), std::get<2>(k), to_py(residual)),
                        nb::make_tuple(std::get<0>(v), std::get<1>(v), std::get<2>(v), to_py(value_residual)));
}

namespace {

nb::object fetched(const QuantizedRotatingKVCache& c, const std::pair<QuantizedArrays, QuantizedArrays>& kv) {
  if (c.scheme() == QuantScheme::affine) {
    return fetched_kv(QuantScheme::affine, kv);
  }
  return fetched_kv(c.scheme(), kv, c.held().residual(), c.held().value_residual());
}

} // namespace

void bind_quantized_rotating(nb::module_& m) {
  m.def(
      "quantized_scaled_dot_product_attention",
      [](const mx::array& queries, nb::handle q_keys, nb::handle q_values, float scale,
         nb::handle mask, nb::handle group_size, nb::handle bits, nb::handle scheme, nb::handle sink) {
        constexpr const char* ctx = "quantized_scaled_dot_product_attention";
        auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
        const QuantScheme sc = scheme_arg(ctx, scheme);
        // Under a scheme with float residuals each side is (w, s, b, residual).
        auto split = [&](const char* what, nb::handle h, OptionalArray& residual) -> nb::object {
          if (sc == QuantScheme::affine) {
            return nb::borrow(h);
          }
          if (!nb::isinstance<nb::tuple>(h) || nb::len(h) != 4) {
            throw ValueError(ctx, std::string(what) + " as (weights, scales, biases, residual) for the " +
                                      scheme_name(sc) + " scheme",
                             nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
          }
          nb::tuple t = nb::borrow<nb::tuple>(h);
          if (!t[3].is_none()) {
            mx::array* r = nullptr;
            if (!nb::try_cast<mx::array*>(t[3], r, false) || r == nullptr) {
              throw ValueError(ctx, std::string(what) + "' residual as an array or None",
                               nb::cast<std::string>(nb::str(t[3].type().attr("__name__"))));
            }
            residual = *r;
          }
          return nb::make_tuple(t[0], t[1], t[2]);
        };
        OptionalArray key_residual, value_residual;
        nb::object key_triple = split("q_keys", q_keys, key_residual);
        nb::object value_triple = split("q_values", q_values, value_residual);
        auto k = quantized_from_py(ctx, "q_keys", key_triple);
        auto v = quantized_from_py(ctx, "q_values", value_triple);
        if (!k || !v) {
          throw ValueError(ctx, "q_keys and q_values as triples", "None");
        }
        Mask m;
        mx::array* a = nullptr;
        if (nb::isinstance<nb::str>(mask)) {
          m = nb::cast<std::string>(mask);
        } else if (nb::try_cast<mx::array*>(mask, a, false) && a != nullptr) {
          m = *a;
        } else if (!mask.is_none()) {
          throw ValueError(ctx, "mask as None, a str or an array",
                           nb::cast<std::string>(nb::str(mask.type().attr("__name__"))));
        }
        std::optional<ChannelSink> cs;
        if (!sink.is_none()) {
          mx::array *sk = nullptr, *sv = nullptr, *st = nullptr;
          if (sc == QuantScheme::affine || !nb::isinstance<nb::tuple>(sink) || nb::len(sink) != 3 ||
              !nb::try_cast<mx::array*>(sink[0], sk, false) || !nb::try_cast<mx::array*>(sink[1], sv, false) ||
              (!sink[2].is_none() && !nb::try_cast<mx::array*>(sink[2], st, false)) || sk == nullptr ||
              sv == nullptr || (!sink[2].is_none() && st == nullptr)) {
            throw ValueError(ctx,
                             "sink as None or (keys, values, starts or None) arrays under the rotated-channel scheme",
                             nb::cast<std::string>(nb::str(sink.type().attr("__name__"))));
          }
          cs = ChannelSink{*sk, *sv, st ? std::optional<mx::array>(*st) : std::nullopt};
        }
        if (sc != QuantScheme::affine) {
          return channel_attention(queries, *k, key_residual, *v, value_residual, scale, m, ks, vs, cs);
        }
        return quantized_attention(queries, *k, *v, scale, m, ks, vs);
      },
      "queries"_a, "q_keys"_a, "q_values"_a, "scale"_a, "mask"_a.none(),
      "group_size"_a = 64, "bits"_a = 8, nb::kw_only(), "scheme"_a = "affine", "sink"_a.none() = nb::none(),
      nb::sig("def quantized_scaled_dot_product_attention(queries: mlx.core.array, q_keys: tuple, q_values: tuple, scale: float, mask: mlx.core.array | str | None, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 8, *, scheme: str = 'affine', sink: tuple | None = None) -> mlx.core.array"),
      R"pbdoc(
        mlx-lm's quantized attention, with keys and values at their own bits.

        Args:
            queries (array): ``(B, n_q_heads, L, D)``.
            q_keys (tuple): The keys' ``(weights, scales, biases)``.
            q_values (tuple): The values' ``(weights, scales, biases)``.
            scale (float): Applied to the queries.
            mask (array | str | None): A boolean or additive mask, or ``"causal"``.
            group_size (int | tuple): The group size, or ``(keys, values)``.
            bits (int | tuple): The bits, or ``(keys, values)``, e.g. ``(8, 4)``.
            scheme (str): The cache's scheme. ``"rotated-channel"`` takes
              q_keys and q_values as ``(weights, scales, biases, residual)``
              as its cache returns them, and computes on them without
              dequantizing: queries rotated once, quantized matmuls
              against the keys and the values, matmuls against the float
              residuals, one softmax, the output rotated back.
            sink (tuple, optional): ``"rotated-channel"``: ``(keys, values,
              starts)``, the float first tokens of each row ``(B, H, S, D)``
              and the column of each row's first token ``(B,)`` (None: 0,
              a single sequence's cache); where those tokens are
              quantized, their float keys and values are read instead.

        Returns:
            array: ``(B, n_q_heads, L, v_head_dim)``; with one int for bits and
            group size, equal to mlx-lm's bit for bit (on CUDA, see
            ``set_quantized_matmul``).
      )pbdoc");

  m.def(
      "set_quantized_matmul",
      [](nb::handle h) {
        constexpr const char* ctx = "set_quantized_matmul";
        if (!nb::isinstance<nb::str>(h)) {
          throw TypeError(ctx, "mode as a str", py_type_name(h));
        }
        const std::string mode = nb::cast<std::string>(h);
        if (mode == "auto") {
          set_quantized_matmul(QuantizedMatmul::automatic);
        } else if (mode == "kernel") {
          set_quantized_matmul(QuantizedMatmul::kernel);
        } else if (mode == "dequantize") {
          set_quantized_matmul(QuantizedMatmul::dequantize);
        } else {
          throw ValueError(ctx, "'auto', 'kernel' or 'dequantize'", "'" + mode.substr(0, 80) + "'");
        }
      },
      "mode"_a.none(), nb::sig("def set_quantized_matmul(mode: str) -> None"),
      R"pbdoc(
        How kvcore's quantized attention multiplies by quantized keys and values.

        Args:
            mode (str): ``"kernel"``: ``mx.quantized_matmul``;
              ``"dequantize"``: a matmul over the dequantized keys and
              values (one layer at a time, in the queries' dtype);
              ``"auto"`` (at start): the kernel, except on a CUDA GPU,
              where mlx 0.32.4's ``quantized_matmul`` lacks most of the
              shapes attention needs and is wrong for some it has.
      )pbdoc");
  m.def(
      "quantized_matmul_mode",
      [] {
        switch (quantized_matmul_mode()) {
          case QuantizedMatmul::kernel:
            return "kernel";
          case QuantizedMatmul::dequantize:
            return "dequantize";
          case QuantizedMatmul::automatic:
            break;
        }
        return "auto";
      },
      nb::sig("def quantized_matmul_mode() -> str"),
      "The mode ``set_quantized_matmul`` set (``\"auto\"`` at start).");
  m.def("dequantizes_in_attention", &dequantizes_in_attention,
        nb::sig("def dequantizes_in_attention() -> bool"),
        "Whether kvcore's quantized attention dequantizes now: the mode and, for ``\"auto\"``, the "
        "default device.");

  using C = QuantizedRotatingKVCache;
  auto q = nb::class_<C>(
      m, "QuantizedRotatingKVCache", nb::dynamic_attr(),
      "Sliding-window cache holding keys and values quantized by ``mx.quantize``.");
  q.def("__init__",
        [](C* self, nb::handle max_size, nb::handle keep, nb::handle group_size,
           nb::handle bits, nb::handle scheme, nb::handle window, nb::handle sink) {
          constexpr const char* ctx = "QuantizedRotatingKVCache";
          auto [ks, vs] = quant_specs_arg(ctx, group_size, bits);
          auto sc = scheme_arg(ctx, scheme);
          new (self) PyCache<C>(int_arg(ctx, "max_size", max_size), int_arg(ctx, "keep", keep),
                                ks, vs, sc, window_arg(ctx, sc, window), int_arg(ctx, "sink", sink));
        },
        "max_size"_a, "keep"_a = 0, "group_size"_a = 64, "bits"_a = 4, nb::kw_only(),
        "scheme"_a = "affine", "window"_a.none() = nb::none(), "sink"_a = 0,
        nb::sig("def __init__(self, max_size: int, keep: int = 0, group_size: int | tuple[int, int] = 64, bits: int | tuple[int, int] = 4, *, scheme: str = 'affine', window: int | None = None, sink: int = 0) -> None"),
        R"pbdoc(
          Args:
              max_size (int): Slots in the ring (the window), at least 1.
              keep (int): Leading tokens never rotated out, below max_size.
              group_size (int | tuple): 32, 64 or 128; a ``(keys, values)``
                pair to quantize them differently.
              bits (int | tuple): 2, 3, 4, 5, 6 or 8; or a ``(keys,
                values)`` pair, e.g. ``(8, 4)``.
              scheme (str): ``"affine"`` (a ring of ``mx.quantize``
                triples) or ``"rotated-channel"`` (see QuantizedKVCache):
                the groups holding the ``keep`` tokens and the newest
                tokens are held, whole groups the window has left behind
                dropped, and ``make_mask`` hides what the float ring would
                no longer hold.
              window (int, optional): ``"rotated-channel"``: tokens kept in
                float (default 128).
              sink (int): ``"rotated-channel"``: first tokens kept in float
                too, at most ``keep``.
        )pbdoc")
      .def("update_and_fetch",
           [](C& c, nb::handle keys, nb::handle values) { return fetched(c, update_param(c, keys, values)); },
           "keys"_a, "values"_a,
           nb::sig("def update_and_fetch(self, keys: mlx.core.array, values: mlx.core.array) "
                   "-> tuple[tuple, tuple]"),
           R"pbdoc(
             Quantize new keys and values and add them to the ring.

             Args:
                 keys (array): ``(B, n_kv_heads, S, k_head_dim)``.
                 values (array): ``(B, n_kv_heads, S, v_head_dim)``.

             Returns:
                 tuple: The cached ``(weights, scales, biases)`` of the keys
                 and of the values, in the float ring's order.
                 ``"rotated-channel"``: ``(weights, scales, biases,
                 residual)`` each, as QuantizedKVCache returns them, for the
                 tokens held.
           )pbdoc")
      .def("keys_and_values", [](const C& c) { return fetched(c, c.keys_and_values()); },
           "The cached keys and values as ``update_and_fetch`` returns them.")
      .def("make_mask",
           [](const C& c, nb::handle N, nb::handle window_size, bool return_array) {
             constexpr const char* ctx = "QuantizedRotatingKVCache.make_mask";
             return c.make_mask(int_arg(ctx, "N", N), return_array,
                                opt_int_arg(ctx, "window_size", window_size));
           },
           "N"_a, "window_size"_a.none() = nb::none(), "return_array"_a = false,
           nb::sig("def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mlx.core.array | str | None"),
           "The attention mask for ``N`` new tokens, as RotatingKVCache's.")
      .def_prop_ro("offset", &C::offset, "Tokens seen so far.")
      .def_prop_ro("max_size", &C::max_size, "Slots in the ring.")
      .def_prop_ro("keep", &C::keep, "Leading tokens that are never rotated out.")
      .def_prop_ro("_idx", &C::idx, "The ring cursor (``\"rotated-channel\"``: the tokens held).")
      .def_prop_ro("scheme", [](const C& c) { return scheme_name(c.scheme()); },
                   "``\"affine\"`` or ``\"rotated-channel\"``.")
      .def_prop_ro("window", [](const C& c) { return c.scheme() == QuantScheme::affine ? 0 : c.held().window(); },
                   "``\"rotated-channel\"``: the newest tokens kept in float (0 for affine).")
      .def_prop_ro("sink", [](const C& c) { return c.scheme() == QuantScheme::affine ? 0 : c.held().sink(); },
                   "``\"rotated-channel\"``: the first tokens kept in float too (0: none).")
      .def_prop_ro("sink_keys",
                   [](const C& c) { return c.scheme() == QuantScheme::affine ? nb::none() : to_py(c.held().sink_keys()); },
                   "The sink's keys, rotated, in float, or None.")
      .def_prop_ro("sink_values",
                   [](const C& c) { return c.scheme() == QuantScheme::affine ? nb::none() : to_py(c.held().sink_values()); },
                   "The sink's values, rotated, in float, or None.")
      .def_prop_ro("residual",
                   [](const C& c) { return c.scheme() == QuantScheme::affine ? nb::none() : to_py(c.held().residual()); },
                   "``\"rotated-channel\"``: the newest keys, rotated, in float, or None.")
      .def_prop_ro("value_residual",
                   [](const C& c) { return c.scheme() == QuantScheme::affine ? nb::none() : to_py(c.held().value_residual()); },
                   "``\"rotated-channel\"``: the same tokens' values, rotated, in float, or None.")
      .def_prop_ro("dropped", &C::dropped,
                   "``\"rotated-channel\"``: tokens the window has dropped after the pinned groups.")
      .def_prop_ro("keys", [](const C& c) { return to_py(c.keys()); },
                   "The keys' ``(weights, scales, biases)`` ring (``\"rotated-channel\"``: the held "
                   "tokens' buffers), or None.")
      .def_prop_ro("values", [](const C& c) { return to_py(c.values()); },
                   "The values' ``(weights, scales, biases)`` ring (``\"rotated-channel\"``: the held "
                   "tokens' buffers), or None.")
      .def_prop_ro("group_size",
                   [](const C& c) { return spec_to_py(c.key_spec().group_size, c.value_spec().group_size); },
                   "The group size, or ``(keys, values)`` when they differ.")
      .def_prop_ro("bits", [](const C& c) { return spec_to_py(c.key_spec().bits, c.value_spec().bits); },
                   "The bits, or ``(keys, values)`` when they differ.")
      .def_prop_ro("nbytes", &C::nbytes, "Bytes held by the quantized rings.")
      .def("empty", &C::empty, "True before the first update.")
      .def("size", &C::size, "Tokens the ring holds.")
      .def("is_trimmable", &C::is_trimmable, "Whether ``trim`` can drop tokens.")
      .def("trim", [](C& c, nb::handle n) { return c.trim(count_arg(c.name(), n)); }, "n"_a,
           nb::sig("def trim(self, n: int) -> int"),
           "Drop up to ``n`` tokens from the end; returns how many were dropped.")
      .def_prop_rw(
          "state",
          [](const C& c) {
            nb::tuple out = nb::make_tuple(to_py(c.keys()), to_py(c.values()), c.offset(), c.keep(),
                                           c.max_size(), c.idx(),
                                           spec_to_py(c.key_spec().group_size, c.value_spec().group_size),
                                           spec_to_py(c.key_spec().bits, c.value_spec().bits));
            if (c.scheme() == QuantScheme::affine) {
              return out;
            }
            const auto& h = c.held();
            out = nb::tuple(out + nb::make_tuple(scheme_name(h.scheme()), h.window(), to_py(h.residual()),
                                                 to_py(h.value_residual())));
            if (h.sink() > 0) {
              out = nb::tuple(out + nb::make_tuple(h.sink(), to_py(h.sink_keys()), to_py(h.sink_values())));
            }
            return out;
          },
          [](C& c, nb::handle v) {
            constexpr const char* ctx = "QuantizedRotatingKVCache.state";
            const size_t n = PySequence_Check(v.ptr()) && !nb::isinstance<nb::str>(v) ? nb::len(v) : 0;
            const bool scheme = n == 12 || n == 15, sink = n == 15;
            StateReader r(ctx, v, sink ? 15 : (scheme ? 12 : 8));
            nb::tuple t(v);
            auto [ks, vs] = quant_specs_arg(ctx, t[6], t[7]);
            auto keys = quantized_from_py(ctx, "keys", t[0]);
            auto values = quantized_from_py(ctx, "values", t[1]);
            if (!scheme) {
              c.set(std::move(keys), std::move(values), r.integer(2, "offset"), r.integer(3, "keep"),
                    r.integer(4, "max_size"), r.integer(5, "_idx"), ks, vs);
              return;
            }
            QuantizedKVCache held(ks, vs);
            held.set(std::move(keys), std::move(values), r.integer(5, "_idx"), ks, vs, scheme_arg(ctx, t[8]),
                     r.array(10, "residual"), r.array(11, "value residual"), r.integer(9, "window"),
                     sink ? r.integer(12, "sink") : 0, sink ? r.array(13, "sink keys") : std::nullopt,
                     sink ? r.array(14, "sink values") : std::nullopt);
            c.set_channel(std::move(held), r.integer(2, "offset"), r.integer(3, "keep"), r.integer(4, "max_size"));
          },
          nb::for_setter(nb::sig("def state(self, state: tuple, /) -> None")),
          nb::for_setter(nb::arg("state").none()),
          "``(keys, values, offset, keep, max_size, _idx, group_size, bits)``; keys and "
          "values are triples. A ``\"rotated-channel\"`` cache adds ``(scheme, window, residual "
          "keys, residual values)`` (keys and values are then those held, ``_idx`` of them), and "
          "with a sink ``(sink, sink keys, sink values)``.")
      .def("_assign", [](C& self, const C& other) { self = other; }, "other"_a,
           "Take other's contents (a staged copy), as one step.")
      .def("__repr__", [](const C& c) {
        return "QuantizedRotatingKVCache(offset=" + std::to_string(c.offset()) +
            ", max_size=" + std::to_string(c.max_size()) +
            ", bits=" + nb::cast<std::string>(nb::repr(spec_to_py(c.key_spec().bits, c.value_spec().bits))) +
            (c.scheme() == QuantScheme::affine ? std::string() : std::string(", scheme='") + scheme_name(c.scheme()) + "'") +
            ")";
      })
      .def("__copy__", [](nb::handle self) { return copy_instance<C>(self, nb::handle()); })
      .def("__deepcopy__", [](nb::handle self, nb::handle memo) {
        return copy_instance<C>(self, memo);
      }, "memo"_a);
  def_from_state<C>(q, "Build a cache from ``state`` without calling __init__.", 1, 0,
                    QuantSpec{64, 4}, QuantSpec{64, 4});
}

} // namespace kvcore::py
