// Tests for the KV transfer layer: layouts and descriptors, coalescing, and real round trips over
// both backends (TCP on loopback, POSIX shared memory), including refusals and failures.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <thread>

#include "transfer/kv_transfer.h"
#include "transfer/transfer_internal.h"

namespace dyn {
namespace {

using namespace transfer_internal;
using Clock = std::chrono::steady_clock;

// 2 layers * K|V * 4 tokens * 2 heads * 8 dims * 4 B = 1 KiB blocks.
KvLayoutDesc TestLayout() {
  KvLayoutDesc l;
  l.block_size = 4;
  l.num_layers = 2;
  l.num_kv_heads = 2;
  l.head_dim = 8;
  l.dtype = "f32";
  l.block_bytes = 2 * 2 * 4 * 2 * 8 * 4;
  return l;
}

void FillRandom(void* p, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<unsigned char>(rng());
}

bool BlockEquals(const KvRegion& a, int32_t ia, const KvRegion& b, int32_t ib) {
  return std::memcmp(static_cast<char*>(a.base) + ia * a.block_bytes, static_cast<char*>(b.base) + ib * b.block_bytes,
                     a.block_bytes) == 0;
}

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// ---- layouts, descriptors, coalescing ----

TEST(KvLayout, CheckCompatibleNamesTheField) {
  const KvLayoutDesc a = TestLayout();
  EXPECT_TRUE(a.CheckCompatible(a).ok());
  KvLayoutDesc b = a;
  b.head_dim = 16;
  Status s = a.CheckCompatible(b);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "kv layout mismatch: head_dim 8 vs 16");
  b = a;
  b.dtype = "bf16";
  EXPECT_TRUE(Contains(a.CheckCompatible(b).message(), "dtype f32 vs bf16"));
  b = a;
  b.num_layers = 3;
  EXPECT_TRUE(Contains(a.CheckCompatible(b).message(), "num_layers"));
  b = a;
  b.block_bytes = 1;
  EXPECT_TRUE(Contains(a.CheckCompatible(b).message(), "block_bytes 1024 vs 1"));
  EXPECT_EQ(a.ToString(), "block_size=4 layers=2 kv_heads=2 head_dim=8 dtype=f32 block_bytes=1024");
}

TEST(KvDescriptor, RoundTripsWith64BitValuesAsStrings) {
  KvTransferDescriptor d;
  d.backend = "tcp";
  d.address = "10.0.0.7:5601";
  d.lease_id = (1ULL << 63) + 5;
  d.block_ids = {7, 0, 3, 2147483647};
  d.num_tokens = 13;
  d.layout = TestLayout();
  d.layout.block_bytes = (1ULL << 40) + 1;
  const std::string json = EncodeDescriptor(d);
  EXPECT_TRUE(Contains(json, "\"lease_id\":\"9223372036854775813\"")) << json;
  EXPECT_TRUE(Contains(json, "\"block_bytes\":\"1099511627777\"")) << json;
  Result<KvTransferDescriptor> back = DecodeDescriptor(json);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->backend, "tcp");
  EXPECT_EQ(back->address, d.address);
  EXPECT_EQ(back->lease_id, d.lease_id);
  EXPECT_EQ(back->block_ids, d.block_ids);
  EXPECT_EQ(back->num_tokens, 13);
  EXPECT_TRUE(back->layout.CheckCompatible(d.layout).ok());
}

TEST(KvDescriptor, RejectsBadInput) {
  EXPECT_FALSE(DecodeDescriptor("not json").ok());
  EXPECT_FALSE(DecodeDescriptor("[]").ok());
  KvTransferDescriptor d;
  d.backend = "shm";
  d.address = "/dyn-kv-1-0";
  d.layout = TestLayout();
  std::string good = EncodeDescriptor(d);
  ASSERT_TRUE(DecodeDescriptor(good).ok());
  std::string neg = good;
  neg.replace(neg.find("\"block_ids\":[]"), 14, "\"block_ids\":[-1]");
  Result<KvTransferDescriptor> r = DecodeDescriptor(neg);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status().message(), "block_ids"));
  std::string bad_lease = good;
  bad_lease.replace(bad_lease.find("\"lease_id\":\"0\""), 14, "\"lease_id\":\"12x\"");
  r = DecodeDescriptor(bad_lease);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status().message(), "lease_id"));
}

TEST(Coalesce, RunsAndPairs) {
  const std::vector<int32_t> ids = {3, 4, 5, 9, 1, 2, 2};
  EXPECT_EQ(CoalesceRuns(ids), (std::vector<BlockRun>{{3, 3}, {9, 1}, {1, 2}, {2, 1}}));
  EXPECT_TRUE(CoalesceRuns({}).empty());
  const std::vector<int32_t> src = {10, 11, 12, 13, 20};
  const std::vector<int32_t> dst = {0, 1, 5, 6, 7};
  EXPECT_EQ(CoalescePairs(src, dst), (std::vector<PairRun>{{10, 0, 2}, {12, 5, 2}, {20, 7, 1}}));
  EXPECT_TRUE(CheckIds(ids, 10, "x").ok());
  Status s = CheckIds(ids, 9, "source");
  EXPECT_EQ(s.message(), "source block id 9 (index 3) is out of range [0, 9)");
}

TEST(ParallelCopy, EqualsSerialCopiesForAnySplit) {
  std::mt19937 rng(5);
  std::vector<char> src(1 << 16), dst(1 << 16, 0), want(1 << 16, 0);
  for (char& c : src) c = static_cast<char>(rng());
  // Spans of varied sizes (some empty), scattered, not overlapping on either side.
  std::vector<CopySpan> spans;
  size_t at_src = 0, at_dst = 7;
  for (size_t len : {size_t{0}, size_t{1}, size_t{31}, size_t{4096}, size_t{0}, size_t{12345}, size_t{3}, size_t{20000}}) {
    spans.push_back({dst.data() + at_dst, src.data() + at_src, len});
    std::memcpy(want.data() + at_dst, src.data() + at_src, len);
    at_src += len + 13;
    at_dst += len + 29;
  }
  for (int threads : {1, 2, 3, 4, 7, 64}) {
    std::fill(dst.begin(), dst.end(), 0);
    ParallelCopy(spans, threads);
    EXPECT_EQ(dst, want) << threads << " threads";
  }
  EXPECT_EQ(CopyThreadsFor(1 << 20), 1);
  EXPECT_GE(CopyThreadsFor(size_t{1} << 30), 1);
  EXPECT_LE(CopyThreadsFor(size_t{1} << 30), 8);
}

TEST(Sockets, SplitHostPort) {
  EXPECT_EQ(SplitHostPort("127.0.0.1:80")->first, "127.0.0.1");
  EXPECT_EQ(SplitHostPort("127.0.0.1:80")->second, 80);
  EXPECT_EQ(SplitHostPort("[::1]:5601")->first, "::1");
  EXPECT_FALSE(SplitHostPort("host").ok());
  EXPECT_FALSE(SplitHostPort("host:0").ok());
  EXPECT_FALSE(SplitHostPort("host:99999").ok());
  EXPECT_FALSE(SplitHostPort(":80").ok());
}

// ---- round trips over both backends ----

constexpr int kSourceBlocks = 256;
constexpr int kLocalBlocks = 192;

// A source region with random contents served by one backend, and a local (destination) region.
struct Endpoints {
  std::unique_ptr<SharedKvMemory> shm;
  std::vector<char> source_bytes;
  KvRegion source;
  std::unique_ptr<KvTransferSource> server;
  std::vector<char> local_bytes;
  KvRegion local;
  KvTransferDescriptor desc;
};

Endpoints MakeEndpoints(const std::string& backend) {
  Endpoints s;
  const KvLayoutDesc layout = TestLayout();
  const size_t bytes = layout.block_bytes * kSourceBlocks;
  if (backend == "shm") {
    auto mem = SharedKvMemory::Create(bytes);
    EXPECT_TRUE(mem.ok()) << mem.status().ToString();
    s.shm = std::move(*mem);
    s.source = {s.shm->data(), layout.block_bytes, kSourceBlocks};
  } else {
    s.source_bytes.resize(bytes);
    s.source = {s.source_bytes.data(), layout.block_bytes, kSourceBlocks};
  }
  FillRandom(s.source.base, bytes, 42);
  auto server = backend == "shm" ? StartShmKvSource(*s.shm, s.source, layout)
                                 : StartTcpKvSource(s.source, layout, TcpSourceOptions{.host = "127.0.0.1"});
  EXPECT_TRUE(server.ok()) << server.status().ToString();
  s.server = std::move(*server);
  s.local_bytes.assign(layout.block_bytes * kLocalBlocks, 0);
  s.local = {s.local_bytes.data(), layout.block_bytes, kLocalBlocks};
  s.desc.backend = s.server->backend();
  s.desc.address = s.server->address();
  s.desc.layout = layout;
  return s;
}

class KvTransferRoundTrip : public ::testing::TestWithParam<std::string> {};

TEST_P(KvTransferRoundTrip, ConsecutiveAndScatteredAndPermuted) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  // Consecutive on both sides: one run.
  std::vector<int32_t> src(40), dst(40);
  std::iota(src.begin(), src.end(), 100);
  std::iota(dst.begin(), dst.end(), 7);
  ASSERT_TRUE(sink->Pull(s.desc, src, dst, TestLayout(), s.local).ok());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_TRUE(BlockEquals(s.source, src[i], s.local, dst[i])) << i;
  // Scattered source ids into a permutation of destination blocks, some runs mixed in.
  std::mt19937 rng(7);
  std::vector<int32_t> all(kSourceBlocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  src.assign(all.begin(), all.begin() + 120);
  src.insert(src.end(), {200, 201, 202, 203});
  dst.resize(src.size());
  std::iota(dst.begin(), dst.end(), 0);
  std::shuffle(dst.begin(), dst.begin() + 120, rng);
  ASSERT_TRUE(sink->Pull(s.desc, src, dst, TestLayout(), s.local).ok());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_TRUE(BlockEquals(s.source, src[i], s.local, dst[i])) << i;
  // The same block twice is allowed (two destinations).
  std::vector<int32_t> twice = {5, 5};
  std::vector<int32_t> two_dst = {190, 191};
  ASSERT_TRUE(sink->Pull(s.desc, twice, two_dst, TestLayout(), s.local).ok());
  EXPECT_TRUE(BlockEquals(s.source, 5, s.local, 191));
  TransferStats stats = SinkStats(*sink);
  EXPECT_EQ(stats.transfers, 3u);
  EXPECT_EQ(stats.bytes, (40 + 124 + 2) * TestLayout().block_bytes);
  EXPECT_GT(stats.seconds, 0);
}

TEST_P(KvTransferRoundTrip, ZeroBlocksIsOk) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  EXPECT_TRUE(sink->Pull(s.desc, {}, {}, TestLayout(), s.local).ok());
  EXPECT_EQ(SinkStats(*sink).bytes, 0u);
}

TEST_P(KvTransferRoundTrip, LayoutMismatchIsRefused) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  std::vector<int32_t> ids = {1, 2};
  // Caught at the sink from the descriptor.
  KvLayoutDesc other = TestLayout();
  other.num_kv_heads = 1;
  other.block_bytes /= 2;
  KvRegion half = {s.local.base, other.block_bytes, kLocalBlocks};
  Status st = sink->Pull(s.desc, ids, ids, other, half);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "num_kv_heads")) << st.message();
  // A descriptor that lies about the layout: the source (its header, for shm) refuses.
  KvTransferDescriptor lying = s.desc;
  lying.layout = other;
  st = sink->Pull(lying, ids, ids, other, half);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "kv layout mismatch: num_kv_heads 2 vs 1")) << st.message();
  EXPECT_TRUE(Contains(st.message(), "refused")) << st.message();
  // Same shape but another dtype.
  KvLayoutDesc bf16 = TestLayout();
  bf16.dtype = "bf16";
  lying.layout = bf16;
  st = sink->Pull(lying, ids, ids, bf16, s.local);
  EXPECT_TRUE(Contains(st.message(), "dtype f32 vs bf16")) << st.message();
  // The region and its layout disagree.
  st = sink->Pull(s.desc, ids, ids, TestLayout(), half);
  EXPECT_TRUE(Contains(st.message(), "block_bytes")) << st.message();
}

TEST_P(KvTransferRoundTrip, OutOfRangeIdsAreRefused) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  std::vector<int32_t> src = {0, kSourceBlocks};
  std::vector<int32_t> dst = {0, 1};
  Status st = sink->Pull(s.desc, src, dst, TestLayout(), s.local);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "source block id 256 (index 1) is out of range [0, 256)")) << st.message();
  src = {0, -3};
  EXPECT_TRUE(Contains(sink->Pull(s.desc, src, dst, TestLayout(), s.local).message(), "block id -3"));
  src = {0, 1};
  dst = {0, kLocalBlocks};
  st = sink->Pull(s.desc, src, dst, TestLayout(), s.local);
  EXPECT_TRUE(Contains(st.message(), "destination block id 192")) << st.message();
  dst = {0};
  EXPECT_EQ(sink->Pull(s.desc, src, dst, TestLayout(), s.local).code(), StatusCode::kInvalidArgument);
  // Refusals leave the sink usable.
  dst = {0, 1};
  EXPECT_TRUE(sink->Pull(s.desc, src, dst, TestLayout(), s.local).ok());
  EXPECT_TRUE(BlockEquals(s.source, 1, s.local, 1));
  KvTransferDescriptor unknown = s.desc;
  unknown.backend = "carrier-pigeon";
  EXPECT_EQ(sink->Pull(unknown, src, dst, TestLayout(), s.local).code(), StatusCode::kUnsupported);
}

TEST_P(KvTransferRoundTrip, ConcurrentPullsFromSeveralThreads) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  constexpr int kThreads = 4;
  constexpr int kPulls = 25;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::vector<char> mine(TestLayout().block_bytes * 48);
      KvRegion local = {mine.data(), TestLayout().block_bytes, 48};
      for (int p = 0; p < kPulls; ++p) {
        std::vector<int32_t> src(1 + rng() % 48), dst(src.size());
        for (auto& id : src) id = static_cast<int32_t>(rng() % kSourceBlocks);
        std::iota(dst.begin(), dst.end(), 0);
        std::shuffle(dst.begin(), dst.end(), rng);
        if (!sink->Pull(s.desc, src, dst, TestLayout(), local).ok()) ++failures;
        for (size_t i = 0; i < src.size(); ++i) {
          if (!BlockEquals(s.source, src[i], local, dst[i])) ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(SinkStats(*sink).transfers, static_cast<uint64_t>(kThreads * kPulls));
}

TEST_P(KvTransferRoundTrip, StoppedSourceFailsTheNextPull) {
  Endpoints s = MakeEndpoints(GetParam());
  auto sink = CreateKvTransferSink();
  std::vector<int32_t> ids = {3, 4};
  ASSERT_TRUE(sink->Pull(s.desc, ids, ids, TestLayout(), s.local).ok());  // caches a connection/mapping
  s.server->Stop();
  const auto start = Clock::now();
  Status st = sink->Pull(s.desc, ids, ids, TestLayout(), s.local);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  s.server->Stop();  // idempotent
}

INSTANTIATE_TEST_SUITE_P(Backends, KvTransferRoundTrip, ::testing::Values("tcp", "shm"));

}  // namespace
}  // namespace dyn

namespace dyn {
namespace {

TEST(TcpKvSource, MaxBytesPerSecondPacesThePullAndKeepsTheData) {
  const KvLayoutDesc layout = TestLayout();
  std::vector<char> source_bytes(layout.block_bytes * kSourceBlocks);
  FillRandom(source_bytes.data(), source_bytes.size(), 3);
  const KvRegion source{source_bytes.data(), layout.block_bytes, kSourceBlocks};
  std::vector<int32_t> src(kLocalBlocks), dst(kLocalBlocks);
  std::iota(src.begin(), src.end(), 10);
  std::iota(dst.begin(), dst.end(), 0);
  const double bytes = static_cast<double>(src.size() * layout.block_bytes);
  const double rate = bytes / 0.25;  // the pull should take a quarter of a second
  auto server = StartTcpKvSource(source, layout, TcpSourceOptions{.host = "127.0.0.1", .max_bytes_per_second = rate});
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  KvTransferDescriptor desc;
  desc.backend = "tcp";
  desc.address = (*server)->address();
  desc.layout = layout;
  std::vector<char> local_bytes(layout.block_bytes * kLocalBlocks, 0);
  const KvRegion local{local_bytes.data(), layout.block_bytes, kLocalBlocks};
  auto sink = CreateKvTransferSink();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(sink->Pull(desc, src, dst, layout, local).ok());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // A lower bound only (the machine may be slower, never faster than the cap allows): the last
  // 64 KiB slice goes out when it is due, not when it is done.
  EXPECT_GE(seconds, 0.25 * (1.0 - (64 << 10) / bytes) - 0.01) << bytes << " bytes";
  for (size_t i = 0; i < src.size(); ++i) ASSERT_TRUE(BlockEquals(source, src[i], local, dst[i])) << i;
  (*server)->Stop();
}

}  // namespace
}  // namespace dyn
