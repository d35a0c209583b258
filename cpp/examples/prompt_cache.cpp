// Prompt-cache files from C++: a tiny attention model with fixed random
// weights decodes greedily, saves its caches mid-generation with
// kvcore::save_prompt_cache, loads them into fresh caches with
// kvcore::load_prompt_cache and decodes on. Tokens and logits must equal an
// uninterrupted run's bit for bit, with KVCache layers and with
// RotatingKVCache layers.
//
//   prompt_cache               the two round trips
//   prompt_cache --save FILE   also keep the saved files: FILE (KVCache
//                              layers) and FILE with .rotating before
//                              .safetensors (RotatingKVCache layers)
//   prompt_cache --load FILE   load FILE (written by kvcore or mlx-lm, from
//                              C++ or Python), print its layers and decode a
//                              few steps on it
//
// Exit status: 0 when every check passed, 1 when one failed (what differed
// is printed), 2 for bad arguments.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <mlx/mlx.h>

#include <kvcore/kvcore.h>

namespace mx = mlx::core;

namespace {

// The model. Metadata names it, so a file written for another model is not
// taken for this one's.
constexpr const char* kModelName = "kvcore-example-tiny-1";
constexpr int kVocab = 97, kDim = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8;
constexpr int kHidden = 64, kLayers = 3;
constexpr uint64_t kSeed = 20240611;
constexpr float kEps = 1e-5f, kRopeBase = 10000.0f;

// The round trips: a prompt, kBefore steps, save and load, kAfter steps.
constexpr int kPrompt = 20, kBefore = 10, kAfter = 12, kMaxKvSize = 16;
constexpr int kLoadSteps = 4; // --load on a file with no continuation

struct Layer {
  mx::array attn_norm, wq, wk, wv, wo, mlp_norm, w_up, w_down;
};

struct Model {
  mx::array embed;
  std::vector<Layer> layers;
  mx::array norm, w_out;
};

Model make_model() {
  uint64_t n = 0;
  auto normal = [&](mx::Shape shape, float scale) {
    auto key = mx::random::key(kSeed + n++);
    return mx::random::normal(shape, mx::float32, 0.0f, scale, key);
  };
  auto ones = [](int d) { return mx::ones({d}, mx::float32); };
  const float s_in = 1.0f / std::sqrt(float(kDim));
  const float s_hidden = 1.0f / std::sqrt(float(kHidden));
  std::vector<Layer> layers;
  for (int i = 0; i < kLayers; ++i) {
    layers.push_back(Layer{
        ones(kDim),
        normal({kDim, kHeads * kHeadDim}, s_in),
        normal({kDim, kKvHeads * kHeadDim}, s_in),
        normal({kDim, kKvHeads * kHeadDim}, s_in),
        normal({kHeads * kHeadDim, kDim}, s_in),
        ones(kDim),
        normal({kDim, kHidden}, s_in),
        normal({kHidden, kDim}, s_hidden)});
  }
  Model m{
      normal({kVocab, kDim}, 1.0f), std::move(layers), ones(kDim), normal({kDim, kVocab}, s_in)};
  std::vector<mx::array> all = {m.embed, m.norm, m.w_out};
  for (auto& l : m.layers) {
    all.insert(all.end(), {l.wq, l.wk, l.wv, l.wo, l.w_up, l.w_down});
  }
  mx::eval(all);
  return m;
}

kvcore::SequenceCache& sequence_cache(kvcore::Cache& cache) {
  auto* c = dynamic_cast<kvcore::SequenceCache*>(&cache);
  if (!c) {
    throw std::invalid_argument(
        std::string("a keys/values cache (KVCache, RotatingKVCache, ...) but got ") +
        cache.name());
  }
  return *c;
}

// (1, S, n * kHeadDim) -> (1, n, S, kHeadDim)
mx::array split_heads(const mx::array& x, int n) {
  return mx::transpose(mx::reshape(x, {1, x.shape(1), n, kHeadDim}), {0, 2, 1, 3});
}

mx::array attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const kvcore::Mask& mask) {
  const float scale = 1.0f / std::sqrt(float(kHeadDim));
  if (auto* mode = std::get_if<std::string>(&mask)) {
    return mx::fast::scaled_dot_product_attention(q, k, v, scale, *mode);
  }
  if (auto* arr = std::get_if<mx::array>(&mask)) {
    return mx::fast::scaled_dot_product_attention(q, k, v, scale, "array", *arr);
  }
  return mx::fast::scaled_dot_product_attention(q, k, v, scale);
}

// Feeds `tokens` through the model and its caches; returns the logits of
// the last position, (kVocab,), evaluated.
mx::array feed(const Model& m, const std::vector<int>& tokens, kvcore::PromptCache& caches) {
  const int S = static_cast<int>(tokens.size());
  auto x = mx::take(m.embed, mx::array(tokens.begin(), {1, S}, mx::int32), 0);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& l = m.layers[i];
    auto& cache = sequence_cache(*caches[i]);
    auto h = mx::fast::rms_norm(x, l.attn_norm, kEps);
    auto q = split_heads(mx::matmul(h, l.wq), kHeads);
    auto k = split_heads(mx::matmul(h, l.wk), kKvHeads);
    auto v = split_heads(mx::matmul(h, l.wv), kKvHeads);
    q = mx::fast::rope(q, kHeadDim, false, kRopeBase, 1.0f, cache.offset());
    k = mx::fast::rope(k, kHeadDim, false, kRopeBase, 1.0f, cache.offset());
    auto mask = cache.make_mask(S);
    auto [keys, values] = cache.update_and_fetch(k, v);
    auto o = mx::transpose(attention(q, keys, values, mask), {0, 2, 1, 3});
    x = x + mx::matmul(mx::reshape(o, {1, S, kHeads * kHeadDim}), l.wo);
    h = mx::matmul(mx::fast::rms_norm(x, l.mlp_norm, kEps), l.w_up);
    x = x + mx::matmul(h * mx::sigmoid(h), l.w_down);
  }
  auto logits = mx::matmul(mx::fast::rms_norm(x, m.norm, kEps), m.w_out);
  logits = mx::reshape(mx::slice(logits, {0, S - 1, 0}, {1, S, kVocab}), {kVocab});
  mx::eval(logits);
  return logits;
}

int greedy(const mx::array& logits) {
  return static_cast<int>(mx::argmax(logits).item<uint32_t>());
}

// A greedy run's tokens and the logits each was chosen from.
struct Run {
  std::vector<int> tokens;
  std::vector<mx::array> logits;
};

// Feeds `first`, then each chosen token, `steps` times in all.
Run decode(const Model& m, kvcore::PromptCache& caches, int first, int steps) {
  Run run;
  int token = first;
  for (int i = 0; i < steps; ++i) {
    run.logits.push_back(feed(m, {token}, caches));
    token = greedy(run.logits.back());
    run.tokens.push_back(token);
  }
  return run;
}

std::vector<int> make_prompt() {
  std::vector<int> prompt;
  for (int i = 0; i < kPrompt; ++i) {
    prompt.push_back((i * 37 + 11) % kVocab);
  }
  return prompt;
}

std::string join(const std::vector<int>& v, const char* sep = ",") {
  std::ostringstream out;
  for (size_t i = 0; i < v.size(); ++i) {
    out << (i ? sep : "") << v[i];
  }
  return out.str();
}

std::vector<int> split_ints(const std::string& s) {
  std::vector<int> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    out.push_back(std::stoi(item));
  }
  return out;
}

bool bitwise_equal(const mx::array& a, const mx::array& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) {
    return false;
  }
  if (a.dtype().size() == 4) {
    return mx::array_equal(mx::view(a, mx::uint32), mx::view(b, mx::uint32)).item<bool>();
  }
  return mx::array_equal(a, b).item<bool>();
}

std::string describe(const mx::array& a) {
  std::ostringstream out;
  out << a.dtype() << " (";
  for (size_t i = 0; i < a.shape().size(); ++i) {
    out << (i ? ", " : "") << a.shape()[i];
  }
  out << ")";
  return out.str();
}

// One line for a layer: its class, offset and what else says where it is.
std::string describe(const kvcore::Cache& cache) {
  std::ostringstream out;
  out << cache.name();
  if (auto* seq = dynamic_cast<const kvcore::SequenceCache*>(&cache)) {
    out << " offset " << seq->offset();
    if (auto* rot = dynamic_cast<const kvcore::RotatingKVCache*>(&cache)) {
      out << " size " << rot->size() << " max_size " << rot->max_size() << " keep "
          << rot->keep();
    }
    if (seq->keys()) {
      out << " keys " << describe(*seq->keys());
    }
  }
  return out.str();
}

// Collects what differed; empty means every check passed.
struct Checks {
  std::vector<std::string> failures;
  void expect(bool ok, const std::string& what) {
    if (!ok) {
      failures.push_back(what);
    }
  }
};

// Two layers' states, array by array, bit for bit.
void compare_states(
    Checks& c,
    const std::string& where,
    const kvcore::Cache& a,
    const kvcore::Cache& b) {
  auto sa = a.state(), sb = b.state();
  c.expect(std::string(a.name()) == b.name(),
           where + ": class " + a.name() + " became " + b.name());
  c.expect(sa.size() == sb.size(), where + ": state of " + std::to_string(sa.size()) +
                                       " arrays became " + std::to_string(sb.size()));
  for (size_t i = 0; i < std::min(sa.size(), sb.size()); ++i) {
    const std::string item = where + ": state[" + std::to_string(i) + "] ";
    if (sa[i].has_value() != sb[i].has_value()) {
      c.failures.push_back(item + "set in one cache only");
    } else if (sa[i] && !bitwise_equal(*sa[i], *sb[i])) {
      c.failures.push_back(
          item + describe(*sa[i]) + " differs after loading (" + describe(*sb[i]) + ")");
    }
  }
  c.expect(a.meta_state() == b.meta_state(),
           where + ": scalars (offset, ...) differ after loading");
}

// The uninterrupted run against one saved, loaded and continued.
bool round_trip(
    const Model& m,
    const std::string& label,
    std::optional<int> max_kv_size,
    const std::string& path) {
  const auto prompt = make_prompt();
  Checks c;

  auto full_caches = kvcore::make_prompt_cache(kLayers, max_kv_size);
  auto first = greedy(feed(m, prompt, full_caches));
  Run full = decode(m, full_caches, first, kBefore + kAfter);

  auto caches = kvcore::make_prompt_cache(kLayers, max_kv_size);
  std::vector<int> fed = prompt;
  fed.push_back(greedy(feed(m, prompt, caches)));
  Run before = decode(m, caches, fed.back(), kBefore);
  c.expect(
      before.tokens == std::vector<int>(full.tokens.begin(), full.tokens.begin() + kBefore),
      "the run to save differs from the uninterrupted one before saving");
  fed.insert(fed.end(), before.tokens.begin(), before.tokens.end() - 1);
  const int next = before.tokens.back();
  const std::vector<int> continuation(full.tokens.begin() + kBefore, full.tokens.end());
  const kvcore::Metadata metadata = {
      {"model", kModelName},
      {"tokens", join(fed)},
      {"next_token", std::to_string(next)},
      {"continuation", join(continuation)}};
  kvcore::save_prompt_cache(path, caches, metadata);
  const std::string saved = describe(*caches.front());

  auto [loaded, loaded_metadata] = kvcore::load_prompt_cache(path);
  c.expect(loaded_metadata == metadata, "metadata differs after loading");
  c.expect(loaded.size() == caches.size(), std::to_string(caches.size()) +
                                               " layers saved but " +
                                               std::to_string(loaded.size()) + " loaded");
  for (size_t i = 0; i < std::min(loaded.size(), caches.size()); ++i) {
    const std::string layer = "layer " + std::to_string(i);
    compare_states(c, layer, *caches[i], *loaded[i]);
    c.expect(describe(*caches[i]) == describe(*loaded[i]),
             layer + ": " + describe(*caches[i]) + " loaded as " + describe(*loaded[i]));
  }
  caches.clear(); // decoding goes on from the file alone
  if (c.failures.empty()) {
    Run after = decode(m, loaded, next, kAfter);
    for (int i = 0; i < kAfter; ++i) {
      const std::string step =
          "step " + std::to_string(kBefore + i) + " (" + std::to_string(i) + " after loading)";
      c.expect(after.tokens[i] == continuation[i],
               step + ": token " + std::to_string(after.tokens[i]) + " but uninterrupted " +
                   std::to_string(continuation[i]));
      const auto& want = full.logits[kBefore + i];
      if (!bitwise_equal(after.logits[i], want)) {
        float diff = mx::max(mx::abs(after.logits[i] - want)).item<float>();
        c.failures.push_back(step + ": logits differ from the uninterrupted run's (max |diff| " +
                             std::to_string(diff) + ")");
      }
    }
    for (size_t i = 0; i < loaded.size(); ++i) {
      const int offset = sequence_cache(*loaded[i]).offset();
      c.expect(offset == int(fed.size()) + kAfter,
               "layer " + std::to_string(i) + ": offset " + std::to_string(offset) +
                   " after decoding, expected " + std::to_string(fed.size() + kAfter));
    }
  }

  std::cout << label << ": prompt " << kPrompt << ", " << kBefore << " steps, saved at offset "
            << fed.size() << " (" << saved << "), loaded, " << kAfter << " steps\n";
  std::cout << "  uninterrupted: " << join(full.tokens, " ") << "\n";
  for (auto& f : c.failures) {
    std::cout << "  DIFFERS: " << f << "\n";
  }
  std::cout << "  "
            << (c.failures.empty() ? "tokens and logits equal the uninterrupted run's" : "FAILED")
            << "\n";
  return c.failures.empty();
}

// --load: the file's layers, then a few steps on them.
int run_loaded(const Model& m, const std::string& path) {
  auto [caches, metadata] = kvcore::load_prompt_cache(path);
  std::cout << "loaded " << path << ": " << caches.size() << " layers\n";
  for (auto& [key, value] : metadata) {
    std::cout << "  metadata " << key << " = " << value << "\n";
  }
  for (size_t i = 0; i < caches.size(); ++i) {
    std::cout << "layer " << i << ": " << describe(*caches[i]) << "\n";
  }

  // The file must fit this model before decoding on it.
  if (caches.size() != size_t(kLayers)) {
    std::cout << "cannot decode: this model has " << kLayers << " layers, the file "
              << caches.size() << "\n";
    return 1;
  }
  auto fits = [](const kvcore::OptionalArray& a) {
    return a && a->ndim() == 4 && a->shape(0) == 1 && a->shape(1) == kKvHeads &&
        a->shape(3) == kHeadDim && a->dtype() == mx::float32;
  };
  for (size_t i = 0; i < caches.size(); ++i) {
    auto* seq = dynamic_cast<kvcore::SequenceCache*>(caches[i].get());
    if (!seq || (seq->keys() && !(fits(seq->keys()) && fits(seq->values())))) {
      std::cout << "cannot decode: layer " << i << " is not a float32 keys/values cache of (1, "
                << kKvHeads << ", S, " << kHeadDim << ")\n";
      return 1;
    }
  }

  // A file this program saved says what to feed next and what follows.
  const bool ours = metadata.count("model") && metadata.at("model") == kModelName;
  int next = metadata.count("next_token") ? std::stoi(metadata.at("next_token")) : 0;
  if (next < 0 || next >= kVocab) {
    std::cout << "cannot decode: next_token " << next << " is outside the vocabulary of "
              << kVocab << "\n";
    return 1;
  }
  std::vector<int> expected;
  if (ours && metadata.count("continuation")) {
    expected = split_ints(metadata.at("continuation"));
  }
  const int steps = expected.empty() ? kLoadSteps : static_cast<int>(expected.size());
  std::vector<int> before;
  for (auto& c : caches) {
    before.push_back(sequence_cache(*c).offset());
  }
  Run run = decode(m, caches, next, steps);
  std::cout << "decoded " << steps << " steps from token " << next << ": " << join(run.tokens, " ")
            << "\n";
  bool ok = true;
  for (size_t i = 0; i < caches.size(); ++i) {
    int offset = sequence_cache(*caches[i]).offset();
    std::cout << "layer " << i << ": offset " << offset << " after decoding\n";
    if (offset != before[i] + steps) {
      std::cout << "  DIFFERS: expected offset " << before[i] + steps << "\n";
      ok = false;
    }
  }
  if (!expected.empty()) {
    if (run.tokens == expected) {
      std::cout << "tokens equal the saving run's uninterrupted continuation\n";
    } else {
      std::cout << "DIFFERS: the saving run went on with " << join(expected, " ") << "\n";
      ok = false;
    }
  }
  std::cout << (ok ? "load: ok" : "load: FAILED") << "\n";
  return ok ? 0 : 1;
}

std::string with_extension(std::string path) {
  const std::string ext = ".safetensors";
  if (path.size() < ext.size() || path.compare(path.size() - ext.size(), ext.size(), ext) != 0) {
    path += ext;
  }
  return path;
}

std::string rotating_path(const std::string& path) {
  std::string p = with_extension(path);
  return p.substr(0, p.size() - std::string(".safetensors").size()) + ".rotating.safetensors";
}

int usage() {
  std::cerr << "usage: prompt_cache [--save FILE] [--load FILE]\n";
  return 2;
}

} // namespace

int main(int argc, char** argv) {
  std::optional<std::string> save, load;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if ((arg == "--save" || arg == "--load") && i + 1 < argc) {
      (arg == "--save" ? save : load) = argv[++i];
    } else {
      return usage();
    }
  }

  try {
    const Model model = make_model();
    if (load) {
      return run_loaded(model, *load);
    }
    namespace fs = std::filesystem;
    const std::string tmp =
        fs::temp_directory_path() / ("kvcore_prompt_cache_" + std::to_string(::getpid()));
    const std::string kv_path = with_extension(save ? *save : tmp);
    const std::string rot_path = rotating_path(kv_path);
    bool ok = round_trip(model, "KVCache", std::nullopt, kv_path);
    const std::string rotating = "RotatingKVCache(max_size=" + std::to_string(kMaxKvSize) + ")";
    ok = round_trip(model, rotating, kMaxKvSize, rot_path) && ok;
    if (save) {
      std::cout << "saved " << kv_path << " and " << rot_path << "\n";
    } else {
      fs::remove(kv_path);
      fs::remove(rot_path);
    }
    std::cout << (ok ? "prompt_cache example: ok" : "prompt_cache example: FAILED") << "\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cout << "error: " << e.what() << "\n";
    return 1;
  }
}
