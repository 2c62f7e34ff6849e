// Disaggregated serving inside one process: a prefill engine and a decode engine (FakeModel, whose
// "KV" is token ids in block slots) wired with KvTransferHooks that copy blocks between the two
// models directly. Output must equal aggregated serving; leases and reservations must all end.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>

#include "engine/native/sched/fake_model_for_test.h"
#include "engine/native/sched/native_engine.h"
#include "engine/native/sched/stream_for_test.h"

namespace dyn {
namespace {

using testing::FakeModel;
using namespace std::chrono_literals;

using testing::Prompt;
using testing::Eventually;
using testing::Request;
using testing::Stream;

// Descriptor format of this test: "lease block block ...".
std::string Describe(uint64_t lease, std::span<const int32_t> blocks) {
  std::ostringstream o;
  o << lease;
  for (int32_t b : blocks) o << ' ' << b;
  return o.str();
}
std::vector<int64_t> Parse(const std::string& d) {
  std::istringstream in(d);
  std::vector<int64_t> v;
  for (int64_t x; in >> x;) v.push_back(x);
  return v;
}

struct Pair {
  FakeModel* prefill_model = nullptr;
  FakeModel* decode_model = nullptr;
  EnginePtr prefill, decode;
  std::atomic<int> released{0};
  std::atomic<bool> fail_pulls{false};
  std::atomic<int> pulled_blocks{0};

  // Staged pairs (device caches): the engines hand their host staging blocks to the transfer
  // hooks (cache_ready) and the pulls copy between those, as the TCP and shm transports do.
  KvCacheGeometry prefill_staging_geometry, decode_staging_geometry;
  std::byte* prefill_staging = nullptr;
  std::byte* decode_staging = nullptr;

  // `pipelined`: both models pipeline sampling (the decode engine's steps after an import run
  // pipelined, the prefill-only requests never do). `staged`: both models keep their KV "on a
  // device" (FakeModel::device_cache), with staging areas of `staging_blocks` blocks.
  explicit Pair(std::chrono::milliseconds lease_timeout = 30s, bool pipelined = false, bool staged = false, int staging_blocks = 16,
                bool concurrent_writes = true) {
    std::unique_ptr<FakeModel> pm, dm;
    if (pipelined) {
      pm = std::make_unique<testing::PipelinedFakeModel>();
      dm = std::make_unique<testing::PipelinedFakeModel>();
    } else {
      pm = std::make_unique<FakeModel>();
      dm = std::make_unique<FakeModel>();
    }
    prefill_model = pm.get();
    decode_model = dm.get();
    pm->device_cache = dm->device_cache = staged;
    dm->concurrent_kv_writes = concurrent_writes;
    NativeEngineOptions po;
    po.block_size = 4;
    po.num_kv_blocks = 64;
    po.kv_staging_bytes = static_cast<size_t>(staging_blocks) * 4 * pm->KvBytesPerToken();
    po.kv_transfer.lease_timeout = lease_timeout;
    po.kv_transfer.describe = [](uint64_t lease, std::span<const int32_t> blocks, int) -> Result<std::string> {
      return Describe(lease, blocks);
    };
    if (staged) {
      po.kv_transfer.cache_ready = [this](const KvCacheGeometry& g, void* base) {
        prefill_staging_geometry = g;
        prefill_staging = static_cast<std::byte*>(base);
        return Status::Ok();
      };
    }
    auto p_engine = CreateNativeEngine(std::move(pm), po);
    EXPECT_TRUE(p_engine.ok()) << p_engine.status().ToString();
    prefill = std::move(p_engine).value();
    NativeEngineOptions d = po;
    d.kv_transfer = {};
    d.kv_transfer.pull = [this, staged](const std::string& desc, int first, std::span<const int32_t> dst) -> Result<size_t> {
      if (fail_pulls) return Status::Unavailable("source gone");
      const auto v = Parse(desc);
      for (size_t i = 0; i < dst.size(); ++i) {
        const auto src = static_cast<int32_t>(v[1 + first + i]);
        if (!staged) {
          decode_model->WriteBlock(dst[i], prefill_model->ReadBlock(src));
          continue;
        }
        const size_t bytes = prefill_staging_geometry.block_bytes;
        if (src >= prefill_staging_geometry.num_blocks || dst[i] >= decode_staging_geometry.num_blocks) {
          return Status::InvalidArgument("a block outside a staging area");
        }
        std::memcpy(decode_staging + dst[i] * bytes, prefill_staging + src * bytes, bytes);
      }
      pulled_blocks += static_cast<int>(dst.size());
      return dst.size() * 16;
    };
    if (staged) {
      d.kv_transfer.cache_ready = [this](const KvCacheGeometry& g, void* base) {
        decode_staging_geometry = g;
        decode_staging = static_cast<std::byte*>(base);
        return Status::Ok();
      };
    }
    d.kv_transfer.release = [this](const std::string& desc) {
      prefill->ReleaseKvLease(static_cast<uint64_t>(Parse(desc)[0]));
      ++released;
    };
    decode = *CreateNativeEngine(std::move(dm), d);
  }
  ~Pair() {
    decode->Shutdown();
    prefill->Shutdown();
  }

  // Prefill on one engine, decode on the other; returns all generated tokens.
  std::vector<uint32_t> Serve(const std::vector<uint32_t>& prompt, int max_tokens, Stream* decode_stream_out = nullptr) {
    PreprocessedRequest p = Request(prompt, max_tokens);
    p.phase = RequestPhase::kPrefillOnly;
    Stream ps;
    prefill->Generate(p, std::make_shared<RequestContext>("p"), ps.Sink());
    EXPECT_TRUE(ps.Wait());
    EXPECT_EQ(ps.tokens.size(), 1u);
    if (ps.kv_transfer.empty()) return ps.tokens;  // finished at its first token
    PreprocessedRequest d = Request(prompt, max_tokens);
    d.phase = RequestPhase::kDecodeImported;
    d.kv_transfer = ps.kv_transfer;
    d.first_token = ps.tokens[0];
    Stream local;
    Stream& ds = decode_stream_out ? *decode_stream_out : local;
    decode->Generate(d, std::make_shared<RequestContext>("d"), ds.Sink());
    EXPECT_TRUE(ds.Wait());
    std::vector<uint32_t> all = ps.tokens;
    all.insert(all.end(), ds.tokens.begin(), ds.tokens.end());
    return all;
  }
};

void PrefillThenDecode(bool pipelined, bool staged = false, bool concurrent_writes = true) {
  Pair pair(30s, pipelined, staged, 16, concurrent_writes);
  FakeModel reference;
  for (uint32_t seed = 1; seed <= 6; ++seed) {
    const auto prompt = Prompt(5 + 7 * static_cast<int>(seed), seed);
    Stream ds;
    EXPECT_EQ(pair.Serve(prompt, 12, &ds), reference.Greedy(prompt, 12)) << "seed " << seed;
    EXPECT_EQ(ds.prompt_tokens, prompt.size());
    EXPECT_EQ(*ds.finish, FinishReason::kLength);
  }
  // Every lease was released by the decode side, the prefill side holds nothing.
  EXPECT_EQ(pair.released.load(), 6);
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_leases == 0; }));
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.decode->Metrics().kv_transfers, 6u);
  if (staged) {  // the decode side's copies to the "device" ran where expected
    const uint64_t concurrent = pair.decode_model->kv_blocks_written_concurrently.load();
    const uint64_t on_step = pair.decode_model->kv_blocks_copied.load();
    EXPECT_EQ(concurrent > 0, concurrent_writes);
    EXPECT_EQ(on_step > 0, !concurrent_writes);
  }
  if (pipelined) {  // imported sequences decode pipelined once activated
    EXPECT_GT(static_cast<testing::PipelinedFakeModel*>(pair.decode_model)->overlapped_steps.load(), 6 * 5);
  }
}

TEST(NativeEngineDisagg, PrefillThenDecodeEqualsAggregated) { PrefillThenDecode(false); }
TEST(NativeEngineDisagg, PrefillThenDecodeEqualsAggregatedPipelined) { PrefillThenDecode(true); }

// Device caches (a GPU's): the KV goes device -> prefill staging -> decode staging -> device
// (on the transfer thread where the model writes concurrently, else on the step thread).
TEST(NativeEngineDisagg, DeviceCachesMoveKvThroughStagingBlocks) {
  PrefillThenDecode(false, /*staged=*/true);
  PrefillThenDecode(true, /*staged=*/true);
  PrefillThenDecode(true, /*staged=*/true, /*concurrent_writes=*/false);
}

TEST(NativeEngineDisagg, StagedHandOffFreesDeviceBlocksAtOnceAndLeasesStagingBlocks) {
  Pair pair(30s, false, /*staged=*/true, /*staging_blocks=*/16);
  ASSERT_NE(pair.prefill_staging, nullptr);
  ASSERT_NE(pair.decode_staging, nullptr);
  EXPECT_EQ(pair.prefill_staging_geometry.num_blocks, 16);  // the staging area, not the 64-block cache
  EXPECT_EQ(pair.prefill_staging_geometry.block_bytes, 4u * 1024u);
  PreprocessedRequest p = Request(Prompt(30, 7), 8);  // 8 blocks of 4 tokens
  p.phase = RequestPhase::kPrefillOnly;
  Stream ps;
  pair.prefill->Generate(p, std::make_shared<RequestContext>("p"), ps.Sink());
  ASSERT_TRUE(ps.Wait());
  ASSERT_FALSE(ps.kv_transfer.empty());
  const auto desc = Parse(ps.kv_transfer);
  EXPECT_EQ(desc.size(), 1u + 8u);  // lease + 8 staging blocks
  for (size_t i = 1; i < desc.size(); ++i) EXPECT_LT(desc[i], 16);
  // The device blocks are back in the pool before any decode worker pulled; the lease holds
  // staging blocks only.
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leases, 1u);
  EXPECT_EQ(pair.prefill_model->kv_blocks_copied.load(), 8u);
  EXPECT_TRUE(pair.prefill->ReleaseKvLease(static_cast<uint64_t>(desc[0])));
}

TEST(NativeEngineDisagg, StagingTooSmallFailsClearlyAndLeaksNothing) {
  Pair pair(30s, false, /*staged=*/true, /*staging_blocks=*/4);  // 16 tokens of staging
  // Prefill side: a prompt of 8 blocks cannot be staged.
  PreprocessedRequest p = Request(Prompt(30, 3), 8);
  p.phase = RequestPhase::kPrefillOnly;
  Stream ps;
  pair.prefill->Generate(p, std::make_shared<RequestContext>("p"), ps.Sink());
  ASSERT_TRUE(ps.Wait());
  EXPECT_EQ(*ps.finish, FinishReason::kError);
  EXPECT_NE(ps.error.find("staging"), std::string::npos) << ps.error;
  // Unavailable with no token: what makes the frontend fall back to aggregated serving.
  EXPECT_EQ(ps.error.rfind("Unavailable", 0), 0u) << ps.error;
  EXPECT_TRUE(ps.tokens.empty());
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leases, 0u);
  // Decode side: an import larger than the staging area ends with an error, its lease released.
  PreprocessedRequest d = Request(Prompt(30, 3), 8);
  d.phase = RequestPhase::kDecodeImported;
  d.kv_transfer = "99 0 1 2 3 4 5 6 7";
  d.first_token = 1;
  Stream ds;
  pair.decode->Generate(d, std::make_shared<RequestContext>("d"), ds.Sink());
  ASSERT_TRUE(ds.Wait());
  EXPECT_EQ(*ds.finish, FinishReason::kError);
  EXPECT_NE(ds.error.find("staging"), std::string::npos) << ds.error;
  EXPECT_EQ(pair.released.load(), 1);
  // Short prompts still go through.
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    const auto prompt = Prompt(9, seed);
    EXPECT_EQ(pair.Serve(prompt, 6), FakeModel().Greedy(prompt, 6)) << "seed " << seed;
  }
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
}

TEST(NativeEngineDisagg, DecodeSideReusesItsPrefixCache) {
  Pair pair;
  FakeModel reference;
  const auto a = Prompt(40, 3);
  EXPECT_EQ(pair.Serve(a, 4), reference.Greedy(a, 4));
  const int first_pull = pair.pulled_blocks.load();
  EXPECT_EQ(first_pull, 10);
  auto b = a;
  b.resize(32);
  for (uint32_t t : Prompt(9, 8)) b.push_back(t);
  Stream ds;
  EXPECT_EQ(pair.Serve(b, 4, &ds), reference.Greedy(b, 4));
  EXPECT_EQ(ds.cached_tokens, 32u);                      // 8 blocks found locally
  EXPECT_EQ(pair.pulled_blocks.load() - first_pull, 3);  // only 41 - 32 tokens' blocks copied
}

TEST(NativeEngineDisagg, FailedPullEndsUnavailableAndFreesEverything) {
  Pair pair;
  pair.fail_pulls = true;
  Stream ds;
  pair.Serve(Prompt(30, 5), 8, &ds);
  EXPECT_EQ(*ds.finish, FinishReason::kError);
  EXPECT_EQ(ds.error.rfind("Unavailable", 0), 0u) << ds.error;
  EXPECT_EQ(pair.released.load(), 1);  // the source is told even when the copy failed
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
  EXPECT_EQ(pair.decode->Metrics().kv_transfer_failures, 1u);
}

TEST(NativeEngineDisagg, UnreleasedLeaseExpires) {
  Pair pair(100ms);
  PreprocessedRequest p = Request(Prompt(30, 6), 8);
  p.phase = RequestPhase::kPrefillOnly;
  Stream ps;
  pair.prefill->Generate(p, std::make_shared<RequestContext>("p"), ps.Sink());
  ASSERT_TRUE(ps.Wait());
  ASSERT_FALSE(ps.kv_transfer.empty());
  EXPECT_EQ(pair.prefill->Metrics().kv_leases, 1);
  EXPECT_GT(pair.prefill->Metrics().kv_leased_blocks, 0);
  // Nobody pulls: the lease times out and the blocks return.
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_leases == 0; }));
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_blocks_used == 0; }));
  EXPECT_FALSE(pair.prefill->ReleaseKvLease(1));  // already gone
}

TEST(NativeEngineDisagg, RequestsNeedTheirHooks) {
  auto m = std::make_unique<FakeModel>();
  NativeEngineOptions o;
  o.block_size = 4;
  o.num_kv_blocks = 16;
  auto e = *CreateNativeEngine(std::move(m), o);
  PreprocessedRequest p = Request(Prompt(8, 1), 4);
  p.phase = RequestPhase::kPrefillOnly;
  Stream s1;
  e->Generate(p, std::make_shared<RequestContext>("a"), s1.Sink());
  ASSERT_TRUE(s1.Wait());
  EXPECT_EQ(*s1.finish, FinishReason::kError);
  p.phase = RequestPhase::kDecodeImported;
  p.kv_transfer = "1 0 1";
  Stream s2;
  e->Generate(p, std::make_shared<RequestContext>("b"), s2.Sink());
  ASSERT_TRUE(s2.Wait());
  EXPECT_EQ(*s2.finish, FinishReason::kError);
  e->Shutdown();
}

}  // namespace
}  // namespace dyn
