// RemoteEngine over real loopback request-plane servers with echo engines behind them: routing
// modes, migration when a worker's server goes away mid-stream, no instances, cancellation.
#include "runtime/remote_engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "engine/echo/echo_engine.h"

namespace dyn {
namespace {

using namespace std::chrono_literals;

struct Worker {
  EnginePtr engine;
  std::unique_ptr<RequestServer> server;
  std::string address;
};

Worker StartWorker(double delay_ms) {
  Worker w;
  EchoEngineOptions eo;
  eo.token_delay_ms = delay_ms;
  w.engine = CreateEchoEngine(eo);
  RequestServerOptions so;
  so.host = "127.0.0.1";
  auto server = RequestServer::Start(so);
  EXPECT_TRUE(server.ok()) << server.status().ToString();
  w.server = std::move(*server);
  w.server->AddEngineEndpoint("generate", w.engine);
  w.address = "127.0.0.1:" + std::to_string(w.server->port());
  return w;
}

// Collects one stream's deltas; Wait() returns once the final delta arrived.
struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::optional<FinishReason> finish;
  std::string error;
  uint32_t prompt_tokens = 0;

  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard<std::mutex> lock(mu);
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.prompt_tokens) prompt_tokens = o.prompt_tokens;
      if (o.finish_reason) {
        finish = o.finish_reason;
        error = o.error;
        cv.notify_all();
      }
    };
  }
  bool Wait(std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return finish.has_value(); });
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mu);
    return tokens.size();
  }
};

PreprocessedRequest Request(int max_tokens) {
  PreprocessedRequest r;
  r.request_id = "r";
  r.token_ids = {11, 12, 13, 14, 15};
  r.sampling.temperature = 0;
  r.stop.max_tokens = max_tokens;
  r.stop.ignore_eos = true;
  return r;
}

std::shared_ptr<RequestClient> Client() {
  RequestClientOptions co;
  co.dead_after_ms = 1000;
  co.heartbeat_interval_ms = 200;
  auto c = RequestClient::Create(co);
  EXPECT_TRUE(c.ok());
  return *c;
}

TEST(RemoteEngine, RoundRobinSpreadsEvenly) {
  Worker a = StartWorker(0), b = StartWorker(0);
  auto client = Client();
  auto engine = RemoteEngine::Create(client, RemoteEngineOptions{});
  engine->AddInstance(1, a.address);
  engine->AddInstance(2, b.address);
  for (int i = 0; i < 10; ++i) {
    Collector c;
    engine->Generate(Request(4), std::make_shared<RequestContext>("r"), c.Sink());
    ASSERT_TRUE(c.Wait());
    EXPECT_EQ(*c.finish, FinishReason::kLength);
    EXPECT_EQ(c.tokens.size(), 4u);
    EXPECT_EQ(c.prompt_tokens, 5u);
  }
  EXPECT_EQ(a.engine->Metrics().generated_tokens, 20u);
  EXPECT_EQ(b.engine->Metrics().generated_tokens, 20u);
  client->Stop();
  a.server->Stop();
  b.server->Stop();
  a.engine->Shutdown();
  b.engine->Shutdown();
}

TEST(RemoteEngine, LeastLoadedAvoidsTheBusyInstance) {
  Worker a = StartWorker(5), b = StartWorker(5);
  auto client = Client();
  RemoteEngineOptions o;
  o.mode = RouterMode::kLeastLoaded;
  auto engine = RemoteEngine::Create(client, o);
  engine->AddInstance(1, a.address);
  engine->AddInstance(2, b.address);
  engine->ReportLoad(1, 50);  // another frontend keeps instance 1 busy
  std::vector<std::unique_ptr<Collector>> cs;
  for (int i = 0; i < 6; ++i) {
    cs.push_back(std::make_unique<Collector>());
    engine->Generate(Request(3), std::make_shared<RequestContext>("r"), cs.back()->Sink());
  }
  for (auto& c : cs) ASSERT_TRUE(c->Wait());
  EXPECT_EQ(a.engine->Metrics().generated_tokens, 0u);
  EXPECT_EQ(b.engine->Metrics().generated_tokens, 18u);
  client->Stop();
  a.server->Stop();
  b.server->Stop();
  a.engine->Shutdown();
  b.engine->Shutdown();
}

TEST(RemoteEngine, StreamMigratesWhenItsWorkerGoesAway) {
  Worker a = StartWorker(5), b = StartWorker(5);
  auto client = Client();
  auto engine = RemoteEngine::Create(client, RemoteEngineOptions{});
  engine->AddInstance(1, a.address);  // round-robin: the first request goes to a
  engine->AddInstance(2, b.address);
  Collector c;
  engine->Generate(Request(60), std::make_shared<RequestContext>("r"), c.Sink());
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (c.count() < 10 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  ASSERT_GE(c.count(), 10u);
  a.server->Stop();  // the worker dies mid-stream
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kLength) << c.error;
  EXPECT_EQ(c.tokens.size(), 60u);  // nothing lost, nothing repeated
  EXPECT_EQ(engine->Metrics().migrations, 1u);
  EXPECT_GT(b.engine->Metrics().generated_tokens, 0u);
  EXPECT_EQ(engine->Metrics().running, 0);
  client->Stop();
  b.server->Stop();
  a.engine->Shutdown();
  b.engine->Shutdown();
}

TEST(RemoteEngine, NoInstanceIsUnavailable) {
  auto client = Client();
  auto engine = RemoteEngine::Create(client, RemoteEngineOptions{});
  Collector c;
  engine->Generate(Request(4), std::make_shared<RequestContext>("r"), c.Sink());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kError);
  EXPECT_EQ(c.error.rfind("Unavailable", 0), 0u) << c.error;
  client->Stop();
}

TEST(RemoteEngine, MigrationLimitEndsWithAnError) {
  auto client = Client();
  RemoteEngineOptions o;
  o.migration_limit = 2;
  auto engine = RemoteEngine::Create(client, o);
  engine->AddInstance(1, "127.0.0.1:1");  // nothing listens there
  Collector c;
  engine->Generate(Request(4), std::make_shared<RequestContext>("r"), c.Sink());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kError);
  EXPECT_EQ(engine->Metrics().migrations, 2u);
  client->Stop();
}

TEST(RemoteEngine, CancelReachesTheWorker) {
  Worker a = StartWorker(5);
  auto client = Client();
  auto engine = RemoteEngine::Create(client, RemoteEngineOptions{});
  engine->AddInstance(1, a.address);
  Collector c;
  auto ctx = std::make_shared<RequestContext>("r");
  engine->Generate(Request(1000), ctx, c.Sink());
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (c.count() < 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  ctx->Cancel();
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kCancelled);
  const auto idle_deadline = std::chrono::steady_clock::now() + 5s;
  while (a.server->active_calls() > 0 && std::chrono::steady_clock::now() < idle_deadline)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(a.server->active_calls(), 0);
  EXPECT_LT(a.engine->Metrics().generated_tokens, 1000u);
  client->Stop();
  a.server->Stop();
  a.engine->Shutdown();
}

TEST(RemoteEngine, KvModeSendsSharedPrefixesToTheSameWorker) {
  Worker a = StartWorker(0), b = StartWorker(0);
  auto client = Client();
  RemoteEngineOptions o;
  o.mode = RouterMode::kKv;
  o.kv_block_size = 4;
  auto engine = RemoteEngine::Create(client, o);
  engine->AddInstance(1, a.address);
  engine->AddInstance(2, b.address);
  auto run = [&](std::vector<uint32_t> prompt) {
    PreprocessedRequest r = Request(2);
    r.token_ids = std::move(prompt);
    Collector c;
    engine->Generate(r, std::make_shared<RequestContext>("r"), c.Sink());
    EXPECT_TRUE(c.Wait());
    EXPECT_EQ(*c.finish, FinishReason::kLength) << c.error;
    return std::make_pair(a.engine->Metrics().generated_tokens, b.engine->Metrics().generated_tokens);
  };
  std::vector<uint32_t> p1(16), p2(16);
  for (uint32_t i = 0; i < 16; ++i) {
    p1[i] = 100 + i;
    p2[i] = 300 + i;
  }
  const auto first = run(p1);
  const bool on_a = first.first == 2;
  std::vector<uint32_t> p1_longer = p1;
  p1_longer.insert(p1_longer.end(), {200, 201, 202, 203});
  const auto second = run(p1_longer);  // 4 blocks of overlap: same worker
  EXPECT_EQ(on_a ? second.first : second.second, 4u);
  const auto third = run(p2);  // no overlap anywhere: the tie goes to the smaller tree, the other worker
  EXPECT_EQ(on_a ? third.second : third.first, 2u);
  client->Stop();
  a.server->Stop();
  b.server->Stop();
  a.engine->Shutdown();
  b.engine->Shutdown();
}

}  // namespace
}  // namespace dyn
