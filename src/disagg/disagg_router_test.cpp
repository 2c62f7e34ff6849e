// DisaggRouter over real loopback request-plane servers. The workers run a small fake engine that
// speaks the phase protocol (engine.h RequestPhase) with a deterministic "model" (the next token is
// a hash of the sequence so far), so the test can compare every path with aggregated output:
// kPrefillOnly answers the first token and a descriptor naming the prompt and that token;
// kDecodeImported checks the descriptor against its prompt and first token (a mismatch is a
// failed test, a configured pull failure ends it with "Unavailable: KV transfer failed") and
// continues from the second token.
#include "disagg/disagg_router.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace dyn {
namespace {

using namespace std::chrono_literals;

uint32_t NextToken(const std::vector<uint32_t>& seq) {
  uint64_t h = 1469598103934665603ull;
  for (uint32_t t : seq) h = (h ^ t) * 1099511628211ull;
  return 100 + static_cast<uint32_t>(h % 500);
}

// What aggregated serving of `prompt` produces.
std::vector<uint32_t> Reference(std::vector<uint32_t> prompt, int max_tokens) {
  std::vector<uint32_t> out;
  for (int i = 0; i < max_tokens; ++i) {
    out.push_back(NextToken(prompt));
    prompt.push_back(out.back());
  }
  return out;
}

std::string Descriptor(const std::vector<uint32_t>& prompt, uint32_t first) {
  return "fake-kv:" + std::to_string(NextToken(prompt)) + ":" + std::to_string(prompt.size()) + ":" + std::to_string(first);
}

class FakeEngine : public Engine {
 public:
  explicit FakeEngine(double token_delay_ms = 0) : delay_(token_delay_ms) {}
  ~FakeEngine() override { Shutdown(); }

  std::atomic<bool> fail_pulls{false};
  std::atomic<bool> reject_descriptors{false};
  std::atomic<int> full{0}, prefill_only{0}, decode_imported{0}, bad_descriptors{0};
  std::atomic<uint64_t> generated{0};

  PreprocessedRequest last_request() {
    std::lock_guard lock(mu_);
    return last_;
  }

  void Generate(PreprocessedRequest r, std::shared_ptr<RequestContext> ctx, OutputSink sink) override {
    {
      std::lock_guard lock(mu_);
      last_ = r;
      if (stopped_) return;
    }
    switch (r.phase) {
      case RequestPhase::kFull: ++full; break;
      case RequestPhase::kPrefillOnly: ++prefill_only; break;
      case RequestPhase::kDecodeImported: ++decode_imported; break;
    }
    std::lock_guard lock(mu_);
    threads_.emplace_back([this, r = std::move(r), ctx, sink = std::move(sink)] { Run(r, *ctx, sink); });
  }

  EngineMetrics Metrics() const override {
    EngineMetrics m;
    m.generated_tokens = generated.load();
    return m;
  }

  void Shutdown() override {
    std::vector<std::thread> threads;
    {
      std::lock_guard lock(mu_);
      stopped_ = true;
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
  }

 private:
  void Run(const PreprocessedRequest& r, RequestContext& ctx, const OutputSink& sink) {
    std::vector<uint32_t> seq = r.token_ids;
    EngineOutput first;
    first.prompt_tokens = static_cast<uint32_t>(r.token_ids.size());
    first.cached_tokens = r.phase == RequestPhase::kPrefillOnly ? 3 : 1;  // tells the two sides apart
    int produced = 0;
    if (r.phase == RequestPhase::kPrefillOnly) {
      const uint32_t t = NextToken(seq);
      first.token_ids.push_back(t);
      ++generated;
      first.finish_reason = FinishReason::kLength;
      if (r.stop.max_tokens > 1) first.kv_transfer = Descriptor(r.token_ids, t);
      sink(std::move(first));
      return;
    }
    if (r.phase == RequestPhase::kDecodeImported) {
      if (reject_descriptors || r.kv_transfer != Descriptor(r.token_ids, r.first_token)) {
        if (!reject_descriptors) ++bad_descriptors;
        first.finish_reason = FinishReason::kError;
        first.error = "InvalidArgument: descriptor does not match";
        sink(std::move(first));
        return;
      }
      if (fail_pulls) {
        std::this_thread::sleep_for(2ms);
        first.finish_reason = FinishReason::kError;
        first.error = "Unavailable: KV transfer failed: source gone";
        sink(std::move(first));
        return;
      }
      seq.push_back(r.first_token);
      produced = 1;  // the first token counts toward max_tokens
    }
    bool first_sent = false;
    while (produced < r.stop.max_tokens) {
      if (delay_ > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_));
      EngineOutput o = first_sent ? EngineOutput{} : first;
      first_sent = true;
      if (ctx.cancelled() || stopped()) {
        o.finish_reason = FinishReason::kCancelled;
        sink(std::move(o));
        return;
      }
      const uint32_t t = NextToken(seq);
      seq.push_back(t);
      o.token_ids.push_back(t);
      ++generated;
      if (++produced == r.stop.max_tokens) o.finish_reason = FinishReason::kLength;
      sink(std::move(o));
    }
    if (!first_sent) {  // max_tokens already reached by the imported first token
      first.finish_reason = FinishReason::kLength;
      sink(std::move(first));
    }
  }

  bool stopped() {
    std::lock_guard lock(mu_);
    return stopped_;
  }

  double delay_;
  std::mutex mu_;
  bool stopped_ = false;
  PreprocessedRequest last_;
  std::vector<std::thread> threads_;
};

struct Worker {
  std::shared_ptr<FakeEngine> engine;
  std::unique_ptr<RequestServer> server;
  std::string address;

  explicit Worker(double delay_ms = 0) : engine(std::make_shared<FakeEngine>(delay_ms)) {
    RequestServerOptions so;
    so.host = "127.0.0.1";
    auto s = RequestServer::Start(so);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    server = std::move(*s);
    server->AddEngineEndpoint("generate", engine);
    address = "127.0.0.1:" + std::to_string(server->port());
  }
  ~Worker() {
    server->Stop();
    engine->Shutdown();
  }
};

struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::optional<FinishReason> finish;
  std::string error;
  int prompt_count_deltas = 0;  // deltas that carried prompt_tokens
  uint32_t prompt_tokens = 0, cached_tokens = 0;
  uint64_t first_worker = 0, last_worker = 0;
  bool descriptor_leaked = false;

  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_FALSE(finish.has_value()) << "delta after the final one";
      if (o.worker_id) {
        if (!first_worker) first_worker = o.worker_id;
        last_worker = o.worker_id;
      }
      if (!o.kv_transfer.empty()) descriptor_leaked = true;
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.prompt_tokens) {
        ++prompt_count_deltas;
        prompt_tokens = o.prompt_tokens;
        cached_tokens = o.cached_tokens;
      }
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

std::vector<uint32_t> Prompt(int n, uint32_t seed) {
  std::vector<uint32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(1000 + seed * 97 + static_cast<uint32_t>(i));
  return p;
}

PreprocessedRequest Request(std::vector<uint32_t> prompt, int max_tokens) {
  PreprocessedRequest r;
  r.request_id = "r";
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0;
  r.stop.max_tokens = max_tokens;
  r.stop.ignore_eos = true;
  return r;
}

// A frontend's two pools and the router over them.
struct Frontend {
  std::shared_ptr<RequestClient> client;
  std::shared_ptr<RemoteEngine> prefill, decode;
  std::shared_ptr<DisaggRouter> router;

  std::mutex released_mu;
  std::vector<std::string> released;  // descriptors handed to release_kv

  explicit Frontend(int max_local_prefill_tokens, RouterMode mode = RouterMode::kRoundRobin) {
    RequestClientOptions co;
    co.dead_after_ms = 1000;
    co.heartbeat_interval_ms = 200;
    client = *RequestClient::Create(co);
    RemoteEngineOptions o;
    o.mode = mode;
    o.kv_block_size = 4;
    prefill = RemoteEngine::Create(client, o);
    decode = RemoteEngine::Create(client, o);
    DisaggRouterOptions dro;
    dro.max_local_prefill_tokens = max_local_prefill_tokens;
    dro.release_kv = [this](const std::string& descriptor) {
      std::lock_guard lock(released_mu);
      released.push_back(descriptor);
    };
    router = DisaggRouter::Create(prefill, decode, dro);
  }
  ~Frontend() { client->Stop(); }

  // Serves one request to the end.
  std::unique_ptr<Collector> Serve(const PreprocessedRequest& r) {
    auto c = std::make_unique<Collector>();
    router->Generate(r, std::make_shared<RequestContext>("req"), c->Sink());
    EXPECT_TRUE(c->Wait());
    return c;
  }
};

template <typename Pred>
bool Eventually(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

TEST(DisaggRouter, RemotePrefillGivesTheAggregatedOutput) {
  Worker p, d;
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    const auto prompt = Prompt(3 + 9 * static_cast<int>(seed), seed);
    auto c = f.Serve(Request(prompt, 7));
    EXPECT_EQ(*c->finish, FinishReason::kLength) << c->error;
    EXPECT_EQ(c->tokens, Reference(prompt, 7)) << "seed " << seed;
    EXPECT_EQ(c->prompt_count_deltas, 1);  // the prompt counts reach the client once
    EXPECT_EQ(c->prompt_tokens, prompt.size());
    EXPECT_EQ(c->cached_tokens, 3u);  // the prefill worker's
    EXPECT_EQ(c->first_worker, 11u);
    EXPECT_EQ(c->last_worker, 22u);
    EXPECT_FALSE(c->descriptor_leaked);
  }
  EXPECT_EQ(p.engine->prefill_only.load(), 5);
  EXPECT_EQ(d.engine->decode_imported.load(), 5);
  EXPECT_EQ(d.engine->full.load(), 0);
  EXPECT_EQ(d.engine->bad_descriptors.load(), 0);
  EXPECT_TRUE(f.released.empty());  // decoded normally: the decode worker released them
  const EngineMetrics m = f.router->Metrics();
  EXPECT_EQ(m.remote_prefills, 5u);
  EXPECT_EQ(m.local_prefills, 0u);
  EXPECT_EQ(m.disagg_fallbacks, 0u);
  EXPECT_EQ(m.generated_tokens, 35u);
  EXPECT_EQ(m.running, 0);
}

TEST(DisaggRouter, FirstTokenThatEndsTheRequestSkipsDecode) {
  Worker p, d;
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  const auto prompt = Prompt(20, 4);
  auto c = f.Serve(Request(prompt, 1));
  EXPECT_EQ(*c->finish, FinishReason::kLength);
  EXPECT_EQ(c->tokens, Reference(prompt, 1));
  EXPECT_EQ(d.engine->decode_imported.load() + d.engine->full.load(), 0);
}

TEST(DisaggRouter, ShortUncachedPartIsPrefilledLocally) {
  Worker p, d;
  Frontend f(/*max_local_prefill_tokens=*/16, RouterMode::kKv);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  const auto short_prompt = Prompt(10, 1);
  auto c1 = f.Serve(Request(short_prompt, 4));
  EXPECT_EQ(c1->tokens, Reference(short_prompt, 4));
  EXPECT_EQ(p.engine->prefill_only.load(), 0);
  EXPECT_EQ(d.engine->full.load(), 1);

  const auto long_prompt = Prompt(40, 2);
  EXPECT_EQ(f.decode->CachedPrefixTokens(long_prompt), 0);
  auto c2 = f.Serve(Request(long_prompt, 4));
  EXPECT_EQ(c2->tokens, Reference(long_prompt, 4));
  EXPECT_EQ(p.engine->prefill_only.load(), 1);
  // Approximate kv mode: the decode pool now believes worker 22 holds the 40-token prompt, so the
  // same prompt with a short new suffix has 5 uncached tokens: local.
  EXPECT_EQ(f.decode->CachedPrefixTokens(long_prompt), 40);
  auto longer = long_prompt;
  longer.insert(longer.end(), {7, 8, 9, 10, 11});
  auto c3 = f.Serve(Request(longer, 4));
  EXPECT_EQ(c3->tokens, Reference(longer, 4));
  EXPECT_EQ(p.engine->prefill_only.load(), 1);
  EXPECT_EQ(d.engine->full.load(), 2);
  const EngineMetrics m = f.router->Metrics();
  EXPECT_EQ(m.local_prefills, 2u);
  EXPECT_EQ(m.remote_prefills, 1u);
  EXPECT_GE(m.router_decisions, 4u);  // both pools' kv decisions summed: 3 decode + 1 prefill
}

TEST(DisaggRouter, NoPrefillWorkerServesAggregated) {
  Worker d;
  Frontend f(0);
  f.decode->AddInstance(22, d.address);
  const auto prompt = Prompt(30, 3);
  auto c = f.Serve(Request(prompt, 5));
  EXPECT_EQ(*c->finish, FinishReason::kLength) << c->error;
  EXPECT_EQ(c->tokens, Reference(prompt, 5));
  EXPECT_EQ(c->prompt_count_deltas, 1);
  EXPECT_EQ(c->cached_tokens, 1u);  // the decode worker computed the prompt
  EXPECT_EQ(d.engine->full.load(), 1);
  EXPECT_EQ(f.router->Metrics().local_prefills, 1u);
}

TEST(DisaggRouter, UnreachablePrefillWorkerFallsBackToAggregated) {
  Worker d;
  Frontend f(0);
  f.prefill->AddInstance(11, "127.0.0.1:1");  // nothing listens there
  f.decode->AddInstance(22, d.address);
  const auto prompt = Prompt(30, 5);
  auto c = f.Serve(Request(prompt, 5));
  EXPECT_EQ(*c->finish, FinishReason::kLength) << c->error;
  EXPECT_EQ(c->tokens, Reference(prompt, 5));
  EXPECT_EQ(c->prompt_count_deltas, 1);
  EXPECT_EQ(d.engine->full.load(), 1);
  EXPECT_EQ(d.engine->last_request().token_ids, prompt);
  const EngineMetrics m = f.router->Metrics();
  EXPECT_EQ(m.remote_prefills, 1u);
  EXPECT_EQ(m.disagg_fallbacks, 1u);
  EXPECT_GE(m.migrations, 1u);  // the prefill pool tried again first
}

TEST(DisaggRouter, KilledPrefillWorkerFallsBackToAggregated) {
  Worker d;
  Frontend f(0);
  {
    Worker p;
    f.prefill->AddInstance(11, p.address);
    f.decode->AddInstance(22, d.address);
    auto c = f.Serve(Request(Prompt(20, 1), 3));  // connects to the prefill worker
    EXPECT_EQ(p.engine->prefill_only.load(), 1);
  }  // the prefill worker dies; discovery has not noticed yet
  const auto prompt = Prompt(30, 6);
  auto c = f.Serve(Request(prompt, 6));
  EXPECT_EQ(*c->finish, FinishReason::kLength) << c->error;
  EXPECT_EQ(c->tokens, Reference(prompt, 6));
  EXPECT_EQ(f.router->Metrics().disagg_fallbacks, 1u);
}

TEST(DisaggRouter, FailedKvTransferContinuesAggregatedWithTheFirstToken) {
  Worker p, d;
  d.engine->fail_pulls = true;
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  const auto prompt = Prompt(25, 7);
  PreprocessedRequest r = Request(prompt, 8);
  r.stop.min_tokens = 4;
  auto c = f.Serve(r);
  EXPECT_EQ(*c->finish, FinishReason::kLength) << c->error;
  EXPECT_EQ(c->tokens, Reference(prompt, 8));
  EXPECT_EQ(c->prompt_count_deltas, 1);
  EXPECT_EQ(c->prompt_tokens, prompt.size());
  EXPECT_EQ(d.engine->decode_imported.load(), 1);
  EXPECT_EQ(d.engine->full.load(), 1);
  const PreprocessedRequest fb = d.engine->last_request();
  EXPECT_EQ(fb.phase, RequestPhase::kFull);
  EXPECT_TRUE(fb.kv_transfer.empty());
  auto expected_prompt = prompt;
  expected_prompt.push_back(Reference(prompt, 1)[0]);
  EXPECT_EQ(fb.token_ids, expected_prompt);
  EXPECT_EQ(fb.stop.max_tokens, 7);
  EXPECT_EQ(fb.stop.min_tokens, 3);
  {
    // The abandoned descriptor's lease is released by the frontend too (harmless if the decode
    // worker did it).
    std::lock_guard lock(f.released_mu);
    ASSERT_EQ(f.released.size(), 1u);
    EXPECT_FALSE(f.released[0].empty());
  }
  const EngineMetrics m = f.router->Metrics();
  EXPECT_EQ(m.remote_prefills, 1u);
  EXPECT_EQ(m.disagg_fallbacks, 1u);
  EXPECT_EQ(m.generated_tokens, 8u);
}

TEST(DisaggRouter, OtherDecodeErrorsReachTheClient) {
  Worker p, d;
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  d.engine->reject_descriptors = true;  // an error that is not Unavailable: no fallback
  auto c = f.Serve(Request(Prompt(20, 8), 5));
  EXPECT_EQ(*c->finish, FinishReason::kError);
  EXPECT_NE(c->error.find("descriptor does not match"), std::string::npos) << c->error;
  EXPECT_EQ(c->tokens.size(), 1u);  // the first token had reached the client
  EXPECT_EQ(f.router->Metrics().disagg_fallbacks, 0u);
}

TEST(DisaggRouter, ClientCancelStopsTheDecodeCall) {
  Worker p, d(/*delay_ms=*/5);
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  Collector c;
  auto ctx = std::make_shared<RequestContext>("cancel-me");
  f.router->Generate(Request(Prompt(20, 9), 1000), ctx, c.Sink());
  ASSERT_TRUE(Eventually([&] { return c.count() >= 4; }));
  ctx->Cancel();
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kCancelled);
  EXPECT_TRUE(Eventually([&] { return d.server->active_calls() == 0; }));
  EXPECT_LT(d.engine->generated.load(), 500u);
  EXPECT_EQ(f.router->Metrics().running, 0);
}

TEST(DisaggRouter, CancelledRequestStartsNoSubRequest) {
  Worker p, d;
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(22, d.address);
  Collector c;
  auto ctx = std::make_shared<RequestContext>("cancel-early");
  ctx->Cancel();  // before anything runs: no sub-request may start
  f.router->Generate(Request(Prompt(20, 10), 10), ctx, c.Sink());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kCancelled);
  EXPECT_EQ(p.engine->prefill_only.load(), 0);
  EXPECT_EQ(d.engine->decode_imported.load() + d.engine->full.load(), 0);
}

TEST(DisaggRouter, DecodeWorkerDyingMidStreamMigratesAsFull) {
  Worker p;
  auto d1 = std::make_unique<Worker>(5);
  Worker d2(5);
  Frontend f(0);
  f.prefill->AddInstance(11, p.address);
  f.decode->AddInstance(21, d1->address);  // round-robin: the first decode call goes here
  f.decode->AddInstance(22, d2.address);
  const auto prompt = Prompt(30, 11);
  Collector c;
  f.router->Generate(Request(prompt, 40), std::make_shared<RequestContext>("migrate"), c.Sink());
  ASSERT_TRUE(Eventually([&] { return c.count() >= 8; }));
  ASSERT_EQ(d1->engine->decode_imported.load(), 1);
  d1->server->Stop();  // the decode worker dies mid-stream
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(*c.finish, FinishReason::kLength) << c.error;
  EXPECT_EQ(c.tokens, Reference(prompt, 40));  // nothing lost, nothing repeated
  EXPECT_EQ(c.prompt_count_deltas, 1);
  EXPECT_EQ(c.last_worker, 22u);
  // The retry prefilled prompt + first token + what the dead worker had sent; no descriptor.
  EXPECT_EQ(d2.engine->decode_imported.load(), 0);
  EXPECT_EQ(d2.engine->full.load(), 1);
  const PreprocessedRequest retry = d2.engine->last_request();
  EXPECT_TRUE(retry.kv_transfer.empty());
  const size_t carried = retry.token_ids.size() - prompt.size();
  EXPECT_GE(carried, 8u);
  EXPECT_EQ(retry.stop.max_tokens, 40 - static_cast<int>(carried));
  EXPECT_EQ(f.router->Metrics().migrations, 1u);
  EXPECT_EQ(f.router->Metrics().disagg_fallbacks, 0u);
  d1.reset();
}

}  // namespace
}  // namespace dyn
