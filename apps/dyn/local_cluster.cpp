#include "apps/dyn/local_cluster.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "apps/dyn/engine_server.h"
#include "base/log.h"
#include "disagg/disagg_router.h"
#include "runtime/event_plane.h"
#include "runtime/kv_event_codec.h"

namespace dyn {
namespace {

constexpr char kNamespace[] = "local";

class LocalClusterImpl : public LocalCluster {
 public:
  ~LocalClusterImpl() override { Shutdown(); }

  Status Init(LocalEngineFlags flags, const LocalClusterOptions& options, ServedModel* served) {
    DYN_ASSIGN_OR_RETURN(events_, CreateEventPlane("mem"));
    DYN_ASSIGN_OR_RETURN(client_, RequestClient::Create(RequestClientOptions{}));
    const bool disagg = options.prefill_workers > 0;
    int kv_block_size = 0;
    for (int i = 0; i < options.prefill_workers + options.workers; ++i) {
      Worker w;
      w.id = static_cast<uint64_t>(i + 1);
      w.prefill = i < options.prefill_workers;
      EngineServerOptions eo;
      eo.server.host = "127.0.0.1";
      eo.transfer.role = !disagg ? WorkerRole::kAggregated : w.prefill ? WorkerRole::kPrefill : WorkerRole::kDecode;
      eo.transfer.backend = options.kv_transport;
      eo.transfer.listen_host = "127.0.0.1";
      eo.transfer.lease_timeout = std::chrono::milliseconds(static_cast<int64_t>(options.kv_lease_timeout_s * 1000));
      DYN_ASSIGN_OR_RETURN(w.es, EngineServer::Start(flags, eo));
      if (i == 0) *served = w.es->served();
      kv_block_size = w.es->kv_block_size();
      w.es->publisher().Start(events_.get(), KvEventsSubject(kNamespace), w.id);
      workers_.push_back(std::move(w));
    }
    RemoteEngineOptions ro = options.router;
    if (ro.kv_block_size <= 0) ro.kv_block_size = kv_block_size > 0 ? kv_block_size : 16;
    decode_ = RemoteEngine::Create(client_, ro);
    if (disagg) prefill_ = RemoteEngine::Create(client_, ro);
    if (ro.mode == RouterMode::kKv && ro.use_kv_events) {
      // Each pool ignores the events of instances it does not have.
      std::weak_ptr<RemoteEngine> weak_decode = decode_, weak_prefill = prefill_;
      DYN_ASSIGN_OR_RETURN(kv_sub_, events_->Subscribe(KvEventsSubject(kNamespace), [weak_decode, weak_prefill](
                                                                                         std::string_view,
                                                                                         std::string_view payload) {
        auto event = DecodeKvEvent(payload);
        if (!event.ok()) return;
        for (const auto& weak : {weak_decode, weak_prefill})
          if (auto pool = weak.lock()) pool->ApplyKvEvent(*event);
      }));
    }
    for (const Worker& w : workers_) Pool(w).AddInstance(w.id, w.es->address());
    // Load reports straight from the engines (no event plane hop), often: routing is only as
    // good as its view of the workers' queues and KV usage.
    reporter_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stop_) {
        for (const Worker& w : workers_) {
          const EngineMetrics m = w.es->engine()->Metrics();
          const double usage = m.kv_blocks_total > 0 ? static_cast<double>(m.kv_blocks_used) / m.kv_blocks_total : 0.0;
          Pool(w).ReportLoad(w.id, m.running + m.waiting, usage);
        }
        cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stop_; });
      }
    });
    if (disagg) {
      DisaggRouterOptions dro;
      dro.release_kv = KvReleaseVia(client_);
      dro.max_local_prefill_tokens = options.max_local_prefill_tokens;
      served->engine = DisaggRouter::Create(prefill_, decode_, dro);
    } else {
      served->engine = decode_;
    }
    DYN_LOG(INFO) << options.workers << (disagg ? " decode" : "") << " in-process workers"
                  << (disagg ? " and " + std::to_string(options.prefill_workers) + " prefill workers (KV over " +
                                   options.kv_transport + ")"
                             : std::string())
                  << " behind the " << RouterModeName(ro.mode) << " router"
                  << (ro.mode == RouterMode::kKv ? (ro.use_kv_events ? " (KV events)" : " (approximate)") : "");
    return Status::Ok();
  }

  void Shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      stop_ = true;
    }
    cv_.notify_all();
    if (reporter_.joinable()) reporter_.join();
    kv_sub_.reset();
    if (prefill_) prefill_->Shutdown();
    if (decode_) decode_->Shutdown();
    if (client_) client_->Stop();
    for (Worker& w : workers_) w.es->Stop();
  }

 private:
  struct Worker {
    uint64_t id = 0;
    bool prefill = false;
    std::unique_ptr<EngineServer> es;
  };

  RemoteEngine& Pool(const Worker& w) { return w.prefill ? *prefill_ : *decode_; }

  std::unique_ptr<EventPlane> events_;
  std::unique_ptr<Subscription> kv_sub_;
  std::shared_ptr<RequestClient> client_;
  std::shared_ptr<RemoteEngine> decode_, prefill_;
  std::vector<Worker> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread reporter_;
};

}  // namespace

Result<std::unique_ptr<LocalCluster>> LocalCluster::Start(LocalEngineFlags flags, const LocalClusterOptions& options,
                                                          ServedModel* served) {
  if (options.workers < 1) return Status::InvalidArgument("--workers must be at least 1");
  if (options.prefill_workers < 0) return Status::InvalidArgument("--prefill-workers must be >= 0");
  auto cluster = std::make_unique<LocalClusterImpl>();
  if (Status s = cluster->Init(std::move(flags), options, served); !s.ok()) {
    cluster->Shutdown();
    return s;
  }
  return std::unique_ptr<LocalCluster>(std::move(cluster));
}

}  // namespace dyn
