#include "kvcore/disk_tier.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "kvcore/errors.h"

namespace kvcore {

namespace fs = std::filesystem;

namespace {

constexpr const char* kDisk = "LRUPromptCache disk tier";
constexpr size_t kTokensPerKey = 2048; // keeps each metadata string short
constexpr size_t kMaxErrors = 64;

// A 64-bit hash of bytes, 8 at a time (corruption, not adversaries).
struct Hasher {
  uint64_t h = 0x243F6A8885A308D3ull;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      mix(w);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, p + i, n - i);
    mix(tail ^ (static_cast<uint64_t>(n - i) << 56));
  }
  void mix(uint64_t w) {
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
  }
};

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t key_hash(const std::string& model, const Tokens& tokens) {
  Hasher h;
  h.add(model.data(), model.size());
  h.add(tokens.data(), tokens.size() * sizeof(int64_t));
  return h.h;
}

// The hash of a whole file, streamed.
uint64_t file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw ValueError(kDisk, "a readable file", "'" + path + "'");
  }
  Hasher h;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    // Blocks of one size: a file always hashes the same.
    h.add(buf.data(), static_cast<size_t>(in.gcount()));
  }
  return h.h;
}

std::string get(const Metadata& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) {
    throw ValueError(kDisk, "metadata '" + key + "'", "none");
  }
  return it->second;
}

int64_t parse_int(const std::string& s, const char* what) {
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) {
    throw ValueError(kDisk, std::string(what) + " as an integer", "'" + s.substr(0, 40) + "'");
  }
  return v;
}

Tokens parse_tokens(const Metadata& m) {
  const int64_t n = parse_int(get(m, "kvcore.tokens"), "kvcore.tokens");
  if (n < 0 || static_cast<uint64_t>(n) > kMaxEntries * kTokensPerKey) {
    throw ValueError(kDisk, "a token count", std::to_string(n));
  }
  Tokens out;
  for (size_t chunk = 0; out.size() < static_cast<size_t>(n); ++chunk) {
    const std::string s = get(m, "kvcore.tokens." + std::to_string(chunk));
    size_t at = 0;
    while (at < s.size()) {
      size_t comma = s.find(',', at);
      if (comma == std::string::npos) {
        comma = s.size();
      }
      out.push_back(parse_int(s.substr(at, comma - at), "a token"));
      at = comma + 1;
    }
    if (s.empty() || out.size() > static_cast<size_t>(n)) {
      throw ValueError(kDisk, std::to_string(n) + " tokens", "a malformed token list");
    }
  }
  return out;
}

std::atomic<uint64_t> temp_counter{0};

// Live tiers, for flush_disk_tiers.
std::mutex registry_mutex;
std::set<DiskTier*>& registry() {
  static std::set<DiskTier*> r;
  return r;
}

} // namespace

void flush_disk_tiers() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (DiskTier* t : registry()) {
    t->flush();
  }
}

DiskTier::~DiskTier() {
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry().erase(this);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_.notify_all();
  if (writer_.joinable()) {
    writer_.join(); // after the queue is written
  }
}

int64_t DiskTier::nbytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_;
}

int64_t DiskTier::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(order_.size());
}

std::optional<DiskTier::Entry> DiskTier::entry(const std::string& model, const Tokens& tokens) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Entry* e = index_.get(model, tokens);
  return e ? std::optional<Entry>(*e) : std::nullopt;
}

bool DiskTier::contains(const std::string& model, const Tokens& tokens) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return has(model, tokens);
}

bool DiskTier::has(const std::string& model, const Tokens& tokens) const {
  return index_.get(model, tokens) != nullptr || queued_.count(key_hash(model, tokens)) > 0;
}

std::vector<std::string> DiskTier::errors() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {errors_.begin(), errors_.end()};
}

void DiskTier::write(
    const std::string& model,
    const Tokens& tokens,
    const std::string& type,
    bool trimmable,
    PreparedFile file) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (has(model, tokens)) {
    return;
  }
  if (!writer_.joinable()) {
    writer_ = std::thread([this] { run(); });
  }
  queued_.insert(key_hash(model, tokens));
  queue_.push_back({{model, tokens}, type, trimmable, std::move(file)});
  work_.notify_one();
}

void DiskTier::flush() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

// The writer thread: each queued file to a temporary name, then indexed
// under its checked name.
void DiskTier::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) {
      return; // stopped, everything written
    }
    Job job = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    const std::string tmp = temp_path();
    std::string error, path;
    int64_t bytes = -1;
    try {
      write_prepared(tmp, std::move(job.file));
      // Named by model and tokens, and by a hash of the file as written.
      path = (fs::path(dir_) / (hex(key_hash(job.key.model, job.key.tokens)) + "-" +
                                hex(file_hash(tmp)) + ".safetensors"))
                 .string();
      std::error_code ec;
      bytes = static_cast<int64_t>(fs::file_size(tmp, ec));
      if (ec) {
        bytes = -1;
      }
    } catch (const std::exception& e) {
      error = e.what();
      std::remove(tmp.c_str());
    }
    lock.lock();
    queued_.erase(key_hash(job.key.model, job.key.tokens));
    if (!error.empty()) {
      note("not written: " + error);
    } else {
      try {
        commit(job, tmp, path, bytes);
      } catch (const std::exception& e) {
        note(std::string("not written: ") + e.what());
      }
    }
    busy_ = false;
    idle_.notify_all();
  }
}

DiskTier::DiskTier(std::string dir, int64_t max_bytes) : dir_(std::move(dir)), max_bytes_(max_bytes) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (!fs::is_directory(dir_, ec)) {
    throw ValueError(kDisk, "a directory it can create or use", "'" + dir_ + "'");
  }
  std::vector<std::pair<fs::file_time_type, std::string>> files;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file(ec) && name.size() == 45 && name.compare(33, 12, ".safetensors") == 0) {
      files.emplace_back(e.last_write_time(ec), e.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  for (const auto& [_, path] : files) {
    try {
      index_file(path);
    } catch (const CacheError& e) {
      note(e.what());
    }
  }
  while (bytes_ > max_bytes_ && !order_.empty()) {
    Key k = order_.front();
    remove(k.model, k.tokens, true);
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().insert(this);
}

void DiskTier::index_file(const std::string& path) {
  SafetensorsHeader h = read_safetensors_header(path);
  // The user metadata of mlx-lm 0.32's layout: keys "0.<key>".
  Metadata m;
  for (const auto& [k, v] : h.metadata) {
    if (k.rfind("0.", 0) == 0) {
      m[k.substr(2)] = v;
    }
  }
  if (get(m, "kvcore.entry") != "1") {
    throw ValueError(kDisk, "kvcore.entry 1", "'" + get(m, "kvcore.entry").substr(0, 40) + "'");
  }
  const std::string model = get(m, "kvcore.model");
  Tokens tokens = parse_tokens(m);
  const std::string type = get(m, "kvcore.type");
  const auto& o = cache_type_order();
  if (std::find(o.begin(), o.end(), type) == o.end() && type != checkpoint_type()) {
    throw ValueError(kDisk, "a cache type", "'" + type.substr(0, 40) + "'");
  }
  const std::string name = fs::path(path).filename().string();
  if (name.substr(0, 16) != hex(key_hash(model, tokens))) {
    throw ValueError(kDisk, "a file named for its model and tokens", "'" + name + "'");
  }
  if (contains(model, tokens)) {
    remove(model, tokens, true); // an older file of the same entry
  }
  Entry e{path, type, get(m, "kvcore.trimmable") == "1", static_cast<int64_t>(h.file_bytes)};
  bytes_ += e.bytes;
  index_.add(model, tokens, std::move(e));
  order_.push_back({model, std::move(tokens)});
}

Metadata DiskTier::metadata(
    const std::string& model,
    const Tokens& tokens,
    const std::string& type,
    bool trimmable) {
  Metadata m;
  m["kvcore.entry"] = "1";
  m["kvcore.model"] = model;
  m["kvcore.type"] = type;
  m["kvcore.trimmable"] = trimmable ? "1" : "0";
  m["kvcore.tokens"] = std::to_string(tokens.size());
  for (size_t at = 0, chunk = 0; at < tokens.size(); at += kTokensPerKey, ++chunk) {
    std::string s;
    for (size_t i = at; i < std::min(tokens.size(), at + kTokensPerKey); ++i) {
      s += (i > at ? "," : "") + std::to_string(tokens[i]);
    }
    m["kvcore.tokens." + std::to_string(chunk)] = std::move(s);
  }
  return m;
}

void DiskTier::check_entry(const Metadata& m, const std::string& model, const Tokens& tokens) {
  if (get(m, "kvcore.model") != model) {
    throw ValueError(kDisk, "an entry of model " + model.substr(0, 80),
                     "one of " + get(m, "kvcore.model").substr(0, 80));
  }
  if (parse_tokens(m) != tokens) {
    throw ValueError(kDisk, "the entry's " + std::to_string(tokens.size()) + " tokens", "other tokens");
  }
}

std::string DiskTier::temp_path() const {
  return (fs::path(dir_) / (".tmp-" + hex(reinterpret_cast<uintptr_t>(this)) + "-" +
                            std::to_string(temp_counter++) + ".safetensors"))
      .string();
}

void DiskTier::commit(const Job& job, const std::string& written, const std::string& path, int64_t bytes) {
  const std::string& model = job.key.model;
  const Tokens& tokens = job.key.tokens;
  std::error_code ec;
  if (bytes < 0 || bytes > max_bytes_) {
    fs::remove(written, ec);
    return;
  }
  if (index_.get(model, tokens) != nullptr) {
    remove(model, tokens, true);
  }
  fs::rename(written, path, ec);
  if (ec) {
    fs::remove(written, ec);
    throw ValueError(kDisk, "a file it can rename", "'" + written + "'");
  }
  bytes_ += bytes;
  index_.add(model, tokens, Entry{path, job.type, job.trimmable, bytes});
  order_.push_back({model, tokens});
  while (bytes_ > max_bytes_ && !order_.empty()) {
    Key k = order_.front();
    remove(k.model, k.tokens, true);
  }
}

std::string DiskTier::checked_path(const std::string& model, const Tokens& tokens) const {
  const std::optional<Entry> e = entry(model, tokens);
  if (!e) {
    throw ValueError(kDisk, "an indexed entry", "none");
  }
  const std::string path = e->path;
  const std::string name = fs::path(path).filename().string();
  const std::string got = hex(file_hash(path));
  if (name.compare(17, 16, got) != 0) {
    throw ValueError(kDisk, "file contents hashing to " + name.substr(17, 16), got + " in '" + path + "'");
  }
  return path;
}

void DiskTier::refuse(const std::string& model, const Tokens& tokens, const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  note(why);
  remove(model, tokens, false);
}

void DiskTier::remove(const std::string& model, const Tokens& tokens, bool delete_file) {
  std::optional<Entry> e = index_.pop(model, tokens);
  if (!e) {
    return;
  }
  bytes_ -= e->bytes;
  auto it = std::find_if(order_.begin(), order_.end(),
                         [&](const Key& k) { return k.tokens == tokens && k.model == model; });
  if (it != order_.end()) {
    order_.erase(it);
  }
  if (delete_file) {
    std::error_code ec;
    fs::remove(e->path, ec);
  }
}

void DiskTier::note(std::string why) {
  errors_.push_back(std::move(why));
  if (errors_.size() > kMaxErrors) {
    errors_.pop_front();
  }
}

} // namespace kvcore
