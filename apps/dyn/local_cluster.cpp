#include "apps/dyn/local_cluster.h"

#include "apps/dyn/engine_server.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "base/log.h"
#include "runtime/event_plane.h"
#include "runtime/kv_event_codec.h"

namespace dyn {
namespace {

constexpr char kNamespace[] = "local";

class LocalClusterImpl : public LocalCluster {
 public:
  ~LocalClusterImpl() override { Shutdown(); }

  Status Init(LocalEngineFlags flags, int workers, RemoteEngineOptions ro, ServedModel* served) {
    DYN_ASSIGN_OR_RETURN(events_, CreateEventPlane("mem"));
    DYN_ASSIGN_OR_RETURN(client_, RequestClient::Create(RequestClientOptions{}));
    int kv_block_size = 0;
    for (int i = 0; i < workers; ++i) {
      Worker w;
      w.id = static_cast<uint64_t>(i + 1);
      EngineServerOptions eo;
      eo.server.host = "127.0.0.1";
      DYN_ASSIGN_OR_RETURN(w.es, EngineServer::Start(flags, eo));
      if (i == 0) *served = w.es->served();
      kv_block_size = w.es->kv_block_size();
      w.es->publisher().Start(events_.get(), KvEventsSubject(kNamespace), w.id);
      workers_.push_back(std::move(w));
    }
    if (ro.kv_block_size <= 0) ro.kv_block_size = kv_block_size > 0 ? kv_block_size : 16;
    router_ = RemoteEngine::Create(client_, ro);
    if (ro.mode == RouterMode::kKv && ro.use_kv_events) {
      std::weak_ptr<RemoteEngine> weak = router_;
      DYN_ASSIGN_OR_RETURN(kv_sub_, events_->Subscribe(KvEventsSubject(kNamespace),
                                                       [weak](std::string_view, std::string_view payload) {
                                                         auto event = DecodeKvEvent(payload);
                                                         auto router = weak.lock();
                                                         if (event.ok() && router) router->ApplyKvEvent(*event);
                                                       }));
    }
    for (const Worker& w : workers_) router_->AddInstance(w.id, w.es->address());
    // Load reports straight from the engines (no event plane hop), often: routing is only as
    // good as its view of the workers' queues and KV usage.
    reporter_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stop_) {
        for (const Worker& w : workers_) {
          const EngineMetrics m = w.es->engine()->Metrics();
          const double usage = m.kv_blocks_total > 0 ? static_cast<double>(m.kv_blocks_used) / m.kv_blocks_total : 0.0;
          router_->ReportLoad(w.id, m.running + m.waiting, usage);
        }
        cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stop_; });
      }
    });
    served->engine = router_;
    DYN_LOG(INFO) << workers << " in-process workers behind the " << RouterModeName(ro.mode) << " router"
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
    if (router_) router_->Shutdown();
    if (client_) client_->Stop();
    for (Worker& w : workers_) w.es->Stop();
  }

 private:
  struct Worker {
    uint64_t id = 0;
    std::unique_ptr<EngineServer> es;
  };

  std::unique_ptr<EventPlane> events_;
  std::unique_ptr<Subscription> kv_sub_;
  std::shared_ptr<RequestClient> client_;
  std::shared_ptr<RemoteEngine> router_;
  std::vector<Worker> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread reporter_;
};

}  // namespace

Result<std::unique_ptr<LocalCluster>> LocalCluster::Start(LocalEngineFlags flags, int workers, RemoteEngineOptions ro,
                                                          ServedModel* served) {
  if (workers < 1) return Status::InvalidArgument("--workers must be at least 1");
  auto cluster = std::make_unique<LocalClusterImpl>();
  if (Status s = cluster->Init(std::move(flags), workers, std::move(ro), served); !s.ok()) {
    cluster->Shutdown();
    return s;
  }
  return std::unique_ptr<LocalCluster>(std::move(cluster));
}

}  // namespace dyn
