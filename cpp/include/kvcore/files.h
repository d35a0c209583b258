// Prompt-cache files: mlx-lm 0.32's safetensors layout, written and read
// both ways, and the per-layer meta_state layout of mlx-lm 0.32.0 and
// before, read.
//
// A file is untrusted input. Before mlx reads any array, the safetensors
// header is parsed here with bounds (header size, JSON nesting, dtypes,
// shapes, data offsets inside the file and matching the shapes); then the
// layout's keys must form dense lists no deeper than kMaxDepth, class names
// come from the fixed table of state.h, scalar tags must be known and match
// their arrays, and each cache's own setters check its state. Any fault is a
// ValueError with context "load_prompt_cache" naming what was wrong; nothing
// else escapes, and nothing is allocated from a size the file states
// before it has been checked against the file's length.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvcore/state.h"

namespace kvcore {

/// One model's caches, a layer each.
using PromptCache = std::vector<std::shared_ptr<Cache>>;
/// User metadata stored beside the caches (string to string).
using Metadata = std::map<std::string, std::string>;

/// Limits a file must keep to.
inline constexpr uint64_t kMaxHeaderBytes = 64ull << 20;
inline constexpr int kMaxDepth = 16; ///< nesting of state paths
inline constexpr int kMaxNdim = 8;
inline constexpr size_t kMaxString = 1 << 16; ///< code points in a string
inline constexpr size_t kMaxEntries = 1 << 20; ///< tensors or metadata keys

/// Save `caches` to `path` in mlx-lm 0.32's layout, with `metadata`. As with
/// mlx, ".safetensors" is appended to a path without it. Throws ValueError
/// for a state deeper than kMaxDepth and whatever mlx throws on I/O.
void save_prompt_cache(
    const std::string& path,
    const PromptCache& caches,
    const Metadata& metadata = {});

struct LoadedPromptCache {
  PromptCache caches;
  Metadata metadata;
};

/// Load a prompt cache written by kvcore or mlx-lm (0.32's layout or the
/// older meta_state one). Throws ValueError for a missing, unreadable or
/// malformed file; see the top of this header for what is checked.
LoadedPromptCache load_prompt_cache(const std::string& path);

/// load_prompt_cache from a file's bytes in memory: every array is read
/// from `bytes` and the caches are evaluated on the calling thread before
/// this returns, so nothing refers to a file or to this thread's stream.
/// With `evaluate` false the arrays are left to the caller to evaluate on
/// its own thread, with others in one mx::eval (they read only `bytes`).
LoadedPromptCache load_prompt_cache_bytes(std::shared_ptr<const std::string> bytes, bool evaluate = true);

// The layer below, for callers whose caches are not C++ objects (the
// Python package saves Python caches' states through it).

/// One layer as a file holds it: the class name and its 0.32 state.
struct NamedState {
  std::string name;
  StateValue state;
};

enum class FileLayout { Current, MetaState };

struct PromptCacheStates {
  std::vector<NamedState> layers;
  Metadata metadata;
  FileLayout layout = FileLayout::Current;
};

/// Write layers' states (any names) in mlx-lm 0.32's layout.
void save_prompt_cache_states(
    const std::string& path,
    const std::vector<NamedState>& layers,
    const Metadata& metadata = {});

/// A file's contents, ready to write from any thread: its tensors, each
/// evaluated and row-contiguous, and its header's metadata.
struct PreparedFile {
  std::unordered_map<std::string, mx::array> arrays;
  std::unordered_map<std::string, std::string> metadata;
};

/// save_prompt_cache_states in two steps: the file's contents (every check
/// is here, and every mlx op), then the write (mlx's safetensors writer).
PreparedFile prepare_prompt_cache_states(const std::vector<NamedState>& layers, const Metadata& metadata);
PreparedFile prepare_prompt_cache(const PromptCache& caches, const Metadata& metadata);
void write_prepared(const std::string& path, PreparedFile file);

/// Read and check a file down to its layers' states; names are checked
/// against the class table and meta_state-layout states are converted to
/// 0.32 states. The arrays are mlx's lazy loads of the file.
PromptCacheStates load_prompt_cache_states(const std::string& path);

/// What a safetensors header says of one tensor.
struct TensorInfo {
  std::string name;
  std::string dtype; ///< safetensors' name: "F16", "I32", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0; ///< data offsets, relative to the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;
  Metadata metadata;
  uint64_t file_bytes = 0;
};

/// The checked safetensors header of `path`; reads nothing past it.
SafetensorsHeader read_safetensors_header(const std::string& path);
/// The checked safetensors header of a whole file's bytes.
SafetensorsHeader parse_safetensors_header(const std::string& bytes);

} // namespace kvcore
