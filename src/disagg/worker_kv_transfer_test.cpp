// WorkerKvTransfer with real parts: two native engines over the stories260K model (CPU), a real
// KV transfer source (TCP or shared memory) and sink, and the "kv_release" endpoint on a real
// request-plane server on loopback. A prompt prefilled on one engine and decoded on the other gives
// the aggregated engine's greedy tokens, and the prefill side's lease ends when the decode side
// has its copy.
#include "disagg/worker_kv_transfer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "engine/native/model/model.h"
#include "engine/native/sched/native_engine.h"
#include "engine/native/sched/stream_for_test.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

using testing::Eventually;
using testing::Request;
using testing::Stream;

constexpr const char* kModelDir = "../shared/models/stories260K/hf";

Result<EnginePtr> MakeEngine(KvTransferHooks hooks) {
  ModelLoadOptions lo;
  lo.num_threads = 1;
  DYN_ASSIGN_OR_RETURN(auto model, LoadModel(kModelDir, lo));
  NativeEngineOptions o;
  o.block_size = 4;
  o.kv_cache_bytes = 8u << 20;
  o.kv_transfer = std::move(hooks);
  return CreateNativeEngine(std::move(model), o);
}

std::vector<uint32_t> StoryPrompt(int n, uint32_t seed) { return testing::Prompt(n, seed, 500); }

// A prefill worker and a decode worker, each an engine with its WorkerKvTransfer and a request
// server (the decode side's server is not needed: releases go to the prefill side's).
struct Pair {
  std::unique_ptr<WorkerKvTransfer> prefill_t, decode_t;
  EnginePtr prefill, decode;
  std::unique_ptr<RequestServer> server;

  Status Start(const std::string& backend, std::chrono::milliseconds lease_timeout = std::chrono::seconds(30)) {
    WorkerKvTransferOptions po;
    po.role = WorkerRole::kPrefill;
    po.backend = backend;
    po.listen_host = "127.0.0.1";
    po.lease_timeout = lease_timeout;
    DYN_ASSIGN_OR_RETURN(prefill_t, WorkerKvTransfer::Create(po));
    DYN_ASSIGN_OR_RETURN(prefill, MakeEngine(prefill_t->hooks()));
    WorkerKvTransferOptions dopt;
    dopt.role = WorkerRole::kDecode;
    DYN_ASSIGN_OR_RETURN(decode_t, WorkerKvTransfer::Create(dopt));
    DYN_ASSIGN_OR_RETURN(decode, MakeEngine(decode_t->hooks()));
    RequestServerOptions so;
    so.host = "127.0.0.1";
    DYN_ASSIGN_OR_RETURN(server, RequestServer::Start(so));
    prefill_t->ServeReleases(*server, "127.0.0.1:" + std::to_string(server->port()), prefill);
    return Status::Ok();
  }

  ~Pair() {
    if (server) server->Stop();
    if (prefill) prefill->Shutdown();
    if (decode) decode->Shutdown();
    if (prefill_t) prefill_t->Stop();
    if (decode_t) decode_t->Stop();
  }

  // The prompt's prefill-only half on the prefill engine; `ps` gets its token and descriptor.
  void Prefill(const std::vector<uint32_t>& prompt, int max_tokens, Stream& ps) {
    PreprocessedRequest p = Request(prompt, max_tokens);
    p.phase = RequestPhase::kPrefillOnly;
    prefill->Generate(p, std::make_shared<RequestContext>("p"), ps.Sink());
    EXPECT_TRUE(ps.Wait());
  }

  // The decode half on the decode engine, importing what `ps` (a finished Prefill) describes.
  void Import(const std::vector<uint32_t>& prompt, int max_tokens, const Stream& ps, Stream& ds) {
    PreprocessedRequest d = Request(prompt, max_tokens);
    d.phase = RequestPhase::kDecodeImported;
    d.kv_transfer = ps.kv_transfer;
    d.first_token = ps.tokens.at(0);
    decode->Generate(d, std::make_shared<RequestContext>("d"), ds.Sink());
    EXPECT_TRUE(ds.Wait());
  }

  // Prefill on one engine, decode on the other: the whole output (first token included).
  std::vector<uint32_t> Disaggregated(const std::vector<uint32_t>& prompt, int max_tokens, std::string* error) {
    Stream ps;
    Prefill(prompt, max_tokens, ps);
    if (ps.tokens.size() != 1 || ps.kv_transfer.empty()) {
      *error = "prefill: " + ps.error;
      return ps.tokens;
    }
    Stream ds;
    Import(prompt, max_tokens, ps, ds);
    if (*ds.finish == FinishReason::kError) *error = ds.error;
    std::vector<uint32_t> out = ps.tokens;
    out.insert(out.end(), ds.tokens.begin(), ds.tokens.end());
    return out;
  }
};

std::vector<uint32_t> Aggregated(Engine& engine, const std::vector<uint32_t>& prompt, int max_tokens) {
  Stream s;
  engine.Generate(Request(prompt, max_tokens), std::make_shared<RequestContext>("a"), s.Sink());
  EXPECT_TRUE(s.Wait());
  return s.tokens;
}

class WorkerKvTransferTest : public ::testing::TestWithParam<std::string> {};

TEST_P(WorkerKvTransferTest, DisaggregatedEqualsAggregatedAndLeasesEnd) {
  Pair pair;
  ASSERT_TRUE(pair.Start(GetParam()).ok());
  auto agg = MakeEngine({});
  ASSERT_TRUE(agg.ok());
  for (int i = 0; i < 6; ++i) {
    const auto prompt = StoryPrompt(3 + 9 * i, 7 + i);  // 3..48 tokens: partial and full blocks
    std::string error;
    const auto got = pair.Disaggregated(prompt, 12, &error);
    EXPECT_EQ(error, "");
    EXPECT_EQ(got, Aggregated(**agg, prompt, 12)) << "prompt " << i;
  }
  // The decode side released every lease over the request plane.
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_leases == 0; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leased_blocks, 0);
  const EngineMetrics dm = pair.decode->Metrics();
  EXPECT_EQ(dm.kv_transfers, 6u);
  EXPECT_EQ(dm.kv_transfer_failures, 0u);
  EXPECT_GT(dm.kv_transfer_bytes, 0u);
  EXPECT_EQ(pair.decode_t->stats().transfers, 6u);
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
  (*agg)->Shutdown();
}

TEST_P(WorkerKvTransferTest, SecondPromptReusesTheDecodeSidePrefix) {
  Pair pair;
  ASSERT_TRUE(pair.Start(GetParam()).ok());
  const auto prompt = StoryPrompt(40, 3);
  std::string error;
  const auto first = pair.Disaggregated(prompt, 8, &error);
  ASSERT_EQ(error, "");
  const uint64_t bytes1 = pair.decode->Metrics().kv_transfer_bytes;
  const auto second = pair.Disaggregated(prompt, 8, &error);
  ASSERT_EQ(error, "");
  EXPECT_EQ(first, second);
  // 40 tokens = 10 full blocks of 4; all but the last are in the decode side's prefix cache.
  EXPECT_LT(pair.decode->Metrics().kv_transfer_bytes - bytes1, bytes1);
}

INSTANTIATE_TEST_SUITE_P(Backends, WorkerKvTransferTest, ::testing::Values("tcp", "shm"));

TEST(WorkerKvTransfer, LeaseExpiresWhenNobodyPulls) {
  Pair pair;
  ASSERT_TRUE(pair.Start("tcp", std::chrono::milliseconds(200)).ok());
  const auto prompt = StoryPrompt(30, 1);
  Stream ps;
  pair.Prefill(prompt, 8, ps);
  ASSERT_FALSE(ps.kv_transfer.empty());
  EXPECT_EQ(pair.prefill->Metrics().kv_leases, 1);
  EXPECT_GT(pair.prefill->Metrics().kv_leased_blocks, 0);
  EXPECT_TRUE(Eventually([&] { return pair.prefill->Metrics().kv_leases == 0; }));
  EXPECT_EQ(pair.prefill->Metrics().kv_leased_blocks, 0);
  // A copy made after the lease expired may hold another prompt's KV by now: the decode side
  // learns it from the release and fails the request instead of decoding from it.
  Stream ds;
  pair.Import(prompt, 8, ps, ds);
  EXPECT_EQ(*ds.finish, FinishReason::kError);
  EXPECT_NE(ds.error.find("lease expired"), std::string::npos) << ds.error;
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
}

TEST(WorkerKvTransfer, DeadSourceFailsThePullWithUnavailable) {
  Pair pair;
  ASSERT_TRUE(pair.Start("tcp").ok());
  const auto prompt = StoryPrompt(30, 2);
  Stream ps;
  pair.Prefill(prompt, 8, ps);
  ASSERT_FALSE(ps.kv_transfer.empty());
  pair.prefill_t->Stop();  // the source goes away before the decode side pulls
  Stream ds;
  pair.Import(prompt, 8, ps, ds);
  EXPECT_EQ(*ds.finish, FinishReason::kError);
  EXPECT_EQ(ds.error.rfind("Unavailable", 0), 0u) << ds.error;
  EXPECT_EQ(pair.decode->Metrics().kv_transfer_failures, 1u);
  EXPECT_TRUE(Eventually([&] { return pair.decode->Metrics().kv_blocks_used == 0; }));
}

TEST(WorkerKvTransfer, LayoutMismatchIsRefusedWithAClearError) {
  KvTransferDescriptor d;
  d.backend = "tcp";
  d.address = "127.0.0.1:1";
  d.layout.block_size = 4;
  d.layout.num_layers = 5;
  d.layout.num_kv_heads = 4;
  d.layout.head_dim = 16;
  d.layout.block_bytes = 4 * 5 * 2 * 4 * 16 * 4;
  d.block_ids = {0, 1};
  d.num_tokens = 8;
  Pair pair;
  ASSERT_TRUE(pair.Start("tcp").ok());
  PreprocessedRequest r = Request(StoryPrompt(8, 9), 4);
  r.phase = RequestPhase::kDecodeImported;
  r.kv_transfer = EncodeDescriptor(d);
  r.first_token = 1;
  Stream s;
  pair.decode->Generate(r, std::make_shared<RequestContext>("d"), s.Sink());
  ASSERT_TRUE(s.Wait());
  EXPECT_EQ(*s.finish, FinishReason::kError);
  EXPECT_NE(s.error.find("kv layout mismatch"), std::string::npos) << s.error;
}

TEST(WorkerKvTransfer, ReleasePayload) {
  auto id = DecodeKvRelease(EncodeKvRelease(18446744073709551615ull));
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 18446744073709551615ull);
  EXPECT_FALSE(DecodeKvRelease("{\"lease_id\": 5}").ok());
  EXPECT_FALSE(DecodeKvRelease("{\"lease_id\": \"5x\"}").ok());
  EXPECT_FALSE(DecodeKvRelease("not json").ok());
  EXPECT_FALSE(ParseWorkerRole("both-ways").ok());
  EXPECT_EQ(*ParseWorkerRole("agg"), WorkerRole::kAggregated);
  WorkerKvTransferOptions rdma;
  rdma.backend = "rdma";
  EXPECT_FALSE(WorkerKvTransfer::Create(rdma).ok());
}

}  // namespace
}  // namespace dyn
