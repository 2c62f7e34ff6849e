// End-to-end tests of the HTTP frontend over real sockets, with the echo engine and the real
// stories260K tokenizer: responses, streaming, stop strings, n, usage, logprobs, keep-alive.
#include <map>
#include <random>
#include <set>

#include "frontend/frontend_test_fixture.h"

namespace dyn::test {
namespace {
namespace json = boost::json;

std::string Str(const json::value& v) { return std::string(v.as_string()); }

TEST_F(FrontendTest, HealthLiveModels) {
  EXPECT_EQ(client_->Get("/health").status, 200);
  EXPECT_EQ(client_->Get("/live").status, 200);
  auto models = client_->Get("/v1/models");
  ASSERT_EQ(models.status, 200);
  auto data = models.Json().at("data").as_array();
  ASSERT_EQ(data.size(), 4u);
  EXPECT_EQ(Str(data[0].at("id")), "failing");  // sorted by name
  EXPECT_EQ(Str(data[3].at("id")), "stories");
  EXPECT_EQ(data[3].at("max_model_len").to_number<int64_t>(), kContext);
  EXPECT_EQ(client_->Get("/v1/models/slow").status, 200);
  EXPECT_EQ(client_->Get("/v1/models/nope").status, 404);
}

TEST_F(FrontendTest, CompletionNonStreamingEchoesPromptTokens) {
  const std::string prompt = "Once upon a time";
  auto ids = tokenizer_->Encode(prompt, true);
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"Once upon a time","max_tokens":7})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_FALSE(r.headers["x-request-id"].empty());
  auto body = r.Json();
  EXPECT_EQ(Str(body.at("object")), "text_completion");
  EXPECT_EQ(Str(body.at("model")), "stories");
  EXPECT_EQ(Str(body.at("id")).rfind("cmpl-", 0), 0u);
  auto choice = body.at("choices").at(0);
  EXPECT_EQ(Str(choice.at("text")), EchoText(ids, 7));
  EXPECT_EQ(Str(choice.at("finish_reason")), "length");
  EXPECT_EQ(body.at("usage").at("prompt_tokens").to_number<int64_t>(), static_cast<int64_t>(ids.size()));
  EXPECT_EQ(body.at("usage").at("completion_tokens").to_number<int64_t>(), 7);
  EXPECT_EQ(body.at("usage").at("total_tokens").to_number<int64_t>(), static_cast<int64_t>(ids.size()) + 7);
  EXPECT_EQ(body.at("usage").at("prompt_tokens_details").at("cached_tokens").to_number<int64_t>(), 0);
  // The engine got the tokenized prompt and the limits.
  auto reqs = echo_->requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0].token_ids, ids);
  EXPECT_EQ(reqs[0].stop.max_tokens, 7);
  EXPECT_EQ(reqs[0].eos_token_ids, std::vector<uint32_t>{2});
}

TEST_F(FrontendTest, ResponseIdsAndRequestIdsAreUnique) {
  std::set<std::string> ids, request_ids;
  for (int i = 0; i < 5; ++i) {
    auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":1})");
    ids.insert(Str(r.Json().at("id")));
    request_ids.insert(r.headers["x-request-id"]);
  }
  EXPECT_EQ(ids.size(), 5u);
  EXPECT_EQ(request_ids.size(), 5u);
  auto r = client_->Request("POST", "/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":1})",
                            {{"x-request-id", "my-id-42"}});
  EXPECT_EQ(r.headers["x-request-id"], "my-id-42");
}

TEST_F(FrontendTest, CompletionStreamingMatchesNonStreaming) {
  auto ids = tokenizer_->Encode("The little dog ran", true);
  auto r = client_->Post("/v1/completions",
                         R"({"model":"stories","prompt":"The little dog ran","max_tokens":12,"stream":true,)"
                         R"("stream_options":{"include_usage":true}})");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "text/event-stream");
  bool done = false;
  auto events = ParseSse(r.body, &done);
  EXPECT_TRUE(done);
  ASSERT_GE(events.size(), 2u);
  std::string text;
  std::string finish;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const auto& choice = events[i].at("choices").at(0);
    text += Str(choice.at("text"));
    if (!choice.at("finish_reason").is_null()) finish = Str(choice.at("finish_reason"));
    EXPECT_EQ(events[i].at("id"), events[0].at("id"));
  }
  EXPECT_EQ(text, EchoText(ids, 12));
  EXPECT_EQ(finish, "length");
  const auto& usage_chunk = events.back();
  EXPECT_TRUE(usage_chunk.at("choices").as_array().empty());
  EXPECT_EQ(usage_chunk.at("usage").at("completion_tokens").to_number<int64_t>(), 12);
  EXPECT_EQ(usage_chunk.at("usage").at("prompt_tokens").to_number<int64_t>(), static_cast<int64_t>(ids.size()));
}

TEST_F(FrontendTest, ChatNonStreamingAndStreaming) {
  const std::string body_prefix = R"({"model":"stories","messages":[{"role":"user","content":"Lily saw a cat"}],"max_tokens":9)";
  auto rendered = template_->Render(ChatTemplateVariables(
      json::parse(R"([{"role":"user","content":"Lily saw a cat"}])").as_array(), nullptr, true, "<s>", "</s>", nullptr));
  ASSERT_TRUE(rendered.ok());
  auto ids = tokenizer_->Encode(*rendered, false);
  const std::string expected = EchoText(ids, 9);

  auto r = client_->Post("/v1/chat/completions", body_prefix + "}");
  ASSERT_EQ(r.status, 200) << r.body;
  auto body = r.Json();
  EXPECT_EQ(Str(body.at("object")), "chat.completion");
  EXPECT_EQ(Str(body.at("id")).rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(Str(body.at("choices").at(0).at("message").at("role")), "assistant");
  EXPECT_EQ(Str(body.at("choices").at(0).at("message").at("content")), expected);
  EXPECT_EQ(body.at("usage").at("prompt_tokens").to_number<int64_t>(), static_cast<int64_t>(ids.size()));
  EXPECT_EQ(echo_->requests().back().token_ids, ids);

  auto s = client_->Post("/v1/chat/completions", body_prefix + R"(,"stream":true})");
  ASSERT_EQ(s.status, 200);
  bool done = false;
  auto events = ParseSse(s.body, &done);
  ASSERT_TRUE(done);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(Str(events[0].at("object")), "chat.completion.chunk");
  EXPECT_EQ(Str(events[0].at("choices").at(0).at("delta").at("role")), "assistant");
  std::string text;
  for (const auto& e : events) {
    const auto& delta = e.at("choices").at(0).at("delta").as_object();
    if (auto* c = delta.if_contains("content")) text += Str(*c);
  }
  EXPECT_EQ(text, expected);
  EXPECT_EQ(Str(events.back().at("choices").at(0).at("finish_reason")), "length");
}

TEST_F(FrontendTest, ChatTemplateKwargsAndGenerationPrompt) {
  auto plain = client_->Post("/tokenize", R"({"model":"stories","messages":[{"role":"user","content":"hi"}]})");
  auto thinking = client_->Post("/tokenize", R"({"model":"stories","messages":[{"role":"user","content":"hi"}],)"
                                             R"("chat_template_kwargs":{"enable_thinking":true}})");
  auto no_gen = client_->Post("/tokenize", R"({"model":"stories","messages":[{"role":"user","content":"hi"}],)"
                                           R"("add_generation_prompt":false})");
  ASSERT_EQ(plain.status, 200) << plain.body;
  auto count = [](const HttpResponse& r) { return r.Json().at("count").to_number<int64_t>(); };
  EXPECT_EQ(count(plain), static_cast<int64_t>(tokenizer_->Encode("<s>user: hi\nassistant:", false).size()));
  EXPECT_EQ(count(thinking), static_cast<int64_t>(tokenizer_->Encode("<s>user: hi\nthink: assistant:", false).size()));
  EXPECT_EQ(count(no_gen), static_cast<int64_t>(tokenizer_->Encode("<s>user: hi\n", false).size()));
  // Content given as text parts is joined.
  auto parts = client_->Post("/tokenize", R"({"model":"stories","messages":[{"role":"user","content":[)"
                                          R"({"type":"text","text":"hi"}]}]})");
  EXPECT_EQ(parts.Json().at("tokens"), plain.Json().at("tokens"));
}

TEST_F(FrontendTest, TokenizeAndDetokenize) {
  auto r = client_->Post("/tokenize", R"({"model":"stories","prompt":"Once upon a time"})");
  ASSERT_EQ(r.status, 200) << r.body;
  auto ids = tokenizer_->Encode("Once upon a time", true);
  auto body = r.Json();
  EXPECT_EQ(body.at("count").to_number<int64_t>(), static_cast<int64_t>(ids.size()));
  EXPECT_EQ(body.at("max_model_len").to_number<int64_t>(), kContext);
  ASSERT_EQ(body.at("tokens").as_array().size(), ids.size());
  EXPECT_EQ(body.at("tokens").at(1).to_number<int64_t>(), ids[1]);
  auto no_special = client_->Post("/tokenize", R"({"model":"stories","prompt":"Once upon a time","add_special_tokens":false})");
  EXPECT_EQ(no_special.Json().at("count").to_number<int64_t>(), static_cast<int64_t>(ids.size()) - 1);

  auto d = client_->Post("/detokenize", R"({"model":"stories","tokens":)" + json::serialize(body.at("tokens")) + "}");
  ASSERT_EQ(d.status, 200) << d.body;
  EXPECT_EQ(Str(d.Json().at("prompt")), tokenizer_->Decode(ids, false));
}

TEST_F(FrontendTest, NChoicesAndSeeds) {
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a cat","max_tokens":4,"n":3,"seed":7})");
  ASSERT_EQ(r.status, 200) << r.body;
  auto choices = r.Json().at("choices").as_array();
  ASSERT_EQ(choices.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(choices[i].at("index").to_number<int64_t>(), static_cast<int64_t>(i));
    EXPECT_EQ(choices[i].at("text"), choices[0].at("text"));
  }
  EXPECT_EQ(r.Json().at("usage").at("completion_tokens").to_number<int64_t>(), 12);
  auto reqs = echo_->requests();
  ASSERT_EQ(reqs.size(), 3u);
  std::set<uint64_t> seeds;
  for (const auto& q : reqs) seeds.insert(q.sampling.seed.value_or(0));
  EXPECT_EQ(seeds, (std::set<uint64_t>{7, 8, 9}));
}

TEST_F(FrontendTest, ListOfPromptsAndTokenIdPrompts) {
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":["a cat","the dog"],"max_tokens":3,"n":2})");
  ASSERT_EQ(r.status, 200) << r.body;
  auto choices = r.Json().at("choices").as_array();
  ASSERT_EQ(choices.size(), 4u);
  EXPECT_EQ(Str(choices[1].at("text")), EchoText(tokenizer_->Encode("a cat", true), 3));
  EXPECT_EQ(Str(choices[2].at("text")), EchoText(tokenizer_->Encode("the dog", true), 3));
  EXPECT_EQ(r.Json().at("usage").at("prompt_tokens").to_number<int64_t>(),
            static_cast<int64_t>(tokenizer_->Encode("a cat", true).size() + tokenizer_->Encode("the dog", true).size()));

  std::vector<uint32_t> ids = tokenizer_->Encode("Tom went home", false);
  json::array arr;
  for (auto id : ids) arr.push_back(id);
  auto t = client_->Post("/v1/completions", R"({"model":"stories","max_tokens":5,"prompt":)" + json::serialize(arr) + "}");
  ASSERT_EQ(t.status, 200) << t.body;
  EXPECT_EQ(Str(t.Json().at("choices").at(0).at("text")), EchoText(ids, 5));

  json::array lists{arr, arr};
  auto l = client_->Post("/v1/completions", R"({"model":"stories","max_tokens":2,"prompt":)" + json::serialize(lists) + "}");
  ASSERT_EQ(l.status, 200) << l.body;
  EXPECT_EQ(l.Json().at("choices").as_array().size(), 2u);
}

TEST_F(FrontendTest, MaxCompletionTokensWinsAndDefaultIsRemainingContext) {
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3,"max_completion_tokens":5})");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.Json().at("usage").at("completion_tokens").to_number<int64_t>(), 5);
  auto d = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","stop_token_ids":[2],"ignore_eos":true,)"
                                            R"("min_tokens":1,"top_k":5,"min_p":0.1,"repetition_penalty":1.1,)"
                                            R"("temperature":0.5,"top_p":0.9,"frequency_penalty":0.5,"presence_penalty":-0.5})");
  ASSERT_EQ(d.status, 200) << d.body;
  auto req = echo_->requests().back();
  EXPECT_EQ(req.stop.max_tokens, static_cast<int>(kContext - tokenizer_->Encode("hi", true).size()));
  EXPECT_EQ(req.stop.stop_token_ids, std::vector<uint32_t>{2});
  EXPECT_TRUE(req.stop.ignore_eos);
  EXPECT_EQ(req.stop.min_tokens, 1);
  EXPECT_EQ(req.sampling.top_k, 5);
  EXPECT_FLOAT_EQ(req.sampling.min_p, 0.1f);
  EXPECT_FLOAT_EQ(req.sampling.repetition_penalty, 1.1f);
  EXPECT_FLOAT_EQ(req.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(req.sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(req.sampling.frequency_penalty, 0.5f);
  EXPECT_FLOAT_EQ(req.sampling.presence_penalty, -0.5f);
}

// Picks a stop string that straddles the boundary between two generated tokens' text.
TEST_F(FrontendTest, StopStringAcrossTokenBoundaryNonStreamingAndStreaming) {
  const std::string prompt = "Once upon a time there was a little girl";
  auto ids = tokenizer_->Encode(prompt, true);
  const size_t max_tokens = 40;
  const std::string full = EchoText(ids, max_tokens);
  // Text after k generated tokens; find a boundary with at least 2 bytes on both sides.
  std::string stop;
  size_t boundary = 0;
  for (size_t k = 3; k < 12 && stop.empty(); ++k) {
    size_t b = EchoText(ids, k).size();
    size_t next = EchoText(ids, k + 1).size();
    if (b >= 2 && next >= b + 2 && full[b - 1] != ' ' ) {
      stop = full.substr(b - 2, 4);
      boundary = b;
    }
  }
  ASSERT_FALSE(stop.empty());
  const size_t at = full.find(stop);
  ASSERT_LE(at, boundary - 2);
  const std::string expected = full.substr(0, at);
  const std::string req = R"({"model":"stories","prompt":")" + prompt + R"(","max_tokens":40,"stop":[")" + stop + "\"]";

  auto r = client_->Post("/v1/completions", req + "}");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Str(r.Json().at("choices").at(0).at("text")), expected);
  EXPECT_EQ(Str(r.Json().at("choices").at(0).at("finish_reason")), "stop");
  EXPECT_LT(r.Json().at("usage").at("completion_tokens").to_number<int64_t>(), 40);

  auto inc = client_->Post("/v1/completions", req + R"(,"include_stop_str_in_output":true})");
  EXPECT_EQ(Str(inc.Json().at("choices").at(0).at("text")), expected + stop);

  // Streaming from the slow engine: the stop string hits long before max_tokens.
  std::string slow_req = R"({"model":"slow","prompt":")" + prompt + R"(","max_tokens":400,"stop":[")" + stop + "\"]";
  auto s = client_->Post("/v1/completions", slow_req + R"(,"stream":true})");
  bool done = false;
  auto events = ParseSse(s.body, &done);
  ASSERT_TRUE(done);
  std::string text;
  for (const auto& e : events) {
    text += Str(e.at("choices").at(0).at("text"));
    // No chunk ever carries the start of the stop string past the final text.
    EXPECT_LE(text.size(), expected.size());
  }
  EXPECT_EQ(text, expected);
  EXPECT_EQ(Str(events.back().at("choices").at(0).at("finish_reason")), "stop");
  EXPECT_EQ(s.body.find(stop), std::string::npos);
  // A stop string hit cancels the engine request.
  EXPECT_TRUE(slow_->WaitCancelled(1));
}

TEST_F(FrontendTest, Logprobs) {
  auto r = client_->Post("/v1/chat/completions", R"({"model":"stories","messages":[{"role":"user","content":"hi"}],)"
                                                  R"("max_tokens":4,"logprobs":true,"top_logprobs":2})");
  ASSERT_EQ(r.status, 200) << r.body;
  auto content = r.Json().at("choices").at(0).at("logprobs").at("content").as_array();
  ASSERT_EQ(content.size(), 4u);
  for (const auto& c : content) {
    EXPECT_EQ(c.at("top_logprobs").as_array().size(), 2u);
    EXPECT_EQ(c.at("bytes").as_array().size(), c.at("token").as_string().size());
    EXPECT_EQ(c.at("logprob").to_number<double>(), 0.0);
  }
  EXPECT_TRUE(echo_->requests().back().sampling.logprobs);
  EXPECT_EQ(echo_->requests().back().sampling.top_logprobs, 2);

  auto c = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a cat sat","max_tokens":5,"logprobs":1})");
  ASSERT_EQ(c.status, 200) << c.body;
  auto lp = c.Json().at("choices").at(0).at("logprobs");
  EXPECT_EQ(lp.at("tokens").as_array().size(), 5u);
  EXPECT_EQ(lp.at("token_logprobs").as_array().size(), 5u);
  EXPECT_EQ(lp.at("top_logprobs").as_array().size(), 5u);
  auto offsets = lp.at("text_offset").as_array();
  ASSERT_EQ(offsets.size(), 5u);
  for (size_t i = 1; i < offsets.size(); ++i) EXPECT_GE(offsets[i].to_number<int64_t>(), offsets[i - 1].to_number<int64_t>());
  auto no = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":2})");
  EXPECT_TRUE(no.Json().at("choices").at(0).at("logprobs").is_null());
}

TEST_F(FrontendTest, EchoPrependsPrompt) {
  auto ids = tokenizer_->Encode("a cat", true);
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a cat","max_tokens":3,"echo":true})");
  EXPECT_EQ(Str(r.Json().at("choices").at(0).at("text")), "a cat" + EchoText(ids, 3));
}

TEST_F(FrontendTest, SkipSpecialTokens) {
  // The echoed BOS (<s>) is special: hidden by default, shown with skip_special_tokens=false.
  auto shown = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3,"skip_special_tokens":false})");
  auto hidden = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3})");
  EXPECT_NE(Str(shown.Json().at("choices").at(0).at("text")).find("<s>"), std::string::npos);
  EXPECT_EQ(Str(hidden.Json().at("choices").at(0).at("text")).find("<s>"), std::string::npos);
}

TEST_F(FrontendTest, KeepAliveAcrossStreamingAndPlainRequests) {
  for (int i = 0; i < 3; ++i) {
    auto s = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3,"stream":true})");
    ASSERT_EQ(s.status, 200);
    bool done = false;
    ParseSse(s.body, &done);
    EXPECT_TRUE(done);
    auto p = client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3})");
    ASSERT_EQ(p.status, 200);
    EXPECT_EQ(client_->Get("/health").status, 200);
  }
}

TEST_F(FrontendTest, ConcurrentClients) {
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      HttpClient c(frontend_->port());
      for (int i = 0; i < 10; ++i) {
        auto r = c.Post("/v1/completions", R"({"model":"stories","prompt":"cat )" + std::to_string(t) + R"(","max_tokens":8,"stream":)" +
                                               (i % 2 ? "true" : "false") + "}");
        if (r.status == 200) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 80);
}

TEST_F(FrontendTest, MetricsExposition) {
  client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3})");
  client_->Post("/v1/completions", R"({"model":"stories","prompt":"hi","max_tokens":3,"stream":true})");
  client_->Post("/v1/completions", R"({"model":"nope","prompt":"hi"})");
  auto m = client_->Get("/metrics");
  ASSERT_EQ(m.status, 200);
  EXPECT_NE(m.body.find("dyn_frontend_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"), std::string::npos) << m.body;
  EXPECT_NE(m.body.find("dyn_frontend_requests_total{endpoint=\"/v1/completions\",status=\"404\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("dyn_frontend_errors_total{code=\"model_not_found\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("dyn_frontend_output_tokens_total 6"), std::string::npos);
  EXPECT_NE(m.body.find("dyn_frontend_time_to_first_token_seconds_count 2"), std::string::npos);
  EXPECT_NE(m.body.find("dyn_frontend_inter_token_latency_seconds_count 4"), std::string::npos);
  EXPECT_NE(m.body.find("dyn_frontend_inflight_requests 1"), std::string::npos);  // the /metrics request itself
  EXPECT_NE(m.body.find("dyn_engine_generated_tokens_total{model=\"stories\"}"), std::string::npos);
}

}  // namespace
}  // namespace dyn::test

namespace dyn::test {
namespace {
namespace json = boost::json;

TEST_F(FrontendTest, ToolsReachTheTemplate) {
  auto r = client_->Post("/tokenize", R"({"model":"stories","messages":[{"role":"user","content":"hi"}],)"
                                      R"("tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}]})");
  ASSERT_EQ(r.status, 200) << r.body;
  auto d = client_->Post("/detokenize", R"({"model":"stories","tokens":)" + json::serialize(r.Json().at("tokens")) + "}");
  EXPECT_NE(std::string(d.Json().at("prompt").as_string()).find("tool get_weather"), std::string::npos) << d.body;
}

TEST_F(FrontendTest, CachedTokensReachUsageAndMetrics) {
  echo_->set_report_cached_tokens(2);
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"the cat sat","max_tokens":2,"n":2})");
  ASSERT_EQ(r.status, 200);
  // Counted once per prompt, not once per choice.
  EXPECT_EQ(r.Json().at("usage").at("prompt_tokens_details").at("cached_tokens").to_number<int64_t>(), 2);
  auto m = client_->Get("/metrics");
  EXPECT_NE(m.body.find("dyn_frontend_cached_tokens_total 4"), std::string::npos);
}

TEST_F(FrontendTest, ChatStreamingWithNSendsRoleThenContentPerChoice) {
  auto s = client_->Post("/v1/chat/completions", R"({"model":"stories","messages":[{"role":"user","content":"a dog"}],)"
                                                 R"("max_tokens":5,"n":2,"stream":true})");
  bool done = false;
  auto events = ParseSse(s.body, &done);
  ASSERT_TRUE(done);
  std::map<int64_t, std::string> text;
  std::map<int64_t, int> roles, finishes;
  for (const auto& e : events) {
    const auto& choice = e.at("choices").at(0);
    const int64_t index = choice.at("index").to_number<int64_t>();
    const auto& delta = choice.at("delta").as_object();
    if (delta.contains("role")) {
      EXPECT_EQ(text[index], "") << "role after content";
      ++roles[index];
    }
    if (auto* c = delta.if_contains("content")) text[index] += std::string(c->as_string());
    if (!choice.at("finish_reason").is_null()) ++finishes[index];
  }
  EXPECT_EQ(roles, (std::map<int64_t, int>{{0, 1}, {1, 1}}));
  EXPECT_EQ(finishes, (std::map<int64_t, int>{{0, 1}, {1, 1}}));
  EXPECT_EQ(text[0], text[1]);
  EXPECT_FALSE(text[0].empty());
}

// Mutated and truncated bodies: every one gets an HTTP answer (200 or a 4xx with an error
// body), and the server keeps serving.
TEST_F(FrontendTest, MutatedBodiesNeverBreakTheServer) {
  const std::string valid =
      R"({"model":"stories","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stop":["x"],"n":2,"logprobs":true,"top_logprobs":1,"stream":false})";
  std::mt19937 rng(1234);
  int answered = 0;
  for (int i = 0; i < 300; ++i) {
    std::string body = valid;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      size_t pos = rng() % body.size();
      switch (rng() % 4) {
        case 0: body[pos] = static_cast<char>(rng() % 256); break;
        case 1: body.erase(pos, 1 + rng() % 8); break;
        case 2: body.insert(pos, 1, "{}[]\",:0-e"[rng() % 10]); break;
        case 3: body.resize(pos); break;
      }
      if (body.empty()) body.assign(1, '{');
    }
    HttpClient c(frontend_->port());
    auto r = c.Post("/v1/chat/completions", body);
    ASSERT_TRUE(r.status == 200 || (r.status >= 400 && r.status < 500)) << r.status << " for " << body;
    if (r.status != 200) {
      ASSERT_TRUE(r.Json().is_object()) << r.body;
      EXPECT_TRUE(r.Json().as_object().contains("error"));
    }
    ++answered;
  }
  EXPECT_EQ(answered, 300);
  EXPECT_EQ(client_->Get("/health").status, 200);
}

}  // namespace
}  // namespace dyn::test

namespace dyn::test {
namespace {

TEST_F(FrontendTest, RegistryAddRemoveWhileServing) {
  EXPECT_FALSE(registry_->Add(Model("stories", CreateEchoEngine({}), true)).ok());  // name taken
  ServedModel no_engine = Model("x", nullptr, true);
  EXPECT_FALSE(registry_->Add(std::move(no_engine)).ok());
  auto body = std::string(R"({"model":"late","prompt":"hi","max_tokens":2})");
  EXPECT_EQ(client_->Post("/v1/completions", body).status, 404);
  auto late_engine = CreateEchoEngine({});
  ASSERT_TRUE(registry_->Add(Model("late", late_engine, true)).ok());
  EXPECT_EQ(client_->Post("/v1/completions", body).status, 200);
  EXPECT_TRUE(registry_->Remove("late"));
  EXPECT_FALSE(registry_->Remove("late"));
  EXPECT_EQ(client_->Post("/v1/completions", body).status, 404);
  EXPECT_EQ(registry_->Find("late"), nullptr);
  late_engine->Shutdown();
}

}  // namespace
}  // namespace dyn::test
