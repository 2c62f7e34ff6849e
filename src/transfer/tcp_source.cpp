// The TCP source: serves reads of a KV region. Blocking sockets, one thread per connection.
//
// Why not Asio: the work is a handful of long-lived connections (one per pulling decode thread)
// each streaming many megabytes with sendmsg over iovecs that point straight into the KV region.
// A blocking thread per connection does that with no buffering, no completion handlers and the
// fewest syscalls; an event loop would add nothing but a second copy of the control flow.
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <list>
#include <thread>

#include "base/log.h"
#include "transfer/transfer_internal.h"

namespace dyn {

using namespace transfer_internal;

namespace {

class TcpKvSource final : public KvTransferSource {
 public:
  TcpKvSource(KvRegion region, KvLayoutDesc layout, TcpSourceOptions options, UniqueFd listener, int port)
      : region_(region), layout_(std::move(layout)), options_(std::move(options)), listener_(std::move(listener)) {
    address_ = options_.advertise_host.find(':') != std::string::npos
                   ? "[" + options_.advertise_host + "]:" + std::to_string(port)
                   : options_.advertise_host + ":" + std::to_string(port);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~TcpKvSource() override { Stop(); }

  std::string backend() const override { return "tcp"; }
  std::string address() const override { return address_; }

  void Stop() override {
    if (stopped_.exchange(true)) return;
    // shutdown() wakes the threads blocked in accept/recv/send; they then exit.
    ::shutdown(listener_.get(), SHUT_RDWR);
    accept_thread_.join();
    std::list<Connection> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (Connection& c : conns_) ::shutdown(c.fd, SHUT_RDWR);
      conns.splice(conns.end(), conns_);
    }
    for (Connection& c : conns) {
      c.thread.join();
      ::close(c.fd);
    }
  }

 private:
  struct Connection {
    int fd = -1;
    std::thread thread;
    std::atomic<bool> done{false};
  };

  void AcceptLoop() {
    while (!stopped_) {
      int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (!stopped_) {
          DYN_LOG(ERROR) << "kv transfer source: accept: " << strerror(errno);
        }
        return;
      }
      TuneSocket(fd, options_.socket_buffer_bytes);
      SetIoTimeouts(fd, 0, options_.send_timeout_ms);
      std::lock_guard<std::mutex> lock(mu_);
      ReapFinishedLocked();
      if (stopped_) {
        ::close(fd);
        return;
      }
      Connection& c = conns_.emplace_back();
      c.fd = fd;
      c.thread = std::thread([this, &c] {
        Serve(c.fd);
        c.done = true;
      });
    }
  }

  void ReapFinishedLocked() {
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->done) {
        it->thread.join();
        ::close(it->fd);  // closed only after the join, so Stop never shuts down a reused fd number
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Answers requests on one connection until the peer closes it or the source stops.
  void Serve(int fd) {
    while (!stopped_) {
      RequestHeader req;
      std::vector<iovec> head{{&req, sizeof(req)}};
      if (!RecvAll(fd, head).ok()) return;  // the sink closed its cached connection, or Stop
      if (req.magic != kRequestMagic || req.layout_bytes > kMaxLayoutBytes || req.num_blocks > kMaxRequestBlocks) {
        Reply(fd, Status::InvalidArgument("malformed kv transfer request"), {});
        return;  // framing is lost: drop the connection
      }
      std::string layout_json(req.layout_bytes, '\0');
      std::vector<int32_t> ids(req.num_blocks);
      std::vector<iovec> body{{layout_json.data(), layout_json.size()}, {ids.data(), ids.size() * sizeof(int32_t)}};
      if (!RecvAll(fd, body).ok()) return;
      Status valid = Validate(layout_json, ids);
      if (!valid.ok()) {
        if (!Reply(fd, valid, {}).ok()) return;
        continue;  // a refused request leaves the connection in sync
      }
      if (!Reply(fd, Status::Ok(), ids).ok()) return;
    }
  }

  Status Validate(const std::string& layout_json, const std::vector<int32_t>& ids) const {
    Result<KvLayoutDesc> wanted = DecodeLayout(layout_json);
    if (!wanted.ok()) return wanted.status();
    DYN_RETURN_IF_ERROR(layout_.CheckCompatible(*wanted));
    return CheckIds(ids, region_.num_blocks, "source");
  }

  // One sendmsg batch: the status frame, then each run of consecutive source ids as one iovec
  // pointing into the region.
  Status Reply(int fd, const Status& status, const std::vector<int32_t>& ids) {
    ResponseHeader resp;
    resp.status_code = static_cast<uint32_t>(status.code());
    std::string message = status.message().substr(0, kMaxMessageBytes);
    resp.message_bytes = static_cast<uint32_t>(message.size());
    std::vector<iovec> iov;
    if (status.ok()) {
      resp.payload_bytes = ids.size() * region_.block_bytes;
      iov = RunsToIovecs(CoalesceRuns(ids), region_);
    }
    iov.insert(iov.begin(), {{&resp, sizeof(resp)}, {message.data(), message.size()}});
    if (options_.max_bytes_per_second <= 0) return SendAll(fd, iov);
    return SendPaced(fd, iov, options_.max_bytes_per_second);
  }

  // SendAll in slices of at most 64 KiB, each sent no earlier than the rate allows.
  static Status SendPaced(int fd, const std::vector<iovec>& iov, double bytes_per_second) {
    constexpr size_t kSlice = 64 << 10;
    const auto start = std::chrono::steady_clock::now();
    size_t sent = 0;
    std::vector<iovec> slice;
    size_t in_slice = 0;
    auto flush = [&]() -> Status {
      const auto due = start + std::chrono::duration<double>(static_cast<double>(sent) / bytes_per_second);
      std::this_thread::sleep_until(std::chrono::time_point_cast<std::chrono::steady_clock::duration>(due));
      DYN_RETURN_IF_ERROR(SendAll(fd, slice));
      sent += in_slice;
      slice.clear();
      in_slice = 0;
      return Status::Ok();
    };
    for (const iovec& v : iov) {
      size_t off = 0;
      while (off < v.iov_len) {
        const size_t n = std::min(v.iov_len - off, kSlice - in_slice);
        slice.push_back({static_cast<char*>(v.iov_base) + off, n});
        in_slice += n;
        off += n;
        if (in_slice == kSlice) DYN_RETURN_IF_ERROR(flush());
      }
    }
    return in_slice > 0 ? flush() : Status::Ok();
  }

  KvRegion region_;
  KvLayoutDesc layout_;
  TcpSourceOptions options_;
  UniqueFd listener_;
  std::string address_;
  std::atomic<bool> stopped_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::list<Connection> conns_;  // list: threads hold references to their element
};

}  // namespace

Result<std::unique_ptr<KvTransferSource>> StartTcpKvSource(KvRegion region, KvLayoutDesc layout,
                                                           const TcpSourceOptions& options) {
  if (region.base == nullptr || region.num_blocks < 0 || region.block_bytes != layout.block_bytes) {
    return Status::InvalidArgument("tcp kv source: region block_bytes " + std::to_string(region.block_bytes) +
                                   " does not match the layout's " + std::to_string(layout.block_bytes));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(options.port);
  if (int rc = ::getaddrinfo(options.host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return Status::InvalidArgument("tcp kv source: cannot resolve " + options.host + ": " + gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(found, &::freeaddrinfo);
  UniqueFd fd(::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol));
  if (fd.get() < 0) return Status::IoError(std::string("tcp kv source: socket: ") + strerror(errno));
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  TuneSocket(fd.get(), options.socket_buffer_bytes);  // accepted sockets inherit the buffer sizes
  if (::bind(fd.get(), found->ai_addr, found->ai_addrlen) < 0 || ::listen(fd.get(), 64) < 0) {
    return Status::IoError("tcp kv source: cannot listen on " + options.host + ":" + port + ": " + strerror(errno));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len);
  int actual_port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                                : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return std::unique_ptr<KvTransferSource>(
      std::make_unique<TcpKvSource>(region, std::move(layout), options, std::move(fd), actual_port));
}

}  // namespace dyn
