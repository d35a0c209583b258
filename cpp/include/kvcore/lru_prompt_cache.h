// LRUPromptCache: the finished prompt caches a server keeps across
// requests, under a count and a byte budget, with mlx-lm 0.32.2's matching
// and eviction rules; keys and values shared between entries stored once,
// and a disk tier.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <mlx/ops.h>
#include <mlx/transforms.h>

#include "kvcore/buffer.h"
#include "kvcore/disk_tier.h"
#include "kvcore/errors.h"
#include "kvcore/kv_store.h"
#include "kvcore/prompt_trie.h"

namespace kvcore {

/// mlx-lm's LRUPromptCache over any cache-list type. `Ops` provides
///   static int64_t nbytes(const Caches&);
///   static bool can_trim(const Caches&);
///   static Caches copy(const Caches&);        // a fresh, independent copy
///   static void trim(Caches&, int n);
///   // The arrays of the plain KVCache layers holding tokens and their
///   // common offset (false when there are none, or offsets differ); where
///   // other layers sit beside them, `rest` is an independent copy of
///   // caches with every such KVCache emptied (else nullopt) ...
///   static bool share(const Caches&, std::vector<LayerKV>*, int* offset,
///                     std::optional<Caches>* rest);
///   // ... and fresh caches from those arrays: plain KVCaches, or a copy of
///   // `rest` with its empty KVCaches filled in order.
///   static Caches build(std::vector<LayerKV> layers, int offset, const Caches* rest);
///   // For the disk tier: a stable name of the model, the caches to a
///   // prompt-cache file, and the caches of a file the tier loaded.
///   static std::string model_name(const Model&);
///   static PreparedFile prepare(const Caches&, const Metadata&);
///   static Caches from_file(LoadedPromptCache loaded);
///   // Optional, for the disk tier's blocks: every layer of caches in order,
///   // as the KVCache or QuantizedKVCache it is (nullptr for any other
///   // layer, a subclass too). Without it, entries go to disk as whole files.
///   static std::vector<Cache*> cache_layers(const Caches&);
/// and `Mutex` serializes every call (lock()/unlock()), so any calls may
/// run concurrently from several threads.
///
/// Entries are evicted least recently inserted first, taking from the
/// "assistant" queue while it is at least as long as "user", then "user"
/// against "system" (mlx-lm's order). Inserting a trimmable cache drops the
/// entries stored at its prefixes (the new one serves them by trimming).
///
/// With `share` (the default), the plain KVCache layers of entries keep
/// their keys and values in a SharedKVStore (other layers beside them, such
/// as state-space slots, are held as given), so tokens several entries
/// share are stored once; nbytes() counts the store's buffers once, and an evicted
/// entry frees only what no other entry uses. Fetching such an entry builds
/// fresh KVCaches from the store (views where one stored run covers a layer,
/// else one copy). Without `share`, every entry holds its caches as given,
/// as mlx-lm's does.
///
/// With a disk tier (`disk_dir`), every inserted entry is also written to a
/// file there (DiskTier, on a thread of its own: the insert prepares the
/// file's arrays, the disk is not waited for), so entries outlive eviction
/// and the process; a fetch that disk covers better than memory loads from
/// it. Processes sharing one directory see each other's files (a fetch
/// first syncs the tier). close() writes the queue and stops the writer.
///
/// Prefill checkpoints (insert_checkpoint) are snapshots of caches that
/// cannot be trimmed (a rotating window after it wraps, state-space
/// slots), taken at chunk boundaries while a prompt is prefilled, so a later
/// prompt that shares only part of it resumes from the longest checkpoint
/// within the shared part. They are matched as entries are (exact or
/// shorter), counted in nbytes() but not in size() or max_size, kept up to
/// max_checkpoints (least recently inserted or served evicted first) and
/// evicted before any entry when bytes run over.
template <class Model, class Caches, class Ops, class Mutex = std::mutex,
          class ModelEq = std::equal_to<Model>>
class LRUPromptCache {
 public:
  static constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

  explicit LRUPromptCache(
      int64_t max_size = 10,
      int64_t max_bytes = kUnlimited,
      bool share = true,
      const std::string& disk_dir = "",
      int64_t disk_bytes = kUnlimited,
      int64_t max_checkpoints = 8,
      int64_t checkpoint_every = 0,
      int disk_block_tokens = 256)
      : max_size_(max_size),
        max_bytes_(max_bytes),
        max_checkpoints_(max_checkpoints),
        checkpoint_every_(checkpoint_every),
        block_tokens_(std::max(0, disk_block_tokens)),
        share_(share) {
    if (!disk_dir.empty()) {
      disk_ = std::make_unique<DiskTier>(disk_dir, disk_bytes);
    }
    for (const auto& t : ordering()) {
      lrus_[t];
      bytes_by_type_[t] = 0;
    }
    lrus_[checkpoint_type()];
    bytes_by_type_[checkpoint_type()] = 0;
  }

  static const std::vector<std::string>& ordering() {
    return cache_type_order();
  }

  /// A copy of the cache stored for the longest usable match and the
  /// tokens it does not cover; (nullopt, tokens) when nothing matches.
  /// With a disk tier, an entry on disk that covers more is loaded (its
  /// file checked), kept in memory again and served; a file that fails
  /// its checks is skipped for good (see disk_errors()).
  std::pair<std::optional<Caches>, Tokens> fetch_nearest_cache(
      const Model& model,
      const Tokens& tokens) {
    std::lock_guard<Mutex> lock(mutex_);
    auto m = nearest(trie_, model, tokens, [](const Entry& e) {
      return e.trimmable;
    });
    if (disk_ && !disk_->closed()) {
      disk_->sync(); // files other processes wrote or deleted
      const std::string name = Ops::model_name(model);
      auto d = disk_->with_index([&](const PromptTrie<std::string, DiskTier::Entry>& index) {
        return nearest(index, name, tokens, [](const DiskTier::Entry& e) { return e.trimmable; });
      });
      if (d && (!m || d->covered > m->covered)) {
        if (auto c = load_from_disk(model, name, *d, m)) {
          return {std::move(*c), Tokens(tokens.begin() + static_cast<long>(d->covered), tokens.end())};
        }
      }
    }
    if (!m) {
      return {std::nullopt, tokens};
    }
    const Entry& e = *trie_.get(model, m->key);
    if (e.type == checkpoint_type()) {
      remove_from_lru(model, m->key); // served: the most recent checkpoint now
      lrus_[checkpoint_type()].emplace_back(model, m->key);
    }
    return {caches_of(e, m->trim),
            Tokens(tokens.begin() + static_cast<long>(m->covered), tokens.end())};
  }

  /// Store caches for tokens (replacing an entry at the same tokens), then
  /// evict down to max_size entries and max_bytes.
  void insert_cache(
      const Model& model,
      const Tokens& tokens,
      Caches caches,
      const std::string& cache_type = "assistant") {
    std::lock_guard<Mutex> lock(mutex_);
    check_type(cache_type);
    insert_locked(model, tokens, std::move(caches), cache_type, true);
  }

  /// Keep an independent copy of caches, which hold the first
  /// tokens.size() tokens of a prompt being prefilled, as a checkpoint (the
  /// caller goes on updating its caches). Returns false, keeping nothing,
  /// when max_checkpoints is 0, an entry that is not a checkpoint holds
  /// these tokens, or a stored prefix lies fewer than checkpoint_every
  /// tokens back. Then evicts down to max_checkpoints and max_bytes.
  bool insert_checkpoint(const Model& model, const Tokens& tokens, const Caches& caches) {
    std::lock_guard<Mutex> lock(mutex_);
    if (max_checkpoints_ <= 0 || tokens.size() < 2) {
      return false;
    }
    PromptTrieResult r = trie_.search(model, tokens);
    if (r.exact && trie_.get(model, tokens)->type != checkpoint_type()) {
      return false;
    }
    if (!r.exact && r.shorter && checkpoint_every_ > 0 &&
        static_cast<int64_t>(tokens.size() - r.shorter->size()) < checkpoint_every_) {
      return false;
    }
    insert_locked(model, tokens, Ops::copy(caches), checkpoint_type(), true);
    return true;
  }

  /// Evict down to n_sequences entries and n_bytes (nullopt: no limit).
  void trim_to(std::optional<int64_t> n_sequences, std::optional<int64_t> n_bytes) {
    std::lock_guard<Mutex> lock(mutex_);
    const int64_t seqs = n_sequences ? std::max<int64_t>(0, *n_sequences) : kUnlimited;
    const int64_t bytes = n_bytes ? std::max<int64_t>(0, *n_bytes) : kUnlimited;
    while (size() > seqs) {
      evict_one();
    }
    evict_to_bytes(bytes);
  }
  struct TypeStats {
    int64_t n_sequences;
    int64_t n_bytes;
  };
  /// Per cache type, in eviction order: entries and bytes.
  std::vector<std::pair<std::string, TypeStats>> stats_by_type() const {
    std::lock_guard<Mutex> lock(mutex_);
    std::vector<std::pair<std::string, TypeStats>> out;
    auto add = [&](const std::string& t) {
      out.push_back({t, {static_cast<int64_t>(lrus_.at(t).size()),
                         bytes_by_type_.at(t) + store_.nbytes(type_index(t))}});
    };
    for (const auto& t : ordering()) {
      add(t);
    }
    if (checkpoint_count() > 0) { // listed only while there are some
      add(checkpoint_type());
    }
    return out;
  }

  /// Entries, checkpoints not counted.
  int64_t size() const {
    int64_t n = 0;
    for (const auto& t : ordering()) {
      n += static_cast<int64_t>(lrus_.at(t).size());
    }
    return n;
  }
  /// Prefill checkpoints held.
  int64_t checkpoint_count() const {
    return static_cast<int64_t>(lrus_.at(checkpoint_type()).size());
  }
  /// Bytes held: entries' caches as given plus the shared store's buffers.
  int64_t nbytes() const {
    std::lock_guard<Mutex> lock(mutex_);
    return nbytes_locked();
  }
  bool share() const {
    return share_;
  }
  /// The disk tier's directory ("" without one), files and their bytes.
  std::string disk_dir() const {
    return disk_ ? disk_->dir() : std::string();
  }
  /// Entries and bytes of the disk tier's files (other processes' too),
  /// once what is queued is written.
  int64_t disk_size() const {
    sync_disk();
    return disk_ ? disk_->size() : 0;
  }
  /// Blocks of the disk tier's chains (other processes' too).
  int64_t disk_blocks() const {
    sync_disk();
    return disk_ ? disk_->block_count() : 0;
  }
  /// Blocks this cache read from disk and served (blocks memory held
  /// are not read).
  int64_t disk_blocks_read() const {
    return disk_ ? disk_->blocks_read() : 0;
  }
  /// Tokens per disk block (0: entries as whole files).
  int disk_block_tokens() const {
    return block_tokens_;
  }
  int64_t disk_nbytes() const {
    sync_disk();
    return disk_ ? disk_->nbytes() : 0;
  }
  /// Why disk files were refused, removed or not written, latest last:
  /// "<file name>: <reason>" each.
  std::vector<std::string> disk_errors() const {
    flush();
    return disk_ ? disk_->errors() : std::vector<std::string>{};
  }
  /// flush(), then see what other processes did in the directory.
  void sync_disk() const {
    flush();
    if (disk_ && !disk_->closed()) {
      disk_->sync();
    }
  }
  /// Wait until the disk tier has written every entry inserted so far.
  void flush() const {
    if (disk_) {
      disk_->flush();
    }
  }
  /// Write what is queued for disk and stop the disk tier's writer; from
  /// then on only memory is used. Returns how many files the tier wrote
  /// (0 without one); later calls return the same.
  int64_t close() {
    return disk_ ? disk_->close() : 0;
  }
  int64_t max_size() const {
    return max_size_;
  }
  void set_max_size(int64_t v) {
    max_size_ = v;
  }
  int64_t max_bytes() const {
    return max_bytes_;
  }
  void set_max_bytes(int64_t v) {
    max_bytes_ = v;
  }
  int64_t max_checkpoints() const {
    return max_checkpoints_;
  }
  /// Evicts checkpoints past the new limit at once.
  void set_max_checkpoints(int64_t v) {
    std::lock_guard<Mutex> lock(mutex_);
    max_checkpoints_ = v;
    while (checkpoint_count() > std::max<int64_t>(0, v)) {
      evict_checkpoint();
    }
  }
  /// The fewest tokens between a checkpoint and the stored prefix before
  /// it (0: any chunk boundary).
  int64_t checkpoint_every() const {
    return checkpoint_every_;
  }
  void set_checkpoint_every(int64_t v) {
    checkpoint_every_ = v;
  }

 private:
  struct Entry {
    // Without a span: the caches as given. With one: the KVCaches' keys and
    // values are in the store, and `caches` holds the other layers beside
    // them (KVCaches emptied), if there are any.
    std::optional<Caches> caches;
    SharedKVStore::Span span;
    int64_t nbytes; // of caches
    std::string type;
    bool trimmable = true;
  };
  using Key = std::pair<Model, Tokens>;

  static void check_type(const std::string& t) {
    if (static_cast<size_t>(type_index(t)) < ordering().size()) {
      return;
    }
    throw KeyError("LRUPromptCache.insert_cache", "cache_type among assistant, user, system",
                   "'" + t.substr(0, 40) + "'");
  }

  void forget(const Entry& e) {
    n_bytes_ -= e.nbytes;
    bytes_by_type_[e.type] -= e.nbytes;
    if (e.span.leaf) {
      store_.release(e.span);
    }
  }


  // insert_cache (or a checkpoint's) under the lock; `to_disk` writes the
  // entry through to the disk tier (not when it came from there).
  void insert_locked(
      const Model& model,
      const Tokens& tokens,
      Caches caches,
      const std::string& cache_type,
      bool to_disk) {
    const bool checkpoint = cache_type == checkpoint_type();
    // Read everything that may throw before changing anything.
    Entry entry{std::nullopt, {}, 0, cache_type};
    std::vector<LayerKV> layers;
    int offset = 0;
    std::optional<Caches> rest;
    entry.trimmable = Ops::can_trim(caches);
    if (share_ && Ops::share(caches, &layers, &offset, &rest) && offset > 0 &&
        static_cast<size_t>(offset) <= tokens.size()) {
      if (rest) { // the layers beside the KVCaches, held as given
        entry.nbytes = Ops::nbytes(*rest);
      }
      const std::string group = SharedKVStore::group_of(model_id(model), layers, offset);
      entry.span = store_.hold(group, tokens, offset, layers, type_index(cache_type));
    } else {
      entry.nbytes = Ops::nbytes(caches);
      rest.reset();
    }
    const bool trimmable = entry.trimmable;
    if (to_disk && disk_ && !disk_->closed()) {
      write_through(model, tokens, caches, cache_type, trimmable);
    }
    if (!entry.span.leaf) {
      entry.caches = std::move(caches);
    } else {
      entry.caches = std::move(rest);
    }
    n_bytes_ += entry.nbytes;
    bytes_by_type_[cache_type] += entry.nbytes;
    std::optional<Entry> prev = trie_.add(model, tokens, std::move(entry));
    if (prev) {
      forget(*prev);
      remove_from_lru(model, tokens);
    }
    lrus_[cache_type].emplace_back(model, tokens);
    if (trimmable && !checkpoint) {
      for (auto& [len, e] : trie_.pop_prefixes(model, tokens)) {
        forget(e);
        remove_from_lru(model, Tokens(tokens.begin(), tokens.begin() + len));
      }
    }
    if (checkpoint) {
      while (checkpoint_count() > max_checkpoints_) {
        evict_checkpoint();
      }
    } else if (size() > max_size_) {
      evict_one();
    }
    evict_to_bytes(max_bytes_);
  }

  /// Evict, checkpoints first, until nbytes() <= bytes or nothing is left.
  void evict_to_bytes(int64_t bytes) {
    while (nbytes_locked() > bytes && checkpoint_count() > 0) {
      evict_checkpoint();
    }
    while (nbytes_locked() > bytes && size() > 0) {
      evict_one();
    }
  }

  int64_t nbytes_locked() const {
    return n_bytes_ + store_.nbytes();
  }

  /// mlx-lm's choice among the exact, longer and shorter entries: which
  /// entry, how many of its tokens to trim, and how many of the query's
  /// tokens it covers.
  struct Match {
    Tokens key;
    int trim = 0;
    size_t covered = 0;
  };
  template <class M, class V, class Eq, class CanTrim>
  static std::optional<Match> nearest(
      const PromptTrie<M, V, Eq>& trie,
      const M& model,
      const Tokens& tokens,
      CanTrim can_trim) {
    PromptTrieResult r = trie.search(model, tokens);
    if (r.exact) {
      return Match{*r.exact, 0, tokens.size()};
    }
    const size_t short_length = r.shorter ? r.shorter->size() : 0;
    if (r.longer && static_cast<size_t>(r.common_prefix) > short_length &&
        can_trim(*trie.get(model, *r.longer))) {
      size_t prefix = std::min(tokens.size() - 1, static_cast<size_t>(r.common_prefix));
      return Match{*r.longer, static_cast<int>(r.longer->size() - prefix), prefix};
    }
    if (short_length > 0) {
      return Match{*r.shorter, 0, short_length};
    }
    return std::nullopt;
  }

  /// Queue caches to be written through to the disk tier unless it holds
  /// the entry: the whole blocks of its KVCache and QuantizedKVCache layers
  /// (block_layers) the tier lacks, then a tail with the rest. A failure (disk full, a cache that cannot be
  /// saved) is noted, not raised: the entry stays in memory.
  void write_through(
      const Model& model,
      const Tokens& tokens,
      const Caches& caches,
      const std::string& type,
      bool trimmable) {
    const std::string name = Ops::model_name(model);
    if (disk_->contains(name, tokens)) {
      return;
    }
    try {
      DiskTier::Chain chain;
      std::optional<Caches> tail;
      const int bt = block_tokens_;
      std::optional<BlockLayers> bl = bt > 0 ? block_layers(caches) : std::nullopt;
      // Blocks of the tokens every layer holds in its arrays (a
      // rotated_channel layer's float residual stays in the tail).
      int held = std::numeric_limits<int>::max();
      bool fits = bl.has_value();
      for (const BlockLayer& l : bl ? bl->layers : std::vector<BlockLayer>{}) {
        held = std::min(held, l.tokens);
        fits = fits && l.offset == bl->layers[0].offset && block_aligned(l, bt);
      }
      if (fits && held >= bt && static_cast<size_t>(bl->layers[0].offset) <= tokens.size()) {
        chain.block_tokens = bt;
        chain.blocks = held / bt;
        chain.layout = block_layout(bl->layers);
        for (int64_t j = 0; j < chain.blocks; ++j) {
          BlockHeader h{name, chain.layout, bt, j, chain.last, 0,
                        Tokens(tokens.begin() + j * bt, tokens.begin() + (j + 1) * bt)};
          h.chain = block_chain(h.parent, name, h.layout, bt, h.tokens.data(), h.tokens.size());
          if (!disk_->has_block(h.chain)) {
            std::vector<BlockLayer> rows;
            for (const auto& l : bl->layers) {
              rows.push_back(block_rows(l, static_cast<int>(j * bt), static_cast<int>((j + 1) * bt)));
            }
            disk_->write_block(h, rows);
          }
          chain.last = h.chain;
        }
        // The tail: the caches less the tokens of their blocks.
        tail = Ops::copy(caches);
        std::optional<BlockLayers> tl = block_layers(*tail);
        for (size_t i = 0; i < tl->layers.size(); ++i) {
          rebuild_layer(*tl->caches[i], tl->layers[i], {}, static_cast<int>(chain.blocks * bt), true);
        }
      }
      disk_->write(name, tokens, type, trimmable,
                   Ops::prepare(tail ? *tail : caches, DiskTier::metadata(name, tokens, type, trimmable, chain)),
                   chain);
    } catch (const std::exception& e) {
      disk_->refuse(name, tokens, std::string("not written: ") + e.what());
    }
  }

  /// The caches of disk match d, kept in memory again, less d.trim tokens;
  /// nullopt if a file is gone or refused (see DiskTier::load). The blocks
  /// of d's chain that memory match m holds are taken from memory.
  std::optional<Caches> load_from_disk(
      const Model& model,
      const std::string& name,
      const Match& d,
      const std::optional<Match>& m) {
    const std::optional<DiskTier::Entry> info = disk_->entry(name, d.key);
    if (!info) {
      return std::nullopt;
    }
    std::optional<LoadedPromptCache> file = disk_->load(name, d.key);
    if (!file) {
      return std::nullopt;
    }
    Caches loaded;
    size_t held = d.key.size(); // the tokens `loaded` is kept in memory for
    int trim = d.trim; // and how many of them to trim to serve
    try {
      loaded = Ops::from_file(std::move(*file));
      if (info->chain.blocks > 0 && !join_blocks(model, name, d, *info, loaded, m, &held, &trim)) {
        return std::nullopt;
      }
    } catch (const std::exception& e) {
      disk_->refuse(name, d.key, e.what());
      return std::nullopt;
    }
    Caches out = Ops::copy(loaded);
    if (trim > 0) {
      Ops::trim(out, trim);
    }
    insert_locked(model, Tokens(d.key.begin(), d.key.begin() + static_cast<long>(held)), std::move(loaded),
                  info->type, false);
    return out;
  }

  /// The layers the disk tier keeps in blocks (KVCaches and
  /// QuantizedKVCaches, Ops::cache_layers); `mixed` when other layers sit
  /// beside them. nullopt when there are none or one of them is empty.
  struct BlockLayers {
    std::vector<Cache*> caches;
    std::vector<BlockLayer> layers;
    bool mixed = false;
  };
  static std::optional<BlockLayers> block_layers(const Caches& caches) {
    if constexpr (requires { Ops::cache_layers(caches); }) {
      BlockLayers out;
      for (Cache* c : Ops::cache_layers(caches)) {
        if (c == nullptr) {
          out.mixed = true;
          continue;
        }
        std::optional<BlockLayer> l = block_layer(*c);
        if (!l) {
          return std::nullopt; // an empty cache would be taken for a slot to fill
        }
        out.caches.push_back(c);
        out.layers.push_back(std::move(*l));
      }
      if (out.layers.empty()) {
        return std::nullopt;
      }
      return out;
    } else {
      return std::nullopt;
    }
  }

  /// A tail's caches (in place) with its chain's tokens before their own:
  /// the blocks memory match m covers from memory, the others read from
  /// disk. Where d is trimmed within the chain and the tail holds only
  /// block layers, only the blocks d covers are read and the tail's own
  /// tokens are left: `held` is set to the tokens the caches hold, `trim` to
  /// what leaves the offset d's trim would. false if a block is missing or
  /// refused; throws if the tail does not fit its chain.
  bool join_blocks(
      const Model& model,
      const std::string& name,
      const Match& d,
      const DiskTier::Entry& info,
      Caches& tail,
      const std::optional<Match>& m,
      size_t* held_tokens,
      int* trim) {
    const DiskTier::Chain& c = info.chain;
    const int bt = c.block_tokens;
    std::optional<BlockLayers> tl = block_layers(tail);
    if (!tl || block_layout(tl->layers) != c.layout) {
      throw ValueError("LRUPromptCache disk tier", "a tail whose layers are of layout " + c.layout.substr(0, 80),
                       tl ? block_layout(tl->layers).substr(0, 80) : std::string("other layers"));
    }
    int64_t from_memory = 0;
    std::optional<BlockLayers> held;
    if (m && static_cast<int64_t>(m->covered) >= bt) {
      held = block_layers(caches_of(*trie_.get(model, m->key), m->trim)); // its arrays only are used
      if (held && block_layout(held->layers) == c.layout) {
        const int64_t n = std::min<int64_t>(held->layers[0].tokens, static_cast<int64_t>(m->covered));
        from_memory = std::min<int64_t>(c.blocks, n / bt);
      }
    }
    int64_t count = c.blocks;
    bool own = true;
    // The offset served: the entry's, less d's trim (mlx-lm trims by tokens).
    const int64_t serve = c.blocks * bt + tl->layers[0].offset - d.trim;
    if (!tl->mixed && d.trim > 0 && serve >= 0 && serve <= c.blocks * bt) {
      count = std::max<int64_t>(1, (serve + bt - 1) / bt);
      own = false; // the tail's tokens are not needed
      *held_tokens = static_cast<size_t>(count * bt);
      *trim = static_cast<int>(count * bt - serve);
    }
    from_memory = std::min(from_memory, count);
    auto blocks = disk_->load_blocks(name, d.key, c, from_memory, count);
    if (!blocks) {
      return false;
    }
    std::vector<mx::array> all;
    for (size_t l = 0; l < tl->layers.size(); ++l) {
      std::vector<BlockLayer> memory;
      std::vector<const BlockLayer*> before;
      if (from_memory > 0) {
        memory.push_back(block_rows(held->layers[l], 0, static_cast<int>(from_memory * bt)));
        before.push_back(&memory.back());
      }
      for (const auto& b : *blocks) {
        before.push_back(&b[l]);
      }
      rebuild_layer(*tl->caches[l], tl->layers[l], before, 0, own);
      for (const auto& a : tl->caches[l]->state()) {
        if (a) {
          all.push_back(*a);
        }
      }
    }
    mx::eval(all);
    return true;
  }

  static int type_index(const std::string& t) {
    const auto& o = ordering();
    return static_cast<int>(std::find(o.begin(), o.end(), t) - o.begin());
  }

  /// The store's id for a model (models compare with ModelEq).
  int64_t model_id(const Model& model) {
    for (size_t i = 0; i < models_.size(); ++i) {
      if (eq_(models_[i], model)) {
        return static_cast<int64_t>(i);
      }
    }
    models_.push_back(model);
    return static_cast<int64_t>(models_.size() - 1);
  }

  /// A fresh cache list for entry e, less its last `trim` tokens.
  Caches caches_of(const Entry& e, int trim) const {
    if (e.span.leaf && !e.caches) { // KVCaches only: build them at the trimmed length
      const int keep = std::max(0, e.span.length - trim);
      return Ops::build(store_.fetch(e.span, keep), keep, nullptr);
    }
    Caches c = e.span.leaf ? Ops::build(store_.fetch(e.span, e.span.length), e.span.length, &*e.caches)
                           : Ops::copy(*e.caches);
    if (trim > 0) {
      Ops::trim(c, trim);
    }
    return c;
  }

  bool same_key(const Key& k, const Model& model, const Tokens& tokens) const {
    return k.second == tokens && eq_(k.first, model);
  }

  void remove_from_lru(const Model& model, const Tokens& tokens) {
    for (auto& [_, q] : lrus_) {
      for (auto it = q.begin(); it != q.end(); ++it) {
        if (same_key(*it, model, tokens)) {
          q.erase(it);
          return;
        }
      }
    }
  }

  /// mlx-lm's CacheOrder.pop, then the entry out of the trie.
  void evict_one() {
    const auto& o = ordering();
    std::deque<Key>* from = nullptr;
    for (size_t i = 0; i + 1 < o.size(); ++i) {
      auto& a = lrus_[o[i]];
      auto& b = lrus_[o[i + 1]];
      if (!a.empty() && a.size() >= b.size()) {
        from = &a;
        break;
      }
    }
    if (from == nullptr) {
      from = &lrus_[o.back()];
    }
    if (from->empty()) {
      return;
    }
    pop_front(*from);
  }

  void evict_checkpoint() {
    pop_front(lrus_[checkpoint_type()]);
  }

  void pop_front(std::deque<Key>& from) {
    Key k = std::move(from.front());
    from.pop_front();
    if (auto e = trie_.pop(k.first, k.second)) {
      forget(*e);
    }
  }

  PromptTrie<Model, Entry, ModelEq> trie_;
  SharedKVStore store_;
  std::unique_ptr<DiskTier> disk_;
  std::vector<Model> models_;
  std::map<std::string, std::deque<Key>> lrus_;
  std::map<std::string, int64_t> bytes_by_type_;
  int64_t n_bytes_ = 0;
  int64_t max_size_;
  int64_t max_bytes_;
  int64_t max_checkpoints_;
  int64_t checkpoint_every_;
  int block_tokens_; // 0: entries as whole files
  bool share_;
  mutable Mutex mutex_;
  ModelEq eq_;
};

} // namespace kvcore
