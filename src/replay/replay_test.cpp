#include "replay/replay.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

namespace dyn::replay {
namespace {

using workload::TraceRequest;

// Two conversations (prefix ids 1.. and 1000..) alternating, one request per second, each turn
// extending its conversation's prefix by one block. Requests finish long before the next arrives.
std::vector<TraceRequest> TwoConversations(int turns) {
  std::vector<TraceRequest> trace;
  std::vector<uint64_t> a = {1, 2}, b = {1000, 1001};
  for (int t = 0; t < turns; ++t) {
    for (auto* conv : {&a, &b}) {
      conv->push_back(conv->back() + 1);
      TraceRequest r;
      r.arrival_ms = 1000.0 * static_cast<double>(trace.size());
      r.hash_ids = *conv;
      r.input_length = static_cast<int>(conv->size()) * 512 - 100;
      r.output_length = 4;
      trace.push_back(r);
    }
  }
  return trace;
}

ReplayConfig SmallConfig(RoutingPolicy policy, int workers) {
  ReplayConfig c;
  c.policy = policy;
  c.num_workers = workers;
  c.worker.num_blocks = 2048;
  return c;
}

std::vector<TraceRequest> RandomTrace(size_t n, double gap_ms, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<TraceRequest> trace;
  for (size_t i = 0; i < n; ++i) {
    TraceRequest r;
    r.arrival_ms = gap_ms * static_cast<double>(i);
    const int blocks = 1 + static_cast<int>(rng() % 6);
    const uint64_t family = rng() % 20;  // 20 shared first blocks
    r.hash_ids.push_back(family);
    for (int b = 1; b < blocks; ++b) r.hash_ids.push_back(100 + rng() % 5000);
    r.input_length = blocks * 512 - static_cast<int>(rng() % 300);
    r.output_length = 1 + static_cast<int>(rng() % 40);
    trace.push_back(r);
  }
  return trace;
}

TEST(Replay, KvSendsSharedPrefixesToTheSameWorker) {
  const auto trace = TwoConversations(8);
  auto kv = RunReplay(trace, SmallConfig(RoutingPolicy::kKv, 4));
  ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  std::set<int32_t> a_workers, b_workers;
  for (size_t i = 0; i < trace.size(); ++i) (i % 2 == 0 ? a_workers : b_workers).insert(kv->request_worker[i]);
  EXPECT_EQ(a_workers.size(), 1u);
  EXPECT_EQ(b_workers.size(), 1u);
  EXPECT_EQ(kv->completed, trace.size());
  EXPECT_GT(kv->kv_events, 0u);
  // Every turn after the first reuses its whole previous prompt (all but 100 tokens of a block).
  EXPECT_GT(kv->prefix_hit_rate, 0.6);

  // Round-robin over 3 workers spreads each conversation over all of them: a turn finds only the
  // prefix its worker saw three turns ago.
  auto rr = RunReplay(trace, SmallConfig(RoutingPolicy::kRoundRobin, 3));
  ASSERT_TRUE(rr.ok());
  a_workers.clear();
  for (size_t i = 0; i < trace.size(); i += 2) a_workers.insert(rr->request_worker[i]);
  EXPECT_EQ(a_workers.size(), 3u);
  std::printf("hit rate: kv %.3f round-robin %.3f\n", kv->prefix_hit_rate, rr->prefix_hit_rate);
  EXPECT_LT(rr->prefix_hit_rate, kv->prefix_hit_rate - 0.15);
  EXPECT_LE(*std::max_element(rr->worker_requests.begin(), rr->worker_requests.end()),
            *std::min_element(rr->worker_requests.begin(), rr->worker_requests.end()) + 1);
}

TEST(Replay, ApproximateModeAlsoFollowsPrefixes) {
  const auto trace = TwoConversations(6);
  ReplayConfig c = SmallConfig(RoutingPolicy::kKv, 4);
  c.approximate = true;
  auto r = RunReplay(trace, c);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->policy, "kv-approx");
  EXPECT_EQ(r->kv_events, 0u);
  std::set<int32_t> a_workers;
  for (size_t i = 0; i < trace.size(); i += 2) a_workers.insert(r->request_worker[i]);
  EXPECT_EQ(a_workers.size(), 1u);
}

TEST(Replay, SameSeedSameResults) {
  const auto trace = RandomTrace(300, 20, 7);
  for (RoutingPolicy p : {RoutingPolicy::kKv, RoutingPolicy::kRandom, RoutingPolicy::kLeastLoaded}) {
    ReplayConfig c = SmallConfig(p, 6);
    c.temperature = p == RoutingPolicy::kKv ? 0.5 : 0.0;  // sampled decisions use the seeded RNG
    c.seed = 42;
    auto a = RunReplay(trace, c);
    auto b = RunReplay(trace, c);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->request_worker, b->request_worker) << RoutingPolicyName(p);
    EXPECT_EQ(a->cached_tokens, b->cached_tokens);
    EXPECT_EQ(a->ttft_ms.mean, b->ttft_ms.mean);
    EXPECT_EQ(a->itl_ms.p99, b->itl_ms.p99);
    EXPECT_EQ(a->simulated_ms, b->simulated_ms);
    if (p == RoutingPolicy::kRandom) {
      c.seed = 43;
      auto other = RunReplay(trace, c);
      ASSERT_TRUE(other.ok());
      EXPECT_NE(a->request_worker, other->request_worker);
    }
  }
}

TEST(Replay, VirtualTimeFollowsTheTimingModel) {
  // One request alone: its first token comes after exactly one prefill pass, and each later token
  // one decode pass later.
  TraceRequest r;
  r.arrival_ms = 250;
  r.hash_ids = {1, 2};
  r.input_length = 1000;
  r.output_length = 5;
  std::vector<TraceRequest> trace = {r};
  auto rep = RunReplay(trace, SmallConfig(RoutingPolicy::kRoundRobin, 1));
  ASSERT_TRUE(rep.ok());
  EXPECT_DOUBLE_EQ(rep->ttft_ms.p50, MockerPrefillMs(1000));
  EXPECT_EQ(rep->itl_ms.count, 4u);
  EXPECT_GE(rep->itl_ms.p50, 1.0);  // the decode floor
  EXPECT_NEAR(rep->e2e_ms.p50, MockerPrefillMs(1000) + 4 * rep->itl_ms.mean, 1e-9);
  EXPECT_NEAR(rep->simulated_ms, rep->e2e_ms.p50, 1e-9);
  EXPECT_EQ(rep->output_tokens, 5u);

  // Under load, no first token can beat the prefill time of its uncached part.
  const auto busy = RandomTrace(400, 5, 3);
  auto many = RunReplay(busy, SmallConfig(RoutingPolicy::kKv, 3));
  ASSERT_TRUE(many.ok());
  EXPECT_EQ(many->completed, busy.size());
  EXPECT_GE(many->ttft_ms.p50, MockerPrefillMs(1));
  EXPECT_GT(many->ttft_ms.max, many->ttft_ms.p50);  // queueing happened
}

TEST(Replay, TtftNeverBelowItsOwnPrefill) {
  // Requests without ids share nothing, so each TTFT >= prefill of its whole prompt.
  std::vector<TraceRequest> trace;
  for (int i = 0; i < 50; ++i) trace.push_back(TraceRequest{i * 3.0, 600 + 37 * i, 3, {}});
  auto rep = RunReplay(trace, SmallConfig(RoutingPolicy::kRoundRobin, 2));
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->cached_tokens, 0u);
  EXPECT_GE(rep->ttft_ms.p50 + 1e-9, MockerPrefillMs(600));
  EXPECT_GE(rep->ttft_ms.max + 1e-9, MockerPrefillMs(600 + 37 * 49));
}

TEST(Replay, ThousandWorkersFinish) {
  const auto trace = RandomTrace(4000, 0.5, 11);
  ReplayConfig c = SmallConfig(RoutingPolicy::kKv, 1000);
  c.worker.num_blocks = 512;
  auto rep = RunReplay(trace, c);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->completed + rep->failed, trace.size());
  EXPECT_EQ(rep->failed, 0u);
  size_t used = 0;
  for (uint64_t n : rep->worker_requests) used += n > 0;
  EXPECT_GT(used, 100u);
  std::printf("1000 workers, %zu requests: wall %.2f s, hit rate %.3f\n", trace.size(), rep->wall_ms / 1000,
              rep->prefix_hit_rate);
}

TEST(Replay, RejectsBadConfigAndNames) {
  ReplayConfig c;
  c.num_workers = 0;
  EXPECT_FALSE(RunReplay({}, c).ok());
  EXPECT_FALSE(ParseRoutingPolicy("fastest").ok());
  EXPECT_EQ(*ParseRoutingPolicy("round_robin"), RoutingPolicy::kRoundRobin);
}

TEST(Replay, ReportFormats) {
  auto rep = RunReplay(TwoConversations(2), SmallConfig(RoutingPolicy::kKv, 2));
  ASSERT_TRUE(rep.ok());
  std::vector<ReplayReport> both = {*rep, *rep};
  const std::string table = FormatReports(both);
  EXPECT_NE(table.find("prefix hit rate"), std::string::npos);
  EXPECT_NE(ReportToJson(*rep).find("\"policy\":\"kv\""), std::string::npos);
  EXPECT_EQ(ReportsToJson(both).front(), '[');
}

}  // namespace
}  // namespace dyn::replay
