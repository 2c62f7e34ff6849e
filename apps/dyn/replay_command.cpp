// dyn replay TRACE: a trace through the router and N simulated (mocker) workers on a virtual
// clock (src/replay/). Prints a table; --json PATH writes the same numbers for scripts;
// --compare runs kv, round-robin and random side by side on the same trace.
#include <cstdio>
#include <fstream>
#include <vector>

#include "apps/dyn/command_util.h"
#include "apps/dyn/commands.h"
#include "base/flags.h"
#include "replay/replay.h"
#include "workload/trace.h"

namespace dyn {
namespace {

struct ReplayFlags {
  std::string trace;
  int64_t workers = 8;
  std::string router = "kv";
  double overlap_weight = 1.0;
  double temperature = 0.0;
  bool approximate = false;
  double busy_kv_usage = 0;
  int64_t block_size = 64;
  int64_t num_blocks = 16384;
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 8192;
  double time_scale = 1.0;
  double max_seconds = 0;
  int64_t limit = 0;
  int64_t seed = 0;
  std::string json_path;
  bool compare = false;
};

int ReplayCommand(int argc, char** argv) {
  ReplayFlags f;
  FlagSet fs("dyn replay", "replay a request trace (Mooncake .jsonl, Azure .csv) through a router and simulated "
                           "workers on a virtual clock: dyn replay TRACE [flags]");
  fs.String("trace", &f.trace, "trace file (or the first positional argument)");
  fs.Int("workers", &f.workers, "simulated workers");
  fs.String("router", &f.router, "kv | round-robin | random | least-loaded");
  fs.Double("kv-overlap-score-weight", &f.overlap_weight, "kv: weight of prefill blocks against decode blocks");
  fs.Double("router-temperature", &f.temperature, "kv: 0 picks the cheapest worker, > 0 samples");
  fs.Bool("approximate", &f.approximate, "kv without KV events: the router assumes routed blocks are cached");
  fs.Double("busy-kv-usage", &f.busy_kv_usage, "kv: skip workers above this KV usage (0..1; 0: never busy)");
  fs.Int("block-size", &f.block_size, "tokens per KV block (workers and router)");
  fs.Int("num-blocks", &f.num_blocks, "KV blocks per worker");
  fs.Int("max-num-seqs", &f.max_num_seqs, "sequences per batch per worker");
  fs.Int("max-num-batched-tokens", &f.max_num_batched_tokens, "tokens per step per worker");
  fs.Double("time-scale", &f.time_scale, "arrival times are divided by this (2: twice the request rate)");
  fs.Double("max-seconds", &f.max_seconds, "keep requests arriving before this (after scaling; 0: all)");
  fs.Int("limit", &f.limit, "replay the first N requests only (0: all)");
  fs.Int("seed", &f.seed, "random router, kv tie-breaks, prompt synthesis");
  fs.String("json", &f.json_path, "write the summary as JSON to this file");
  fs.Bool("compare", &f.compare, "run kv, round-robin and random on the same trace, side by side");
  if (int rc = ParseCommandFlags(fs, argc, argv, "replay"); rc >= 0) return rc;
  if (f.trace.empty() && !fs.positional().empty()) f.trace = fs.positional().front();
  if (f.trace.empty()) {
    std::fprintf(stderr, "dyn replay: no trace given\n%s", fs.Usage().c_str());
    return 2;
  }

  replay::ReplayConfig config;
  config.num_workers = static_cast<int>(f.workers);
  config.overlap_weight = f.overlap_weight;
  config.temperature = f.temperature;
  config.approximate = f.approximate;
  if (f.busy_kv_usage > 0) config.busy_kv_usage = f.busy_kv_usage;
  config.worker.block_size = static_cast<int>(f.block_size);
  config.worker.num_blocks = static_cast<int>(f.num_blocks);
  config.worker.max_num_seqs = static_cast<int>(f.max_num_seqs);
  config.worker.max_num_batched_tokens = static_cast<int>(f.max_num_batched_tokens);
  config.seed = static_cast<uint64_t>(f.seed);
  config.synthesis.seed = static_cast<uint64_t>(f.seed);

  std::vector<replay::RoutingPolicy> policies;
  if (f.compare) {
    policies = {replay::RoutingPolicy::kKv, replay::RoutingPolicy::kRoundRobin, replay::RoutingPolicy::kRandom};
  } else {
    Result<replay::RoutingPolicy> p = replay::ParseRoutingPolicy(f.router);
    if (!p.ok()) {
      std::fprintf(stderr, "dyn replay: %s\n", p.status().message().c_str());
      return 2;
    }
    policies = {*p};
  }
  config.policy = policies.front();
  if (Status st = replay::ValidateReplayConfig(config); !st.ok()) {
    std::fprintf(stderr, "dyn replay: %s\n", st.message().c_str());
    return 2;
  }

  Result<std::vector<workload::TraceRequest>> loaded = workload::LoadTrace(f.trace);
  if (!loaded.ok()) {
    std::fprintf(stderr, "dyn replay: %s\n", loaded.status().message().c_str());
    return 1;
  }
  const std::vector<workload::TraceRequest> trace =
      workload::ScaleTrace(std::move(*loaded), f.time_scale, f.max_seconds * 1000.0, static_cast<size_t>(f.limit));
  std::printf("trace %s: %zu requests over %.1f s (time scale %g), infinite-cache prefix hit ratio %.1f %%\n",
              f.trace.c_str(), trace.size(), trace.empty() ? 0.0 : trace.back().arrival_ms / 1000.0, f.time_scale,
              100.0 * workload::InfiniteCacheHitRatio(trace));
  std::printf("%d workers x %d KV blocks of %d tokens, max %d seqs / %d batched tokens per step\n\n",
              config.num_workers, config.worker.num_blocks, config.worker.block_size, config.worker.max_num_seqs,
              config.worker.max_num_batched_tokens);
  std::fflush(stdout);

  std::vector<replay::ReplayReport> reports;
  for (replay::RoutingPolicy policy : policies) {
    config.policy = policy;
    Result<replay::ReplayReport> r = replay::RunReplay(trace, config);
    if (!r.ok()) {
      std::fprintf(stderr, "dyn replay: %s\n", r.status().message().c_str());
      return 1;
    }
    reports.push_back(std::move(*r));
  }
  std::printf("%s", replay::FormatReports(reports).c_str());
  if (!f.json_path.empty()) {
    std::ofstream out(f.json_path);
    out << (reports.size() == 1 ? replay::ReportToJson(reports.front()) : replay::ReportsToJson(reports)) << "\n";
    if (!out) {
      std::fprintf(stderr, "dyn replay: cannot write %s\n", f.json_path.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

DYN_REGISTER_COMMAND("replay", "replay a trace through the router and simulated workers (virtual clock)", 50,
                     &ReplayCommand);

}  // namespace dyn
