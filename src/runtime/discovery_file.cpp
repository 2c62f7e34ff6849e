// "file:DIR" discovery: processes on one host share a directory.
//
//   DIR/keys/<EncodeFileName(key)>   "<lease id>\n<value>", replaced atomically (temp + rename)
//   DIR/leases/<id>                  "<ttl seconds>\n"; its mtime is the last keep-alive
//   DIR/tmp/                         temp files for the atomic writes
//
// A key whose lease file is missing, or older than its TTL, is dead: readers skip it and remove
// it (and the stale lease file). A client whose process was stopped past its TTL notices on its
// next keep-alive (the lease file is missing or stale), rewrites the lease file under the same id
// and puts its keys again. Watches poll the directory every 100 ms and diff snapshots.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "base/log.h"
#include "runtime/discovery_internal.h"

namespace dyn::discovery_internal {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kPollInterval = std::chrono::milliseconds(100);
constexpr size_t kMaxFileName = 250;  // NAME_MAX is 255 on the usual file systems

Status Errno(const std::string& what) { return Status::IoError(what + ": " + std::strerror(errno)); }

class Layout {
 public:
  explicit Layout(std::string dir) : dir_(std::move(dir)) {}
  const std::string& dir() const { return dir_; }
  std::string Keys() const { return dir_ + "/keys"; }
  std::string Key(const std::string& name) const { return dir_ + "/keys/" + name; }
  std::string Lease(int64_t id) const { return dir_ + "/leases/" + std::to_string(id); }

  // Writes `content` to a temp file, then renames (replace) or links (create only) it to `path`.
  Status WriteAtomic(const std::string& path, std::string_view content, bool exclusive) const {
    static std::atomic<uint64_t> counter{0};
    std::string tmp = dir_ + "/tmp/" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return Errno("create " + tmp);
    size_t done = 0;
    while (done < content.size()) {
      ssize_t n = write(fd, content.data() + done, content.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        Status s = Errno("write " + tmp);
        close(fd);
        unlink(tmp.c_str());
        return s;
      }
      done += size_t(n);
    }
    close(fd);
    if (exclusive) {
      int rc = link(tmp.c_str(), path.c_str());
      int err = errno;
      unlink(tmp.c_str());
      if (rc != 0) return Status(err == EEXIST ? StatusCode::kInvalidArgument : StatusCode::kIoError, "link " + path + ": " + std::strerror(err));
      return Status::Ok();
    }
    if (rename(tmp.c_str(), path.c_str()) != 0) {
      Status s = Errno("rename to " + path);
      unlink(tmp.c_str());
      return s;
    }
    return Status::Ok();
  }

  enum class LeaseState { kAlive, kStale, kMissing };
  LeaseState CheckLease(int64_t id) const {
    std::string path = Lease(id);
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return LeaseState::kMissing;
    auto content = ReadSmall(path);
    int ttl = content ? std::atoi(content->c_str()) : 0;
    // An unreadable or half-created lease file is given the benefit of the doubt for a while.
    if (ttl <= 0) ttl = 10;
    auto mtime = std::chrono::system_clock::time_point(std::chrono::duration_cast<std::chrono::system_clock::duration>(
        std::chrono::seconds(st.st_mtim.tv_sec) + std::chrono::nanoseconds(st.st_mtim.tv_nsec)));
    return std::chrono::system_clock::now() - mtime > std::chrono::seconds(ttl) ? LeaseState::kStale : LeaseState::kAlive;
  }

  static std::optional<std::string> ReadSmall(const std::string& path) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::nullopt;
    std::string out;
    char buf[4096];
    while (true) {
      ssize_t n = read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      out.append(buf, size_t(n));
    }
    close(fd);
    return out;
  }

  // Parses a key file; nullopt when it vanished or is malformed.
  std::optional<KeyValue> ReadKey(const std::string& name, const std::string& key) const {
    auto content = ReadSmall(Key(name));
    if (!content) return std::nullopt;
    size_t nl = content->find('\n');
    if (nl == std::string::npos) return std::nullopt;
    KeyValue kv;
    kv.key = key;
    kv.lease = std::strtoll(content->c_str(), nullptr, 10);
    kv.value = content->substr(nl + 1);
    return kv;
  }

  // A reader found `kv` under a dead lease. Re-checks (the owner may have just come back), then
  // removes the stale lease file and the key if it still refers to that lease. Returns whether
  // the key is dead.
  bool Reap(const std::string& name, const KeyValue& kv) const {
    LeaseState state = CheckLease(kv.lease);
    if (state == LeaseState::kAlive) return false;
    if (state == LeaseState::kStale) unlink(Lease(kv.lease).c_str());
    auto current = ReadKey(name, kv.key);
    if (current && current->lease == kv.lease) unlink(Key(name).c_str());
    return true;
  }

  // A cached parse of one key file, valid while the file's identity and mtime are unchanged.
  struct Cached {
    ino_t ino = 0;
    int64_t mtime_ns = 0;
    off_t size = 0;
    KeyValue kv;
  };
  using Cache = std::map<std::string, Cached>;

  // Every live key under `prefix`. `cache` (optional) saves re-reading unchanged files.
  Result<std::map<std::string, KeyValue>> Scan(const std::string& prefix, Cache* cache) const {
    std::string keys_dir = Keys();
    DIR* d = opendir(keys_dir.c_str());
    if (d == nullptr) return Errno("open " + keys_dir);
    std::vector<std::string> names;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;  // "." and ".."; encoded names never start with '.'
      names.emplace_back(e->d_name);
    }
    closedir(d);
    std::map<std::string, KeyValue> out;
    std::map<int64_t, bool> alive;  // lease liveness, once per scan
    Cache next_cache;
    for (const std::string& name : names) {
      auto key = DecodeFileName(name);
      if (!key.ok() || key->compare(0, prefix.size(), prefix) != 0) continue;
      struct stat st;
      if (stat(Key(name).c_str(), &st) != 0) continue;
      int64_t mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
      std::optional<KeyValue> kv;
      if (cache != nullptr) {
        auto it = cache->find(name);
        if (it != cache->end() && it->second.ino == st.st_ino && it->second.mtime_ns == mtime_ns && it->second.size == st.st_size) {
          kv = it->second.kv;
        }
      }
      if (!kv) kv = ReadKey(name, *key);
      if (!kv) continue;
      if (kv->lease != 0) {
        auto it = alive.find(kv->lease);
        if (it == alive.end()) it = alive.emplace(kv->lease, CheckLease(kv->lease) == LeaseState::kAlive).first;
        if (!it->second && Reap(name, *kv)) continue;
      }
      if (cache != nullptr) next_cache[name] = Cached{st.st_ino, mtime_ns, st.st_size, *kv};
      out[*key] = std::move(*kv);
    }
    if (cache != nullptr) *cache = std::move(next_cache);
    return out;
  }

 private:
  std::string dir_;
};

struct FileWatchState {
  Layout layout;
  std::string prefix;
  WatchCallback callback;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;

  bool Stopped() {
    std::lock_guard lock(mu);
    return stop;
  }

  static void Loop(std::shared_ptr<FileWatchState> s) {
    Layout::Cache cache;
    std::optional<std::map<std::string, KeyValue>> last;
    while (!s->Stopped()) {
      auto snap = s->layout.Scan(s->prefix, &cache);
      if (!snap.ok()) {
        DYN_LOG(WARN) << "discovery " << s->layout.dir() << ": " << snap.status().ToString();
      } else {
        WatchUpdate update;
        if (!last) {
          update.reset = true;
          for (auto& [k, kv] : *snap) update.events.push_back({WatchEvent::Type::kPut, kv});
        } else {
          for (auto& [k, kv] : *snap) {
            auto it = last->find(k);
            if (it == last->end() || it->second.value != kv.value || it->second.lease != kv.lease) {
              update.events.push_back({WatchEvent::Type::kPut, kv});
            }
          }
          for (auto& [k, kv] : *last) {
            if (!snap->count(k)) update.events.push_back({WatchEvent::Type::kDelete, KeyValue{k, "", 0}});
          }
        }
        last = std::move(*snap);
        if (update.reset || !update.events.empty()) {
          if (s->Stopped()) return;
          s->callback(update);
        }
      }
      std::unique_lock lock(s->mu);
      s->cv.wait_for(lock, kPollInterval, [&] { return s->stop; });
    }
  }
};

class FileDiscovery : public Discovery {
 public:
  explicit FileDiscovery(std::string dir) : layout_(std::move(dir)), rng_(std::random_device{}()) {
    keepalive_ = std::thread([this] { KeepAliveLoop(); });
  }

  // Stops keep-alive without revoking: the leases run out as a crashed process's would.
  ~FileDiscovery() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    keepalive_.join();
  }

  Result<int64_t> GrantLease(int ttl_seconds) override {
    if (ttl_seconds <= 0) return Status::InvalidArgument("lease TTL must be positive");
    std::lock_guard lock(mu_);
    for (int attempt = 0; attempt < 16; ++attempt) {
      // 53 bits: the id survives a trip through JSON numbers.
      int64_t id = int64_t(rng_() & ((uint64_t(1) << 53) - 1));
      if (id == 0) continue;
      Status s = layout_.WriteAtomic(layout_.Lease(id), std::to_string(ttl_seconds) + "\n", /*exclusive=*/true);
      if (s.code() == StatusCode::kInvalidArgument) continue;  // id taken
      DYN_RETURN_IF_ERROR(s);
      OwnLease& lease = leases_[id];
      lease.ttl = ttl_seconds;
      lease.next_touch = Clock::now() + TouchInterval(ttl_seconds);
      return id;
    }
    return Status::Internal("could not pick a free lease id");
  }

  Status RevokeLease(int64_t lease) override {
    {
      std::lock_guard lock(mu_);
      leases_.erase(lease);
    }
    if (unlink(layout_.Lease(lease).c_str()) != 0 && errno != ENOENT) return Errno("revoke lease");
    // With its lease file gone every key of the lease is dead; a scan reaps them.
    auto all = layout_.Scan("", nullptr);
    return all.ok() ? Status::Ok() : all.status();
  }

  Status Put(const std::string& key, const std::string& value, int64_t lease) override {
    if (key.empty()) return Status::InvalidArgument("empty discovery key");
    std::string name = EncodeFileName(key);
    if (name.size() > kMaxFileName) return Status::InvalidArgument("discovery key too long for the file backend: " + key);
    std::lock_guard lock(mu_);
    // Our own lease counts as alive even if its file is momentarily stale or reaped (this process
    // was stopped): keep-alive restores the file and this key with it.
    if (lease != 0 && !leases_.count(lease) && layout_.CheckLease(lease) != Layout::LeaseState::kAlive) {
      return Status::NotFound("lease " + std::to_string(lease) + " not found");
    }
    DYN_RETURN_IF_ERROR(layout_.WriteAtomic(layout_.Key(name), std::to_string(lease) + "\n" + value, false));
    for (auto& [id, own] : leases_) own.keys.erase(key);
    auto it = leases_.find(lease);
    if (it != leases_.end()) it->second.keys[key] = value;
    return Status::Ok();
  }

  Status Delete(const std::string& key) override {
    std::lock_guard lock(mu_);
    for (auto& [id, own] : leases_) own.keys.erase(key);
    if (unlink(layout_.Key(EncodeFileName(key)).c_str()) != 0 && errno != ENOENT) return Errno("delete " + key);
    return Status::Ok();
  }

  Result<std::vector<KeyValue>> GetPrefix(const std::string& prefix) override {
    DYN_ASSIGN_OR_RETURN(auto snap, layout_.Scan(prefix, nullptr));
    std::vector<KeyValue> out;
    out.reserve(snap.size());
    for (auto& [k, kv] : snap) out.push_back(std::move(kv));
    return out;
  }

  Result<std::unique_ptr<WatchHandle>> WatchPrefix(const std::string& prefix, WatchCallback callback) override {
    if (!callback) return Status::InvalidArgument("null watch callback");
    auto state = std::make_shared<FileWatchState>(layout_, prefix, std::move(callback));
    return std::unique_ptr<WatchHandle>(new LoopWatchHandle<FileWatchState>(std::move(state)));
  }

  std::string Describe() const override { return "file:" + layout_.dir(); }

 private:
  struct OwnLease {
    int ttl = 0;
    std::map<std::string, std::string> keys;  // what to put again after the lease was lost
    Clock::time_point next_touch;
  };

  static Clock::duration TouchInterval(int ttl) {
    return std::max<Clock::duration>(std::chrono::milliseconds(ttl * 1000 / 3), kPollInterval);
  }

  void KeepAliveLoop() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      auto now = Clock::now();
      for (auto& [id, lease] : leases_) {
        if (lease.next_touch > now) continue;
        KeepAlive(id, lease);
        lease.next_touch = now + TouchInterval(lease.ttl);
      }
      cv_.wait_for(lock, kPollInterval, [&] { return stop_; });
    }
  }

  // Touches the lease file. If it was missing or stale (this process was stopped past the TTL
  // and others may have reaped its keys) the file is recreated and lost keys are put again.
  void KeepAlive(int64_t id, OwnLease& lease) {
    std::string path = layout_.Lease(id);
    Layout::LeaseState state = layout_.CheckLease(id);
    if (state == Layout::LeaseState::kMissing) {
      Status s = layout_.WriteAtomic(path, std::to_string(lease.ttl) + "\n", false);
      if (!s.ok()) {
        DYN_LOG(WARN) << "discovery " << layout_.dir() << ": recreate lease: " << s.ToString();
        return;
      }
      DYN_LOG(INFO) << "discovery " << layout_.dir() << ": lease " << id << " was lost; registered again";
    } else if (utimensat(AT_FDCWD, path.c_str(), nullptr, 0) != 0) {
      DYN_LOG(WARN) << "discovery " << layout_.dir() << ": touch lease: " << std::strerror(errno);
      return;
    }
    if (state == Layout::LeaseState::kAlive) return;
    for (auto it = lease.keys.begin(); it != lease.keys.end();) {
      std::string name = EncodeFileName(it->first);
      auto current = layout_.ReadKey(name, it->first);
      if (current && current->lease != id) {
        it = lease.keys.erase(it);  // someone else owns the key now
        continue;
      }
      if (!current) {
        Status s = layout_.WriteAtomic(layout_.Key(name), std::to_string(id) + "\n" + it->second, false);
        if (!s.ok()) {
          DYN_LOG(WARN) << "discovery " << layout_.dir() << ": re-put " << it->first << ": " << s.ToString();
        }
      }
      ++it;
    }
  }

  Layout layout_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<int64_t, OwnLease> leases_;
  std::mt19937_64 rng_;
  std::thread keepalive_;
};

}  // namespace

Result<std::unique_ptr<Discovery>> CreateFileDiscovery(const std::string& dir) {
  for (const char* sub : {"/keys", "/leases", "/tmp"}) {
    std::error_code ec;
    std::filesystem::create_directories(dir + sub, ec);
    if (ec) return Status::IoError("discovery dir " + dir + sub + ": " + ec.message());
  }
  return std::unique_ptr<Discovery>(new FileDiscovery(dir));
}

}  // namespace dyn::discovery_internal
