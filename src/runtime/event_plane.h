// Event plane: fire-and-forget publish/subscribe on subjects, for KV events, load metrics and
// router replica sync. Messages are opaque bytes; delivery is at most once (a subscriber that is
// down misses messages and must re-sync through another path, e.g. a worker's KV dump).
//
// Backends (CreateEventPlane):
//   "mem"                        in-process; every "mem" client of the process shares one bus
//   "nats://host:4222[,...]"     a NATS server through the libnats C client; reconnects forever
//                                and re-subscribes after the server restarts
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"

namespace dyn {

// Subjects are dot-separated tokens ("dyn.kv_events.ns.backend"). A subscription subject may end
// in ".>" (every subject below) or use "*" for one token, as NATS does.
using EventCallback = std::function<void(std::string_view subject, std::string_view payload)>;

class Subscription {
 public:
  virtual ~Subscription() = default;  // unsubscribes; no callback runs after it returns
};

class EventPlane {
 public:
  virtual ~EventPlane() = default;
  // Queues the message; returns an error only when it cannot be queued (closed, too large).
  virtual Status Publish(const std::string& subject, std::string_view payload) = 0;
  // Callbacks for one subscription run on one background thread, in order.
  virtual Result<std::unique_ptr<Subscription>> Subscribe(const std::string& subject, EventCallback callback) = 0;
  // Waits until everything published so far has been handed to the server (or to subscribers,
  // for "mem"), or the timeout passes.
  virtual Status Flush(int timeout_ms) = 0;
  virtual std::string Describe() const = 0;
};

Result<std::unique_ptr<EventPlane>> CreateEventPlane(const std::string& spec);

}  // namespace dyn
