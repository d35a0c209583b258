// Prompt-cache files: the Python package's save/load are these calls.
#include <nanobind/stl/map.h>

#include "common.h"
#include "kvcore/arrays.h"
#include "kvcore/batch.h"
#include "kvcore/cache_list.h"
#include "kvcore/chunked.h"
#include "kvcore/files.h"
#include "kvcore/quantized.h"
#include "kvcore/quantized_batch.h"
#include "kvcore/quantized_rotating.h"
#include "kvcore/rotating.h"

namespace kvcore::py {

StateValue state_from_py(nb::handle h, int depth) {
  constexpr const char* ctx = "save_prompt_cache";
  if (depth > kMaxDepth) {
    throw ValueError(ctx, "states at most " + std::to_string(kMaxDepth) + " deep",
                     "deeper nesting");
  }
  if (h.is_none()) {
    return {};
  }
  mx::array* a = nullptr;
  if (nb::try_cast<mx::array*>(h, a, false) && a != nullptr) {
    return *a;
  }
  if (PyBool_Check(h.ptr())) {
    return h.ptr() == Py_True;
  }
  if (PyLong_Check(h.ptr())) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow != 0) {
      throw ValueError(ctx, "integers within 64 bits", nb::cast<std::string>(nb::repr(h)));
    }
    return v;
  }
  if (PyFloat_Check(h.ptr())) {
    return PyFloat_AsDouble(h.ptr());
  }
  if (PyUnicode_Check(h.ptr())) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
    if (s == nullptr) {
      PyErr_Clear();
      throw ValueError(ctx, "strings encodable as UTF-8", "a string with surrogates");
    }
    return std::string(s, static_cast<size_t>(n));
  }
  if (nb::isinstance<nb::list>(h) || nb::isinstance<nb::tuple>(h)) {
    StateValue::List out;
    for (nb::handle x : h) {
      out.push_back(state_from_py(x, depth + 1));
    }
    return out;
  }
  throw ValueError(ctx, "arrays, numbers, strings or None",
                   nb::cast<std::string>(nb::str(h.type().attr("__name__"))));
}

namespace {

template <class T>
nb::object wrap_as(nb::handle kvcore, std::shared_ptr<Cache>& c) {
  return make_instance<T>(kvcore.attr(c->name()), std::move(dynamic_cast<T&>(*c)));
}

} // namespace

nb::object wrap_loaded(nb::handle kvcore, std::shared_ptr<Cache>& c) {
  std::string name = c->name();
  if (name == "KVCache") return wrap_as<KVCache>(kvcore, c);
  if (name == "ConcatenateKVCache") return wrap_as<ConcatenateKVCache>(kvcore, c);
  if (name == "RotatingKVCache") return wrap_as<RotatingKVCache>(kvcore, c);
  if (name == "QuantizedKVCache") return wrap_as<QuantizedKVCache>(kvcore, c);
  if (name == "QuantizedRotatingKVCache") return wrap_as<QuantizedRotatingKVCache>(kvcore, c);
  if (name == "ChunkedKVCache") return wrap_as<ChunkedKVCache>(kvcore, c);
  if (name == "ArraysCache") return wrap_as<ArraysCache>(kvcore, c);
  if (name == "BatchKVCache") return wrap_as<BatchKVCache>(kvcore, c);
  if (name == "BatchRotatingKVCache") return wrap_as<BatchRotatingKVCache>(kvcore, c);
  if (name == "QuantizedBatchKVCache") return wrap_as<QuantizedBatchKVCache>(kvcore, c);
  if (name == "QuantizedBatchRotatingKVCache") {
    return wrap_as<QuantizedBatchRotatingKVCache>(kvcore, c);
  }
  if (name == "CacheList") {
    // The Python CacheList (it may hold Python subclasses), over wrapped
    // members.
    auto& list = dynamic_cast<CacheList&>(*c);
    nb::list members;
    for (auto m : list.caches()) {
      members.append(wrap_loaded(kvcore, m));
    }
    return kvcore.attr("CacheList")(*nb::tuple(members));
  }
  throw ValueError("load_prompt_cache", "a cache class with a Python binding", name);
}

namespace {

// save_prompt_cache's metadata: None or a mapping of str to str (what
// mlx-lm documents; it also takes other trees of strings by accident, which
// come back from its loader as something else).
Metadata metadata_arg(nb::handle h) {
  constexpr const char* ctx = "save_prompt_cache";
  Metadata out;
  if (h.is_none()) {
    return out;
  }
  if (!nb::isinstance<nb::dict>(h) &&
      !nb::isinstance(h, nb::module_::import_("collections.abc").attr("Mapping"))) {
    throw ValueError(ctx, "metadata as a dict of str to str", py_type_name(h));
  }
  for (nb::handle item : nb::iter(h.attr("items")())) {
    nb::handle k = item[0], v = item[1];
    if (!PyUnicode_Check(k.ptr()) || !PyUnicode_Check(v.ptr())) {
      throw ValueError(ctx, "metadata as a dict of str to str",
                       "an item " + nb::cast<std::string>(nb::repr(k)).substr(0, 40) + ": " +
                           nb::cast<std::string>(nb::repr(v)).substr(0, 40));
    }
    out[nb::cast<std::string>(k)] = nb::cast<std::string>(v);
  }
  return out;
}

} // namespace

void bind_files(nb::module_& m) {
  m.def(
      "_save_prompt_cache_states",
      [](nb::handle file, nb::handle layers, nb::handle meta) {
        const std::string path = path_arg("save_prompt_cache", "file_name", file);
        const Metadata metadata = metadata_arg(meta);
        std::vector<NamedState> out;
        for (nb::handle layer : layers) {
          nb::tuple t = nb::cast<nb::tuple>(layer);
          out.push_back({nb::cast<std::string>(t[0]), state_from_py(t[1], 1)});
        }
        nb::gil_scoped_release release;
        save_prompt_cache_states(path, out, metadata);
      },
      "path"_a, "layers"_a, "metadata"_a.none(),
      "Write (class name, state) layers in mlx-lm 0.32's layout.");
  m.def(
      "_load_prompt_cache",
      [](nb::handle file) {
        const std::string path = path_arg("load_prompt_cache", "file_name", file);
        LoadedPromptCache loaded;
        FileLayout layout;
        {
          nb::gil_scoped_release release;
          PromptCacheStates states = load_prompt_cache_states(path);
          layout = states.layout;
          for (const auto& layer : states.layers) {
            loaded.caches.push_back(cache_from_state(layer.name, layer.state));
          }
          loaded.metadata = std::move(states.metadata);
        }
        nb::module_ kvcore = nb::module_::import_("kvcore");
        nb::list caches;
        for (auto& c : loaded.caches) {
          caches.append(wrap_loaded(kvcore, c));
        }
        return nb::make_tuple(caches, loaded.metadata,
                              layout == FileLayout::Current ? "mlx-lm 0.32"
                                                            : "mlx-lm <= 0.32.0 (meta_state)");
      },
      "path"_a,
      "Load and check a prompt-cache file: (caches, metadata, layout name).");
  m.def("cache_class_names", &cache_class_names,
        "The cache classes a prompt-cache file may name.");
}

} // namespace kvcore::py
