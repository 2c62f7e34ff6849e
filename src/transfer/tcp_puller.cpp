// The TCP sink side: one request frame, one status frame, then the blocks read straight into the
// destination region. Connections are cached per source address and reused; one in use belongs to
// one Pull, so concurrent pulls to the same source each get their own connection.
#include <poll.h>
#include <sys/socket.h>

#include "transfer/transfer_internal.h"

namespace dyn::transfer_internal {

namespace {

constexpr size_t kMaxIdlePerAddress = 16;

// An idle connection has nothing to read; readable (EOF, reset, stray bytes) means it is dead.
bool LooksAlive(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 0;
}

}  // namespace

// Closes idle connections whose source went away, so addresses of stopped sources do not keep
// file descriptors forever.
void TcpPuller::DropDeadIdleLocked() {
  for (auto it = idle_.begin(); it != idle_.end();) {
    std::erase_if(it->second, [](const UniqueFd& fd) { return !LooksAlive(fd.get()); });
    it = it->second.empty() ? idle_.erase(it) : std::next(it);
  }
}

Status TcpPuller::Pull(const std::string& address, const KvLayoutDesc& local_layout, std::span<const int32_t> src,
                       std::span<const int32_t> dst, KvRegion local) {
  // A cached connection may have been closed by the source since its last use (restart, Stop);
  // that shows as a closed socket before any response byte, and the pull is retried once on a
  // fresh connection. Pulls are reads, so repeating one is harmless.
  for (int attempt = 0; attempt < 2; ++attempt) {
    UniqueFd fd;
    bool reused = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.find(address);
      while (it != idle_.end() && !it->second.empty() && !reused) {
        fd = std::move(it->second.back());
        it->second.pop_back();
        reused = LooksAlive(fd.get());
      }
      if (!reused) DropDeadIdleLocked();
    }
    if (!reused) {
      Result<UniqueFd> connected = ConnectTcp(address, options_.connect_timeout_ms, options_.socket_buffer_bytes);
      if (!connected.ok()) return connected.status().WithContext("kv pull from tcp source " + address);
      fd = std::move(*connected);
      SetIoTimeouts(fd.get(), options_.io_timeout_ms, options_.io_timeout_ms);
    }
    Stage stage = Stage::kBeforeResponse;
    IoFailure failure = IoFailure::kNone;
    Status status = PullOnce(fd.get(), address, local_layout, src, dst, local, &stage, &failure);
    if (status.ok() || stage == Stage::kRefused) {
      // The connection is at a frame boundary: keep it.
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<UniqueFd>& idle = idle_[address];
      if (idle.size() < kMaxIdlePerAddress) idle.push_back(std::move(fd));
      return status;
    }
    // Mid-frame failure: the connection is out of sync; `fd` closes here.
    if (reused && stage == Stage::kBeforeResponse && failure == IoFailure::kClosed) continue;
    return status;
  }
  return Status::Unavailable("kv pull from tcp source " + address + ": connection lost twice");
}

Status TcpPuller::PullOnce(int fd, const std::string& address, const KvLayoutDesc& local_layout,
                           std::span<const int32_t> src, std::span<const int32_t> dst, KvRegion local, Stage* stage,
                           IoFailure* failure) {
  const std::string where = "kv pull from tcp source " + address;
  std::string layout_json = EncodeLayout(local_layout);
  RequestHeader req;
  req.layout_bytes = static_cast<uint32_t>(layout_json.size());
  req.num_blocks = static_cast<uint32_t>(src.size());
  std::vector<iovec> out{{&req, sizeof(req)},
                         {layout_json.data(), layout_json.size()},
                         {const_cast<int32_t*>(src.data()), src.size() * sizeof(int32_t)}};
  DYN_RETURN_IF_ERROR(SendAll(fd, out, failure).WithContext(where));

  ResponseHeader resp;
  std::vector<iovec> head{{&resp, sizeof(resp)}};
  size_t got = 0;
  Status st = RecvAll(fd, head, &got, failure);
  if (!st.ok()) {
    if (got > 0) *stage = Stage::kPayload;
    return st.WithContext(where + " (waiting for the status frame)");
  }
  *stage = Stage::kPayload;
  if (resp.magic != kResponseMagic || resp.message_bytes > kMaxMessageBytes ||
      resp.status_code > static_cast<uint32_t>(StatusCode::kInternal)) {
    return Status::IoError(where + ": malformed status frame");
  }
  std::string message(resp.message_bytes, '\0');
  std::vector<iovec> msg{{message.data(), message.size()}};
  DYN_RETURN_IF_ERROR(RecvAll(fd, msg, nullptr, failure).WithContext(where));
  if (resp.status_code != 0) {
    *stage = resp.payload_bytes == 0 ? Stage::kRefused : Stage::kPayload;
    return Status(static_cast<StatusCode>(resp.status_code), where + " refused: " + message);
  }
  const uint64_t expected = static_cast<uint64_t>(dst.size()) * local.block_bytes;
  if (resp.payload_bytes != expected) {
    return Status::IoError(where + ": source announced " + std::to_string(resp.payload_bytes) + " bytes, expected " +
                           std::to_string(expected));
  }
  // Bytes arrive in request order; runs of consecutive destination ids are one iovec each.
  std::vector<iovec> in = RunsToIovecs(CoalesceRuns(dst), local);
  got = 0;
  st = RecvAll(fd, in, &got, failure);
  if (!st.ok()) {
    return st.WithContext(where + " after " + std::to_string(got) + " of " + std::to_string(expected) + " bytes");
  }
  *stage = Stage::kDone;
  return Status::Ok();
}

size_t TcpPuller::IdleConnections(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = idle_.find(address);
  return it == idle_.end() ? 0 : it->second.size();
}

}  // namespace dyn::transfer_internal
