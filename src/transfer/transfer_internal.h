// Pieces shared by the transfer backends (not part of the public interface; tests use them too):
// run coalescing, id checks, the TCP wire frames, socket helpers, and the per-backend pullers the
// sink dispatches to.
#pragma once

#include <sys/uio.h>

#include <bit>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "transfer/kv_transfer.h"

namespace dyn::transfer_internal {

static_assert(std::endian::native == std::endian::little, "the wire format is little-endian");

// ---- coalescing (pure) ----

// A run of consecutive block ids [first, first + count).
struct BlockRun {
  int32_t first = 0;
  int32_t count = 0;
  bool operator==(const BlockRun&) const = default;
};
std::vector<BlockRun> CoalesceRuns(std::span<const int32_t> ids);

// A run where both sides advance by one: src[first_src + k] -> dst[first_dst + k].
struct PairRun {
  int32_t src = 0;
  int32_t dst = 0;
  int32_t count = 0;
  bool operator==(const PairRun&) const = default;
};
std::vector<PairRun> CoalescePairs(std::span<const int32_t> src, std::span<const int32_t> dst);

// One memcpy of a transfer.
struct CopySpan {
  char* dst = nullptr;
  const char* src = nullptr;
  size_t bytes = 0;
};
// Performs `spans` (non-overlapping) with up to `threads` threads, the bytes split evenly between
// them (one memcpy a thread saturates neither the memory system nor a many-core host: a 512 MiB
// prompt's KV copied at ~10 GB/s is ~50 ms of time to first token).
void ParallelCopy(std::span<const CopySpan> spans, int threads);
// Threads for a copy of `bytes`: one per 32 MiB, at most 8 and at most the hardware's.
int CopyThreadsFor(size_t bytes);

// OK when every id is in [0, num_blocks); else InvalidArgument naming `what` and the first bad id.
Status CheckIds(std::span<const int32_t> ids, int num_blocks, std::string_view what);

// The memory of `runs` of `region` as iovecs (one per run).
std::vector<iovec> RunsToIovecs(const std::vector<BlockRun>& runs, const KvRegion& region);

// The layout as a JSON object text (used in descriptors and in TCP request frames).
std::string EncodeLayout(const KvLayoutDesc& layout);
Result<KvLayoutDesc> DecodeLayout(std::string_view json);

// ---- TCP wire frames (little-endian) ----
// request:  RequestHeader, layout JSON (layout_bytes), int32 block ids (num_blocks)
// response: ResponseHeader, message (message_bytes), payload (payload_bytes: the blocks in order)
constexpr uint32_t kRequestMagic = 0x5156'4B44;   // "DKVQ"
constexpr uint32_t kResponseMagic = 0x5256'4B44;  // "DKVR"
constexpr uint32_t kMaxLayoutBytes = 4096;
constexpr uint32_t kMaxRequestBlocks = 1u << 24;
constexpr uint32_t kMaxMessageBytes = 64 * 1024;

struct RequestHeader {
  uint32_t magic = kRequestMagic;
  uint32_t layout_bytes = 0;
  uint32_t num_blocks = 0;
  uint32_t reserved = 0;
};
struct ResponseHeader {
  uint32_t magic = kResponseMagic;
  uint32_t status_code = 0;  // StatusCode; 0 = OK and the payload follows
  uint32_t message_bytes = 0;
  uint32_t reserved = 0;
  uint64_t payload_bytes = 0;
};
static_assert(sizeof(RequestHeader) == 16 && sizeof(ResponseHeader) == 24);

// ---- sockets ----

// Owns a file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  ~UniqueFd();
  int get() const { return fd_; }
  int Release();

 private:
  int fd_ = -1;
};

// Why an I/O call failed, to tell a dead cached connection (retry) from a slow peer (don't).
enum class IoFailure { kNone, kClosed, kTimeout, kOther };

// Writes all of `iov` (sendmsg, MSG_NOSIGNAL, IOV_MAX at a time, partial writes resumed).
// `iov` is consumed.
Status SendAll(int fd, std::vector<iovec>& iov, IoFailure* failure = nullptr);
// Reads exactly the bytes `iov` describes; `received` counts what arrived before a failure.
Status RecvAll(int fd, std::vector<iovec>& iov, size_t* received = nullptr, IoFailure* failure = nullptr);

// TCP_NODELAY, and send/receive buffers of buffer_bytes (0: kernel autotuning).
void TuneSocket(int fd, int buffer_bytes);
void SetIoTimeouts(int fd, int recv_timeout_ms, int send_timeout_ms);
// Splits "host:port" / "[v6]:port".
Result<std::pair<std::string, int>> SplitHostPort(std::string_view address);
Result<UniqueFd> ConnectTcp(std::string_view address, int timeout_ms, int buffer_bytes = 0);

// ---- pullers (one per backend; the sink owns one of each) ----

class TcpPuller {
 public:
  explicit TcpPuller(const KvSinkOptions& options) : options_(options) {}
  Status Pull(const std::string& address, const KvLayoutDesc& local_layout, std::span<const int32_t> src,
              std::span<const int32_t> dst, KvRegion local);
  size_t IdleConnections(const std::string& address);

 private:
  void DropDeadIdleLocked();
  enum class Stage { kBeforeResponse, kRefused, kPayload, kDone };
  Status PullOnce(int fd, const std::string& address, const KvLayoutDesc& local_layout, std::span<const int32_t> src,
                  std::span<const int32_t> dst, KvRegion local, Stage* stage, IoFailure* failure);

  KvSinkOptions options_;
  std::mutex mu_;
  std::map<std::string, std::vector<UniqueFd>> idle_;  // address -> connections not in use
};

class ShmPuller {
 public:
  ~ShmPuller();
  Status Pull(const std::string& name, const KvLayoutDesc& local_layout, std::span<const int32_t> src,
              std::span<const int32_t> dst, KvRegion local);
  size_t MappedSegments();

  struct Mapping;  // a read-only mapping of one source's segment

 private:
  Result<std::shared_ptr<Mapping>> Map(const std::string& name, bool fresh);

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Mapping>> mappings_;
};

}  // namespace dyn::transfer_internal
