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

// The decode pool (aggregated workers when there is no prefill pool) and the prefill pool.
enum PoolKind { kDecodePool = 0, kPrefillPool = 1 };

struct Worker {
  std::unique_ptr<MockerCore> core;
  PendingEvents pending;
  PoolKind pool = kDecodePool;
  uint32_t local = 0;     // index within its pool: the router's worker id
  bool stepping = false;  // a step is in flight (its end is queued)
  MockerStepResult step;  // the step in flight
  double kv_usage = 0;    // after its last step
  int in_flight = 0;      // requests routed here and not finished (least-loaded)
};

// Routing state of one pool.
struct Pool {
  std::vector<uint32_t> workers;  // global worker indices, by local index
  std::unique_ptr<router::RadixIndexer> indexer;
  std::unique_ptr<router::ActiveSequences> active;
  std::unique_ptr<router::KvRouter> kv;
  std::vector<router::WorkerCandidate> candidates;
  size_t next_rr = 0;
};

enum class Stage { kLocal, kPrefill, kDecode };  // aggregated, on the prefill pool, imported

struct RequestState {
  double arrival_ms = 0;
  double first_token_ms = -1;
  double last_token_ms = -1;
  int prompt_tokens = 0;
  int cached_tokens = 0;
  int output_tokens = 0;
  bool done = false;
  Stage stage = Stage::kLocal;
  uint32_t worker = 0;          // where it runs now
  uint32_t prefill_worker = 0;  // kDecode: the lease's holder
  uint64_t lease_id = 0;
  std::vector<float> gaps;      // ITL of this request (goodput with itl_target_p99)
};

enum class EventKind { kStepEnd = 0, kTransferEnd = 1, kArrival = 2 };  // in this order at equal times

struct Event {
  double at_ms;
  EventKind kind;
  uint64_t order;  // tie-break: insertion order, for determinism
  uint64_t index;  // request index (arrival, transfer end) or worker index (step end)
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
    disagg_ = config.num_prefill_workers > 0;
    const int total = config.num_workers + config.num_prefill_workers;
    workers_.resize(static_cast<size_t>(total));
    for (size_t w = 0; w < workers_.size(); ++w) {
      Worker& worker = workers_[w];
      worker.core = std::make_unique<MockerCore>(config.worker);
      worker.pool = static_cast<int>(w) < config.num_workers ? kDecodePool : kPrefillPool;
      Pool& pool = pools_[worker.pool];
      worker.local = static_cast<uint32_t>(pool.workers.size());
      pool.workers.push_back(static_cast<uint32_t>(w));
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
      for (Pool& pool : pools_) {
        pool.indexer = std::make_unique<router::RadixIndexer>();
        pool.active = std::make_unique<router::ActiveSequences>(config.worker.block_size);
        pool.kv = std::make_unique<router::KvRouter>(rc, *pool.indexer, *pool.active);
        pool.candidates.resize(pool.workers.size());
        for (size_t l = 0; l < pool.workers.size(); ++l) pool.candidates[l].worker = router::WorkerKey{l, 0};
      }
      if (!config.approximate) {
        for (Worker& w : workers_) w.core->SetKvEventSink(&w.pending);
      }
    }
    if (disagg_) {
      // Appended piece by piece: g++ 12 warns falsely (-Wrestrict) on operator+ chains here.
      report_.policy += ' ';
      report_.policy += std::to_string(config.num_prefill_workers);
      report_.policy += "P+";
      report_.policy += std::to_string(config.num_workers);
      report_.policy += 'D';
    }
    report_.num_workers = config.num_workers;
    report_.num_prefill_workers = config.num_prefill_workers;
    report_.requests = trace.size();
    report_.worker_requests.assign(workers_.size(), 0);
    report_.request_worker.assign(trace.size(), -1);
    report_.ttft_target_ms = config.ttft_target_ms;
    report_.itl_target_ms = config.itl_target_ms;
    report_.itl_target_p99 = config.itl_target_p99;
  }

  ReplayReport Run() {
    const auto wall_start = std::chrono::steady_clock::now();
    for (size_t i = 0; i < trace_.size(); ++i) Push(trace_[i].arrival_ms, EventKind::kArrival, i);
    double first_ms = trace_.empty() ? 0 : trace_.front().arrival_ms;
    double last_arrival_ms = first_ms;
    for (const auto& r : trace_) {
      first_ms = std::min(first_ms, r.arrival_ms);
      last_arrival_ms = std::max(last_arrival_ms, r.arrival_ms);
    }
    double end_ms = first_ms;
    while (!queue_.empty()) {
      const Event e = queue_.top();
      queue_.pop();
      now_ms_ = e.at_ms;
      switch (e.kind) {
        case EventKind::kArrival: Arrive(e.index); break;
        case EventKind::kStepEnd: EndStep(static_cast<uint32_t>(e.index)); break;
        case EventKind::kTransferEnd: EndTransfer(e.index); break;
      }
      end_ms = std::max(end_ms, now_ms_);
    }
    report_.simulated_ms = end_ms - first_ms;
    const double seconds = report_.simulated_ms / 1000.0;
    report_.prefix_hit_rate =
        report_.prompt_tokens == 0 ? 0 : static_cast<double>(report_.cached_tokens) / report_.prompt_tokens;
    report_.output_tokens_per_s = seconds <= 0 ? 0 : report_.output_tokens / seconds;
    report_.goodput_rps = seconds <= 0 ? 0 : report_.good_requests / seconds;
    report_.goodput_tokens_per_s = seconds <= 0 ? 0 : good_tokens_ / seconds;
    report_.request_rate =
        last_arrival_ms > first_ms ? (trace_.size() - 1) / ((last_arrival_ms - first_ms) / 1000.0) : 0;
    report_.ttft_ms = Summarize(ttft_);
    report_.itl_ms = Summarize(itl_);
    report_.e2e_ms = Summarize(e2e_);
    report_.kv_transfer_ms = Summarize(transfer_ms_);
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

  std::vector<uint32_t> PromptOf(size_t index) const {
    std::vector<uint32_t> prompt = workload::SynthesizePrompt(trace_[index], index, config_.synthesis);
    if (prompt.empty()) prompt.push_back(config_.synthesis.first_token);  // the engine needs one token
    return prompt;
  }

  // Chooses a worker of `kind` (a global index); false when the router rejected the request.
  bool Route(PoolKind kind, size_t index, const std::vector<uint32_t>& prompt, uint32_t& worker) {
    Pool& pool = pools_[kind];
    const size_t n = pool.workers.size();
    size_t local = 0;
    switch (config_.policy) {
      case RoutingPolicy::kRoundRobin: local = pool.next_rr++ % n; break;
      case RoutingPolicy::kRandom: local = std::uniform_int_distribution<size_t>(0, n - 1)(rng_); break;
      case RoutingPolicy::kLeastLoaded: {
        // Fewest requests in flight; ties to the next in round-robin order so equal load spreads.
        local = pool.next_rr % n;
        for (size_t k = 1; k < n; ++k) {
          const size_t l = (pool.next_rr + k) % n;
          if (workers_[pool.workers[l]].in_flight < workers_[pool.workers[local]].in_flight) local = l;
        }
        ++pool.next_rr;
        break;
      }
      case RoutingPolicy::kKv: {
        for (size_t l = 0; l < n; ++l) pool.candidates[l].kv_usage = workers_[pool.workers[l]].kv_usage;
        const router::RequestBlocks blocks = router::HashRequest(prompt, config_.worker.block_size);
        auto decision = pool.kv->Route(std::to_string(index), blocks, pool.candidates, VirtualTime(now_ms_));
        if (!decision.ok()) return false;
        local = static_cast<size_t>(decision->worker.worker_id);
        break;
      }
    }
    worker = pool.workers[local];
    ++report_.worker_requests[worker];
    ++workers_[worker].in_flight;
    return true;
  }

  // The router's bookkeeping when a worker is done with a request (finished, failed, handed off).
  void Leave(uint32_t w, size_t index) {
    --workers_[w].in_flight;
    if (auto& active = pools_[workers_[w].pool].active) (void)active->Free(std::to_string(index));
  }

  // Prompt tokens the best decode worker holds, as the frontend's kv router sees them.
  int DecodeCachedPrefix(const std::vector<uint32_t>& prompt) const {
    const Pool& pool = pools_[kDecodePool];
    if (!pool.indexer) return 0;
    const router::RequestBlocks blocks = router::HashRequest(prompt, config_.worker.block_size);
    uint32_t best = 0;
    for (const router::WorkerMatch& m : pool.indexer->FindMatches(blocks.sequence)) best = std::max(best, m.depth);
    return static_cast<int>(std::min<size_t>(prompt.size(), static_cast<size_t>(best) * config_.worker.block_size));
  }

  bool AddTo(uint32_t w, MockerRequest request) {
    if (!workers_[w].core->Add(std::move(request)).ok()) return false;
    if (!workers_[w].stepping) StartStep(w);
    return true;
  }

  MockerRequest MakeRequest(size_t index, std::vector<uint32_t> prompt, RequestPhase phase) const {
    MockerRequest mr;
    mr.id = index;
    mr.prompt = std::move(prompt);
    mr.max_tokens = std::max(trace_[index].output_length, 1);
    mr.seed = config_.seed ^ (index * 0x9e3779b97f4a7c15ULL);
    mr.phase = phase;
    return mr;
  }

  void Arrive(size_t index) {
    RequestState& st = states_[index];
    st.arrival_ms = now_ms_;
    std::vector<uint32_t> prompt = PromptOf(index);
    const int uncached = static_cast<int>(prompt.size()) - (disagg_ ? DecodeCachedPrefix(prompt) : 0);
    const bool remote = disagg_ && uncached > config_.max_local_prefill_tokens;
    st.stage = remote ? Stage::kPrefill : Stage::kLocal;
    if (disagg_) ++(remote ? report_.remote_prefills : report_.local_prefills);
    uint32_t w = 0;
    if (!Route(remote ? kPrefillPool : kDecodePool, index, prompt, w)) {
      ++report_.failed;
      return;
    }
    st.worker = w;
    report_.request_worker[index] = static_cast<int32_t>(w);
    if (!AddTo(w, MakeRequest(index, std::move(prompt), remote ? RequestPhase::kPrefillOnly : RequestPhase::kFull))) {
      Finish(w, index, /*failed=*/true);
    }
  }

  // A prefill worker handed the request off (first token out, blocks under `lease_id`): route it
  // over the decode pool and import it there.
  void HandOff(uint32_t prefill_worker, size_t index, const MockerToken& first) {
    RequestState& st = states_[index];
    Leave(prefill_worker, index);
    st.stage = Stage::kDecode;
    st.prefill_worker = prefill_worker;
    st.lease_id = first.lease_id;
    std::vector<uint32_t> prompt = PromptOf(index);
    uint32_t w = 0;
    if (!Route(kDecodePool, index, prompt, w)) {
      ReleaseLease(index);
      st.done = true;
      ++report_.failed;
      return;
    }
    st.worker = w;
    report_.request_worker[index] = static_cast<int32_t>(w);
    MockerRequest mr = MakeRequest(index, std::move(prompt), RequestPhase::kDecodeImported);
    mr.first_token = first.token;
    if (!AddTo(w, std::move(mr))) {
      ReleaseLease(index);
      Finish(w, index, /*failed=*/true);
    }
  }

  void ReleaseLease(size_t index) {
    RequestState& st = states_[index];
    if (st.lease_id == 0) return;
    const uint32_t pw = st.prefill_worker;
    workers_[pw].core->ReleaseLease(st.lease_id);
    st.lease_id = 0;
    // Freed blocks may let a waiting request in.
    if (!workers_[pw].stepping && workers_[pw].core->has_unfinished()) StartStep(pw);
  }

  void EndTransfer(size_t index) {
    const uint32_t w = states_[index].worker;
    if (workers_[w].core->CompleteImport(index, /*ok=*/true)) ReleaseLease(index);
    if (!workers_[w].stepping) StartStep(w);
  }

  void StartStep(uint32_t w) {
    Worker& worker = workers_[w];
    worker.step = worker.core->Step();
    worker.kv_usage = worker.step.kv_usage;
    for (const auto& [id, status] : worker.step.failed) {
      ReleaseLease(id);
      Finish(w, id, /*failed=*/true);
    }
    for (const MockerImport& im : worker.step.imports) {
      ++report_.kv_transfers;
      report_.kv_transfer_bytes += static_cast<uint64_t>(im.transfer_bytes);
      transfer_ms_.push_back(im.transfer_ms);
      Push(now_ms_ + im.transfer_ms, EventKind::kTransferEnd, im.id);
    }
    if (worker.step.batch_size == 0) {
      // Nothing could run (nothing left, imports in transfer, or nothing fits until a request
      // finishes): idle until the next arrival or transfer end. Events of this call (evictions)
      // are applied now.
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
    Pool& pool = pools_[worker.pool];
    for (const MockerToken& t : worker.step.tokens) {
      RequestState& st = states_[t.id];
      if (t.first) {
        if (pool.active) (void)pool.active->MarkPrefillCompleted(std::to_string(t.id));
        if (st.stage != Stage::kDecode) {
          ttft_.push_back(now_ms_ - st.arrival_ms);
          st.first_token_ms = now_ms_;
          st.prompt_tokens = t.prompt_tokens;
          st.cached_tokens = t.cached_tokens;  // the prompt's computing worker's hits
        }
      }
      if (st.last_token_ms >= 0) {
        itl_.push_back(now_ms_ - st.last_token_ms);
        if (config_.itl_target_p99) st.gaps.push_back(static_cast<float>(now_ms_ - st.last_token_ms));
      }
      st.last_token_ms = now_ms_;
      ++st.output_tokens;
      ++report_.output_tokens;
      if (t.lease_id != 0) {
        HandOff(w, t.id, t);
      } else if (t.finished) {
        Finish(w, t.id, /*failed=*/false);
      }
    }
    worker.stepping = false;
    if (worker.core->has_unfinished()) StartStep(w);
  }

  void Finish(uint32_t w, uint64_t id, bool failed) {
    RequestState& st = states_[id];
    if (st.done) return;
    st.done = true;
    Leave(w, id);
    if (failed) {
      ++report_.failed;
      return;
    }
    ++report_.completed;
    report_.prompt_tokens += static_cast<uint64_t>(st.prompt_tokens);
    report_.cached_tokens += static_cast<uint64_t>(st.cached_tokens);
    e2e_.push_back(now_ms_ - st.arrival_ms);
    if (MeetsTargets(st)) {
      ++report_.good_requests;
      good_tokens_ += static_cast<uint64_t>(st.output_tokens);
    }
    st.gaps = {};
  }

  bool MeetsTargets(RequestState& st) const {
    if (config_.ttft_target_ms > 0 && st.first_token_ms - st.arrival_ms > config_.ttft_target_ms) return false;
    if (config_.itl_target_ms <= 0 || st.output_tokens < 2) return true;
    double itl = (st.last_token_ms - st.first_token_ms) / (st.output_tokens - 1);
    if (config_.itl_target_p99) {
      std::vector<double> gaps(st.gaps.begin(), st.gaps.end());
      itl = Summarize(gaps).p99;
    }
    return itl <= config_.itl_target_ms;
  }

  void ApplyEvents(uint32_t w) {
    Worker& worker = workers_[w];
    router::RadixIndexer* indexer = pools_[worker.pool].indexer.get();
    if (!indexer) return;
    std::vector<KvEvent>& pending = worker.pending.events;
    for (const KvEvent& e : pending) (void)indexer->ApplyEvent(ToRouterEvent(worker.local, e));
    report_.kv_events += pending.size();
    pending.clear();
  }

  std::span<const workload::TraceRequest> trace_;
  const ReplayConfig& config_;
  bool disagg_ = false;
  std::mt19937_64 rng_;
  std::vector<Worker> workers_;
  Pool pools_[2];
  std::vector<RequestState> states_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> queue_;
  uint64_t order_ = 0;
  double now_ms_ = 0;
  std::vector<double> ttft_, itl_, e2e_, transfer_ms_;
  uint64_t good_tokens_ = 0;
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
  if (config.num_workers < 1) return Status::InvalidArgument("need at least one (decode) worker");
  if (config.num_prefill_workers < 0) return Status::InvalidArgument("prefill workers must be >= 0");
  if (config.max_local_prefill_tokens < 0) return Status::InvalidArgument("max_local_prefill_tokens must be >= 0");
  if (config.ttft_target_ms < 0 || config.itl_target_ms < 0)
    return Status::InvalidArgument("goodput targets must be >= 0 (0: none)");
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
