// The request plane over real loopback sockets, with the echo engine behind the server.
#include "runtime/request_plane.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <thread>

#include "engine/echo/echo_engine.h"
#include "runtime/engine_codec.h"
#include "runtime/request_frame.h"

namespace dyn {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Records every context it is given, then forwards to the echo engine.
class RecordingEngine final : public Engine {
 public:
  explicit RecordingEngine(EnginePtr inner) : inner_(std::move(inner)) {}
  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    {
      std::lock_guard lock(mu_);
      contexts_.push_back(context);
    }
    inner_->Generate(std::move(request), std::move(context), std::move(sink));
  }
  EngineMetrics Metrics() const override { return inner_->Metrics(); }
  void Shutdown() override { inner_->Shutdown(); }
  std::vector<std::shared_ptr<RequestContext>> contexts() {
    std::lock_guard lock(mu_);
    return contexts_;
  }

 private:
  EnginePtr inner_;
  std::mutex mu_;
  std::vector<std::shared_ptr<RequestContext>> contexts_;
};

struct CallResult {
  std::vector<uint32_t> tokens;
  int data_frames = 0;
  std::optional<FinishReason> finish;
  Status status = Status::Internal("no end");
};

// A call in flight: `first_data` is ready at the first response, `done` at the end.
struct PendingCall {
  std::future<void> first_data;
  std::future<CallResult> done;
  std::shared_ptr<RequestContext> context;
};

PreprocessedRequest MakeRequest(std::vector<uint32_t> prompt, int max_tokens) {
  PreprocessedRequest q;
  q.request_id = "r";
  q.token_ids = std::move(prompt);
  q.stop.max_tokens = max_tokens;
  return q;
}

PendingCall StartCall(RequestClient& client, const std::string& address, const std::string& endpoint,
                      const PreprocessedRequest& request) {
  struct State {
    CallResult result;
    std::promise<void> first;
    bool first_set = false;
    std::promise<CallResult> done;
  };
  auto st = std::make_shared<State>();
  PendingCall pc;
  pc.first_data = st->first.get_future();
  pc.done = st->done.get_future();
  pc.context = std::make_shared<RequestContext>(request.request_id);
  CallCallbacks cb;
  cb.on_data = [st](std::string_view payload) {
    auto out = DecodeOutput(payload);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    ++st->result.data_frames;
    st->result.tokens.insert(st->result.tokens.end(), out->token_ids.begin(), out->token_ids.end());
    if (out->finish_reason) st->result.finish = out->finish_reason;
    if (!st->first_set) {
      st->first_set = true;
      st->first.set_value();
    }
  };
  cb.on_end = [st](const Status& status) {
    st->result.status = status;
    if (!st->first_set) {
      st->first_set = true;
      st->first.set_value();
    }
    st->done.set_value(std::move(st->result));
  };
  client.Call(address, endpoint, EncodeRequest(request), pc.context, std::move(cb));
  return pc;
}

CallResult Wait(PendingCall& pc, std::chrono::milliseconds timeout = 10s) {
  if (pc.done.wait_for(timeout) != std::future_status::ready) {
    ADD_FAILURE() << "call did not end";
    return {};
  }
  return pc.done.get();
}

std::vector<uint32_t> Echoed(const std::vector<uint32_t>& prompt, int n) {
  std::vector<uint32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(prompt[i % prompt.size()]);
  return out;
}

// Polls `pred` until true or timeout.
template <class Pred>
bool Eventually(Pred pred, std::chrono::milliseconds timeout = 5s) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

struct Fixture {
  explicit Fixture(double token_delay_ms = 0, RequestServerOptions server_options = {},
                   RequestClientOptions client_options = {}) {
    server_options.host = "127.0.0.1";
    engine = std::make_shared<RecordingEngine>(CreateEchoEngine({token_delay_ms}));
    auto s = RequestServer::Start(server_options);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    server = std::move(s).value();
    server->AddEngineEndpoint("generate", engine);
    address = "127.0.0.1:" + std::to_string(server->port());
    auto c = RequestClient::Create(client_options);
    EXPECT_TRUE(c.ok());
    client = std::move(c).value();
  }
  ~Fixture() {
    client->Stop();
    server->Stop();
    engine->Shutdown();
  }
  std::shared_ptr<RecordingEngine> engine;
  std::unique_ptr<RequestServer> server;
  std::shared_ptr<RequestClient> client;
  std::string address;
};

// ---- raw sockets for misbehaving peers ----

int ConnectLoopback(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

void SendAll(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    ASSERT_GT(n, 0);
    bytes.remove_prefix(static_cast<size_t>(n));
  }
}

// Reads until EOF or until `timeout` passes without data; returns the bytes and whether EOF came.
std::pair<std::string, bool> ReadUntilEof(int fd, std::chrono::milliseconds timeout) {
  std::string out;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return {out, false};
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return {out, true};
    out.append(buf, static_cast<size_t>(n));
  }
}

TEST(RequestPlane, ManyConcurrentCallsOnOneConnection) {
  Fixture f;
  std::vector<PendingCall> calls;
  std::vector<std::vector<uint32_t>> prompts;
  for (uint32_t i = 0; i < 200; ++i) {
    prompts.push_back({i, 1000 + i, 2000 + i});
    calls.push_back(StartCall(*f.client, f.address, "generate", MakeRequest(prompts.back(), 8 + i % 5)));
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    CallResult r = Wait(calls[i]);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.ToString();
    EXPECT_EQ(r.tokens, Echoed(prompts[i], 8 + static_cast<int>(i) % 5)) << i;
    EXPECT_EQ(r.finish, FinishReason::kLength);
  }
  EXPECT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }));
}

TEST(RequestPlane, UnknownEndpointIsNotFoundAndBadRequestIsInvalid) {
  Fixture f;
  auto pc = StartCall(*f.client, f.address, "nope", MakeRequest({1}, 1));
  CallResult r = Wait(pc);
  EXPECT_EQ(r.status.code(), StatusCode::kNotFound) << r.status.ToString();

  // A payload that is not a request: the engine adapter ends the call with the decode error.
  auto st = std::make_shared<std::promise<Status>>();
  f.client->Call(f.address, "generate", "garbage", nullptr,
                 {[](std::string_view) {}, [st](const Status& s) { st->set_value(s); }});
  auto fut = st->get_future();
  ASSERT_EQ(fut.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(fut.get().code(), StatusCode::kInvalidArgument);
}

TEST(RequestPlane, CallsOverTheConnectionLimitAreResourceExhausted) {
  RequestServerOptions options;
  options.max_calls_per_connection = 2;
  Fixture f(/*token_delay_ms=*/5, options);
  std::vector<PendingCall> calls;
  for (int i = 0; i < 3; ++i) calls.push_back(StartCall(*f.client, f.address, "generate", MakeRequest({1, 2}, 100000)));
  CallResult third = Wait(calls[2]);
  EXPECT_EQ(third.status.code(), StatusCode::kResourceExhausted) << third.status.ToString();
  EXPECT_EQ(f.server->active_calls(), 2);
  for (int i = 0; i < 2; ++i) {
    calls[i].context->Cancel();
    EXPECT_EQ(Wait(calls[i]).status.code(), StatusCode::kCancelled);
  }
  EXPECT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }));
}

TEST(RequestPlane, ClientCancelReachesEngine) {
  Fixture f(/*token_delay_ms=*/5);
  auto pc = StartCall(*f.client, f.address, "generate", MakeRequest({1, 2, 3}, 100000));
  ASSERT_EQ(pc.first_data.wait_for(5s), std::future_status::ready);
  ASSERT_EQ(f.server->active_calls(), 1);
  const auto t0 = Clock::now();
  pc.context->Cancel();
  CallResult r = Wait(pc);
  EXPECT_EQ(r.status.code(), StatusCode::kCancelled);
  EXPECT_LT(Clock::now() - t0, 1s);
  auto contexts = f.engine->contexts();
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_TRUE(Eventually([&] { return contexts[0]->cancelled(); }));
  EXPECT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }));
  EXPECT_LT(r.tokens.size(), 100000u);
}

TEST(RequestPlane, ServerStopMidStreamIsUnavailable) {
  Fixture f(/*token_delay_ms=*/5);
  auto pc = StartCall(*f.client, f.address, "generate", MakeRequest({1, 2, 3}, 100000));
  ASSERT_EQ(pc.first_data.wait_for(5s), std::future_status::ready);
  f.server->Stop();
  CallResult r = Wait(pc, 5s);
  EXPECT_EQ(r.status.code(), StatusCode::kUnavailable) << r.status.ToString();
  auto contexts = f.engine->contexts();
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_TRUE(contexts[0]->cancelled());
  EXPECT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }));
}

TEST(RequestPlane, SilentServerIsDeclaredDead) {
  // A listener that never accepts: the kernel completes the handshake, nobody ever answers.
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(lfd, 16), 0);
  socklen_t len = sizeof(addr);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  const std::string address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));

  RequestClientOptions options;
  options.heartbeat_interval_ms = 50;
  options.dead_after_ms = 400;
  auto client = RequestClient::Create(options).value();
  const auto t0 = Clock::now();
  auto pc = StartCall(*client, address, "generate", MakeRequest({1}, 4));
  CallResult r = Wait(pc, 5s);
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
  EXPECT_EQ(r.status.code(), StatusCode::kUnavailable) << r.status.ToString();
  EXPECT_GE(elapsed.count(), 400);
  EXPECT_LE(elapsed.count(), 400 + 250);  // one heartbeat tick plus scheduling slack

  // Nothing listens on a closed port: connect fails with Unavailable, and quickly.
  close(lfd);
  auto refused = StartCall(*client, address, "generate", MakeRequest({1}, 4));
  EXPECT_EQ(Wait(refused, 5s).status.code(), StatusCode::kUnavailable);
  client->Stop();
}

TEST(RequestPlane, DrainRefusesNewCallsAndFinishesOldOnes) {
  Fixture f(/*token_delay_ms=*/5);
  auto old_call = StartCall(*f.client, f.address, "generate", MakeRequest({4, 5}, 40));
  ASSERT_EQ(old_call.first_data.wait_for(5s), std::future_status::ready);
  auto drained = std::async(std::launch::async, [&] {
    f.server->Drain(5000);
    return f.server->active_calls();
  });
  std::this_thread::sleep_for(30ms);  // Drain has set the flag by now
  auto new_call = StartCall(*f.client, f.address, "generate", MakeRequest({1}, 4));
  CallResult refused = Wait(new_call);
  EXPECT_EQ(refused.status.code(), StatusCode::kUnavailable);
  EXPECT_EQ(refused.status.message(), "draining");
  CallResult finished = Wait(old_call);
  EXPECT_TRUE(finished.status.ok()) << finished.status.ToString();
  EXPECT_EQ(finished.tokens, Echoed({4, 5}, 40));
  ASSERT_EQ(drained.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(drained.get(), 0);
}

TEST(RequestPlane, SlowReaderGetsCoalescedDeltas) {
  RequestServerOptions options;
  options.max_pending_bytes_per_call = 256;
  Fixture f(0, options);
  const int kTokens = 400000;
  const std::vector<uint32_t> prompt = {10, 11, 12, 13, 14, 15, 16};
  int fd = ConnectLoopback(f.server->port());
  std::string call;
  AppendCallFrame(call, 1, "generate", EncodeRequest(MakeRequest(prompt, kTokens)));
  SendAll(fd, call);
  // Read nothing until the engine is done: whatever the socket buffers cannot take must be merged
  // on the server, not queued delta by delta.
  ASSERT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }, 15s));
  // Now read, parsing as the bytes come, up to the END frame.
  FrameParser parser(64 << 20);
  std::vector<uint32_t> tokens;
  int data_frames = 0;
  size_t total_bytes = 0;
  bool ended_ok = false, ended = false;
  while (!ended) {
    pollfd p{fd, POLLIN, 0};
    ASSERT_GT(poll(&p, 1, 3000), 0) << "no END from the server";
    char* buf = parser.WritableBuffer(65536);
    ssize_t n = recv(fd, buf, 65536, 0);
    ASSERT_GT(n, 0) << "server closed before END";
    parser.Commit(static_cast<size_t>(n));
    total_bytes += static_cast<size_t>(n);
    Frame frame;
    while (!ended && *parser.Next(frame)) {
      if (frame.type == FrameType::kData) {
        ++data_frames;
        auto out = DecodeOutput(frame.payload);
        ASSERT_TRUE(out.ok());
        tokens.insert(tokens.end(), out->token_ids.begin(), out->token_ids.end());
      } else if (frame.type == FrameType::kEnd) {
        ended = true;
        ended_ok = ParseEndPayload(frame.payload).ok();
      }
    }
  }
  close(fd);
  EXPECT_TRUE(ended_ok);
  EXPECT_EQ(tokens, Echoed(prompt, kTokens));
  // One delta per token would be kTokens frames (~17 MB); only what fit in the kernel's socket
  // buffers went out one by one.
  EXPECT_LT(data_frames, kTokens / 2);
  std::printf("slow reader: %d tokens in %d DATA frames (%zu bytes)\n", kTokens, data_frames, total_bytes);
}

TEST(RequestPlane, GarbageClosesOnlyThatConnection) {
  RequestServerOptions options;
  options.max_frame_bytes = 1 << 20;
  Fixture f(0, options);
  // Warm the client's connection first so the garbage arrives on a second one.
  auto before = StartCall(*f.client, f.address, "generate", MakeRequest({1, 2}, 3));
  ASSERT_TRUE(Wait(before).status.ok());

  for (std::string garbage : {std::string("\xff\xff\xff\x7fhello"), std::string("\x20\x00\x00\x00\x63" "0123456789abcdefghijklmnopqrstuvwxyz", 41)}) {
    int fd = ConnectLoopback(f.server->port());
    SendAll(fd, garbage);
    auto [bytes, eof] = ReadUntilEof(fd, 3s);
    EXPECT_TRUE(eof) << "server kept a connection that sent garbage";
    close(fd);
  }
  auto after = StartCall(*f.client, f.address, "generate", MakeRequest({7, 8}, 5));
  CallResult r = Wait(after);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(r.tokens, Echoed({7, 8}, 5));
}

TEST(RequestPlane, DisconnectEndsCallsAndNextCallReconnects) {
  Fixture f(/*token_delay_ms=*/5);
  auto pc = StartCall(*f.client, f.address, "generate", MakeRequest({1, 2, 3}, 100000));
  ASSERT_EQ(pc.first_data.wait_for(5s), std::future_status::ready);
  f.client->Disconnect(f.address);
  EXPECT_EQ(Wait(pc).status.code(), StatusCode::kUnavailable);
  // The server sees the connection close and cancels the call.
  EXPECT_TRUE(Eventually([&] { return f.server->active_calls() == 0; }));
  auto again = StartCall(*f.client, f.address, "generate", MakeRequest({3, 4}, 6));
  CallResult r = Wait(again);
  EXPECT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(r.tokens, Echoed({3, 4}, 6));
}

}  // namespace
}  // namespace dyn

namespace dyn {
namespace {

// Clients connecting while the server stops: once the server is stopped and destroyed, every
// connection it accepted is closed. The bug this guards against leaked rather than hung: a
// connection accepted after Stop took its list, or a handler left queued when the io threads
// stopped, kept its connection, which keeps the io_context that keeps the handler (a cycle);
// LeakSanitizer (the ASan build) reports it at exit.
TEST(RequestPlane, StopWhileClientsConnectClosesEveryConnection) {
  for (int iter = 0; iter < 20; ++iter) {
    RequestServerOptions options;
    options.host = "127.0.0.1";
    auto s = RequestServer::Start(options);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    std::unique_ptr<RequestServer> server = std::move(s).value();
    const int port = server->port();
    std::atomic<bool> stop{false};
    std::vector<int> fds;
    std::thread connector([&] {
      while (!stop.load()) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(static_cast<uint16_t>(port));
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
          close(fd);
          break;  // the listener is gone
        }
        fds.push_back(fd);
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(2 + iter % 5));
    server->Stop();
    // A socket asio had accepted but not yet handed over when the io threads stopped is closed
    // with the io_context, i.e. with the server.
    server.reset();
    stop = true;
    connector.join();
    for (size_t i = 0; i < fds.size(); ++i) {
      // One byte first: a connect that raced with the listener's close can leave the client
      // established with no server socket at all (the kernel dropped the half-open request
      // silently); data makes the kernel answer with a reset. A socket the server still holds
      // with no one reading it answers nothing.
      send(fds[i], "x", 1, MSG_NOSIGNAL);
      auto [bytes, eof] = ReadUntilEof(fds[i], 2s);
      EXPECT_TRUE(eof) << "a connection stayed open after Stop (iteration " << iter << ", connection " << i << " of " << fds.size() << ")";
      close(fds[i]);
    }
  }
}

}  // namespace
}  // namespace dyn
