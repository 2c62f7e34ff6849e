// KvRouter: picks the worker for a request from prefix overlap and load (design/FACTS.md,
// "Router selection", Dynamo 1.x default).
//
// For each candidate r (each data-parallel rank is its own candidate):
//   overlap o_r        = matched prefix blocks in r's tree (RadixIndexer::FindMatches)
//   prefill_tokens_r   = active_prefill_tokens_r + max(0, ISL - o_r * B)
//   decode_blocks_r    = active_blocks_r + request blocks not already among r's active blocks
//   cost_r             = w * prefill_tokens_r / B + decode_blocks_r
// Temperature 0: argmin; ties go to the smaller tree, then a random pick. Temperature T > 0:
// sample with p ~ exp(-(cost / (max - min)) / T) (uniform when all costs are equal).
// Busy workers (KV usage or active prefill tokens above a threshold) are skipped; if every
// candidate is busy, Route returns Unavailable ("all workers busy": the frontend answers 503) and
// counts a rejection.
//
// Approximate mode (engines publish no KV events): after a decision the request's blocks are
// inserted into the indexer for the chosen worker as if it had stored them, with a TTL (120 s,
// refreshed when routed again). The indexer's total is capped (2^20 blocks); above the cap the
// least recently routed blocks are pruned down to 80 % of it.
//
// The router does no I/O and is not thread-safe: the caller serialises Route, the indexer's
// events and the ActiveSequences updates (one event loop, or one mutex).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "router/active_sequences.h"
#include "router/radix_indexer.h"

namespace dyn::router {

struct KvRouterConfig {
  int block_size = 16;
  double overlap_weight = 1.0;  // w
  double temperature = 0.0;
  // Busy when kv_usage > this (fraction 0..1); unset: never busy by KV usage.
  std::optional<double> busy_kv_usage;
  // Busy when the worker's active prefill tokens > this; unset: never.
  std::optional<int64_t> busy_prefill_tokens;
  // Add each routed request to ActiveSequences (off: the caller does it, or nobody).
  bool track_active = true;
  bool approximate = false;
  RouterClock::duration approx_ttl = std::chrono::seconds(120);
  size_t approx_max_blocks = size_t{1} << 20;
  double approx_prune_to = 0.8;  // fraction of approx_max_blocks kept after a prune
  uint64_t seed = 0;             // the tie-break / sampling RNG
};

// A candidate and what its metrics say about it.
struct WorkerCandidate {
  WorkerKey worker;
  double kv_usage = 0.0;  // used KV blocks / total, from the worker's load metrics
};

// The request, hashed once by the caller (or by HashRequest).
struct RequestBlocks {
  std::vector<uint64_t> local;     // local block hashes
  std::vector<uint64_t> sequence;  // router sequence hashes, parallel to local
  int64_t isl = 0;                 // prompt tokens (may exceed blocks * B: the partial last block)
};
RequestBlocks HashRequest(std::span<const uint32_t> tokens, int block_size, uint64_t seed = kBlockHashSeed);

struct WorkerCost {
  WorkerKey worker;
  uint32_t overlap_blocks = 0;
  int64_t prefill_tokens = 0;
  int64_t decode_blocks = 0;
  double cost = 0.0;
  size_t tree_size = 0;
  bool busy = false;
};

struct RouteDecision {
  WorkerKey worker;
  uint32_t overlap_blocks = 0;
  double cost = 0.0;
  std::vector<WorkerCost> costs;  // one per candidate, in candidate order (for logs / nvext)
};

struct RouterStats {
  uint64_t decisions = 0;
  uint64_t rejections = 0;  // all candidates busy
  uint64_t approx_expired = 0;
  uint64_t approx_pruned = 0;
};

class KvRouter {
 public:
  // The indexer and active sequences must outlive the router. active.block_size() must equal
  // config.block_size.
  KvRouter(KvRouterConfig config, RadixIndexer& indexer, ActiveSequences& active);

  // Chooses a worker among `candidates` (non-empty). With track_active, the request joins
  // ActiveSequences under `request_id`; with approximate, its blocks join the indexer.
  // Unavailable when there is no candidate or all are busy.
  Result<RouteDecision> Route(const std::string& request_id, const RequestBlocks& request,
                              std::span<const WorkerCandidate> candidates, RouterClock::time_point now);

  // Only the cost table (no selection, no side effects).
  std::vector<WorkerCost> Costs(const RequestBlocks& request, std::span<const WorkerCandidate> candidates) const;

  // Approximate mode: drops routed blocks older than the TTL. Route calls it too.
  void ExpireApproximate(RouterClock::time_point now);

  // Replaces the RNG (tests inject a seeded one; the default is seeded from config.seed).
  void SetRng(std::mt19937_64 rng) { rng_ = rng; }
  const RouterStats& stats() const { return stats_; }
  const KvRouterConfig& config() const { return config_; }

 private:
  size_t Select(const std::vector<WorkerCost>& costs);
  void InsertApproximate(const WorkerKey& worker, const RequestBlocks& request, RouterClock::time_point now);

  struct Touch {
    RouterClock::time_point at;
    WorkerKey worker;
    uint64_t seq_hash;
  };

  KvRouterConfig config_;
  RadixIndexer& indexer_;
  ActiveSequences& active_;
  std::mt19937_64 rng_;
  RouterStats stats_;
  // Approximate mode: every insertion in time order; last_touch says which is current, older
  // duplicates are skipped when they reach the front.
  std::deque<Touch> touches_;
  std::unordered_map<WorkerKey, std::unordered_map<uint64_t, RouterClock::time_point>, WorkerKeyHash> last_touch_;
};

}  // namespace dyn::router
