// KvEventPublisher: a worker's side of KV-aware routing. It receives the engine's block-pool events
// (a KvEventSink, called on the engine's step thread), publishes each on the event plane
// (kv_event_codec.h), and mirrors them in a one-worker RadixIndexer so that it can answer a dump
// request: the worker's whole cache as a router indexes it, with the id of the last event the dump
// includes. Routers ask for a dump when they see an event-id gap (events lost on the event plane)
// and when they first see the worker (a frontend that started after the worker).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kv/block_pool.h"
#include "router/radix_indexer.h"

namespace dyn {

class EventPlane;
class RequestServer;

class KvEventPublisher : public KvEventSink {
 public:
  KvEventPublisher();
  ~KvEventPublisher() override;

  // Starts publishing on `subject` as `instance_id` (events before Start are mirrored only: the
  // engine has no requests before the worker registers). `events` may be null (mirror only).
  void Start(EventPlane* events, std::string subject, uint64_t instance_id);
  void Stop();  // no more publishing; the mirror stays

  void OnKvEvent(const KvEvent& event) override;
  // Events of an external engine (ZmqKvSource): numbered here (their own sequence is the ZMQ
  // one), then mirrored and published like the engine's own. Do not mix with OnKvEvent.
  void OnExternalEvents(std::vector<router::RouterEvent>&& events);

  // The dump payload (EncodeKvDump): consistent with the published stream, i.e. exactly the state
  // after event last_event_id.
  std::string DumpPayload() const;
  // Registers the "kv_dump" endpoint on `server` (answers one payload, DumpPayload()).
  void ServeDumps(RequestServer& server);

  uint64_t last_event_id() const;

 private:
  void ApplyAndPublishLocked(router::RouterEvent& event);

  mutable std::mutex mu_;
  EventPlane* events_ = nullptr;
  std::string subject_;
  uint64_t instance_id_ = 0;
  uint64_t last_event_id_ = 0;
  router::RadixIndexer mirror_;
};

}  // namespace dyn
