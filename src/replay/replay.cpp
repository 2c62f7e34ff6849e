// The discrete-event simulator behind RunReplay (replay.h).
#include "replay/replay.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <queue>
#include <random>

#include "router/active_sequences.h"
#include "router/kv_router.h"
#include "router/radix_indexer.h"

namespace dyn::replay {
namespace {

using router::RouterClock;

RouterClock::time_point VirtualTime(double ms) {
  return RouterClock::time_point(
      std::chrono::duration_cast<RouterClock::duration>(std::chrono::duration<double, std::milli>(ms)));
}

// Collects a worker's KV events during a step; they are applied to the indexer when the step
// ends, i.e. when the engine would publish them after the forward pass.
class PendingEvents : public KvEventSink {
 public:
  void OnKvEvent(const KvEvent& event) override { events.push_back(event); }
  std::vector<KvEvent> events;
};

router::RouterEvent ToRouterEvent(uint32_t worker, const KvEvent& e) {
  router::RouterEvent r;
  r.worker = router::WorkerKey{worker, 0};
  r.event_id = e.event_id;
  switch (e.type) {
    case KvEvent::Type::kStored: {
      router::StoredData d;
      d.parent_hash = e.parent_hash;
      d.blocks.reserve(e.blocks.size());
      // The pool's tokens_hash is HashBlockTokens of the block (kBlockHashSeed), the same local
      // hash the router chains, so token ids need not travel.
      for (const KvStoredBlock& b : e.blocks) d.blocks.push_back({b.block_hash, b.tokens_hash, {}});
      r.data = std::move(d);
      break;
    }
    case KvEvent::Type::kRemoved: r.data = router::RemovedData{e.removed}; break;
    case KvEvent::Type::kCleared: r.data = router::ClearedData{}; break;
  }
  return r;
}

struct Worker {
  std::unique_ptr<MockerCore> core;
  PendingEvents pending;
  bool stepping = false;  // a step is in flight (its end is queued)
  MockerStepResult step;  // the step in flight
  double kv_usage = 0;    // after its last step
  int in_flight = 0;      // requests routed here and not finished (least-loaded)
};

struct RequestState {
  double arrival_ms = 0;
  double last_token_ms = -1;
  int prompt_tokens = 0;
  int cached_tokens = 0;
  bool done = false;
  uint32_t worker = 0;
};

enum class EventKind { kStepEnd = 0, kArrival = 1 };  // step ends first at equal times

struct Event {
  double at_ms;
  EventKind kind;
  uint64_t order;  // tie-break: insertion order, for determinism
  uint64_t index;  // request index or worker index
  bool operator>(const Event& o) const {
    if (at_ms != o.at_ms) return at_ms > o.at_ms;
    if (kind != o.kind) return kind > o.kind;
    return order > o.order;
  }
};

class Simulator {
 public:
  Simulator(std::span<const workload::TraceRequest> trace, const ReplayConfig& config)
      : trace_(trace), config_(config), rng_(config.seed), states_(trace.size()) {
    workers_.resize(static_cast<size_t>(config.num_workers));
    for (size_t w = 0; w < workers_.size(); ++w) {
      workers_[w].core = std::make_unique<MockerCore>(config.worker);
    }
    report_.policy = RoutingPolicyName(config.policy);
    if (config.policy == RoutingPolicy::kKv) {
      if (config.approximate) report_.policy = "kv-approx";
      router::KvRouterConfig rc;
      rc.block_size = config.worker.block_size;
      rc.overlap_weight = config.overlap_weight;
      rc.temperature = config.temperature;
      rc.busy_kv_usage = config.busy_kv_usage;
      rc.approximate = config.approximate;
      rc.seed = config.seed;
      indexer_ = std::make_unique<router::RadixIndexer>();
      active_ = std::make_unique<router::ActiveSequences>(config.worker.block_size);
      kv_ = std::make_unique<router::KvRouter>(rc, *indexer_, *active_);
      if (!config.approximate) {
        for (Worker& w : workers_) w.core->SetKvEventSink(&w.pending);
      }
      candidates_.resize(workers_.size());
      for (size_t w = 0; w < workers_.size(); ++w) candidates_[w].worker = router::WorkerKey{w, 0};
    }
    report_.num_workers = config.num_workers;
    report_.requests = trace.size();
    report_.worker_requests.assign(workers_.size(), 0);
    report_.request_worker.assign(trace.size(), -1);
  }

  ReplayReport Run() {
    const auto wall_start = std::chrono::steady_clock::now();
    for (size_t i = 0; i < trace_.size(); ++i) Push(trace_[i].arrival_ms, EventKind::kArrival, i);
    double first_ms = trace_.empty() ? 0 : trace_.front().arrival_ms;
    for (const auto& r : trace_) first_ms = std::min(first_ms, r.arrival_ms);
    double end_ms = first_ms;
    while (!queue_.empty()) {
      const Event e = queue_.top();
      queue_.pop();
      now_ms_ = e.at_ms;
      if (e.kind == EventKind::kArrival) {
        Arrive(e.index);
      } else {
        EndStep(static_cast<uint32_t>(e.index));
      }
      end_ms = std::max(end_ms, now_ms_);
    }
    report_.simulated_ms = end_ms - first_ms;
    report_.prefix_hit_rate =
        report_.prompt_tokens == 0 ? 0 : static_cast<double>(report_.cached_tokens) / report_.prompt_tokens;
    report_.output_tokens_per_s =
        report_.simulated_ms <= 0 ? 0 : report_.output_tokens / (report_.simulated_ms / 1000.0);
    report_.ttft_ms = Summarize(ttft_);
    report_.itl_ms = Summarize(itl_);
    report_.e2e_ms = Summarize(e2e_);
    uint64_t max_routed = 0, sum_routed = 0;
    for (uint64_t n : report_.worker_requests) {
      max_routed = std::max(max_routed, n);
      sum_routed += n;
    }
    const double mean = workers_.empty() ? 0 : static_cast<double>(sum_routed) / workers_.size();
    report_.load_imbalance = mean > 0 ? max_routed / mean : 0;
    for (const Worker& w : workers_) report_.preemptions += w.core->Metrics().preemptions;
    report_.wall_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall_start).count();
    return std::move(report_);
  }

 private:
  void Push(double at_ms, EventKind kind, uint64_t index) { queue_.push(Event{at_ms, kind, order_++, index}); }

  // Chooses the worker; false when the router rejected the request (all busy).
  bool Route(size_t index, const std::vector<uint32_t>& prompt, uint32_t& worker) {
    const size_t n = workers_.size();
    switch (config_.policy) {
      case RoutingPolicy::kRoundRobin: worker = static_cast<uint32_t>(next_rr_++ % n); return true;
      case RoutingPolicy::kRandom:
        worker = static_cast<uint32_t>(std::uniform_int_distribution<size_t>(0, n - 1)(rng_));
        return true;
      case RoutingPolicy::kLeastLoaded: {
        // Fewest requests in flight; ties to the next in round-robin order so equal load spreads.
        size_t best = next_rr_ % n;
        for (size_t k = 1; k < n; ++k) {
          const size_t w = (next_rr_ + k) % n;
          if (workers_[w].in_flight < workers_[best].in_flight) best = w;
        }
        ++next_rr_;
        worker = static_cast<uint32_t>(best);
        return true;
      }
      case RoutingPolicy::kKv: {
        for (size_t w = 0; w < n; ++w) candidates_[w].kv_usage = workers_[w].kv_usage;
        const router::RequestBlocks blocks = router::HashRequest(prompt, config_.worker.block_size);
        auto decision = kv_->Route(std::to_string(index), blocks, candidates_, VirtualTime(now_ms_));
        if (!decision.ok()) return false;
        worker = static_cast<uint32_t>(decision->worker.worker_id);
        return true;
      }
    }
    return false;
  }

  void Arrive(size_t index) {
    const workload::TraceRequest& tr = trace_[index];
    RequestState& st = states_[index];
    st.arrival_ms = now_ms_;
    std::vector<uint32_t> prompt = workload::SynthesizePrompt(tr, index, config_.synthesis);
    if (prompt.empty()) prompt.push_back(config_.synthesis.first_token);  // the engine needs one token
    uint32_t w = 0;
    if (!Route(index, prompt, w)) {
      ++report_.failed;
      return;
    }
    st.worker = w;
    ++report_.worker_requests[w];
    report_.request_worker[index] = static_cast<int32_t>(w);
    MockerRequest mr;
    mr.id = index;
    mr.prompt = std::move(prompt);
    mr.max_tokens = std::max(tr.output_length, 1);
    mr.seed = config_.seed ^ (index * 0x9e3779b97f4a7c15ULL);
    if (!workers_[w].core->Add(std::move(mr)).ok()) {
      ++report_.failed;
      if (active_) (void)active_->Free(std::to_string(index));
      return;
    }
    ++workers_[w].in_flight;
    if (!workers_[w].stepping) StartStep(w);
  }

  void StartStep(uint32_t w) {
    Worker& worker = workers_[w];
    worker.step = worker.core->Step();
    worker.kv_usage = worker.step.kv_usage;
    for (const auto& [id, status] : worker.step.failed) Finish(w, id, /*failed=*/true);
    if (worker.step.batch_size == 0) {
      // Nothing could run (nothing left, or nothing fits until a request finishes): idle until
      // the next arrival. Events of this call (evictions) are applied now.
      ApplyEvents(w);
      worker.stepping = false;
      return;
    }
    worker.stepping = true;
    Push(now_ms_ + worker.step.duration_ms, EventKind::kStepEnd, w);
  }

  void EndStep(uint32_t w) {
    Worker& worker = workers_[w];
    ApplyEvents(w);
    for (const MockerToken& t : worker.step.tokens) {
      RequestState& st = states_[t.id];
      if (t.first) {
        ttft_.push_back(now_ms_ - st.arrival_ms);
        st.prompt_tokens = t.prompt_tokens;
        st.cached_tokens = t.cached_tokens;
        if (active_) (void)active_->MarkPrefillCompleted(std::to_string(t.id));
      } else if (st.last_token_ms >= 0) {
        itl_.push_back(now_ms_ - st.last_token_ms);
      }
      st.last_token_ms = now_ms_;
      ++report_.output_tokens;
      if (t.finished) Finish(w, t.id, /*failed=*/false);
    }
    worker.stepping = false;
    if (worker.core->has_unfinished()) StartStep(w);
  }

  void Finish(uint32_t w, uint64_t id, bool failed) {
    RequestState& st = states_[id];
    if (st.done) return;
    st.done = true;
    --workers_[w].in_flight;
    if (active_) (void)active_->Free(std::to_string(id));
    if (failed) {
      ++report_.failed;
      return;
    }
    ++report_.completed;
    report_.prompt_tokens += static_cast<uint64_t>(st.prompt_tokens);
    report_.cached_tokens += static_cast<uint64_t>(st.cached_tokens);
    e2e_.push_back(now_ms_ - st.arrival_ms);
  }

  void ApplyEvents(uint32_t w) {
    if (!indexer_) return;
    std::vector<KvEvent>& pending = workers_[w].pending.events;
    for (const KvEvent& e : pending) (void)indexer_->ApplyEvent(ToRouterEvent(w, e));
    report_.kv_events += pending.size();
    pending.clear();
  }

  std::span<const workload::TraceRequest> trace_;
  const ReplayConfig& config_;
  std::mt19937_64 rng_;
  std::vector<Worker> workers_;
  std::vector<RequestState> states_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> queue_;
  uint64_t order_ = 0;
  double now_ms_ = 0;
  size_t next_rr_ = 0;
  std::unique_ptr<router::RadixIndexer> indexer_;
  std::unique_ptr<router::ActiveSequences> active_;
  std::unique_ptr<router::KvRouter> kv_;
  std::vector<router::WorkerCandidate> candidates_;
  std::vector<double> ttft_, itl_, e2e_;
  ReplayReport report_;
};

}  // namespace

Result<RoutingPolicy> ParseRoutingPolicy(const std::string& name) {
  if (name == "kv") return RoutingPolicy::kKv;
  if (name == "round-robin" || name == "round_robin") return RoutingPolicy::kRoundRobin;
  if (name == "random") return RoutingPolicy::kRandom;
  if (name == "least-loaded" || name == "least_loaded") return RoutingPolicy::kLeastLoaded;
  return Status::InvalidArgument("unknown router \"" + name + "\" (kv, round-robin, random, least-loaded)");
}

const char* RoutingPolicyName(RoutingPolicy policy) {
  switch (policy) {
    case RoutingPolicy::kKv: return "kv";
    case RoutingPolicy::kRoundRobin: return "round-robin";
    case RoutingPolicy::kRandom: return "random";
    case RoutingPolicy::kLeastLoaded: return "least-loaded";
  }
  return "?";
}

Status ValidateReplayConfig(const ReplayConfig& config) {
  if (config.num_workers < 1) return Status::InvalidArgument("need at least one worker");
  if (config.temperature < 0) return Status::InvalidArgument("router temperature must be >= 0");
  return ValidateMockerConfig(config.worker);
}

LatencySummary Summarize(std::vector<double>& values) {
  LatencySummary s;
  s.count = values.size();
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / values.size();
  auto rank = [&](double p) {
    size_t k = static_cast<size_t>(std::ceil(p * values.size()));
    return values[std::clamp<size_t>(k, 1, values.size()) - 1];
  };
  s.p50 = rank(0.50);
  s.p90 = rank(0.90);
  s.p99 = rank(0.99);
  s.max = values.back();
  return s;
}

Result<ReplayReport> RunReplay(std::span<const workload::TraceRequest> trace, const ReplayConfig& config) {
  DYN_RETURN_IF_ERROR(ValidateReplayConfig(config));
  Simulator sim(trace, config);
  return sim.Run();
}

}  // namespace dyn::replay
