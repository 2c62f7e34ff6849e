// Blocking socket helpers for the TCP backend: scatter/gather send and receive, tuning, connect.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "transfer/transfer_internal.h"

namespace dyn::transfer_internal {

namespace {

// Drops `n` bytes from the front of `iov` (starting at *first).
void Advance(std::vector<iovec>& iov, size_t* first, size_t n) {
  while (n > 0 && *first < iov.size()) {
    iovec& v = iov[*first];
    if (n >= v.iov_len) {
      n -= v.iov_len;
      v.iov_len = 0;
      ++*first;
    } else {
      v.iov_base = static_cast<char*>(v.iov_base) + n;
      v.iov_len -= n;
      n = 0;
    }
  }
  while (*first < iov.size() && iov[*first].iov_len == 0) ++*first;
}

Status ErrnoStatus(const char* what, int err, IoFailure* failure) {
  IoFailure kind = IoFailure::kOther;
  if (err == EAGAIN || err == EWOULDBLOCK) {
    if (failure != nullptr) *failure = IoFailure::kTimeout;
    return Status::DeadlineExceeded(std::string(what) + " timed out");
  }
  if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) kind = IoFailure::kClosed;
  if (failure != nullptr) *failure = kind;
  if (kind == IoFailure::kClosed) return Status::Unavailable(std::string(what) + ": connection lost (" + strerror(err) + ")");
  return Status::IoError(std::string(what) + ": " + strerror(err));
}

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.Release();
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

int UniqueFd::Release() {
  int fd = fd_;
  fd_ = -1;
  return fd;
}

Status SendAll(int fd, std::vector<iovec>& iov, IoFailure* failure) {
  size_t first = 0;
  Advance(iov, &first, 0);
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("send", errno, failure);
    }
    Advance(iov, &first, static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status RecvAll(int fd, std::vector<iovec>& iov, size_t* received, IoFailure* failure) {
  size_t first = 0;
  size_t total = 0;
  Advance(iov, &first, 0);
  while (first < iov.size()) {
    ssize_t n = ::readv(fd, iov.data() + first, static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX)));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (received != nullptr) *received = total;
      return ErrnoStatus("receive", errno, failure);
    }
    if (n == 0) {
      if (received != nullptr) *received = total;
      if (failure != nullptr) *failure = IoFailure::kClosed;
      return Status::Unavailable("connection closed by peer");
    }
    total += static_cast<size_t>(n);
    Advance(iov, &first, static_cast<size_t>(n));
  }
  if (received != nullptr) *received = total;
  return Status::Ok();
}

void TuneSocket(int fd, int buffer_bytes) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (buffer_bytes <= 0) return;  // leave the kernel's autotuning on
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof(buffer_bytes));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof(buffer_bytes));
}

void SetIoTimeouts(int fd, int recv_timeout_ms, int send_timeout_ms) {
  auto set = [fd](int option, int ms) {
    if (ms <= 0) return;
    timeval tv{ms / 1000, (ms % 1000) * 1000};
    ::setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
  };
  set(SO_RCVTIMEO, recv_timeout_ms);
  set(SO_SNDTIMEO, send_timeout_ms);
}

Result<std::pair<std::string, int>> SplitHostPort(std::string_view address) {
  std::string host;
  std::string_view port;
  if (!address.empty() && address.front() == '[') {
    size_t close = address.find(']');
    if (close == std::string_view::npos || close + 1 >= address.size() || address[close + 1] != ':') {
      return Status::InvalidArgument("bad address '" + std::string(address) + "' (want [host]:port)");
    }
    host = std::string(address.substr(1, close - 1));
    port = address.substr(close + 2);
  } else {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) {
      return Status::InvalidArgument("bad address '" + std::string(address) + "' (want host:port)");
    }
    host = std::string(address.substr(0, colon));
    port = address.substr(colon + 1);
  }
  int p = 0;
  for (char c : port) {
    if (c < '0' || c > '9' || p > 65535) return Status::InvalidArgument("bad port in '" + std::string(address) + "'");
    p = p * 10 + (c - '0');
  }
  if (port.empty() || p <= 0 || p > 65535 || host.empty()) {
    return Status::InvalidArgument("bad address '" + std::string(address) + "'");
  }
  return std::make_pair(host, p);
}

Result<UniqueFd> ConnectTcp(std::string_view address, int timeout_ms, int buffer_bytes) {
  DYN_ASSIGN_OR_RETURN(auto host_port, SplitHostPort(address));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(host_port.second);
  if (int rc = ::getaddrinfo(host_port.first.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return Status::Unavailable("cannot resolve " + std::string(address) + ": " + gai_strerror(rc));
  }
  Status last = Status::Unavailable("no addresses for " + std::string(address));
  for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (fd.get() < 0) {
      last = Status::IoError(std::string("socket: ") + strerror(errno));
      continue;
    }
    TuneSocket(fd.get(), buffer_bytes);  // before connect, so the window scale covers the large buffers
    int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    if (rc < 0 && errno == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      rc = ::poll(&p, 1, timeout_ms);
      if (rc == 0) {
        last = Status::DeadlineExceeded("connect to " + std::string(address) + " timed out");
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (rc < 0) err = errno;
      if (err != 0) {
        errno = err;
        rc = -1;
      }
    }
    if (rc < 0) {
      last = Status::Unavailable("connect to " + std::string(address) + ": " + strerror(errno));
      continue;
    }
    int flags = ::fcntl(fd.get(), F_GETFL);
    ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
    ::freeaddrinfo(found);
    return fd;
  }
  ::freeaddrinfo(found);
  return last;
}

}  // namespace dyn::transfer_internal
