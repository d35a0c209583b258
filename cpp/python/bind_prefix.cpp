// TokenBuffer, PromptTrie and LRUPromptCache for Python: the C++ trie and
// LRU over Python objects (any model key, any list of caches), so mlx-lm's
// server and tests use them unchanged.
#include <nanobind/stl/map.h>

#include <mlx/ops.h>

#include "common.h"
#include "kvcore/prefix_cache.h"
#include "kvcore/quantized.h"

namespace kvcore::py {

namespace {

// Model keys compare with Python's ==, as dict keys do.
struct PyEq {
  bool operator()(const nb::object& a, const nb::object& b) const {
    return a.is(b) || a.equal(b);
  }
};

// A mutex that waits with the GIL released: a thread holding it may run
// Python (a deepcopy), which lets other threads in; they must not block on
// it while holding the GIL.
struct GilMutex {
  std::mutex m;
  void lock() {
    if (!m.try_lock()) {
      nb::gil_scoped_release unlocked;
      m.lock();
    }
  }
  void unlock() {
    m.unlock();
  }
};

// What LRUPromptCache does with a Python list of caches: mlx-lm's own
// calls (nbytes, can_trim_prompt_cache, copy.deepcopy, trim_prompt_cache),
// so any cache objects work, kvcore's or not.
struct PyOps {
  static int64_t nbytes(const nb::object& caches) {
    int64_t n = 0;
    for (nb::handle c : caches) {
      n += nb::cast<int64_t>(c.attr("nbytes"));
    }
    return n;
  }
  static bool can_trim(const nb::object& caches) {
    for (nb::handle c : caches) {
      if (!nb::cast<bool>(c.attr("is_trimmable")())) {
        return false;
      }
    }
    return true;
  }
  static nb::object copy(const nb::object& caches) {
    return nb::module_::import_("copy").attr("deepcopy")(caches);
  }
  static void trim(nb::object& caches, int n) {
    nb::module_::import_("kvcore").attr("trim_prompt_cache")(caches, n);
  }
  // The kvcore.KVCache layers (the class itself, not a subclass: those may
  // hold more than keys and values) of a list, within kvcore.CacheLists
  // too, with arrays at one offset. Where other caches sit beside them,
  // `rest` is the list with each of those KVCaches emptied, the others
  // deep-copied.
  static bool share(const nb::object& caches, std::vector<LayerKV>* layers, int* offset,
                    std::optional<nb::object>* rest) {
    if (!nb::isinstance<nb::list>(caches)) {
      return false;
    }
    layers->clear();
    bool mixed = false;
    std::optional<nb::object> others = split(caches, layers, offset, &mixed);
    if (!others || layers->empty()) {
      return false;
    }
    *rest = mixed ? others : std::nullopt;
    return true;
  }
  // caches (a list or a CacheList's tuple) with its KVCaches emptied, their
  // arrays appended to layers; nullopt if a KVCache is empty or at another
  // offset (an empty one would be taken for a slot to fill).
  static std::optional<nb::object> split(nb::handle caches, std::vector<LayerKV>* layers, int* offset,
                                         bool* mixed) {
    nb::handle kv_type = nb::type<KVCache>();
    nb::handle list_type = cache_list_type();
    nb::list out;
    for (nb::handle c : caches) {
      if (c.type().is(kv_type)) {
        const KVCache& kv = nb::cast<const KVCache&>(c);
        if (!kv.keys() || !kv.values() || (!layers->empty() && kv.offset() != *offset)) {
          return std::nullopt;
        }
        *offset = kv.offset();
        layers->push_back({*kv.keys(), *kv.values()});
        out.append(kv_type());
      } else if (c.type().is(list_type)) {
        auto inner = split(c.attr("caches"), layers, offset, mixed);
        if (!inner) {
          return std::nullopt;
        }
        nb::object copied = nb::module_::import_("copy").attr("copy")(c);
        copied.attr("caches") = nb::tuple(*inner);
        out.append(copied);
      } else {
        *mixed = true;
        out.append(copy(nb::borrow(c)));
      }
    }
    return out;
  }
  static nb::handle cache_list_type() {
    static nb::object t = nb::module_::import_("kvcore").attr("CacheList");
    return t;
  }
  // Fill the empty KVCaches of caches (walked as split walks them) in order.
  static void fill(nb::handle caches, std::vector<LayerKV>& layers, size_t* next, int offset) {
    nb::handle kv_type = nb::type<KVCache>();
    for (nb::handle c : caches) {
      if (c.type().is(kv_type) && *next < layers.size()) {
        LayerKV& l = layers[(*next)++];
        nb::inst_ptr<KVCache>(c)->set(std::move(l.keys), std::move(l.values), offset);
      } else if (c.type().is(cache_list_type())) {
        fill(c.attr("caches"), layers, next, offset);
      }
    }
  }
  // Every layer of a list (a CacheList's members in its place) as the
  // kvcore cache it is: only kvcore.KVCache and kvcore.QuantizedKVCache
  // themselves (a subclass may hold more), nullptr for any other.
  static std::vector<Cache*> cache_layers(const nb::object& caches) {
    std::vector<Cache*> out;
    if (nb::isinstance<nb::list>(caches)) {
      walk_layers(caches, out);
    }
    return out;
  }
  static void walk_layers(nb::handle caches, std::vector<Cache*>& out) {
    for (nb::handle c : caches) {
      if (c.type().is(nb::type<KVCache>())) {
        out.push_back(nb::inst_ptr<KVCache>(c));
      } else if (c.type().is(nb::type<QuantizedKVCache>())) {
        out.push_back(nb::inst_ptr<QuantizedKVCache>(c));
      } else if (c.type().is(cache_list_type())) {
        walk_layers(c.attr("caches"), out);
      } else {
        out.push_back(nullptr);
      }
    }
  }
  static std::string model_name(const nb::object& model) {
    return nb::cast<std::string>(nb::repr(model));
  }
  // The file save_prompt_cache would write: (class name, state) per layer.
  static PreparedFile prepare(const nb::object& caches, const Metadata& metadata) {
    std::vector<NamedState> layers;
    for (nb::handle c : caches) {
      layers.push_back({nb::cast<std::string>(c.type().attr("__name__")), state_from_py(c.attr("state"), 1)});
    }
    return prepare_prompt_cache_states(layers, metadata);
  }
  static nb::object from_file(LoadedPromptCache loaded) {
    nb::module_ kvcore = nb::module_::import_("kvcore");
    nb::list out;
    for (auto& c : loaded.caches) {
      out.append(wrap_loaded(kvcore, c));
    }
    return out;
  }
  static nb::object build(std::vector<LayerKV> layers, int offset, const nb::object* rest) {
    if (rest != nullptr) {
      nb::object out = copy(*rest);
      size_t next = 0;
      fill(out, layers, &next, offset);
      return out;
    }
    nb::handle kv_type = nb::type<KVCache>();
    nb::list out;
    for (auto& l : layers) {
      nb::object c = kv_type();
      nb::inst_ptr<KVCache>(c)->set(std::move(l.keys), std::move(l.values), offset);
      out.append(c);
    }
    return out;
  }
};

using PyTrie = PromptTrie<nb::object, nb::object, PyEq>;
using PyLRU = LRUPromptCache<nb::object, nb::object, PyOps, GilMutex, PyEq>;

Tokens tokens_arg(const char* ctx, nb::handle h) {
  Tokens out;
  mx::array* a = nullptr;
  if (nb::try_cast<mx::array*>(h, a, false) && a != nullptr) {
    // An integer mx.array, of any shape (BatchGenerator passes (1,) slices).
    if (!mx::issubdtype(a->dtype(), mx::integer)) {
      throw ValueError(ctx, "tokens of an integer dtype", dtype_str(a->dtype()));
    }
    mx::array x = mx::astype(mx::flatten(*a), mx::int64);
    x.eval();
    return Tokens(x.data<int64_t>(), x.data<int64_t>() + x.size());
  }
  nb::object seq = nb::borrow(h);
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h)) {
    if (!PyIter_Check(h.ptr()) && !nb::hasattr(h, "__iter__")) {
      throw TypeError(ctx, "tokens as a list of ints", py_type_name(h));
    }
    seq = nb::list(seq); // any iterable of ints
  }
  // The items in place (a list or tuple), not through an iterator: a 32k
  // token prompt is converted on every insert and fetch.
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = items[i];
    if (!PyLong_CheckExact(t) && (!PyLong_Check(t) || PyBool_Check(t))) {
      throw ValueError(ctx, "tokens as ints", nb::cast<std::string>(nb::repr(t)).substr(0, 60));
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
    if (overflow != 0) {
      throw ValueError(ctx, "tokens within 64 bits", nb::cast<std::string>(nb::repr(t)).substr(0, 60));
    }
    out[static_cast<size_t>(i)] = v;
  }
  return out;
}

// A prompt cache argument: a list or tuple of caches. Anything else (a
// generator would be consumed and stored empty) is refused before anything
// is stored.
void check_caches_arg(const char* ctx, nb::handle caches) {
  if (!nb::isinstance<nb::list>(caches) && !nb::isinstance<nb::tuple>(caches)) {
    throw TypeError(ctx, "prompt_cache as a list or tuple of caches", py_type_name(caches));
  }
}

nb::list to_list(const Tokens& t) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(t.size()));
  if (out == nullptr) {
    throw nb::python_error();
  }
  nb::list list = nb::steal<nb::list>(out);
  for (size_t i = 0; i < t.size(); ++i) {
    PyObject* v = PyLong_FromLongLong(t[i]);
    if (v == nullptr) {
      throw nb::python_error();
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), v);
  }
  return list;
}

nb::object opt_list(const std::optional<Tokens>& t) {
  return t ? nb::object(to_list(*t)) : nb::none();
}

// Python's KeyError, as mlx-lm's dict-based trie raises it.
[[noreturn]] void key_error(nb::handle tokens) {
  PyErr_SetObject(PyExc_KeyError, tokens.ptr());
  throw nb::python_error();
}

std::optional<int64_t> opt_count(const char* ctx, const char* what, nb::handle h) {
  if (h.is_none()) {
    return std::nullopt;
  }
  if (!PyLong_Check(h.ptr()) || PyBool_Check(h.ptr())) {
    throw ValueError(ctx, std::string(what) + " as an int or None", nb::cast<std::string>(nb::repr(h)));
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  return overflow > 0 ? PyLRU::kUnlimited : overflow < 0 ? 0 : v;
}

// mlx-lm's default max_bytes is 1 << 63, one past int64: held as the
// largest int64 and shown as 1 << 63 again.
int64_t limit_arg(const char* ctx, const char* what, nb::handle h) {
  auto v = opt_count(ctx, what, h);
  if (!v) {
    throw ValueError(ctx, std::string(what) + " as an int", "None");
  }
  return *v;
}

nb::object limit_to_py(int64_t v) {
  if (v == PyLRU::kUnlimited) {
    return nb::int_(1).attr("__lshift__")(63);
  }
  return nb::int_(v);
}

struct PyTokenBuffer final : TokenBuffer {
  using TokenBuffer::TokenBuffer;
  int step() const override {
    return python_step("TokenBuffer.step", "TokenBuffer.step", nb::find(static_cast<const TokenBuffer&>(*this)),
                       TokenBuffer::step());
  }
};

std::vector<int32_t> int32_tokens(const char* ctx, nb::handle h) {
  std::vector<int32_t> out;
  for (int64_t v : tokens_arg(ctx, h)) {
    if (v < INT32_MIN || v > INT32_MAX) {
      throw ValueError(ctx, "tokens within int32", std::to_string(v));
    }
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

} // namespace

void bind_prefix(nb::module_& m) {
  m.def("_flush_disk_tiers", &flush_disk_tiers, nb::call_guard<nb::gil_scoped_release>(),
        "Wait until every disk tier has written its queued files (run at exit).");
  auto tb = nb::class_<TokenBuffer>(m, "TokenBuffer", nb::dynamic_attr(),
                                    "A growing int32 token sequence in one mlx array.");
  tb.attr("step") = TokenBuffer::default_step;
  tb.def("__init__",
         [](TokenBuffer* self, nb::handle tokens) {
           new (self) PyTokenBuffer(tokens.is_none() ? std::vector<int32_t>{}
                                                     : int32_tokens("TokenBuffer", tokens));
         },
         "tokens"_a.none() = nb::none(),
         nb::sig("def __init__(self, tokens: list[int] | None = None) -> None"))
      .def("update_and_fetch",
           [](TokenBuffer& b, nb::handle tokens) {
             return b.update_and_fetch(int32_tokens("TokenBuffer.update_and_fetch", tokens));
           },
           "tokens"_a, nb::sig("def update_and_fetch(self, tokens: list[int]) -> mlx.core.array"),
           "Append tokens; returns every token so far.")
      .def_prop_ro("state", &TokenBuffer::state, "The whole buffer, unused slots included.")
      .def_prop_ro("tokens", &TokenBuffer::tokens, "The tokens so far.")
      .def_prop_ro("_buffer", &TokenBuffer::state)
      .def_prop_ro("_size", &TokenBuffer::size);

  auto trie = nb::class_<PyTrie>(m, "PromptTrie",
                                 "Token sequences to values, per model (a radix tree).");
  trie.def(nb::init<>())
      .def("add",
           [](PyTrie& t, nb::object model, nb::handle tokens, nb::object value) -> nb::object {
             auto prev = t.add(model, tokens_arg("PromptTrie.add", tokens), std::move(value));
             return prev ? *prev : nb::none();
           },
           "model"_a.none(), "tokens"_a, "value"_a.none(),
           "Store value at tokens; returns the value it replaced, or None.")
      .def("get",
           [](const PyTrie& t, nb::object model, nb::handle tokens) -> nb::object {
             const nb::object* v = t.get(model, tokens_arg("PromptTrie.get", tokens));
             if (v == nullptr) key_error(tokens);
             return *v;
           },
           "model"_a.none(), "tokens"_a, "The value at exactly tokens (KeyError if none).")
      .def("pop",
           [](PyTrie& t, nb::object model, nb::handle tokens) -> nb::object {
             auto v = t.pop(model, tokens_arg("PromptTrie.pop", tokens));
             if (!v) key_error(tokens);
             return *v;
           },
           "model"_a.none(), "tokens"_a, "Remove and return the value at exactly tokens.")
      .def("pop_prefixes",
           [](PyTrie& t, nb::object model, nb::handle tokens) {
             nb::list out;
             for (auto& [len, v] : t.pop_prefixes(model, tokens_arg("PromptTrie.pop_prefixes", tokens))) {
               out.append(nb::make_tuple(len, v));
             }
             return out;
           },
           "model"_a.none(), "tokens"_a,
           "Remove the values at proper prefixes of tokens: [(length, value)].")
      .def("_search",
           [](const PyTrie& t, nb::object model, nb::handle tokens) {
             auto r = t.search(model, tokens_arg("PromptTrie.search", tokens));
             return nb::make_tuple(opt_list(r.exact), opt_list(r.shorter), opt_list(r.longer),
                                   r.common_prefix);
           },
           "model"_a.none(), "tokens"_a);

  auto lru = nb::class_<PyLRU>(m, "LRUPromptCache",
                               "Finished prompt caches by model and tokens, least recently "
                               "inserted evicted first.");
  lru.def("__init__",
          [](PyLRU* self, nb::handle max_size, nb::handle max_bytes, bool share, nb::handle disk_dir,
             nb::handle disk_bytes, nb::handle max_checkpoints, nb::handle checkpoint_every,
             nb::handle disk_block_tokens) {
            constexpr const char* ctx = "LRUPromptCache";
            const int64_t bt = limit_arg(ctx, "disk_block_tokens", disk_block_tokens);
            if (bt < 0 || bt > (1 << 16)) {
              throw ValueError(ctx, "disk_block_tokens from 0 to 65536", std::to_string(bt));
            }
            const int block_tokens = static_cast<int>(bt);
            std::string dir;
            if (!disk_dir.is_none()) {
              dir = path_arg(ctx, "disk_dir", disk_dir);
              if (dir.empty()) {
                throw ValueError(ctx, "disk_dir as a directory path or None", "''");
              }
            }
            new (self) PyLRU(limit_arg(ctx, "max_size", max_size), limit_arg(ctx, "max_bytes", max_bytes),
                             share, dir, limit_arg(ctx, "disk_bytes", disk_bytes),
                             limit_arg(ctx, "max_checkpoints", max_checkpoints),
                             limit_arg(ctx, "checkpoint_every", checkpoint_every), block_tokens);
          },
          "max_size"_a = 10, "max_bytes"_a = nb::int_(1).attr("__lshift__")(63), nb::kw_only(),
          "share"_a = true, "disk_dir"_a.none() = nb::none(),
          "disk_bytes"_a = nb::int_(1).attr("__lshift__")(63), "max_checkpoints"_a = 8,
          "checkpoint_every"_a = 0, "disk_block_tokens"_a = 256,
          nb::sig("def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63, *, share: bool = True, "
                  "disk_dir: str | bytes | os.PathLike | None = None, disk_bytes: int = 1 << 63, "
                  "max_checkpoints: int = 8, checkpoint_every: int = 0, disk_block_tokens: int = 256) -> None"),
          R"pbdoc(
            Args:
                max_size (int): Entries kept.
                max_bytes (int): Bytes kept (``nbytes``).
                share (bool): Keep the keys and values of entries'
                    plain ``KVCache`` layers (within ``CacheList`` layers
                    too) in one store, each token shared by several entries
                    stored once, the other caches beside them held per entry
                    (default). ``False`` holds every entry's caches as
                    given, as mlx-lm does.
                disk_dir (str | bytes | os.PathLike | None): A directory for the disk
                    tier: every inserted entry is also written there, its
                    plain ``KVCache`` layers' keys and values as blocks of
                    ``disk_block_tokens`` tokens (each written once, shared
                    by every entry through it) and the rest as a checked
                    prompt-cache file; a fetch that disk covers better than
                    memory loads it (after a restart too, and from other
                    processes on the directory). Entries are keyed by
                    ``repr(model)``; files that fail their checks are
                    deleted, never served (``disk_errors``).
                disk_bytes (int): Bytes of files kept, by every process on
                    the directory together; least recently used go first.
                max_checkpoints (int): Prefill checkpoints kept (see
                    ``insert_checkpoint``); 0 keeps none.
                checkpoint_every (int): The fewest tokens between a
                    checkpoint and the stored prefix before it (0: every
                    prefill chunk boundary offered).
                disk_block_tokens (int): Tokens per disk block; 0 writes
                    each entry as one whole file.
          )pbdoc")
      .def_prop_ro("disk_dir", [](const PyLRU& c) -> nb::object {
        return c.disk_dir().empty() ? nb::none() : nb::object(nb::str(c.disk_dir().c_str()));
      })
      .def_prop_ro("disk_size", &PyLRU::disk_size, nb::call_guard<nb::gil_scoped_release>(),
                   "Entries on disk (once queued files are written).")
      .def_prop_ro("disk_blocks", &PyLRU::disk_blocks, nb::call_guard<nb::gil_scoped_release>(),
                   "Blocks on disk (once queued files are written).")
      .def_prop_ro("disk_blocks_read", &PyLRU::disk_blocks_read, nb::call_guard<nb::gil_scoped_release>(),
                   "Blocks read from disk and served (those memory held are not read).")
      .def_prop_ro("disk_block_tokens", &PyLRU::disk_block_tokens, "Tokens per disk block (0: whole files).")
      .def_prop_ro("disk_nbytes", &PyLRU::disk_nbytes, nb::call_guard<nb::gil_scoped_release>(),
                   "Bytes of the disk tier's files (once queued files are written).")
      .def_prop_ro("disk_errors", &PyLRU::disk_errors, nb::call_guard<nb::gil_scoped_release>(),
                   "Why files were refused, removed or not written, latest last: one line each, "
                   "``\"<file name>: <reason>\"``.")
      .def("flush", &PyLRU::flush, nb::call_guard<nb::gil_scoped_release>(),
           "Wait until the disk tier has written every entry inserted so far (files are "
           "written on a thread of the disk tier's own).")
      .def("close", &PyLRU::close, nb::call_guard<nb::gil_scoped_release>(),
           R"pbdoc(
             Write what is queued for the disk tier and stop its writer.

             From then on the cache serves and stores in memory only.

             Returns:
                 int: How many files the disk tier wrote (0 without one);
                 later calls return the same.
           )pbdoc")
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); },
           nb::sig("def __enter__(self) -> LRUPromptCache"))
      .def("__exit__",
           [](PyLRU& c, nb::handle, nb::handle, nb::handle) {
             nb::gil_scoped_release release;
             c.close();
           },
           "exc_type"_a.none(), "exc"_a.none(), "traceback"_a.none(),
           nb::sig("def __exit__(self, exc_type: object, exc: object, traceback: object) -> None"),
           "close().")
      .def_prop_ro("share", &PyLRU::share)
      .def("__len__", &PyLRU::size, "Entries, checkpoints not counted.")
      .def_prop_ro("n_checkpoints", &PyLRU::checkpoint_count, "Prefill checkpoints held.")
      .def_prop_rw("max_checkpoints", &PyLRU::max_checkpoints,
                   [](PyLRU& c, nb::handle v) {
                     c.set_max_checkpoints(limit_arg("LRUPromptCache", "max_checkpoints", v));
                   })
      .def_prop_rw("checkpoint_every", &PyLRU::checkpoint_every,
                   [](PyLRU& c, nb::handle v) {
                     c.set_checkpoint_every(limit_arg("LRUPromptCache", "checkpoint_every", v));
                   })
      .def_prop_ro("nbytes", &PyLRU::nbytes,
                   "Bytes held: entries' caches, with shared keys and values counted once.")
      .def_prop_rw("max_size", [](const PyLRU& c) { return limit_to_py(c.max_size()); },
                   [](PyLRU& c, nb::handle v) { c.set_max_size(limit_arg("LRUPromptCache", "max_size", v)); })
      .def_prop_rw("max_bytes", [](const PyLRU& c) { return limit_to_py(c.max_bytes()); },
                   [](PyLRU& c, nb::handle v) { c.set_max_bytes(limit_arg("LRUPromptCache", "max_bytes", v)); })
      .def("fetch_nearest_cache",
           [](PyLRU& c, nb::object model, nb::handle tokens) {
             auto [cache, rest] = c.fetch_nearest_cache(
                 model, tokens_arg("LRUPromptCache.fetch_nearest_cache", tokens));
             return nb::make_tuple(cache ? *cache : nb::none(), to_list(rest));
           },
           "model"_a.none(), "tokens"_a,
           nb::sig("def fetch_nearest_cache(self, model: object, tokens: list[int]) -> tuple[list | None, list[int]]"),
           R"pbdoc(
             A copy of the cache stored for the nearest usable match.

             Returns:
                 tuple: ``(cache, rest)``: a fresh copy of the exact entry, of
                 a longer trimmable one trimmed to the shared prefix, or of the
                 longest shorter one, and the tokens it does not cover; or
                 ``(None, tokens)``.
           )pbdoc")
      .def("insert_cache",
           [](PyLRU& c, nb::object model, nb::handle tokens, nb::object prompt_cache,
              nb::handle cache_type) {
             constexpr const char* ctx = "LRUPromptCache.insert_cache";
             if (!PyUnicode_Check(cache_type.ptr())) {
               throw KeyError(ctx, "cache_type among assistant, user, system",
                              nb::cast<std::string>(nb::repr(cache_type)).substr(0, 60));
             }
             check_caches_arg(ctx, prompt_cache);
             c.insert_cache(model, tokens_arg(ctx, tokens), std::move(prompt_cache),
                            nb::cast<std::string>(cache_type));
           },
           "model"_a.none(), "tokens"_a, "prompt_cache"_a, nb::kw_only(),
           "cache_type"_a.none() = "assistant",
           nb::sig("def insert_cache(self, model: object, tokens: list[int], prompt_cache: list, *, "
                   "cache_type: str = 'assistant') -> None"),
           "Store a prompt cache for tokens, then evict to the limits.")
      .def("insert_checkpoint",
           [](PyLRU& c, nb::object model, nb::handle tokens, nb::object prompt_cache) {
             constexpr const char* ctx = "LRUPromptCache.insert_checkpoint";
             check_caches_arg(ctx, prompt_cache);
             return c.insert_checkpoint(model, tokens_arg(ctx, tokens), prompt_cache);
           },
           "model"_a.none(), "tokens"_a, "prompt_cache"_a,
           nb::sig("def insert_checkpoint(self, model: object, tokens: list[int], prompt_cache: list) -> bool"),
           R"pbdoc(
             Keep a copy of a cache part way through its prompt's prefill.

             For caches that cannot be trimmed (a rotating window after it
             wraps, state-space slots), which only exact or shorter entries
             can serve: a later prompt sharing the first ``len(tokens)``
             tokens resumes from the checkpoint. The caller goes on updating
             ``prompt_cache``; the checkpoint is a deep copy.
             ``prefill_checkpoints`` makes the prefill call this.

             Args:
                 model: The model key.
                 tokens (list[int]): The tokens the cache holds.
                 prompt_cache (list): The per-layer caches.

             Returns:
                 bool: Whether it was kept (not when ``max_checkpoints`` is
                 0, an entry holds these tokens, or a stored prefix is fewer
                 than ``checkpoint_every`` tokens back).
           )pbdoc")
      .def("trim_to",
           [](PyLRU& c, nb::handle n_sequences, nb::handle n_bytes) {
             constexpr const char* ctx = "LRUPromptCache.trim_to";
             c.trim_to(opt_count(ctx, "n_sequences", n_sequences), opt_count(ctx, "n_bytes", n_bytes));
           },
           nb::kw_only(), "n_sequences"_a.none() = nb::none(), "n_bytes"_a.none() = nb::none(),
           "Evict down to n_sequences entries and n_bytes.")
      .def("stats_by_type",
           [](const PyLRU& c) {
             nb::dict out;
             for (const auto& [type, s] : c.stats_by_type()) {
               nb::dict d;
               d["n_sequences"] = s.n_sequences;
               d["n_bytes"] = s.n_bytes;
               out[type.c_str()] = d;
             }
             return out;
           },
           "{cache_type: {'n_sequences': ..., 'n_bytes': ...}}.");
}

} // namespace kvcore::py
