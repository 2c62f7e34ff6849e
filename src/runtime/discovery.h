// Discovery: a small key-value store with leases and prefix watches, the control plane of a
// distributed dyn. Workers put their instance records under a lease and keep it alive; when a
// worker dies its lease expires and its keys vanish, and every watcher hears of it.
//
// Backends (CreateDiscovery):
//   "mem"                         in-process (dyn run, unit tests); keys live in a process-wide
//                                 store shared by every "mem" client of the process
//   "file:/path/to/dir"           a directory shared by processes on one host; a lease is a file
//                                 whose mtime is touched by keep-alive; keys are files written
//                                 atomically (write + rename); expired leases' keys are ignored
//                                 and removed by whoever notices first
//   "etcd:http://host:2379[,..]"  etcd v3 through its JSON gateway (/v3/kv/*, /v3/lease/*,
//                                 /v3/watch): leases with keep-alive, prefix range and watch;
//                                 after etcd restarts, leases are re-granted, keys re-put and
//                                 watchers re-synced
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace dyn {

struct KeyValue {
  std::string key;
  std::string value;
  int64_t lease = 0;  // 0: no lease (stays until deleted)
};

struct WatchEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  KeyValue kv;  // for kDelete only kv.key is set
};

// What a watch delivers. The first update of every watch, and the first after a reconnect, has
// reset = true and lists every key under the prefix as kPut: the receiver replaces its view
// (keys it knew that are not listed are gone). Later updates are incremental.
struct WatchUpdate {
  bool reset = false;
  std::vector<WatchEvent> events;
};
using WatchCallback = std::function<void(const WatchUpdate&)>;

// Ends its watch when destroyed (no callback runs after the destructor returns).
class WatchHandle {
 public:
  virtual ~WatchHandle() = default;
};

class Discovery {
 public:
  virtual ~Discovery() = default;

  // Grants a lease that expires `ttl_seconds` after the last keep-alive. The client keeps every
  // lease it granted alive (a background thread, about 3 times per TTL) until RevokeLease or
  // destruction. If the backend loses a lease (etcd restarted, the process was stopped past its
  // TTL) the client grants a new one under the same returned id and puts its keys again.
  // Destroying the client does not revoke: its leases run out after their TTL, as a crashed
  // process's would (call RevokeLease first for a clean exit).
  virtual Result<int64_t> GrantLease(int ttl_seconds) = 0;
  // Deletes the lease and every key attached to it.
  virtual Status RevokeLease(int64_t lease) = 0;

  // Creates or replaces a key, attached to `lease` (0 = none).
  virtual Status Put(const std::string& key, const std::string& value, int64_t lease = 0) = 0;
  virtual Status Delete(const std::string& key) = 0;
  // Every live key that starts with `prefix`, sorted by key.
  virtual Result<std::vector<KeyValue>> GetPrefix(const std::string& prefix) = 0;

  // Calls `callback` (on a background thread, never concurrently for one watch) with the keys
  // under `prefix`: first a reset, then changes. Survives backend restarts (see WatchUpdate).
  virtual Result<std::unique_ptr<WatchHandle>> WatchPrefix(const std::string& prefix, WatchCallback callback) = 0;

  // "mem", "file:/dir" or "etcd:http://host:port".
  virtual std::string Describe() const = 0;
};

// spec: "mem", "file:DIR", "etcd:URL[,URL...]" (etcd URLs may also be given bare: "http://..").
Result<std::unique_ptr<Discovery>> CreateDiscovery(const std::string& spec);

}  // namespace dyn
