// Block pool microbenchmarks: allocate/release, prefix lookup, registration.
#include <benchmark/benchmark.h>

#include <numeric>

#include "kv/block_hash.h"
#include "kv/block_pool.h"

namespace dyn {
namespace {

void BM_AllocateRelease(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  BlockPool pool(16384, 16);
  std::vector<int32_t> table;
  for (auto _ : state) {
    table.clear();
    pool.Allocate(n, table);
    pool.Release(table);
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_AllocateRelease)->Arg(1)->Arg(64)->Arg(1024);

// A 2048-token prompt (128 blocks) whose prefix is cached: hash it and match it.
void BM_HashAndMatchPrefix(benchmark::State& state) {
  BlockPool pool(16384, 16);
  std::vector<uint32_t> tokens(2048);
  std::iota(tokens.begin(), tokens.end(), 1000);
  auto local = ComputeLocalBlockHashes(tokens, 16);
  auto seq = ComputeSequenceBlockHashes(tokens, 16);
  std::vector<int32_t> table;
  pool.Allocate(static_cast<int>(seq.size()), table);
  pool.RegisterBlocks(table, seq, local, std::nullopt, tokens);
  pool.Release(table);
  for (auto _ : state) {
    auto hashes = ComputeSequenceBlockHashes(tokens, 16);
    auto hit = pool.MatchPrefix(hashes, hashes.size());
    benchmark::DoNotOptimize(hit.data());
  }
  state.SetItemsProcessed(state.iterations() * 128);
}
BENCHMARK(BM_HashAndMatchPrefix);

// Prefix lookup alone (hashes precomputed), plus acquire/release of the hit.
void BM_MatchAcquireRelease(benchmark::State& state) {
  BlockPool pool(16384, 16);
  std::vector<uint32_t> tokens(2048);
  std::iota(tokens.begin(), tokens.end(), 1000);
  auto local = ComputeLocalBlockHashes(tokens, 16);
  auto seq = ComputeSequenceBlockHashes(tokens, 16);
  std::vector<int32_t> table;
  pool.Allocate(static_cast<int>(seq.size()), table);
  pool.RegisterBlocks(table, seq, local, std::nullopt, tokens);
  pool.Release(table);
  for (auto _ : state) {
    auto hit = pool.MatchPrefix(seq, seq.size());
    pool.Acquire(hit);
    pool.Release(hit);
  }
  state.SetItemsProcessed(state.iterations() * 128);
}
BENCHMARK(BM_MatchAcquireRelease);

// Allocating from a pool full of cached blocks: every allocation evicts.
void BM_AllocateWithEviction(benchmark::State& state) {
  const int kBlocks = 16384;
  BlockPool pool(kBlocks, 16);
  std::vector<uint32_t> tokens(kBlocks * 16);
  std::iota(tokens.begin(), tokens.end(), 0);
  auto local = ComputeLocalBlockHashes(tokens, 16);
  auto seq = ComputeSequenceBlockHashes(tokens, 16);
  uint64_t round = 0;
  std::vector<int32_t> table;
  for (auto _ : state) {
    state.PauseTiming();
    table.clear();
    pool.Allocate(kBlocks, table);
    for (auto& h : seq) h += ++round;  // fresh hashes each round
    pool.RegisterBlocks(table, seq, local, std::nullopt, tokens);
    pool.Release(table);
    table.clear();
    state.ResumeTiming();
    pool.Allocate(64, table);
    state.PauseTiming();
    pool.Release(table);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(BM_AllocateWithEviction)->Iterations(200);

}  // namespace
}  // namespace dyn

BENCHMARK_MAIN();
