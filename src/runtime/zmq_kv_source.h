// ZmqKvSource: subscribes to an external engine's KV event stream (vLLM's or SGLang's ZMQ PUB
// socket, wire format in router/vllm_kv_events.h) and hands the decoded events to a callback, so a
// dyn worker can publish an external engine's cache to dyn's routers (dyn worker --kv-events-zmq).
//
// One thread; a gap in the publisher's sequence numbers (dropped messages: ZMQ PUB drops when a
// subscriber is slow, and a late subscriber misses the start) is counted and reported to the
// callback as `lost`, since the state can no longer be trusted.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "router/kv_events.h"

namespace dyn {

struct ZmqKvSourceOptions {
  std::string endpoint;   // "tcp://host:5557" (connect), or "bind:tcp://*:5557" to bind instead
  std::string topic;      // subscription prefix; "" = everything
  uint64_t worker_id = 0; // the instance the events are attributed to
};

struct ZmqKvStats {
  uint64_t messages = 0;
  uint64_t events = 0;
  uint64_t malformed = 0;
  uint64_t lost = 0;  // messages missing between sequence numbers
};

class ZmqKvSource {
 public:
  // `on_events` runs on the source's thread with each message's events (worker = options'
  // worker_id); `lost` is true when messages were missed before this one.
  using Callback = std::function<void(std::vector<router::RouterEvent>&& events, bool lost)>;
  static Result<std::unique_ptr<ZmqKvSource>> Start(const ZmqKvSourceOptions& options, Callback on_events);
  virtual ~ZmqKvSource() = default;
  virtual ZmqKvStats stats() const = 0;
  virtual void Stop() = 0;  // idempotent; the destructor calls it
};

}  // namespace dyn
