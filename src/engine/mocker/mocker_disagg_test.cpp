// The mocker in disaggregated roles: MockerCore's prefill-only and imported requests, and two
// MockerEngines in one process whose KvTransferHooks connect them (describe -> lease id in a
// string, release -> the prefill engine's ReleaseKvLease).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <thread>

#include "engine/mocker/mocker_core.h"
#include "engine/mocker/mocker_engine.h"

namespace dyn {
namespace {

using namespace std::chrono_literals;

std::vector<uint32_t> Prompt(int n, uint32_t base = 1) {
  std::vector<uint32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), base);
  return p;
}

MockerRequest Req(uint64_t id, std::vector<uint32_t> prompt, int max_tokens, uint64_t seed,
                  RequestPhase phase = RequestPhase::kFull, uint32_t first_token = 0) {
  MockerRequest r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.seed = seed;
  r.phase = phase;
  r.first_token = first_token;
  return r;
}

MockerConfig SmallConfig() {
  MockerConfig c;
  c.block_size = 4;
  c.num_blocks = 64;
  c.vocab_size = 1000;
  return c;
}

// Steps until a request's tokens stop coming; returns every token by request.
std::map<uint64_t, std::vector<MockerToken>> Drain(MockerCore& core, int max_steps = 1000) {
  std::map<uint64_t, std::vector<MockerToken>> out;
  for (int i = 0; i < max_steps && core.has_unfinished(); ++i) {
    for (MockerToken& t : core.Step().tokens) out[t.id].push_back(std::move(t));
  }
  return out;
}

TEST(MockerTransferTest, TimeFromBytesAndBandwidth) {
  MockerConfig c;
  EXPECT_EQ(c.kv_bytes_per_token, 32 * 2 * 8 * 128 * 2);  // Llama-3.1-8B bf16
  EXPECT_EQ(MockerTransferBytes(c, 0), 0);
  EXPECT_EQ(MockerTransferMs(c, 0), 0.0);
  // One 64-token block: 8 MiB at 25 GB/s.
  EXPECT_EQ(MockerTransferBytes(c, 1), 64 * 131072);
  EXPECT_NEAR(MockerTransferMs(c, 1), 8388608 / 25e6, 1e-12);
  const double at25 = MockerTransferMs(c, 10);
  c.kv_transfer_gbps = 12.5;
  EXPECT_NEAR(MockerTransferMs(c, 10), 2 * at25, 1e-9);
  c.kv_transfer_latency_ms = 3;
  EXPECT_NEAR(MockerTransferMs(c, 10), 2 * at25 + 3, 1e-9);
  EXPECT_EQ(MockerTransferMs(c, 0), 0.0);  // no transfer, no latency
  c.kv_transfer_gbps = 0;
  EXPECT_FALSE(ValidateMockerConfig(c).ok());
}

TEST(MockerDisaggCoreTest, PrefillOnlyHoldsBlocksUnderALeaseUntilReleased) {
  MockerCore core(SmallConfig());
  ASSERT_TRUE(core.Add(Req(1, Prompt(10), 5, 42, RequestPhase::kPrefillOnly)).ok());
  MockerStepResult r = core.Step();
  ASSERT_EQ(r.tokens.size(), 1u);
  const MockerToken& t = r.tokens[0];
  EXPECT_EQ(t.index, 0);
  EXPECT_TRUE(t.first);
  EXPECT_TRUE(t.finished);
  EXPECT_EQ(t.prompt_tokens, 10);
  EXPECT_EQ(t.token, MockerCore::TokenAt(42, 0, 1000));
  ASSERT_NE(t.lease_id, 0u);
  EXPECT_EQ(t.lease_blocks.size(), 3u);  // 10 tokens in blocks of 4
  EXPECT_FALSE(core.has_unfinished());
  EXPECT_EQ(core.pool().num_used_blocks(), 3);
  EngineMetrics m = core.Metrics();
  EXPECT_EQ(m.kv_leases, 1);
  EXPECT_EQ(m.kv_leased_blocks, 3);
  EXPECT_EQ(m.running, 0);

  EXPECT_TRUE(core.Step().tokens.empty());  // a held lease does not run
  EXPECT_EQ(core.pool().num_used_blocks(), 3);
  EXPECT_FALSE(core.ReleaseLease(t.lease_id + 1));
  EXPECT_TRUE(core.ReleaseLease(t.lease_id));
  EXPECT_FALSE(core.ReleaseLease(t.lease_id));
  EXPECT_EQ(core.pool().num_used_blocks(), 0);
  m = core.Metrics();
  EXPECT_EQ(m.kv_leases, 0);
  EXPECT_EQ(m.kv_leased_blocks, 0);

  // The two full blocks stayed in the prefix cache.
  ASSERT_TRUE(core.Add(Req(2, Prompt(10), 1, 7)).ok());
  r = core.Step();
  ASSERT_EQ(r.tokens.size(), 1u);
  EXPECT_EQ(r.tokens[0].cached_tokens, 8);
}

TEST(MockerDisaggCoreTest, PrefillOnlyEndedByItsFirstTokenTakesNoLease) {
  MockerCore core(SmallConfig());
  ASSERT_TRUE(core.Add(Req(1, Prompt(10), 1, 42, RequestPhase::kPrefillOnly)).ok());
  MockerStepResult r = core.Step();
  ASSERT_EQ(r.tokens.size(), 1u);
  EXPECT_TRUE(r.tokens[0].finished);
  EXPECT_EQ(r.tokens[0].lease_id, 0u);
  EXPECT_TRUE(r.tokens[0].lease_blocks.empty());
  EXPECT_EQ(core.pool().num_used_blocks(), 0);
  EXPECT_EQ(core.Metrics().kv_leases, 0);
}

TEST(MockerDisaggCoreTest, DisaggregatedTokensEqualAggregated) {
  constexpr int kPrompt = 50, kMax = 20;
  constexpr uint64_t kSeed = 4242;
  MockerCore agg(SmallConfig()), prefill(SmallConfig()), decode(SmallConfig());
  ASSERT_TRUE(agg.Add(Req(1, Prompt(kPrompt), kMax, kSeed)).ok());
  std::vector<uint32_t> expected;
  auto aggregated = Drain(agg);
  for (const MockerToken& t : aggregated[1]) expected.push_back(t.token);
  ASSERT_EQ(expected.size(), static_cast<size_t>(kMax));

  ASSERT_TRUE(prefill.Add(Req(7, Prompt(kPrompt), kMax, kSeed, RequestPhase::kPrefillOnly)).ok());
  auto p = Drain(prefill);
  ASSERT_EQ(p[7].size(), 1u);
  const MockerToken first = p[7][0];
  ASSERT_NE(first.lease_id, 0u);

  // Different ids on the two sides, as with two engines.
  EXPECT_FALSE(decode.Add(Req(9, Prompt(kPrompt), 1, kSeed, RequestPhase::kDecodeImported, first.token)).ok());
  ASSERT_TRUE(decode.Add(Req(9, Prompt(kPrompt), kMax, kSeed, RequestPhase::kDecodeImported, first.token)).ok());
  MockerStepResult r = decode.Step();
  ASSERT_EQ(r.imports.size(), 1u);
  const MockerImport im = r.imports[0];
  EXPECT_EQ(im.id, 9u);
  EXPECT_EQ(im.prompt_tokens, kPrompt);
  EXPECT_EQ(im.cached_tokens, 0);
  EXPECT_EQ(im.first_block, 0);
  EXPECT_EQ(im.transfer_blocks, 13);  // 50 tokens in blocks of 4
  EXPECT_EQ(im.transfer_bytes, 13 * 4 * 131072);
  EXPECT_DOUBLE_EQ(im.transfer_ms, MockerTransferMs(decode.config(), 13));
  EXPECT_EQ(r.batch_size, 0);
  EXPECT_EQ(r.duration_ms, 0.0);
  EXPECT_EQ(decode.pool().num_used_blocks(), 13);
  EXPECT_EQ(decode.num_importing(), 1);
  // Until the transfer is over the request does not run.
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(decode.Step().tokens.empty());

  EXPECT_FALSE(decode.CompleteImport(8, true));
  EXPECT_TRUE(decode.CompleteImport(9, true));
  EXPECT_FALSE(decode.CompleteImport(9, true));
  EXPECT_TRUE(prefill.ReleaseLease(first.lease_id));
  auto d = Drain(decode);
  ASSERT_EQ(d[9].size(), static_cast<size_t>(kMax - 1));
  EXPECT_TRUE(d[9].front().first);
  EXPECT_EQ(d[9].front().index, 1);
  EXPECT_EQ(d[9].front().prompt_tokens, kPrompt);
  EXPECT_EQ(d[9].front().cached_tokens, 0);
  EXPECT_TRUE(d[9].back().finished);
  std::vector<uint32_t> got{first.token};
  for (const MockerToken& t : d[9]) got.push_back(t.token);
  EXPECT_EQ(got, expected);

  // Everything back to idle on both sides; the decode side counted the transfer.
  for (MockerCore* core : {&prefill, &decode}) {
    const EngineMetrics m = core->Metrics();
    EXPECT_EQ(m.kv_blocks_used, 0);
    EXPECT_EQ(m.kv_leases, 0);
    EXPECT_EQ(m.running + m.waiting, 0);
    EXPECT_EQ(core->num_importing(), 0);
  }
  const EngineMetrics m = decode.Metrics();
  EXPECT_EQ(m.kv_transfers, 1u);
  EXPECT_EQ(m.kv_transfer_failures, 0u);
  EXPECT_EQ(m.kv_transfer_bytes, static_cast<uint64_t>(im.transfer_bytes));
  EXPECT_NEAR(m.kv_transfer_seconds, im.transfer_ms / 1000, 1e-12);
  EXPECT_EQ(m.generated_tokens, static_cast<uint64_t>(kMax - 1));
}

TEST(MockerDisaggCoreTest, ImportReusesTheLocalPrefixCache) {
  MockerCore decode(SmallConfig());
  // 40 prompt tokens computed here leave 10 full blocks in the prefix cache.
  ASSERT_TRUE(decode.Add(Req(1, Prompt(40), 2, 1)).ok());
  Drain(decode);
  ASSERT_TRUE(decode.Add(Req(2, Prompt(60), 4, 5, RequestPhase::kDecodeImported, 17)).ok());
  MockerStepResult r = decode.Step();
  ASSERT_EQ(r.imports.size(), 1u);
  EXPECT_EQ(r.imports[0].cached_tokens, 40);
  EXPECT_EQ(r.imports[0].first_block, 10);
  EXPECT_EQ(r.imports[0].transfer_blocks, 5);
  EXPECT_EQ(r.imports[0].transfer_bytes, 5 * 4 * 131072);
  ASSERT_TRUE(decode.CompleteImport(2, true));
  auto d = Drain(decode);
  ASSERT_EQ(d[2].size(), 3u);
  EXPECT_EQ(d[2][0].cached_tokens, 40);
  EXPECT_EQ(d[2][0].token, MockerCore::TokenAt(5, 1, 1000));

  // A prompt entirely cached needs no transfer (0 blocks, 0 ms).
  ASSERT_TRUE(decode.Add(Req(3, Prompt(40), 4, 5, RequestPhase::kDecodeImported, 17)).ok());
  r = decode.Step();
  ASSERT_EQ(r.imports.size(), 1u);
  EXPECT_EQ(r.imports[0].cached_tokens, 40);
  EXPECT_EQ(r.imports[0].transfer_blocks, 0);
  EXPECT_EQ(r.imports[0].transfer_ms, 0.0);
  ASSERT_TRUE(decode.CompleteImport(3, true));
  EXPECT_EQ(Drain(decode)[3].size(), 3u);
  EXPECT_EQ(decode.Metrics().kv_transfers, 2u);
  EXPECT_EQ(decode.Metrics().kv_transfer_bytes, 5u * 4 * 131072);
}

TEST(MockerDisaggCoreTest, FailedOrCancelledImportFreesItsBlocks) {
  MockerCore decode(SmallConfig());
  ASSERT_TRUE(decode.Add(Req(1, Prompt(30), 10, 1, RequestPhase::kDecodeImported, 3)).ok());
  ASSERT_EQ(decode.Step().imports.size(), 1u);
  EXPECT_EQ(decode.pool().num_used_blocks(), 8);
  EXPECT_TRUE(decode.CompleteImport(1, false));
  EXPECT_FALSE(decode.has_unfinished());
  EXPECT_EQ(decode.pool().num_used_blocks(), 0);
  EXPECT_EQ(decode.Metrics().kv_transfers, 1u);
  EXPECT_EQ(decode.Metrics().kv_transfer_failures, 1u);
  EXPECT_EQ(decode.Metrics().kv_transfer_bytes, 0u);

  ASSERT_TRUE(decode.Add(Req(2, Prompt(30), 10, 1, RequestPhase::kDecodeImported, 3)).ok());
  ASSERT_EQ(decode.Step().imports.size(), 1u);
  EXPECT_TRUE(decode.Cancel(2));
  MockerStepResult r = decode.Step();
  EXPECT_EQ(r.cancelled, std::vector<uint64_t>{2});
  EXPECT_FALSE(decode.CompleteImport(2, true));  // gone
  EXPECT_EQ(decode.pool().num_used_blocks(), 0);
  EXPECT_FALSE(decode.has_unfinished());
}

TEST(MockerDisaggCoreTest, ImportWaitsForFreeBlocks) {
  MockerConfig c = SmallConfig();
  c.num_blocks = 10;  // 40 tokens
  MockerCore decode(c);
  ASSERT_TRUE(decode.Add(Req(1, Prompt(24, 500), 3, 1)).ok());  // 6 blocks, 7 with its tokens
  decode.Step();
  ASSERT_TRUE(decode.Add(Req(2, Prompt(20), 4, 2, RequestPhase::kDecodeImported, 3)).ok());  // 5 blocks
  MockerStepResult r = decode.Step();
  EXPECT_TRUE(r.imports.empty());  // 4 blocks free
  int steps = 0;
  while (r.imports.empty() && steps++ < 20) r = decode.Step();
  ASSERT_EQ(r.imports.size(), 1u);  // request 1 finished
  EXPECT_FALSE(decode.Contains(1));
  ASSERT_TRUE(decode.CompleteImport(2, true));
  EXPECT_EQ(Drain(decode)[2].size(), 3u);
  EXPECT_EQ(decode.pool().num_used_blocks(), 0);
}

// ---- two engines whose hooks connect them ----

struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::vector<EngineOutput> deltas;
  std::vector<std::chrono::steady_clock::time_point> times;  // of each delta
  std::optional<FinishReason> finish;
  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard lock(mu);
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finish_reason) finish = o.finish_reason;
      deltas.push_back(std::move(o));
      times.push_back(std::chrono::steady_clock::now());
      cv.notify_all();
    };
  }
  bool Wait(std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return finish.has_value(); });
  }
};

PreprocessedRequest EngineReq(const std::string& id, int prompt_len, int max_tokens,
                              RequestPhase phase = RequestPhase::kFull) {
  PreprocessedRequest r;
  r.request_id = id;
  r.token_ids = Prompt(prompt_len);
  r.stop.max_tokens = max_tokens;
  r.phase = phase;
  return r;
}

// The descriptor is "lease:<id>"; the decode side's release hook hands it back to the prefill
// engine.
struct Pair {
  EnginePtr prefill, decode;
  std::atomic<int> described{0}, released{0}, released_ok{0};
  std::atomic<int> described_blocks{0}, described_tokens{0};

  explicit Pair(MockerEngineOptions o, std::chrono::milliseconds lease_timeout = 30s) {
    MockerEngineOptions p = o;
    p.kv_transfer.describe = [this](uint64_t lease, std::span<const int32_t> blocks, int num_tokens) {
      ++described;
      described_blocks = static_cast<int>(blocks.size());
      described_tokens = num_tokens;
      return Result<std::string>("lease:" + std::to_string(lease));
    };
    p.kv_transfer.lease_timeout = lease_timeout;
    prefill = *CreateMockerEngine(p);
    MockerEngineOptions d = o;
    d.kv_transfer.release = [this](const std::string& desc) {
      ++released;
      if (prefill->ReleaseKvLease(std::stoull(desc.substr(6)))) ++released_ok;
    };
    decode = *CreateMockerEngine(d);
  }
  ~Pair() {
    decode->Shutdown();
    prefill->Shutdown();
  }
};

template <typename F>
bool WaitFor(F pred, std::chrono::milliseconds timeout = 5s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

TEST(MockerDisaggEngineTest, PrefillThenDecodeGivesTheAggregatedTokens) {
  MockerEngineOptions o;
  o.speedup_ratio = 1e9;
  o.core.vocab_size = 5000;
  Pair pair(o);
  EnginePtr agg = *CreateMockerEngine(o);

  Stream whole;
  agg->Generate(EngineReq("x", 300, 20), nullptr, whole.Sink());
  ASSERT_TRUE(whole.Wait());
  ASSERT_EQ(whole.tokens.size(), 20u);

  Stream pre;
  pair.prefill->Generate(EngineReq("x", 300, 20, RequestPhase::kPrefillOnly), nullptr, pre.Sink());
  ASSERT_TRUE(pre.Wait());
  ASSERT_EQ(pre.deltas.size(), 1u);
  const EngineOutput& hand = pre.deltas[0];
  EXPECT_EQ(*hand.finish_reason, FinishReason::kLength);
  ASSERT_EQ(hand.token_ids.size(), 1u);
  EXPECT_EQ(hand.prompt_tokens, 300u);
  ASSERT_EQ(hand.kv_transfer.rfind("lease:", 0), 0u);
  EXPECT_EQ(pair.described_blocks.load(), 5);  // 300 tokens in blocks of 64
  EXPECT_EQ(pair.described_tokens.load(), 300);
  ASSERT_TRUE(WaitFor([&] { return pair.prefill->Metrics().kv_leases == 1; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leased_blocks, 5);
  EXPECT_EQ(pair.prefill->Metrics().kv_blocks_used, 5);

  PreprocessedRequest dr = EngineReq("x", 300, 20, RequestPhase::kDecodeImported);
  dr.kv_transfer = hand.kv_transfer;
  dr.first_token = hand.token_ids[0];
  Stream dec;
  pair.decode->Generate(std::move(dr), nullptr, dec.Sink());
  ASSERT_TRUE(dec.Wait());
  EXPECT_EQ(*dec.finish, FinishReason::kLength);
  ASSERT_EQ(dec.tokens.size(), 19u);
  EXPECT_EQ(dec.deltas.front().prompt_tokens, 300u);
  EXPECT_EQ(dec.deltas.front().cached_tokens, 0u);
  std::vector<uint32_t> got{hand.token_ids[0]};
  got.insert(got.end(), dec.tokens.begin(), dec.tokens.end());
  EXPECT_EQ(got, whole.tokens);

  EXPECT_EQ(pair.released.load(), 1);
  EXPECT_EQ(pair.released_ok.load(), 1);
  ASSERT_TRUE(WaitFor([&] { return pair.prefill->Metrics().kv_leases == 0; }));
  ASSERT_TRUE(WaitFor([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leased_blocks, 0);
  EngineMetrics dm = pair.decode->Metrics();
  EXPECT_EQ(dm.kv_transfers, 1u);
  EXPECT_EQ(dm.kv_transfer_bytes, 5u * 64 * 131072);
  EXPECT_GT(dm.kv_transfer_seconds, 0.0);
  EXPECT_EQ(dm.kv_blocks_used, 0);
  EXPECT_EQ(dm.running, 0);
  EXPECT_FALSE(pair.prefill->ReleaseKvLease(1));  // released already

  // The same prompt again: the decode side reuses the 4 full blocks it now caches and moves one.
  Stream pre2, dec2;
  pair.prefill->Generate(EngineReq("y", 300, 5, RequestPhase::kPrefillOnly), nullptr, pre2.Sink());
  ASSERT_TRUE(pre2.Wait());
  EXPECT_EQ(pre2.deltas[0].cached_tokens, 256u);  // the prefill side's cache too
  PreprocessedRequest dr2 = EngineReq("y", 300, 5, RequestPhase::kDecodeImported);
  dr2.kv_transfer = pre2.deltas[0].kv_transfer;
  dr2.first_token = pre2.deltas[0].token_ids[0];
  pair.decode->Generate(std::move(dr2), nullptr, dec2.Sink());
  ASSERT_TRUE(dec2.Wait());
  EXPECT_EQ(dec2.tokens.size(), 4u);
  EXPECT_EQ(dec2.deltas.front().cached_tokens, 256u);
  EXPECT_EQ(pair.decode->Metrics().kv_transfer_bytes, 6u * 64 * 131072);
  EXPECT_EQ(pair.released_ok.load(), 2);
  agg->Shutdown();
}

TEST(MockerDisaggEngineTest, PhasesWithoutHooksOrDescriptorAreRefused) {
  MockerEngineOptions o;
  o.speedup_ratio = 1e9;
  EnginePtr e = *CreateMockerEngine(o);
  Stream a, b;
  e->Generate(EngineReq("a", 100, 10, RequestPhase::kPrefillOnly), nullptr, a.Sink());
  e->Generate(EngineReq("b", 100, 10, RequestPhase::kDecodeImported), nullptr, b.Sink());  // no descriptor
  ASSERT_TRUE(a.Wait());
  ASSERT_TRUE(b.Wait());
  EXPECT_EQ(*a.finish, FinishReason::kError);
  EXPECT_NE(a.deltas.back().error.find("cannot hand KV"), std::string::npos) << a.deltas.back().error;
  EXPECT_EQ(*b.finish, FinishReason::kError);
  EXPECT_FALSE(e->ReleaseKvLease(1));
  EXPECT_EQ(e->Metrics().kv_blocks_used, 0);
  e->Shutdown();
}

TEST(MockerDisaggEngineTest, UnreleasedLeaseExpires) {
  MockerEngineOptions o;
  o.speedup_ratio = 1e9;
  Pair pair(o, /*lease_timeout=*/100ms);
  Stream pre;
  pair.prefill->Generate(EngineReq("x", 200, 10, RequestPhase::kPrefillOnly), nullptr, pre.Sink());
  ASSERT_TRUE(pre.Wait());
  ASSERT_FALSE(pre.deltas[0].kv_transfer.empty());
  ASSERT_TRUE(WaitFor([&] { return pair.prefill->Metrics().kv_leases == 1; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_blocks_used, 4);
  // Nobody releases it: it goes after the timeout, with its blocks.
  ASSERT_TRUE(WaitFor([&] { return pair.prefill->Metrics().kv_leases == 0; }, 3s));
  EXPECT_EQ(pair.prefill->Metrics().kv_leased_blocks, 0);
  EXPECT_EQ(pair.prefill->Metrics().kv_blocks_used, 0);
  EXPECT_FALSE(pair.prefill->ReleaseKvLease(1));  // expired
}

TEST(MockerDisaggEngineTest, TransferTakesItsTimeWithoutStoppingOtherStreams) {
  MockerEngineOptions o;
  o.speedup_ratio = 1;
  // 5 blocks of 64 tokens x 128 KiB = 41.9 MB; at 0.21 GB/s that is ~200 ms.
  o.core.kv_transfer_gbps = 0.21;
  Pair pair(o);
  Stream other;
  pair.decode->Generate(EngineReq("busy", 50, 100000), nullptr, other.Sink());
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard lock(other.mu);
    return other.tokens.size() >= 2;
  }));
  PreprocessedRequest dr = EngineReq("imp", 300, 3, RequestPhase::kDecodeImported);
  dr.kv_transfer = "lease:12345";  // unknown to the prefill engine: release returns false
  dr.first_token = 1;
  Stream imp;
  size_t other_before;
  {
    std::lock_guard lock(other.mu);
    other_before = other.tokens.size();
  }
  const auto t0 = std::chrono::steady_clock::now();
  pair.decode->Generate(std::move(dr), nullptr, imp.Sink());
  ASSERT_TRUE(imp.Wait());
  const double ms = std::chrono::duration<double, std::milli>(imp.times.front() - t0).count();
  EXPECT_GE(ms, 190.0);
  EXPECT_LT(ms, 2000.0);  // loose: the machine is shared
  {
    std::lock_guard lock(other.mu);
    // Decode passes of ~6 ms went on during the transfer.
    EXPECT_GE(other.tokens.size(), other_before + 10);
  }
  EXPECT_EQ(pair.released.load(), 1);
  EXPECT_EQ(pair.released_ok.load(), 0);
  EXPECT_NEAR(pair.decode->Metrics().kv_transfer_seconds, 5.0 * 64 * 131072 / 0.21e9, 1e-9);
  pair.decode->Shutdown();  // "busy" is still streaming into `other`, which dies before `pair`
}

TEST(MockerDisaggEngineTest, CancelledImportReleasesTheSource) {
  MockerEngineOptions o;
  o.speedup_ratio = 1;
  o.core.kv_transfer_gbps = 0.01;  // a transfer of seconds
  Pair pair(o);
  PreprocessedRequest dr = EngineReq("imp", 300, 3, RequestPhase::kDecodeImported);
  dr.kv_transfer = "lease:1";
  dr.first_token = 1;
  auto ctx = std::make_shared<RequestContext>("imp");
  Stream imp;
  pair.decode->Generate(std::move(dr), ctx, imp.Sink());
  ASSERT_TRUE(WaitFor([&] { return pair.decode->Metrics().kv_blocks_used == 5; }));
  ctx->Cancel();
  ASSERT_TRUE(imp.Wait(1s));
  EXPECT_EQ(*imp.finish, FinishReason::kCancelled);
  EXPECT_TRUE(imp.tokens.empty());
  EXPECT_EQ(pair.released.load(), 1);
  ASSERT_TRUE(WaitFor([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.decode->Metrics().kv_transfers, 0u);
}

}  // namespace
}  // namespace dyn
