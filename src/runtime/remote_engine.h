// RemoteEngine: the Engine a frontend serves for a model whose workers run in other processes.
// Each Generate picks one of the model's instances (round-robin, random or least-loaded), sends the
// request over the request plane and forwards the worker's deltas.
//
// Migration: when a call ends with Unavailable before its last delta (the worker died, was cut
// off, or is draining), the request is sent again to another instance with the prompt extended by
// the tokens generated so far and max_tokens reduced by as many, so the client's stream goes on
// where it stopped. With greedy sampling and dyn's batch-invariant kernels the continuation is the
// same text the first worker would have produced. At most `migration_limit` times per request.
// A kDecodeImported request (disaggregated serving) migrates as kFull: the prefill worker's first
// token and the tokens generated so far become prompt, max_tokens/min_tokens shrink by as many,
// and the KV descriptor is never sent again (its lease may be gone; the new worker prefills).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/engine.h"
#include "router/kv_events.h"
#include "runtime/request_plane.h"

namespace dyn {

// kKv: KV-aware (src/router): the instance whose cache holds the longest prefix of the prompt,
// weighed against its load (FACTS' cost function). Without KV events from the workers it runs in
// approximate mode: it remembers which prefixes it sent where (120 s TTL).
enum class RouterMode { kRoundRobin, kRandom, kLeastLoaded, kKv };
Result<RouterMode> ParseRouterMode(const std::string& name);  // "round-robin", "random", "least-loaded", "kv"
const char* RouterModeName(RouterMode mode);

struct RemoteEngineOptions {
  RouterMode mode = RouterMode::kRoundRobin;
  int migration_limit = 3;
  std::string endpoint = "generate";
  // kv mode:
  int kv_block_size = 16;       // the workers' KV block size (from their model card)
  double overlap_weight = 1.0;  // w in cost = w * prefill_blocks + decode_blocks
  double temperature = 0.0;     // 0: cheapest instance; > 0: softmax sampling over costs
  bool use_kv_events = false;   // workers' KV events feed the indexer (ApplyKvEvent); else approximate
  // Busy thresholds: an instance is skipped while its reported KV usage (0..1) or its active
  // prefill tokens (this frontend's view) exceed them; with every instance busy the request fails
  // with Unavailable ("all workers are busy": HTTP 503) and is counted. Unset: never busy.
  std::optional<double> busy_kv_usage;
  std::optional<int64_t> busy_prefill_tokens;
};

struct InstanceStats {
  uint64_t instance_id = 0;
  std::string address;
  int in_flight = 0;
  int reported_load = 0;
  uint64_t routed = 0;  // calls sent to it since it appeared
};

class RemoteEngine : public Engine {
 public:
  static std::shared_ptr<RemoteEngine> Create(std::shared_ptr<RequestClient> client, RemoteEngineOptions options);

  // Discovery's view of the model's instances. Removing one ends its calls (they migrate).
  virtual void AddInstance(uint64_t instance_id, const std::string& address) = 0;
  virtual void RemoveInstance(uint64_t instance_id) = 0;
  // Load an instance reported on the event plane (its running + waiting requests, counting every
  // frontend's, and the fraction of its KV blocks in use). Least-loaded routing uses the larger of
  // it and this frontend's own in-flight count; kv mode uses kv_usage for the busy threshold.
  virtual void ReportLoad(uint64_t instance_id, int load, double kv_usage = 0.0) = 0;
  // kv mode: a worker's KV event (decoded from the event plane). Events of unknown instances are
  // ignored. Returns false when the event revealed lost events (an event-id gap); the engine then
  // asks the worker for its dump ("kv_dump" endpoint, kv_event_publisher.h) and resynchronises,
  // holding the worker's newer events until the dump is applied. With use_kv_events a dump is
  // also fetched when an instance is added, so a frontend started after its workers knows their
  // caches.
  virtual bool ApplyKvEvent(const router::RouterEvent& event) = 0;
  // kv mode: the longest prompt prefix (in tokens) that one of the instances holds in its KV
  // cache, as far as the index knows; 0 in the other modes. The disaggregating router uses it
  // to decide whether a prompt is worth a remote prefill.
  virtual int CachedPrefixTokens(const std::vector<uint32_t>& tokens) const = 0;
  virtual size_t num_instances() const = 0;
  virtual std::vector<InstanceStats> Instances() const = 0;
};

}  // namespace dyn
