// LRUPromptCache's disk tier: entries as prompt-cache files in one
// directory, found again after a restart.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
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
/// 64-bit hash of the whole file. A directory is read at construction
/// (headers only) and again whenever it changed (sync(): several processes
/// may share one directory, each seeing the others' files and bounding them
/// all by `max_bytes`): files that do not parse or do not name an entry are
/// refused, and so is a file that later fails its checks; a refused file is
/// noted in errors() and deleted, never served. Files past `max_bytes` go
/// oldest first. The hash catches truncated and altered files, not a forger
/// who recomputes it: whoever can write the directory is trusted that far.
///
/// A load reads the file into memory once, hashes those bytes and parses
/// the caches from them, evaluated on the loading thread: what was checked
/// is what is served, and it refers to no file and no thread's stream.
///
/// Files are written by a thread of the tier's own (write() queues them),
/// so a caller pays for preparing a file's arrays, not for the disk. Every
/// call may come from any thread (one internal lock). close(), destruction
/// and flush_disk_tiers() wait for queued files. A file is written under a
/// temporary name ".tmp-<host>-<pid>-<random>.safetensors", then renamed: a
/// process killed first leaves only that, which the next tier opened on the
/// directory deletes once no process of that pid is alive on this host.
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
  /// Bytes and entries of the files indexed.
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
  /// max_bytes is not kept). Nothing if the entry is on disk or queued, or
  /// the tier is closed. A write that fails is noted in errors().
  void write(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable,
      PreparedFile file);
  /// Wait until every queued file is written or refused.
  void flush();
  /// Write what is queued, stop the writer and write nothing more; returns
  /// how many files this tier wrote. Later calls return the same.
  int64_t close();
  bool closed() const;

  /// The caches of the entry at (model, tokens), checked (see above) and
  /// evaluated. nullopt when it is not indexed, when its file is gone
  /// (another process deleted it: a miss), or when it fails a check (then
  /// it is refused: noted, unindexed and deleted).
  std::optional<LoadedPromptCache> load(const std::string& model, const Tokens& tokens);
  /// Refuse the entry at (model, tokens): note why, unindex it and delete
  /// its file.
  void refuse(const std::string& model, const Tokens& tokens, const std::string& why);

  /// Index the files other processes wrote since the directory last
  /// changed, unindex those they deleted, then delete the oldest past
  /// max_bytes, whoever wrote them. The writer calls it after each file;
  /// a stat of the directory when nothing changed.
  void sync();

  /// Why files were refused, removed or not written, latest last (at most
  /// 64), one line each: "<file name>: <reason>".
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
  struct Found {
    std::string model;
    Tokens tokens;
    Entry entry;
  };
  void scan();
  /// The entry a file's header names; throws ValueError.
  static Found read_entry(const std::string& path);
  void add(Found f); // lock held
  void evict(); // down to max_bytes, oldest first; lock held
  bool has(const std::string& model, const Tokens& tokens) const; // on disk or queued; lock held
  void run();
  std::string create_temp() const;
  void commit(const Job& job, const std::string& written, const std::string& path, int64_t bytes);
  void remove(const std::string& model, const Tokens& tokens, bool delete_file);
  void note(const std::string& file, const std::string& why);

  std::string dir_;
  int64_t max_bytes_;
  int64_t bytes_ = 0;
  int64_t written_ = 0;
  int64_t dir_stamp_ = -1; // the directory's mtime when last synced
  PromptTrie<std::string, Entry> index_;
  std::deque<Key> order_; // oldest first
  std::deque<std::string> errors_;
  mutable std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::deque<Job> queue_;
  std::set<uint64_t> queued_; // hashes of queued keys
  bool busy_ = false;
  bool stop_ = false;
  bool closed_ = false;
  std::unique_ptr<std::thread> writer_; // started by the first write()
};

/// Wait until every live DiskTier has written what is queued (Python calls
/// it at exit).
void flush_disk_tiers();

} // namespace kvcore
