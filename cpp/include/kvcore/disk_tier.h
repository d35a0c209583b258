// LRUPromptCache's disk tier: entries as prompt-cache files in one
// directory, found again after a restart.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
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
/// Files are written by a thread of the tier's own (write() queues them),
/// so a caller pays for preparing a file's arrays, not for the disk. Every
/// call may come from any thread (one internal lock). Destruction, and
/// flush_disk_tiers(), wait for queued files; a process killed first loses
/// them (and leaves a ".tmp-" file, which is never indexed).
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
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  const std::string& dir() const {
    return dir_;
  }
  int64_t max_bytes() const {
    return max_bytes_;
  }
  /// Bytes and entries of the files written so far.
  int64_t nbytes() const;
  int64_t size() const;
  /// fn(index) under the tier's lock; the index maps model name and tokens
  /// to entries.
  template <class Fn>
  auto with_index(Fn fn) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fn(static_cast<const PromptTrie<std::string, Entry>&>(index_));
  }
  std::optional<Entry> entry(const std::string& model, const Tokens& tokens) const;
  /// On disk or queued.
  bool contains(const std::string& model, const Tokens& tokens) const;

  /// The metadata an entry's file carries.
  static Metadata metadata(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable);

  /// Throws ValueError unless metadata (a loaded file's) names this model
  /// and these tokens.
  static void check_entry(const Metadata& metadata, const std::string& model, const Tokens& tokens);

  /// Queue an entry's file (prepare_prompt_cache*) to be written, then
  /// indexed, deleting the oldest files past max_bytes (a file larger than
  /// max_bytes is not kept). Nothing if the entry is on disk or queued. A
  /// write that fails is noted in errors().
  void write(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable,
      PreparedFile file);
  /// Wait until every queued file is written or refused.
  void flush();

  /// The path of the entry at (model, tokens) once its file passes its
  /// hash check; ValueError otherwise (the caller refuse()s it).
  std::string checked_path(const std::string& model, const Tokens& tokens) const;
  /// Take an entry out of the index (its file failed to load), noting why.
  void refuse(const std::string& model, const Tokens& tokens, const std::string& why);

  /// Why files were skipped, refused or not written, latest last (at most 64).
  std::vector<std::string> errors() const;

 private:
  struct Key {
    std::string model;
    Tokens tokens;
  };
  struct Job {
    Key key;
    std::string type;
    bool trimmable;
    PreparedFile file;
  };
  void index_file(const std::string& path);
  bool has(const std::string& model, const Tokens& tokens) const; // on disk or queued; lock held
  void run();
  std::string temp_path() const;
  void commit(const Job& job, const std::string& written, const std::string& path, int64_t bytes);
  void remove(const std::string& model, const Tokens& tokens, bool delete_file);
  void note(std::string why);

  std::string dir_;
  int64_t max_bytes_;
  int64_t bytes_ = 0;
  PromptTrie<std::string, Entry> index_;
  std::deque<Key> order_; // oldest first
  std::deque<std::string> errors_;
  mutable std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::deque<Job> queue_;
  std::set<uint64_t> queued_; // hashes of queued keys
  bool busy_ = false;
  bool stop_ = false;
  std::thread writer_; // started by the first write()
};

/// Wait until every live DiskTier has written what is queued (Python calls
/// it at exit).
void flush_disk_tiers();

} // namespace kvcore
