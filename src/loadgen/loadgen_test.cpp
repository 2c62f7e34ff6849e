#include <cmath>

#include <gtest/gtest.h>

#include "loadgen/client.h"
#include "loadgen/sse.h"
#include "loadgen/stats.h"
#include "loadgen/workload.h"

namespace dyn::loadgen {
namespace {

const char kStream[] =
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
    ": keep-alive comment\n\n"
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n"
    "event: message\ndata: {\"choices\":[{\"index\":0,\"text\":\"lo\",\"finish_reason\":\"length\"}]}\r\r"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n"
    "data: [DONE]\n\n";

TEST(SseParser, WholeBody) {
  SseParser p;
  std::vector<std::string> events;
  p.Feed(kStream, &events);
  ASSERT_EQ(events.size(), 5u);
  EXPECT_EQ(events[4], "[DONE]");
  EXPECT_EQ(ParseOpenAiChunk(events[0]).text_choices, 0);
  EXPECT_EQ(ParseOpenAiChunk(events[1]).text_choices, 1);
  EXPECT_EQ(ParseOpenAiChunk(events[1]).text_bytes, 3u);
  EXPECT_TRUE(ParseOpenAiChunk(events[2]).finished);
  EXPECT_EQ(ParseOpenAiChunk(events[3]).completion_tokens, 2);
  EXPECT_EQ(ParseOpenAiChunk(events[3]).prompt_tokens, 7);
  EXPECT_FALSE(ParseOpenAiChunk(events[3]).cached_tokens.has_value());
  const OpenAiChunk with_cache = ParseOpenAiChunk(
      R"({"choices":[],"usage":{"prompt_tokens":70,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":64}}})");
  EXPECT_EQ(with_cache.cached_tokens, 64);
  EXPECT_TRUE(ParseOpenAiChunk(events[4]).done);
}

// Every split into two pieces, and one byte at a time, gives the same events.
TEST(SseParser, SplitAtAnyByte) {
  const std::string body = kStream;
  std::vector<std::string> expected;
  SseParser whole;
  whole.Feed(body, &expected);
  for (size_t cut = 0; cut <= body.size(); ++cut) {
    SseParser p;
    std::vector<std::string> events;
    p.Feed(std::string_view(body).substr(0, cut), &events);
    p.Feed(std::string_view(body).substr(cut), &events);
    EXPECT_EQ(events, expected) << "cut at " << cut;
  }
  SseParser p;
  std::vector<std::string> events;
  for (char c : body) p.Feed(std::string_view(&c, 1), &events);
  EXPECT_EQ(events, expected);
}

TEST(SseParser, MultiLineDataAndNoSpace) {
  SseParser p;
  std::vector<std::string> events;
  p.Feed("data:a\ndata: b\nid: 3\n\ndata\n\n\n", &events);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0], "a\nb");
  EXPECT_EQ(events[1], "");
}

TEST(OpenAiChunk, ErrorsAndMalformed) {
  EXPECT_EQ(ParseOpenAiChunk("{\"error\":{\"message\":\"boom\",\"type\":\"x\"}}").error, "boom");
  EXPECT_TRUE(ParseOpenAiChunk("{not json").malformed);
  EXPECT_TRUE(ParseOpenAiChunk("[1]").malformed);
  const OpenAiChunk r = ParseOpenAiResponse(
      "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}],"
      "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}");
  EXPECT_EQ(r.text_choices, 1);
  EXPECT_EQ(r.completion_tokens, 1);
}

TEST(Stats, PercentilesLikeNumpy) {
  std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 3.7);
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 4);
  const Distribution d = Summarize({5, 1, 3});
  EXPECT_EQ(d.count, 3u);
  EXPECT_DOUBLE_EQ(d.p50, 3);
  EXPECT_DOUBLE_EQ(d.mean, 3);
  EXPECT_DOUBLE_EQ(d.min, 1);
  EXPECT_DOUBLE_EQ(d.max, 5);
}

RequestRecord Record(double start, double ttft, double e2e, int out, bool warmup = false) {
  RequestRecord r;
  r.start_ms = start;
  r.ttft_ms = ttft;
  r.e2e_ms = e2e;
  r.output_tokens = out;
  r.input_tokens = 10;
  r.warmup = warmup;
  for (int i = 0; i < out; ++i) r.chunk_ms.push_back(ttft + (out > 1 ? (e2e - ttft) * i / (out - 1) : 0));
  return r;
}

TEST(Stats, RunSummaryWindowGoodputWarmup) {
  std::vector<RequestRecord> records = {
      Record(-5000, 10, 100, 11, /*warmup=*/true),  // ignored entirely
      Record(0, 100, 1100, 11),                     // ITL 100 ms
      Record(1000, 500, 1500, 11),                  // TTFT 500, ITL 100
      Record(500, 50, 550, 11),                     // ITL 50
  };
  RequestRecord failed = Record(200, -1, -1, 0);
  failed.error_kind = "http_5xx";
  records.push_back(failed);
  const RunSummary s = SummarizeRun(records, GoodputTargets{200, 80});
  EXPECT_EQ(s.requests, 4u);
  EXPECT_EQ(s.completed, 3u);
  EXPECT_EQ(s.errors, 1u);
  EXPECT_EQ(s.errors_by_kind.at("http_5xx"), 1u);
  EXPECT_DOUBLE_EQ(s.window_s, 2.5);  // 0 .. 2500 ms
  EXPECT_DOUBLE_EQ(s.request_throughput, 3 / 2.5);
  EXPECT_DOUBLE_EQ(s.output_token_throughput, 33 / 2.5);
  EXPECT_EQ(s.good_requests, 1u);  // only the third meets TTFT <= 200 and ITL <= 80
  EXPECT_DOUBLE_EQ(s.ttft_ms.p50, 100);
  EXPECT_DOUBLE_EQ(s.itl_ms.p50, 100);
  EXPECT_EQ(s.gap_ms.count, 30u);
}

TEST(Workload, SyntheticIsDeterministicAndSharesPrefixes) {
  SyntheticOptions o;
  o.num_requests = 50;
  o.input = {200, 30};
  o.output = {64, 10};
  o.prefix_groups = 4;
  o.prefix_tokens = 100;
  o.seed = 42;
  const auto a = SyntheticWorkload(o);
  const auto b = SyntheticWorkload(o);
  ASSERT_EQ(a.size(), 50u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt_ids, b[i].prompt_ids);
    EXPECT_EQ(a[i].max_tokens, b[i].max_tokens);
    EXPECT_EQ(static_cast<int>(a[i].prompt_ids.size()), a[i].input_tokens);
    for (uint32_t t : a[i].prompt_ids) {
      EXPECT_GE(t, o.vocab.first_token);
      EXPECT_LT(t, o.vocab.vocab_size);
    }
  }
  auto prefix = [](const RequestSpec& s) { return std::vector<uint32_t>(s.prompt_ids.begin(), s.prompt_ids.begin() + 100); };
  EXPECT_EQ(prefix(a[0]), prefix(a[4]));
  EXPECT_NE(prefix(a[0]), prefix(a[1]));
  // Past the prefix, prompts differ.
  EXPECT_NE(std::vector<uint32_t>(a[0].prompt_ids.begin() + 100, a[0].prompt_ids.begin() + 110),
            std::vector<uint32_t>(a[4].prompt_ids.begin() + 100, a[4].prompt_ids.begin() + 110));
  o.seed = 43;
  EXPECT_NE(SyntheticWorkload(o)[0].prompt_ids, a[0].prompt_ids);
}

TEST(Workload, LengthDistribution) {
  Rng rng(7);
  LengthDistribution d{100, 20, 1, 1000};
  double sum = 0, sq = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double v = d.Sample(rng);
    sum += v;
    sq += v * v;
  }
  const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 100, 1);
  EXPECT_NEAR(sd, 20, 1);
  EXPECT_EQ((LengthDistribution{64, 0}.Sample(rng)), 64);
  EXPECT_EQ((LengthDistribution{5, 100, 1, 10}.Sample(rng) >= 1), true);
}

TEST(Workload, PoissonArrivalsMeanRate) {
  std::vector<RequestSpec> specs(20000);
  AssignArrivals(specs, 50.0, Arrival::kPoisson, 1);
  EXPECT_EQ(specs[0].arrival_ms, 0);
  const double rate = (specs.size() - 1) / (specs.back().arrival_ms / 1000.0);
  EXPECT_NEAR(rate, 50.0, 1.5);
  // Exponential gaps: the coefficient of variation is 1.
  double sum = 0, sq = 0;
  for (size_t i = 1; i < specs.size(); ++i) {
    const double g = specs[i].arrival_ms - specs[i - 1].arrival_ms;
    sum += g;
    sq += g * g;
  }
  const double n = specs.size() - 1, mean = sum / n;
  EXPECT_NEAR(std::sqrt(sq / n - mean * mean) / mean, 1.0, 0.05);
  std::vector<RequestSpec> constant(5);
  AssignArrivals(constant, 4.0, Arrival::kConstant, 1);
  EXPECT_DOUBLE_EQ(constant[4].arrival_ms, 1000);
}

TEST(Workload, ShareGpt) {
  auto prompts = ParseShareGpt(R"([{"id":"a","conversations":[{"from":"gpt","value":"x"},{"from":"human","value":"Q1"}]},
                                   {"id":"b","conversations":[{"from":"human","value":"Q2"},{"from":"human","value":"no"}]},
                                   {"id":"c","conversations":[]}])");
  ASSERT_TRUE(prompts.ok());
  EXPECT_EQ(*prompts, (std::vector<std::string>{"Q1", "Q2"}));
  EXPECT_FALSE(ParseShareGpt("{}").ok());
  const auto w = ShareGptWorkload(*prompts, 5, LengthDistribution{32, 0}, 3);
  ASSERT_EQ(w.size(), 5u);
  EXPECT_EQ(w[0].prompt_text, w[2].prompt_text);  // cycles through the shuffled prompts
  EXPECT_EQ(w[0].max_tokens, 32);
  EXPECT_EQ(ShareGptWorkload(*prompts, 5, LengthDistribution{32, 0}, 3)[1].prompt_text, w[1].prompt_text);
}

TEST(Client, RequestBody) {
  ClientOptions o;
  o.model = "m";
  RequestSpec s;
  s.prompt_ids = {5, 6};
  s.max_tokens = 9;
  EXPECT_EQ(RequestBody(o, s),
            R"({"model":"m","prompt":[5,6],"max_tokens":9,"ignore_eos":true,"min_tokens":9,"stream":true,)"
            R"("stream_options":{"include_usage":true}})");
  o.endpoint = Endpoint::kChat;
  o.stream = false;
  s.prompt_text = "hi";
  EXPECT_EQ(RequestBody(o, s),
            R"({"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9,"ignore_eos":true,)"
            R"("min_tokens":9,"stream":false})");
  // Extra fields are added; the client's own win.
  o.extra_body = R"({"temperature":0.8,"top_p":0.9,"max_tokens":1,"stream":true})";
  EXPECT_EQ(RequestBody(o, s),
            R"({"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9,"ignore_eos":true,)"
            R"("min_tokens":9,"stream":false,"temperature":8E-1,"top_p":9E-1})");
  o.extra_body = "[1]";
  EXPECT_FALSE(LoadClient::Create(o).ok());
  o.extra_body = "{not json";
  EXPECT_FALSE(LoadClient::Create(o).ok());
}

TEST(Client, DeadServerIsRecordedAsConnectErrors) {
  ClientOptions o;
  o.url = "http://127.0.0.1:1";  // nothing listens on port 1
  o.model = "m";
  auto client = LoadClient::Create(o);
  ASSERT_TRUE(client.ok());
  std::vector<RequestSpec> specs(3);
  for (auto& s : specs) s.prompt_ids = {1}, s.max_tokens = 1;
  auto records = (*client)->Run(specs, RunOptions{});
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 3u);
  for (const auto& r : *records) EXPECT_EQ(r.error_kind, "connect");
  ClientOptions https;
  https.url = "https://x";
  EXPECT_FALSE(LoadClient::Create(https).ok());
}

}  // namespace
}  // namespace dyn::loadgen
