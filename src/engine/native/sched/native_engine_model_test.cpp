// NativeEngine over the real stories260K model (CPU backend): greedy goldens and batching
// invariance. Built only when dyn_model exists.
#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <condition_variable>
#include <filesystem>
#include <mutex>

#include "base/file.h"
#include "engine/native/sched/native_engine.h"

namespace dyn {
namespace {

constexpr const char* kModelDir = "../shared/models/stories260K/hf";
constexpr const char* kReference = "../shared/models/stories260K/reference.json";

struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::optional<FinishReason> finish;
  std::string error;
  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard lock(mu);
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finish_reason) {
        finish = o.finish_reason;
        error = o.error;
        cv.notify_all();
      }
    };
  }
  bool Wait() {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(60), [&] { return finish.has_value(); });
  }
};

PreprocessedRequest Greedy(std::vector<uint32_t> prompt, int max_tokens) {
  PreprocessedRequest r;
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0;
  r.stop.max_tokens = max_tokens;
  r.stop.ignore_eos = true;
  return r;
}

EnginePtr MakeEngine(int max_num_seqs = 16, int num_kv_blocks = 0) {
  ModelLoadOptions lo;
  lo.num_threads = 2;
  auto model = LoadModel(kModelDir, lo);
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  if (!model.ok()) return nullptr;
  NativeEngineOptions o;
  o.max_num_seqs = max_num_seqs;
  o.num_kv_blocks = num_kv_blocks;
  o.kv_cache_bytes = 64u << 20;
  auto e = CreateNativeEngine(std::move(*model), o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? *e : nullptr;
}

std::vector<uint32_t> RunToEnd(Engine& e, PreprocessedRequest r) {
  Stream s;
  e.Generate(std::move(r), std::make_shared<RequestContext>("r"), s.Sink());
  EXPECT_TRUE(s.Wait());
  EXPECT_NE(s.finish, FinishReason::kError) << s.error;
  return s.tokens;
}

std::vector<uint32_t> Ids(const boost::json::value& v) {
  std::vector<uint32_t> out;
  for (auto& x : v.as_array()) out.push_back(static_cast<uint32_t>(x.to_number<int64_t>()));
  return out;
}

TEST(NativeEngineModelTest, GreedyFromBosMatchesReference) {
  if (!std::filesystem::exists(kModelDir)) GTEST_SKIP() << "no " << kModelDir;
  auto text = ReadFile(kReference);
  ASSERT_TRUE(text.ok());
  boost::system::error_code ec;
  auto ref = boost::json::parse(*text, ec);
  ASSERT_FALSE(ec);
  auto& cases = ref.at("cases").as_array();
  auto engine = MakeEngine();
  ASSERT_TRUE(engine);
  EXPECT_EQ(RunToEnd(*engine, Greedy(Ids(cases[0].at("prompt_ids_with_bos")), 40)), Ids(cases[0].at("greedy_ids_40")));
  auto cont = Ids(cases[1].at("continuation_ids"));
  EXPECT_EQ(RunToEnd(*engine, Greedy(Ids(cases[1].at("prompt_ids_with_bos")), static_cast<int>(cont.size()))), cont);
  // Again, now with the prompt's blocks possibly cached: same output.
  EXPECT_EQ(RunToEnd(*engine, Greedy(Ids(cases[0].at("prompt_ids_with_bos")), 40)), Ids(cases[0].at("greedy_ids_40")));
}

std::vector<PreprocessedRequest> DifferentPrompts(int n) {
  std::vector<PreprocessedRequest> reqs;
  for (int i = 0; i < n; ++i) {
    std::vector<uint32_t> p = {1};
    for (int j = 0; j < 3 + 7 * i % 41; ++j) p.push_back(static_cast<uint32_t>(3 + (i * 131 + j * 17) % 500));
    reqs.push_back(Greedy(p, 24 + i % 9));
  }
  return reqs;
}

TEST(NativeEngineModelTest, ConcurrentRequestsMatchTheirSoloOutputs) {
  if (!std::filesystem::exists(kModelDir)) GTEST_SKIP() << "no " << kModelDir;
  auto reqs = DifferentPrompts(16);
  std::vector<std::vector<uint32_t>> solo;
  {
    auto engine = MakeEngine();
    ASSERT_TRUE(engine);
    for (auto& r : reqs) solo.push_back(RunToEnd(*engine, r));
  }
  auto engine = MakeEngine();
  ASSERT_TRUE(engine);
  std::vector<Stream> streams(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    engine->Generate(reqs[i], std::make_shared<RequestContext>("r"), streams[i].Sink());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(streams[i].Wait());
    EXPECT_EQ(streams[i].tokens, solo[i]) << "request " << i;
  }
}

TEST(NativeEngineModelTest, PreemptionUnderATinyPoolKeepsGreedyOutputs) {
  if (!std::filesystem::exists(kModelDir)) GTEST_SKIP() << "no " << kModelDir;
  auto reqs = DifferentPrompts(8);
  std::vector<std::vector<uint32_t>> solo;
  {
    auto engine = MakeEngine();
    ASSERT_TRUE(engine);
    for (auto& r : reqs) solo.push_back(RunToEnd(*engine, r));
  }
  auto engine = MakeEngine(8, /*num_kv_blocks=*/12);  // 192 tokens of KV for ~8 x 60
  ASSERT_TRUE(engine);
  std::vector<Stream> streams(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    engine->Generate(reqs[i], std::make_shared<RequestContext>("r"), streams[i].Sink());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(streams[i].Wait());
    EXPECT_EQ(streams[i].tokens, solo[i]) << "request " << i;
  }
  EXPECT_GT(engine->Metrics().preemptions, 0u);
}

}  // namespace
}  // namespace dyn
