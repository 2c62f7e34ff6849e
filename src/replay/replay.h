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
};

// Fails on a config the simulator cannot run (no workers, a bad MockerConfig).
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
  uint64_t kv_events = 0;      // applied to the router's indexer
};

// Replays `trace` (arrival times as given: scale beforehand with workload::ScaleTrace).
Result<ReplayReport> RunReplay(std::span<const workload::TraceRequest> trace, const ReplayConfig& config);

// A readable table of one or more reports side by side (one column each).
std::string FormatReports(std::span<const ReplayReport> reports);
// A JSON object of one report (JSON array for several: see ReportsToJson).
std::string ReportToJson(const ReplayReport& report);
std::string ReportsToJson(std::span<const ReplayReport> reports);

}  // namespace dyn::replay
