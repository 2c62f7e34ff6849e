// Shared setup for the frontend tests: the real stories260K tokenizer, a small chat template,
// echo engines wrapped in a recorder, and an HttpFrontend on an ephemeral port.
#pragma once

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>

#include <boost/json.hpp>

#include "engine/echo/echo_engine.h"
#include "frontend/frontend.h"
#include "frontend/test_http_client.h"
#include "llm/template/chat_template.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn::test {

inline constexpr char kStoriesDir[] = "../shared/models/stories260K/hf";
inline constexpr uint32_t kContext = 512;
// role: content lines after BOS; enable_thinking (a chat_template_kwargs) adds a marker.
inline constexpr char kTestTemplate[] =
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if tools %}{% for t in tools %}tool {{ t['function']['name'] }}\n{% endfor %}{% endif %}"
    "{% if enable_thinking %}think: {% endif %}{% if add_generation_prompt %}assistant:{% endif %}";

// Forwards to an inner engine and records what it was asked and how streams ended.
class RecordingEngine : public Engine {
 public:
  explicit RecordingEngine(EnginePtr inner) : inner_(std::move(inner)) {}
  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    {
      std::lock_guard lock(mu_);
      requests_.push_back(request);
    }
    inner_->Generate(std::move(request), std::move(context), [this, sink = std::move(sink)](EngineOutput&& out) {
      if (out.prompt_tokens > 0) out.cached_tokens = std::min<uint32_t>(report_cached_tokens_, out.prompt_tokens);
      if (out.finish_reason) {
        std::lock_guard lock(mu_);
        if (*out.finish_reason == FinishReason::kCancelled) ++cancelled_;
        ++finished_;
        cv_.notify_all();
      }
      sink(std::move(out));
    });
  }
  EngineMetrics Metrics() const override { return inner_->Metrics(); }
  void Shutdown() override { inner_->Shutdown(); }

  std::vector<PreprocessedRequest> requests() const {
    std::lock_guard lock(mu_);
    return requests_;
  }
  // The first delta of later streams claims this many prompt tokens came from a prefix cache.
  void set_report_cached_tokens(uint32_t n) { report_cached_tokens_ = n; }
  int cancelled() const {
    std::lock_guard lock(mu_);
    return cancelled_;
  }
  // Waits until at least `count` streams ended cancelled.
  bool WaitCancelled(int count, int timeout_ms = 5000) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return cancelled_ >= count; });
  }
  bool WaitFinished(int count, int timeout_ms = 5000) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return finished_ >= count; });
  }

 private:
  EnginePtr inner_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<PreprocessedRequest> requests_;
  int cancelled_ = 0;
  int finished_ = 0;
  std::atomic<uint32_t> report_cached_tokens_{0};
};

// Ends every request with an engine error.
class FailingEngine : public Engine {
 public:
  void Generate(PreprocessedRequest, std::shared_ptr<RequestContext>, OutputSink sink) override {
    EngineOutput out;
    out.finish_reason = FinishReason::kError;
    out.error = "Internal: the GPU caught fire";
    sink(std::move(out));
  }
  EngineMetrics Metrics() const override { return {}; }
  void Shutdown() override {}
};

class FrontendTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::FromDirectory(kStoriesDir);
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    tokenizer_ = std::shared_ptr<const Tokenizer>(std::move(*tok));
    auto tmpl = ChatTemplate::Parse(kTestTemplate);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status().ToString();
    template_ = std::shared_ptr<const ChatTemplate>(std::move(*tmpl));
  }
  static void TearDownTestSuite() {
    tokenizer_.reset();
    template_.reset();
  }

  void SetUp() override {
    ASSERT_TRUE(tokenizer_);
    registry_ = std::make_shared<ModelRegistry>();
    echo_ = std::make_shared<RecordingEngine>(CreateEchoEngine({}));
    slow_ = std::make_shared<RecordingEngine>(CreateEchoEngine({.token_delay_ms = 5}));
    ASSERT_TRUE(registry_->Add(Model("stories", echo_, true)).ok());
    ASSERT_TRUE(registry_->Add(Model("slow", slow_, true)).ok());
    ASSERT_TRUE(registry_->Add(Model("no-template", CreateEchoEngine({}), false)).ok());
    ASSERT_TRUE(registry_->Add(Model("failing", std::make_shared<FailingEngine>(), true)).ok());
    HttpFrontendOptions options;
    options.host = "127.0.0.1";
    options.port = 0;
    options.io_threads = 2;
    options.max_body_bytes = 64 * 1024;
    auto fe = HttpFrontend::Start(options, registry_);
    ASSERT_TRUE(fe.ok()) << fe.status().ToString();
    frontend_ = std::move(*fe);
    client_ = std::make_unique<HttpClient>(frontend_->port());
  }

  void TearDown() override {
    client_.reset();
    if (frontend_) frontend_->Stop();
    for (const auto& m : registry_->List()) m->engine->Shutdown();
  }

  ServedModel Model(const std::string& name, EnginePtr engine, bool with_template) {
    ServedModel m;
    m.name = name;
    m.tokenizer = tokenizer_;
    if (with_template) m.chat_template = template_;
    m.engine = std::move(engine);
    m.context_length = kContext;
    m.eos_token_ids = {2};
    m.created_unix = 1700000000;
    return m;
  }

  // What the echo engine's output should detokenize to: the prompt tokens cycled to max_tokens,
  // decoded in the context of the prompt.
  static std::string EchoText(const std::vector<uint32_t>& prompt, size_t max_tokens) {
    std::vector<uint32_t> all = prompt;
    for (size_t i = 0; i < max_tokens; ++i) all.push_back(prompt[i % prompt.size()]);
    std::string full = tokenizer_->Decode(all, true);
    std::string head = tokenizer_->Decode(prompt, true);
    return full.substr(head.size());
  }

  static boost::json::value Parse(const std::string& s) { return boost::json::parse(s); }

  inline static std::shared_ptr<const Tokenizer> tokenizer_;
  inline static std::shared_ptr<const ChatTemplate> template_;
  std::shared_ptr<ModelRegistry> registry_;
  std::shared_ptr<RecordingEngine> echo_, slow_;
  std::unique_ptr<HttpFrontend> frontend_;
  std::unique_ptr<HttpClient> client_;
};

}  // namespace dyn::test
