// LRUPromptCache's disk tier: entries as prompt-cache files in one
// directory, found again after a restart.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "kvcore/files.h"
#include "kvcore/prompt_trie.h"

namespace kvcore {

/// The files of a disk tier. Each entry is a prompt-cache file in kvcore's
/// checked format whose metadata names its model, tokens, cache type and
/// whether it can be trimmed; its name is a hash of model and tokens and a
/// 64-bit hash of the whole file, checked before the file is loaded. A
/// directory is read at construction (headers only); files that do not
/// parse or do not name an entry are skipped, and so is a file that later
/// fails its check: it is never served. Files past `max_bytes` go oldest
/// first. The hash catches truncated and altered files, not a forger who
/// recomputes it: whoever can write the directory is trusted that far.
///
/// Not synchronized: LRUPromptCache serializes its calls.
class DiskTier {
 public:
  struct Entry {
    std::string path;
    std::string type;
    bool trimmable = false;
    int64_t bytes = 0;
  };

  /// Creates `dir` if needed. Throws ValueError if it cannot.
  DiskTier(std::string dir, int64_t max_bytes);

  const std::string& dir() const {
    return dir_;
  }
  int64_t max_bytes() const {
    return max_bytes_;
  }
  int64_t nbytes() const {
    return bytes_;
  }
  int64_t size() const {
    return static_cast<int64_t>(order_.size());
  }
  /// The index: model name and tokens to entries.
  const PromptTrie<std::string, Entry>& index() const {
    return index_;
  }
  bool contains(const std::string& model, const Tokens& tokens) const {
    return index_.get(model, tokens) != nullptr;
  }

  /// The metadata an entry's file carries.
  static Metadata metadata(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable);

  /// Throws ValueError unless metadata (a loaded file's) names this model
  /// and these tokens.
  static void check_entry(const Metadata& metadata, const std::string& model, const Tokens& tokens);

  /// Where to write a new entry's file before commit().
  std::string temp_path() const;
  /// Index the file written at temp_path (renamed to its checked name),
  /// then delete the oldest files past max_bytes. A file larger than
  /// max_bytes is deleted at once.
  void commit(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable,
      const std::string& written);

  /// The path of the entry at (model, tokens) once its file passes its
  /// hash check; ValueError otherwise (the caller refuse()s it).
  std::string checked_path(const std::string& model, const Tokens& tokens);
  /// Take an entry out of the index (its file failed to load), noting why.
  void refuse(const std::string& model, const Tokens& tokens, const std::string& why);

  /// Why files were skipped or refused, latest last (at most 64).
  const std::deque<std::string>& errors() const {
    return errors_;
  }

 private:
  struct Key {
    std::string model;
    Tokens tokens;
  };
  void index_file(const std::string& path);
  void remove(const std::string& model, const Tokens& tokens, bool delete_file);
  void note(std::string why);

  std::string dir_;
  int64_t max_bytes_;
  int64_t bytes_ = 0;
  PromptTrie<std::string, Entry> index_;
  std::deque<Key> order_; // oldest first
  std::deque<std::string> errors_;
};

} // namespace kvcore
