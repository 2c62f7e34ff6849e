// Backend-specific behaviour: TCP connection reuse and failures midway (with hand-written fake
// sources that misbehave on purpose), shared memory naming, unlinking and header checks.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <numeric>
#include <thread>

#include "transfer/kv_transfer.h"
#include "transfer/transfer_internal.h"

namespace dyn {
namespace {

using namespace transfer_internal;
using Clock = std::chrono::steady_clock;

KvLayoutDesc Layout() {
  KvLayoutDesc l;
  l.block_size = 16;
  l.num_layers = 4;
  l.num_kv_heads = 2;
  l.head_dim = 16;
  l.block_bytes = 4 * 2 * 16 * 2 * 16 * 4;  // 16 KiB
  return l;
}

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A TCP server on 127.0.0.1 that runs `serve(fd)` for each accepted connection, one at a time.
class FakeSource {
 public:
  explicit FakeSource(std::function<void(int)> serve) : serve_(std::move(serve)) {
    listener_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listener_.get(), 8), 0);
    socklen_t len = sizeof(addr);
    ::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    address_ = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
    thread_ = std::thread([this] {
      for (;;) {
        int fd = ::accept(listener_.get(), nullptr, nullptr);
        if (fd < 0) return;
        serve_(fd);
        ::close(fd);
      }
    });
  }
  ~FakeSource() {
    ::shutdown(listener_.get(), SHUT_RDWR);
    thread_.join();
  }
  const std::string& address() const { return address_; }

 private:
  std::function<void(int)> serve_;
  UniqueFd listener_;
  std::string address_;
  std::thread thread_;
};

// Reads one request frame; returns its block count.
uint32_t ReadRequest(int fd) {
  RequestHeader req;
  std::vector<iovec> head{{&req, sizeof(req)}};
  if (!RecvAll(fd, head).ok()) return 0;
  std::vector<char> rest(req.layout_bytes + req.num_blocks * sizeof(int32_t));
  std::vector<iovec> body{{rest.data(), rest.size()}};
  (void)RecvAll(fd, body);
  return req.num_blocks;
}

KvTransferDescriptor TcpDescriptor(const std::string& address) {
  KvTransferDescriptor d;
  d.backend = "tcp";
  d.address = address;
  d.layout = Layout();
  return d;
}

TEST(TcpTransfer, ConnectionDroppedMidwayFailsCleanly) {
  FakeSource fake([](int fd) {
    uint32_t n = ReadRequest(fd);
    ResponseHeader resp;
    resp.payload_bytes = n * Layout().block_bytes;
    std::vector<char> half(resp.payload_bytes / 2, 'x');
    std::vector<iovec> out{{&resp, sizeof(resp)}, {half.data(), half.size()}};
    (void)SendAll(fd, out);  // then close: the sink sees the stream end midway
  });
  std::vector<char> local(Layout().block_bytes * 8);
  KvRegion region{local.data(), Layout().block_bytes, 8};
  std::vector<int32_t> ids = {0, 1, 2, 3};
  TcpPuller puller(KvSinkOptions{});
  const auto start = Clock::now();
  Status st = puller.Pull(fake.address(), Layout(), ids, ids, region);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "after 32768 of 65536 bytes")) << st.message();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  EXPECT_EQ(puller.IdleConnections(fake.address()), 0u);  // a broken connection is not cached
}

TEST(TcpTransfer, StalledSourceTimesOut) {
  FakeSource fake([](int fd) {
    ReadRequest(fd);
    char c;
    (void)::recv(fd, &c, 1, 0);  // never answers; returns when the sink gives up and closes
  });
  std::vector<char> local(Layout().block_bytes * 2);
  KvRegion region{local.data(), Layout().block_bytes, 2};
  std::vector<int32_t> ids = {0};
  TcpPuller puller(KvSinkOptions{.connect_timeout_ms = 1000, .io_timeout_ms = 300});
  const auto start = Clock::now();
  Status st = puller.Pull(fake.address(), Layout(), ids, ids, region);
  EXPECT_EQ(st.code(), StatusCode::kDeadlineExceeded) << st.ToString();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  EXPECT_EQ(puller.IdleConnections(fake.address()), 0u);
}

TEST(TcpTransfer, ConnectionsAreReusedAndRefusalsKeepThem) {
  std::vector<char> bytes(Layout().block_bytes * 16, 'a');
  KvRegion source{bytes.data(), Layout().block_bytes, 16};
  auto server = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1"});
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  const std::string address = (*server)->address();
  std::vector<char> local(Layout().block_bytes * 16);
  KvRegion region{local.data(), Layout().block_bytes, 16};
  TcpPuller puller(KvSinkOptions{});
  std::vector<int32_t> ids = {1, 2, 3};
  ASSERT_TRUE(puller.Pull(address, Layout(), ids, ids, region).ok());
  ASSERT_TRUE(puller.Pull(address, Layout(), ids, ids, region).ok());
  EXPECT_EQ(puller.IdleConnections(address), 1u);
  std::vector<int32_t> bad = {1, 99, 3};
  EXPECT_EQ(puller.Pull(address, Layout(), bad, ids, region).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(puller.IdleConnections(address), 1u);
  ASSERT_TRUE(puller.Pull(address, Layout(), ids, ids, region).ok());
  EXPECT_EQ(local[Layout().block_bytes * 2], 'a');
}

TEST(TcpTransfer, StaleCachedConnectionIsRetriedOnAFreshOne) {
  std::vector<char> bytes(Layout().block_bytes * 4, 'b');
  KvRegion source{bytes.data(), Layout().block_bytes, 4};
  auto first = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1"});
  ASSERT_TRUE(first.ok());
  const std::string address = (*first)->address();
  const int port = SplitHostPort(address)->second;
  std::vector<char> local(Layout().block_bytes * 4);
  KvRegion region{local.data(), Layout().block_bytes, 4};
  TcpPuller puller(KvSinkOptions{});
  std::vector<int32_t> ids = {0};
  ASSERT_TRUE(puller.Pull(address, Layout(), ids, ids, region).ok());
  first->reset();  // the source restarts on the same port; the cached connection is dead
  std::fill(bytes.begin(), bytes.end(), 'c');
  auto second = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1", .port = port});
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  Status st = puller.Pull(address, Layout(), ids, ids, region);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(local[0], 'c');
}

TEST(TcpTransfer, ConnectionClosedBeforeTheAnswerIsRetriedOnce) {
  // Answers the first request, then closes the connection on reading the second one without a
  // reply (a source restarting between two pulls); later connections are served normally.
  std::atomic<int> requests{0};
  FakeSource fake([&](int fd) {
    for (;;) {
      uint32_t n = ReadRequest(fd);
      if (n == 0) return;
      if (++requests == 2) return;
      ResponseHeader resp;
      resp.payload_bytes = n * Layout().block_bytes;
      std::vector<char> payload(resp.payload_bytes, 'z');
      std::vector<iovec> out{{&resp, sizeof(resp)}, {payload.data(), payload.size()}};
      if (!SendAll(fd, out).ok()) return;
    }
  });
  std::vector<char> local(Layout().block_bytes);
  KvRegion region{local.data(), Layout().block_bytes, 1};
  std::vector<int32_t> ids = {0};
  TcpPuller puller(KvSinkOptions{});
  ASSERT_TRUE(puller.Pull(fake.address(), Layout(), ids, ids, region).ok());
  local[0] = 0;
  Status st = puller.Pull(fake.address(), Layout(), ids, ids, region);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(requests.load(), 3);
  EXPECT_EQ(local[0], 'z');
}

TEST(TcpTransfer, IdleConnectionsToStoppedSourcesAreClosed) {
  std::vector<char> bytes(Layout().block_bytes * 2, 'f');
  KvRegion source{bytes.data(), Layout().block_bytes, 2};
  auto a = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1"});
  auto b = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1"});
  ASSERT_TRUE(a.ok() && b.ok());
  const std::string address_a = (*a)->address();
  std::vector<char> local(Layout().block_bytes * 2);
  KvRegion region{local.data(), Layout().block_bytes, 2};
  TcpPuller puller(KvSinkOptions{});
  std::vector<int32_t> ids = {1};
  ASSERT_TRUE(puller.Pull(address_a, Layout(), ids, ids, region).ok());
  EXPECT_EQ(puller.IdleConnections(address_a), 1u);
  a->reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the FIN arrive
  ASSERT_TRUE(puller.Pull((*b)->address(), Layout(), ids, ids, region).ok());
  EXPECT_EQ(puller.IdleConnections(address_a), 0u);
  EXPECT_EQ(puller.IdleConnections((*b)->address()), 1u);
}

TEST(TcpTransfer, StopDuringATransferDoesNotHang) {
  // 64 MB served to a client that never reads: the source thread blocks in send until Stop.
  constexpr int kBlocks = 4096;
  std::vector<char> bytes(Layout().block_bytes * kBlocks, 'd');
  KvRegion source{bytes.data(), Layout().block_bytes, kBlocks};
  auto server = StartTcpKvSource(source, Layout(), TcpSourceOptions{.host = "127.0.0.1"});
  ASSERT_TRUE(server.ok());
  Result<UniqueFd> client = ConnectTcp((*server)->address(), 1000);
  ASSERT_TRUE(client.ok());
  std::string layout = EncodeLayout(Layout());
  std::vector<int32_t> ids(kBlocks);
  std::iota(ids.begin(), ids.end(), 0);
  RequestHeader req;
  req.layout_bytes = static_cast<uint32_t>(layout.size());
  req.num_blocks = kBlocks;
  std::vector<iovec> out{{&req, sizeof(req)}, {layout.data(), layout.size()}, {ids.data(), ids.size() * 4}};
  ASSERT_TRUE(SendAll(client->get(), out).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto start = Clock::now();
  (*server)->Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  // The client gets a truncated stream, then the end.
  std::vector<char> sink(bytes.size() + sizeof(ResponseHeader));
  std::vector<iovec> in{{sink.data(), sink.size()}};
  size_t got = 0;
  SetIoTimeouts(client->get(), 2000, 0);
  EXPECT_FALSE(RecvAll(client->get(), in, &got).ok());
  EXPECT_LT(got, sink.size());
}

TEST(TcpTransfer, PullFromNothingIsUnavailable) {
  std::vector<char> local(Layout().block_bytes);
  KvRegion region{local.data(), Layout().block_bytes, 1};
  auto sink = CreateKvTransferSink();
  std::vector<int32_t> ids = {0};
  Status st = sink->Pull(TcpDescriptor("127.0.0.1:1"), ids, ids, Layout(), region);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "127.0.0.1:1"));
}

TEST(ShmTransfer, NamesAreUniqueAndUnlinkedOnStop) {
  auto a = SharedKvMemory::Create(Layout().block_bytes * 4);
  auto b = SharedKvMemory::Create(Layout().block_bytes * 4);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->name(), (*b)->name());
  EXPECT_EQ((*a)->name().rfind("/dyn-kv-" + std::to_string(::getpid()) + "-", 0), 0u) << (*a)->name();
  EXPECT_EQ((*a)->size(), Layout().block_bytes * 4);
  std::memset((*a)->data(), 'e', (*a)->size());
  KvRegion region{(*a)->data(), Layout().block_bytes, 4};
  auto source = StartShmKvSource(**a, region, Layout());
  ASSERT_TRUE(source.ok());
  EXPECT_FALSE(StartShmKvSource(**a, region, Layout()).ok());  // published once
  int fd = ::shm_open((*a)->name().c_str(), O_RDONLY, 0);
  EXPECT_GE(fd, 0);
  if (fd >= 0) ::close(fd);
  (*source)->Stop();
  EXPECT_LT(::shm_open((*a)->name().c_str(), O_RDONLY, 0), 0);
  // A memory whose source never started is unlinked when it goes away.
  const std::string name_b = (*b)->name();
  b->reset();
  EXPECT_LT(::shm_open(name_b.c_str(), O_RDONLY, 0), 0);
}

TEST(ShmTransfer, RegionMustLieInsideTheMemory) {
  auto mem = SharedKvMemory::Create(Layout().block_bytes * 4);
  ASSERT_TRUE(mem.ok());
  KvRegion too_big{(*mem)->data(), Layout().block_bytes, 5};
  EXPECT_EQ(StartShmKvSource(**mem, too_big, Layout()).status().code(), StatusCode::kInvalidArgument);
  std::vector<char> elsewhere(Layout().block_bytes);
  KvRegion outside{elsewhere.data(), Layout().block_bytes, 1};
  EXPECT_FALSE(StartShmKvSource(**mem, outside, Layout()).ok());
}

TEST(ShmTransfer, RegionAtAnOffsetAndAStoppedSource) {
  auto mem = SharedKvMemory::Create(Layout().block_bytes * 9);
  ASSERT_TRUE(mem.ok());
  char* data = static_cast<char*>((*mem)->data());
  for (int b = 0; b < 9; ++b) std::memset(data + b * Layout().block_bytes, 'A' + b, Layout().block_bytes);
  KvRegion region{data + Layout().block_bytes, Layout().block_bytes, 8};  // the region skips block 0
  auto source = StartShmKvSource(**mem, region, Layout());
  ASSERT_TRUE(source.ok());
  std::vector<char> local(Layout().block_bytes * 2);
  KvRegion dst_region{local.data(), Layout().block_bytes, 2};
  ShmPuller puller;
  std::vector<int32_t> src = {7, 0};
  std::vector<int32_t> dst = {0, 1};
  ASSERT_TRUE(puller.Pull((*mem)->name(), Layout(), src, dst, dst_region).ok());
  EXPECT_EQ(local[0], 'I');  // region block 7 = memory block 8
  EXPECT_EQ(local[Layout().block_bytes], 'B');
  EXPECT_EQ(puller.MappedSegments(), 1u);
  (*source)->Stop();
  Status st = puller.Pull((*mem)->name(), Layout(), src, dst, dst_region);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_EQ(puller.MappedSegments(), 0u);  // the dead mapping was dropped
}

TEST(ShmTransfer, StoppedSourcesMappingsAreDroppedWhenMappingAnother) {
  std::vector<std::unique_ptr<SharedKvMemory>> mems;
  std::vector<std::unique_ptr<KvTransferSource>> sources;
  for (int i = 0; i < 3; ++i) {
    auto mem = SharedKvMemory::Create(Layout().block_bytes);
    ASSERT_TRUE(mem.ok());
    auto source = StartShmKvSource(**mem, KvRegion{(*mem)->data(), Layout().block_bytes, 1}, Layout());
    ASSERT_TRUE(source.ok());
    mems.push_back(std::move(*mem));
    sources.push_back(std::move(*source));
  }
  std::vector<char> local(Layout().block_bytes);
  KvRegion region{local.data(), Layout().block_bytes, 1};
  std::vector<int32_t> ids = {0};
  ShmPuller puller;
  ASSERT_TRUE(puller.Pull(mems[0]->name(), Layout(), ids, ids, region).ok());
  ASSERT_TRUE(puller.Pull(mems[1]->name(), Layout(), ids, ids, region).ok());
  EXPECT_EQ(puller.MappedSegments(), 2u);
  sources[0]->Stop();
  ASSERT_TRUE(puller.Pull(mems[2]->name(), Layout(), ids, ids, region).ok());
  EXPECT_EQ(puller.MappedSegments(), 2u);  // 1 and 2; 0's mapping was released
}

TEST(ShmTransfer, SourceInAnotherProcessAndItsOrphanedSegment) {
  int name_pipe[2], go_pipe[2];
  ASSERT_EQ(::pipe(name_pipe), 0);
  ASSERT_EQ(::pipe(go_pipe), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The source process: publishes a segment, then dies without stopping it.
    auto mem = SharedKvMemory::Create(Layout().block_bytes * 2);
    if (!mem.ok()) ::_exit(1);
    std::memset((*mem)->data(), 'q', (*mem)->size());
    auto source = StartShmKvSource(**mem, KvRegion{(*mem)->data(), Layout().block_bytes, 2}, Layout());
    if (!source.ok()) ::_exit(1);
    const std::string name = (*mem)->name();
    if (::write(name_pipe[1], name.data(), name.size()) != static_cast<ssize_t>(name.size())) ::_exit(1);
    ::close(name_pipe[1]);
    char c;
    (void)::read(go_pipe[0], &c, 1);
    ::_exit(0);  // no destructors: the name stays in /dev/shm
  }
  ::close(name_pipe[1]);
  ::close(go_pipe[0]);
  char buf[128] = {};
  ssize_t n = ::read(name_pipe[0], buf, sizeof(buf) - 1);
  ::close(name_pipe[0]);
  ASSERT_GT(n, 0);
  const std::string name(buf, static_cast<size_t>(n));
  EXPECT_EQ(name.rfind("/dyn-kv-" + std::to_string(child) + "-", 0), 0u) << name;
  std::vector<char> local(Layout().block_bytes * 2);
  KvRegion region{local.data(), Layout().block_bytes, 2};
  std::vector<int32_t> src = {1, 0};
  std::vector<int32_t> dst = {0, 1};
  ShmPuller puller;
  ASSERT_TRUE(puller.Pull(name, Layout(), src, dst, region).ok());
  EXPECT_EQ(local[0], 'q');
  ASSERT_EQ(::write(go_pipe[1], "x", 1), 1);
  ::close(go_pipe[1]);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  // The mapping outlives its source process.
  local[0] = 0;
  EXPECT_TRUE(puller.Pull(name, Layout(), src, dst, region).ok());
  EXPECT_EQ(local[0], 'q');
  EXPECT_GE(RemoveOrphanedSharedKvMemory(), 1);
  EXPECT_LT(::shm_open(name.c_str(), O_RDONLY, 0), 0);
  ShmPuller fresh;
  EXPECT_EQ(fresh.Pull(name, Layout(), src, dst, region).code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace dyn
