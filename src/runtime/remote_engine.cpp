#include "runtime/remote_engine.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <unordered_set>

#include "base/log.h"
#include "router/kv_router.h"
#include "runtime/engine_codec.h"

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
      rc.seed = std::random_device{}();
      indexer_ = std::make_unique<router::RadixIndexer>();
      active_ = std::make_unique<router::ActiveSequences>(options_.kv_block_size);
      kv_ = std::make_unique<router::KvRouter>(rc, *indexer_, *active_);
    }
  }

  void AddInstance(uint64_t id, const std::string& address) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (Instance& in : instances_) {
      if (in.id == id) {
        in.address = address;
        return;
      }
    }
    instances_.push_back({id, address, 0, 0, 0});
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

  void ReportLoad(uint64_t id, int load) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (Instance& in : instances_)
      if (in.id == id) in.reported_load = load;
  }

  bool ApplyKvEvent(const router::RouterEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!kv_) return true;
    bool known = false;
    for (const Instance& in : instances_) known = known || in.id == event.worker.worker_id;
    if (!known) return true;
    const router::ApplyResult r = indexer_->ApplyEvent(event);
    if (r.needs_resync()) {
      DYN_LOG(WARN) << "kv events of worker " << event.worker.worker_id << ": " << r.message;
      return false;
    }
    return true;
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
      for (Instance* in : candidates) workers.push_back({router::WorkerKey{in->id, 0}, 0.0});
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
    const int done = static_cast<int>(s->generated.size());
    if (done > 0) {
      // Continue where the failed worker stopped: its output so far becomes prompt.
      attempt.token_ids.insert(attempt.token_ids.end(), s->generated.begin(), s->generated.end());
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
    cb.on_data = [self, s](std::string_view payload) {
      if (s->finished) return;
      auto out = DecodeOutput(payload);
      if (!out.ok()) {
        self->Fail(s, FinishReason::kError, "Internal: bad response from worker: " + out.status().message());
        return;
      }
      EngineOutput o = std::move(*out);
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
  std::atomic<int> running_{0};
  std::atomic<uint64_t> prompt_tokens_{0}, generated_tokens_{0}, migrations_{0};
};

}  // namespace

std::shared_ptr<RemoteEngine> RemoteEngine::Create(std::shared_ptr<RequestClient> client, RemoteEngineOptions options) {
  return std::make_shared<RemoteEngineImpl>(std::move(client), std::move(options));
}

}  // namespace dyn
