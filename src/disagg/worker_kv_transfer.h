// WorkerKvTransfer: a worker process's side of disaggregated serving. It turns a role and a
// transfer backend into the KvTransferHooks an engine takes (engine/kv_transfer_hooks.h):
//
//   prefill role  the KV cache is placed where the backend can serve it (shm: a shared memory
//                 segment; tcp: the engine's own memory, served on a TCP port); `describe` makes
//                 the descriptor of a leased prompt (backend, address, lease, blocks, layout, and
//                 this worker's request-plane address for the release); the "kv_release" endpoint
//                 ends a lease when the decode worker has its copy.
//   decode role   `pull` copies a descriptor's blocks into this engine's cache with one sink that
//                 speaks every backend, then releases the lease with "kv_release" to the prefill
//                 worker named in the descriptor and waits for the answer: a lease that expired
//                 during the copy (its blocks may have been reused) or a source that cannot
//                 confirm fails the pull, so a stale copy is never decoded. `release` (after a
//                 failure, or when nothing had to be copied) sends it without waiting.
//   backend "sim" the mocker: descriptors without memory (nothing is copied; the mocker simulates
//                 the transfer time itself); releases work as above.
//
// The engine never sees a socket or a segment; the transfer layer never sees a request.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "base/status.h"
#include "engine/engine.h"
#include "engine/kv_transfer_hooks.h"
#include "transfer/kv_transfer.h"

namespace dyn {

class RequestClient;
class RequestServer;

enum class WorkerRole { kAggregated, kPrefill, kDecode };
Result<WorkerRole> ParseWorkerRole(const std::string& name);  // "agg" (or "both"), "prefill", "decode"
// The ModelCard role the frontend reads: "both", "prefill", "decode".
const char* WorkerRoleCardName(WorkerRole role);

struct WorkerKvTransferOptions {
  WorkerRole role = WorkerRole::kPrefill;
  std::string backend = "tcp";  // prefill side: "tcp" | "shm" | "sim"; the decode side pulls any
  // tcp source: where it listens and what descriptors advertise.
  std::string listen_host = "0.0.0.0";
  int tcp_port = 0;  // 0: ephemeral
  std::string advertise_host = "127.0.0.1";
  double tcp_max_bytes_per_second = 0;  // tcp source: cap per pull (0: unlimited)
  std::chrono::milliseconds lease_timeout{30000};
  KvSinkOptions sink;
};

class WorkerKvTransfer {
 public:
  // Fails on an unknown backend. A kAggregated role gives empty hooks.
  static Result<std::unique_ptr<WorkerKvTransfer>> Create(const WorkerKvTransferOptions& options);
  virtual ~WorkerKvTransfer() = default;

  // For the engine's options; they refer to this object, which must outlive the engine.
  virtual KvTransferHooks hooks() = 0;
  // Once the worker's request plane is up: its advertised "host:port" goes into descriptors, and
  // (prefill role) the "kv_release" endpoint ends leases of `engine`. Call before the worker is
  // registered in discovery.
  virtual void ServeReleases(RequestServer& server, const std::string& request_address, EnginePtr engine) = 0;
  // Decode side: pulls done so far (the engine's metrics count them too).
  virtual TransferStats stats() const = 0;
  // A human-readable line for the start-up log: role, backend, address.
  virtual std::string Describe() const = 0;
  // Stops the source (after the engine is shut down) and the release client. Idempotent.
  virtual void Stop() = 0;
};

// Ends the lease a descriptor names: a "kv_release" call to its control address, not waited for
// (a failure is logged; the lease then ends by its timeout). No-op for descriptors without one.
// For whoever gives up on a descriptor: the decode side after a failure, the frontend when it
// abandons one (client gone before the decode worker got it).
void SendKvRelease(RequestClient& client, const std::string& descriptor);
// SendKvRelease through `client` while it lives (DisaggRouterOptions::release_kv); the router does
// not keep the client alive.
std::function<void(const std::string& descriptor)> KvReleaseVia(std::weak_ptr<RequestClient> client);

// The "kv_release" call's payload: {"lease_id": "<decimal>"}; the reply is one payload
// {"released": true|false} and an OK end.
std::string EncodeKvRelease(uint64_t lease_id);
Result<uint64_t> DecodeKvRelease(std::string_view payload);

}  // namespace dyn
