// EngineServer: one engine served on the request plane, as `dyn worker` runs it and as
// `dyn run --workers N` runs each of its in-process workers: the engine built from flags, its KV
// event publisher (events + the "kv_dump" endpoint), its role in disaggregated serving (the KV
// transfer hooks and the "kv_release" endpoint) and the request server with the "generate"
// endpoint. Discovery and the event plane stay with the caller.
#pragma once

#include <memory>
#include <string>

#include "apps/dyn/local_engine.h"
#include "base/status.h"
#include "disagg/worker_kv_transfer.h"
#include "runtime/kv_event_publisher.h"
#include "runtime/request_plane.h"

namespace dyn {

struct EngineServerOptions {
  RequestServerOptions server;             // where the request plane listens
  std::string advertise_host = "127.0.0.1";  // what frontends dial
  WorkerKvTransferOptions transfer;        // role (kAggregated: none) and transfer backend
  bool publish_kv_events = true;           // false: an external engine's events are published instead
};

class EngineServer {
 public:
  // Builds the engine from `flags` (its kv_event_sink and kv_transfer are set here) and serves it.
  static Result<std::unique_ptr<EngineServer>> Start(LocalEngineFlags flags, const EngineServerOptions& options);
  ~EngineServer();

  const ServedModel& served() const { return served_; }
  const EnginePtr& engine() const { return served_.engine; }
  const std::string& address() const { return address_; }  // "advertise_host:port"
  int kv_block_size() const { return kv_block_size_; }
  WorkerRole role() const { return role_; }
  KvEventPublisher& publisher() { return *publisher_; }
  RequestServer& server() { return *server_; }
  const WorkerKvTransfer* transfer() const { return transfer_.get(); }

  // Stops the server, the engine and the transfer backend. Idempotent.
  void Stop();

 private:
  EngineServer() = default;

  std::unique_ptr<KvEventPublisher> publisher_;
  std::unique_ptr<WorkerKvTransfer> transfer_;
  ServedModel served_;
  std::unique_ptr<RequestServer> server_;
  std::string address_;
  int kv_block_size_ = 0;
  WorkerRole role_ = WorkerRole::kAggregated;
};

}  // namespace dyn
