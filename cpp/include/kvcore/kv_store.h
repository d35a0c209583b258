// Keys and values of many token sequences with each shared token stored
// once: the storage under LRUPromptCache's entries.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <mlx/array.h>

#include "kvcore/prompt_trie.h"

namespace kvcore {

namespace mx = mlx::core;

/// One layer's keys and values, (B, H, S, D) each.
struct LayerKV {
  mx::array keys;
  mx::array values;
};

/// A radix tree over tokens per group (a model and its layers' shapes and
/// dtypes), whose nodes hold the keys and values of their run of tokens for
/// every layer. A held sequence is a Span; every node on its path counts
/// the spans through it and goes when the count reaches zero.
///
/// Memory is counted per mlx buffer, so nbytes() is what the store keeps
/// alive: a node may view part of a buffer (holding a sequence views the
/// caller's arrays; splitting a node views both halves), and buffers are
/// counted whole while any node views them. A run that would keep alive a
/// buffer mostly of other tokens is copied instead, and when the views
/// left in a buffer use under half of it they are copied out, so at most
/// about half of what is counted is unused.
///
/// Keys and values are assumed to be a function of the model and the
/// tokens: a sequence's shared prefix is served from the copy held first.
/// Not synchronized: LRUPromptCache serializes its calls.
class SharedKVStore {
  struct Node;

 public:
  /// A held sequence: its group, last node and length. Release it once.
  struct Span {
    const Node* leaf = nullptr;
    int length = 0;
  };

  SharedKVStore();
  SharedKVStore(const SharedKVStore&) = delete;
  SharedKVStore& operator=(const SharedKVStore&) = delete;
  ~SharedKVStore();

  /// The group key of layers under a model id: the layer count and each
  /// layer's batch, heads, head dims and dtypes. Throws ValueError unless
  /// every layer has rank-4 keys and values of one batch and length >= n.
  static std::string group_of(int64_t model, const std::vector<LayerKV>& layers, int n);

  /// Hold tokens[0:n]'s keys and values (layers[l].keys[..., :n, :]) in
  /// group; the part shared with held sequences reuses their nodes.
  /// `owner` tags the bytes this call adds (see nbytes(owner)). Evaluates
  /// what it keeps. Nothing changes if it throws.
  Span hold(
      const std::string& group,
      const Tokens& tokens,
      int n,
      const std::vector<LayerKV>& layers,
      int owner);

  /// The first n (<= span.length) tokens' keys and values, per layer:
  /// views when one node covers them, else one concatenation, evaluated.
  std::vector<LayerKV> fetch(const Span& span, int n) const;

  /// Drop a span; nodes no span passes through go.
  void release(const Span& span);

  /// Bytes of the buffers the store keeps alive.
  int64_t nbytes() const {
    return bytes_;
  }
  /// Of those, the bytes of buffers first held for `owner`.
  int64_t nbytes(int owner) const;
  /// Nodes held (for tests and stats).
  int64_t node_count() const;

 private:
  struct Buffer {
    int64_t size = 0; // bytes of the allocation
    int64_t used = 0; // bytes viewed by nodes
    int holders = 0; // arrays viewing it
    int owner = 0;
  };

  void count(const mx::array& a, int owner, int sign);
  void count_node(const Node& n, int sign);
  void compact(Node& n);
  void compact_tree(Node& n);
  void split(Node& parent, size_t idx, size_t m);

  std::map<std::string, std::unique_ptr<Node>> roots_;
  std::map<const void*, Buffer> buffers_;
  std::map<int, int64_t> bytes_by_owner_;
  int64_t bytes_ = 0;
};

} // namespace kvcore
