#include "runtime/remote_engine.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <unordered_set>

#include "base/log.h"
#include "runtime/engine_codec.h"

namespace dyn {

Result<RouterMode> ParseRouterMode(const std::string& name) {
  if (name == "round-robin" || name == "round_robin") return RouterMode::kRoundRobin;
  if (name == "random") return RouterMode::kRandom;
  if (name == "least-loaded" || name == "least_loaded") return RouterMode::kLeastLoaded;
  return Status::InvalidArgument("unknown router mode '" + name + "' (round-robin | random | least-loaded)");
}

const char* RouterModeName(RouterMode mode) {
  switch (mode) {
    case RouterMode::kRoundRobin: return "round-robin";
    case RouterMode::kRandom: return "random";
    case RouterMode::kLeastLoaded: return "least-loaded";
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
};

class RemoteEngineImpl : public RemoteEngine, public std::enable_shared_from_this<RemoteEngineImpl> {
 public:
  RemoteEngineImpl(std::shared_ptr<RequestClient> client, RemoteEngineOptions options)
      : client_(std::move(client)), options_(std::move(options)), rng_(std::random_device{}()) {}

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
  bool Pick(Stream& s, std::string* address) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Instance*> candidates;
    for (Instance& in : instances_)
      if (!s.failed.count(in.id)) candidates.push_back(&in);
    if (candidates.empty())
      for (Instance& in : instances_) candidates.push_back(&in);
    if (candidates.empty()) return false;
    Instance* chosen = nullptr;
    switch (options_.mode) {
      case RouterMode::kRoundRobin: chosen = candidates[next_++ % candidates.size()]; break;
      case RouterMode::kRandom:
        chosen = candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(rng_)];
        break;
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

  void Release(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Instance& in : instances_)
      if (in.id == id && in.in_flight > 0) --in.in_flight;
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
    std::string address;
    if (!Pick(*s, &address)) {
      Fail(s, FinishReason::kError, "Unavailable: no worker is serving this model");
      return;
    }
    ++s->attempts;
    PreprocessedRequest attempt = s->request;
    if (!s->generated.empty()) {
      // Continue where the failed worker stopped: its output so far becomes prompt.
      attempt.token_ids.insert(attempt.token_ids.end(), s->generated.begin(), s->generated.end());
      const int done = static_cast<int>(s->generated.size());
      attempt.stop.max_tokens = std::max(1, s->request.stop.max_tokens - done);
      attempt.stop.min_tokens = std::max(0, s->request.stop.min_tokens - done);
    }
    const uint64_t instance = s->instance;
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
      s->generated.insert(s->generated.end(), o.token_ids.begin(), o.token_ids.end());
      self->generated_tokens_.fetch_add(o.token_ids.size());
      if (o.finish_reason) {
        self->Finish(s, std::move(o));
      } else if (!o.token_ids.empty() || !o.logprobs.empty()) {
        s->sink(std::move(o));
      }
    };
    cb.on_end = [self, s, instance](const Status& status) {
      self->Release(instance);
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
  std::mt19937_64 rng_;
  std::atomic<int> running_{0};
  std::atomic<uint64_t> prompt_tokens_{0}, generated_tokens_{0}, migrations_{0};
};

}  // namespace

std::shared_ptr<RemoteEngine> RemoteEngine::Create(std::shared_ptr<RequestClient> client, RemoteEngineOptions options) {
  return std::make_shared<RemoteEngineImpl>(std::move(client), std::move(options));
}

}  // namespace dyn
