#include "engine/mocker/mocker_engine.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "engine/request_inbox.h"

namespace dyn {
namespace {

using Incoming = IncomingRequest;

class MockerEngine final : public Engine {
 public:
  explicit MockerEngine(const MockerEngineOptions& options) : options_(options), core_(options.core) {
    core_.SetKvEventSink(options.kv_event_sink);
    metrics_ = core_.Metrics();
    thread_ = std::thread([this] { Loop(); });
  }

  ~MockerEngine() override { Shutdown(); }

  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    inbox_.Push(std::move(request), std::move(context), std::move(sink));
  }

  EngineMetrics Metrics() const override {
    std::lock_guard lock(metrics_mu_);
    return metrics_;
  }

  void Shutdown() override {
    inbox_.Close();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Active {
    std::shared_ptr<RequestContext> context;
    OutputSink sink;
  };

  // A delta waiting for the end of the pass.
  struct Delivery {
    const OutputSink* sink = nullptr;  // the Active's own sink (stream still open)
    OutputSink owned;                  // or the sink itself, moved out of a finished stream
    EngineOutput output;
  };

  void Loop();
  void Admit(Incoming in);
  void DropCancelled();
  void Collect(MockerStepResult& res);
  void EndLater(OutputSink sink, FinishReason reason, std::string error = {});
  void Deliver();
  void PublishMetrics();

  const MockerEngineOptions options_;

  RequestInbox inbox_;

  // Step-thread state.
  MockerCore core_;
  std::unordered_map<uint64_t, Active> active_;
  uint64_t next_id_ = 1;
  std::vector<Delivery> outbox_;

  mutable std::mutex metrics_mu_;
  EngineMetrics metrics_;

  std::thread thread_;  // last: starts after everything above is built
};

void MockerEngine::Admit(Incoming in) {
  if (in.context && in.context->cancelled()) {
    EndLater(std::move(in.sink), FinishReason::kCancelled);
    return;
  }
  const uint64_t id = next_id_++;
  MockerRequest r;
  r.id = id;
  r.max_tokens = in.request.stop.max_tokens;
  // Deterministic per request: the client's seed, else the request id (the same id replays the
  // same tokens), else the engine's sequence number.
  if (in.request.sampling.seed) {
    r.seed = *in.request.sampling.seed;
  } else if (!in.request.request_id.empty()) {
    r.seed = std::hash<std::string>{}(in.request.request_id);
  } else {
    r.seed = id;
  }
  r.prompt = std::move(in.request.token_ids);
  Status st = core_.Add(std::move(r));
  if (!st.ok()) {
    EndLater(std::move(in.sink), FinishReason::kError, st.message());
    return;
  }
  active_.emplace(id, Active{std::move(in.context), std::move(in.sink)});
}

void MockerEngine::DropCancelled() {
  for (auto it = active_.begin(); it != active_.end();) {
    if (it->second.context && it->second.context->cancelled()) {
      core_.Cancel(it->first);
      EndLater(std::move(it->second.sink), FinishReason::kCancelled);
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
}

void MockerEngine::Collect(MockerStepResult& res) {
  for (auto& [id, status] : res.failed) {
    auto it = active_.find(id);
    if (it == active_.end()) continue;
    EndLater(std::move(it->second.sink), FinishReason::kError, status.message());
    active_.erase(it);
  }
  for (const MockerToken& t : res.tokens) {
    auto it = active_.find(t.id);
    if (it == active_.end()) continue;  // cancellations are removed before the pass: defensive
    EngineOutput delta;
    delta.token_ids.push_back(t.token);
    if (t.first) {
      delta.prompt_tokens = static_cast<uint32_t>(t.prompt_tokens);
      delta.cached_tokens = static_cast<uint32_t>(t.cached_tokens);
    }
    if (t.finished) {
      delta.finish_reason = FinishReason::kLength;
      outbox_.push_back({nullptr, std::move(it->second.sink), std::move(delta)});
      active_.erase(it);
    } else {
      outbox_.push_back({&it->second.sink, nullptr, std::move(delta)});
    }
  }
}

void MockerEngine::EndLater(OutputSink sink, FinishReason reason, std::string error) {
  Delivery d;
  d.owned = std::move(sink);
  d.output.finish_reason = reason;
  d.output.error = std::move(error);
  outbox_.push_back(std::move(d));
}

void MockerEngine::Deliver() {
  for (Delivery& d : outbox_) {
    const OutputSink& sink = d.sink ? *d.sink : d.owned;
    sink(std::move(d.output));
  }
  outbox_.clear();
}

void MockerEngine::PublishMetrics() {
  EngineMetrics m = core_.Metrics();
  std::lock_guard lock(metrics_mu_);
  metrics_ = m;
}

void MockerEngine::Loop() {
  using Clock = std::chrono::steady_clock;
  std::vector<Incoming> incoming;
  for (;;) {
    // Idle only when no stream is open and no cancelled request still holds blocks.
    if (!inbox_.Take(&incoming, active_.empty() && !core_.has_unfinished())) break;
    const Clock::time_point start = Clock::now();
    for (Incoming& in : incoming) Admit(std::move(in));
    incoming.clear();
    DropCancelled();
    MockerStepResult res = core_.Step();
    Collect(res);
    PublishMetrics();
    bool running = true;
    if (res.duration_ms > 0) {
      const double real_ms = res.duration_ms / options_.speedup_ratio;
      // Below a microsecond a sleep costs more than it models (speedup 1e9 means "no sleep").
      if (real_ms >= 1e-3) {
        running = inbox_.SleepUntil(start + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double, std::milli>(real_ms)));
      }
    } else if (res.batch_size == 0 && !active_.empty()) {
      // Nothing could run (an idle pool fits any admitted request); do not spin.
      running = inbox_.SleepUntil(Clock::now() + std::chrono::milliseconds(1));
    }
    Deliver();
    if (!running) break;
  }
  // Shutting down: every stream still open ends as cancelled.
  for (auto& [id, a] : active_) {
    core_.Cancel(id);
    EndLater(std::move(a.sink), FinishReason::kCancelled);
  }
  active_.clear();
  core_.Step();  // frees the cancelled requests' blocks
  PublishMetrics();
  Deliver();
  inbox_.CancelRemaining();
}

}  // namespace

Result<EnginePtr> CreateMockerEngine(const MockerEngineOptions& options) {
  DYN_RETURN_IF_ERROR(ValidateMockerConfig(options.core));
  if (!(options.speedup_ratio > 0) || !std::isfinite(options.speedup_ratio)) {
    return Status::InvalidArgument("mocker: speedup_ratio must be a positive number");
  }
  DYN_LOG(INFO) << "mocker engine: " << options.core.num_blocks << " KV blocks of " << options.core.block_size
                << " tokens, max_num_seqs " << options.core.max_num_seqs << ", max_num_batched_tokens "
                << options.core.max_num_batched_tokens << ", speedup " << options.speedup_ratio;
  return EnginePtr(std::make_shared<MockerEngine>(options));
}

}  // namespace dyn
