// "mem" discovery: one process-wide store shared by every "mem" client. A lease stays alive while
// the client that granted it exists (that is its keep-alive); when the client is destroyed without
// revoking, the lease runs out `ttl` seconds later, as a crashed worker's lease would.
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "runtime/discovery_internal.h"

namespace dyn::discovery_internal {
namespace {

using Clock = std::chrono::steady_clock;

struct MemLease {
  int ttl = 0;
  const void* owner = nullptr;  // the granting client while it lives; null once orphaned
  Clock::time_point deadline;   // meaningful only when orphaned
  std::set<std::string> keys;
};

struct MemWatcher {
  std::string prefix;
  std::shared_ptr<CallbackRunner> runner;
};

class MemStore {
 public:
  // Leaked on purpose: clients and the expiry thread may outlive static destruction order.
  static MemStore& Get() {
    static MemStore* store = new MemStore();
    return *store;
  }

  std::mutex mu;
  std::map<std::string, KeyValue> kvs;
  std::map<int64_t, MemLease> leases;
  std::map<uint64_t, MemWatcher> watchers;
  int64_t next_lease = 0x6d656d0000000001;  // "mem" in the high bytes: easy to tell apart in logs
  uint64_t next_watcher = 1;

  // Sends each watcher the events under its prefix, as one update.
  void NotifyLocked(const std::vector<WatchEvent>& events) {
    for (auto& [id, w] : watchers) {
      WatchUpdate update;
      for (const WatchEvent& e : events) {
        if (e.kv.key.compare(0, w.prefix.size(), w.prefix) == 0) update.events.push_back(e);
      }
      if (!update.events.empty()) w.runner->Push(std::move(update));
    }
  }

  // Removes `key` (and its lease link) and appends the delete event to `events`.
  void EraseKeyLocked(const std::string& key, std::vector<WatchEvent>* events) {
    auto it = kvs.find(key);
    if (it == kvs.end()) return;
    if (it->second.lease != 0) {
      auto lit = leases.find(it->second.lease);
      if (lit != leases.end()) lit->second.keys.erase(key);
    }
    kvs.erase(it);
    WatchEvent e;
    e.type = WatchEvent::Type::kDelete;
    e.kv.key = key;
    events->push_back(std::move(e));
  }

  void RevokeLocked(int64_t lease) {
    auto it = leases.find(lease);
    if (it == leases.end()) return;
    std::set<std::string> keys = std::move(it->second.keys);
    leases.erase(it);
    std::vector<WatchEvent> events;
    for (const std::string& key : keys) EraseKeyLocked(key, &events);
    NotifyLocked(events);
  }

  // Called when a client goes away: its leases start counting down.
  void OrphanLeases(const void* owner) {
    {
      std::lock_guard lock(mu);
      for (auto& [id, lease] : leases) {
        if (lease.owner != owner) continue;
        lease.owner = nullptr;
        lease.deadline = Clock::now() + std::chrono::seconds(lease.ttl);
      }
      if (!expiry_started_) {
        expiry_started_ = true;
        std::thread(&MemStore::ExpiryLoop, this).detach();
      }
    }
    expiry_cv_.notify_one();
  }

 private:
  MemStore() = default;

  void ExpiryLoop() {
    std::unique_lock lock(mu);
    while (true) {
      Clock::time_point next = Clock::time_point::max();
      auto now = Clock::now();
      std::vector<int64_t> expired;
      for (auto& [id, lease] : leases) {
        if (lease.owner != nullptr) continue;
        if (lease.deadline <= now) {
          expired.push_back(id);
        } else {
          next = std::min(next, lease.deadline);
        }
      }
      for (int64_t id : expired) RevokeLocked(id);
      if (next == Clock::time_point::max()) {
        expiry_cv_.wait(lock);
      } else {
        expiry_cv_.wait_until(lock, next);
      }
    }
  }

  std::condition_variable expiry_cv_;
  bool expiry_started_ = false;
};

class MemWatchHandle : public WatchHandle {
 public:
  MemWatchHandle(uint64_t id, std::shared_ptr<CallbackRunner> runner) : id_(id), runner_(std::move(runner)) {}
  ~MemWatchHandle() override {
    MemStore& store = MemStore::Get();
    {
      std::lock_guard lock(store.mu);
      store.watchers.erase(id_);
    }
    // Outside the store lock: a running callback may be using the store.
    runner_->Stop();
  }

 private:
  uint64_t id_;
  std::shared_ptr<CallbackRunner> runner_;
};

class MemDiscovery : public Discovery {
 public:
  ~MemDiscovery() override { MemStore::Get().OrphanLeases(this); }

  Result<int64_t> GrantLease(int ttl_seconds) override {
    if (ttl_seconds <= 0) return Status::InvalidArgument("lease TTL must be positive");
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    int64_t id = store.next_lease++;
    MemLease& lease = store.leases[id];
    lease.ttl = ttl_seconds;
    lease.owner = this;
    return id;
  }

  Status RevokeLease(int64_t lease) override {
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    store.RevokeLocked(lease);
    return Status::Ok();
  }

  Status Put(const std::string& key, const std::string& value, int64_t lease) override {
    if (key.empty()) return Status::InvalidArgument("empty discovery key");
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    if (lease != 0) {
      auto lit = store.leases.find(lease);
      if (lit == store.leases.end()) return Status::NotFound("lease " + std::to_string(lease) + " not found");
      lit->second.keys.insert(key);
    }
    KeyValue& kv = store.kvs[key];
    if (kv.lease != 0 && kv.lease != lease) {
      auto old = store.leases.find(kv.lease);
      if (old != store.leases.end()) old->second.keys.erase(key);
    }
    kv = KeyValue{key, value, lease};
    store.NotifyLocked({WatchEvent{WatchEvent::Type::kPut, kv}});
    return Status::Ok();
  }

  Status Delete(const std::string& key) override {
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    std::vector<WatchEvent> events;
    store.EraseKeyLocked(key, &events);
    store.NotifyLocked(events);
    return Status::Ok();
  }

  Result<std::vector<KeyValue>> GetPrefix(const std::string& prefix) override {
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    std::vector<KeyValue> out;
    for (auto it = store.kvs.lower_bound(prefix); it != store.kvs.end(); ++it) {
      if (it->first.compare(0, prefix.size(), prefix) != 0) break;
      out.push_back(it->second);
    }
    return out;
  }

  Result<std::unique_ptr<WatchHandle>> WatchPrefix(const std::string& prefix, WatchCallback callback) override {
    if (!callback) return Status::InvalidArgument("null watch callback");
    auto runner = std::make_shared<CallbackRunner>(std::move(callback));
    MemStore& store = MemStore::Get();
    std::lock_guard lock(store.mu);
    // The reset is queued under the same lock as registration, so no change can slip between.
    WatchUpdate reset;
    reset.reset = true;
    for (auto it = store.kvs.lower_bound(prefix); it != store.kvs.end(); ++it) {
      if (it->first.compare(0, prefix.size(), prefix) != 0) break;
      reset.events.push_back(WatchEvent{WatchEvent::Type::kPut, it->second});
    }
    runner->Push(std::move(reset));
    uint64_t id = store.next_watcher++;
    store.watchers[id] = MemWatcher{prefix, runner};
    return std::unique_ptr<WatchHandle>(new MemWatchHandle(id, runner));
  }

  std::string Describe() const override { return "mem"; }
};

}  // namespace

Result<std::unique_ptr<Discovery>> CreateMemDiscovery() { return std::unique_ptr<Discovery>(new MemDiscovery()); }

}  // namespace dyn::discovery_internal
