// Router core benchmark: FindMatches latency on a 1M-block index, KV event throughput, and full
// routing decisions per second. Prints a table; no Google Benchmark so it can report p50/p99.
//
// Workload (realistic sharing): 1,000 conversation prefixes of 4-64 blocks, each stored on 3
// random workers; then every worker stores private continuations (8-32 blocks) under prefixes it
// holds until the index holds 1M blocks in total. Queries are 1,024-token requests (64 blocks of
// 16): a random prefix, then either a worker's stored continuation (deep hit) or new blocks.
//
// Usage: router_bench [total_blocks=1048576] [workers...=100 1000]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "router/kv_router.h"

namespace dyn::router {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kBlockSize = 16;
constexpr int kRequestBlocks = 64;  // 1,024 tokens

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct Chain {
  std::vector<uint32_t> tokens;  // kBlockSize per block
};

struct World {
  std::vector<Chain> prefixes;
  // Per worker: (prefix index, continuation tokens) it stored.
  std::vector<std::vector<std::pair<int, std::vector<uint32_t>>>> continuations;
  std::vector<std::vector<int>> prefixes_of;  // worker -> prefixes it holds
};

std::vector<uint32_t> RandomTokens(std::mt19937_64& rng, int blocks) {
  std::vector<uint32_t> t(static_cast<size_t>(blocks) * kBlockSize);
  for (auto& x : t) x = static_cast<uint32_t>(rng());
  return t;
}

// Stored event for `tokens` (whole blocks) under the engine block `parent` (none: a root). Engine
// ids are the router hashes, as BlockPool emits them.
RouterEvent MakeStored(WorkerKey w, uint64_t event_id, std::optional<uint64_t> parent_seq,
                       std::span<const uint32_t> tokens, std::vector<uint64_t>* seq_out) {
  StoredData sd;
  sd.parent_hash = parent_seq;
  uint64_t prev = parent_seq.value_or(0);
  for (size_t b = 0; b * kBlockSize < tokens.size(); ++b) {
    const uint64_t local = HashBlockTokens(tokens.subspan(b * kBlockSize, kBlockSize));
    const uint64_t seq = (b == 0 && !parent_seq) ? local : ChainBlockHash(prev, local);
    sd.blocks.push_back(StoredBlock{seq, local, {}});
    if (seq_out) seq_out->push_back(seq);
    prev = seq;
  }
  return RouterEvent{w, event_id, StorageTier::kDevice, std::move(sd)};
}

struct Built {
  World world;
  double build_s = 0;
  uint64_t events = 0;
};

Built BuildIndex(RadixIndexer& idx, int num_workers, size_t total_blocks, std::mt19937_64& rng) {
  Built out;
  World& world = out.world;
  world.continuations.resize(num_workers);
  world.prefixes_of.resize(num_workers);
  std::vector<uint64_t> next_id(num_workers, 1);
  std::vector<std::vector<uint64_t>> prefix_seq(1000);
  std::uniform_int_distribution<int> len(4, 64), cont(8, 32), pick_worker(0, num_workers - 1);
  std::vector<RouterEvent> events;
  for (int p = 0; p < 1000; ++p) {
    world.prefixes.push_back(Chain{RandomTokens(rng, len(rng))});
    std::vector<int> holders;
    while (holders.size() < 3) {
      int w = pick_worker(rng);
      if (std::find(holders.begin(), holders.end(), w) == holders.end()) holders.push_back(w);
    }
    for (int w : holders) {
      prefix_seq[p].clear();
      events.push_back(MakeStored(WorkerKey{uint64_t(w), 0}, next_id[w]++, std::nullopt, world.prefixes[p].tokens, &prefix_seq[p]));
      world.prefixes_of[w].push_back(p);
    }
  }
  size_t blocks = 0;
  for (const auto& e : events) blocks += std::get<StoredData>(e.data).blocks.size();
  while (blocks < total_blocks) {
    int w = pick_worker(rng);
    if (world.prefixes_of[w].empty()) {
      // A worker without a shared prefix still serves traffic: give it one.
      int p = std::uniform_int_distribution<int>(0, 999)(rng);
      events.push_back(MakeStored(WorkerKey{uint64_t(w), 0}, next_id[w]++, std::nullopt, world.prefixes[p].tokens, nullptr));
      world.prefixes_of[w].push_back(p);
      blocks += world.prefixes[p].tokens.size() / kBlockSize;
      continue;
    }
    int p = world.prefixes_of[w][std::uniform_int_distribution<size_t>(0, world.prefixes_of[w].size() - 1)(rng)];
    auto t = RandomTokens(rng, cont(rng));
    events.push_back(MakeStored(WorkerKey{uint64_t(w), 0}, next_id[w]++, prefix_seq[p].back(), t, nullptr));
    blocks += t.size() / kBlockSize;
    world.continuations[w].emplace_back(p, std::move(t));
  }
  const auto t0 = Clock::now();
  for (const auto& e : events) idx.ApplyEvent(e);
  out.build_s = Seconds(Clock::now() - t0);
  out.events = events.size();
  return out;
}

// A 64-block request: a prefix, then a worker's continuation (half the time) or new blocks.
std::vector<uint32_t> MakeRequest(const World& world, std::mt19937_64& rng) {
  const int w = std::uniform_int_distribution<int>(0, int(world.continuations.size()) - 1)(rng);
  std::vector<uint32_t> t;
  if (!world.continuations[w].empty() && rng() % 2 == 0) {
    const auto& [p, c] = world.continuations[w][rng() % world.continuations[w].size()];
    t = world.prefixes[p].tokens;
    t.insert(t.end(), c.begin(), c.end());
  } else {
    t = world.prefixes[rng() % world.prefixes.size()].tokens;
  }
  t.resize(std::min<size_t>(t.size(), kRequestBlocks * kBlockSize));
  auto extra = RandomTokens(rng, kRequestBlocks - int(t.size() / kBlockSize));
  t.insert(t.end(), extra.begin(), extra.end());
  return t;
}

double Pct(std::vector<double>& v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * double(v.size())))];
}

void Run(int num_workers, size_t total_blocks) {
  std::mt19937_64 rng(42);
  RadixIndexer idx;
  Built built = BuildIndex(idx, num_workers, total_blocks, rng);
  std::printf("workers=%d blocks=%zu nodes=%zu build: %llu Stored events in %.2f s = %.0f events/s, %.2f M blocks/s\n",
              num_workers, idx.total_blocks(), idx.num_nodes(), (unsigned long long)built.events, built.build_s,
              double(built.events) / built.build_s, double(idx.total_blocks()) / built.build_s / 1e6);

  // FindMatches on precomputed sequence hashes.
  std::vector<std::vector<uint64_t>> queries;
  for (int i = 0; i < 2000; ++i) queries.push_back(HashRequest(MakeRequest(built.world, rng), kBlockSize).sequence);
  std::vector<double> lat;
  size_t matched = 0, depth_sum = 0;
  for (int rep = 0; rep < 10; ++rep) {
    for (const auto& q : queries) {
      const auto t0 = Clock::now();
      auto m = idx.FindMatches(q);
      lat.push_back(Seconds(Clock::now() - t0) * 1e6);
      matched += m.size();
      for (const auto& x : m) depth_sum += x.depth;
    }
  }
  std::printf("  FindMatches (64 blocks): p50 %.2f us  p99 %.2f us  (avg %.1f workers matched, avg depth %.1f)\n",
              Pct(lat, 0.5), Pct(lat, 0.99), double(matched) / double(lat.size()),
              matched ? double(depth_sum) / double(matched) : 0.0);

  // Steady-state events on the full index: a worker stores 4 blocks under one of its
  // continuations, then removes them (vLLM sends one event per scheduler step).
  {
    std::vector<RouterEvent> evs;
    std::vector<uint64_t> next_id(num_workers);
    for (int w = 0; w < num_workers; ++w) next_id[w] = idx.LastEventId(WorkerKey{uint64_t(w), 0}) + 1;
    for (int i = 0; i < 100000; ++i) {
      int w = int(rng() % uint64_t(num_workers));
      const auto& conts = built.world.continuations[w];
      if (conts.empty()) continue;
      const auto& [p, c] = conts[rng() % conts.size()];
      std::vector<uint32_t> full = built.world.prefixes[p].tokens;
      full.insert(full.end(), c.begin(), c.end());
      const uint64_t parent = ComputeSequenceBlockHashes(full, kBlockSize).back();
      auto t = RandomTokens(rng, 4);
      std::vector<uint64_t> seqs;
      WorkerKey key{uint64_t(w), 0};
      evs.push_back(MakeStored(key, next_id[w]++, parent, t, &seqs));
      RouterEvent removed;
      removed.worker = key;
      removed.event_id = next_id[w]++;
      removed.data = RemovedData{std::move(seqs)};
      evs.push_back(std::move(removed));
    }
    const auto t0 = Clock::now();
    size_t applied = 0;
    for (const auto& e : evs) applied += idx.ApplyEvent(e).code == ApplyCode::kApplied;
    const double s = Seconds(Clock::now() - t0);
    std::printf("  steady events (4-block Stored / Removed pairs): %.0f events/s (%zu of %zu applied)\n",
                double(evs.size()) / s, applied, evs.size());
  }

  // Full routing decisions: hash 1,024 tokens, match, cost every candidate, add to active; keep
  // 256 requests in flight (the oldest is freed).
  {
    ActiveSequences active(kBlockSize);
    KvRouterConfig cfg;
    cfg.block_size = kBlockSize;
    KvRouter router(cfg, idx, active);
    std::vector<WorkerCandidate> cands;
    for (int w = 0; w < num_workers; ++w) cands.push_back(WorkerCandidate{WorkerKey{uint64_t(w), 0}, 0.5});
    std::vector<std::vector<uint32_t>> prompts;
    for (int i = 0; i < 2000; ++i) prompts.push_back(MakeRequest(built.world, rng));
    const int n = num_workers >= 1000 ? 5000 : 20000;
    std::vector<double> rl;
    const auto start = Clock::now();
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      auto d = router.Route(std::to_string(i), HashRequest(prompts[size_t(i) % prompts.size()], kBlockSize), cands,
                            RouterClock::now());
      rl.push_back(Seconds(Clock::now() - t0) * 1e6);
      if (!d.ok()) std::abort();
      if (i >= 256) (void)active.Free(std::to_string(i - 256));
    }
    const double s = Seconds(Clock::now() - start);
    std::printf("  Route (1,024 tokens, %d candidates, 256 in flight): %.0f decisions/s  p50 %.1f us  p99 %.1f us\n",
                num_workers, double(n) / s, Pct(rl, 0.5), Pct(rl, 0.99));
  }
}

}  // namespace
}  // namespace dyn::router

int main(int argc, char** argv) {
  size_t total = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (size_t{1} << 20);
  std::vector<int> workers;
  for (int i = 2; i < argc; ++i) workers.push_back(std::atoi(argv[i]));
  if (workers.empty()) workers = {100, 1000};
  for (int w : workers) dyn::router::Run(w, total);
  return 0;
}
