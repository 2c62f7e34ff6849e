// dyn replay TRACE: a trace through the router and N simulated (mocker) workers on a virtual
// clock (src/replay/). Prints a table; --json PATH writes the same numbers for scripts;
// --compare runs kv, round-robin and random side by side on the same trace. Disaggregated
// serving: --prefill-workers P --decode-workers D (P = 0: aggregated over --workers);
// --vs-aggregated adds a column of P + D aggregated workers. --mix RATE replays synthetic mixed
// traffic (replay::MixedTrafficTrace) instead of a trace file.
#include <algorithm>
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
  int64_t prefill_workers = 0;
  int64_t decode_workers = 0;
  int64_t max_local_prefill_tokens = 512;
  int64_t kv_bytes_per_token = 131072;
  double kv_transfer_gbps = 25;
  double kv_transfer_latency_ms = 0;
  double ttft_target_ms = 0;
  double itl_target_ms = 0;
  std::string itl_criterion = "mean";
  bool vs_aggregated = false;
  double mix_rate = 0;
  int64_t mix_requests = 1000;
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
  fs.Int("prefill-workers", &f.prefill_workers, "disaggregated: prefill workers (0: aggregated serving)");
  fs.Int("decode-workers", &f.decode_workers, "disaggregated: decode workers (0: --workers)");
  fs.Int("max-local-prefill-tokens", &f.max_local_prefill_tokens,
         "disaggregated: prefill on the decode worker when the prompt's uncached part there is at most this");
  fs.Int("kv-bytes-per-token", &f.kv_bytes_per_token, "KV bytes per token (default: Llama-3.1-8B bf16)");
  fs.Double("kv-transfer-gbps", &f.kv_transfer_gbps, "KV transfer bandwidth, GB/s");
  fs.Double("kv-transfer-latency-ms", &f.kv_transfer_latency_ms, "fixed cost of each KV transfer, ms");
  fs.Double("ttft-target-ms", &f.ttft_target_ms, "goodput: TTFT target (0: none)");
  fs.Double("itl-target-ms", &f.itl_target_ms, "goodput: ITL target (0: none)");
  fs.String("itl-criterion", &f.itl_criterion, "goodput: mean (the request's mean ITL, TPOT) | p99 (its p99 gap)");
  fs.Bool("vs-aggregated", &f.vs_aggregated, "disaggregated: also run prefill + decode workers aggregated");
  fs.Double("mix", &f.mix_rate, "replay synthetic mixed traffic at this many requests/s instead of a trace file "
                                "(20 % 8-16k-token prompts with 64 output tokens, 80 % 200-500 with 300-800)");
  fs.Int("mix-requests", &f.mix_requests, "requests of --mix");
  if (int rc = ParseCommandFlags(fs, argc, argv, "replay"); rc >= 0) return rc;
  if (f.trace.empty() && !fs.positional().empty()) f.trace = fs.positional().front();
  if (f.trace.empty() && f.mix_rate <= 0) {
    std::fprintf(stderr, "dyn replay: no trace given\n%s", fs.Usage().c_str());
    return 2;
  }
  if (f.itl_criterion != "mean" && f.itl_criterion != "p99") {
    std::fprintf(stderr, "dyn replay: --itl-criterion must be mean or p99\n");
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
  config.num_prefill_workers = static_cast<int>(f.prefill_workers);
  if (f.prefill_workers > 0 && f.decode_workers > 0) config.num_workers = static_cast<int>(f.decode_workers);
  config.max_local_prefill_tokens = static_cast<int>(f.max_local_prefill_tokens);
  config.worker.kv_bytes_per_token = f.kv_bytes_per_token;
  config.worker.kv_transfer_gbps = f.kv_transfer_gbps;
  config.worker.kv_transfer_latency_ms = f.kv_transfer_latency_ms;
  config.ttft_target_ms = f.ttft_target_ms;
  config.itl_target_ms = f.itl_target_ms;
  config.itl_target_p99 = f.itl_criterion == "p99";

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

  std::vector<workload::TraceRequest> trace;
  if (f.mix_rate > 0) {
    replay::MixedTraffic mix;
    mix.rate = f.mix_rate;
    mix.requests = static_cast<size_t>(std::max<int64_t>(f.mix_requests, 1));
    mix.seed = static_cast<uint64_t>(f.seed) + 1;
    trace = replay::MixedTrafficTrace(mix);
    std::printf("synthetic mixed traffic: %zu requests at %g/s over %.1f s\n", trace.size(), f.mix_rate,
                trace.back().arrival_ms / 1000.0);
  } else {
    Result<std::vector<workload::TraceRequest>> loaded = workload::LoadTrace(f.trace);
    if (!loaded.ok()) {
      std::fprintf(stderr, "dyn replay: %s\n", loaded.status().message().c_str());
      return 1;
    }
    trace = workload::ScaleTrace(std::move(*loaded), f.time_scale, f.max_seconds * 1000.0, static_cast<size_t>(f.limit));
    std::printf("trace %s: %zu requests over %.1f s (time scale %g), infinite-cache prefix hit ratio %.1f %%\n",
                f.trace.c_str(), trace.size(), trace.empty() ? 0.0 : trace.back().arrival_ms / 1000.0, f.time_scale,
                100.0 * workload::InfiniteCacheHitRatio(trace));
  }
  if (config.num_prefill_workers > 0) {
    std::printf("disaggregated: %d prefill + %d decode workers, local prefill up to %d uncached tokens, KV %lld B/token "
                "at %g GB/s\n",
                config.num_prefill_workers, config.num_workers, config.max_local_prefill_tokens,
                static_cast<long long>(config.worker.kv_bytes_per_token), config.worker.kv_transfer_gbps);
  }
  std::printf("%d workers x %d KV blocks of %d tokens, max %d seqs / %d batched tokens per step\n",
              config.num_workers + config.num_prefill_workers, config.worker.num_blocks, config.worker.block_size,
              config.worker.max_num_seqs, config.worker.max_num_batched_tokens);
  if (config.ttft_target_ms > 0 || config.itl_target_ms > 0) {
    std::printf("goodput: TTFT <= %g ms and %s ITL <= %g ms (0: no target)\n", config.ttft_target_ms,
                config.itl_target_p99 ? "p99" : "mean", config.itl_target_ms);
  }
  std::printf("\n");
  std::fflush(stdout);

  std::vector<replay::ReplayReport> reports;
  std::vector<replay::ReplayConfig> configs;
  for (replay::RoutingPolicy policy : policies) {
    config.policy = policy;
    if (f.vs_aggregated && config.num_prefill_workers > 0) {
      replay::ReplayConfig agg = config;
      agg.num_workers += agg.num_prefill_workers;
      agg.num_prefill_workers = 0;
      configs.push_back(agg);
    }
    configs.push_back(config);
  }
  for (const replay::ReplayConfig& c : configs) {
    Result<replay::ReplayReport> r = replay::RunReplay(trace, c);
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
