// ActiveSequences: the load the router itself has put on each worker.
//
// Per worker: the distinct prompt blocks of its active requests (shared prefixes count once, as
// they share KV) and the prompt tokens still to prefill. A request is added when it is routed,
// its prefill tokens are released at its first token (MarkPrefillCompleted), and it is freed at
// stream end. Entries older than the expiry (300 s) are dropped by Expire, so a lost Free (a
// crashed frontend path) cannot leave a worker looking busy forever. Time is a parameter so tests
// control it.
//
// Not thread-safe (see kv_router.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "router/kv_events.h"

namespace dyn::router {

using RouterClock = std::chrono::steady_clock;

class ActiveSequences {
 public:
  explicit ActiveSequences(int block_size, RouterClock::duration expiry = std::chrono::seconds(300));

  // Registers a routed request: its prompt blocks (router sequence hashes) join the worker's
  // active blocks and max(0, isl - overlap_blocks * block_size) tokens its pending prefill.
  // InvalidArgument if the id is already active.
  Status AddRequest(const std::string& request_id, const WorkerKey& worker,
                    std::span<const uint64_t> block_hashes, int64_t isl, uint32_t overlap_blocks,
                    RouterClock::time_point now);
  // The request produced its first token: its prefill tokens no longer load the worker.
  Status MarkPrefillCompleted(const std::string& request_id);
  // The request ended: its blocks and any pending prefill are released. NotFound if unknown
  // (already freed or expired).
  Status Free(const std::string& request_id);
  // Frees every request added before now - expiry. Returns how many.
  size_t Expire(RouterClock::time_point now);
  // Drops a worker and all its requests (the worker left).
  void RemoveWorker(const WorkerKey& worker);

  // Distinct active prompt blocks on the worker.
  int64_t ActiveBlocks(const WorkerKey& worker) const;
  int64_t ActivePrefillTokens(const WorkerKey& worker) const;
  // How many of `block_hashes` are not among the worker's active blocks.
  int64_t NewBlocks(const WorkerKey& worker, std::span<const uint64_t> block_hashes) const;
  // For every worker with at least one of `block_hashes` active: how many are active. One pass
  // over the request for all workers (the router's hot path); NewBlocks = size - this.
  std::unordered_map<WorkerKey, int64_t, WorkerKeyHash> ActiveOverlap(std::span<const uint64_t> block_hashes) const;
  size_t num_requests() const { return requests_.size(); }
  int block_size() const { return block_size_; }

 private:
  struct Request {
    WorkerKey worker;
    std::vector<uint64_t> blocks;
    int64_t prefill_tokens = 0;  // pending; 0 once the first token came
    RouterClock::time_point added;
  };
  struct WorkerLoad {
    int64_t distinct_blocks = 0;
    int64_t prefill_tokens = 0;
  };
  struct Holder {
    WorkerKey worker;
    uint32_t refs;  // active requests on that worker holding the block
  };
  void Release(const Request& r);

  int block_size_;
  RouterClock::duration expiry_;
  std::unordered_map<std::string, Request> requests_;
  std::unordered_map<WorkerKey, WorkerLoad, WorkerKeyHash> workers_;
  // Block -> workers where it is active. Keyed by block rather than by worker so that one lookup
  // per request block serves every candidate.
  std::unordered_map<uint64_t, std::vector<Holder>> blocks_;
  // Insertion order for expiry; entries whose request is gone (or re-added later) are skipped.
  std::deque<std::pair<RouterClock::time_point, std::string>> order_;
};

}  // namespace dyn::router
