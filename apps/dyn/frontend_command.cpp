// dyn frontend: the OpenAI HTTP API for every model whose workers are registered in discovery.
//
// It watches dyn/instances/<namespace>/: the first instance of a model builds its pipeline
// (tokenizer and chat template read from the card's source, two RemoteEngines that route and
// migrate, the prefill pool and the decode pool, joined by a DisaggRouter); later instances join
// it. Instances whose card has role "prefill" join the prefill pool, the others ("both",
// "decode") the decode pool. The model is in /v1/models while it has at least one decode or
// aggregated instance (prefill workers alone cannot finish a request: such a model stays out,
// and clients get "model not found"); without prefill instances every request is served
// aggregated by the decode pool.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include <boost/json.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <set>

#include "apps/dyn/command_util.h"
#include "apps/dyn/commands.h"
#include "apps/dyn/router_flags.h"
#include "apps/dyn/serving_model.h"
#include "base/flags.h"
#include "base/log.h"
#include "disagg/disagg_router.h"
#include "disagg/worker_kv_transfer.h"
#include "frontend/frontend.h"
#include "runtime/component.h"
#include "runtime/discovery.h"
#include "runtime/event_plane.h"
#include "runtime/kv_event_codec.h"
#include "runtime/remote_engine.h"

namespace dyn {
namespace {

// Keeps the registry in step with discovery. Updates arrive on the watch thread, one at a time.
class ModelWatcher {
 public:
  ModelWatcher(std::shared_ptr<ModelRegistry> registry, std::shared_ptr<RequestClient> client, RemoteEngineOptions options,
               DisaggRouterOptions disagg)
      : registry_(std::move(registry)), client_(std::move(client)), options_(std::move(options)), disagg_(disagg) {}

  void OnUpdate(const WatchUpdate& update) {
    std::lock_guard<std::mutex> lock(mu_);
    if (update.reset) {
      std::set<std::string> listed;
      for (const WatchEvent& e : update.events) listed.insert(e.kv.key);
      std::vector<std::string> gone;
      for (const auto& [key, rec] : instances_)
        if (!listed.count(key)) gone.push_back(key);
      // After a re-sync (etcd restarted and lost its state, say) workers need a moment to put
      // their records again: keys missing from a reset are dropped only if still missing after a
      // grace period, so serving goes on meanwhile.
      const auto deadline = std::chrono::steady_clock::now() + kResetGrace;
      for (const std::string& key : gone) pending_removal_.emplace(key, deadline);
    }
    for (const WatchEvent& e : update.events) {
      if (e.type == WatchEvent::Type::kPut) {
        pending_removal_.erase(e.kv.key);
        Put(e.kv.key, e.kv.value);
      } else {
        Remove(e.kv.key);
      }
    }
  }

  // Drops the keys whose grace after a reset has passed. Called periodically.
  void ExpirePending() {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = pending_removal_.begin(); it != pending_removal_.end();) {
      if (it->second <= now) {
        Remove(it->first);
        it = pending_removal_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // A KV event from the event plane: to the indexer of the instance's pool.
  void OnKvEvent(std::string_view payload) {
    auto event = DecodeKvEvent(payload);
    if (!event.ok()) {
      DYN_LOG(WARN) << "ignoring kv event: " << event.status().ToString();
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto inst = instance_pools_.find(event->worker.worker_id);
    if (inst == instance_pools_.end()) return;
    inst->second->ApplyKvEvent(*event);
    ++kv_events_;
  }

  // A load report from the event plane: {"instance_id": "...", "model": "...", "load": n}.
  void OnLoad(std::string_view payload) {
    boost::system::error_code ec;
    boost::json::value v = boost::json::parse(payload, ec);
    if (ec || !v.is_object()) return;
    const auto& o = v.as_object();
    const auto* id = o.if_contains("instance_id");
    const auto* model = o.if_contains("model");
    const auto* load = o.if_contains("load");
    if (!id || !id->is_string() || !model || !model->is_string() || !load || !load->is_int64()) return;
    const uint64_t instance = std::strtoull(std::string(id->as_string()).c_str(), nullptr, 10);
    double kv_usage = 0.0;
    const auto* used = o.if_contains("kv_blocks_used");
    const auto* total = o.if_contains("kv_blocks_total");
    if (used && used->is_int64() && total && total->is_int64() && total->as_int64() > 0)
      kv_usage = static_cast<double>(used->as_int64()) / static_cast<double>(total->as_int64());
    std::lock_guard<std::mutex> lock(mu_);
    auto inst = instance_pools_.find(instance);
    if (inst != instance_pools_.end()) inst->second->ReportLoad(instance, static_cast<int>(load->as_int64()), kv_usage);
    const auto now = std::chrono::steady_clock::now();
    auto& last = last_report_[instance];
    if (last.time_since_epoch().count() == 0 || now - last > std::chrono::seconds(3)) {
      DYN_LOG(INFO) << "load reports from instance " << instance << " (re)started";
    }
    last = now;
  }

 private:
  static constexpr std::chrono::seconds kResetGrace{5};

  struct Model {
    std::shared_ptr<RemoteEngine> prefill, decode;  // the pools
    std::shared_ptr<DisaggRouter> router;          // what /v1 serves
    ServedModel served;                            // registered while decode_keys is not empty
    bool in_registry = false;
    std::set<std::string> keys, decode_keys;
  };

  static bool IsPrefill(const InstanceRecord& rec) { return rec.card.role == "prefill"; }

  void Put(const std::string& key, const std::string& value) {
    auto rec = DecodeInstance(value);
    if (!rec.ok()) {
      DYN_LOG(WARN) << "ignoring instance " << key << ": " << rec.status().ToString();
      return;
    }
    auto old = instances_.find(key);
    if (old != instances_.end()) {
      if (old->second.card.name == rec->card.name && old->second.address == rec->address &&
          old->second.card.role == rec->card.role)
        return;
      Remove(key);
    }
    auto it = models_.find(rec->card.name);
    if (it == models_.end()) {
      auto assets = LoadModelAssets(rec->card.source, rec->card.chat_template_path);
      if (!assets.ok()) {
        DYN_LOG(ERROR) << "model '" << rec->card.name << "' of instance " << rec->instance_id
                       << ": cannot load its tokenizer: " << assets.status().ToString();
        return;
      }
      Model m;
      RemoteEngineOptions options = options_;
      // The workers' block size, unless the operator fixed one (--kv-block-size).
      if (options.kv_block_size <= 0) options.kv_block_size = rec->card.kv_block_size > 0 ? rec->card.kv_block_size : 16;
      m.prefill = RemoteEngine::Create(client_, options);
      m.decode = RemoteEngine::Create(client_, options);
      m.router = DisaggRouter::Create(m.prefill, m.decode, disagg_);
      m.served.name = rec->card.name;
      m.served.tokenizer = assets->tokenizer;
      m.served.chat_template = assets->chat_template;
      m.served.engine = m.router;
      m.served.context_length = rec->card.context_length;
      m.served.eos_token_ids = rec->card.eos_token_ids;
      m.served.created_unix = static_cast<int64_t>(std::time(nullptr));
      DYN_LOG(INFO) << "model '" << rec->card.name << "' (" << rec->card.engine << ", from " << rec->card.source << ")";
      it = models_.emplace(rec->card.name, std::move(m)).first;
    }
    Model& m = it->second;
    const bool prefill = IsPrefill(*rec);
    const std::shared_ptr<RemoteEngine>& pool = prefill ? m.prefill : m.decode;
    pool->AddInstance(rec->instance_id, rec->address);
    instance_pools_[rec->instance_id] = pool;
    m.keys.insert(key);
    if (!prefill) m.decode_keys.insert(key);
    DYN_LOG(INFO) << "instance " << rec->instance_id << " (role " << (rec->card.role.empty() ? "both" : rec->card.role)
                  << ") of '" << rec->card.name << "' at " << rec->address << " joined the "
                  << (prefill ? "prefill" : "decode") << " pool, " << m.prefill->num_instances() << " prefill + "
                  << m.decode->num_instances() << " decode/aggregated (" << m.keys.size() << " in all)";
    if (!m.in_registry && !m.decode_keys.empty()) {
      if (Status s = registry_->Add(m.served); !s.ok()) {
        DYN_LOG(ERROR) << "model '" << rec->card.name << "': " << s.ToString();
      } else {
        m.in_registry = true;
        DYN_LOG(INFO) << "model '" << rec->card.name << "' added";
      }
    } else if (!m.in_registry) {
      DYN_LOG(INFO) << "model '" << rec->card.name << "' is not served until a decode or aggregated worker joins";
    }
    instances_[key] = std::move(*rec);
  }

  void Remove(const std::string& key) {
    auto old = instances_.find(key);
    if (old == instances_.end()) return;
    const InstanceRecord rec = std::move(old->second);
    instances_.erase(old);
    auto it = models_.find(rec.card.name);
    if (it == models_.end()) return;
    Model& m = it->second;
    (IsPrefill(rec) ? m.prefill : m.decode)->RemoveInstance(rec.instance_id);
    instance_pools_.erase(rec.instance_id);
    m.keys.erase(key);
    m.decode_keys.erase(key);
    DYN_LOG(INFO) << "instance " << rec.instance_id << " of '" << rec.card.name << "' is gone, "
                  << m.prefill->num_instances() << " prefill + " << m.decode->num_instances() << " decode/aggregated ("
                  << m.keys.size() << " left)";
    if (m.in_registry && m.decode_keys.empty()) {
      registry_->Remove(rec.card.name);
      m.in_registry = false;
      DYN_LOG(INFO) << "model '" << rec.card.name << "' removed from /v1/models: no decode or aggregated instance left";
    }
    if (m.keys.empty()) models_.erase(it);
  }

  std::shared_ptr<ModelRegistry> registry_;
  std::shared_ptr<RequestClient> client_;
  RemoteEngineOptions options_;
  DisaggRouterOptions disagg_;
  std::mutex mu_;
  std::map<std::string, InstanceRecord> instances_;
  std::map<std::string, Model> models_;
  std::map<std::string, std::chrono::steady_clock::time_point> pending_removal_;
  std::map<uint64_t, std::chrono::steady_clock::time_point> last_report_;
  std::map<uint64_t, std::shared_ptr<RemoteEngine>> instance_pools_;
  uint64_t kv_events_ = 0;
};

}  // namespace

int FrontendCommand(int argc, char** argv) {
  std::string discovery_spec = "etcd:http://127.0.0.1:2379", ns = "dyn", host = "0.0.0.0";
  std::string event_spec;
  int64_t port = 8000, max_body_mb = 8, io_threads = 1;
  RouterFlags rf;
  FlagSet fs("dyn frontend", "Serves the OpenAI API for the models of the workers registered in discovery.");
  fs.String("discovery", &discovery_spec, "discovery backend: etcd:http://HOST:2379 | file:DIR | mem");
  fs.String("namespace", &ns, "namespace whose instances are served");
  fs.String("event-plane", &event_spec, "event plane for worker load reports: nats://HOST:4222 | mem | '' (off)");
  fs.String("host", &host, "address to listen on");
  fs.Int("port", &port, "HTTP port (0: pick a free one)");
  rf.Register(fs);
  rf.RegisterDisagg(fs);
  fs.Int("max-body-mb", &max_body_mb, "largest request body accepted (MiB)");
  fs.Int("io-threads", &io_threads, "HTTP I/O threads");
  if (int rc = ParseCommandFlags(fs, argc, argv, "dyn frontend"); rc >= 0) return rc;
  auto options = rf.ToOptions(/*have_events=*/!event_spec.empty());
  if (!options.ok()) {
    std::fprintf(stderr, "dyn frontend: %s\n", options.status().message().c_str());
    return 2;
  }
  if (rf.max_local_prefill_tokens < 0) {
    std::fprintf(stderr, "dyn frontend: --max-local-prefill-tokens must be >= 0\n");
    return 2;
  }
  DisaggRouterOptions disagg;
  disagg.max_local_prefill_tokens = static_cast<int>(rf.max_local_prefill_tokens);
  const sigset_t sigs = BlockTerminationSignals();  // before any thread starts

  auto client = RequestClient::Create(RequestClientOptions{});
  if (!client.ok()) {
    std::fprintf(stderr, "dyn frontend: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto registry = std::make_shared<ModelRegistry>();
  const RemoteEngineOptions& ro = *options;
  disagg.release_kv = KvReleaseVia(*client);
  auto watcher = std::make_shared<ModelWatcher>(registry, *client, ro, disagg);
  auto discovery = CreateDiscovery(discovery_spec);
  if (!discovery.ok()) {
    std::fprintf(stderr, "dyn frontend: %s\n", discovery.status().ToString().c_str());
    return 1;
  }
  auto watch = (*discovery)->WatchPrefix(InstancesPrefix(ns), [watcher](const WatchUpdate& u) { watcher->OnUpdate(u); });
  if (!watch.ok()) {
    std::fprintf(stderr, "dyn frontend: watch %s: %s\n", discovery_spec.c_str(), watch.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<EventPlane> events;
  std::unique_ptr<Subscription> load_sub, kv_sub;
  if (!event_spec.empty()) {
    auto ep = CreateEventPlane(event_spec);
    if (!ep.ok()) {
      std::fprintf(stderr, "dyn frontend: %s\n", ep.status().ToString().c_str());
      return 1;
    }
    events = std::move(*ep);
    auto sub = events->Subscribe("dyn." + ns + ".load", [watcher](std::string_view, std::string_view payload) {
      watcher->OnLoad(payload);
    });
    if (!sub.ok()) {
      std::fprintf(stderr, "dyn frontend: subscribe: %s\n", sub.status().ToString().c_str());
      return 1;
    }
    load_sub = std::move(*sub);
    if (ro.mode == RouterMode::kKv && ro.use_kv_events) {
      auto ks = events->Subscribe(KvEventsSubject(ns), [watcher](std::string_view, std::string_view payload) {
        watcher->OnKvEvent(payload);
      });
      if (!ks.ok()) {
        std::fprintf(stderr, "dyn frontend: subscribe: %s\n", ks.status().ToString().c_str());
        return 1;
      }
      kv_sub = std::move(*ks);
    }
  }
  std::atomic<bool> stopping{false};
  std::thread expirer([&] {
    while (!stopping.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      watcher->ExpirePending();
    }
  });

  HttpFrontendOptions ho;
  ho.host = host;
  ho.port = static_cast<int>(port);
  ho.io_threads = static_cast<int>(io_threads);
  ho.max_body_bytes = static_cast<size_t>(max_body_mb) << 20;
  auto frontend = HttpFrontend::Start(ho, registry);
  if (!frontend.ok()) {
    std::fprintf(stderr, "dyn frontend: %s\n", frontend.status().ToString().c_str());
    stopping = true;
    expirer.join();
    return 1;
  }
  DYN_LOG(INFO) << "frontend on http://" << host << ":" << (*frontend)->port() << ", discovery "
                << (*discovery)->Describe() << ", namespace " << ns << ", router " << RouterModeName(ro.mode);
  const int sig = WaitForTermination(sigs);
  DYN_LOG(INFO) << "signal " << sig << ": shutting down";
  (*frontend)->Stop();
  stopping = true;
  expirer.join();
  kv_sub.reset();
  load_sub.reset();
  watch->reset();
  (*client)->Stop();
  return 0;
}

DYN_REGISTER_COMMAND("frontend", "OpenAI API for the workers registered in discovery (etcd, file)", 20, &FrontendCommand);

}  // namespace dyn
