// replay_bench: the replay simulator's own speed and results on a trace, without the dyn CLI.
//   replay_bench TRACE [WORKERS=8] [NUM_BLOCKS=16384] [TIME_SCALE=1] [POLICY...=kv round-robin random]
// Prints the same table as `dyn replay --compare` (wall s is the simulator's run time per policy).
//   replay_bench --disagg [REQUESTS=1000] [TTFT_TARGET_MS=2000] [ITL_TARGET_MS=25] [RATE...=0.5 1 1.5 2 3]
// The disaggregation benchmark (docs/benchmarks/disagg_mocker.md): synthetic mixed traffic
// (replay::MixedTrafficTrace defaults) at each rate on 2 aggregated workers and on 1 prefill +
// 1 decode worker (kv routing, mocker defaults); prints a markdown table.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "replay/replay.h"
#include "workload/trace.h"

namespace {

int DisaggSweep(int argc, char** argv) {
  using namespace dyn;
  const size_t requests = argc > 2 ? static_cast<size_t>(std::atol(argv[2])) : 1000;
  const double ttft_target = argc > 3 ? std::atof(argv[3]) : 2000;
  const double itl_target = argc > 4 ? std::atof(argv[4]) : 25;
  std::vector<double> rates;
  for (int i = 5; i < argc; ++i) rates.push_back(std::atof(argv[i]));
  if (rates.empty()) rates = {0.5, 1, 1.5, 2, 3};
  std::printf("mixed traffic: %zu requests (20 %% 8-16k-token prompts / 64 output tokens, 80 %% 200-500 / 300-800); "
              "goodput: TTFT <= %g ms and mean ITL <= %g ms; in brackets: p99 ITL <= %g ms\n\n",
              requests, ttft_target, itl_target, itl_target);
  std::printf("| req/s | setup | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 s | output tok/s | "
              "goodput req/s | good %% | remote/local | transfer p50 ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (double rate : rates) {
    replay::MixedTraffic mix;
    mix.requests = requests;
    mix.rate = rate;
    const auto trace = replay::MixedTrafficTrace(mix);
    for (int prefill : {0, 1}) {
      replay::ReplayConfig c;
      c.num_workers = prefill ? 1 : 2;
      c.num_prefill_workers = prefill;
      c.ttft_target_ms = ttft_target;
      c.itl_target_ms = itl_target;
      auto r = replay::RunReplay(trace, c);
      c.itl_target_p99 = true;
      auto r99 = replay::RunReplay(trace, c);
      if (!r.ok() || !r99.ok()) {
        std::fprintf(stderr, "%s\n", (r.ok() ? r99.status() : r.status()).message().c_str());
        return 1;
      }
      const double good = 100.0 * r->good_requests / static_cast<double>(r->requests);
      const double good99 = 100.0 * r99->good_requests / static_cast<double>(r99->requests);
      std::printf("| %.1f | %s | %.0f | %.0f | %.1f | %.1f | %.1f | %.0f | %.2f (%.2f) | %.0f (%.0f) | %llu/%llu | %.0f |\n",
                  rate, prefill ? "1P+1D" : "2 agg", r->ttft_ms.p50, r->ttft_ms.p99, r->itl_ms.p50, r->itl_ms.p99,
                  r->e2e_ms.p50 / 1000, r->output_tokens_per_s, r->goodput_rps, r99->goodput_rps, good, good99,
                  static_cast<unsigned long long>(r->remote_prefills), static_cast<unsigned long long>(r->local_prefills),
                  r->kv_transfer_ms.p50);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dyn;
  if (argc > 1 && std::string(argv[1]) == "--disagg") return DisaggSweep(argc, argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s TRACE [WORKERS] [NUM_BLOCKS] [TIME_SCALE] [POLICY...]\n", argv[0]);
    return 2;
  }
  replay::ReplayConfig config;
  if (argc > 2) config.num_workers = std::atoi(argv[2]);
  if (argc > 3) config.worker.num_blocks = std::atoi(argv[3]);
  const double time_scale = argc > 4 ? std::atof(argv[4]) : 1.0;
  std::vector<replay::RoutingPolicy> policies;
  for (int i = 5; i < argc; ++i) {
    auto p = replay::ParseRoutingPolicy(argv[i]);
    if (!p.ok()) {
      std::fprintf(stderr, "%s\n", p.status().message().c_str());
      return 2;
    }
    policies.push_back(*p);
  }
  if (policies.empty()) {
    policies = {replay::RoutingPolicy::kKv, replay::RoutingPolicy::kRoundRobin, replay::RoutingPolicy::kRandom};
  }
  auto loaded = workload::LoadTrace(argv[1]);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().message().c_str());
    return 1;
  }
  const auto trace = workload::ScaleTrace(std::move(*loaded), time_scale);
  std::printf("%s: %zu requests, time scale %g, infinite-cache hit ratio %.1f %%\n", argv[1], trace.size(),
              time_scale, 100 * workload::InfiniteCacheHitRatio(trace));
  std::vector<replay::ReplayReport> reports;
  for (replay::RoutingPolicy p : policies) {
    config.policy = p;
    auto r = replay::RunReplay(trace, config);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().message().c_str());
      return 1;
    }
    std::fprintf(stderr, "%s done in %.1f s\n", r->policy.c_str(), r->wall_ms / 1000);
    reports.push_back(std::move(*r));
  }
  std::printf("%s", replay::FormatReports(reports).c_str());
  return 0;
}
