#include "runtime/zmq_kv_source.h"

#include <zmq.h>

#include <atomic>
#include <mutex>
#include <thread>

#include "base/log.h"
#include "router/vllm_kv_events.h"

namespace dyn {
namespace {

class ZmqKvSourceImpl : public ZmqKvSource {
 public:
  ZmqKvSourceImpl(ZmqKvSourceOptions options, Callback cb) : options_(std::move(options)), cb_(std::move(cb)) {}
  ~ZmqKvSourceImpl() override {
    Stop();
    if (socket_) zmq_close(socket_);
    if (ctx_) zmq_ctx_term(ctx_);
  }

  Status Init() {
    ctx_ = zmq_ctx_new();
    if (!ctx_) return Status::Internal("zmq: cannot create a context");
    socket_ = zmq_socket(ctx_, ZMQ_SUB);
    if (!socket_) return Status::Internal(std::string("zmq: socket: ") + zmq_strerror(zmq_errno()));
    const int linger = 0, timeout_ms = 100;
    zmq_setsockopt(socket_, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(socket_, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));  // lets Stop be noticed
    zmq_setsockopt(socket_, ZMQ_SUBSCRIBE, options_.topic.data(), options_.topic.size());
    const std::string bind_prefix = "bind:";
    const bool bind = options_.endpoint.rfind(bind_prefix, 0) == 0;
    const std::string endpoint = bind ? options_.endpoint.substr(bind_prefix.size()) : options_.endpoint;
    const int rc = bind ? zmq_bind(socket_, endpoint.c_str()) : zmq_connect(socket_, endpoint.c_str());
    if (rc != 0)
      return Status::InvalidArgument("zmq: " + std::string(bind ? "bind " : "connect ") + endpoint + ": " +
                                     zmq_strerror(zmq_errno()));
    thread_ = std::thread([this] { Loop(); });
    return Status::Ok();
  }

  ZmqKvStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void Stop() override {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }

 private:
  // Receives one multipart message into frames; false on timeout or error.
  bool Receive(std::vector<std::string>* frames) {
    frames->clear();
    for (;;) {
      zmq_msg_t msg;
      zmq_msg_init(&msg);
      if (zmq_msg_recv(&msg, socket_, 0) < 0) {
        zmq_msg_close(&msg);
        return false;  // timeout (EAGAIN) or shutdown; a partial message is dropped
      }
      frames->emplace_back(static_cast<const char*>(zmq_msg_data(&msg)), zmq_msg_size(&msg));
      const bool more = zmq_msg_more(&msg);
      zmq_msg_close(&msg);
      if (!more) return true;
    }
  }

  void Loop() {
    std::vector<std::string> frames;
    bool have_seq = false;
    uint64_t last_seq = 0;
    while (!stop_.load()) {
      if (!Receive(&frames)) continue;
      auto bytes = [](const std::string& f) {
        return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size());
      };
      // [topic, seq, payload]; publishers without a topic frame send [seq, payload].
      const size_t n = frames.size();
      Result<uint64_t> seq = n >= 2 ? router::DecodeVllmSequence(bytes(frames[n - 2])) : Result<uint64_t>(Status::InvalidArgument("kv events: too few frames"));
      auto batch = seq.ok() ? router::DecodeVllmKvEvents(bytes(frames[n - 1]), options_.worker_id)
                            : Result<router::ExternalEventBatch>(seq.status());
      bool lost = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.messages;
        if (!batch.ok()) {
          ++stats_.malformed;
          DYN_LOG(WARN) << "zmq kv events from " << options_.endpoint << ": " << batch.status().ToString();
          continue;
        }
        if (have_seq && *seq > last_seq + 1) {
          stats_.lost += *seq - last_seq - 1;
          lost = true;
        }
        have_seq = true;
        last_seq = *seq;
        stats_.events += batch->events.size();
      }
      if (lost) {
        DYN_LOG(WARN) << "zmq kv events from " << options_.endpoint << ": messages lost before seq " << *seq;
      }
      cb_(std::move(batch->events), lost);
    }
  }

  ZmqKvSourceOptions options_;
  Callback cb_;
  void* ctx_ = nullptr;
  void* socket_ = nullptr;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  ZmqKvStats stats_;
};

}  // namespace

Result<std::unique_ptr<ZmqKvSource>> ZmqKvSource::Start(const ZmqKvSourceOptions& options, Callback on_events) {
  if (options.endpoint.empty()) return Status::InvalidArgument("zmq kv events: no endpoint");
  auto source = std::make_unique<ZmqKvSourceImpl>(options, std::move(on_events));
  DYN_RETURN_IF_ERROR(source->Init());
  return std::unique_ptr<ZmqKvSource>(std::move(source));
}

}  // namespace dyn
