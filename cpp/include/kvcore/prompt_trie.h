// PromptTrie: token sequences to values, per model, with mlx-lm 0.32.2's
// matching rules.
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

namespace kvcore {

using Tokens = std::vector<int64_t>;

/// How many of edge's tokens tokens[from, end) repeats, from the start.
inline size_t shared_run(const Tokens& edge, const Tokens& tokens, size_t from, size_t end) {
  size_t m = 0;
  while (m < edge.size() && from + m < end && edge[m] == tokens[from + m]) {
    ++m;
  }
  return m;
}

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
    return shared_run(edge, tokens, from, tokens.size());
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

/// The cache types of LRUPromptCache, in eviction order.
inline const std::vector<std::string>& cache_type_order() {
  static const std::vector<std::string> o = {"assistant", "user", "system"};
  return o;
}

/// The type of LRUPromptCache's prefill checkpoints (insert_checkpoint),
/// kept apart from the cache types above.
inline const std::string& checkpoint_type() {
  static const std::string t = "checkpoint";
  return t;
}

} // namespace kvcore
