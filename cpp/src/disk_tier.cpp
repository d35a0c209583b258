#include "kvcore/disk_tier.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <deque>
#include <fstream>
#include <future>
#include <limits>
#include <random>
#include <system_error>
#include <thread>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mlx/transforms.h>

#include "kvcore/errors.h"

namespace kvcore {

namespace fs = std::filesystem;

namespace {

constexpr const char* kDisk = "LRUPromptCache disk tier";
constexpr size_t kMaxErrors = 64;
// Block files read and hashed at once by a fetch.
constexpr size_t kReadThreads = 8;
// A tail whose blocks are not indexed this long after it was first seen is
// removed (their writer died, or another process evicted them).
constexpr int64_t kOrphanNs = 30ll * 1000000000;

uint64_t key_hash(const std::string& model, const Tokens& tokens) {
  DiskHasher h;
  h.add(model.data(), model.size());
  h.add(tokens.data(), tokens.size() * sizeof(int64_t));
  return h.h;
}

int64_t now_ns() {
  struct timespec ts {};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t mtime_ns(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return -1;
  }
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

// Mark a file used: its mtime, which every process sharing the directory
// sees, is when it was last read.
int64_t touch(const std::string& path) {
  const struct timespec times[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
  ::utimensat(AT_FDCWD, path.c_str(), times, 0);
  return mtime_ns(path); // the filesystem's clock, as other processes see it
}

// An entry's file name: "<16 hex>-<16 hex>.safetensors".
bool is_entry_name(const std::string& name) {
  auto hex_at = [&](size_t at) {
    return std::all_of(name.begin() + at, name.begin() + at + 16,
                       [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; });
  };
  return name.size() == 45 && hex_at(0) && name[16] == '-' && hex_at(17) &&
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
  if (name.compare(17, 16, hex16(got)) != 0) {
    throw ValueError(kDisk, "file contents hashing to " + name.substr(17, 16), hex16(got));
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
    // old is trusted to mean "nothing since"; so is a listing that left
    // no tail waiting for its blocks.
    const bool settled = std::time(nullptr) - static_cast<int64_t>(st.st_mtim.tv_sec) > 1;
    dir_stamp_ = settled ? stamp : -1;
  }
  std::error_code ec;
  std::vector<std::pair<fs::file_time_type, std::string>> files, block_files;
  std::set<std::string> listed;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    uint64_t chain = 0, hash = 0;
    if (is_entry_name(name) && e.is_regular_file(ec)) {
      files.emplace_back(e.last_write_time(ec), e.path().string());
      listed.insert(e.path().string());
    } else if (parse_block_name(name, &chain, &hash) && e.is_regular_file(ec)) {
      block_files.emplace_back(e.last_write_time(ec), e.path().string());
      listed.insert(e.path().string());
    }
  }
  std::sort(files.begin(), files.end()); // oldest first
  std::vector<std::string> fresh, fresh_blocks;
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
    std::vector<uint64_t> gone_blocks;
    for (const auto& [chain, b] : blocks_) {
      if (listed.count(b.path)) {
        known.insert(b.path);
      } else if (!fs::exists(b.path, ec)) {
        gone_blocks.push_back(chain);
      }
    }
    for (uint64_t c : gone_blocks) {
      remove_block(c, false);
    }
    for (const auto& [_, path] : files) {
      if (!known.count(path)) {
        fresh.push_back(path);
      }
    }
    for (const auto& [_, path] : block_files) {
      if (!known.count(path)) {
        fresh_blocks.push_back(path);
      }
    }
  }
  // Blocks first, parents before children, then the tails over them.
  std::vector<std::pair<BlockHeader, std::string>> headers;
  for (const auto& path : fresh_blocks) {
    try {
      BlockHeader h = read_block_header(path);
      uint64_t chain = 0, hash = 0;
      parse_block_name(file_name(path), &chain, &hash);
      if (chain != h.chain) {
        throw ValueError(kDisk, "a block file named for its chain " + hex16(h.chain), "'" + file_name(path) + "'");
      }
      headers.emplace_back(std::move(h), path);
    } catch (const CacheError& e) {
      if (fs::exists(path, ec)) {
        std::lock_guard<std::mutex> lock(mutex_);
        note(file_name(path), e.what());
        fs::remove(path, ec);
      }
    }
  }
  std::sort(headers.begin(), headers.end(),
            [](const auto& a, const auto& b) { return a.first.index < b.first.index; });
  for (auto& [h, path] : headers) {
    std::lock_guard<std::mutex> lock(mutex_);
    struct stat bs {};
    if (::stat(path.c_str(), &bs) == 0) {
      add_block(path, std::move(h), static_cast<int64_t>(bs.st_size), mtime_ns(path));
    }
  }
  for (const auto& path : fresh) {
    try {
      Found f = read_entry(path);
      std::lock_guard<std::mutex> lock(mutex_);
      if (!resolve(f)) {
        // Its blocks are not all here: written by a process still writing
        // them, or gone; look again next time, and delete it once it is old.
        auto [it, first] = orphans_.emplace(path, now_ns());
        dir_stamp_ = -1;
        if (!first && now_ns() - it->second > kOrphanNs) {
          note(file_name(path), "removed: its chain of blocks is not on disk");
          fs::remove(path, ec);
          orphans_.erase(it);
        }
        continue;
      }
      orphans_.erase(path);
      add(std::move(f));
    } catch (const CacheError& e) {
      if (fs::exists(path, ec)) {
        std::lock_guard<std::mutex> lock(mutex_);
        orphans_.erase(path);
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
int64_t DiskTier::block_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(blocks_.size());
}

int64_t DiskTier::blocks_read() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_read_;
}

bool DiskTier::has_block(uint64_t chain) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.count(chain) > 0 || queued_blocks_.count(chain) > 0;
}

void DiskTier::write_block(const BlockHeader& header, const std::vector<BlockLayer>& rows) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_ || blocks_.count(header.chain) || queued_blocks_.count(header.chain)) {
      return;
    }
  }
  PreparedFile file = prepare_block(header, rows); // mlx ops, on the caller's thread
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_ || !queued_blocks_.insert(header.chain).second) {
    return;
  }
  if (!writer_) {
    writer_ = std::make_unique<std::thread>([this] { run(); });
  }
  Job job{{header.model, {}}, "", false, std::move(file), {}, header};
  queue_.push_back(std::move(job));
  work_.notify_one();
}

void DiskTier::write(
    const std::string& model,
    const Tokens& tokens,
    const std::string& type,
    bool trimmable,
    PreparedFile file,
    const Chain& chain) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_ || has(model, tokens)) {
    return;
  }
  if (!writer_) {
    writer_ = std::make_unique<std::thread>([this] { run(); });
  }
  queued_.insert(key_hash(model, tokens));
  queue_.push_back({{model, tokens}, type, trimmable, std::move(file), chain, std::nullopt});
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
      // Named by model and tokens (or a block's chain), and by a hash of
      // the file as written.
      const uint64_t h = disk_file_hash(tmp);
      const std::string name = job.block ? block_file_name(job.block->chain, h)
                                         : hex16(key_hash(job.key.model, job.key.tokens)) + "-" + hex16(h) +
              ".safetensors";
      path = (fs::path(dir_) / name).string();
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
    if (job.block) {
      queued_blocks_.erase(job.block->chain);
    } else {
      queued_.erase(key_hash(job.key.model, job.key.tokens));
    }
    const std::string file = !tmp.empty() ? file_name(tmp)
        : job.block                       ? "blk-" + hex16(job.block->chain) + "-*.safetensors"
                                          : hex16(key_hash(job.key.model, job.key.tokens)) + "-*.safetensors";
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
  const std::string version = meta_get(m, "kvcore.entry");
  if (version != "1" && version != "2") {
    throw ValueError(kDisk, "kvcore.entry 1 or 2", "'" + version.substr(0, 40) + "'");
  }
  Found f{meta_get(m, "kvcore.model"), parse_tokens(m, "kvcore.tokens"), {}};
  const std::string type = meta_get(m, "kvcore.type");
  const auto& o = cache_type_order();
  if (std::find(o.begin(), o.end(), type) == o.end() && type != checkpoint_type()) {
    throw ValueError(kDisk, "a cache type", "'" + type.substr(0, 40) + "'");
  }
  f.entry = Entry{path, type, meta_get(m, "kvcore.trimmable") == "1", static_cast<int64_t>(h.file_bytes), {},
                  mtime_ns(path)};
  if (version == "2") { // a tail after a chain of blocks
    Chain& c = f.entry.chain;
    c.blocks = meta_int(m, "kvcore.blocks");
    const int64_t bt = meta_int(m, "kvcore.block_tokens");
    c.layout = meta_get(m, "kvcore.layout");
    const std::string last = meta_get(m, "kvcore.chain");
    auto [end, ec] = std::from_chars(last.data(), last.data() + last.size(), c.last, 16);
    if (c.blocks < 1 || bt < 1 || bt > (1 << 16) || last.size() != 16 || ec != std::errc() ||
        end != last.data() + last.size()) {
      throw ValueError(kDisk, "a tail after a chain of at least one block",
                       std::to_string(c.blocks) + " blocks ending '" + last.substr(0, 40) + "'");
    }
    c.block_tokens = static_cast<int>(bt);
    return f; // named for its tokens once resolve() has them
  }
  const std::string name = file_name(path);
  if (name.substr(0, 16) != hex16(key_hash(f.model, f.tokens))) {
    throw ValueError(kDisk, "a file named for its model and tokens", "'" + name + "'");
  }
  return f;
}

bool DiskTier::resolve(Found& f) const {
  const Chain& c = f.entry.chain;
  if (c.blocks == 0) {
    return true;
  }
  std::vector<const Tokens*> parts;
  uint64_t at = c.last;
  for (int64_t i = c.blocks - 1; i >= 0; --i) {
    auto it = blocks_.find(at);
    if (it == blocks_.end()) {
      return false;
    }
    const BlockHeader& h = it->second.header;
    if (h.index != i || h.model != f.model || h.layout != c.layout || h.block_tokens != c.block_tokens) {
      throw ValueError(kDisk, "a chain of " + std::to_string(c.blocks) + " blocks of its model and layout",
                       "block " + hex16(at) + " at index " + std::to_string(h.index));
    }
    parts.push_back(&h.tokens);
    at = h.parent;
  }
  Tokens all;
  for (auto p = parts.rbegin(); p != parts.rend(); ++p) {
    all.insert(all.end(), (*p)->begin(), (*p)->end());
  }
  all.insert(all.end(), f.tokens.begin(), f.tokens.end());
  const std::string name = file_name(f.entry.path);
  if (name.substr(0, 16) != hex16(key_hash(f.model, all))) {
    throw ValueError(kDisk, "a file named for its model and tokens", "'" + name + "'");
  }
  f.tokens = std::move(all);
  return true;
}

void DiskTier::link(const Chain& c, int sign) {
  if (c.blocks > 0) {
    auto it = blocks_.find(c.last);
    if (it != blocks_.end()) {
      it->second.children += sign;
    }
  }
}

void DiskTier::add(Found f) {
  if (const Entry* held = index_.get(f.model, f.tokens)) {
    if (held->path == f.entry.path) {
      return;
    }
    // Two files of one entry (a copy, or another writer's version): the
    // newer replaces the older only if it passes its hash check.
    check_hash(f.entry.path, disk_file_hash(f.entry.path));
    remove(f.model, f.tokens, true);
  }
  bytes_ += f.entry.bytes;
  link(f.entry.chain, +1);
  index_.add(f.model, f.tokens, std::move(f.entry));
  order_.push_back({std::move(f.model), std::move(f.tokens)});
}

void DiskTier::add_block(const std::string& path, BlockHeader h, int64_t bytes, int64_t used) {
  auto it = blocks_.find(h.chain);
  std::error_code ec;
  if (it != blocks_.end()) {
    // Two files of one block (writers whose bits differ): every process
    // keeps the one whose name sorts first and deletes the other.
    Block& held = it->second;
    if (held.path != path && fs::exists(held.path, ec)) {
      if (file_name(path) < file_name(held.path)) {
        fs::remove(held.path, ec);
        bytes_ += bytes - held.bytes;
        held.path = path;
        held.bytes = bytes;
        held.used = used;
      } else {
        fs::remove(path, ec);
      }
    }
    return;
  }
  if (h.parent != 0) {
    auto p = blocks_.find(h.parent);
    if (p != blocks_.end()) {
      ++p->second.children;
    }
  }
  bytes_ += bytes;
  const uint64_t chain = h.chain;
  blocks_.emplace(chain, Block{path, std::move(h), bytes, used, 0});
}

void DiskTier::remove_block(uint64_t chain, bool delete_file) {
  std::set<uint64_t> doomed{chain};
  for (bool grew = true; grew;) { // what continues it
    grew = false;
    for (const auto& [c, b] : blocks_) {
      if (!doomed.count(c) && doomed.count(b.header.parent)) {
        doomed.insert(c);
        grew = true;
      }
    }
  }
  std::vector<Key> tails;
  for (const Key& k : order_) {
    const Entry* e = index_.get(k.model, k.tokens);
    if (e->chain.blocks > 0 && doomed.count(e->chain.last)) {
      tails.push_back(k);
    }
  }
  for (const Key& k : tails) {
    remove(k.model, k.tokens, delete_file);
  }
  std::error_code ec;
  for (uint64_t c : doomed) {
    auto it = blocks_.find(c);
    if (it == blocks_.end()) {
      continue;
    }
    auto p = blocks_.find(it->second.header.parent);
    if (p != blocks_.end() && !doomed.count(p->first)) {
      --p->second.children;
    }
    bytes_ -= it->second.bytes;
    if (delete_file) {
      fs::remove(it->second.path, ec);
    }
    blocks_.erase(it);
  }
}

void DiskTier::evict() {
  std::set<std::string> restated;
  while (bytes_ > max_bytes_ && (!order_.empty() || !blocks_.empty())) {
    // The least recently used file that nothing continues: a tail, or a
    // block no stored block or tail follows.
    const Key* tail = nullptr;
    int64_t oldest = std::numeric_limits<int64_t>::max();
    for (const Key& k : order_) {
      const Entry* e = index_.get(k.model, k.tokens);
      if (e->used < oldest) {
        oldest = e->used;
        tail = &k;
      }
    }
    std::optional<uint64_t> block;
    for (const auto& [c, b] : blocks_) {
      if (b.children <= 0 && b.used < oldest) {
        oldest = b.used;
        block = c;
        tail = nullptr;
      }
    }
    if (tail == nullptr && !block) {
      return;
    }
    // Another process may have read it since it was indexed: look once.
    const std::string path = block ? blocks_.at(*block).path : index_.get(tail->model, tail->tokens)->path;
    const int64_t now = mtime_ns(path);
    if (now > oldest && restated.insert(path).second) {
      if (block) {
        blocks_.at(*block).used = now;
      } else {
        const_cast<Entry*>(index_.get(tail->model, tail->tokens))->used = now;
      }
      continue;
    }
    if (block) {
      remove_block(*block, true);
    } else {
      Key k = *tail;
      remove(k.model, k.tokens, true);
    }
  }
}

Metadata DiskTier::metadata(
    const std::string& model,
    const Tokens& tokens,
    const std::string& type,
    bool trimmable,
    const Chain& chain) {
  Metadata m;
  m["kvcore.entry"] = chain.blocks > 0 ? "2" : "1";
  m["kvcore.model"] = model;
  m["kvcore.type"] = type;
  m["kvcore.trimmable"] = trimmable ? "1" : "0";
  const size_t skip = static_cast<size_t>(chain.blocks * chain.block_tokens);
  put_tokens(m, "kvcore.tokens", Tokens(tokens.begin() + static_cast<long>(std::min(skip, tokens.size())), tokens.end()));
  if (chain.blocks > 0) {
    m["kvcore.blocks"] = std::to_string(chain.blocks);
    m["kvcore.block_tokens"] = std::to_string(chain.block_tokens);
    m["kvcore.chain"] = hex16(chain.last);
    m["kvcore.layout"] = chain.layout;
  }
  return m;
}

void DiskTier::check_entry(const Metadata& m, const std::string& model, const Tokens& tokens, const Chain& chain) {
  if (meta_get(m, "kvcore.model") != model) {
    throw ValueError(kDisk, "an entry of model " + model.substr(0, 80),
                     "one of " + meta_get(m, "kvcore.model").substr(0, 80));
  }
  const size_t skip = static_cast<size_t>(chain.blocks * chain.block_tokens);
  if (skip > tokens.size() ||
      parse_tokens(m, "kvcore.tokens") != Tokens(tokens.begin() + static_cast<long>(skip), tokens.end())) {
    throw ValueError(kDisk, "the entry's " + std::to_string(tokens.size()) + " tokens", "other tokens");
  }
  if (chain.blocks == 0) {
    if (meta_get(m, "kvcore.entry") != "1") {
      throw ValueError(kDisk, "a whole entry", "a tail");
    }
    return;
  }
  // The chain the tail names is the one these tokens hash to.
  uint64_t at = 0;
  for (int64_t i = 0; i < chain.blocks; ++i) {
    at = block_chain(at, model, chain.layout, chain.block_tokens, tokens.data() + i * chain.block_tokens,
                     static_cast<size_t>(chain.block_tokens));
  }
  if (meta_get(m, "kvcore.entry") != "2" || meta_int(m, "kvcore.blocks") != chain.blocks ||
      meta_int(m, "kvcore.block_tokens") != chain.block_tokens || meta_get(m, "kvcore.layout") != chain.layout ||
      meta_get(m, "kvcore.chain") != hex16(at)) {
    throw ValueError(kDisk, "a tail after chain " + hex16(at), "'" + meta_get(m, "kvcore.chain").substr(0, 40) + "'");
  }
}

// A new, empty temporary file of this process, named so that no other
// process (forked, or run with the same addresses) picks the same name.
std::string DiskTier::create_temp() const {
  std::random_device random;
  for (int attempt = 0;; ++attempt) {
    const uint64_t token = (static_cast<uint64_t>(random()) << 32) ^ random();
    const std::string path = (fs::path(dir_) / (".tmp-" + host_tag() + "-" + std::to_string(getpid()) +
                                                "-" + hex16(token) + ".safetensors"))
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
  std::error_code ec;
  if (bytes < 0 || bytes > max_bytes_) {
    fs::remove(written, ec);
    return;
  }
  if (job.block) {
    if (blocks_.count(job.block->chain)) { // another process wrote it meanwhile
      fs::remove(written, ec);
      return;
    }
    fs::rename(written, path, ec); // the same name holds the same bytes: replacing is safe
    if (ec) {
      fs::remove(written, ec);
      throw ValueError(kDisk, "a file it can rename", ec.message());
    }
    ++written_;
    add_block(path, *job.block, bytes, mtime_ns(path));
    evict();
    return;
  }
  const std::string& model = job.key.model;
  const Tokens& tokens = job.key.tokens;
  Found f{model, Tokens(tokens.begin() + static_cast<long>(job.chain.blocks * job.chain.block_tokens), tokens.end()),
          Entry{path, job.type, job.trimmable, bytes, job.chain, now_ns()}};
  if (!resolve(f)) {
    fs::remove(written, ec);
    throw ValueError(kDisk, "its " + std::to_string(job.chain.blocks) + " blocks on disk", "a chain with a hole");
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
  link(job.chain, +1);
  index_.add(model, tokens, Entry{path, job.type, job.trimmable, bytes, job.chain, mtime_ns(path)});
  order_.push_back({model, tokens});
  if (job.trimmable && job.type != checkpoint_type()) {
    // As in memory: a trimmable entry serves its prefixes, whose files go.
    std::vector<Tokens> prefixes;
    for (const Key& k : order_) {
      if (k.model == model && k.tokens.size() < tokens.size() &&
          std::equal(k.tokens.begin(), k.tokens.end(), tokens.begin())) {
        prefixes.push_back(k.tokens);
      }
    }
    for (const Tokens& p : prefixes) {
      remove(model, p, true);
    }
  }
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
    check_hash(e->path, disk_bytes_hash(*bytes));
    LoadedPromptCache loaded = load_prompt_cache_bytes(std::move(bytes));
    check_entry(loaded.metadata, model, tokens, e->chain);
    const int64_t used = touch(e->path);
    std::lock_guard<std::mutex> lock(mutex_);
    if (const Entry* now = index_.get(model, tokens); now != nullptr && now->path == e->path) {
      const_cast<Entry*>(now)->used = used;
    }
    return loaded;
  } catch (const std::exception& ex) {
    refuse(model, tokens, ex.what());
    return std::nullopt;
  }
}

std::optional<std::vector<std::vector<BlockLayer>>> DiskTier::load_blocks(
    const std::string& model,
    const Tokens& tokens,
    const Chain& chain,
    int64_t first,
    int64_t count) {
  const int bt = chain.block_tokens;
  if (count > chain.blocks || static_cast<size_t>(count * bt) > tokens.size()) {
    return std::nullopt;
  }
  // What each block must be, and the file the index has for it.
  struct Want {
    BlockHeader header;
    std::string path;
    int64_t size = 0;
  };
  std::vector<Want> wants;
  uint64_t parent = 0;
  for (int64_t j = 0; j < count; ++j) {
    BlockHeader want;
    want.model = model;
    want.layout = chain.layout;
    want.block_tokens = bt;
    want.index = j;
    want.parent = parent;
    want.tokens.assign(tokens.begin() + j * bt, tokens.begin() + (j + 1) * bt);
    want.chain = block_chain(parent, model, chain.layout, bt, want.tokens.data(), want.tokens.size());
    parent = want.chain;
    if (j < first) {
      continue;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = blocks_.find(want.chain);
    if (it == blocks_.end()) {
      return std::nullopt; // a chain with a hole ends there
    }
    wants.push_back({std::move(want), it->second.path, it->second.bytes});
  }
  // Files are read and hashed ahead on threads of their own (plain bytes: no
  // mlx there), a bounded window at a time; checked, turned into arrays and
  // evaluated here, in order, a few blocks per mx::eval.
  struct Read {
    std::shared_ptr<std::string> bytes; ///< null: the file is gone
    uint64_t hash = 0;
  };
  const size_t threads = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, kReadThreads);
  const size_t window = 2 * threads;
  std::deque<std::future<Read>> ahead;
  size_t launched = 0;
  auto launch = [&] {
    const Want& w = wants[launched++];
    auto read = [path = w.path, size = w.size] {
      Read r;
      auto bytes = std::make_shared<std::string>();
      if (read_whole(path, size, *bytes)) {
        r.hash = disk_bytes_hash(*bytes);
        r.bytes = std::move(bytes);
      }
      return r;
    };
    try {
      ahead.push_back(std::async(std::launch::async, read));
    } catch (const std::system_error&) { // no thread to be had: read it here, when its turn comes
      ahead.push_back(std::async(std::launch::deferred, read));
    }
  };
  // Drops the block of `w` from the index (and its file, if refused).
  auto drop = [&](const Want& w, const std::string* why) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (why != nullptr) {
      note(file_name(w.path), *why);
    }
    auto it = blocks_.find(w.header.chain);
    if (it != blocks_.end() && it->second.path == w.path) {
      remove_block(w.header.chain, why != nullptr); // gone: another process deleted it, a miss
    } else if (why != nullptr) {
      std::error_code ec;
      fs::remove(w.path, ec);
    }
  };
  std::vector<std::vector<BlockLayer>> out;
  size_t evaluated = 0;
  // Evaluates the blocks read since the last call; on an error, block by
  // block to name the file.
  auto evaluate = [&]() -> bool {
    std::vector<mx::array> arrays;
    for (size_t i = evaluated; i < out.size(); ++i) {
      for (const auto& l : out[i]) {
        arrays.insert(arrays.end(), l.arrays.begin(), l.arrays.end());
      }
    }
    try {
      mx::eval(arrays);
      evaluated = out.size();
      return true;
    } catch (const std::exception&) {
    }
    for (; evaluated < out.size(); ++evaluated) {
      try {
        for (const auto& l : out[evaluated]) {
          mx::eval(l.arrays);
        }
      } catch (const std::exception& ex) {
        const std::string why = std::string("mlx: ") + ex.what();
        drop(wants[evaluated], &why);
        return false;
      }
    }
    return true;
  };
  for (size_t i = 0; i < wants.size(); ++i) {
    while (launched < wants.size() && launched < i + window) {
      launch();
    }
    const Want& w = wants[i];
    try {
      Read r = ahead.front().get();
      ahead.pop_front();
      if (!r.bytes) {
        drop(w, nullptr);
        return std::nullopt;
      }
      out.push_back(load_block_bytes(file_name(w.path), std::move(r.bytes), w.header, r.hash));
    } catch (const std::exception& ex) {
      const std::string why = ex.what();
      drop(w, &why);
      return std::nullopt;
    }
    if ((out.size() - evaluated == threads || i + 1 == wants.size()) && !evaluate()) {
      return std::nullopt;
    }
  }
  for (const Want& w : wants) {
    const int64_t used = touch(w.path);
    std::lock_guard<std::mutex> lock(mutex_);
    ++blocks_read_;
    if (auto it = blocks_.find(w.header.chain); it != blocks_.end()) {
      it->second.used = used;
    }
  }
  return out;
}

void DiskTier::refuse(const std::string& model, const Tokens& tokens, const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Entry* e = index_.get(model, tokens);
  note(e != nullptr ? file_name(e->path) : hex16(key_hash(model, tokens)) + "-*.safetensors", why);
  remove(model, tokens, true);
}

void DiskTier::remove(const std::string& model, const Tokens& tokens, bool delete_file) {
  std::optional<Entry> e = index_.pop(model, tokens);
  if (!e) {
    return;
  }
  bytes_ -= e->bytes;
  link(e->chain, -1);
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
