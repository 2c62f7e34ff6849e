// MockerCore cost per simulated pass: how many simulated workers one CPU core can drive.
//   BM_DecodeStep/N: one decode pass of N running sequences (steady state).
//   BM_Simulate: a whole workload (requests of ISL 3000 / OSL 150, a shared 2048-token prefix)
//   run in virtual time; reports simulated seconds per real second.
#include <benchmark/benchmark.h>

#include <numeric>

#include "engine/mocker/mocker_core.h"

namespace dyn {
namespace {

std::vector<uint32_t> Prompt(int n, uint32_t base) {
  std::vector<uint32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), base);
  return p;
}

void BM_DecodeStep(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  MockerCore core(MockerConfig{});
  for (int i = 0; i < n; ++i) {
    MockerRequest r{static_cast<uint64_t>(i + 1), Prompt(500, static_cast<uint32_t>(i) * 1000), 100000,
                    static_cast<uint64_t>(i)};
    if (!core.Add(std::move(r)).ok()) state.SkipWithError("Add failed");
  }
  while (core.Step().prefill_tokens > 0) {
  }
  for (auto _ : state) {
    MockerStepResult r = core.Step();
    benchmark::DoNotOptimize(r.duration_ms);
  }
  state.SetItemsProcessed(state.iterations() * n);  // tokens
}
// Fixed iterations: the sequences grow by one token a pass and must neither finish nor outgrow
// the pool (256 x 2500 tokens fit 16384 blocks of 64).
BENCHMARK(BM_DecodeStep)->Arg(1)->Arg(64)->Arg(256)->Iterations(2000);

void BM_Simulate(benchmark::State& state) {
  constexpr int kRequests = 512;
  double simulated_ms = 0;
  for (auto _ : state) {
    MockerCore core(MockerConfig{});
    const std::vector<uint32_t> shared = Prompt(2048, 1);
    for (int i = 0; i < kRequests; ++i) {
      std::vector<uint32_t> p = shared;
      std::vector<uint32_t> tail = Prompt(952, 100000 + static_cast<uint32_t>(i) * 1000);
      p.insert(p.end(), tail.begin(), tail.end());
      if (!core.Add(MockerRequest{static_cast<uint64_t>(i + 1), std::move(p), 150, static_cast<uint64_t>(i)}).ok()) {
        state.SkipWithError("Add failed");
      }
    }
    while (core.has_unfinished()) core.Step();
    simulated_ms += core.simulated_ms();
  }
  state.counters["simulated_s_per_real_s"] =
      benchmark::Counter(simulated_ms / 1000.0, benchmark::Counter::kIsRate);
  state.SetItemsProcessed(state.iterations() * kRequests);
}
BENCHMARK(BM_Simulate)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace dyn

BENCHMARK_MAIN();
