#include "engine/native/sched/native_engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "engine/native/sched/fake_model_for_test.h"
#include "engine/native/sched/stream_for_test.h"

namespace dyn {
namespace {

using testing::FakeModel;
using namespace std::chrono_literals;

using testing::Prompt;
using testing::Request;
using testing::Stream;

struct Fixture {
  FakeModel* model = nullptr;
  EnginePtr engine;
  Fixture(NativeEngineOptions opt, int vocab = 64, int max_pos = 4096) {
    auto m = std::make_unique<FakeModel>(vocab, max_pos);
    model = m.get();
    auto e = CreateNativeEngine(std::move(m), opt);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    engine = *e;
  }
  void Run(Stream& s, PreprocessedRequest r) {
    engine->Generate(std::move(r), std::make_shared<RequestContext>("r"), s.Sink());
  }
};

NativeEngineOptions SmallOptions() {
  NativeEngineOptions o;
  o.block_size = 16;
  o.num_kv_blocks = 256;
  o.max_num_seqs = 8;
  o.max_num_batched_tokens = 64;
  return o;
}

TEST(NativeEngineTest, ConcurrentRequestsMatchSoloOutputs) {
  Fixture f(SmallOptions());
  f.model->step_delay_us = 300;  // let requests arrive while the first steps run
  const int kN = 24;
  std::vector<Stream> streams(kN);
  std::vector<PreprocessedRequest> reqs;
  for (int i = 0; i < kN; ++i) reqs.push_back(Request(Prompt(5 + 13 * i % 97, i + 1), 10 + i % 7));
  for (int i = 0; i < kN; ++i) f.Run(streams[i], reqs[i]);
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(streams[i].Wait());
    EXPECT_EQ(streams[i].finish, FinishReason::kLength);
    EXPECT_EQ(streams[i].tokens, f.model->Greedy(reqs[i].token_ids, reqs[i].stop.max_tokens)) << "request " << i;
    EXPECT_EQ(streams[i].deltas, reqs[i].stop.max_tokens);  // one token per delta
    EXPECT_EQ(streams[i].deltas_after_finish, 0);
    EXPECT_EQ(streams[i].prompt_tokens, reqs[i].token_ids.size());
  }
  EXPECT_GT(f.model->max_batch_seqs.load(), 1);  // they really were batched
  EngineMetrics m = f.engine->Metrics();
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.waiting, 0);
  EXPECT_EQ(m.kv_blocks_used, 0);
  EXPECT_EQ(m.kv_blocks_total, 256);
  EXPECT_GT(m.steps, 0u);
  uint64_t gen = 0;
  for (auto& r : reqs) gen += r.stop.max_tokens;
  EXPECT_EQ(m.generated_tokens, gen);
}

TEST(NativeEngineTest, SeededSamplingIsTheSameAloneAndBatched) {
  Fixture f(SmallOptions());
  auto seeded = [](int i) {
    PreprocessedRequest r = Request(Prompt(20, 100 + i), 12);
    r.sampling.temperature = 1.0f;
    r.sampling.top_p = 0.9f;
    r.sampling.seed = 42 + i;
    return r;
  };
  std::vector<Stream> batched(6);
  for (int i = 0; i < 6; ++i) f.Run(batched[i], seeded(i));
  for (auto& s : batched) ASSERT_TRUE(s.Wait());
  for (int i = 0; i < 6; ++i) {
    Stream solo;
    f.Run(solo, seeded(i));
    ASSERT_TRUE(solo.Wait());
    EXPECT_EQ(solo.tokens, batched[i].tokens);
  }
}

// Sampling a step's rows on several threads gives every request the tokens (and logprobs) of
// sampling them one by one: top-k/top-p, penalties, min_tokens bans and logprobs, 16 at once.
TEST(NativeEngineTest, ParallelHostSamplingEqualsSerial) {
  auto seeded = [](int i) {
    PreprocessedRequest r = Request(Prompt(10 + i, 300 + i), 16);
    r.sampling.temperature = 0.7f + 0.1f * (i % 4);
    r.sampling.top_p = i % 3 ? 0.9f : 1.0f;
    r.sampling.top_k = i % 2 ? 50 : 0;
    r.sampling.repetition_penalty = i % 5 == 0 ? 1.3f : 1.0f;
    r.sampling.logprobs = i % 4 == 1;
    r.sampling.top_logprobs = i % 4 == 1 ? 3 : 0;
    r.stop.min_tokens = i % 6 == 0 ? 5 : 0;
    r.sampling.seed = 900 + i;
    return r;
  };
  auto run = [&](int threads) {
    NativeEngineOptions o = SmallOptions();
    o.max_num_seqs = 16;
    o.sampling_threads = threads;
    Fixture f(o, /*vocab=*/4096);
    f.model->step_delay_us = 200;  // all 16 arrive before the first steps end
    std::vector<Stream> streams(16);
    for (int i = 0; i < 16; ++i) f.Run(streams[i], seeded(i));
    for (auto& s : streams) EXPECT_TRUE(s.Wait());
    return streams;
  };
  const std::vector<Stream> serial = run(1), parallel = run(4);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(parallel[i].tokens, serial[i].tokens) << "request " << i;
    ASSERT_EQ(parallel[i].logprobs.size(), serial[i].logprobs.size()) << "request " << i;
    for (size_t t = 0; t < serial[i].logprobs.size(); ++t) {
      EXPECT_EQ(parallel[i].logprobs[t].token, serial[i].logprobs[t].token);
      EXPECT_EQ(parallel[i].logprobs[t].logprob, serial[i].logprobs[t].logprob);
      EXPECT_EQ(parallel[i].logprobs[t].top.size(), serial[i].logprobs[t].top.size());
    }
    if (i % 4 == 1) {
      EXPECT_EQ(serial[i].logprobs.size(), 16u) << "request " << i;
    }
  }
}

TEST(NativeEngineTest, PrefixCachingComputesOnlyTheSuffix) {
  Fixture f(SmallOptions());
  auto a = Prompt(100, 7);
  Stream sa;
  f.Run(sa, Request(a, 4));
  ASSERT_TRUE(sa.Wait());
  EXPECT_EQ(sa.cached_tokens, 0u);
  auto b = std::vector<uint32_t>(a.begin(), a.begin() + 96);
  for (uint32_t t : Prompt(10, 8)) b.push_back(t);
  const uint64_t before = f.model->computed_tokens;
  Stream sb;
  f.Run(sb, Request(b, 5));
  ASSERT_TRUE(sb.Wait());
  EXPECT_EQ(sb.cached_tokens, 96u);
  EXPECT_EQ(sb.prompt_tokens, 106u);
  EXPECT_EQ(f.model->computed_tokens - before, 10u + 4u);  // suffix, then 4 decode steps
  EXPECT_EQ(sb.tokens, f.model->Greedy(b, 5));
  EngineMetrics m = f.engine->Metrics();
  EXPECT_EQ(m.cached_prompt_tokens, 96u);
  EXPECT_EQ(m.prompt_tokens, 206u);
  EXPECT_GT(m.kv_blocks_cached, 0);
}

TEST(NativeEngineTest, CancellationEndsTheStreamAndFreesBlocks) {
  Fixture f(SmallOptions());
  f.model->step_delay_us = 2000;
  Stream s;
  auto ctx = std::make_shared<RequestContext>("c");
  f.engine->Generate(Request(Prompt(40, 3), 100000), ctx, s.Sink());
  for (int i = 0; i < 2000; ++i) {
    {
      std::lock_guard lock(s.mu);
      if (s.tokens.size() >= 3) break;
    }
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_GT(f.engine->Metrics().kv_blocks_used, 0);
  ctx->Cancel();
  ASSERT_TRUE(s.Wait());
  EXPECT_EQ(s.finish, FinishReason::kCancelled);
  for (int i = 0; i < 1000 && f.engine->Metrics().kv_blocks_used != 0; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(f.engine->Metrics().kv_blocks_used, 0);
  EXPECT_EQ(f.engine->Metrics().running, 0);
  // A request cancelled before it is admitted ends at once.
  Stream early;
  auto ctx2 = std::make_shared<RequestContext>("d");
  ctx2->Cancel();
  f.engine->Generate(Request(Prompt(10, 4), 5), ctx2, early.Sink());
  ASSERT_TRUE(early.Wait());
  EXPECT_EQ(early.finish, FinishReason::kCancelled);
  EXPECT_TRUE(early.tokens.empty());
}

TEST(NativeEngineTest, PreemptionUnderATinyPoolKeepsOutputsIdentical) {
  NativeEngineOptions o;
  o.block_size = 4;
  o.num_kv_blocks = 10;  // 40 tokens of KV for 6 requests of up to 28 tokens each
  o.max_num_seqs = 6;
  o.max_num_batched_tokens = 32;
  Fixture f(o);
  std::vector<Stream> streams(6);
  std::vector<PreprocessedRequest> reqs;
  for (int i = 0; i < 6; ++i) reqs.push_back(Request(Prompt(8 + i, 50 + i), 20 - i));
  for (int i = 0; i < 6; ++i) f.Run(streams[i], reqs[i]);
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(streams[i].Wait());
    EXPECT_EQ(streams[i].finish, FinishReason::kLength);
    EXPECT_EQ(streams[i].tokens, f.model->Greedy(reqs[i].token_ids, reqs[i].stop.max_tokens)) << "request " << i;
  }
  EXPECT_GT(f.engine->Metrics().preemptions, 0u);
  EXPECT_EQ(f.engine->Metrics().kv_blocks_used, 0);
}

TEST(NativeEngineTest, StopConditions) {
  Fixture f(SmallOptions());
  auto prompt = Prompt(12, 9);
  const auto greedy = f.model->Greedy(prompt, 30);
  // EOS: the 5th greedy token (choose one that does not occur earlier).
  size_t k = 4;
  while (std::find(greedy.begin(), greedy.begin() + k, greedy[k]) != greedy.begin() + k) ++k;
  {
    Stream s;
    auto r = Request(prompt, 30);
    r.eos_token_ids = {greedy[k]};
    f.Run(s, r);
    ASSERT_TRUE(s.Wait());
    EXPECT_EQ(s.finish, FinishReason::kStop);
    EXPECT_EQ(s.tokens, std::vector<uint32_t>(greedy.begin(), greedy.begin() + k + 1));
  }
  {
    Stream s;
    auto r = Request(prompt, 30);
    r.eos_token_ids = {greedy[k]};
    r.stop.ignore_eos = true;
    f.Run(s, r);
    ASSERT_TRUE(s.Wait());
    EXPECT_EQ(s.finish, FinishReason::kLength);
    EXPECT_EQ(s.tokens, greedy);
  }
  {
    Stream s;
    auto r = Request(prompt, 30);
    r.stop.stop_token_ids = {greedy[k]};
    r.stop.ignore_eos = true;  // stop ids still apply
    f.Run(s, r);
    ASSERT_TRUE(s.Wait());
    EXPECT_EQ(s.finish, FinishReason::kStop);
    EXPECT_EQ(s.tokens.size(), k + 1);
  }
  {
    // min_tokens: the stop id is masked until min_tokens tokens exist.
    Stream s;
    auto r = Request(prompt, 30);
    r.stop.stop_token_ids = {greedy[k]};
    r.stop.min_tokens = static_cast<int>(k) + 3;
    f.Run(s, r);
    ASSERT_TRUE(s.Wait());
    ASSERT_GE(s.tokens.size(), k + 3);
    for (size_t i = 0; i + 1 < k + 3; ++i) EXPECT_NE(s.tokens[i], greedy[k]);
    EXPECT_EQ(std::vector<uint32_t>(s.tokens.begin(), s.tokens.begin() + k), std::vector<uint32_t>(greedy.begin(), greedy.begin() + k));
  }
}

TEST(NativeEngineTest, ContextLengthEndsWithLengthAndLongPromptsAreRejected) {
  Fixture f(SmallOptions(), 64, /*max_pos=*/40);
  Stream s;
  f.Run(s, Request(Prompt(30, 1), 100));
  ASSERT_TRUE(s.Wait());
  EXPECT_EQ(s.finish, FinishReason::kLength);
  EXPECT_EQ(s.tokens.size(), 10u);
  Stream full;
  f.Run(full, Request(Prompt(40, 1), 100));
  ASSERT_TRUE(full.Wait());
  EXPECT_EQ(full.tokens.size(), 1u);
  Stream too_long;
  f.Run(too_long, Request(Prompt(41, 1), 100));
  ASSERT_TRUE(too_long.Wait());
  EXPECT_EQ(too_long.finish, FinishReason::kError);
  EXPECT_NE(too_long.error.find("context length"), std::string::npos) << too_long.error;
  EXPECT_EQ(too_long.deltas, 1);
}

TEST(NativeEngineTest, InvalidRequestsEndWithOneErrorDelta) {
  Fixture f(SmallOptions());
  auto expect_error = [&](PreprocessedRequest r, const std::string& needle) {
    Stream s;
    f.Run(s, std::move(r));
    ASSERT_TRUE(s.Wait());
    EXPECT_EQ(s.finish, FinishReason::kError);
    EXPECT_EQ(s.deltas, 1);
    EXPECT_TRUE(s.tokens.empty());
    EXPECT_NE(s.error.find(needle), std::string::npos) << s.error;
  };
  expect_error(Request({}, 5), "empty");
  expect_error(Request({1, 2, 64}, 5), "out of range");
  expect_error(Request({1, 2}, 0), "max_tokens");
  auto bad = Request({1, 2}, 5);
  bad.sampling.top_p = 0;
  expect_error(bad, "top_p");
}

TEST(NativeEngineTest, LogprobsAreReturnedPerToken) {
  Fixture f(SmallOptions());
  Stream s;
  auto r = Request(Prompt(10, 2), 6);
  r.sampling.logprobs = true;
  r.sampling.top_logprobs = 3;
  f.Run(s, r);
  ASSERT_TRUE(s.Wait());
  ASSERT_EQ(s.logprobs.size(), s.tokens.size());
  for (size_t i = 0; i < s.tokens.size(); ++i) {
    EXPECT_EQ(s.logprobs[i].token, s.tokens[i]);
    ASSERT_EQ(s.logprobs[i].top.size(), 3u);
    EXPECT_EQ(s.logprobs[i].top[0].token, s.tokens[i]);  // greedy picks the best
    EXPECT_LE(s.logprobs[i].logprob, 0.0f);
  }
}

TEST(NativeEngineTest, ShutdownCancelsOpenStreams) {
  Fixture f(SmallOptions());
  f.model->step_delay_us = 1000;
  std::vector<Stream> streams(4);
  for (int i = 0; i < 4; ++i) f.Run(streams[i], Request(Prompt(10, i), 100000));
  std::this_thread::sleep_for(20ms);
  f.engine->Shutdown();
  for (auto& s : streams) {
    ASSERT_TRUE(s.Wait(1s));
    EXPECT_EQ(s.finish, FinishReason::kCancelled);
  }
  f.engine->Shutdown();  // idempotent
  Stream late;
  f.Run(late, Request(Prompt(10, 1), 5));
  ASSERT_TRUE(late.Wait(1s));
  EXPECT_EQ(late.finish, FinishReason::kError);
}

TEST(NativeEngineTest, PoolIsSizedFromKvCacheBytes) {
  NativeEngineOptions o;
  o.kv_cache_bytes = 1024 * 16 * 10 + 5;  // FakeModel: 1 KiB per token -> 10 blocks of 16
  Fixture f(o);
  EXPECT_EQ(f.engine->Metrics().kv_blocks_total, 10);
  o.kv_cache_bytes = 100;
  auto e = CreateNativeEngine(std::make_unique<FakeModel>(), o);
  EXPECT_FALSE(e.ok());
}

// A FakeModel that "samples on the device": ForwardSample records what the engine asked for and
// returns the argmax of each row (the draw itself is the backend's, tested in cuda_backend_test).
class DeviceSamplingFakeModel : public FakeModel {
 public:
  explicit DeviceSamplingFakeModel(bool truncates) : truncates_(truncates) {}
  bool samples_on_device() const override { return true; }
  bool samples_truncated_on_device() const override { return truncates_; }
  Status ForwardSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling, uint32_t* tokens,
                       float* host_logits) override {
    std::vector<float> logits(sampling.size() * config().vocab_size);
    DYN_RETURN_IF_ERROR(Forward(batch, logits.data()));
    std::lock_guard<std::mutex> lock(mu);
    seen.insert(seen.end(), sampling.begin(), sampling.end());
    return ArgmaxOrCopy(logits, sampling, tokens, host_logits);
  }
  std::mutex mu;
  std::vector<DeviceSampling> seen;

 private:
  bool truncates_;
};

// Top-k / top-p / min-p requests sample on a device that truncates (the cut reaches it) and on the
// host where it does not; penalties always sample on the host.
TEST(NativeEngineTest, TruncatedSamplingGoesToADeviceThatTruncates) {
  for (bool truncates : {true, false}) {
    auto m = std::make_unique<DeviceSamplingFakeModel>(truncates);
    DeviceSamplingFakeModel* model = m.get();
    auto e = CreateNativeEngine(std::move(m), SmallOptions());
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    PreprocessedRequest r = Request(Prompt(12, 7), 3);
    r.sampling.temperature = 0.8f;
    r.sampling.top_k = 20;
    r.sampling.top_p = 0.9f;
    r.sampling.min_p = 0.05f;
    Stream s;
    (*e)->Generate(r, std::make_shared<RequestContext>("cut"), s.Sink());
    ASSERT_TRUE(s.Wait());
    EXPECT_EQ(s.tokens.size(), 3u);
    {
      std::lock_guard<std::mutex> lock(model->mu);
      if (truncates) {
        ASSERT_EQ(model->seen.size(), 3u);
        for (const DeviceSampling& d : model->seen) {
          EXPECT_EQ(d.temperature, 0.8f);
          EXPECT_EQ(d.cut.top_k, 20);
          EXPECT_EQ(d.cut.top_p, 0.9f);
          EXPECT_EQ(d.cut.min_p, 0.05f);
          EXPECT_GE(d.uniform, 0.0f);
          EXPECT_LT(d.uniform, 1.0f);
        }
      } else {
        EXPECT_TRUE(model->seen.empty()) << "a device that does not truncate was asked to";
      }
      model->seen.clear();
    }
    PreprocessedRequest pen = Request(Prompt(12, 8), 2);
    pen.sampling.temperature = 0.8f;
    pen.sampling.repetition_penalty = 1.2f;
    Stream s2;
    (*e)->Generate(pen, std::make_shared<RequestContext>("pen"), s2.Sink());
    ASSERT_TRUE(s2.Wait());
    std::lock_guard<std::mutex> lock(model->mu);
    for (const DeviceSampling& d : model->seen) EXPECT_TRUE(d.on_host) << "penalties are applied by the host sampler";
  }
}

// A step that mixes device rows and host rows (a repetition penalty) samples each where it can:
// the host rows' logits come back and their tokens are those of host sampling, with the same seed.
TEST(NativeEngineTest, MixedStepsSampleEachRowWhereItCan) {
  auto penalised = [] {
    PreprocessedRequest r = Request(Prompt(16, 21), 12);
    r.sampling.temperature = 0.9f;
    r.sampling.repetition_penalty = 1.3f;
    r.sampling.seed = 77;
    return r;
  };
  // The reference: a model that never samples on a device.
  Fixture host_only(SmallOptions());
  Stream want;
  host_only.Run(want, penalised());
  ASSERT_TRUE(want.Wait());

  auto m = std::make_unique<DeviceSamplingFakeModel>(true);
  DeviceSamplingFakeModel* model = m.get();
  model->step_delay_us = 300;  // keep both requests in the same steps
  auto e = CreateNativeEngine(std::move(m), SmallOptions());
  ASSERT_TRUE(e.ok());
  PreprocessedRequest plain = Request(Prompt(16, 22), 40);  // outlasts the other: their steps mix
  plain.sampling.temperature = 0.8f;
  plain.sampling.top_p = 0.9f;
  Stream a, b;
  (*e)->Generate(plain, std::make_shared<RequestContext>("plain"), a.Sink());
  (*e)->Generate(penalised(), std::make_shared<RequestContext>("pen"), b.Sink());
  ASSERT_TRUE(a.Wait());
  ASSERT_TRUE(b.Wait());
  EXPECT_EQ(b.tokens, want.tokens) << "the host row's draws";
  std::lock_guard<std::mutex> lock(model->mu);
  int host = 0, device = 0;
  for (const DeviceSampling& d : model->seen) (d.on_host ? host : device) += 1;
  EXPECT_EQ(device, 40);
  // A step in which the penalised request ran alone went through Forward, not counted here.
  EXPECT_GE(host, 10);
  EXPECT_LE(host, 12);
}

}  // namespace
}  // namespace dyn
