// The native engine's pipelined decode (NativeEngineOptions::pipelined_decode) on a fake model
// that pipelines sampling: the same outputs as synchronous steps, while most steps really are
// launched before the previous step's ids are back.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <thread>

#include "engine/native/sched/fake_model_for_test.h"
#include "engine/native/sched/native_engine.h"
#include "engine/native/sched/stream_for_test.h"

namespace dyn {
namespace {

using testing::PipelinedFakeModel;
using testing::Prompt;
using testing::Request;
using testing::Stream;

NativeEngineOptions Options(bool pipelined) {
  NativeEngineOptions o;
  o.block_size = 16;
  o.num_kv_blocks = 256;
  o.max_num_seqs = 8;
  o.max_num_batched_tokens = 64;
  o.pipelined_decode = pipelined;
  return o;
}

struct Engine {
  PipelinedFakeModel* model = nullptr;
  EnginePtr engine;
  explicit Engine(NativeEngineOptions o, int max_pos = 4096) {
    auto m = std::make_unique<PipelinedFakeModel>(64, max_pos);
    model = m.get();
    auto e = CreateNativeEngine(std::move(m), o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    engine = *e;
  }
  void Run(Stream& s, PreprocessedRequest r, const char* name = "r") {
    engine->Generate(std::move(r), std::make_shared<RequestContext>(name), s.Sink());
  }
};

// Greedy output of the fake model after `prompt`, up to n tokens or through the first stop id.
std::vector<uint32_t> Expected(const PipelinedFakeModel& m, const PreprocessedRequest& r) {
  std::vector<uint32_t> out = m.Greedy(r.token_ids, r.stop.max_tokens);
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::find(r.stop.stop_token_ids.begin(), r.stop.stop_token_ids.end(), out[i]) != r.stop.stop_token_ids.end()) {
      out.resize(i + 1);
      break;
    }
  }
  return out;
}

TEST(NativeEnginePipelinedTest, ConcurrentRequestsMatchGreedyWithMostStepsPipelined) {
  Engine e(Options(true));
  e.model->step_delay_us = 200;  // requests join while others decode: the pipeline drains and restarts
  const int kN = 12;
  std::vector<PreprocessedRequest> reqs;
  for (int i = 0; i < kN; ++i) {
    PreprocessedRequest r = Request(Prompt(7 + 11 * i % 41, 50 + i), 20 + 3 * i);
    if (i % 3 == 1) {  // a stop id met half way
      const std::vector<uint32_t> g = e.model->Greedy(r.token_ids, r.stop.max_tokens);
      r.stop.stop_token_ids = {g[g.size() / 2]};
    }
    if (i % 4 == 2 && i % 3 != 1) {
      // EOS (an id greedy never picks) is banned until 6 tokens are out: the host samples those rows
      const std::vector<uint32_t> g = e.model->Greedy(r.token_ids, r.stop.max_tokens);
      uint32_t eos = 0;
      while (std::find(g.begin(), g.end(), eos) != g.end()) ++eos;
      r.eos_token_ids = {eos};
      r.stop.min_tokens = 6;
    }
    reqs.push_back(r);
  }
  std::vector<Stream> streams(kN);
  for (int i = 0; i < kN; ++i) {
    e.Run(streams[i], reqs[i]);
    std::this_thread::sleep_for(std::chrono::milliseconds(i % 3));
  }
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(streams[i].Wait());
    const std::vector<uint32_t> want = Expected(*e.model, reqs[i]);
    EXPECT_EQ(streams[i].tokens, want) << "request " << i;
    EXPECT_EQ(streams[i].finish, want.size() < static_cast<size_t>(reqs[i].stop.max_tokens) ? FinishReason::kStop : FinishReason::kLength)
        << "request " << i;
    EXPECT_EQ(streams[i].deltas_after_finish, 0);
  }
  const EngineMetrics m = e.engine->Metrics();
  EXPECT_EQ(m.kv_blocks_used, 0);
  EXPECT_EQ(m.running, 0);
  EXPECT_GT(e.model->overlapped_steps.load(), 2 * e.model->sync_steps.load()) << e.model->sync_steps.load() << " synchronous steps";
}

// Blocks completed by pipelined steps enter the prefix cache under their real ids: a request whose
// prompt is an earlier request's prompt and output reuses those blocks.
TEST(NativeEnginePipelinedTest, GeneratedBlocksAreCachedUnderTheirRealIds) {
  Engine e(Options(true));
  PreprocessedRequest first = Request(Prompt(20, 7), 40);
  // As dyn bench sends it: min_tokens = max_tokens with ignore_eos, so nothing is banned and every
  // row stays on the device.
  first.stop.min_tokens = 40;
  first.stop.ignore_eos = true;
  first.eos_token_ids = {3};
  Stream a;
  e.Run(a, first);
  ASSERT_TRUE(a.Wait());
  ASSERT_EQ(a.tokens.size(), 40u);
  EXPECT_GT(e.model->overlapped_steps.load(), 30);
  EXPECT_EQ(e.engine->Metrics().pipelined_steps, static_cast<uint64_t>(e.model->overlapped_steps.load()));
  std::vector<uint32_t> prompt = first.token_ids;
  prompt.insert(prompt.end(), a.tokens.begin(), a.tokens.begin() + 32);  // 52 tokens: 3 full blocks
  PreprocessedRequest second = Request(prompt, 8);
  Stream b;
  e.Run(b, second);
  ASSERT_TRUE(b.Wait());
  EXPECT_EQ(b.cached_tokens, 48u);
  EXPECT_EQ(b.tokens, Expected(*e.model, second));
}

// Synchronous and pipelined engines give the same tokens to the same workload, and a request
// cancelled while steps are in flight frees its blocks.
TEST(NativeEnginePipelinedTest, SameTokensAsSynchronousStepsAndCancellationFreesBlocks) {
  auto workload = [](int i) {
    PreprocessedRequest r = Request(Prompt(9 + 5 * i, 200 + i), 30);
    r.sampling.temperature = i % 2 ? 0.9f : 0.0f;
    r.sampling.seed = 5 + i;
    return r;
  };
  std::vector<std::vector<uint32_t>> outs[2];
  for (bool pipelined : {false, true}) {
    Engine e(Options(pipelined));
    std::vector<Stream> s(4);
    for (int i = 0; i < 4; ++i) e.Run(s[i], workload(i));
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(s[i].Wait());
      outs[pipelined].push_back(s[i].tokens);
    }
    EXPECT_EQ(e.model->pipelined_steps.load() > 0, pipelined);
    // Cancellation while steps are in flight.
    e.model->step_delay_us = 500;
    Stream c;
    auto ctx = std::make_shared<RequestContext>("cancel");
    e.engine->Generate(Request(Prompt(30, 99), 1000), ctx, c.Sink());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ctx->Cancel();
    ASSERT_TRUE(c.Wait());
    EXPECT_EQ(c.finish, FinishReason::kCancelled);
    for (int i = 0; i < 100 && e.engine->Metrics().kv_blocks_used != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    EXPECT_EQ(e.engine->Metrics().kv_blocks_used, 0);
  }
  EXPECT_EQ(outs[1], outs[0]);
}

// Random arrivals, lengths, stop ids, min_tokens bans, penalised (host-sampled) rows and
// cancellations against a small pool (preemption): every stream ends once, with the greedy tokens
// (a prefix of them when cancelled), and every block comes back. The pipeline drains and restarts
// throughout; the scheduler's and engine's asserts hold (Debug and sanitizer builds).
TEST(NativeEnginePipelinedTest, RandomWorkloadEndsCleanly) {
  NativeEngineOptions o = Options(true);
  o.num_kv_blocks = 24;  // 384 tokens for up to 8 sequences: preemption under load
  Engine e(o);
  e.model->step_delay_us = 100;
  std::mt19937 rng(2026);
  const int kN = 40;
  std::vector<PreprocessedRequest> reqs;
  std::vector<Stream> streams(kN);
  std::vector<std::shared_ptr<RequestContext>> contexts;
  std::vector<bool> cancel(kN);
  for (int i = 0; i < kN; ++i) {
    PreprocessedRequest r = Request(Prompt(3 + static_cast<int>(rng() % 60), 1000 + i), 1 + static_cast<int>(rng() % 40));
    const std::vector<uint32_t> g = e.model->Greedy(r.token_ids, r.stop.max_tokens);
    switch (rng() % 5) {
      case 0: r.stop.stop_token_ids = {g[rng() % g.size()]}; break;
      case 1: {  // EOS banned until min_tokens: host rows first
        uint32_t eos = 0;
        while (std::find(g.begin(), g.end(), eos) != g.end()) ++eos;
        r.eos_token_ids = {eos};
        r.stop.min_tokens = static_cast<int>(rng() % 8);
        break;
      }
      case 2: r.sampling.repetition_penalty = 1.0f + 1e-6f; break;  // host-sampled rows (same argmax here)
      default: break;
    }
    cancel[i] = rng() % 6 == 0;
    reqs.push_back(r);
  }
  for (int i = 0; i < kN; ++i) {
    contexts.push_back(std::make_shared<RequestContext>("rand"));
    e.engine->Generate(reqs[i], contexts[i], streams[i].Sink());
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 1500));
    if (i >= 3 && cancel[i - 3]) contexts[i - 3]->Cancel();
  }
  for (int i = kN - 3; i < kN; ++i) {
    if (cancel[i]) contexts[i]->Cancel();
  }
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(streams[i].Wait()) << "request " << i;
    EXPECT_EQ(streams[i].deltas_after_finish, 0);
    const std::vector<uint32_t> want = Expected(*e.model, reqs[i]);
    if (*streams[i].finish == FinishReason::kCancelled) {
      EXPECT_TRUE(cancel[i]) << "request " << i;
      ASSERT_LE(streams[i].tokens.size(), want.size());
      EXPECT_TRUE(std::equal(streams[i].tokens.begin(), streams[i].tokens.end(), want.begin())) << "request " << i;
    } else {
      EXPECT_EQ(streams[i].tokens, want) << "request " << i;
    }
  }
  EXPECT_TRUE(testing::Eventually([&] { return e.engine->Metrics().kv_blocks_used == 0; }));
  EXPECT_GT(e.model->overlapped_steps.load(), 0);
}

}  // namespace
}  // namespace dyn
