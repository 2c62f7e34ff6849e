// The replay in disaggregated mode: prefill pool + decode pool, conditional disaggregation, KV
// transfer time on the virtual clock, goodput.
#include <gtest/gtest.h>

#include <cstdio>

#include "replay/replay.h"

namespace dyn::replay {
namespace {

using workload::TraceRequest;

// n requests of `prompt` unique tokens and `output` tokens, one every gap_ms.
std::vector<TraceRequest> Uniform(size_t n, int prompt, int output, double gap_ms) {
  std::vector<TraceRequest> trace;
  for (size_t i = 0; i < n; ++i) trace.push_back(TraceRequest{gap_ms * static_cast<double>(i), prompt, output, {}});
  return trace;
}

ReplayConfig Disagg(int prefill, int decode, RoutingPolicy policy = RoutingPolicy::kKv) {
  ReplayConfig c;
  c.policy = policy;
  c.num_workers = decode;
  c.num_prefill_workers = prefill;
  c.worker.num_blocks = 4096;
  return c;
}

TEST(ReplayDisagg, LongPromptsArePrefilledRemotelyAndTheirKvMoved) {
  const auto trace = Uniform(20, 2000, 10, 200);
  auto rep = RunReplay(trace, Disagg(1, 1));
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->policy, "kv 1P+1D");
  EXPECT_EQ(rep->completed, 20u);
  EXPECT_EQ(rep->failed, 0u);
  EXPECT_EQ(rep->remote_prefills, 20u);
  EXPECT_EQ(rep->local_prefills, 0u);
  EXPECT_EQ(rep->kv_transfers, 20u);
  // 2000 tokens: 32 blocks of 64 tokens, 128 KiB per token.
  const uint64_t per_request = 32ull * 64 * 131072;
  EXPECT_EQ(rep->kv_transfer_bytes, 20 * per_request);
  EXPECT_NEAR(rep->kv_transfer_ms.p50, per_request / 25e6, 1e-9);
  EXPECT_EQ(rep->output_tokens, 200u);
  EXPECT_EQ(rep->ttft_ms.count, 20u);
  EXPECT_EQ(rep->itl_ms.count, 20u * 9);
  // Each worker saw each request once: the prefill worker is the second.
  ASSERT_EQ(rep->worker_requests.size(), 2u);
  EXPECT_EQ(rep->worker_requests[0], 20u);
  EXPECT_EQ(rep->worker_requests[1], 20u);
  // The first decode gap includes the transfer (~84 ms) on top of a decode pass.
  EXPECT_GT(rep->itl_ms.max, rep->kv_transfer_ms.p50);
}

TEST(ReplayDisagg, ShortPromptsStayOnTheDecodeWorker) {
  const auto trace = Uniform(20, 300, 10, 200);
  auto rep = RunReplay(trace, Disagg(1, 1));
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->local_prefills, 20u);
  EXPECT_EQ(rep->remote_prefills, 0u);
  EXPECT_EQ(rep->kv_transfers, 0u);
  EXPECT_EQ(rep->worker_requests[1], 0u);  // the prefill worker idled
  // max_local_prefill_tokens 0: everything goes remote.
  ReplayConfig c = Disagg(1, 1);
  c.max_local_prefill_tokens = 0;
  rep = RunReplay(trace, c);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->remote_prefills, 20u);
  EXPECT_EQ(rep->completed, 20u);
}

TEST(ReplayDisagg, PrefixHeldByTheDecodeWorkerMakesThePrefillLocal) {
  // Request 1 extends request 0's 2048-token prompt (4 hash ids of 512 tokens) by 300 tokens.
  std::vector<TraceRequest> trace = {
      TraceRequest{0, 2048, 4, {1, 2, 3, 4}},
      TraceRequest{5000, 2348, 4, {1, 2, 3, 4, 5}},
  };
  auto rep = RunReplay(trace, Disagg(1, 1));
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->remote_prefills, 1u);
  EXPECT_EQ(rep->local_prefills, 1u);  // 300 uncached tokens on the decode worker
  EXPECT_EQ(rep->cached_tokens, 2048u);
  EXPECT_EQ(rep->kv_transfers, 1u);
  // Without kv routing the frontend cannot see the decode worker's cache: both go remote, and the
  // second import reuses the decode worker's blocks (only the new 300 tokens move: 5 blocks).
  rep = RunReplay(trace, Disagg(1, 1, RoutingPolicy::kRoundRobin));
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->remote_prefills, 2u);
  EXPECT_EQ(rep->kv_transfers, 2u);
  EXPECT_EQ(rep->kv_transfer_bytes, (32ull + 5) * 64 * 131072);
}

TEST(ReplayDisagg, DeterministicAndTransferTimeScalesWithInverseBandwidth) {
  MixedTraffic mix;
  mix.requests = 200;
  mix.rate = 4;
  mix.long_prompt_min = 2000;
  mix.long_prompt_max = 6000;
  mix.short_output_min = 50;
  mix.short_output_max = 150;
  const auto trace = MixedTrafficTrace(mix);
  ASSERT_EQ(trace.size(), 200u);
  EXPECT_EQ(MixedTrafficTrace(mix)[137].input_length, trace[137].input_length);

  ReplayConfig c = Disagg(2, 2);
  auto a = RunReplay(trace, c);
  auto b = RunReplay(trace, c);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(ReportToJson(*a).substr(0, ReportToJson(*a).find("\"wall_s\"")),
            ReportToJson(*b).substr(0, ReportToJson(*b).find("\"wall_s\"")));
  EXPECT_EQ(a->request_worker, b->request_worker);
  EXPECT_EQ(a->completed, 200u);
  EXPECT_EQ(a->remote_prefills + a->local_prefills, 200u);
  EXPECT_GT(a->remote_prefills, 20u);
  EXPECT_GT(a->local_prefills, 100u);

  c.worker.kv_transfer_gbps = 5;  // a fifth of the default
  auto slow = RunReplay(trace, c);
  ASSERT_TRUE(slow.ok());
  EXPECT_EQ(slow->kv_transfer_bytes, a->kv_transfer_bytes);
  EXPECT_NEAR(slow->kv_transfer_ms.p50, 5 * a->kv_transfer_ms.p50, 1e-6);
  EXPECT_NEAR(slow->kv_transfer_ms.max, 5 * a->kv_transfer_ms.max, 1e-6);
  EXPECT_GT(slow->e2e_ms.mean, a->e2e_ms.mean);
  c.worker.kv_transfer_latency_ms = 10;
  auto latent = RunReplay(trace, c);
  ASSERT_TRUE(latent.ok());
  EXPECT_NEAR(latent->kv_transfer_ms.max, slow->kv_transfer_ms.max + 10, 1e-6);
}

TEST(ReplayDisagg, SameTokensAsAggregatedAndGoodputTargets) {
  MixedTraffic mix;
  mix.requests = 150;
  mix.rate = 3;
  mix.long_prompt_min = 4000;
  mix.long_prompt_max = 8000;
  mix.short_output_min = 100;
  mix.short_output_max = 200;
  const auto trace = MixedTrafficTrace(mix);
  ReplayConfig agg = Disagg(0, 2);
  agg.ttft_target_ms = 1e9;
  agg.itl_target_ms = 1e9;
  ReplayConfig dis = Disagg(1, 1);
  dis.ttft_target_ms = 1e9;
  dis.itl_target_ms = 1e9;
  auto ra = RunReplay(trace, agg);
  auto rd = RunReplay(trace, dis);
  ASSERT_TRUE(ra.ok() && rd.ok());
  EXPECT_EQ(ra->completed, trace.size());
  EXPECT_EQ(rd->completed, trace.size());
  EXPECT_EQ(ra->output_tokens, rd->output_tokens);
  EXPECT_EQ(ra->prompt_tokens, rd->prompt_tokens);
  EXPECT_EQ(ra->remote_prefills + ra->local_prefills + ra->kv_transfers, 0u);
  // Unbounded targets: every request is good.
  EXPECT_EQ(ra->good_requests, trace.size());
  EXPECT_EQ(rd->good_requests, trace.size());
  EXPECT_NEAR(rd->goodput_rps, trace.size() / (rd->simulated_ms / 1000), 1e-9);
  EXPECT_NEAR(rd->goodput_tokens_per_s, rd->output_tokens_per_s, 1e-9);

  // A TTFT target below any prefill (16.5 ms minimum) admits nothing.
  dis.ttft_target_ms = 10;
  auto none = RunReplay(trace, dis);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->good_requests, 0u);
  EXPECT_EQ(none->goodput_rps, 0.0);

  // With every prompt prefilled remotely the decode worker runs decode passes only: its longest
  // gap is a transfer (<= 125 blocks of 8 MiB at 25 GB/s, 42 ms) plus two passes, shorter than the
  // stall an aggregated worker's long prefill pass (>= 4000 tokens: 84 ms) causes.
  ReplayConfig remote = Disagg(1, 1);
  remote.max_local_prefill_tokens = 0;
  auto rr = RunReplay(trace, remote);
  ASSERT_TRUE(rr.ok());
  std::printf("ITL p99 / max: aggregated 2 workers %.1f / %.1f ms, 1P+1D %.1f / %.1f ms, 1P+1D all remote %.1f / %.1f ms\n",
              ra->itl_ms.p99, ra->itl_ms.max, rd->itl_ms.p99, rd->itl_ms.max, rr->itl_ms.p99, rr->itl_ms.max);
  EXPECT_EQ(rr->remote_prefills, trace.size());
  EXPECT_GE(ra->itl_ms.max, MockerPrefillMs(mix.long_prompt_min));
  EXPECT_LT(rr->itl_ms.max, MockerPrefillMs(mix.long_prompt_min));
  EXPECT_LT(rr->itl_ms.p90, 2 * MockerDecodeMs(0));
  // p99 per-request ITL is at least the mean per-request ITL, so it admits no more requests.
  dis.ttft_target_ms = 0;
  dis.itl_target_ms = 30;
  auto mean = RunReplay(trace, dis);
  dis.itl_target_p99 = true;
  auto p99 = RunReplay(trace, dis);
  ASSERT_TRUE(mean.ok() && p99.ok());
  EXPECT_LE(p99->good_requests, mean->good_requests);
  EXPECT_GT(mean->good_requests, 0u);
}

TEST(ReplayDisagg, RejectsBadConfig) {
  ReplayConfig c = Disagg(-1, 1);
  EXPECT_FALSE(ValidateReplayConfig(c).ok());
  c = Disagg(1, 0);
  EXPECT_FALSE(ValidateReplayConfig(c).ok());
  c = Disagg(1, 1);
  c.ttft_target_ms = -1;
  EXPECT_FALSE(ValidateReplayConfig(c).ok());
  c = Disagg(1, 1);
  c.worker.kv_transfer_gbps = 0;
  EXPECT_FALSE(ValidateReplayConfig(c).ok());
}

}  // namespace
}  // namespace dyn::replay
