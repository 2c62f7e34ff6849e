// replay_bench: the replay simulator's own speed and results on a trace, without the dyn CLI.
//   replay_bench TRACE [WORKERS=8] [NUM_BLOCKS=16384] [TIME_SCALE=1] [POLICY...=kv round-robin random]
// Prints the same table as `dyn replay --compare` (wall s is the simulator's run time per policy).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "replay/replay.h"
#include "workload/trace.h"

int main(int argc, char** argv) {
  using namespace dyn;
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
