#include "kvcore/kv_store.h"

#include <algorithm>

#include <mlx/ops.h>
#include <mlx/transforms.h>

#include "kvcore/buffer.h"
#include "kvcore/errors.h"

namespace kvcore {

struct SharedKVStore::Node {
  Tokens edge; // the run of tokens from the parent to here
  std::vector<LayerKV> kv; // per layer, (B, H, edge.size(), D), evaluated
  int64_t refs = 0; // spans through this node
  int owner = 0;
  Node* parent = nullptr;
  std::vector<std::unique_ptr<Node>> children;
};

namespace {

constexpr const char* kHold = "LRUPromptCache.insert_cache";

} // namespace

SharedKVStore::SharedKVStore() = default;
SharedKVStore::~SharedKVStore() = default;

std::string SharedKVStore::group_of(int64_t model, const std::vector<LayerKV>& layers, int n) {
  std::string g = std::to_string(model) + "|" + std::to_string(layers.size());
  for (const auto& l : layers) {
    for (const mx::array* a : {&l.keys, &l.values}) {
      if (a->ndim() != 4 || a->shape(2) < n || a->shape(0) != l.keys.shape(0)) {
        throw ValueError(kHold, "keys and values (B, H, S >= " + std::to_string(n) + ", D) of one batch",
                         shape_str(a->shape()));
      }
      g += "|" + std::to_string(a->shape(0)) + "," + std::to_string(a->shape(1)) + "," +
           std::to_string(a->shape(3)) + "," + std::to_string(static_cast<int>(a->dtype().val()));
    }
  }
  return g;
}

void SharedKVStore::count(const mx::array& a, int owner, int sign) {
  const void* key = a.data_shared_ptr().get();
  auto it = buffers_.find(key);
  if (it == buffers_.end()) {
    Buffer b;
    b.size = static_cast<int64_t>(a.buffer_size());
    b.owner = owner;
    bytes_ += b.size;
    bytes_by_owner_[owner] += b.size;
    it = buffers_.emplace(key, b).first;
  }
  Buffer& b = it->second;
  b.used += sign * static_cast<int64_t>(a.nbytes());
  b.holders += sign;
  if (b.holders == 0) {
    bytes_ -= b.size;
    bytes_by_owner_[b.owner] -= b.size;
    buffers_.erase(it);
  }
}

void SharedKVStore::count_node(const Node& n, int sign) {
  for (const auto& l : n.kv) {
    count(l.keys, n.owner, sign);
    count(l.values, n.owner, sign);
  }
}

int64_t SharedKVStore::nbytes(int owner) const {
  auto it = bytes_by_owner_.find(owner);
  return it == bytes_by_owner_.end() ? 0 : it->second;
}

int64_t SharedKVStore::node_count() const {
  int64_t total = 0;
  std::vector<const Node*> stack;
  for (const auto& [_, r] : roots_) {
    stack.push_back(r.get());
  }
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    total += n->parent != nullptr;
    for (const auto& c : n->children) {
      stack.push_back(c.get());
    }
  }
  return total;
}

// The node at parent.children[idx] keeps its object (spans point at it)
// and its last tokens; a new node with its first m tokens goes between it
// and parent. Both view the old arrays.
void SharedKVStore::split(Node& parent, size_t idx, size_t m) {
  std::unique_ptr<Node>& slot = parent.children[idx];
  Node& tail = *slot;
  auto head = std::make_unique<Node>();
  const int len = static_cast<int>(tail.edge.size());
  const int mi = static_cast<int>(m);
  std::vector<LayerKV> head_kv, tail_kv;
  for (const auto& l : tail.kv) {
    head_kv.push_back({seq_slice(l.keys, 0, mi), seq_slice(l.values, 0, mi)});
    tail_kv.push_back({seq_slice(l.keys, mi, len), seq_slice(l.values, mi, len)});
  }
  std::vector<mx::array> all;
  for (auto* v : {&head_kv, &tail_kv}) {
    for (const auto& l : *v) {
      all.push_back(l.keys);
      all.push_back(l.values);
    }
  }
  mx::eval(all);
  // Nothing below throws.
  count_node(tail, -1);
  head->edge.assign(tail.edge.begin(), tail.edge.begin() + mi);
  tail.edge.erase(tail.edge.begin(), tail.edge.begin() + mi);
  head->kv = std::move(head_kv);
  tail.kv = std::move(tail_kv);
  head->refs = tail.refs;
  head->owner = tail.owner;
  head->parent = &parent;
  tail.parent = head.get();
  count_node(*head, +1);
  count_node(tail, +1);
  head->children.push_back(std::move(slot));
  slot = std::move(head);
}

SharedKVStore::Span SharedKVStore::hold(
    const std::string& group,
    const Tokens& tokens,
    int n,
    const std::vector<LayerKV>& layers,
    int owner) {
  if (n < 1 || static_cast<size_t>(n) > tokens.size() || layers.empty()) {
    throw ValueError(kHold, "1 to " + std::to_string(tokens.size()) + " cached tokens over at least one layer",
                     std::to_string(n) + " over " + std::to_string(layers.size()));
  }
  auto& root = roots_[group];
  if (!root) {
    root = std::make_unique<Node>();
  }
  Node* cur = root.get();
  size_t i = 0;
  const size_t un = static_cast<size_t>(n);
  while (i < un) {
    size_t idx = 0;
    Node* child = nullptr;
    for (; idx < cur->children.size(); ++idx) {
      if (cur->children[idx]->edge.front() == tokens[i]) {
        child = cur->children[idx].get();
        break;
      }
    }
    if (child == nullptr) {
      break;
    }
    const size_t m = shared_run(child->edge, tokens, i, un);
    if (m < child->edge.size()) {
      split(*cur, idx, m);
      child = cur->children[idx].get();
    }
    cur = child;
    i += m;
  }
  Node* leaf = cur;
  if (i < un) {
    // The tokens past the shared part: views of the caller's buffers, or
    // copies where a view would keep a buffer mostly of other tokens.
    auto node = std::make_unique<Node>();
    std::vector<mx::array> views;
    for (const auto& l : layers) {
      views.push_back(seq_slice(l.keys, static_cast<int>(i), n));
      views.push_back(seq_slice(l.values, static_cast<int>(i), n));
    }
    mx::eval(views);
    for (auto& v : views) {
      const bool held = buffers_.count(v.data_shared_ptr().get()) > 0;
      if (!held && 2 * v.nbytes() < v.buffer_size()) {
        v = mx::contiguous(v);
      }
    }
    mx::eval(views);
    for (size_t l = 0; l < layers.size(); ++l) {
      node->kv.push_back({views[2 * l], views[2 * l + 1]});
    }
    node->edge.assign(tokens.begin() + static_cast<long>(i), tokens.begin() + n);
    node->owner = owner;
    node->parent = cur;
    count_node(*node, +1);
    cur->children.push_back(std::move(node));
    leaf = cur->children.back().get();
  }
  for (Node* p = leaf; p != nullptr && p->parent != nullptr; p = p->parent) {
    ++p->refs;
  }
  return Span{leaf, n};
}

std::vector<LayerKV> SharedKVStore::fetch(const Span& span, int n) const {
  std::vector<const Node*> path;
  for (const Node* p = span.leaf; p != nullptr && p->parent != nullptr; p = p->parent) {
    path.push_back(p);
  }
  std::reverse(path.begin(), path.end());
  n = std::clamp(n, 0, span.length);
  // The nodes covering [0, n), the last one perhaps in part.
  std::vector<std::pair<const Node*, int>> parts;
  int at = 0;
  for (const Node* p : path) {
    if (at >= n) {
      break;
    }
    const int len = static_cast<int>(p->edge.size());
    parts.emplace_back(p, std::min(len, n - at));
    at += len;
  }
  std::vector<LayerKV> out;
  std::vector<mx::array> all;
  const size_t layers = span.leaf->kv.size();
  for (size_t l = 0; l < layers; ++l) {
    std::vector<mx::array> ks, vs;
    for (const auto& [p, take] : parts) {
      ks.push_back(seq_slice(p->kv[l].keys, 0, take));
      vs.push_back(seq_slice(p->kv[l].values, 0, take));
    }
    if (ks.empty()) {
      const mx::array& k0 = path.front()->kv[l].keys;
      const mx::array& v0 = path.front()->kv[l].values;
      ks.push_back(seq_slice(k0, 0, 0));
      vs.push_back(seq_slice(v0, 0, 0));
    }
    out.push_back({ks.size() == 1 ? ks[0] : seq_concat(ks), vs.size() == 1 ? vs[0] : seq_concat(vs)});
    all.push_back(out.back().keys);
    all.push_back(out.back().values);
  }
  mx::eval(all);
  return out;
}

void SharedKVStore::compact(Node& n) {
  for (auto& l : n.kv) {
    for (mx::array* a : {&l.keys, &l.values}) {
      auto it = buffers_.find(a->data_shared_ptr().get());
      if (it != buffers_.end() && 2 * it->second.used < it->second.size) {
        mx::array c = mx::contiguous(*a);
        c.eval();
        count(*a, n.owner, -1);
        *a = std::move(c);
        count(*a, n.owner, +1);
      }
    }
  }
}

void SharedKVStore::compact_tree(Node& n) {
  if (n.parent != nullptr) {
    compact(n);
  }
  for (auto& c : n.children) {
    compact_tree(*c);
  }
}

void SharedKVStore::release(const Span& span) {
  Node* p = const_cast<Node*>(span.leaf);
  Node* root = p;
  bool removed = false;
  while (p != nullptr && p->parent != nullptr) {
    Node* parent = p->parent;
    if (--p->refs == 0) {
      count_node(*p, -1);
      auto& siblings = parent->children;
      siblings.erase(std::find_if(siblings.begin(), siblings.end(),
                                  [p](const std::unique_ptr<Node>& c) { return c.get() == p; }));
      removed = true;
    }
    p = parent;
    root = p;
  }
  if (removed && root != nullptr) {
    // Copy out what is left viewing mostly freed buffers. A failed copy
    // (out of memory) leaves the view, which stays correct and counted.
    try {
      compact_tree(*root);
    } catch (const std::exception&) {
    }
  }
}

} // namespace kvcore
