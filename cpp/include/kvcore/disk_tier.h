// LRUPromptCache's disk tier: entries as prompt-cache files in one
// directory, found again after a restart.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvcore/disk_blocks.h"
#include "kvcore/files.h"
#include "kvcore/prompt_trie.h"

namespace kvcore {

/// An entry's chain of blocks before its tail (none: blocks == 0).
struct DiskChain {
  int64_t blocks = 0;
  int block_tokens = 0;
  uint64_t last = 0; ///< the chain hash of the last block
  std::string layout;
};

/// The files of a disk tier. An entry is a chain of blocks (disk_blocks.h:
/// the attention layers' keys and values, block_tokens tokens each, each
/// block written once and shared by every entry through it) and a tail: a
/// prompt-cache file in kvcore's checked format whose metadata names its
/// model, its tokens past the chain, the chain's last block, cache type and
/// whether it can be trimmed, and which holds the rest (the partial last
/// block, other caches whole). An entry without blocks is one whole
/// prompt-cache file, as the tier wrote them before blocks. A tail's name
/// is a hash of model and all tokens and a 64-bit hash of the whole file;
/// a block's, "blk-<chain>-<file hash>.safetensors". A directory is read at construction
/// (headers only) and again whenever it changed (sync(): several processes
/// may share one directory, each seeing the others' files and bounding them
/// all by `max_bytes`): files that do not parse or do not name an entry are
/// refused, and so is a file that later fails its checks; a refused file is
/// noted in errors() and deleted, never served. Files past `max_bytes` go
/// least recently used first, never a block that a stored block or tail
/// continues (a chain loses its end first); use is the file's mtime, set
/// when it is read. The hash catches truncated and altered files, not a forger
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
  using Chain = DiskChain;
  struct Entry {
    std::string path; ///< the tail, or the whole entry
    std::string type;
    bool trimmable = false;
    int64_t bytes = 0; ///< of the tail
    Chain chain;
    int64_t used = 0; ///< mtime, ns
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

  /// The metadata an entry's file carries (its tail's, past `chain`).
  static Metadata metadata(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable,
      const Chain& chain = {});

  /// Throws ValueError unless metadata (a loaded file's) names this model,
  /// these tokens and this chain.
  static void check_entry(
      const Metadata& metadata,
      const std::string& model,
      const Tokens& tokens,
      const Chain& chain = {});

  /// The block with this chain hash is on disk or queued.
  bool has_block(uint64_t chain) const;
  /// Queue a block's file (its header and its rows of every layer, made
  /// ready to write here); nothing if it is on disk or queued, or the tier
  /// is closed. Write an entry's blocks before its tail.
  void write_block(const BlockHeader& header, const std::vector<BlockLayer>& rows);
  /// Blocks [first, count) of the chain of `tokens` (model, layout, block
  /// size), each read, checked against its name, header, parent and these
  /// tokens, and evaluated; per block, per layer. The files are read and
  /// hashed on a few threads at once, then checked and evaluated here in
  /// order. nullopt when one is not on disk (a chain with a hole ends
  /// there: a miss) or is refused.
  std::optional<std::vector<std::vector<BlockLayer>>> load_blocks(
      const std::string& model,
      const Tokens& tokens,
      const Chain& chain,
      int64_t first,
      int64_t count);
  /// Blocks indexed.
  int64_t block_count() const;
  /// Blocks load_blocks read from files (and served).
  int64_t blocks_read() const;

  /// Queue an entry's file (prepare_prompt_cache*) to be written, then
  /// indexed, deleting the oldest files past max_bytes (a file larger than
  /// max_bytes is not kept). Nothing if the entry is on disk or queued, or
  /// the tier is closed. A write that fails is noted in errors().
  void write(
      const std::string& model,
      const Tokens& tokens,
      const std::string& type,
      bool trimmable,
      PreparedFile file,
      const Chain& chain = {});
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
    Chain chain;
    std::optional<BlockHeader> block; // a block's file, not an entry's
  };
  struct Found {
    std::string model;
    Tokens tokens; // past the chain until resolved
    Entry entry;
  };
  struct Block {
    std::string path;
    BlockHeader header;
    int64_t bytes = 0;
    int64_t used = 0;
    int children = 0; // blocks and tails indexed after it
  };
  void scan();
  /// The entry a file's header names; throws ValueError.
  static Found read_entry(const std::string& path);
  void add(Found f); // lock held
  // Prepend the chain's tokens to f's; false if a block is not indexed.
  bool resolve(Found& f) const; // lock held
  void add_block(const std::string& path, BlockHeader h, int64_t bytes, int64_t used); // lock held
  // Unindex a block, what continues it, and (delete_file) their files.
  void remove_block(uint64_t chain, bool delete_file); // lock held
  void link(const Chain& c, int sign); // lock held
  void evict(); // down to max_bytes, least recently used leaves first; lock held
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
  int64_t blocks_read_ = 0;
  int64_t dir_stamp_ = -1; // the directory's mtime when last synced
  PromptTrie<std::string, Entry> index_;
  std::deque<Key> order_; // oldest first
  std::deque<std::string> errors_;
  mutable std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::deque<Job> queue_;
  std::set<uint64_t> queued_; // hashes of queued keys
  std::set<uint64_t> queued_blocks_; // chains of queued blocks
  std::map<uint64_t, Block> blocks_; // by chain
  std::map<std::string, int64_t> orphans_; // tails whose chain is not (yet) indexed: first seen
  bool busy_ = false;
  bool stop_ = false;
  bool closed_ = false;
  std::unique_ptr<std::thread> writer_; // started by the first write()
};

/// Wait until every live DiskTier has written what is queued (Python calls
/// it at exit).
void flush_disk_tiers();

} // namespace kvcore
