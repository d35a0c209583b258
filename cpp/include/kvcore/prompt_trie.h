// The prompt-prefix cache a server keeps across requests: PromptTrie (token
// sequences to values, per model) and LRUPromptCache (finished prompt caches
// under a count and a byte budget), with mlx-lm 0.32.2's matching and
// eviction rules.
#pragma once

#include <algorithm>
#include <cstdint>
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

#include "kvcore/errors.h"
#include "kvcore/kv_store.h"

namespace kvcore {

/// What PromptTrie::search found for a token sequence.
struct PromptTrieResult {
  /// The sequence itself holds a value.
  std::optional<Tokens> exact;
  /// The longest proper prefix (of two tokens or more) holding a value.
  std::optional<Tokens> shorter;
  /// The shortest stored sequence that extends the longest path the query
  /// shares with the trie.
  std::optional<Tokens> longer;
  /// How many leading tokens the query shares with any stored sequence.
  int common_prefix = 0;
};

/// Token sequences to values, one tree per model, as mlx-lm's PromptTrie
/// (same results, including which of several equally short longer
/// sequences is chosen). A radix tree: each node holds a run of tokens, so
/// a 32k-token sequence is one node, and a walk compares runs, not
/// per-token dictionaries.
///
/// Not synchronized: LRUPromptCache serializes its calls.
template <class Model, class Value, class ModelEq = std::equal_to<Model>>
class PromptTrie {
 public:
  PromptTrie() = default;
  PromptTrie(const PromptTrie&) = delete;
  PromptTrie& operator=(const PromptTrie&) = delete;
  PromptTrie(PromptTrie&&) = default;
  PromptTrie& operator=(PromptTrie&&) = default;

  /// Store value at tokens; returns the value it replaced.
  std::optional<Value> add(const Model& model, const Tokens& tokens, Value value) {
    Node* cur = root(model, true);
    size_t i = 0;
    while (i < tokens.size()) {
      auto [idx, child] = find_child(*cur, tokens[i]);
      if (child == nullptr) {
        auto n = std::make_unique<Node>();
        n->edge.assign(tokens.begin() + static_cast<long>(i), tokens.end());
        cur->children.push_back(std::move(n));
        cur = cur->children.back().get();
        i = tokens.size();
        break;
      }
      size_t m = match(child->edge, tokens, i);
      if (m < child->edge.size()) {
        split(*cur, idx, m);
        child = cur->children[idx].get();
      }
      cur = child;
      i += m;
    }
    std::optional<Value> prev = std::move(cur->value);
    cur->value = std::move(value);
    return prev;
  }

  /// The value stored at exactly tokens, or nullptr.
  const Value* get(const Model& model, const Tokens& tokens) const {
    const Node* n = locate(model, tokens, nullptr);
    return n && n->value ? &*n->value : nullptr;
  }

  /// Remove and return the value at exactly tokens (nullopt when none),
  /// dropping the nodes nothing needs any more.
  std::optional<Value> pop(const Model& model, const Tokens& tokens) {
    std::vector<std::pair<Node*, size_t>> path; // (parent, child index)
    Node* n = const_cast<Node*>(locate(model, tokens, &path));
    if (n == nullptr || !n->value) {
      return std::nullopt;
    }
    std::optional<Value> out = std::move(n->value);
    n->value.reset();
    // Leaves without a value go; then a valueless node left with one child
    // absorbs it (the tree stays a radix tree).
    while (!path.empty() && !n->value && n->children.empty()) {
      auto [parent, idx] = path.back();
      path.pop_back();
      parent->children.erase(parent->children.begin() + static_cast<long>(idx));
      n = parent;
    }
    if (!path.empty()) {
      absorb_only_child(*n);
    }
    return out;
  }

  /// Remove the values stored at proper prefixes of tokens (lengths 0 to
  /// size - 1); returns them with their lengths, shortest first.
  std::vector<std::pair<int, Value>> pop_prefixes(const Model& model, const Tokens& tokens) {
    std::vector<std::pair<int, Value>> out;
    Node* cur = root(model, false);
    size_t i = 0;
    while (cur != nullptr && i < tokens.size()) {
      if (cur->value) {
        out.emplace_back(static_cast<int>(i), std::move(*cur->value));
        cur->value.reset();
      }
      auto [idx, child] = find_child(*cur, tokens[i]);
      if (child == nullptr || match(child->edge, tokens, i) < child->edge.size()) {
        break;
      }
      i += child->edge.size();
      cur = child;
    }
    return out;
  }

  PromptTrieResult search(const Model& model, const Tokens& tokens) const {
    PromptTrieResult r;
    const Node* cur = find_root(model);
    if (cur == nullptr) {
      return r;
    }
    if (tokens.empty() && cur->value) {
      r.exact = Tokens{};
      return r;
    }
    // Walk as far as the tokens go; `mid` is set when the walk stops inside
    // a node's run, `mid_at` tokens into it.
    size_t index = 0;
    long last_index = -1;
    const Node* mid = nullptr;
    size_t mid_at = 0;
    while (index < tokens.size()) {
      auto [idx, child] = find_child(*cur, tokens[index]);
      if (child == nullptr) {
        break;
      }
      size_t m = match(child->edge, tokens, index);
      index += m;
      if (m < child->edge.size()) {
        mid = child;
        mid_at = m;
        break;
      }
      cur = child;
      if (cur->value) {
        last_index = static_cast<long>(index) - 1;
      }
    }
    const long n = static_cast<long>(tokens.size());
    if (n > 0 && last_index == n - 1) {
      r.exact = tokens;
      return r;
    }
    if (last_index > 0) {
      r.shorter = Tokens(tokens.begin(), tokens.begin() + last_index + 1);
    }
    r.common_prefix = static_cast<int>(index);
    if (index > 0) {
      r.longer = shortest_extension(cur, mid, mid_at, tokens, index);
    }
    return r;
  }

  /// Every (model, tokens, value) in the tree, for inspection and files.
  template <class Fn>
  void for_each(Fn fn) const {
    for (const auto& [model, node] : roots_) {
      Tokens prefix;
      visit(*node, prefix, [&](const Tokens& t, const Value& v) { fn(model, t, v); });
    }
  }

 private:
  struct Node {
    Tokens edge; // the run of tokens from the parent to here
    std::optional<Value> value;
    std::vector<std::unique_ptr<Node>> children; // in insertion order
  };

  Node* root(const Model& model, bool create) {
    for (auto& [m, node] : roots_) {
      if (eq_(m, model)) {
        return node.get();
      }
    }
    if (!create) {
      return nullptr;
    }
    roots_.emplace_back(model, std::make_unique<Node>());
    return roots_.back().second.get();
  }
  const Node* find_root(const Model& model) const {
    return const_cast<PromptTrie*>(this)->root(model, false);
  }

  static std::pair<size_t, Node*> find_child(const Node& n, int64_t token) {
    for (size_t i = 0; i < n.children.size(); ++i) {
      if (n.children[i]->edge.front() == token) {
        return {i, n.children[i].get()};
      }
    }
    return {0, nullptr};
  }

  /// How many of edge's tokens tokens[from...] repeats.
  static size_t match(const Tokens& edge, const Tokens& tokens, size_t from) {
    size_t m = 0;
    while (m < edge.size() && from + m < tokens.size() && edge[m] == tokens[from + m]) {
      ++m;
    }
    return m;
  }

  /// Child idx of parent becomes a node of its first m tokens, holding the
  /// rest as its only child (in the same place among parent's children).
  static void split(Node& parent, size_t idx, size_t m) {
    std::unique_ptr<Node>& slot = parent.children[idx];
    auto head = std::make_unique<Node>();
    head->edge.assign(slot->edge.begin(), slot->edge.begin() + static_cast<long>(m));
    slot->edge.erase(slot->edge.begin(), slot->edge.begin() + static_cast<long>(m));
    head->children.push_back(std::move(slot));
    slot = std::move(head);
  }

  static void absorb_only_child(Node& n) {
    if (n.value || n.children.size() != 1) {
      return;
    }
    std::unique_ptr<Node> child = std::move(n.children.front());
    n.edge.insert(n.edge.end(), child->edge.begin(), child->edge.end());
    n.value = std::move(child->value);
    n.children = std::move(child->children);
  }

  /// The node at exactly tokens (at a node boundary), with the path to it.
  const Node* locate(
      const Model& model,
      const Tokens& tokens,
      std::vector<std::pair<Node*, size_t>>* path) const {
    Node* cur = const_cast<PromptTrie*>(this)->root(model, false);
    size_t i = 0;
    while (cur != nullptr && i < tokens.size()) {
      auto [idx, child] = find_child(*cur, tokens[i]);
      if (child == nullptr || match(child->edge, tokens, i) != child->edge.size()) {
        return nullptr;
      }
      if (path) {
        path->emplace_back(cur, idx);
      }
      i += child->edge.size();
      cur = child;
    }
    return cur;
  }

  /// mlx-lm's longer: a depth-first walk from where the query stopped that
  /// pops the last-inserted child first and keeps the first value found at
  /// the smallest depth.
  static std::optional<Tokens> shortest_extension(
      const Node* cur,
      const Node* mid,
      size_t mid_at,
      const Tokens& tokens,
      size_t index) {
    struct Item {
      const Node* node;
      size_t len; // tokens past the query's shared prefix
      long parent; // index into items, -1 for the start
    };
    std::vector<Item> items;
    std::vector<size_t> stack;
    items.push_back(mid ? Item{mid, mid->edge.size() - mid_at, -1} : Item{cur, 0, -1});
    stack.push_back(0);
    long best = -1;
    while (!stack.empty()) {
      size_t at = stack.back();
      stack.pop_back();
      const Item it = items[at];
      if (it.node->value) {
        if (best < 0 || it.len < items[best].len) {
          best = static_cast<long>(at);
        }
      } else if (best < 0 || it.len < items[best].len) {
        for (const auto& c : it.node->children) {
          items.push_back(Item{c.get(), it.len + c->edge.size(), static_cast<long>(at)});
          stack.push_back(items.size() - 1);
        }
      }
    }
    if (best < 0) {
      return std::nullopt;
    }
    // The runs from the start item down to best, in order.
    std::vector<const Item*> chain;
    for (long at = best; at >= 0; at = items[at].parent) {
      chain.push_back(&items[at]);
    }
    Tokens out(tokens.begin(), tokens.begin() + static_cast<long>(index));
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      const Tokens& e = (*it)->node->edge;
      size_t skip = ((*it)->parent < 0 && mid) ? mid_at : ((*it)->parent < 0 ? e.size() : 0);
      out.insert(out.end(), e.begin() + static_cast<long>(skip), e.end());
    }
    return out;
  }

  template <class Fn>
  static void visit(const Node& n, Tokens& prefix, Fn& fn) {
    size_t before = prefix.size();
    prefix.insert(prefix.end(), n.edge.begin(), n.edge.end());
    if (n.value) {
      fn(prefix, *n.value);
    }
    for (const auto& c : n.children) {
      visit(*c, prefix, fn);
    }
    prefix.resize(before);
  }

  std::vector<std::pair<Model, std::unique_ptr<Node>>> roots_;
  ModelEq eq_;
};

/// mlx-lm's LRUPromptCache over any cache-list type. `Ops` provides
///   static int64_t nbytes(const Caches&);
///   static bool can_trim(const Caches&);
///   static Caches copy(const Caches&);        // a fresh, independent copy
///   static void trim(Caches&, int n);
///   // When every layer is a plain KVCache holding tokens: their arrays
///   // and the common offset (else false) ...
///   static bool share(const Caches&, std::vector<LayerKV>*, int* offset);
///   // ... and fresh such caches from arrays.
///   static Caches build(std::vector<LayerKV> layers, int offset);
/// and `Mutex` serializes every call (lock()/unlock()), so any calls may
/// run concurrently from several threads.
///
/// Entries are evicted least recently inserted first, taking from the
/// "assistant" queue while it is at least as long as "user", then "user"
/// against "system" (mlx-lm's order). Inserting a trimmable cache drops the
/// entries stored at its prefixes (the new one serves them by trimming).
///
/// With `share` (the default), entries of plain KVCaches keep their keys
/// and values in a SharedKVStore, so tokens several entries share are
/// stored once; nbytes() counts the store's buffers once, and an evicted
/// entry frees only what no other entry uses. Fetching such an entry builds
/// fresh KVCaches from the store (views where one stored run covers a layer,
/// else one copy). Without `share`, every entry holds its caches as given,
/// as mlx-lm's does.
template <class Model, class Caches, class Ops, class Mutex = std::mutex,
          class ModelEq = std::equal_to<Model>>
class LRUPromptCache {
 public:
  static constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

  explicit LRUPromptCache(
      int64_t max_size = 10,
      int64_t max_bytes = kUnlimited,
      bool share = true)
      : max_size_(max_size), max_bytes_(max_bytes), share_(share) {
    for (const auto& t : ordering()) {
      lrus_[t];
      bytes_by_type_[t] = 0;
    }
  }

  static const std::vector<std::string>& ordering() {
    static const std::vector<std::string> o = {"assistant", "user", "system"};
    return o;
  }

  /// A copy of the cache stored for the longest usable match and the
  /// tokens it does not cover; (nullopt, tokens) when nothing matches.
  std::pair<std::optional<Caches>, Tokens> fetch_nearest_cache(
      const Model& model,
      const Tokens& tokens) {
    std::lock_guard<Mutex> lock(mutex_);
    PromptTrieResult r = trie_.search(model, tokens);
    if (r.exact) {
      return {caches_of(*trie_.get(model, *r.exact), 0), Tokens{}};
    }
    const size_t short_length = r.shorter ? r.shorter->size() : 0;
    if (r.longer && static_cast<size_t>(r.common_prefix) > short_length) {
      const Entry* e = trie_.get(model, *r.longer);
      if (!e->caches || Ops::can_trim(*e->caches)) {
        size_t prefix = std::min(tokens.size() - 1, static_cast<size_t>(r.common_prefix));
        return {caches_of(*e, static_cast<int>(r.longer->size() - prefix)),
                Tokens(tokens.begin() + static_cast<long>(prefix), tokens.end())};
      }
    }
    if (short_length > 0) {
      return {caches_of(*trie_.get(model, *r.shorter), 0),
              Tokens(tokens.begin() + static_cast<long>(short_length), tokens.end())};
    }
    return {std::nullopt, tokens};
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
    // Read everything that may throw before changing anything.
    Entry entry{std::nullopt, {}, 0, cache_type};
    std::vector<LayerKV> layers;
    int offset = 0;
    if (share_ && Ops::share(caches, &layers, &offset) && offset > 0 &&
        static_cast<size_t>(offset) <= tokens.size()) {
      const std::string group = SharedKVStore::group_of(model_id(model), layers, offset);
      entry.span = store_.hold(group, tokens, offset, layers, type_index(cache_type));
    } else {
      entry.nbytes = Ops::nbytes(caches);
      entry.trimmable = Ops::can_trim(caches);
      entry.caches = std::move(caches);
    }
    const bool trimmable = entry.trimmable;
    n_bytes_ += entry.nbytes;
    bytes_by_type_[cache_type] += entry.nbytes;
    std::optional<Entry> prev = trie_.add(model, tokens, std::move(entry));
    if (prev) {
      forget(*prev);
      remove_from_lru(model, tokens);
    }
    lrus_[cache_type].emplace_back(model, tokens);
    if (trimmable) {
      for (auto& [len, e] : trie_.pop_prefixes(model, tokens)) {
        forget(e);
        remove_from_lru(model, Tokens(tokens.begin(), tokens.begin() + len));
      }
    }
    if (size() > max_size_) {
      evict_one();
    }
    while (nbytes_locked() > max_bytes_ && size() > 0) {
      evict_one();
    }
  }

  /// Evict down to n_sequences entries and n_bytes (nullopt: no limit).
  void trim_to(std::optional<int64_t> n_sequences, std::optional<int64_t> n_bytes) {
    std::lock_guard<Mutex> lock(mutex_);
    const int64_t seqs = n_sequences ? std::max<int64_t>(0, *n_sequences) : kUnlimited;
    const int64_t bytes = n_bytes ? std::max<int64_t>(0, *n_bytes) : kUnlimited;
    while (size() > seqs) {
      evict_one();
    }
    while (nbytes_locked() > bytes && size() > 0) {
      evict_one();
    }
  }

  struct TypeStats {
    int64_t n_sequences;
    int64_t n_bytes;
  };
  /// Per cache type, in eviction order: entries and bytes.
  std::vector<std::pair<std::string, TypeStats>> stats_by_type() const {
    std::lock_guard<Mutex> lock(mutex_);
    std::vector<std::pair<std::string, TypeStats>> out;
    for (const auto& t : ordering()) {
      out.push_back({t, {static_cast<int64_t>(lrus_.at(t).size()),
                         bytes_by_type_.at(t) + store_.nbytes(type_index(t))}});
    }
    return out;
  }

  int64_t size() const {
    int64_t n = 0;
    for (const auto& [_, q] : lrus_) {
      n += static_cast<int64_t>(q.size());
    }
    return n;
  }
  /// Bytes held: entries' caches as given plus the shared store's buffers.
  int64_t nbytes() const {
    std::lock_guard<Mutex> lock(mutex_);
    return nbytes_locked();
  }
  bool share() const {
    return share_;
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

 private:
  struct Entry {
    std::optional<Caches> caches; // held as given, or
    SharedKVStore::Span span; // keys and values in the store
    int64_t nbytes; // of caches
    std::string type;
    bool trimmable = true;
  };
  using Key = std::pair<Model, Tokens>;

  static void check_type(const std::string& t) {
    for (const auto& o : ordering()) {
      if (o == t) {
        return;
      }
    }
    throw ValueError("LRUPromptCache.insert_cache", "cache_type among assistant, user, system",
                     "'" + t.substr(0, 40) + "'");
  }

  void forget(const Entry& e) {
    n_bytes_ -= e.nbytes;
    bytes_by_type_[e.type] -= e.nbytes;
    if (!e.caches) {
      store_.release(e.span);
    }
  }

  int64_t nbytes_locked() const {
    return n_bytes_ + store_.nbytes();
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
    if (e.caches) {
      Caches c = Ops::copy(*e.caches);
      if (trim > 0) {
        Ops::trim(c, trim);
      }
      return c;
    }
    const int keep = std::max(0, e.span.length - trim);
    return Ops::build(store_.fetch(e.span, keep), keep);
  }

  bool same_key(const Key& k, const Model& model, const Tokens& tokens) const {
    return k.second == tokens && eq_(k.first, model);
  }

  void remove_from_lru(const Model& model, const Tokens& tokens) {
    for (const auto& t : ordering()) {
      auto& q = lrus_[t];
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
    Key k = std::move(from->front());
    from->pop_front();
    if (auto e = trie_.pop(k.first, k.second)) {
      forget(*e);
    }
  }

  PromptTrie<Model, Entry, ModelEq> trie_;
  SharedKVStore store_;
  std::vector<Model> models_;
  std::map<std::string, std::deque<Key>> lrus_;
  std::map<std::string, int64_t> bytes_by_type_;
  int64_t n_bytes_ = 0;
  int64_t max_size_;
  int64_t max_bytes_;
  bool share_;
  mutable Mutex mutex_;
  ModelEq eq_;
};

} // namespace kvcore
