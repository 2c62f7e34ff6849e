#include "router/kv_router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

namespace dyn::router {
namespace {

using std::chrono::seconds;
constexpr int kB = 16;

// Tokens of named 16-token blocks: block 'A' is 16 tokens no other block shares.
std::vector<uint32_t> Tokens(const std::string& blocks, int extra_tokens = 0) {
  std::vector<uint32_t> t;
  for (char c : blocks) {
    for (int i = 0; i < kB; ++i) t.push_back(static_cast<uint32_t>(c) * 1000 + i);
  }
  for (int i = 0; i < extra_tokens; ++i) t.push_back(999999);
  return t;
}

// A Stored event as an engine would send it for a whole prompt (root chain). Engine ids come from
// `id_base` so each request can get fresh physical blocks, or the router hash (id_base 0) as
// BlockPool does.
RouterEvent StoredPrompt(WorkerKey w, uint64_t event_id, const std::string& blocks, uint64_t id_base) {
  RequestBlocks rb = HashRequest(Tokens(blocks), kB);
  StoredData sd;
  for (size_t i = 0; i < rb.local.size(); ++i) {
    sd.blocks.push_back(StoredBlock{id_base ? id_base + i : rb.sequence[i], rb.local[i], {}});
  }
  return RouterEvent{w, event_id, StorageTier::kDevice, sd};
}

const WorkerKey kWa{100, 0}, kWb{200, 0}, kWc{300, 0};

struct Fixture {
  explicit Fixture(KvRouterConfig cfg = {}) : active(cfg.block_size), router(cfg, indexer, active) {}
  RadixIndexer indexer;
  ActiveSequences active;
  KvRouter router;
};

const WorkerCost& CostOf(const RouteDecision& d, WorkerKey w) {
  for (const auto& c : d.costs) {
    if (c.worker == w) return c;
  }
  static WorkerCost none;
  ADD_FAILURE() << "no cost for " << w.ToString();
  return none;
}

void SeedAG(RadixIndexer& idx, bool fresh_engine_ids) {
  ASSERT_FALSE(idx.ApplyEvent(StoredPrompt(kWa, 1, "AB", fresh_engine_ids ? 1000 : 0)).changed_nothing());
  ASSERT_FALSE(idx.ApplyEvent(StoredPrompt(kWa, 2, "ACD", fresh_engine_ids ? 2000 : 0)).changed_nothing());
  ASSERT_FALSE(idx.ApplyEvent(StoredPrompt(kWb, 1, "ACE", fresh_engine_ids ? 3000 : 0)).changed_nothing());
}

// design/FACTS.md acceptance scenario.
TEST(KvRouter, AcceptanceScenarioAtoG) {
  for (bool fresh_ids : {true, false}) {
    SCOPED_TRACE(fresh_ids ? "per-request engine ids" : "engine ids = sequence hashes");
    Fixture f;
    SeedAG(f.indexer, fresh_ids);
    // With fresh physical blocks per request a holds A twice: 5 blocks, as FACTS counts; with
    // prefix-cached ids (one A) it holds 4. b holds 3 either way.
    EXPECT_EQ(f.indexer.TreeSize(kWa), fresh_ids ? 5u : 4u);
    EXPECT_EQ(f.indexer.TreeSize(kWb), 3u);
    const WorkerCandidate cands[] = {{kWa, 0.1}, {kWb, 0.1}};

    auto d1 = f.router.Route("r1", HashRequest(Tokens("ACDF"), kB), cands, {});
    ASSERT_TRUE(d1.ok());
    EXPECT_EQ(d1->worker, kWa);
    EXPECT_EQ(d1->overlap_blocks, 3u);
    EXPECT_EQ(CostOf(*d1, kWa).overlap_blocks, 3u);
    EXPECT_EQ(CostOf(*d1, kWb).overlap_blocks, 2u);
    EXPECT_DOUBLE_EQ(CostOf(*d1, kWa).cost, 1 + 4);  // (64 - 48) / 16 + 4 new blocks
    EXPECT_DOUBLE_EQ(CostOf(*d1, kWb).cost, 2 + 4);

    // [A,C,G]: both overlap 2 and, without load, cost the same: the smaller tree (b) wins, for
    // every RNG seed.
    for (uint64_t seed = 0; seed < 20; ++seed) {
      ActiveSequences idle(kB);
      KvRouterConfig cfg;
      cfg.seed = seed;
      KvRouter r(cfg, f.indexer, idle);
      auto d2 = r.Route("r2", HashRequest(Tokens("ACG"), kB), cands, {});
      ASSERT_TRUE(d2.ok());
      EXPECT_EQ(d2->worker, kWb);
      EXPECT_EQ(d2->overlap_blocks, 2u);
      EXPECT_EQ(CostOf(*d2, kWa).cost, CostOf(*d2, kWb).cost);
    }
    // With r1 still active on a, b is also the cheaper choice.
    auto d2 = f.router.Route("r2", HashRequest(Tokens("ACG"), kB), cands, {});
    ASSERT_TRUE(d2.ok());
    EXPECT_EQ(d2->worker, kWb);
    // a: 16 tokens of r1 still pending + (48 - 32); 4 active blocks + G (A and C are active).
    EXPECT_DOUBLE_EQ(CostOf(*d2, kWa).cost, (16 + 16) / 16.0 + 4 + 1);
  }
}

TEST(KvRouter, CostFunctionHandComputed) {
  KvRouterConfig cfg;
  cfg.overlap_weight = 2.0;
  cfg.track_active = false;
  Fixture f(cfg);
  f.indexer.ApplyEvent(StoredPrompt(kWa, 1, "PQ", 0));
  f.indexer.ApplyEvent(StoredPrompt(kWb, 1, "P", 0));
  // a already runs [P,Q,R] (56 tokens, 1 block cached): 40 prefill tokens, 3 active blocks.
  RequestBlocks running = HashRequest(Tokens("PQR", 8), kB);
  ASSERT_TRUE(f.active.AddRequest("x", kWa, running.sequence, running.isl, 1, {}).ok());
  ASSERT_EQ(f.active.ActivePrefillTokens(kWa), 40);

  RequestBlocks req = HashRequest(Tokens("PQST", 6), kB);  // 70 tokens, 4 full blocks
  ASSERT_EQ(req.sequence.size(), 4u);
  const WorkerCandidate cands[] = {{kWa}, {kWb}, {kWc}};
  auto d = f.router.Route("y", req, cands, {});
  ASSERT_TRUE(d.ok());
  // a: prefill 40 + (70 - 32) = 78; decode 3 + 2 (S, T) = 5; cost 2 * 78 / 16 + 5 = 14.75
  EXPECT_EQ(CostOf(*d, kWa).prefill_tokens, 78);
  EXPECT_EQ(CostOf(*d, kWa).decode_blocks, 5);
  EXPECT_DOUBLE_EQ(CostOf(*d, kWa).cost, 14.75);
  // b: prefill 70 - 16 = 54; decode 4; cost 6.75 + 4 = 10.75
  EXPECT_EQ(CostOf(*d, kWb).prefill_tokens, 54);
  EXPECT_DOUBLE_EQ(CostOf(*d, kWb).cost, 10.75);
  // c: prefill 70; decode 4; cost 8.75 + 4 = 12.75
  EXPECT_DOUBLE_EQ(CostOf(*d, kWc).cost, 12.75);
  EXPECT_EQ(d->worker, kWb);
  EXPECT_DOUBLE_EQ(d->cost, 10.75);
  EXPECT_EQ(f.active.num_requests(), 1u);  // track_active off: the router added nothing
}

TEST(KvRouter, TemperatureSamplingMatchesSoftmax) {
  KvRouterConfig cfg;
  cfg.temperature = 1.0;
  cfg.track_active = false;
  cfg.seed = 7;
  Fixture f(cfg);
  // Overlaps 4, 3, 2 of a 4-block request: costs 4, 5, 6.
  f.indexer.ApplyEvent(StoredPrompt(kWa, 1, "ABCD", 0));
  f.indexer.ApplyEvent(StoredPrompt(kWb, 1, "ABC", 0));
  f.indexer.ApplyEvent(StoredPrompt(kWc, 1, "AB", 0));
  const WorkerCandidate cands[] = {{kWa}, {kWb}, {kWc}};
  RequestBlocks req = HashRequest(Tokens("ABCD"), kB);
  std::map<WorkerKey, int> hits;
  const int n = 30000;
  for (int i = 0; i < n; ++i) {
    auto d = f.router.Route("r", req, cands, {});
    ASSERT_TRUE(d.ok());
    if (i == 0) {
      EXPECT_DOUBLE_EQ(CostOf(*d, kWa).cost, 4);
      EXPECT_DOUBLE_EQ(CostOf(*d, kWc).cost, 6);
    }
    ++hits[d->worker];
  }
  // p ~ exp(-(cost / (max - min)) / T) = exp(-cost / 2)
  const double w[] = {std::exp(-2.0), std::exp(-2.5), std::exp(-3.0)};
  const double sum = w[0] + w[1] + w[2];
  const WorkerKey keys[] = {kWa, kWb, kWc};
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(hits[keys[i]] / double(n), w[i] / sum, 0.012) << keys[i].ToString();
  }
  // Lower temperature concentrates on the best: p(a) = 1 / (1 + e^-5 + e^-10) = 0.9933.
  KvRouterConfig cold = cfg;
  cold.temperature = 0.1;
  KvRouter r(cold, f.indexer, f.active);
  int best = 0;
  for (int i = 0; i < 2000; ++i) best += r.Route("r", req, cands, {})->worker == kWa;
  EXPECT_GT(best, 1960);
  EXPECT_LT(best, 2000);
}

TEST(KvRouter, BusyWorkersSkippedAllBusyRejected) {
  KvRouterConfig cfg;
  cfg.busy_kv_usage = 0.9;
  cfg.busy_prefill_tokens = 100;
  Fixture f(cfg);
  f.indexer.ApplyEvent(StoredPrompt(kWa, 1, "ABCD", 0));
  RequestBlocks req = HashRequest(Tokens("ABCD"), kB);
  const WorkerCandidate hot_a[] = {{kWa, 0.95}, {kWb, 0.5}};
  auto d = f.router.Route("1", req, hot_a, {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->worker, kWb);  // a would be cheapest but is busy
  EXPECT_TRUE(CostOf(*d, kWa).busy);
  // b now has 64 pending prefill tokens; one more 64-token prompt puts it over 100.
  ASSERT_TRUE(f.router.Route("2", HashRequest(Tokens("WXYZ"), kB), hot_a, {}).ok());
  EXPECT_EQ(f.active.ActivePrefillTokens(kWb), 128);
  auto busy = f.router.Route("3", req, hot_a, {});
  EXPECT_EQ(busy.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(f.router.stats().rejections, 1u);
  EXPECT_EQ(f.active.num_requests(), 2u);  // the rejected request was not added
  // First token of one request: b is no longer over the prefill threshold.
  ASSERT_TRUE(f.active.MarkPrefillCompleted("2").ok());
  auto again = f.router.Route("3", req, hot_a, {});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->worker, kWb);
  EXPECT_EQ(f.router.Route("4", req, std::span<const WorkerCandidate>{}, {}).status().code(), StatusCode::kUnavailable);
}

TEST(KvRouter, DataParallelRanksAreCandidates) {
  Fixture f;
  const WorkerKey r0{9, 0}, r1{9, 1};
  f.indexer.ApplyEvent(StoredPrompt(r1, 1, "ABC", 0));
  const WorkerCandidate cands[] = {{r0}, {r1}};
  auto d = f.router.Route("x", HashRequest(Tokens("ABCD"), kB), cands, {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->worker, r1);
  EXPECT_EQ(d->overlap_blocks, 3u);
  EXPECT_EQ(f.active.ActiveBlocks(r1), 4);
  EXPECT_EQ(f.active.ActiveBlocks(r0), 0);
}

TEST(KvRouter, ApproximateModeTtl) {
  KvRouterConfig cfg;
  cfg.approximate = true;
  cfg.track_active = false;
  Fixture f(cfg);
  const WorkerCandidate cands[] = {{kWa}, {kWb}, {kWc}};
  const auto t0 = RouterClock::time_point{} + seconds(10000);
  auto first = f.router.Route("1", HashRequest(Tokens("ABC"), kB), cands, t0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->overlap_blocks, 0u);
  EXPECT_EQ(f.indexer.TreeSize(first->worker), 3u);
  // The same prefix follows the first decision (overlap from the router's own insert).
  for (int i = 0; i < 5; ++i) {
    auto d = f.router.Route("2", HashRequest(Tokens("ABCD"), kB), cands, t0 + seconds(60));
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d->worker, first->worker);
    EXPECT_EQ(d->overlap_blocks, i == 0 ? 3u : 4u);
  }
  // A, B, C were refreshed at t0 + 60: alive at t0 + 170, gone at t0 + 180.
  f.router.ExpireApproximate(t0 + seconds(170));
  EXPECT_EQ(f.indexer.TreeSize(first->worker), 4u);
  f.router.ExpireApproximate(t0 + seconds(180));
  EXPECT_EQ(f.indexer.TreeSize(first->worker), 0u);
  EXPECT_EQ(f.indexer.num_nodes(), 0u);
  EXPECT_EQ(f.router.stats().approx_expired, 4u);
}

TEST(KvRouter, ApproximateModePrunesOldestToEightyPercent) {
  KvRouterConfig cfg;
  cfg.approximate = true;
  cfg.track_active = false;
  cfg.approx_max_blocks = 20;
  Fixture f(cfg);
  const WorkerCandidate cands[] = {{kWa}};
  const auto t0 = RouterClock::time_point{};
  const std::string prompts[] = {"ABCD", "EFGH", "IJKL", "MNOP", "QRST", "UVWX"};
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(f.router.Route(std::to_string(i), HashRequest(Tokens(prompts[i]), kB), cands, t0 + seconds(i)).ok());
    EXPECT_LE(f.indexer.total_blocks(), 20u);
  }
  // 24 blocks routed: the 6th request crossed the cap and pruning went down to 16.
  EXPECT_EQ(f.indexer.total_blocks(), 16u);
  EXPECT_EQ(f.router.stats().approx_pruned, 8u);
  auto depth = [&](const std::string& p) {
    auto m = f.indexer.FindMatches(HashRequest(Tokens(p), kB).sequence);
    return m.empty() ? 0u : m[0].depth;
  };
  EXPECT_EQ(depth("ABCD"), 0u);  // oldest went first
  EXPECT_EQ(depth("EFGH"), 0u);
  EXPECT_EQ(depth("IJKL"), 4u);
  EXPECT_EQ(depth("UVWX"), 4u);
}

}  // namespace
}  // namespace dyn::router
