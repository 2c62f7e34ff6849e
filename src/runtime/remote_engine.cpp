#include "runtime/remote_engine.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <unordered_set>

#include "base/log.h"
#include "router/kv_router.h"
#include "runtime/engine_codec.h"
#include "runtime/kv_event_codec.h"

namespace dyn {

Result<RouterMode> ParseRouterMode(const std::string& name) {
  if (name == "round-robin" || name == "round_robin") return RouterMode::kRoundRobin;
  if (name == "random") return RouterMode::kRandom;
  if (name == "least-loaded" || name == "least_loaded") return RouterMode::kLeastLoaded;
  if (name == "kv") return RouterMode::kKv;
  return Status::InvalidArgument("unknown router mode '" + name + "' (round-robin | random | least-loaded | kv)");
}

const char* RouterModeName(RouterMode mode) {
  switch (mode) {
    case RouterMode::kRoundRobin: return "round-robin";
    case RouterMode::kRandom: return "random";
    case RouterMode::kLeastLoaded: return "least-loaded";
    case RouterMode::kKv: return "kv";
  }
  return "?";
}

namespace {

struct Instance {
  uint64_t id = 0;
  std::string address;
  int in_flight = 0;
  int reported_load = 0;
  uint64_t routed = 0;
  double kv_usage = 0.0;
  // kv events: a dump is being fetched; events that arrive meanwhile wait here.
  bool dump_pending = false;
  std::vector<router::RouterEvent> held_events;
  int Load() const { return std::max(in_flight, reported_load); }
};

class RemoteEngineImpl;

// One client request across its attempts (one per worker it was sent to).
struct Stream {
  PreprocessedRequest request;  // as the client sent it
  std::shared_ptr<RequestContext> context;
  OutputSink sink;
  std::vector<uint32_t> generated;
  std::unordered_set<uint64_t> failed;  // instances that failed this request
  int attempts = 0;
  bool first_delta_sent = false;
  bool finished = false;
  uint64_t instance = 0;  // of the current attempt
  std::string route_id;   // kv mode: the attempt's entry in ActiveSequences ("" when none)
  bool prefill_marked = false;
};

class RemoteEngineImpl : public RemoteEngine, public std::enable_shared_from_this<RemoteEngineImpl> {
 public:
  RemoteEngineImpl(std::shared_ptr<RequestClient> client, RemoteEngineOptions options)
      : client_(std::move(client)), options_(std::move(options)), rng_(std::random_device{}()) {
    if (options_.mode == RouterMode::kKv) {
      options_.kv_block_size = std::max(1, options_.kv_block_size);
      router::KvRouterConfig rc;
      rc.block_size = options_.kv_block_size;
      rc.overlap_weight = options_.overlap_weight;
      rc.temperature = options_.temperature;
      rc.approximate = !options_.use_kv_events;
      rc.busy_kv_usage = options_.busy_kv_usage;
      rc.busy_prefill_tokens = options_.busy_prefill_tokens;
      rc.seed = std::random_device{}();
      indexer_ = std::make_unique<router::RadixIndexer>();
      active_ = std::make_unique<router::ActiveSequences>(options_.kv_block_size);
      kv_ = std::make_unique<router::KvRouter>(rc, *indexer_, *active_);
    }
  }

  void AddInstance(uint64_t id, const std::string& address) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (Instance& in : instances_) {
        if (in.id == id) {
          in.address = address;
          return;
        }
      }
      Instance in;
      in.id = id;
      in.address = address;
      instances_.push_back(std::move(in));
    }
    if (kv_ && options_.use_kv_events) RequestDump(id);
  }

  void RemoveInstance(uint64_t id) override {
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = std::find_if(instances_.begin(), instances_.end(), [&](const Instance& in) { return in.id == id; });
      if (it == instances_.end()) return;
      address = it->address;
      instances_.erase(it);
      if (kv_) {
        indexer_->RemoveWorker(router::WorkerKey{id, 0});
        active_->RemoveWorker(router::WorkerKey{id, 0});
      }
    }
    // Calls still on it end with Unavailable and migrate (the address may be reused by a new
    // instance later; it then gets a fresh connection).
    client_->Disconnect(address);
  }

  void ReportLoad(uint64_t id, int load, double kv_usage) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (Instance& in : instances_) {
      if (in.id == id) {
        in.reported_load = load;
        in.kv_usage = kv_usage;
      }
    }
  }

  bool ApplyKvEvent(const router::RouterEvent& event) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!kv_) return true;
      Instance* in = FindLocked(event.worker.worker_id);
      if (in == nullptr) return true;
      if (in->dump_pending) {
        in->held_events.push_back(event);
        return true;
      }
      const router::ApplyResult r = indexer_->ApplyEvent(event);
      if (!r.needs_resync()) return true;
      DYN_LOG(WARN) << "kv events of worker " << event.worker.worker_id << ": " << r.message << "; fetching its dump";
    }
    RequestDump(event.worker.worker_id);
    return false;
  }

  int CachedPrefixTokens(const std::vector<uint32_t>& tokens) const override {
    if (!kv_ || tokens.empty()) return 0;
    const router::RequestBlocks blocks = router::HashRequest(tokens, options_.kv_block_size);
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t best = 0;
    for (const router::WorkerMatch& m : indexer_->FindMatches(blocks.sequence))
      if (FindConstLocked(m.worker.worker_id) != nullptr) best = std::max(best, m.depth);
    return static_cast<int>(std::min<size_t>(tokens.size(), static_cast<size_t>(best) * options_.kv_block_size));
  }

  size_t num_instances() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return instances_.size();
  }

  std::vector<InstanceStats> Instances() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<InstanceStats> out;
    for (const Instance& in : instances_) out.push_back({in.id, in.address, in.in_flight, in.reported_load, in.routed});
    return out;
  }

  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    auto s = std::make_shared<Stream>();
    s->request = std::move(request);
    s->context = std::move(context);
    s->sink = std::move(sink);
    running_.fetch_add(1);
    prompt_tokens_.fetch_add(s->request.token_ids.size());
    Send(s);
  }

  EngineMetrics Metrics() const override {
    EngineMetrics m;
    if (kv_) {
      std::lock_guard<std::mutex> lock(mu_);
      m.router_decisions = kv_->stats().decisions;
      m.router_rejections = kv_->stats().rejections;
      m.kv_events_applied = indexer_->stats().events_applied;
      m.kv_events_dropped = indexer_->stats().dropped_unknown_parent;
      m.kv_event_gaps = indexer_->stats().gaps;
      m.kv_dumps_applied = dumps_applied_;
    }
    m.running = running_.load();
    m.prompt_tokens = prompt_tokens_.load();
    m.generated_tokens = generated_tokens_.load();
    m.migrations = migrations_.load();
    return m;
  }

  void Shutdown() override {}

 private:
  // Picks an instance for `s`, preferring ones that have not failed it. False: none.
  bool Pick(Stream& s, const std::vector<uint32_t>& attempt_tokens, std::string* address) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Instance*> candidates;
    for (Instance& in : instances_)
      if (!s.failed.count(in.id)) candidates.push_back(&in);
    if (candidates.empty())
      for (Instance& in : instances_) candidates.push_back(&in);
    if (candidates.empty()) return false;
    Instance* chosen = nullptr;
    if (kv_) {
      std::vector<router::WorkerCandidate> workers;
      for (Instance* in : candidates) workers.push_back({router::WorkerKey{in->id, 0}, in->kv_usage});
      const std::vector<uint32_t>& tokens = attempt_tokens;
      const router::RequestBlocks blocks = router::HashRequest(tokens, options_.kv_block_size);
      const std::string route_id = s.context->id() + "#" + std::to_string(++route_seq_);
      auto decision = kv_->Route(route_id, blocks, workers, router::RouterClock::now());
      if (!decision.ok()) return false;
      s.route_id = route_id;
      for (Instance* in : candidates)
        if (in->id == decision->worker.worker_id) chosen = in;
      if (chosen == nullptr) return false;
      ++chosen->in_flight;
      ++chosen->routed;
      s.instance = chosen->id;
      *address = chosen->address;
      return true;
    }
    switch (options_.mode) {
      case RouterMode::kRoundRobin: chosen = candidates[next_++ % candidates.size()]; break;
      case RouterMode::kRandom:
        chosen = candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(rng_)];
        break;
      case RouterMode::kKv:
      case RouterMode::kLeastLoaded:
        chosen = *std::min_element(candidates.begin(), candidates.end(), [](const Instance* a, const Instance* b) {
          return a->Load() != b->Load() ? a->Load() < b->Load() : a->routed < b->routed;
        });
        break;
    }
    ++chosen->in_flight;
    ++chosen->routed;
    s.instance = chosen->id;
    *address = chosen->address;
    return true;
  }

  Instance* FindLocked(uint64_t id) {
    for (Instance& in : instances_)
      if (in.id == id) return &in;
    return nullptr;
  }
  const Instance* FindConstLocked(uint64_t id) const {
    for (const Instance& in : instances_)
      if (in.id == id) return &in;
    return nullptr;
  }

  // Fetches the instance's KV dump and resynchronises its part of the index (at most one fetch in
  // flight per instance; the instance's events are held meanwhile).
  void RequestDump(uint64_t id) {
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Instance* in = FindLocked(id);
      if (in == nullptr || in->dump_pending) return;
      in->dump_pending = true;
      address = in->address;
    }
    auto self = shared_from_this();
    auto payload = std::make_shared<std::string>();
    auto context = std::make_shared<RequestContext>("kv_dump-" + std::to_string(id));
    CallCallbacks cb;
    cb.on_data = [payload](std::string_view data) { payload->append(data); };
    cb.on_end = [self, id, payload](const Status& status) { self->ApplyDump(id, status, *payload); };
    client_->Call(address, "kv_dump", "", context, std::move(cb));
  }

  void ApplyDump(uint64_t id, const Status& status, const std::string& payload) {
    std::lock_guard<std::mutex> lock(mu_);
    Instance* in = FindLocked(id);
    if (in == nullptr) return;  // gone meanwhile (RemoveInstance dropped its index)
    in->dump_pending = false;
    std::vector<router::RouterEvent> held;
    held.swap(in->held_events);
    const router::WorkerKey key{id, 0};
    Result<KvDump> dump = status.ok() ? DecodeKvDump(payload) : Result<KvDump>(status);
    if (dump.ok() && dump->worker_id != id) dump = Status::InvalidArgument("dump of another worker");
    if (!dump.ok()) {
      // Keep what we have; the next gap asks again.
      DYN_LOG(WARN) << "kv dump of worker " << id << " failed: " << dump.status().ToString();
      for (const auto& e : held) (void)indexer_->ApplyEvent(e);
      return;
    }
    router::RouterEvent clear;
    clear.worker = key;
    clear.data = router::ClearedData{};
    (void)indexer_->ApplyEvent(clear);
    for (const auto& e : dump->events) (void)indexer_->ApplyEvent(e);
    indexer_->SetLastEventId(key, dump->last_event_id);
    ++dumps_applied_;
    // Held events up to last_event_id are in the dump (ignored as duplicates); later ones apply.
    for (const auto& e : held) (void)indexer_->ApplyEvent(e);
    DYN_LOG(INFO) << "kv index of worker " << id << " resynchronised from its dump: " << dump->events.size()
                  << " blocks, up to event " << dump->last_event_id;
  }

  void Release(uint64_t id, const std::string& route_id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kv_ && !route_id.empty()) (void)active_->Free(route_id);
    for (Instance& in : instances_)
      if (in.id == id && in.in_flight > 0) --in.in_flight;
  }

  bool instances_empty() {
    std::lock_guard<std::mutex> lock(mu_);
    return instances_.empty();
  }

  void MarkPrefilled(const std::string& route_id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kv_) (void)active_->MarkPrefillCompleted(route_id);
  }

  void Finish(const std::shared_ptr<Stream>& s, EngineOutput out) {
    if (s->finished) return;
    s->finished = true;
    running_.fetch_sub(1);
    s->sink(std::move(out));
  }

  void Fail(const std::shared_ptr<Stream>& s, FinishReason reason, std::string error) {
    EngineOutput out;
    out.finish_reason = reason;
    out.error = std::move(error);
    if (!s->first_delta_sent) out.prompt_tokens = static_cast<uint32_t>(s->request.token_ids.size());
    Finish(s, std::move(out));
  }

  void Send(const std::shared_ptr<Stream>& s) {
    if (s->context->cancelled()) {
      Fail(s, FinishReason::kCancelled, "");
      return;
    }
    PreprocessedRequest attempt = s->request;
    // Output the client already has, which the next worker must take as prompt.
    std::vector<uint32_t> carried;
    if (s->attempts > 0 && attempt.phase == RequestPhase::kDecodeImported) {
      // The KV import cannot be retried (the prefill worker's lease may be gone): the new worker
      // prefills the prompt and the prefill worker's first token itself.
      attempt.phase = RequestPhase::kFull;
      attempt.kv_transfer.clear();
      carried.push_back(attempt.first_token);
      attempt.first_token = 0;
    }
    carried.insert(carried.end(), s->generated.begin(), s->generated.end());
    const int done = static_cast<int>(carried.size());
    if (done > 0) {
      // Continue where the failed worker stopped: its output so far becomes prompt.
      attempt.token_ids.insert(attempt.token_ids.end(), carried.begin(), carried.end());
      attempt.stop.max_tokens = std::max(1, s->request.stop.max_tokens - done);
      attempt.stop.min_tokens = std::max(0, s->request.stop.min_tokens - done);
    }
    std::string address;
    if (!Pick(*s, attempt.token_ids, &address)) {
      Fail(s, FinishReason::kError,
           kv_ && !instances_empty() ? "Unavailable: all workers are busy" : "Unavailable: no worker is serving this model");
      return;
    }
    ++s->attempts;
    s->prefill_marked = false;
    const uint64_t instance = s->instance;
    const std::string route_id = s->route_id;
    auto self = shared_from_this();
    CallCallbacks cb;
    cb.on_data = [self, s, instance](std::string_view payload) {
      if (s->finished) return;
      auto out = DecodeOutput(payload);
      if (!out.ok()) {
        self->Fail(s, FinishReason::kError, "Internal: bad response from worker: " + out.status().message());
        return;
      }
      EngineOutput o = std::move(*out);
      o.worker_id = instance;
      if (s->first_delta_sent) {
        o.prompt_tokens = 0;
        o.cached_tokens = 0;
      } else {
        o.prompt_tokens = static_cast<uint32_t>(s->request.token_ids.size());
        o.cached_tokens = std::min(o.cached_tokens, o.prompt_tokens);
        s->first_delta_sent = true;
      }
      if (!s->route_id.empty() && !s->prefill_marked) {
        s->prefill_marked = true;
        self->MarkPrefilled(s->route_id);
      }
      s->generated.insert(s->generated.end(), o.token_ids.begin(), o.token_ids.end());
      self->generated_tokens_.fetch_add(o.token_ids.size());
      if (o.finish_reason) {
        self->Finish(s, std::move(o));
      } else if (!o.token_ids.empty() || !o.logprobs.empty()) {
        s->sink(std::move(o));
      }
    };
    cb.on_end = [self, s, instance, route_id](const Status& status) {
      self->Release(instance, route_id);
      if (s->finished) return;
      if (status.code() == StatusCode::kCancelled || s->context->cancelled()) {
        self->Fail(s, FinishReason::kCancelled, "");
        return;
      }
      if (status.ok()) {
        self->Fail(s, FinishReason::kError, "Internal: worker ended the stream without a final delta");
        return;
      }
      // Unavailable: the worker died, was cut off or is draining. Send the request (with what it
      // produced so far) to another instance, at most migration_limit times.
      if (status.code() == StatusCode::kUnavailable && s->attempts <= self->options_.migration_limit) {
        s->failed.insert(instance);
        self->migrations_.fetch_add(1);
        DYN_LOG(WARN) << "request " << s->context->id() << ": worker " << instance << " failed ("
                         << status.message() << "); migrating after " << s->generated.size() << " tokens";
        self->Send(s);
        return;
      }
      self->Fail(s, FinishReason::kError, status.ToString());
    };
    client_->Call(address, options_.endpoint, EncodeRequest(attempt), s->context, std::move(cb));
  }

  std::shared_ptr<RequestClient> client_;
  RemoteEngineOptions options_;
  mutable std::mutex mu_;
  std::vector<Instance> instances_;
  size_t next_ = 0;
  uint64_t route_seq_ = 0;
  std::mt19937_64 rng_;
  // kv mode (under mu_).
  std::unique_ptr<router::RadixIndexer> indexer_;
  std::unique_ptr<router::ActiveSequences> active_;
  std::unique_ptr<router::KvRouter> kv_;
  uint64_t dumps_applied_ = 0;  // under mu_
  std::atomic<int> running_{0};
  std::atomic<uint64_t> prompt_tokens_{0}, generated_tokens_{0}, migrations_{0};
};

}  // namespace

std::shared_ptr<RemoteEngine> RemoteEngine::Create(std::shared_ptr<RequestClient> client, RemoteEngineOptions options) {
  return std::make_shared<RemoteEngineImpl>(std::move(client), std::move(options));
}

}  // namespace dyn
