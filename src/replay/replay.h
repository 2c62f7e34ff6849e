// Trace replay: a router and N simulated workers on a virtual clock, for routing studies.
//
// Each worker is a MockerCore (the real scheduler and block pool, Dynamo's timing model). A
// request arrives at its trace time, is routed (kv: KvRouter fed with each worker's exact KV
// events, or its approximate mode; round-robin; random; least-loaded) and queued on its worker.
// A worker with work runs a step: the step's batch is fixed when it starts, it lasts
// MockerStepResult::duration_ms of virtual time, and its tokens (and KV events) appear when it
// ends. Requests that arrive during a step join the next one. A priority queue of the next
// events (arrivals, step ends) moves the clock, so nothing sleeps and an hour of trace on 1,000
// workers takes seconds of wall time.
//
// The router's bookkeeping is the distributed frontend's (runtime/remote_engine.cpp): a request
// joins ActiveSequences when routed, its prefill load is released at its first token, and it is
// freed at its last. Worker KV usage (for busy thresholds) is the one of the worker's last step.
//
// Disaggregated mode (num_prefill_workers > 0; docs/disaggregation.md): num_workers are decode
// workers, and a prefill pool is routed separately (same policy, its own indexer and active
// sequences). The frontend's rule decides per request (disagg/disagg_router.h): when the prompt
// minus the longest prefix a decode worker holds (kv policy: from the decode pool's indexer; 0
// otherwise) is at most max_local_prefill_tokens, the request runs aggregated on the decode pool
// (local prefill). Otherwise it runs kPrefillOnly on a prefill worker; its first token (TTFT) ends
// that part and leaves the prompt's blocks under a lease; the request is routed over the decode
// pool and imported there: the decode worker reserves blocks at its next step boundary (reusing
// its prefix cache), the uncached blocks take MockerTransferMs (worker.kv_bytes_per_token,
// worker.kv_transfer_gbps) of virtual time, then the lease is released and the request decodes
// from its second token (the gap includes the transfer, so it counts in ITL).
//
// Prompts come from workload::SynthesizePrompt, so a replay and `dyn bench` send the same tokens.
// No I/O, no threads. Deterministic: the same trace, config and seed give the same report.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/mocker/mocker_core.h"
#include "workload/trace.h"

namespace dyn::replay {

enum class RoutingPolicy { kKv, kRoundRobin, kRandom, kLeastLoaded };

// "kv", "round-robin", "random", "least-loaded" (underscores accepted).
Result<RoutingPolicy> ParseRoutingPolicy(const std::string& name);
const char* RoutingPolicyName(RoutingPolicy policy);

struct ReplayConfig {
  int num_workers = 8;
  RoutingPolicy policy = RoutingPolicy::kKv;
  // kv policy (kv_router.h): cost = w * prefill_blocks + decode_blocks, softmax temperature.
  double overlap_weight = 1.0;
  double temperature = 0.0;
  bool approximate = false;                // kv without KV events: the router guesses
  std::optional<double> busy_kv_usage;     // kv: skip workers above this KV usage
  // Every worker; the router's block size is worker.block_size.
  MockerConfig worker;
  workload::PromptSynthesis synthesis;     // how trace hash ids become tokens
  uint64_t seed = 0;                       // random policy, kv tie-breaks, output tokens
  // Disaggregated serving: prefill workers besides the num_workers decode workers (0: aggregated).
  int num_prefill_workers = 0;
  // Prefill on the decode worker when the prompt's uncached part there is at most this (the
  // frontend's --max-local-prefill-tokens).
  int max_local_prefill_tokens = 512;
  // Goodput: completed requests with TTFT <= ttft_target_ms and ITL <= itl_target_ms (0: no
  // target). The ITL criterion is the request's own mean gap between tokens (TPOT, as in
  // DistServe and vLLM's --goodput), or with itl_target_p99 its own p99 gap (stalls count).
  double ttft_target_ms = 0;
  double itl_target_ms = 0;
  bool itl_target_p99 = false;
};

// Fails on a config the simulator cannot run (no workers, a bad MockerConfig, negative targets).
Status ValidateReplayConfig(const ReplayConfig& config);

struct LatencySummary {
  size_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;  // ms
};

// Nearest-rank percentiles of `values` (sorted in place).
LatencySummary Summarize(std::vector<double>& values);

struct ReplayReport {
  std::string policy;          // "kv", "kv-approx", "round-robin", ...
  int num_workers = 0;
  size_t requests = 0;         // in the trace
  size_t completed = 0;
  size_t failed = 0;           // rejected by the router (all busy) or by a worker (never fits)
  uint64_t prompt_tokens = 0;  // of completed requests
  uint64_t cached_tokens = 0;  // prompt tokens served from a worker's prefix cache
  uint64_t output_tokens = 0;
  uint64_t preemptions = 0;
  double prefix_hit_rate = 0;  // cached_tokens / prompt_tokens
  LatencySummary ttft_ms;      // first token time - arrival
  LatencySummary itl_ms;       // every gap between consecutive tokens of a request
  LatencySummary e2e_ms;       // last token time - arrival
  double simulated_ms = 0;     // first arrival to last token
  double output_tokens_per_s = 0;  // over simulated time
  double wall_ms = 0;          // the replay's own run time
  std::vector<uint64_t> worker_requests;  // requests routed to each worker
  std::vector<int32_t> request_worker;    // per trace request: its worker, -1 if never routed
  double load_imbalance = 0;   // max / mean of worker_requests (1 = perfect)
  uint64_t kv_events = 0;      // applied to the routers' indexers
  // Disaggregated mode (worker_requests lists the decode workers, then the prefill workers).
  int num_prefill_workers = 0;
  uint64_t remote_prefills = 0;     // prefilled on a prefill worker, KV moved
  uint64_t local_prefills = 0;      // prefilled on the decode worker (short uncached part)
  uint64_t kv_transfers = 0;        // imports (a fully cached prompt is one with 0 bytes)
  uint64_t kv_transfer_bytes = 0;
  LatencySummary kv_transfer_ms;    // per import: modelled transfer time
  // Goodput (see ReplayConfig): requests meeting both targets, per second of simulated time.
  double ttft_target_ms = 0, itl_target_ms = 0;
  bool itl_target_p99 = false;
  size_t good_requests = 0;
  double goodput_rps = 0;
  double goodput_tokens_per_s = 0;  // output tokens of those requests
  double request_rate = 0;          // arrivals per second (first to last arrival)
};

// Synthetic traffic for disaggregation studies: Poisson arrivals; a fraction of long-prompt,
// short-output requests (document summarisation, RAG) among short-prompt, decode-heavy ones
// (chat). Prompts have no hash ids, so no two share a prefix. Deterministic in `seed`.
struct MixedTraffic {
  size_t requests = 1000;
  double rate = 2.0;             // requests per second
  double long_fraction = 0.2;
  int long_prompt_min = 8192, long_prompt_max = 16384, long_output = 64;
  int short_prompt_min = 200, short_prompt_max = 500;
  int short_output_min = 300, short_output_max = 800;
  uint64_t seed = 1;
};
std::vector<workload::TraceRequest> MixedTrafficTrace(const MixedTraffic& mix);

// Replays `trace` (arrival times as given: scale beforehand with workload::ScaleTrace).
Result<ReplayReport> RunReplay(std::span<const workload::TraceRequest> trace, const ReplayConfig& config);

// A readable table of one or more reports side by side (one column each).
std::string FormatReports(std::span<const ReplayReport> reports);
// A JSON object of one report (JSON array for several: see ReportsToJson).
std::string ReportToJson(const ReplayReport& report);
std::string ReportsToJson(std::span<const ReplayReport> reports);

}  // namespace dyn::replay
