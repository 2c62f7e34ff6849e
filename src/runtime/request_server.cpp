// RequestServer over Boost.Asio. Each connection's socket operations run on its own strand; the
// write queue and call table are behind a mutex because handlers send from engine threads.
#include <atomic>
#include <boost/asio.hpp>
#include <condition_variable>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "runtime/engine_codec.h"
#include "runtime/request_frame.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

// State that outlives the server object: calls held by engines keep their connection (and so its
// socket and the io_context) alive after the server is destroyed, and still count down here.
struct Shared {
  asio::io_context io;
  RequestServerOptions options;
  std::mutex mu;
  std::condition_variable idle_cv;
  int active_calls = 0;  // guarded by mu
  bool draining = false;  // guarded by mu

  std::mutex endpoints_mu;
  std::unordered_map<std::string, EndpointHandler> endpoints;

  void CallEnded() {
    std::lock_guard lock(mu);
    if (--active_calls == 0) idle_cv.notify_all();
  }
};

class Connection;

class ServerCallImpl final : public ServerCall, public std::enable_shared_from_this<ServerCallImpl> {
 public:
  ServerCallImpl(uint64_t id, std::shared_ptr<Connection> conn, std::shared_ptr<RequestContext> context)
      : id_(id), conn_(std::move(conn)), context_(std::move(context)) {}

  bool Send(std::string payload) override;
  void Finish(const Status& status) override;
  const std::shared_ptr<RequestContext>& context() const override { return context_; }
  size_t pending_bytes() const override { return pending_.load(std::memory_order_acquire); }

  uint64_t id() const { return id_; }
  // Called by the connection after some of this call's bytes were written.
  void Written(size_t bytes) {
    if (pending_.fetch_sub(bytes, std::memory_order_acq_rel) == bytes) {
      std::function<void()> hook;
      {
        std::lock_guard lock(hook_mu_);
        hook = on_drained_;
      }
      if (hook) hook();
    }
  }
  void AddPending(size_t bytes) { pending_.fetch_add(bytes, std::memory_order_acq_rel); }
  // Runs (on an io thread) each time this call's queued bytes drop to zero.
  void SetOnDrained(std::function<void()> fn) {
    std::lock_guard lock(hook_mu_);
    on_drained_ = std::move(fn);
  }
  // The client cancelled or went away: Send now fails and no END is written.
  void MarkCancelled() { cancelled_.store(true, std::memory_order_release); }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  bool finished() const { return finished_.load(std::memory_order_acquire); }

 private:
  const uint64_t id_;
  std::shared_ptr<Connection> conn_;
  std::shared_ptr<RequestContext> context_;
  std::atomic<size_t> pending_{0};
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
  std::mutex hook_mu_;
  std::function<void()> on_drained_;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::shared_ptr<Shared> shared, tcp::socket socket)
      : shared_(std::move(shared)), socket_(std::move(socket)), parser_(shared_->options.max_frame_bytes) {}

  const std::shared_ptr<Shared>& shared() const { return shared_; }
  tcp::socket::executor_type executor() { return socket_.get_executor(); }

  void Start() {
    boost::system::error_code ec;
    socket_.set_option(tcp::no_delay(true), ec);
    Read();
  }

  // Queues a frame; `call` (may be null) is charged its bytes until they are written. False when
  // the connection is closed.
  template <class Append>
  bool Enqueue(const Append& append, std::shared_ptr<ServerCallImpl> call) {
    bool start = false;
    {
      std::lock_guard lock(mu_);
      if (closed_) return false;
      const size_t before = queue_.size();
      append(queue_);
      const size_t bytes = queue_.size() - before;
      if (call) {
        call->AddPending(bytes);
        queue_charges_.emplace_back(std::move(call), bytes);
      }
      if (!writing_) start = writing_ = true;
    }
    if (start) asio::post(socket_.get_executor(), [self = shared_from_this()] { self->Write(); });
    return true;
  }

  // Removes a finished call and writes its END unless the client is no longer listening.
  void FinishCall(ServerCallImpl& call, const Status& status) {
    {
      std::lock_guard lock(mu_);
      calls_.erase(call.id());
    }
    if (!call.cancelled()) {
      Enqueue([&](std::string& q) { AppendEndFrame(q, call.id(), status); }, nullptr);
    }
  }

  // Closes the socket and cancels every call. Must run on the connection's strand.
  void CloseOnStrand(const char* why) {
    std::unordered_map<uint64_t, std::shared_ptr<ServerCallImpl>> calls;
    {
      std::lock_guard lock(mu_);
      if (closed_) return;
      closed_ = true;
      calls.swap(calls_);
      queue_.clear();
      queue_charges_.clear();
    }
    DYN_LOG(DEBUG) << "request server: closing connection: " << why;
    boost::system::error_code ec;
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    for (auto& [id, call] : calls) {
      call->MarkCancelled();
      call->context()->Cancel();
    }
  }

  // From any thread; returns once the connection is closed (the io threads must be running).
  void CloseAndWait() {
    auto done = std::make_shared<std::promise<void>>();
    auto fut = done->get_future();
    asio::post(socket_.get_executor(), [self = shared_from_this(), done] {
      self->CloseOnStrand("server stopping");
      done->set_value();
    });
    fut.wait_for(std::chrono::seconds(5));
  }

 private:
  void Read() {
    char* buf = parser_.WritableBuffer(kReadChunk);
    socket_.async_read_some(asio::buffer(buf, kReadChunk),
                            [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                              if (ec) return self->CloseOnStrand("read failed");
                              self->parser_.Commit(n);
                              if (self->ParseFrames()) self->Read();
                            });
  }

  // Dispatches every complete frame; false (after closing) on a protocol error.
  bool ParseFrames() {
    for (;;) {
      Frame frame;
      auto next = parser_.Next(frame);
      if (!next.ok()) {
        DYN_LOG(WARN) << "request server: bad frame from client: " << next.status().ToString();
        CloseOnStrand("bad frame");
        return false;
      }
      if (!*next) return true;
      if (!Dispatch(frame)) {
        CloseOnStrand("protocol violation");
        return false;
      }
    }
  }

  bool Dispatch(const Frame& frame) {
    switch (frame.type) {
      case FrameType::kCall:
        return OnCall(frame);
      case FrameType::kCancel: {
        std::shared_ptr<ServerCallImpl> call;
        {
          std::lock_guard lock(mu_);
          auto it = calls_.find(frame.call_id);
          if (it != calls_.end()) call = it->second;
        }
        // A cancel for a call that already ended crossed its END on the wire: nothing to do.
        if (call) {
          call->MarkCancelled();
          call->context()->Cancel();
        }
        return true;
      }
      case FrameType::kPing:
        Enqueue([](std::string& q) { AppendFrame(q, FrameType::kPong, 0, {}); }, nullptr);
        return true;
      case FrameType::kPong:
        return true;
      default:
        DYN_LOG(WARN) << "request server: unexpected frame type " << static_cast<int>(frame.type);
        return false;
    }
  }

  bool OnCall(const Frame& frame) {
    std::string_view endpoint, request;
    if (!ParseCallPayload(frame.payload, endpoint, request).ok()) return false;
    const uint64_t id = frame.call_id;
    auto reject = [&](const Status& status) {
      Enqueue([&](std::string& q) { AppendEndFrame(q, id, status); }, nullptr);
      return true;
    };
    EndpointHandler handler;
    {
      std::lock_guard lock(shared_->endpoints_mu);
      auto it = shared_->endpoints.find(std::string(endpoint));
      if (it != shared_->endpoints.end()) handler = it->second;
    }
    if (!handler) return reject(Status::NotFound("no endpoint '" + std::string(endpoint) + "'"));
    bool full;
    {
      std::lock_guard lock(mu_);
      if (calls_.count(id)) {
        DYN_LOG(WARN) << "request server: client reused call id " << id;
        return false;
      }
      full = static_cast<int>(calls_.size()) >= shared_->options.max_calls_per_connection;
    }
    if (full) {
      return reject(Status::ResourceExhausted(
          "more than " + std::to_string(shared_->options.max_calls_per_connection) + " calls on one connection"));
    }
    bool draining;
    {
      // Checked with the count under one lock, so Drain either refuses this call or waits for it.
      std::lock_guard lock(shared_->mu);
      draining = shared_->draining;
      if (!draining) ++shared_->active_calls;
    }
    if (draining) return reject(Status::Unavailable("draining"));
    auto call = std::make_shared<ServerCallImpl>(id, shared_from_this(),
                                                 std::make_shared<RequestContext>("call-" + std::to_string(id)));
    {
      std::lock_guard lock(mu_);
      calls_.emplace(id, call);
    }
    handler(std::string(request), call);
    return true;
  }

  void Write() {
    std::vector<std::pair<std::shared_ptr<ServerCallImpl>, size_t>> charges;
    {
      std::lock_guard lock(mu_);
      if (closed_ || queue_.empty()) {
        writing_ = false;
        return;
      }
      writing_buf_.swap(queue_);
      queue_.clear();
      charges.swap(queue_charges_);
    }
    asio::async_write(socket_, asio::buffer(writing_buf_),
                      [self = shared_from_this(), charges = std::move(charges)](const boost::system::error_code& ec,
                                                                                size_t) {
                        if (ec) return self->CloseOnStrand("write failed");
                        for (auto& [call, bytes] : charges) call->Written(bytes);
                        self->Write();
                      });
  }

  static constexpr size_t kReadChunk = 64 * 1024;

  std::shared_ptr<Shared> shared_;  // first member: destroyed after the socket
  tcp::socket socket_;
  FrameParser parser_;  // strand only
  std::string writing_buf_;  // strand only: the bytes of the write in flight

  std::mutex mu_;
  bool closed_ = false;
  bool writing_ = false;  // a Write is posted or in flight
  std::string queue_;     // frames waiting for the next write
  std::vector<std::pair<std::shared_ptr<ServerCallImpl>, size_t>> queue_charges_;
  std::unordered_map<uint64_t, std::shared_ptr<ServerCallImpl>> calls_;
};

bool ServerCallImpl::Send(std::string payload) {
  if (finished() || cancelled()) return false;
  return conn_->Enqueue([&](std::string& q) { AppendFrame(q, FrameType::kData, id_, payload); }, shared_from_this());
}

void ServerCallImpl::Finish(const Status& status) {
  if (finished_.exchange(true, std::memory_order_acq_rel)) return;
  SetOnDrained(nullptr);
  conn_->FinishCall(*this, status);
  conn_->shared()->CallEnded();
}

// ---- the engine adapter ----

// Per call: the output staged while the client is slow. Guarded by mu because the engine thread
// (sink) and an io thread (drained hook) both touch it.
struct EngineStream {
  std::mutex mu;
  std::optional<EngineOutput> held;
  bool done = false;
};

void ServeEngineCall(const EnginePtr& engine, size_t max_pending, std::string payload,
                     const std::shared_ptr<ServerCall>& base) {
  auto call = std::static_pointer_cast<ServerCallImpl>(base);
  auto request = DecodeRequest(payload);
  if (!request.ok()) return call->Finish(request.status());
  auto stream = std::make_shared<EngineStream>();
  // Once everything queued for the call is written, the deltas merged meanwhile go out as one.
  call->SetOnDrained([weak = std::weak_ptr<ServerCallImpl>(call), stream] {
    auto call = weak.lock();
    if (!call) return;
    std::lock_guard lock(stream->mu);
    if (stream->done || !stream->held) return;
    call->Send(EncodeOutput(*stream->held));
    stream->held.reset();
  });
  auto sink = [call, stream, max_pending](EngineOutput&& out) {
    std::lock_guard lock(stream->mu);
    if (stream->done) return;
    const bool final = out.finish_reason.has_value();
    if (stream->held) {
      MergeOutput(*stream->held, std::move(out));
    } else {
      stream->held = std::move(out);
    }
    // Over the limit the delta stays held until the drained hook or the final delta sends it; the
    // final one always goes at once so the END follows it.
    if (final || call->pending_bytes() <= max_pending) {
      call->Send(EncodeOutput(*stream->held));
      stream->held.reset();
    }
    if (final) {
      stream->done = true;
      call->Finish(Status::Ok());
    }
  };
  engine->Generate(std::move(request).value(), call->context(), std::move(sink));
}

// ---- the server ----

class RequestServerImpl final : public RequestServer {
 public:
  explicit RequestServerImpl(std::shared_ptr<Shared> shared)
      : shared_(std::move(shared)), acceptor_(asio::make_strand(shared_->io)) {}
  ~RequestServerImpl() override { Stop(); }

  Status Listen() {
    boost::system::error_code ec;
    auto address = asio::ip::make_address(shared_->options.host, ec);
    if (ec) return Status::InvalidArgument("bad listen address '" + shared_->options.host + "': " + ec.message());
    tcp::endpoint endpoint(address, static_cast<unsigned short>(shared_->options.port));
    if (acceptor_.open(endpoint.protocol(), ec); ec) return Status::IoError("socket: " + ec.message());
    acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (acceptor_.bind(endpoint, ec); ec) {
      return Status::IoError("bind " + shared_->options.host + ":" + std::to_string(shared_->options.port) + ": " +
                             ec.message());
    }
    if (acceptor_.listen(asio::socket_base::max_listen_connections, ec); ec) {
      return Status::IoError("listen: " + ec.message());
    }
    port_ = acceptor_.local_endpoint(ec).port();
    work_.emplace(shared_->io.get_executor());
    Accept();
    const int threads = std::max(1, shared_->options.io_threads);
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { shared_->io.run(); });
    return Status::Ok();
  }

  void AddEndpoint(const std::string& name, EndpointHandler handler) override {
    std::lock_guard lock(shared_->endpoints_mu);
    shared_->endpoints[name] = std::move(handler);
  }

  void AddEngineEndpoint(const std::string& name, EnginePtr engine) override {
    const size_t max_pending = shared_->options.max_pending_bytes_per_call;
    AddEndpoint(name, [engine = std::move(engine), max_pending](std::string payload, std::shared_ptr<ServerCall> call) {
      ServeEngineCall(engine, max_pending, std::move(payload), call);
    });
  }

  int port() const override { return port_; }

  int active_calls() const override {
    std::lock_guard lock(shared_->mu);
    return shared_->active_calls;
  }

  void Drain(int timeout_ms) override {
    std::unique_lock lock(shared_->mu);
    shared_->draining = true;
    shared_->idle_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return shared_->active_calls == 0; });
  }

  // Must not be called from a handler (it waits for the io threads).
  void Stop() override {
    if (stopped_.exchange(true)) return;
    if (!threads_.empty()) {
      {
        // From here the accept handler drops new sockets: a connection it added after the
        // snapshot below would keep a read pending past io.stop(), and that handler, owning the
        // connection, which owns the io_context's Shared, would never be destroyed (a leak).
        std::lock_guard lock(conns_mu_);
        accepting_ = false;
      }
      auto done = std::make_shared<std::promise<void>>();
      auto fut = done->get_future();
      asio::post(acceptor_.get_executor(), [this, done] {
        boost::system::error_code ec;
        acceptor_.close(ec);
        done->set_value();
      });
      fut.wait_for(std::chrono::seconds(5));
      std::vector<std::shared_ptr<Connection>> conns;
      {
        std::lock_guard lock(conns_mu_);
        for (auto& weak : conns_) {
          if (auto conn = weak.lock()) conns.push_back(std::move(conn));
        }
        conns_.clear();
      }
      for (auto& conn : conns) conn->CloseAndWait();
    }
    work_.reset();
    shared_->io.stop();
    for (auto& t : threads_) t.join();
    threads_.clear();
    // Handlers still queued (reads and writes of the closed sockets, completed with errors) hold
    // their connections: run them here so the connections are released.
    shared_->io.restart();
    shared_->io.poll();
  }

 private:
  void Accept() {
    acceptor_.async_accept(asio::make_strand(shared_->io), [this](const boost::system::error_code& ec, tcp::socket socket) {
      if (ec) {
        if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
        DYN_LOG(WARN) << "request server: accept failed: " << ec.message();
      } else {
        auto conn = std::make_shared<Connection>(shared_, std::move(socket));
        {
          std::lock_guard lock(conns_mu_);
          if (accepting_) {
            std::erase_if(conns_, [](const std::weak_ptr<Connection>& w) { return w.expired(); });
            conns_.push_back(conn);
          } else {
            conn.reset();  // stopping: the socket closes here, nothing was started on it
          }
        }
        if (conn) asio::dispatch(conn->executor(), [conn] { conn->Start(); });
      }
      Accept();
    });
  }

  std::shared_ptr<Shared> shared_;  // first: the acceptor and threads use its io_context
  tcp::acceptor acceptor_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
  std::mutex conns_mu_;
  std::vector<std::weak_ptr<Connection>> conns_;
  bool accepting_ = true;  // guarded by conns_mu_; false once Stop has taken its snapshot
  int port_ = 0;
  std::atomic<bool> stopped_{false};
};

}  // namespace

Result<std::unique_ptr<RequestServer>> RequestServer::Start(const RequestServerOptions& options) {
  auto shared = std::make_shared<Shared>();
  shared->options = options;
  auto server = std::make_unique<RequestServerImpl>(std::move(shared));
  DYN_RETURN_IF_ERROR(server->Listen());
  return std::unique_ptr<RequestServer>(std::move(server));
}

}  // namespace dyn
