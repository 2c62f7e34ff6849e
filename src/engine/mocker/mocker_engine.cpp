#include "engine/mocker/mocker_engine.h"

#include <algorithm>
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
using Clock = std::chrono::steady_clock;

class MockerEngine final : public StepLoopEngine {
 public:
  explicit MockerEngine(const MockerEngineOptions& options)
      : options_(options), hooks_(options.kv_transfer), core_(options.core) {
    core_.SetKvEventSink(options.kv_event_sink);
    metrics_ = core_.Metrics();
    thread_ = std::thread([this] { Loop(); });
  }

  ~MockerEngine() override { Shutdown(); }

  // Any thread: the lease leaves the table now (a second release is refused); the step thread
  // frees its blocks at its next iteration.
  bool ReleaseKvLease(uint64_t lease_id) override {
    std::lock_guard lock(lease_mu_);
    if (!lease_deadlines_.erase(lease_id)) return false;
    released_leases_.push_back(lease_id);
    return true;
  }

 private:
  struct Active {
    std::shared_ptr<RequestContext> context;
    OutputSink sink;
    RequestPhase phase = RequestPhase::kFull;
    std::string descriptor;  // kDecodeImported: the source's KV, released once
    int prompt_tokens = 0;
  };

  // A delta waiting for the end of the pass.
  struct Delivery {
    const OutputSink* sink = nullptr;  // the Active's own sink (stream still open)
    OutputSink owned;                  // or the sink itself, moved out of a finished stream
    EngineOutput output;
  };

  // A simulated KV transfer in progress (kDecodeImported).
  struct Transfer {
    uint64_t id = 0;
    Clock::time_point done;
  };

  void Loop();
  Status Validate(const PreprocessedRequest& r) const;
  void Admit(Incoming in);
  void DropCancelled();
  void ProcessLeases();
  void CompleteTransfers(Clock::time_point now);
  void Collect(MockerStepResult& res, Clock::time_point now);
  void HandOff(const MockerToken& t, const Active& a, EngineOutput& delta, Clock::time_point now);
  void ReleaseSource(Active& a);
  bool HasLeases();
  // When to wake up after a pass that ran nothing (transfers, leases, blocked imports).
  Clock::time_point IdleWake(Clock::time_point now, bool leases) const;
  void EndLater(OutputSink sink, FinishReason reason, std::string error = {});
  void Deliver();
  void PublishMetrics();

  const MockerEngineOptions options_;
  const KvTransferHooks hooks_;

  // Step-thread state.
  MockerCore core_;
  std::unordered_map<uint64_t, Active> active_;
  uint64_t next_id_ = 1;
  std::vector<Delivery> outbox_;
  std::vector<Transfer> transfers_;

  // Leases handed out (ReleaseKvLease runs on other threads).
  std::mutex lease_mu_;
  std::unordered_map<uint64_t, Clock::time_point> lease_deadlines_;
  std::vector<uint64_t> released_leases_;  // to free in the core
};

Status MockerEngine::Validate(const PreprocessedRequest& r) const {
  if (r.phase == RequestPhase::kPrefillOnly && !hooks_.can_prefill())
    return Status::InvalidArgument("this worker cannot hand KV to a decode worker (no transfer backend)");
  if (r.phase == RequestPhase::kDecodeImported) {
    if (r.kv_transfer.empty()) return Status::InvalidArgument("decode request without a KV transfer descriptor");
    if (r.first_token >= options_.core.vocab_size)
      return Status::InvalidArgument("first token " + std::to_string(r.first_token) + " is out of range");
  }
  return Status::Ok();
}

void MockerEngine::Admit(Incoming in) {
  if (in.context && in.context->cancelled()) {
    EndLater(std::move(in.sink), FinishReason::kCancelled);
    return;
  }
  const uint64_t id = next_id_++;
  MockerRequest r;
  r.id = id;
  r.max_tokens = in.request.stop.max_tokens;
  r.phase = in.request.phase;
  r.first_token = in.request.first_token;
  // Deterministic per request: the client's seed, else the request id (the same id replays the
  // same tokens, on a prefill and a decode worker alike), else the engine's sequence number.
  if (in.request.sampling.seed) {
    r.seed = *in.request.sampling.seed;
  } else if (!in.request.request_id.empty()) {
    r.seed = std::hash<std::string>{}(in.request.request_id);
  } else {
    r.seed = id;
  }
  const int prompt_tokens = static_cast<int>(in.request.token_ids.size());
  r.prompt = std::move(in.request.token_ids);
  Status st = Validate(in.request);
  if (st.ok()) st = core_.Add(std::move(r));
  Active a{std::move(in.context), std::move(in.sink), in.request.phase, std::move(in.request.kv_transfer),
           prompt_tokens};
  if (!st.ok()) {
    ReleaseSource(a);  // an import refused here still frees the prefill worker's lease
    EndLater(std::move(a.sink), FinishReason::kError, st.message());
    return;
  }
  active_.emplace(id, std::move(a));
}

void MockerEngine::ReleaseSource(Active& a) {
  if (a.phase != RequestPhase::kDecodeImported || a.descriptor.empty()) return;
  if (hooks_.release) hooks_.release(a.descriptor);
  a.descriptor.clear();
}

void MockerEngine::DropCancelled() {
  for (auto it = active_.begin(); it != active_.end();) {
    if (it->second.context && it->second.context->cancelled()) {
      // Nothing is being written into an import's blocks (the copy is simulated): it ends now.
      core_.Cancel(it->first);
      ReleaseSource(it->second);
      std::erase_if(transfers_, [&](const Transfer& t) { return t.id == it->first; });
      EndLater(std::move(it->second.sink), FinishReason::kCancelled);
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
}

bool MockerEngine::HasLeases() {
  std::lock_guard lock(lease_mu_);
  return !lease_deadlines_.empty() || !released_leases_.empty();
}

void MockerEngine::ProcessLeases() {
  std::vector<uint64_t> release;
  {
    std::lock_guard lock(lease_mu_);
    const Clock::time_point now = Clock::now();
    for (auto it = lease_deadlines_.begin(); it != lease_deadlines_.end();) {
      if (it->second <= now) {
        DYN_LOG(WARN) << "KV lease " << it->first << " expired unreleased";
        released_leases_.push_back(it->first);
        it = lease_deadlines_.erase(it);
      } else {
        ++it;
      }
    }
    release.swap(released_leases_);
  }
  for (uint64_t lease : release) core_.ReleaseLease(lease);
}

void MockerEngine::CompleteTransfers(Clock::time_point now) {
  for (auto it = transfers_.begin(); it != transfers_.end();) {
    if (it->done > now) {
      ++it;
      continue;
    }
    auto a = active_.find(it->id);
    if (a != active_.end()) ReleaseSource(a->second);
    core_.CompleteImport(it->id, /*ok=*/true);
    it = transfers_.erase(it);
  }
}

void MockerEngine::HandOff(const MockerToken& t, const Active& a, EngineOutput& delta, Clock::time_point now) {
  {
    std::lock_guard lock(lease_mu_);
    lease_deadlines_[t.lease_id] = now + hooks_.lease_timeout;
  }
  Result<std::string> desc = hooks_.describe(t.lease_id, t.lease_blocks, a.prompt_tokens);
  if (!desc.ok()) {
    ReleaseKvLease(t.lease_id);
    delta.finish_reason = FinishReason::kError;
    delta.error = "Internal: cannot describe the prompt's KV: " + desc.status().message();
    return;
  }
  delta.kv_transfer = std::move(*desc);
  delta.finish_reason = FinishReason::kLength;  // this worker's part is done
}

void MockerEngine::Collect(MockerStepResult& res, Clock::time_point now) {
  for (auto& [id, status] : res.failed) {
    auto it = active_.find(id);
    if (it == active_.end()) continue;
    ReleaseSource(it->second);
    EndLater(std::move(it->second.sink), FinishReason::kError, status.message());
    active_.erase(it);
  }
  for (const MockerImport& im : res.imports) {
    const double real_ms = im.transfer_ms / options_.speedup_ratio;
    transfers_.push_back(
        {im.id, now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(real_ms))});
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
      if (t.lease_id != 0) HandOff(t, it->second, delta, now);
      if (!delta.finish_reason) delta.finish_reason = FinishReason::kLength;
      outbox_.push_back({nullptr, std::move(it->second.sink), std::move(delta)});
      active_.erase(it);
    } else {
      outbox_.push_back({&it->second.sink, nullptr, std::move(delta)});
    }
  }
}

Clock::time_point MockerEngine::IdleWake(Clock::time_point now, bool leases) const {
  // Releases arrive from other threads without waking the inbox: poll for them, like the native
  // engine; a transfer's end is known exactly.
  Clock::time_point wake = now + std::chrono::milliseconds(active_.empty() && leases ? 5 : 1);
  for (const Transfer& t : transfers_) wake = std::min(wake, t.done);
  return wake;
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
  std::vector<Incoming> incoming;
  for (;;) {
    // Idle only when no stream is open, no cancelled request still holds blocks and no lease
    // waits for its release or expiry.
    const bool leases = HasLeases();
    if (!inbox_.Take(&incoming, active_.empty() && !core_.has_unfinished() && !leases)) break;
    const Clock::time_point start = Clock::now();
    for (Incoming& in : incoming) Admit(std::move(in));
    incoming.clear();
    ProcessLeases();
    DropCancelled();
    CompleteTransfers(start);
    MockerStepResult res = core_.Step();
    Collect(res, start);
    PublishMetrics();
    bool running = true;
    if (res.duration_ms > 0) {
      const double real_ms = res.duration_ms / options_.speedup_ratio;
      // Below a microsecond a sleep costs more than it models (speedup 1e9 means "no sleep").
      if (real_ms >= 1e-3) {
        running = inbox_.SleepUntil(start + std::chrono::duration_cast<Clock::duration>(
                                                std::chrono::duration<double, std::milli>(real_ms)));
      }
    } else if (!active_.empty() || core_.has_unfinished() || leases) {
      // Nothing ran: waiting for a transfer, a lease release or expiry, or blocks; do not spin.
      running = inbox_.SleepUntil(IdleWake(Clock::now(), leases));
    }
    Deliver();
    if (!running) break;
  }
  // Shutting down: every stream still open ends as cancelled; its source's lease is released.
  for (auto& [id, a] : active_) {
    core_.Cancel(id);
    ReleaseSource(a);
    EndLater(std::move(a.sink), FinishReason::kCancelled);
  }
  active_.clear();
  transfers_.clear();
  {
    std::lock_guard lock(lease_mu_);
    for (const auto& [lease, deadline] : lease_deadlines_) released_leases_.push_back(lease);
    lease_deadlines_.clear();
  }
  ProcessLeases();
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
