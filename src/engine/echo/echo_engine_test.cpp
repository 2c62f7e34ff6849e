#include "engine/echo/echo_engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <mutex>
#include <thread>

namespace dyn {
namespace {

struct Collected {
  std::vector<uint32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  std::optional<FinishReason> finish;
  uint32_t prompt_tokens = 0;
  int deltas = 0;
};

// Runs one request to completion and returns what the sink saw.
Collected RunToEnd(Engine& engine, PreprocessedRequest req, std::shared_ptr<RequestContext> ctx = nullptr) {
  if (!ctx) ctx = std::make_shared<RequestContext>(req.request_id);
  auto done = std::make_shared<std::promise<Collected>>();
  auto acc = std::make_shared<Collected>();
  engine.Generate(std::move(req), ctx, [done, acc](EngineOutput&& out) {
    ++acc->deltas;
    if (out.prompt_tokens) acc->prompt_tokens = out.prompt_tokens;
    acc->tokens.insert(acc->tokens.end(), out.token_ids.begin(), out.token_ids.end());
    acc->logprobs.insert(acc->logprobs.end(), out.logprobs.begin(), out.logprobs.end());
    if (out.finish_reason) {
      acc->finish = out.finish_reason;
      done->set_value(*acc);
    }
  });
  auto fut = done->get_future();
  EXPECT_EQ(fut.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  return fut.get();
}

PreprocessedRequest MakeRequest(std::vector<uint32_t> prompt, int max_tokens) {
  PreprocessedRequest r;
  r.request_id.push_back('r');
  r.token_ids = std::move(prompt);
  r.stop.max_tokens = max_tokens;
  return r;
}

TEST(EchoEngine, EchoesPromptUpToMaxTokensAndCycles) {
  auto engine = CreateEchoEngine({});
  auto c = RunToEnd(*engine, MakeRequest({5, 6, 7}, 7));
  EXPECT_EQ(c.tokens, (std::vector<uint32_t>{5, 6, 7, 5, 6, 7, 5}));
  EXPECT_EQ(c.finish, FinishReason::kLength);
  EXPECT_EQ(c.prompt_tokens, 3u);
  EXPECT_EQ(c.deltas, 7);  // one token per delta
  auto short_one = RunToEnd(*engine, MakeRequest({5, 6, 7}, 2));
  EXPECT_EQ(short_one.tokens, (std::vector<uint32_t>{5, 6}));
}

TEST(EchoEngine, StopsOnStopTokenAndEosHonouringMinTokensAndIgnoreEos) {
  auto engine = CreateEchoEngine({});
  auto req = MakeRequest({5, 6, 7}, 10);
  req.stop.stop_token_ids = {6};
  auto c = RunToEnd(*engine, req);
  EXPECT_EQ(c.tokens, (std::vector<uint32_t>{5, 6}));
  EXPECT_EQ(c.finish, FinishReason::kStop);

  req.stop.min_tokens = 3;
  c = RunToEnd(*engine, req);
  EXPECT_EQ(c.tokens, (std::vector<uint32_t>{5, 6, 7, 5, 6}));

  auto eos = MakeRequest({5, 2, 7}, 10);
  eos.eos_token_ids = {2};
  EXPECT_EQ(RunToEnd(*engine, eos).tokens.size(), 2u);
  eos.stop.ignore_eos = true;
  auto ignored = RunToEnd(*engine, eos);
  EXPECT_EQ(ignored.tokens.size(), 10u);
  EXPECT_EQ(ignored.finish, FinishReason::kLength);
}

TEST(EchoEngine, LogprobsAndErrors) {
  auto engine = CreateEchoEngine({});
  auto req = MakeRequest({5, 6, 7}, 2);
  req.sampling.logprobs = true;
  req.sampling.top_logprobs = 2;
  auto c = RunToEnd(*engine, req);
  ASSERT_EQ(c.logprobs.size(), 2u);
  EXPECT_EQ(c.logprobs[1].token, 6u);
  ASSERT_EQ(c.logprobs[1].top.size(), 2u);
  EXPECT_EQ(c.logprobs[1].top[0].token, 6u);
  EXPECT_EQ(c.logprobs[1].top[1].token, 7u);

  auto bad = RunToEnd(*engine, MakeRequest({}, 2));
  EXPECT_EQ(bad.finish, FinishReason::kError);
}

TEST(EchoEngine, CancelEndsStreamAndManyRequestsInterleave) {
  auto engine = CreateEchoEngine({.token_delay_ms = 2});
  auto ctx = std::make_shared<RequestContext>("c");
  std::thread canceller([ctx] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ctx->Cancel();
  });
  auto c = RunToEnd(*engine, MakeRequest({1, 2, 3}, 1'000'000), ctx);
  canceller.join();
  EXPECT_EQ(c.finish, FinishReason::kCancelled);
  EXPECT_LT(c.tokens.size(), 1000u);

  std::vector<std::future<Collected>> futures;
  for (int i = 0; i < 20; ++i) {
    futures.push_back(std::async(std::launch::async, [&engine, i] {
      return RunToEnd(*engine, MakeRequest({static_cast<uint32_t>(i) + 3}, 5));
    }));
  }
  for (int i = 0; i < 20; ++i) {
    auto r = futures[i].get();
    EXPECT_EQ(r.tokens, std::vector<uint32_t>(5, static_cast<uint32_t>(i) + 3));
  }
  // A stream's last output reaches its sink before the step loop recounts the running streams
  // (CI once read 2 here): wait for the count to settle, then require zero.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (engine->Metrics().running != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(engine->Metrics().running, 0);
}

TEST(EchoEngine, ShutdownCancelsRunningStreams) {
  auto engine = CreateEchoEngine({.token_delay_ms = 5});
  std::promise<FinishReason> finished;
  engine->Generate(MakeRequest({1, 2}, 1'000'000), std::make_shared<RequestContext>("s"),
                   [&finished](EngineOutput&& out) {
                     if (out.finish_reason) finished.set_value(*out.finish_reason);
                   });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  engine->Shutdown();
  EXPECT_EQ(finished.get_future().get(), FinishReason::kCancelled);
  engine->Shutdown();  // idempotent
}

}  // namespace
}  // namespace dyn
