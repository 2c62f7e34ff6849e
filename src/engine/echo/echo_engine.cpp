#include "engine/echo/echo_engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace dyn {
namespace {

struct EchoStream {
  PreprocessedRequest request;
  std::shared_ptr<RequestContext> context;
  OutputSink sink;
  int emitted = 0;
  bool first = true;
};

class EchoEngine final : public Engine {
 public:
  explicit EchoEngine(const EchoEngineOptions& options) : options_(options) {
    thread_ = std::thread([this] { Run(); });
  }
  ~EchoEngine() override { Shutdown(); }

  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    std::string error;
    if (request.token_ids.empty()) error = "InvalidArgument: empty prompt";
    else if (request.stop.max_tokens < 1) error = "InvalidArgument: max_tokens must be >= 1";
    if (!error.empty()) {
      EngineOutput out;
      out.finish_reason = FinishReason::kError;
      out.error = std::move(error);
      sink(std::move(out));
      return;
    }
    {
      std::lock_guard lock(mu_);
      if (!stopping_) {
        incoming_.push_back(EchoStream{std::move(request), std::move(context), std::move(sink)});
        ++waiting_;
        cv_.notify_one();
        return;
      }
    }
    EngineOutput out;
    out.finish_reason = FinishReason::kCancelled;
    sink(std::move(out));
  }

  EngineMetrics Metrics() const override {
    std::lock_guard lock(mu_);
    EngineMetrics m;
    m.running = running_;
    m.waiting = waiting_;
    m.prompt_tokens = prompt_tokens_;
    m.generated_tokens = generated_tokens_;
    m.steps = steps_;
    return m;
  }

  void Shutdown() override {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    std::vector<EchoStream> active;
    for (;;) {
      bool stopping;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !incoming_.empty() || !active.empty(); });
        stopping = stopping_;
        for (auto& s : incoming_) {
          prompt_tokens_ += s.request.token_ids.size();
          active.push_back(std::move(s));
        }
        incoming_.clear();
        waiting_ = 0;
        running_ = static_cast<int>(active.size());
      }
      if (stopping) {
        for (auto& s : active) Finish(s, FinishReason::kCancelled);
        return;
      }
      for (auto& s : active) Step(s);
      std::erase_if(active, [](const EchoStream& s) { return !s.sink; });
      {
        std::lock_guard lock(mu_);
        running_ = static_cast<int>(active.size());
        ++steps_;
      }
      if (options_.token_delay_ms > 0 && !active.empty()) {
        std::unique_lock lock(mu_);
        cv_.wait_for(lock, std::chrono::duration<double, std::milli>(options_.token_delay_ms),
                     [&] { return stopping_; });
      }
    }
  }

  // Emits one token (or the cancellation). A finished stream's sink is cleared. The token is
  // counted before it is emitted, so a client that has it reads a count that includes it.
  void Step(EchoStream& s) {
    if (s.context && s.context->cancelled()) {
      Finish(s, FinishReason::kCancelled);
      return;
    }
    const auto& prompt = s.request.token_ids;
    const uint32_t token = prompt[s.emitted % prompt.size()];
    EngineOutput out;
    if (s.first) {
      out.prompt_tokens = static_cast<uint32_t>(prompt.size());
      s.first = false;
    }
    out.token_ids.push_back(token);
    if (s.request.sampling.logprobs) {
      TokenLogprob lp{token, 0.0f, {}};
      const int alternatives = std::clamp(s.request.sampling.top_logprobs, 0, 20);
      for (int i = 0; i < alternatives; ++i) {
        lp.top.push_back({prompt[(s.emitted + i) % prompt.size()], -static_cast<float>(i)});
      }
      out.logprobs.push_back(std::move(lp));
    }
    ++s.emitted;
    const auto& stop = s.request.stop;
    const bool past_min = s.emitted > stop.min_tokens;
    auto contains = [token](const std::vector<uint32_t>& ids) {
      return std::find(ids.begin(), ids.end(), token) != ids.end();
    };
    if (past_min && (contains(stop.stop_token_ids) || (!stop.ignore_eos && contains(s.request.eos_token_ids)))) {
      out.finish_reason = FinishReason::kStop;
    } else if (s.emitted >= stop.max_tokens) {
      out.finish_reason = FinishReason::kLength;
    }
    const bool done = out.finish_reason.has_value();
    {
      std::lock_guard lock(mu_);
      ++generated_tokens_;
    }
    s.sink(std::move(out));
    if (done) s.sink = nullptr;
  }

  static void Finish(EchoStream& s, FinishReason reason) {
    EngineOutput out;
    out.finish_reason = reason;
    if (s.first) out.prompt_tokens = static_cast<uint32_t>(s.request.token_ids.size());
    s.sink(std::move(out));
    s.sink = nullptr;
  }

  const EchoEngineOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EchoStream> incoming_;
  bool stopping_ = false;
  int running_ = 0;
  int waiting_ = 0;
  uint64_t prompt_tokens_ = 0;
  uint64_t generated_tokens_ = 0;
  uint64_t steps_ = 0;
  std::thread thread_;
};

}  // namespace

EnginePtr CreateEchoEngine(const EchoEngineOptions& options) { return std::make_shared<EchoEngine>(options); }

}  // namespace dyn
