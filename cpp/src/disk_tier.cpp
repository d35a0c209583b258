#include "kvcore/disk_tier.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <system_error>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

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

// A file's hash is taken over blocks of one size, whether streamed from
// disk or over bytes in memory: a file always hashes the same.
constexpr size_t kHashBlock = 1 << 20;

uint64_t bytes_hash(const std::string& bytes) {
  Hasher h;
  for (size_t at = 0, n = kHashBlock; n == kHashBlock; at += n) { // a last, short block, maybe empty
    n = std::min(kHashBlock, bytes.size() - at);
    h.add(bytes.data() + at, n);
  }
  return h.h;
}

// The hash of a whole file, streamed.
uint64_t file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw ValueError(kDisk, "a readable file", "'" + path + "'");
  }
  Hasher h;
  std::vector<char> buf(kHashBlock);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
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

// An entry's file name: "<16 hex>-<16 hex>.safetensors".
bool is_entry_name(const std::string& name) {
  auto hex16 = [&](size_t at) {
    return std::all_of(name.begin() + at, name.begin() + at + 16,
                       [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; });
  };
  return name.size() == 45 && hex16(0) && name[16] == '-' && hex16(17) &&
      name.compare(33, 12, ".safetensors") == 0;
}

std::string file_name(const std::string& path) {
  return fs::path(path).filename().string();
}

// This host's name as a part of a temporary name (no '-').
const std::string& host_tag() {
  static const std::string tag = [] {
    char buf[256] = {};
    gethostname(buf, sizeof buf - 1);
    std::string h = buf;
    for (char& c : h) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_') {
        c = '_';
      }
    }
    return h.empty() ? std::string("_") : h;
  }();
  return tag;
}

// The pid of a temporary file ".tmp-<host>-<pid>-<random>.safetensors" of
// this host whose process is gone; 0 otherwise.
pid_t dead_writer(const std::string& name) {
  const std::string head = ".tmp-", tail = ".safetensors";
  if (name.size() <= head.size() + tail.size() || name.compare(0, head.size(), head) != 0 ||
      name.compare(name.size() - tail.size(), tail.size(), tail) != 0) {
    return 0;
  }
  const std::string mid = name.substr(head.size(), name.size() - head.size() - tail.size());
  const size_t r = mid.rfind('-');
  const size_t p = r == std::string::npos || r == 0 ? std::string::npos : mid.rfind('-', r - 1);
  if (p == std::string::npos || mid.substr(0, p) != host_tag()) {
    return 0;
  }
  long long pid = 0;
  const char* first = mid.data() + p + 1;
  auto [end, ec] = std::from_chars(first, mid.data() + r, pid);
  if (ec != std::errc() || end != mid.data() + r || pid <= 0 || pid == getpid()) {
    return 0;
  }
  const bool alive = ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
  return alive ? 0 : static_cast<pid_t>(pid);
}

void check_hash(const std::string& path, uint64_t got) {
  const std::string name = file_name(path);
  if (name.compare(17, 16, hex(got)) != 0) {
    throw ValueError(kDisk, "file contents hashing to " + name.substr(17, 16), hex(got));
  }
}

// The whole file at `path`, which the index says is `bytes` long; false if
// it is gone.
bool read_whole(const std::string& path, int64_t bytes, std::string& out) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    if (errno == ENOENT) {
      return false;
    }
    throw ValueError(kDisk, "a readable file", std::strerror(errno));
  }
  struct stat st {};
  const bool sized = ::fstat(fd, &st) == 0;
  if (!sized || st.st_size != bytes) {
    ::close(fd);
    throw ValueError(kDisk, std::to_string(bytes) + " bytes, as indexed",
                     sized ? std::to_string(st.st_size) + " bytes" : std::string(std::strerror(errno)));
  }
  out.resize(static_cast<size_t>(bytes));
  size_t at = 0;
  while (at < out.size()) {
    const ssize_t n = ::read(fd, out.data() + at, out.size() - at);
    if (n <= 0) {
      ::close(fd);
      throw ValueError(kDisk, std::to_string(bytes) + " bytes", "a short read at " + std::to_string(at));
    }
    at += static_cast<size_t>(n);
  }
  ::close(fd);
  return true;
}

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

DiskTier::DiskTier(std::string dir, int64_t max_bytes) : dir_(std::move(dir)), max_bytes_(max_bytes) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (!fs::is_directory(dir_, ec)) {
    throw ValueError(kDisk, "a directory it can create or use", "'" + dir_ + "'");
  }
  scan();
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().insert(this);
}

DiskTier::~DiskTier() {
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry().erase(this);
  }
  close();
}

// Delete the temporary files of writers that are gone, then index the
// directory.
void DiskTier::scan() {
  std::error_code ec;
  std::vector<std::string> dead;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file(ec) && dead_writer(name) != 0) {
      dead.push_back(e.path().string());
    }
  }
  std::sort(dead.begin(), dead.end());
  for (const auto& path : dead) {
    fs::remove(path, ec);
    note(file_name(path), "removed, left by a process that is gone");
  }
  sync();
}

void DiskTier::sync() {
  struct stat st {};
  if (::stat(dir_.c_str(), &st) != 0) {
    return;
  }
  const int64_t stamp = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stamp == dir_stamp_) {
      return;
    }
    // A directory's mtime ticks coarsely: a change within the same tick
    // after this listing would leave it as it is. Only an mtime a second
    // old is trusted to mean "nothing since".
    const bool settled = std::time(nullptr) - static_cast<int64_t>(st.st_mtim.tv_sec) > 1;
    dir_stamp_ = settled ? stamp : -1;
  }
  std::error_code ec;
  std::vector<std::pair<fs::file_time_type, std::string>> files;
  std::set<std::string> listed;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    if (is_entry_name(e.path().filename().string()) && e.is_regular_file(ec)) {
      files.emplace_back(e.last_write_time(ec), e.path().string());
      listed.insert(e.path().string());
    }
  }
  std::sort(files.begin(), files.end()); // oldest first
  std::vector<std::string> fresh;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Key> gone;
    std::set<std::string> known;
    for (const Key& k : order_) {
      const std::string& path = index_.get(k.model, k.tokens)->path;
      if (listed.count(path)) {
        known.insert(path);
      } else if (!fs::exists(path, ec)) { // not one committed since the listing
        gone.push_back(k);
      }
    }
    for (const Key& k : gone) {
      remove(k.model, k.tokens, false); // deleted by another process
    }
    for (const auto& [_, path] : files) {
      if (!known.count(path)) {
        fresh.push_back(path);
      }
    }
  }
  for (const auto& path : fresh) {
    try {
      Found f = read_entry(path);
      std::lock_guard<std::mutex> lock(mutex_);
      add(std::move(f));
    } catch (const CacheError& e) {
      if (fs::exists(path, ec)) {
        std::lock_guard<std::mutex> lock(mutex_);
        note(file_name(path), e.what());
        fs::remove(path, ec);
      }
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  evict();
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
  if (closed_ || has(model, tokens)) {
    return;
  }
  if (!writer_) {
    writer_ = std::make_unique<std::thread>([this] { run(); });
  }
  queued_.insert(key_hash(model, tokens));
  queue_.push_back({{model, tokens}, type, trimmable, std::move(file)});
  work_.notify_one();
}

void DiskTier::flush() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

int64_t DiskTier::close() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) {
    idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
    return written_;
  }
  closed_ = stop_ = true;
  work_.notify_all();
  std::unique_ptr<std::thread> writer = std::move(writer_);
  lock.unlock();
  if (writer) {
    writer->join(); // after the queue is written
  }
  lock.lock();
  return written_;
}

bool DiskTier::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
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
    std::string tmp, error, path;
    int64_t bytes = -1;
    try {
      tmp = create_temp();
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
      if (!tmp.empty()) {
        std::remove(tmp.c_str());
      }
    }
    lock.lock();
    queued_.erase(key_hash(job.key.model, job.key.tokens));
    const std::string file =
        tmp.empty() ? hex(key_hash(job.key.model, job.key.tokens)) + "-*.safetensors" : file_name(tmp);
    if (!error.empty()) {
      note(file, "not written: " + error);
    } else {
      try {
        commit(job, tmp, path, bytes);
      } catch (const std::exception& e) {
        note(file, std::string("not written: ") + e.what());
      }
    }
    lock.unlock();
    sync(); // other processes' files count toward max_bytes too
    lock.lock();
    busy_ = false;
    idle_.notify_all();
  }
}

DiskTier::Found DiskTier::read_entry(const std::string& path) {
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
  Found f{get(m, "kvcore.model"), parse_tokens(m), {}};
  const std::string type = get(m, "kvcore.type");
  const auto& o = cache_type_order();
  if (std::find(o.begin(), o.end(), type) == o.end() && type != checkpoint_type()) {
    throw ValueError(kDisk, "a cache type", "'" + type.substr(0, 40) + "'");
  }
  const std::string name = file_name(path);
  if (name.substr(0, 16) != hex(key_hash(f.model, f.tokens))) {
    throw ValueError(kDisk, "a file named for its model and tokens", "'" + name + "'");
  }
  f.entry = Entry{path, type, get(m, "kvcore.trimmable") == "1", static_cast<int64_t>(h.file_bytes)};
  return f;
}

void DiskTier::add(Found f) {
  if (const Entry* held = index_.get(f.model, f.tokens)) {
    if (held->path == f.entry.path) {
      return;
    }
    // Two files of one entry (a copy, or another writer's version): the
    // newer replaces the older only if it passes its hash check.
    check_hash(f.entry.path, file_hash(f.entry.path));
    remove(f.model, f.tokens, true);
  }
  bytes_ += f.entry.bytes;
  index_.add(f.model, f.tokens, std::move(f.entry));
  order_.push_back({std::move(f.model), std::move(f.tokens)});
}

void DiskTier::evict() {
  while (bytes_ > max_bytes_ && !order_.empty()) {
    Key k = order_.front();
    remove(k.model, k.tokens, true);
  }
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

// A new, empty temporary file of this process, named so that no other
// process (forked, or run with the same addresses) picks the same name.
std::string DiskTier::create_temp() const {
  std::random_device random;
  for (int attempt = 0;; ++attempt) {
    const uint64_t token = (static_cast<uint64_t>(random()) << 32) ^ random();
    const std::string path = (fs::path(dir_) / (".tmp-" + host_tag() + "-" + std::to_string(getpid()) +
                                                "-" + hex(token) + ".safetensors"))
                                 .string();
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644);
    if (fd >= 0) {
      ::close(fd);
      return path;
    }
    if (errno != EEXIST || attempt == 8) {
      throw ValueError(kDisk, "a temporary file it can create", std::string(std::strerror(errno)));
    }
  }
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
    throw ValueError(kDisk, "a file it can rename", ec.message());
  }
  ++written_;
  bytes_ += bytes;
  index_.add(model, tokens, Entry{path, job.type, job.trimmable, bytes});
  order_.push_back({model, tokens});
  evict();
}

std::optional<LoadedPromptCache> DiskTier::load(const std::string& model, const Tokens& tokens) {
  const std::optional<Entry> e = entry(model, tokens);
  if (!e) {
    return std::nullopt;
  }
  auto bytes = std::make_shared<std::string>();
  try {
    if (!read_whole(e->path, e->bytes, *bytes)) {
      std::lock_guard<std::mutex> lock(mutex_);
      const Entry* now = index_.get(model, tokens);
      if (now != nullptr && now->path == e->path) {
        remove(model, tokens, false); // another process deleted it: a miss
      }
      return std::nullopt;
    }
    check_hash(e->path, bytes_hash(*bytes));
    LoadedPromptCache loaded = load_prompt_cache_bytes(std::move(bytes));
    check_entry(loaded.metadata, model, tokens);
    return loaded;
  } catch (const std::exception& ex) {
    refuse(model, tokens, ex.what());
    return std::nullopt;
  }
}

void DiskTier::refuse(const std::string& model, const Tokens& tokens, const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Entry* e = index_.get(model, tokens);
  note(e != nullptr ? file_name(e->path) : hex(key_hash(model, tokens)) + "-*.safetensors", why);
  remove(model, tokens, true);
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

void DiskTier::note(const std::string& file, const std::string& why) {
  errors_.push_back(file + ": " + why.substr(0, why.find('\n')));
  if (errors_.size() > kMaxErrors) {
    errors_.pop_front();
  }
}

} // namespace kvcore
