// replay_bench: the replay simulator's own speed and results on a trace, without the dyn CLI.
//   replay_bench TRACE [WORKERS=8] [NUM_BLOCKS=16384] [TIME_SCALE=1] [POLICY...=kv round-robin random]
// Prints the same table as `dyn replay --compare` (wall s is the simulator's run time per policy).
//   replay_bench --disagg [REQUESTS=1000] [TTFT_MS=1000] [MEAN_ITL_MS=10] [P99_ITL_MS=50] [RATE...=1 2 4 6 8 12]
// The disaggregation benchmark (docs/benchmarks/disagg_mocker.md): synthetic mixed traffic
// (replay::MixedTrafficTrace defaults) at each rate on 2 aggregated workers and on 1 prefill +
// 1 decode worker, with local prefill up to 512 uncached tokens and with none (kv routing,
// mocker defaults); prints a markdown table.
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
  const double ttft_target = argc > 3 ? std::atof(argv[3]) : 1000;
  const double itl_target = argc > 4 ? std::atof(argv[4]) : 10;
  const double itl_p99_target = argc > 5 ? std::atof(argv[5]) : 50;
  std::vector<double> rates;
  for (int i = 6; i < argc; ++i) rates.push_back(std::atof(argv[i]));
  if (rates.empty()) rates = {1, 2, 4, 6, 8, 12};
  std::printf("mixed traffic: %zu requests (20 %% 8-16k-token prompts / 64 output tokens, 80 %% 200-500 / 300-800)\n"
              "goodput A: TTFT <= %g ms and the request's mean ITL <= %g ms; B: TTFT <= %g ms and its p99 ITL <= %g ms\n\n",
              requests, ttft_target, itl_target, ttft_target, itl_p99_target);
  std::printf("| req/s | setup | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL max ms | e2e p50 s | "
              "goodput A req/s (good %%) | goodput B req/s (good %%) | remote/local | transfer p50 ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  struct Setup {
    const char* name;
    int prefill, decode, max_local;
  };
  const Setup setups[] = {{"2 agg", 0, 2, 0}, {"1P+1D", 1, 1, 512}, {"1P+1D remote", 1, 1, 0}};
  for (double rate : rates) {
    replay::MixedTraffic mix;
    mix.requests = requests;
    mix.rate = rate;
    const auto trace = replay::MixedTrafficTrace(mix);
    for (const Setup& setup : setups) {
      replay::ReplayConfig c;
      c.num_workers = setup.decode;
      c.num_prefill_workers = setup.prefill;
      c.max_local_prefill_tokens = setup.max_local;
      c.ttft_target_ms = ttft_target;
      c.itl_target_ms = itl_target;
      auto a = replay::RunReplay(trace, c);
      c.itl_target_ms = itl_p99_target;
      c.itl_target_p99 = true;
      auto b = replay::RunReplay(trace, c);
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "%s\n", (a.ok() ? b.status() : a.status()).message().c_str());
        return 1;
      }
      const double n = static_cast<double>(a->requests);
      std::printf("| %g | %s | %.0f | %.0f | %.1f | %.1f | %.0f | %.1f | %.2f (%.0f) | %.2f (%.0f) | %llu/%llu | %.0f |\n",
                  rate, setup.name, a->ttft_ms.p50, a->ttft_ms.p99, a->itl_ms.p50, a->itl_ms.p99, a->itl_ms.max,
                  a->e2e_ms.p50 / 1000, a->goodput_rps, 100 * a->good_requests / n, b->goodput_rps,
                  100 * b->good_requests / n, static_cast<unsigned long long>(a->remote_prefills),
                  static_cast<unsigned long long>(a->local_prefills), a->kv_transfer_ms.p50);
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
