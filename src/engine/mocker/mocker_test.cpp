#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>

#include "engine/mocker/mocker_core.h"
#include "engine/mocker/mocker_engine.h"

namespace dyn {
namespace {

std::vector<uint32_t> Prompt(int n, uint32_t base = 1) {
  std::vector<uint32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), base);
  return p;
}

MockerRequest Req(uint64_t id, std::vector<uint32_t> prompt, int max_tokens, uint64_t seed = 0) {
  MockerRequest r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.seed = seed ? seed : id * 7919;
  return r;
}

// Runs the core until every request is done; returns each request's tokens.
std::map<uint64_t, std::vector<uint32_t>> Drain(MockerCore& core, int max_steps = 10000) {
  std::map<uint64_t, std::vector<uint32_t>> out;
  for (int i = 0; i < max_steps && core.has_unfinished(); ++i) {
    MockerStepResult r = core.Step();
    for (const MockerToken& t : r.tokens) out[t.id].push_back(t.token);
  }
  EXPECT_FALSE(core.has_unfinished());
  return out;
}

TEST(MockerTimingTest, HandComputedValues) {
  EXPECT_EQ(MockerPrefillMs(0), 0.0);
  EXPECT_EQ(MockerPrefillMs(-5), 0.0);
  // 4.209989e-7*T^2 + 1.518344e-2*T + 16.50142
  EXPECT_NEAR(MockerPrefillMs(1), 16.5166038609989, 1e-9);
  EXPECT_NEAR(MockerPrefillMs(1000), 0.4209989 + 15.18344 + 16.50142, 1e-9);  // 32.1058589
  EXPECT_NEAR(MockerPrefillMs(8192), 169.1369184042496, 1e-9);
  // max(1, -25.74*u^2 + 54.01*u + 5.74)
  EXPECT_NEAR(MockerDecodeMs(0), 5.74, 1e-12);
  EXPECT_NEAR(MockerDecodeMs(0.25), -1.60875 + 13.5025 + 5.74, 1e-12);  // 17.63375
  EXPECT_NEAR(MockerDecodeMs(0.5), 26.31, 1e-12);
  EXPECT_NEAR(MockerDecodeMs(1), 34.01, 1e-12);
  EXPECT_EQ(MockerDecodeMs(-1), 1.0);  // the floor: -25.74 - 54.01 + 5.74 < 1
}

TEST(MockerCoreTest, DefaultsAreDynamos) {
  MockerConfig c;
  EXPECT_EQ(c.block_size, 64);
  EXPECT_EQ(c.num_blocks, 16384);
  EXPECT_EQ(c.max_num_seqs, 256);
  EXPECT_EQ(c.max_num_batched_tokens, 8192);
  EXPECT_TRUE(c.enable_prefix_caching);
  EXPECT_TRUE(ValidateMockerConfig(c).ok());
  c.block_size = 0;
  EXPECT_FALSE(ValidateMockerConfig(c).ok());
}

TEST(MockerCoreTest, PassDurationsPrefillDecodeAndSum) {
  MockerConfig c;
  c.num_blocks = 100;
  c.block_size = 4;
  MockerCore core(c);
  ASSERT_TRUE(core.Add(Req(1, Prompt(10), 5)).ok());
  MockerStepResult s1 = core.Step();
  EXPECT_EQ(s1.prefill_tokens, 10);
  EXPECT_EQ(s1.decode_tokens, 0);
  EXPECT_EQ(s1.decode_ms, 0.0);
  EXPECT_DOUBLE_EQ(s1.duration_ms, MockerPrefillMs(10));
  ASSERT_EQ(s1.tokens.size(), 1u);
  EXPECT_TRUE(s1.tokens[0].first);
  EXPECT_EQ(s1.tokens[0].prompt_tokens, 10);

  // Request 1 decodes while request 2 prefills: the pass costs the sum.
  ASSERT_TRUE(core.Add(Req(2, Prompt(20, 100), 3)).ok());
  MockerStepResult s2 = core.Step();
  EXPECT_EQ(s2.prefill_tokens, 20);
  EXPECT_EQ(s2.decode_tokens, 1);
  // Blocks after scheduling: request 1 holds 11 tokens (3 blocks), request 2 holds 20 (5 blocks).
  EXPECT_DOUBLE_EQ(s2.kv_usage, 8.0 / 100);
  EXPECT_DOUBLE_EQ(s2.prefill_ms, MockerPrefillMs(20));
  EXPECT_DOUBLE_EQ(s2.decode_ms, MockerDecodeMs(0.08));
  EXPECT_DOUBLE_EQ(s2.duration_ms, MockerPrefillMs(20) + MockerDecodeMs(0.08));
  EXPECT_EQ(s2.tokens.size(), 2u);

  // Decode only.
  MockerStepResult s3 = core.Step();
  EXPECT_EQ(s3.prefill_tokens, 0);
  EXPECT_EQ(s3.decode_tokens, 2);
  EXPECT_EQ(s3.prefill_ms, 0.0);
  EXPECT_DOUBLE_EQ(s3.duration_ms, MockerDecodeMs(s3.kv_usage));
  EXPECT_NEAR(core.simulated_ms(), s1.duration_ms + s2.duration_ms + s3.duration_ms, 1e-9);
}

TEST(MockerCoreTest, ExactlyMaxTokensDeterministic) {
  MockerConfig c;
  c.vocab_size = 50;
  MockerCore core(c);
  const int max_tokens[] = {1, 2, 7, 33, 100};
  for (uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(core.Add(Req(i + 1, Prompt(30 + 10 * i), max_tokens[i])).ok());
  EXPECT_FALSE(core.Add(Req(1, Prompt(3), 1)).ok());  // id in use
  EXPECT_FALSE(core.Add(Req(9, {}, 1)).ok());
  EXPECT_FALSE(core.Add(Req(9, Prompt(3), 0)).ok());
  auto out = Drain(core);
  ASSERT_EQ(out.size(), 5u);
  for (uint64_t i = 0; i < 5; ++i) {
    const auto& toks = out[i + 1];
    ASSERT_EQ(static_cast<int>(toks.size()), max_tokens[i]) << "request " << i + 1;
    for (size_t k = 0; k < toks.size(); ++k) {
      EXPECT_LT(toks[k], 50u);
      EXPECT_EQ(toks[k], MockerCore::TokenAt((i + 1) * 7919, static_cast<int>(k), 50));
    }
  }
  // Not constant: 100 draws from 50 values take more than a few distinct values.
  std::vector<uint32_t> t = out[5];
  std::sort(t.begin(), t.end());
  EXPECT_GT(std::unique(t.begin(), t.end()) - t.begin(), 20);
  EXPECT_EQ(core.Metrics().generated_tokens, 1u + 2 + 7 + 33 + 100);
  EXPECT_EQ(core.pool().num_used_blocks(), 0);
}

TEST(MockerCoreTest, TooLongForThePoolIsRejected) {
  MockerConfig c;
  c.num_blocks = 4;
  c.block_size = 4;  // 16 tokens
  MockerCore core(c);
  EXPECT_TRUE(core.Add(Req(1, Prompt(10), 7)).ok());   // 16 tokens of KV
  EXPECT_FALSE(core.Add(Req(2, Prompt(10), 8)).ok());  // 17
  EXPECT_FALSE(core.Add(Req(3, Prompt(17), 1)).ok());
}

TEST(MockerCoreTest, PrefixCacheHitMakesSecondPrefillCheaper) {
  MockerCore core(MockerConfig{});
  const auto prompt = Prompt(200);
  ASSERT_TRUE(core.Add(Req(1, prompt, 1)).ok());
  MockerStepResult a = core.Step();
  ASSERT_EQ(a.tokens.size(), 1u);
  EXPECT_EQ(a.prefill_tokens, 200);
  EXPECT_EQ(a.tokens[0].cached_tokens, 0);
  EXPECT_TRUE(a.tokens[0].finished);

  ASSERT_TRUE(core.Add(Req(2, prompt, 1)).ok());
  MockerStepResult b = core.Step();
  ASSERT_EQ(b.tokens.size(), 1u);
  EXPECT_EQ(b.tokens[0].cached_tokens, 192);  // three full blocks of 64
  EXPECT_EQ(b.prefill_tokens, 8);
  EXPECT_LT(b.duration_ms, a.duration_ms);
  EXPECT_DOUBLE_EQ(b.duration_ms, MockerPrefillMs(8));
  EXPECT_EQ(core.Metrics().cached_prompt_tokens, 192u);
  EXPECT_EQ(core.Metrics().prompt_tokens, 400u);
}

class RecordingSink : public KvEventSink {
 public:
  void OnKvEvent(const KvEvent& e) override { events.push_back(e); }
  int Count(KvEvent::Type t) const {
    return static_cast<int>(std::count_if(events.begin(), events.end(), [t](const KvEvent& e) { return e.type == t; }));
  }
  std::vector<KvEvent> events;
};

TEST(MockerCoreTest, KvEventsStoredAndRemoved) {
  MockerConfig c;
  c.num_blocks = 6;
  c.block_size = 4;
  MockerCore core(c);
  RecordingSink sink;
  core.SetKvEventSink(&sink);
  ASSERT_TRUE(core.Add(Req(1, Prompt(12), 1)).ok());
  Drain(core);
  ASSERT_EQ(sink.Count(KvEvent::Type::kStored), 1);
  EXPECT_EQ(sink.events[0].blocks.size(), 3u);  // 12 tokens = 3 full blocks
  EXPECT_FALSE(sink.events[0].parent_hash.has_value());
  EXPECT_EQ(sink.events[0].blocks[0].token_ids, Prompt(4));
  EXPECT_EQ(sink.Count(KvEvent::Type::kRemoved), 0);

  // A different prompt needing all 6 blocks evicts the cached ones.
  ASSERT_TRUE(core.Add(Req(2, Prompt(20, 1000), 4)).ok());
  Drain(core);
  EXPECT_GE(sink.Count(KvEvent::Type::kRemoved), 1);
  size_t removed = 0;
  for (const KvEvent& e : sink.events) removed += e.removed.size();
  EXPECT_EQ(removed, 3u);
  for (size_t i = 0; i < sink.events.size(); ++i) EXPECT_EQ(sink.events[i].event_id, i + 1);
  core.SetKvEventSink(nullptr);
}

TEST(MockerCoreTest, PreemptionUnderBlockPressureLosesNoTokens) {
  MockerConfig c;
  c.num_blocks = 8;
  c.block_size = 4;  // 32 tokens for 4 requests that each grow to 4 + 15 tokens
  c.vocab_size = 1000;
  MockerCore core(c);
  for (uint64_t id = 1; id <= 4; ++id) ASSERT_TRUE(core.Add(Req(id, Prompt(4, 10 * id), 16)).ok());
  auto out = Drain(core);
  EXPECT_GT(core.Metrics().preemptions, 0u);
  ASSERT_EQ(out.size(), 4u);
  for (uint64_t id = 1; id <= 4; ++id) {
    ASSERT_EQ(out[id].size(), 16u) << id;
    for (int k = 0; k < 16; ++k) EXPECT_EQ(out[id][k], MockerCore::TokenAt(id * 7919, k, 1000)) << id << " " << k;
  }
  EXPECT_EQ(core.pool().num_used_blocks(), 0);
}

TEST(MockerCoreTest, CancellationFreesBlocksAtNextStep) {
  MockerConfig c;
  c.num_blocks = 64;
  c.block_size = 4;
  MockerCore core(c);
  ASSERT_TRUE(core.Add(Req(1, Prompt(30), 100)).ok());
  ASSERT_TRUE(core.Add(Req(2, Prompt(10, 500), 100)).ok());
  core.Step();
  core.Step();
  const int used = core.pool().num_used_blocks();
  EXPECT_EQ(used, 8 + 3);
  EXPECT_TRUE(core.Cancel(1));
  EXPECT_FALSE(core.Cancel(77));
  EXPECT_EQ(core.pool().num_used_blocks(), used);  // not before the next step
  MockerStepResult r = core.Step();
  EXPECT_EQ(r.cancelled, std::vector<uint64_t>{1});
  EXPECT_FALSE(core.Contains(1));
  for (const MockerToken& t : r.tokens) EXPECT_NE(t.id, 1u);
  EXPECT_EQ(core.pool().num_used_blocks(), 3);  // request 2: 12 tokens
  EXPECT_TRUE(core.Cancel(2));
  core.Step();
  EXPECT_EQ(core.pool().num_used_blocks(), 0);
  EXPECT_FALSE(core.has_unfinished());
}

// Collects one stream's deltas.
struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::vector<EngineOutput> deltas;
  std::optional<FinishReason> finish;
  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard lock(mu);
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finish_reason) finish = o.finish_reason;
      deltas.push_back(std::move(o));
      cv.notify_all();
    };
  }
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return finish.has_value(); });
  }
};

PreprocessedRequest EngineReq(const std::string& id, int prompt_len, int max_tokens) {
  PreprocessedRequest r;
  r.request_id = id;
  r.token_ids = Prompt(prompt_len);
  r.stop.max_tokens = max_tokens;
  r.eos_token_ids = {1, 2, 3};  // ignored: always exactly max_tokens
  r.stop.stop_token_ids = {4, 5};
  return r;
}

TEST(MockerEngineTest, RejectsBadOptions) {
  MockerEngineOptions o;
  o.speedup_ratio = 0;
  EXPECT_FALSE(CreateMockerEngine(o).ok());
  o.speedup_ratio = 1;
  o.core.num_blocks = 0;
  EXPECT_FALSE(CreateMockerEngine(o).ok());
}

TEST(MockerEngineTest, EndToEndHighSpeedup) {
  MockerEngineOptions o;
  o.speedup_ratio = 1e9;
  o.core.vocab_size = 20;  // small, so EOS/stop ids are certainly drawn and must be ignored
  auto engine = CreateMockerEngine(o);
  ASSERT_TRUE(engine.ok());
  constexpr int kN = 32;
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < kN; ++i) {
    streams.push_back(std::make_unique<Stream>());
    std::string id = "r";  // not "r" + to_string(i): g++ 12 warns falsely (-Wrestrict)
    id += std::to_string(i);
    (*engine)->Generate(EngineReq(id, 100 + i, 1 + i * 3), std::make_shared<RequestContext>(id), streams.back()->Sink());
  }
  uint64_t total = 0;
  for (int i = 0; i < kN; ++i) {
    Stream& s = *streams[i];
    ASSERT_TRUE(s.Wait()) << i;
    std::lock_guard lock(s.mu);
    EXPECT_EQ(*s.finish, FinishReason::kLength);
    EXPECT_EQ(static_cast<int>(s.tokens.size()), 1 + i * 3);
    EXPECT_EQ(s.deltas.front().prompt_tokens, static_cast<uint32_t>(100 + i));
    // Prompts are prefixes of each other; hits depend on which ran first, but are whole blocks
    // and leave at least the last prompt token to compute.
    EXPECT_EQ(s.deltas.front().cached_tokens % 64, 0u);
    EXPECT_LT(s.deltas.front().cached_tokens, static_cast<uint32_t>(100 + i));
    total += s.tokens.size();
  }
  EngineMetrics m = (*engine)->Metrics();
  EXPECT_EQ(m.generated_tokens, total);
  EXPECT_EQ(m.kv_blocks_total, 16384);
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.kv_blocks_used, 0);

  // The same request id replays the same tokens; a repeated prompt hits the prefix cache.
  Stream a, b;
  (*engine)->Generate(EngineReq("same", 300, 10), nullptr, a.Sink());
  ASSERT_TRUE(a.Wait());
  (*engine)->Generate(EngineReq("same", 300, 10), nullptr, b.Sink());
  ASSERT_TRUE(b.Wait());
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(b.deltas.front().cached_tokens, 256u);

  // Invalid requests end with one kError delta.
  Stream bad;
  (*engine)->Generate(EngineReq("bad", 0, 10), nullptr, bad.Sink());
  ASSERT_TRUE(bad.Wait());
  EXPECT_EQ(*bad.finish, FinishReason::kError);
  EXPECT_FALSE(bad.deltas.back().error.empty());
  (*engine)->Shutdown();
}

TEST(MockerEngineTest, CancelAndShutdown) {
  MockerEngineOptions o;
  o.speedup_ratio = 10;  // decode passes of ~0.6 ms real time
  auto engine = CreateMockerEngine(o);
  ASSERT_TRUE(engine.ok());
  Stream cancelled, open;
  auto ctx = std::make_shared<RequestContext>("c");
  (*engine)->Generate(EngineReq("c", 50, 100000), ctx, cancelled.Sink());
  (*engine)->Generate(EngineReq("o", 50, 100000), nullptr, open.Sink());
  for (int i = 0; i < 1000; ++i) {
    {
      std::lock_guard lock(cancelled.mu);
      if (cancelled.tokens.size() >= 3) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ctx->Cancel();
  ASSERT_TRUE(cancelled.Wait());
  EXPECT_EQ(*cancelled.finish, FinishReason::kCancelled);
  EXPECT_GE(cancelled.tokens.size(), 3u);
  // The cancelled request's blocks are released: one request of ~50 tokens holds 1-2 blocks.
  for (int i = 0; i < 500 && (*engine)->Metrics().kv_blocks_used > 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_LE((*engine)->Metrics().kv_blocks_used, 2);
  EXPECT_EQ((*engine)->Metrics().running, 1);
  (*engine)->Shutdown();
  ASSERT_TRUE(open.Wait(std::chrono::milliseconds(100)));
  EXPECT_EQ(*open.finish, FinishReason::kCancelled);
  EXPECT_GT(open.tokens.size(), 0u);
  Stream late;
  (*engine)->Generate(EngineReq("late", 5, 5), nullptr, late.Sink());
  ASSERT_TRUE(late.Wait(std::chrono::milliseconds(100)));
  EXPECT_EQ(*late.finish, FinishReason::kError);
}

TEST(MockerEngineTest, RealTimeOneTokenTakesAboutThePrefillTime) {
  MockerEngineOptions o;
  o.speedup_ratio = 1;
  auto engine = CreateMockerEngine(o);
  ASSERT_TRUE(engine.ok());
  // 1000 uncached prompt tokens: 32.1 ms of prefill, the only pass.
  Stream s;
  const auto start = std::chrono::steady_clock::now();
  (*engine)->Generate(EngineReq("t", 1000, 1), nullptr, s.Sink());
  ASSERT_TRUE(s.Wait());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(ms, 30.0);
  EXPECT_LT(ms, 250.0);  // loose: the machine is shared
  EXPECT_EQ(s.tokens.size(), 1u);
}

}  // namespace
}  // namespace dyn
