// RequestClient over Boost.Asio. Each connection's state (socket, calls, write queue, timers) is
// touched only on its strand, so a call's callbacks run in order and never concurrently; the
// public methods only post to that strand.
#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "runtime/request_frame.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

// Calls waiting for a connection to open; more fail at once instead of piling up behind a peer
// that may never answer.
constexpr size_t kMaxCallsWhileConnecting = 4096;
constexpr size_t kReadChunk = 64 * 1024;

struct ClientShared {
  asio::io_context io;
  RequestClientOptions options;
};

class ClientConn : public std::enable_shared_from_this<ClientConn> {
 public:
  ClientConn(std::shared_ptr<ClientShared> shared, std::string address)
      : shared_(std::move(shared)),
        address_(std::move(address)),
        strand_(asio::make_strand(shared_->io)),
        socket_(strand_),
        resolver_(strand_),
        connect_timer_(strand_),
        heartbeat_timer_(strand_),
        parser_(shared_->options.max_frame_bytes) {}

  using Strand = asio::strand<asio::io_context::executor_type>;
  const Strand& strand() const { return strand_; }
  uint64_t NextId() { return next_id_.fetch_add(1, std::memory_order_relaxed); }
  // Set (on the strand) once the connection failed or was closed; a new Call opens another.
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  // ---- everything below runs on the strand ----

  void StartCall(uint64_t id, const std::string& endpoint, const std::string& payload, CallCallbacks callbacks) {
    if (state_ == State::kClosed) return End(callbacks, Status::Unavailable("connection to " + address_ + " closed"));
    if (state_ != State::kConnected && calls_.size() >= kMaxCallsWhileConnecting) {
      return End(callbacks, Status::Unavailable("too many calls waiting for the connection to " + address_));
    }
    // The silence clock starts with the first call in flight: an idle connection owes us nothing.
    if (calls_.empty()) last_receive_ = Clock::now();
    calls_.emplace(id, std::move(callbacks));
    AppendCallFrame(out_, id, endpoint, payload);
    if (state_ == State::kIdle) return Connect();
    Write();
  }

  void CancelCall(uint64_t id) {
    auto it = calls_.find(id);
    if (it == calls_.end()) return;  // already ended
    CallCallbacks callbacks = std::move(it->second);
    calls_.erase(it);
    if (state_ != State::kClosed) {
      AppendFrame(out_, FrameType::kCancel, id, {});
      Write();
    }
    End(callbacks, Status::Cancelled("cancelled by the caller"));
  }

  void Close(const Status& why) {
    if (state_ == State::kClosed) return;
    state_ = State::kClosed;
    closed_.store(true, std::memory_order_release);
    boost::system::error_code ec;
    resolver_.cancel();
    connect_timer_.cancel();
    heartbeat_timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    out_.clear();
    auto calls = std::move(calls_);
    calls_.clear();
    if (!calls.empty()) {
      DYN_LOG(DEBUG) << "request client: " << address_ << ": " << why.ToString();
    }
    for (auto& [id, callbacks] : calls) End(callbacks, why);
  }

 private:
  enum class State { kIdle, kConnecting, kConnected, kClosed };

  static void End(CallCallbacks& callbacks, const Status& status) {
    if (callbacks.on_end) callbacks.on_end(status);
  }

  void Connect() {
    state_ = State::kConnecting;
    const size_t colon = address_.rfind(':');
    if (colon == std::string::npos) return Close(Status::InvalidArgument("address '" + address_ + "' is not host:port"));
    std::string host = address_.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    const std::string port = address_.substr(colon + 1);
    connect_timer_.expires_after(std::chrono::milliseconds(shared_->options.connect_timeout_ms));
    connect_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec || self->state_ != State::kConnecting) return;
      self->Close(Status::Unavailable("connecting to " + self->address_ + " timed out"));
    });
    resolver_.async_resolve(host, port, [self = shared_from_this()](const boost::system::error_code& ec,
                                                                    tcp::resolver::results_type results) {
      if (self->state_ != State::kConnecting) return;
      if (ec) return self->Close(Status::Unavailable("resolving " + self->address_ + ": " + ec.message()));
      asio::async_connect(self->socket_, results, [self](const boost::system::error_code& ec, const tcp::endpoint&) {
        if (self->state_ != State::kConnecting) return;
        if (ec) return self->Close(Status::Unavailable("connecting to " + self->address_ + ": " + ec.message()));
        self->OnConnected();
      });
    });
  }

  void OnConnected() {
    state_ = State::kConnected;
    connect_timer_.cancel();
    boost::system::error_code ec;
    socket_.set_option(tcp::no_delay(true), ec);
    last_receive_ = Clock::now();
    Read();
    ArmHeartbeat();
    Write();
  }

  void ArmHeartbeat() {
    heartbeat_timer_.expires_after(std::chrono::milliseconds(std::max(1, shared_->options.heartbeat_interval_ms)));
    heartbeat_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec || self->state_ != State::kConnected) return;
      self->Heartbeat();
    });
  }

  void Heartbeat() {
    if (!calls_.empty()) {
      const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_receive_);
      if (silent.count() >= shared_->options.dead_after_ms) {
        return Close(Status::Unavailable("no frame from " + address_ + " for " + std::to_string(silent.count()) +
                                         " ms: connection declared dead"));
      }
      AppendFrame(out_, FrameType::kPing, 0, {});
      Write();
    }
    ArmHeartbeat();
  }

  void Write() {
    if (state_ != State::kConnected || writing_ || out_.empty()) return;
    writing_ = true;
    writing_buf_.swap(out_);
    out_.clear();
    asio::async_write(socket_, asio::buffer(writing_buf_),
                      [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                        self->writing_ = false;
                        if (ec) {
                          return self->Close(Status::Unavailable("writing to " + self->address_ + ": " + ec.message()));
                        }
                        self->Write();
                      });
  }

  void Read() {
    char* buf = parser_.WritableBuffer(kReadChunk);
    socket_.async_read_some(asio::buffer(buf, kReadChunk), [self = shared_from_this()](const boost::system::error_code& ec,
                                                                                      size_t n) {
      if (self->state_ == State::kClosed) return;
      if (ec) {
        const std::string what = ec == asio::error::eof ? "closed by the server" : ec.message();
        return self->Close(Status::Unavailable("connection to " + self->address_ + " lost: " + what));
      }
      self->last_receive_ = Clock::now();
      self->parser_.Commit(n);
      if (self->ParseFrames()) self->Read();
    });
  }

  bool ParseFrames() {
    for (;;) {
      Frame frame;
      auto next = parser_.Next(frame);
      if (!next.ok()) {
        Close(Status::Unavailable("bad frame from " + address_ + ": " + next.status().ToString()));
        return false;
      }
      if (!*next) return true;
      switch (frame.type) {
        case FrameType::kData: {
          // Frames of a call that was cancelled here cross our CANCEL on the wire: dropped.
          auto it = calls_.find(frame.call_id);
          if (it != calls_.end() && it->second.on_data) it->second.on_data(frame.payload);
          break;
        }
        case FrameType::kEnd: {
          auto it = calls_.find(frame.call_id);
          if (it == calls_.end()) break;
          CallCallbacks callbacks = std::move(it->second);
          calls_.erase(it);
          End(callbacks, ParseEndPayload(frame.payload));
          break;
        }
        case FrameType::kPing:
          AppendFrame(out_, FrameType::kPong, 0, {});
          Write();
          break;
        case FrameType::kPong:
          break;
        default:
          Close(Status::Unavailable("unexpected frame type " + std::to_string(static_cast<int>(frame.type)) +
                                    " from " + address_));
          return false;
      }
      // A callback may have closed the connection (Disconnect posts, so only protocol paths do).
      if (state_ == State::kClosed) return false;
    }
  }

  std::shared_ptr<ClientShared> shared_;  // first: destroyed after the socket and timers
  const std::string address_;
  Strand strand_;
  tcp::socket socket_;
  tcp::resolver resolver_;
  asio::steady_timer connect_timer_;
  asio::steady_timer heartbeat_timer_;
  FrameParser parser_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> closed_{false};

  State state_ = State::kIdle;
  std::unordered_map<uint64_t, CallCallbacks> calls_;
  std::string out_;          // frames waiting for the next write (or for the connection)
  std::string writing_buf_;  // the write in flight
  bool writing_ = false;
  Clock::time_point last_receive_ = Clock::now();
};

class RequestClientImpl final : public RequestClient {
 public:
  explicit RequestClientImpl(const RequestClientOptions& options) : shared_(std::make_shared<ClientShared>()) {
    shared_->options = options;
    work_.emplace(shared_->io.get_executor());
    const int threads = std::max(1, options.io_threads);
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { shared_->io.run(); });
  }
  ~RequestClientImpl() override { Stop(); }

  void Call(const std::string& address, const std::string& endpoint, std::string payload,
            std::shared_ptr<RequestContext> context, CallCallbacks callbacks) override {
    std::shared_ptr<ClientConn> conn;
    {
      std::lock_guard lock(mu_);
      if (!stopped_) {
        auto& slot = conns_[address];
        if (!slot || slot->closed()) slot = std::make_shared<ClientConn>(shared_, address);
        conn = slot;
      }
    }
    if (!conn) {
      if (callbacks.on_end) callbacks.on_end(Status::Unavailable("request client stopped"));
      return;
    }
    const uint64_t id = conn->NextId();
    asio::post(conn->strand(), [conn, id, endpoint, payload = std::move(payload),
                                callbacks = std::move(callbacks)]() mutable {
      conn->StartCall(id, endpoint, payload, std::move(callbacks));
    });
    // Registered after the start was posted so the strand sees the call before its cancel. The
    // connection is held weakly: the context may outlive it by far.
    if (context) {
      context->OnCancel([weak = std::weak_ptr<ClientConn>(conn), id] {
        if (auto conn = weak.lock()) asio::post(conn->strand(), [conn, id] { conn->CancelCall(id); });
      });
    }
  }

  void Disconnect(const std::string& address) override {
    std::shared_ptr<ClientConn> conn;
    {
      std::lock_guard lock(mu_);
      auto it = conns_.find(address);
      if (it == conns_.end()) return;
      conn = std::move(it->second);
      conns_.erase(it);
    }
    asio::post(conn->strand(), [conn, address] { conn->Close(Status::Unavailable("disconnected from " + address)); });
  }

  // Must not be called from a callback (it waits for the io threads).
  void Stop() override {
    std::unordered_map<std::string, std::shared_ptr<ClientConn>> conns;
    {
      std::lock_guard lock(mu_);
      if (stopped_) return;
      stopped_ = true;
      conns.swap(conns_);
    }
    std::vector<std::future<void>> closed;
    for (auto& [address, conn] : conns) {
      auto done = std::make_shared<std::promise<void>>();
      closed.push_back(done->get_future());
      asio::post(conn->strand(), [conn, done] {
        conn->Close(Status::Unavailable("request client stopped"));
        done->set_value();
      });
    }
    for (auto& f : closed) f.wait_for(std::chrono::seconds(5));
    work_.reset();
    shared_->io.stop();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  std::shared_ptr<ClientShared> shared_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  bool stopped_ = false;
  std::unordered_map<std::string, std::shared_ptr<ClientConn>> conns_;
};

}  // namespace

Result<std::shared_ptr<RequestClient>> RequestClient::Create(const RequestClientOptions& options) {
  if (options.dead_after_ms <= 0 || options.heartbeat_interval_ms <= 0 || options.connect_timeout_ms <= 0) {
    return Status::InvalidArgument("request client timeouts must be positive");
  }
  return std::shared_ptr<RequestClient>(std::make_shared<RequestClientImpl>(options));
}

}  // namespace dyn
