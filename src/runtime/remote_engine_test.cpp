// RemoteEngine over real loopback request-plane servers with echo engines behind them: routing
// modes, migration when a worker's server goes away mid-stream, no instances, cancellation.
#include "runtime/remote_engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "engine/echo/echo_engine.h"
#include "runtime/kv_event_codec.h"
#include "runtime/kv_event_publisher.h"

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
  uint64_t worker_id = 0;

  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard<std::mutex> lock(mu);
      if (o.worker_id) worker_id = o.worker_id;
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

// CachedPrefixTokens: the longest prefix an instance holds, in tokens (approximate mode: what was
// routed there); none once that instance is gone, and always 0 outside kv mode.
TEST(RemoteEngine, CachedPrefixTokensFollowsTheIndex) {
  Worker a = StartWorker(0);
  auto client = Client();
  RemoteEngineOptions o;
  o.mode = RouterMode::kKv;
  o.kv_block_size = 4;
  auto engine = RemoteEngine::Create(client, o);
  auto rr = RemoteEngine::Create(client, RemoteEngineOptions{});
  engine->AddInstance(1, a.address);
  rr->AddInstance(1, a.address);
  std::vector<uint32_t> prompt;
  for (uint32_t i = 0; i < 18; ++i) prompt.push_back(400 + i);
  EXPECT_EQ(engine->CachedPrefixTokens(prompt), 0);
  PreprocessedRequest r = Request(2);
  r.token_ids = prompt;
  Collector c, d;
  engine->Generate(r, std::make_shared<RequestContext>("r"), c.Sink());
  rr->Generate(r, std::make_shared<RequestContext>("r"), d.Sink());
  ASSERT_TRUE(c.Wait());
  ASSERT_TRUE(d.Wait());
  EXPECT_EQ(engine->CachedPrefixTokens(prompt), 16);  // 4 full blocks; the partial one is not indexed
  std::vector<uint32_t> other = prompt;
  other[9] = 1;  // diverges in the third block
  EXPECT_EQ(engine->CachedPrefixTokens(other), 8);
  EXPECT_EQ(rr->CachedPrefixTokens(prompt), 0);
  engine->RemoveInstance(1);
  EXPECT_EQ(engine->CachedPrefixTokens(prompt), 0);
  client->Stop();
  a.server->Stop();
  a.engine->Shutdown();
}

// Waits (up to 5 s) for `pred` to hold.
template <typename Pred>
bool Eventually(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

KvEvent StoredEvent(uint64_t event_id, std::optional<uint64_t> parent, uint64_t block_hash, uint32_t first_token) {
  KvEvent e;
  e.type = KvEvent::Type::kStored;
  e.event_id = event_id;
  e.parent_hash = parent;
  KvStoredBlock b;
  b.block_hash = block_hash;
  for (uint32_t i = 0; i < 16; ++i) b.token_ids.push_back(first_token + i);
  e.blocks.push_back(std::move(b));
  return e;
}

// A frontend that starts after its workers learns their caches from their dumps, and a lost
// event (an id gap) is repaired from a fresh dump.
TEST(RemoteEngine, KvModeResynchronisesFromWorkerDumps) {
  Worker a = StartWorker(0), b = StartWorker(0);
  KvEventPublisher pa, pb;
  pa.Start(nullptr, "", 1);
  pb.Start(nullptr, "", 2);
  pa.ServeDumps(*a.server);
  pb.ServeDumps(*b.server);
  // Worker 1 already holds a two-block prefix (tokens 500..531) before the frontend exists.
  pa.OnKvEvent(StoredEvent(1, std::nullopt, 9001, 500));
  pa.OnKvEvent(StoredEvent(2, 9001, 9002, 516));

  auto client = RequestClient::Create(RequestClientOptions{});
  ASSERT_TRUE(client.ok());
  RemoteEngineOptions o;
  o.mode = RouterMode::kKv;
  o.use_kv_events = true;
  o.kv_block_size = 16;
  auto engine = RemoteEngine::Create(*client, o);
  engine->AddInstance(1, a.address);
  engine->AddInstance(2, b.address);
  ASSERT_TRUE(Eventually([&] { return engine->Metrics().kv_dumps_applied == 2; }));

  std::vector<uint32_t> prompt;
  for (uint32_t i = 0; i < 40; ++i) prompt.push_back(500 + i);
  for (int i = 0; i < 4; ++i) {
    PreprocessedRequest r = Request(2);
    r.token_ids = prompt;
    Collector c;
    engine->Generate(r, std::make_shared<RequestContext>("r" + std::to_string(i)), c.Sink());
    ASSERT_TRUE(c.Wait());
    EXPECT_EQ(c.worker_id, 1u) << "request " << i << " did not go to the worker holding its prefix";
  }

  // Worker 2 stores a block the frontend never hears of (event 1 is lost), then event 2 arrives:
  // a gap, so the frontend fetches worker 2's dump, which has both blocks.
  pb.OnKvEvent(StoredEvent(1, std::nullopt, 7001, 800));
  pb.OnKvEvent(StoredEvent(2, 7001, 7002, 816));
  router::RouterEvent second = ToRouterEvent(2, StoredEvent(2, 7001, 7002, 816));
  EXPECT_FALSE(engine->ApplyKvEvent(second));  // the gap is reported
  ASSERT_TRUE(Eventually([&] { return engine->Metrics().kv_dumps_applied == 3; }));
  EXPECT_EQ(engine->Metrics().kv_event_gaps, 1u);
  std::vector<uint32_t> prompt2;
  for (uint32_t i = 0; i < 36; ++i) prompt2.push_back(800 + i);
  PreprocessedRequest r = Request(2);
  r.token_ids = prompt2;
  Collector c;
  engine->Generate(r, std::make_shared<RequestContext>("after-gap"), c.Sink());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(c.worker_id, 2u);
  EXPECT_GE(engine->Metrics().router_decisions, 5u);

  client.value()->Stop();
  a.server->Stop();
  b.server->Stop();
  a.engine->Shutdown();
  b.engine->Shutdown();
}

}  // namespace
}  // namespace dyn
