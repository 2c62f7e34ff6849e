// HttpFrontend: Beast/Asio plumbing. One io_context run by io_threads threads; each connection
// lives on its own strand. While a generation request runs, a read stays pending on the socket so
// that a client going away is noticed (and its engine requests cancelled) even when no bytes
// are being written.
#include <atomic>
#include <thread>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "base/log.h"
#include "frontend/frontend.h"
#include "frontend/generation.h"
#include "frontend/http_format.h"
#include "frontend/metrics.h"
#include "frontend/simple_endpoints.h"

namespace dyn {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto kIdleTimeout = std::chrono::seconds(300);
constexpr size_t kMaxBufferedWhileBusy = 64 * 1024;  // pipelined bytes read while generating

struct ServerState {
  std::shared_ptr<ModelRegistry> registry;
  HttpFrontendOptions options;
  FrontendMetrics metrics;
  std::shared_ptr<PostGate> gate = std::make_shared<PostGate>();
  std::atomic<uint64_t> next_request{0};
  std::string id_prefix;
};

// Endpoint label for metrics: known paths as themselves, everything else "other".
std::string EndpointLabel(std::string_view path) {
  for (std::string_view known : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/live",
                                 "/metrics", "/tokenize", "/detokenize"}) {
    if (path == known) return std::string(known);
  }
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{model}";
  return "other";
}

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, ServerState& state) : stream_(std::move(socket)), state_(state) {}
  ~Connection() {
    if (call_) call_->Cancel();
    EndRequest(499);
  }

  void Start() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->ReadRequest(); });
  }

 private:
  void ReadRequest() {
    parser_.emplace();
    parser_->body_limit(state_.options.max_body_bytes);
    parser_->header_limit(64 * 1024);
    stream_.expires_after(kIdleTimeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  // Clients such as curl send "Expect: 100-continue" with larger bodies and wait for the
  // interim response before sending the body.
  void OnHeader(beast::error_code ec) {
    if (ec || parser_->is_done()) {
      OnRequest(ec);
      return;
    }
    auto read_body = [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) {
        self->OnRequest(ec);
        return;
      }
      http::async_read(self->stream_, self->buffer_, *self->parser_,
                       [self](beast::error_code ec, size_t) { self->OnRequest(ec); });
    };
    if (beast::iequals(parser_->get()[http::field::expect], "100-continue")) {
      static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      asio::async_write(stream_, asio::buffer(kContinue.data(), kContinue.size()), std::move(read_body));
    } else {
      read_body(beast::error_code{}, 0);
    }
  }

  void OnRequest(beast::error_code ec) {
    stream_.expires_never();
    if (ec == http::error::body_limit) {
      state_.metrics.RequestStarted();
      request_open_ = true;
      keep_alive_ = false;
      linger_on_close_ = true;
      Reply("other", "", ErrorReply(ApiError{413,
                                             "The request body exceeds the limit of " +
                                                 std::to_string(state_.options.max_body_bytes) + " bytes",
                                             "invalid_request_error", "", "body_too_large"}));
      return;
    }
    if (ec) {
      // end_of_stream, resets and timeouts end a keep-alive connection quietly; a malformed
      // request line or header gets a 400 before closing.
      const bool malformed = ec.category() == http::make_error_code(http::error::bad_target).category() &&
                             ec != http::error::end_of_stream && ec != http::error::partial_message;
      if (malformed) {
        state_.metrics.RequestStarted();
        request_open_ = true;
        keep_alive_ = false;
        Reply("other", "", ErrorReply(ApiError::BadRequest("Malformed HTTP request: " + ec.message(), "", "bad_http")));
        return;
      }
      Close();
      return;
    }
    state_.metrics.RequestStarted();
    request_open_ = true;
    received_ = Clock::now();
    http::request<http::string_body> req = parser_->release();
    keep_alive_ = req.keep_alive();
    std::string request_id(req["x-request-id"]);
    if (request_id.empty() || request_id.size() > 256) {
      request_id = state_.id_prefix + std::to_string(state_.next_request.fetch_add(1));
    }
    std::string_view target = req.target();
    std::string_view path = target.substr(0, target.find('?'));
    endpoint_ = EndpointLabel(path);
    Route(req, path, request_id);
  }

  void Route(http::request<http::string_body>& req, std::string_view path, const std::string& request_id) {
    const http::verb method = req.method();
    auto require = [&](http::verb allowed) {
      if (method == allowed) return true;
      HttpReply r = ErrorReply(ApiError{405, "Method " + std::string(req.method_string()) + " is not allowed on " + std::string(path),
                                        "invalid_request_error", "", "method_not_allowed"});
      Reply(endpoint_, request_id, std::move(r), std::string("Allow: ") + std::string(http::to_string(allowed)) + "\r\n");
      return false;
    };
    if (path == "/v1/chat/completions" || path == "/v1/completions") {
      if (require(http::verb::post)) {
        StartGeneration(path == "/v1/chat/completions" ? ApiKind::kChat : ApiKind::kCompletion, req.body(), request_id);
      }
    } else if (path == "/health" || path == "/live") {
      if (require(http::verb::get)) {
        HttpReply r;
        r.body = path == "/health" ? R"({"status":"healthy"})" : R"({"status":"live"})";
        Reply(endpoint_, request_id, std::move(r));
      }
    } else if (path == "/metrics") {
      if (require(http::verb::get)) {
        HttpReply r;
        r.content_type = "text/plain; version=0.0.4; charset=utf-8";
        r.body = state_.metrics.Render(*state_.registry);
        Reply(endpoint_, request_id, std::move(r));
      }
    } else if (path == "/v1/models") {
      if (require(http::verb::get)) Reply(endpoint_, request_id, ModelsReply(*state_.registry, std::nullopt));
    } else if (path.rfind("/v1/models/", 0) == 0) {
      if (require(http::verb::get)) Reply(endpoint_, request_id, ModelsReply(*state_.registry, path.substr(11)));
    } else if (path == "/tokenize" || path == "/detokenize") {
      if (require(http::verb::post)) {
        boost::json::value body;
        if (auto e = ParseJsonBody(req.body(), &body)) {
          Reply(endpoint_, request_id, ErrorReply(*e));
        } else {
          Reply(endpoint_, request_id,
                path == "/tokenize" ? TokenizeReply(*state_.registry, body.get_object())
                                    : DetokenizeReply(*state_.registry, body.get_object()));
        }
      }
    } else {
      Reply(endpoint_, request_id,
            ErrorReply(ApiError::NotFound("No such endpoint: " + std::string(path), "", "unknown_url")));
    }
  }

  void StartGeneration(ApiKind kind, const std::string& body_text, const std::string& request_id) {
    boost::json::value body;
    GenerationRequest request;
    if (auto e = ParseJsonBody(body_text, &body)) {
      Reply(endpoint_, request_id, ErrorReply(*e));
      return;
    }
    if (auto e = ParseGenerationRequest(kind, body.get_object(), *state_.registry, &request)) {
      Reply(endpoint_, request_id, ErrorReply(*e));
      return;
    }
    GenerationCall::Hooks hooks;
    // The call is owned by this connection and calls its hooks on this strand only.
    hooks.write = [this](std::string bytes) { Write(std::move(bytes)); };
    hooks.done = [this](int status) { ResponseDone(status); };
    call_ = std::make_shared<GenerationCall>(std::move(request), request_id, keep_alive_, stream_.get_executor(),
                                             state_.gate, state_.metrics, std::move(hooks), received_);
    call_->Start();
    WatchForDisconnect();
  }

  // Keeps one read pending while generating; bytes that arrive (a pipelined request) are kept
  // in buffer_ for the next ReadRequest.
  void WatchForDisconnect() {
    if (watch_pending_ || !stream_.socket().is_open()) return;
    watch_pending_ = true;
    stream_.async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->OnWatch(ec, n);
    });
  }

  void OnWatch(beast::error_code ec, size_t n) {
    watch_pending_ = false;
    if (!ec) buffer_.commit(n);
    if (read_after_watch_) {  // the response finished; the watch was cancelled to read again
      read_after_watch_ = false;
      ReadRequest();
      return;
    }
    if (ec) {
      if (call_) {
        DYN_LOG(DEBUG) << "client went away; cancelling its engine requests";
        state_.metrics.ErrorReturned("client_disconnected");
        call_->Cancel();
        call_.reset();
      }
      EndRequest(499);
      Close();
      return;
    }
    if (call_ && buffer_.size() < kMaxBufferedWhileBusy) WatchForDisconnect();
  }

  void Reply(const std::string& endpoint, const std::string& request_id, HttpReply reply, std::string extra_headers = "") {
    if (!reply.error_code.empty()) state_.metrics.ErrorReturned(reply.error_code);
    endpoint_ = endpoint;
    Write(FormatHttpResponse(reply.status, reply.content_type, reply.body, request_id, keep_alive_, extra_headers));
    ResponseDone(reply.status);
  }

  void ResponseDone(int status) {
    response_done_ = true;
    response_status_ = status;
    if (!writing_) AfterResponse();
  }

  void Write(std::string bytes) {
    pending_.append(bytes);
    if (!writing_) FlushWrites();
  }

  void FlushWrites() {
    if (pending_.empty()) return;
    writing_ = true;
    inflight_.swap(pending_);
    pending_.clear();
    asio::async_write(stream_, asio::buffer(inflight_), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->OnWrite(ec);
    });
  }

  void OnWrite(beast::error_code ec) {
    writing_ = false;
    inflight_.clear();
    if (ec) {
      if (call_) {
        state_.metrics.ErrorReturned("client_disconnected");
        call_->Cancel();
        call_.reset();
      }
      EndRequest(499);
      Close();
      return;
    }
    if (!pending_.empty()) {
      FlushWrites();
      return;
    }
    if (response_done_) AfterResponse();
  }

  void AfterResponse() {
    response_done_ = false;
    EndRequest(response_status_);
    call_.reset();
    if (!keep_alive_) {
      Close();
      return;
    }
    if (watch_pending_) {
      read_after_watch_ = true;
      stream_.socket().cancel();
    } else {
      ReadRequest();
    }
  }

  // Counts the request once, whichever way it ends (499: the client went away first).
  void EndRequest(int status) {
    if (!request_open_) return;
    request_open_ = false;
    state_.metrics.RequestFinished(endpoint_, status);
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    if (linger_on_close_) {
      // The client may still be sending a body we refused; closing with unread bytes would
      // reset the connection and the client could lose our response. Drain for a while first.
      linger_on_close_ = false;
      stream_.expires_after(std::chrono::seconds(2));
      Drain();
      return;
    }
    stream_.socket().close(ignored);
  }

  void Drain() {
    buffer_.consume(buffer_.size());
    stream_.async_read_some(buffer_.prepare(16384), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) {
        beast::error_code ignored;
        self->stream_.socket().close(ignored);
        return;
      }
      self->Drain();
    });
  }

  beast::tcp_stream stream_;
  ServerState& state_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<GenerationCall> call_;
  std::string endpoint_ = "other";
  Clock::time_point received_;
  std::string pending_, inflight_;
  bool writing_ = false;
  bool keep_alive_ = true;
  bool response_done_ = false;
  int response_status_ = 200;
  bool request_open_ = false;
  bool linger_on_close_ = false;
  bool watch_pending_ = false;
  bool read_after_watch_ = false;
};

}  // namespace

class HttpFrontend::Impl {
 public:
  Impl(const HttpFrontendOptions& options, std::shared_ptr<ModelRegistry> registry) {
    state_.registry = std::move(registry);
    state_.options = options;
    state_.id_prefix = "req-" + std::to_string(Clock::now().time_since_epoch().count() % 1000000007) + "-";
  }
  ~Impl() { Stop(); }

  Status Listen() {
    beast::error_code ec;
    auto address = asio::ip::make_address(state_.options.host, ec);
    if (ec) return Status::InvalidArgument("invalid host '" + state_.options.host + "': " + ec.message());
    tcp::endpoint endpoint(address, static_cast<unsigned short>(state_.options.port));
    acceptor_ = std::make_unique<tcp::acceptor>(asio::make_strand(*ioc_));
    acceptor_->open(endpoint.protocol(), ec);
    if (!ec) acceptor_->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_->bind(endpoint, ec);
    if (!ec) acceptor_->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Status::IoError("listen on " + state_.options.host + ":" + std::to_string(state_.options.port) + ": " + ec.message());
    }
    port_ = acceptor_->local_endpoint().port();
    Accept();
    const int threads = std::max(1, state_.options.io_threads);
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { ioc_->run(); });
    return Status::Ok();
  }

  int port() const { return port_; }

  void Stop() {
    std::lock_guard lock(stop_mu_);
    if (!ioc_) return;
    {
      std::lock_guard gate_lock(state_.gate->mu);
      state_.gate->open = false;
    }
    work_.reset();
    ioc_->stop();
    for (auto& t : threads_) t.join();
    threads_.clear();
    acceptor_.reset();
    // Destroying the io_context destroys the connections still queued in it; their destructors
    // cancel their engine requests.
    ioc_.reset();
  }

 private:
  void Accept() {
    acceptor_->async_accept(asio::make_strand(*ioc_), [this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        socket.set_option(tcp::no_delay(true), ec);
        std::make_shared<Connection>(std::move(socket), state_)->Start();
      }
      Accept();
    });
  }

  ServerState state_;
  std::unique_ptr<asio::io_context> ioc_ = std::make_unique<asio::io_context>();
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_{ioc_->get_executor()};
  std::unique_ptr<tcp::acceptor> acceptor_;
  std::vector<std::thread> threads_;
  std::mutex stop_mu_;
  int port_ = 0;
};

Result<std::unique_ptr<HttpFrontend>> HttpFrontend::Start(const HttpFrontendOptions& options,
                                                          std::shared_ptr<ModelRegistry> registry) {
  if (!registry) return Status::InvalidArgument("HttpFrontend: null registry");
  auto impl = std::make_unique<Impl>(options, std::move(registry));
  DYN_RETURN_IF_ERROR(impl->Listen());
  return std::unique_ptr<HttpFrontend>(new HttpFrontend(std::move(impl)));
}

HttpFrontend::HttpFrontend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpFrontend::~HttpFrontend() { Stop(); }
int HttpFrontend::port() const { return impl_->port(); }
void HttpFrontend::Stop() { impl_->Stop(); }

}  // namespace dyn
