// "nats://..." event plane through the libnats C client.
//
// Failure behavior: the client reconnects forever (every ~100-200 ms) and libnats re-sends every
// subscription after a reconnect. Publishes made while disconnected go to a bounded reconnect
// buffer and are sent after the reconnect; when that buffer is full Publish fails. Messages the
// server had no connected subscriber for are gone (at-most-once).
#include <nats/nats.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/log.h"
#include "runtime/event_plane_internal.h"

namespace dyn::event_plane_internal {
namespace {

constexpr int64_t kReconnectWaitMs = 100;
constexpr int64_t kReconnectJitterMs = 100;
constexpr int kReconnectBufBytes = 8 << 20;
// Pings find a dead server the socket does not report (a partition, a frozen host).
constexpr int64_t kPingIntervalMs = 2000;
constexpr int kMaxPingsOut = 2;
// Messages buffered in the client per subscription before it drops (slow consumer).
constexpr int kMaxPendingMsgs = 65536;

Status NatsError(natsStatus s, const std::string& what) {
  std::string msg = what + ": " + natsStatus_GetText(s);
  const char* last = nats_GetLastError(nullptr);
  if (last != nullptr && *last != '\0' && msg.find(last) == std::string::npos) msg += std::string(" (") + last + ")";
  switch (s) {
    case NATS_TIMEOUT:
      return Status::DeadlineExceeded(msg);
    case NATS_MAX_PAYLOAD:
      return Status::TooLarge(msg);
    case NATS_INSUFFICIENT_BUFFER:
    case NATS_NO_MEMORY:
      return Status::ResourceExhausted(msg);
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT:
    case NATS_ADDRESS_MISSING:
      return Status::InvalidArgument(msg);
    default:
      return Status::Unavailable(msg);
  }
}

std::string ConnectedUrl(natsConnection* nc) {
  char buf[256] = {0};
  if (natsConnection_GetConnectedUrl(nc, buf, sizeof(buf)) != NATS_OK || buf[0] == '\0') return "?";
  return buf;
}

// Connection event callbacks run on a libnats thread and may run after our objects are gone, so
// they take no closure and only log. Closing happens only when a client is destroyed (reconnects
// never give up), so the events of that orderly close are not worth a warning.
bool Closing(natsConnection* nc) { return natsConnection_Status(nc) == NATS_CONN_STATUS_CLOSED; }
void OnDisconnected(natsConnection* nc, void*) {
  if (Closing(nc)) return;
  DYN_LOG(WARN) << "event plane nats: disconnected, reconnecting";
}
void OnReconnected(natsConnection* nc, void*) {
  DYN_LOG(INFO) << "event plane nats: reconnected to " << ConnectedUrl(nc);
}
void OnConnected(natsConnection* nc, void*) { DYN_LOG(INFO) << "event plane nats: connected to " << ConnectedUrl(nc); }
void OnClosed(natsConnection*, void*) { DYN_LOG(DEBUG) << "event plane nats: connection closed"; }
void OnAsyncError(natsConnection*, natsSubscription* sub, natsStatus err, void*) {
  // Slow-consumer drops are reported here; keep them visible without flooding the log.
  static std::atomic<uint64_t> count{0};
  uint64_t n = ++count;
  if ((n & (n - 1)) == 0) {
    DYN_LOG(WARN) << "event plane nats: async error " << natsStatus_GetText(err) << " (" << n << " so far)";
  }
}

// Owns the natsConnection; shared by the plane and its subscriptions so that a subscription
// outliving its EventPlane still unsubscribes from a live connection.
struct NatsConn {
  natsConnection* nc = nullptr;
  std::string urls;
  ~NatsConn() {
    if (nc != nullptr) natsConnection_Destroy(nc);
  }
};

// What the message handler needs. Freed by the subscription's completion callback, which libnats
// runs on the delivery thread after its last message handler has returned.
struct SubState {
  std::string subject;
  EventCallback callback;
  // Held while the user callback runs; recursive so that a callback may destroy its own
  // subscription.
  std::recursive_mutex mu;
  bool closed = false;
};

void OnMessage(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
  auto* state = static_cast<SubState*>(closure);
  {
    std::lock_guard<std::recursive_mutex> lock(state->mu);
    if (!state->closed) {
      std::string_view payload(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
      try {
        state->callback(natsMsg_GetSubject(msg), payload);
      } catch (const std::exception& e) {
        DYN_LOG(ERROR) << "event plane nats: callback for '" << state->subject << "' threw: " << e.what();
      } catch (...) {
        DYN_LOG(ERROR) << "event plane nats: callback for '" << state->subject << "' threw";
      }
    }
  }
  natsMsg_Destroy(msg);
}

void OnSubscriptionComplete(void* closure) { delete static_cast<SubState*>(closure); }

class NatsSubscription final : public Subscription {
 public:
  NatsSubscription(std::shared_ptr<NatsConn> conn, natsSubscription* sub, SubState* state)
      : conn_(std::move(conn)), sub_(sub), state_(state) {}

  ~NatsSubscription() override {
    {
      // Waits for a running callback (unless this is that callback's thread), then no later
      // message reaches the user.
      std::lock_guard<std::recursive_mutex> lock(state_->mu);
      state_->closed = true;
    }
    natsStatus s = natsSubscription_Unsubscribe(sub_);
    if (s != NATS_OK && s != NATS_INVALID_SUBSCRIPTION && s != NATS_CONNECTION_CLOSED) {
      DYN_LOG(WARN) << "event plane nats: unsubscribe '" << state_->subject << "': " << natsStatus_GetText(s);
    }
    // `state_` now belongs to OnSubscriptionComplete.
    natsSubscription_Destroy(sub_);
  }

 private:
  std::shared_ptr<NatsConn> conn_;
  natsSubscription* sub_;
  SubState* state_;
};

class NatsEventPlane final : public EventPlane {
 public:
  explicit NatsEventPlane(std::shared_ptr<NatsConn> conn) : conn_(std::move(conn)) {}

  ~NatsEventPlane() override {
    // Hand what is buffered to the server before the connection may close; skipped when
    // disconnected so shutdown does not wait for a server that is gone.
    if (natsConnection_Status(conn_->nc) == NATS_CONN_STATUS_CONNECTED) {
      natsConnection_FlushTimeout(conn_->nc, 1000);
    }
  }

  Status Publish(const std::string& subject, std::string_view payload) override {
    DYN_RETURN_IF_ERROR(ValidateSubject(subject, /*allow_wildcards=*/false));
    natsStatus s = natsConnection_Publish(conn_->nc, subject.c_str(), payload.data(), static_cast<int>(payload.size()));
    if (s != NATS_OK) return NatsError(s, "event plane nats: publish '" + subject + "'");
    return Status::Ok();
  }

  Result<std::unique_ptr<Subscription>> Subscribe(const std::string& subject, EventCallback callback) override {
    DYN_RETURN_IF_ERROR(ValidateSubject(subject, /*allow_wildcards=*/true));
    if (!callback) return Status::InvalidArgument("empty event callback");
    auto* state = new SubState{subject, std::move(callback), {}, false};
    natsSubscription* sub = nullptr;
    natsStatus s = natsConnection_Subscribe(&sub, conn_->nc, subject.c_str(), OnMessage, state);
    if (s != NATS_OK) {
      delete state;
      return NatsError(s, "event plane nats: subscribe '" + subject + "'");
    }
    s = natsSubscription_SetOnCompleteCB(sub, OnSubscriptionComplete, state);
    if (s == NATS_OK) s = natsSubscription_SetPendingLimits(sub, kMaxPendingMsgs, 64 << 20);
    if (s != NATS_OK) {
      // The subscription closed under us (connection closed); its delivery thread may still hold
      // `state`, so it is left allocated rather than freed under it.
      natsSubscription_Unsubscribe(sub);
      natsSubscription_Destroy(sub);
      return NatsError(s, "event plane nats: subscribe '" + subject + "'");
    }
    return std::unique_ptr<Subscription>(std::make_unique<NatsSubscription>(conn_, sub, state));
  }

  Status Flush(int timeout_ms) override {
    natsStatus s = natsConnection_FlushTimeout(conn_->nc, std::max(timeout_ms, 1));
    if (s != NATS_OK) return NatsError(s, "event plane nats: flush");
    return Status::Ok();
  }

  std::string Describe() const override {
    const char* state = "reconnecting";
    switch (natsConnection_Status(conn_->nc)) {
      case NATS_CONN_STATUS_CONNECTED:
        state = "connected";
        break;
      case NATS_CONN_STATUS_CLOSED:
        state = "closed";
        break;
      default:
        break;
    }
    return conn_->urls + " (" + state + ")";
  }

 private:
  std::shared_ptr<NatsConn> conn_;
};

// "nats://a:1,b:2" -> {"nats://a:1", "nats://b:2"}.
std::vector<std::string> SplitUrls(const std::string& urls) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= urls.size()) {
    size_t comma = urls.find(',', start);
    if (comma == std::string::npos) comma = urls.size();
    std::string url = urls.substr(start, comma - start);
    if (!url.empty()) out.push_back(url.find("://") == std::string::npos ? "nats://" + url : url);
    start = comma + 1;
  }
  return out;
}

struct OptionsDeleter {
  void operator()(natsOptions* o) const { natsOptions_Destroy(o); }
};

}  // namespace

Result<std::unique_ptr<EventPlane>> CreateNatsEventPlane(const std::string& urls) {
  std::vector<std::string> servers = SplitUrls(urls);
  if (servers.empty()) return Status::InvalidArgument("event plane nats: no server in '" + urls + "'");
  std::vector<const char*> server_ptrs;
  for (const auto& s : servers) server_ptrs.push_back(s.c_str());

  natsOptions* raw = nullptr;
  natsStatus s = natsOptions_Create(&raw);
  if (s != NATS_OK) return NatsError(s, "event plane nats: options");
  std::unique_ptr<natsOptions, OptionsDeleter> opts(raw);
  s = natsOptions_SetServers(raw, server_ptrs.data(), static_cast<int>(server_ptrs.size()));
  if (s == NATS_OK) s = natsOptions_SetName(raw, "dyn-event-plane");
  if (s == NATS_OK) s = natsOptions_SetMaxReconnect(raw, -1);
  if (s == NATS_OK) s = natsOptions_SetReconnectWait(raw, kReconnectWaitMs);
  if (s == NATS_OK) s = natsOptions_SetReconnectJitter(raw, kReconnectJitterMs, kReconnectJitterMs);
  if (s == NATS_OK) s = natsOptions_SetReconnectBufSize(raw, kReconnectBufBytes);
  if (s == NATS_OK) s = natsOptions_SetPingInterval(raw, kPingIntervalMs);
  if (s == NATS_OK) s = natsOptions_SetMaxPingsOut(raw, kMaxPingsOut);
  if (s == NATS_OK) s = natsOptions_SetMaxPendingMsgs(raw, kMaxPendingMsgs);
  if (s == NATS_OK) s = natsOptions_SetTimeout(raw, 2000);
  if (s == NATS_OK) s = natsOptions_SetDisconnectedCB(raw, OnDisconnected, nullptr);
  if (s == NATS_OK) s = natsOptions_SetReconnectedCB(raw, OnReconnected, nullptr);
  if (s == NATS_OK) s = natsOptions_SetClosedCB(raw, OnClosed, nullptr);
  if (s == NATS_OK) s = natsOptions_SetErrorHandler(raw, OnAsyncError, nullptr);
  // A server that is down at start-up is not an error: the client keeps trying in the background
  // and publishes meanwhile go to the reconnect buffer, as after a disconnect.
  if (s == NATS_OK) s = natsOptions_SetRetryOnFailedConnect(raw, true, OnConnected, nullptr);
  if (s != NATS_OK) return NatsError(s, "event plane nats: options");

  auto conn = std::make_shared<NatsConn>();
  conn->urls = urls;
  s = natsConnection_Connect(&conn->nc, raw);
  if (s == NATS_NOT_YET_CONNECTED) {
    DYN_LOG(WARN) << "event plane nats: " << urls << " not reachable yet, connecting in the background";
  } else if (s != NATS_OK) {
    conn->nc = nullptr;
    return NatsError(s, "event plane nats: connect " + urls);
  }
  return std::unique_ptr<EventPlane>(std::make_unique<NatsEventPlane>(std::move(conn)));
}

}  // namespace dyn::event_plane_internal
