#include "disagg/worker_kv_transfer.h"

#include <cerrno>
#include <condition_variable>
#include <unordered_set>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <sstream>

#include <boost/json.hpp>

#include "base/log.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

namespace json = boost::json;

KvLayoutDesc LayoutOf(const KvCacheGeometry& g) {
  KvLayoutDesc l;
  l.block_size = g.block_size;
  l.num_layers = g.num_layers;
  l.num_kv_heads = g.num_kv_heads;
  l.head_dim = g.head_dim;
  l.dtype = g.dtype;
  l.block_bytes = g.block_bytes;
  return l;
}

// One "kv_release" call; `done` gets the end status and whether the source still held the lease.
void CallKvRelease(RequestClient& client, const std::string& address, uint64_t lease_id,
                   std::shared_ptr<RequestContext> context, std::function<void(const Status&, bool released)> done) {
  auto released = std::make_shared<bool>(false);  // callbacks run in order on one io thread
  CallCallbacks cb;
  cb.on_data = [released](std::string_view payload) {
    boost::system::error_code ec;
    json::value v = json::parse(payload, ec);
    if (ec || !v.is_object()) return;
    const json::value* r = v.get_object().if_contains("released");
    *released = r != nullptr && r->is_bool() && r->get_bool();
  };
  cb.on_end = [released, done = std::move(done)](const Status& s) { done(s, *released); };
  client.Call(address, "kv_release", EncodeKvRelease(lease_id), std::move(context), std::move(cb));
}

class WorkerKvTransferImpl final : public WorkerKvTransfer {
 public:
  explicit WorkerKvTransferImpl(const WorkerKvTransferOptions& options) : options_(options) {}

  ~WorkerKvTransferImpl() override { Stop(); }

  Status Init() {
    if (options_.role == WorkerRole::kDecode) {
      sink_ = CreateKvTransferSink(options_.sink);
      DYN_ASSIGN_OR_RETURN(release_client_, RequestClient::Create(RequestClientOptions{}));
    }
    return Status::Ok();
  }

  KvTransferHooks hooks() override {
    KvTransferHooks h;
    h.lease_timeout = options_.lease_timeout;
    if (options_.role == WorkerRole::kAggregated) return h;
    const bool sim = options_.backend == "sim";
    if (!sim) {
      if (options_.role == WorkerRole::kPrefill && options_.backend == "shm") {
        h.allocate_cache = [this](const KvCacheGeometry& g) { return AllocateShared(g); };
      }
      h.cache_ready = [this](const KvCacheGeometry& g, void* base) { return CacheReady(g, base); };
    }
    if (options_.role == WorkerRole::kPrefill) {
      h.describe = [this](uint64_t lease_id, std::span<const int32_t> blocks, int num_tokens) {
        return Describe(lease_id, blocks, num_tokens);
      };
    } else {
      h.pull = [this](const std::string& descriptor, int first_block, std::span<const int32_t> dst) {
        return Pull(descriptor, first_block, dst);
      };
      h.release = [this](const std::string& descriptor) { Release(descriptor); };
    }
    return h;
  }

  void ServeReleases(RequestServer& server, const std::string& request_address, EnginePtr engine) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      control_address_ = request_address;
    }
    if (options_.role != WorkerRole::kPrefill) return;
    std::weak_ptr<Engine> weak = engine;
    server.AddEndpoint("kv_release", [weak](std::string payload, std::shared_ptr<ServerCall> call) {
      auto lease = DecodeKvRelease(payload);
      if (!lease.ok()) {
        call->Finish(lease.status());
        return;
      }
      auto e = weak.lock();
      if (!e) {
        call->Finish(Status::Unavailable("engine stopped"));
        return;
      }
      const bool released = e->ReleaseKvLease(*lease);
      call->Send(json::serialize(json::object{{"released", released}}));
      call->Finish(Status::Ok());
    });
  }

  TransferStats stats() const override { return sink_ ? SinkStats(*sink_) : TransferStats{}; }

  std::string Describe() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::ostringstream os;
    os << (options_.role == WorkerRole::kPrefill ? "prefill" : options_.role == WorkerRole::kDecode ? "decode" : "agg");
    if (options_.role == WorkerRole::kPrefill) {
      os << ", KV served over " << options_.backend;
      if (source_) os << " at " << source_->address();
    } else if (options_.role == WorkerRole::kDecode) {
      os << ", pulls KV over tcp or shm";
    }
    if (have_layout_) os << " (" << layout_.ToString() << ", " << region_.num_blocks << " blocks)";
    return os.str();
  }

  void Stop() override {
    std::unique_ptr<KvTransferSource> source;
    std::shared_ptr<RequestClient> client;
    {
      std::lock_guard<std::mutex> lock(mu_);
      source = std::move(source_);
      client = std::move(release_client_);
    }
    if (source) source->Stop();
    if (client) client->Stop();
  }

 private:
  Result<void*> AllocateShared(const KvCacheGeometry& g) {
    DYN_ASSIGN_OR_RETURN(auto memory, SharedKvMemory::Create(g.block_bytes * static_cast<size_t>(g.num_blocks)));
    std::lock_guard<std::mutex> lock(mu_);
    shared_ = std::move(memory);
    return shared_->data();
  }

  Status CacheReady(const KvCacheGeometry& g, void* base) {
    std::lock_guard<std::mutex> lock(mu_);
    layout_ = LayoutOf(g);
    region_ = KvRegion{base, g.block_bytes, g.num_blocks};
    have_layout_ = true;
    if (options_.role != WorkerRole::kPrefill) return Status::Ok();
    if (options_.backend == "shm") {
      if (!shared_ || shared_->data() != base) return Status::Internal("shm KV source: the cache is not in shared memory");
      DYN_ASSIGN_OR_RETURN(source_, StartShmKvSource(*shared_, region_, layout_));
    } else {
      TcpSourceOptions to;
      to.host = options_.listen_host;
      to.port = options_.tcp_port;
      to.advertise_host = options_.advertise_host;
      to.max_bytes_per_second = options_.tcp_max_bytes_per_second;
      DYN_ASSIGN_OR_RETURN(source_, StartTcpKvSource(region_, layout_, to));
    }
    return Status::Ok();
  }

  Result<std::string> Describe(uint64_t lease_id, std::span<const int32_t> blocks, int num_tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    KvTransferDescriptor d;
    if (options_.backend == "sim") {
      d.backend = "sim";
    } else {
      if (!source_) return Status::Internal("KV source not started");
      d.backend = source_->backend();
      d.address = source_->address();
      d.layout = layout_;
    }
    d.lease_id = lease_id;
    d.block_ids.assign(blocks.begin(), blocks.end());
    d.num_tokens = num_tokens;
    d.control_address = control_address_;
    return EncodeDescriptor(d);
  }

  Result<size_t> Pull(const std::string& descriptor, int first_block, std::span<const int32_t> dst) {
    DYN_ASSIGN_OR_RETURN(KvTransferDescriptor d, DecodeDescriptor(descriptor));
    if (first_block < 0 || static_cast<size_t>(first_block) + dst.size() > d.block_ids.size()) {
      return Status::InvalidArgument("pull of blocks [" + std::to_string(first_block) + ", " +
                                     std::to_string(first_block + dst.size()) + ") of a descriptor with " +
                                     std::to_string(d.block_ids.size()));
    }
    KvLayoutDesc layout;
    KvRegion region;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!have_layout_) return Status::Internal("KV cache not ready");
      layout = layout_;
      region = region_;
    }
    const std::span<const int32_t> src(d.block_ids.data() + first_block, dst.size());
    DYN_RETURN_IF_ERROR(sink_->Pull(d, src, dst, layout, region));
    // The copy is only good if the lease held for all of it: a lease that expired meanwhile let
    // the source reuse the blocks. Releasing it now, and waiting for the answer, tells which.
    if (!d.control_address.empty()) DYN_RETURN_IF_ERROR(ReleaseAfterCopy(d, std::hash<std::string>{}(descriptor)));
    return dst.size() * layout.block_bytes;
  }

  // `key` identifies the descriptor text for Release, which the engine calls next.
  Status ReleaseAfterCopy(const KvTransferDescriptor& d, size_t key) {
    std::shared_ptr<RequestClient> client;
    {
      std::lock_guard<std::mutex> lock(mu_);
      client = release_client_;
    }
    if (!client) return Status::Unavailable("worker stopping");
    struct Reply {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false, released = false;
      Status status;
    };
    auto reply = std::make_shared<Reply>();
    auto context = std::make_shared<RequestContext>("kv_release-" + std::to_string(d.lease_id));
    CallKvRelease(*client, d.control_address, d.lease_id, context,
                  [reply](const Status& st, bool released) {
                    std::lock_guard<std::mutex> lock(reply->mu);
                    reply->status = st;
                    reply->released = released;
                    reply->done = true;
                    reply->cv.notify_all();
                  });
    std::unique_lock<std::mutex> lock(reply->mu);
    if (!reply->cv.wait_for(lock, std::chrono::milliseconds(options_.sink.io_timeout_ms), [&] { return reply->done; })) {
      lock.unlock();
      context->Cancel();
      return Status::Unavailable("KV source " + d.control_address + " did not confirm the lease after the copy");
    }
    if (!reply->status.ok()) {
      return Status::Unavailable("KV source " + d.control_address + " could not confirm the lease after the copy: " +
                                 reply->status.ToString());
    }
    if (!reply->released) return Status::Unavailable("the KV lease expired before the copy finished");
    std::lock_guard<std::mutex> g(mu_);
    if (released_.size() > 4096) released_.clear();  // only a bound: an extra release is harmless
    released_.insert(key);
    return Status::Ok();
  }

  // Runs on the engine's step thread: the usual case (Pull released it already) costs a hash of
  // the descriptor text, not a JSON parse.
  void Release(const std::string& descriptor) {
    std::shared_ptr<RequestClient> client;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (released_.erase(std::hash<std::string>{}(descriptor)) > 0) return;
      client = release_client_;
    }
    if (client) SendKvRelease(*client, descriptor);  // no-op without a control address
  }

  const WorkerKvTransferOptions options_;
  std::unique_ptr<KvTransferSink> sink_;  // decode role; thread-safe, set once in Init
  mutable std::mutex mu_;
  std::shared_ptr<RequestClient> release_client_;
  std::unique_ptr<SharedKvMemory> shared_;
  std::unique_ptr<KvTransferSource> source_;
  KvLayoutDesc layout_;
  KvRegion region_;
  bool have_layout_ = false;
  std::string control_address_;
  std::unordered_set<size_t> released_;  // hashes of descriptors Pull released
};

}  // namespace

Result<WorkerRole> ParseWorkerRole(const std::string& name) {
  if (name == "agg" || name == "both" || name == "aggregated") return WorkerRole::kAggregated;
  if (name == "prefill") return WorkerRole::kPrefill;
  if (name == "decode") return WorkerRole::kDecode;
  return Status::InvalidArgument("unknown worker role '" + name + "' (agg, prefill or decode)");
}

const char* WorkerRoleCardName(WorkerRole role) {
  switch (role) {
    case WorkerRole::kPrefill:
      return "prefill";
    case WorkerRole::kDecode:
      return "decode";
    case WorkerRole::kAggregated:
      break;
  }
  return "both";
}

Result<std::unique_ptr<WorkerKvTransfer>> WorkerKvTransfer::Create(const WorkerKvTransferOptions& options) {
  if (options.backend != "tcp" && options.backend != "shm" && options.backend != "sim") {
    return Status::InvalidArgument("unknown KV transfer backend '" + options.backend + "' (tcp, shm or sim)");
  }
  if (options.lease_timeout.count() <= 0) return Status::InvalidArgument("KV lease timeout must be positive");
  auto t = std::make_unique<WorkerKvTransferImpl>(options);
  DYN_RETURN_IF_ERROR(t->Init());
  return std::unique_ptr<WorkerKvTransfer>(std::move(t));
}

std::function<void(const std::string& descriptor)> KvReleaseVia(std::weak_ptr<RequestClient> client) {
  return [client = std::move(client)](const std::string& descriptor) {
    if (auto c = client.lock()) SendKvRelease(*c, descriptor);
  };
}

void SendKvRelease(RequestClient& client, const std::string& descriptor) {
  auto d = DecodeDescriptor(descriptor);
  if (!d.ok() || d->control_address.empty()) return;
  const uint64_t lease = d->lease_id;
  const std::string address = d->control_address;
  CallKvRelease(client, address, lease, std::make_shared<RequestContext>("kv_release-" + std::to_string(lease)),
                [lease, address](const Status& s, bool) {
                  if (!s.ok()) {
                    DYN_LOG(WARN) << "kv_release of lease " << lease << " at " << address << ": " << s.ToString();
                  }
                });
}

std::string EncodeKvRelease(uint64_t lease_id) {
  return json::serialize(json::object{{"lease_id", std::to_string(lease_id)}});
}

Result<uint64_t> DecodeKvRelease(std::string_view payload) {
  boost::system::error_code ec;
  json::value v = json::parse(payload, ec);
  if (ec || !v.is_object()) return Status::InvalidArgument("kv_release: payload is not a JSON object");
  const json::value* id = v.get_object().if_contains("lease_id");
  if (id == nullptr || !id->is_string()) return Status::InvalidArgument("kv_release: missing string field lease_id");
  const std::string s(id->get_string());
  char* end = nullptr;
  errno = 0;
  const unsigned long long n = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0) return Status::InvalidArgument("kv_release: lease_id is not a number");
  return static_cast<uint64_t>(n);
}

}  // namespace dyn
