// LocalCluster: `dyn run --workers N [--prefill-workers P]`: engines in this process, each behind its
// own request-plane server on loopback, routed by the same RemoteEngine a `dyn frontend` uses
// (round-robin, random, least-loaded or KV-aware with the engines' KV events, dumps, busy
// thresholds, migration); with prefill workers, by the frontend's DisaggRouter over a prefill
// pool and a decode pool, KV moving between engines over the real transfer backends. It makes
// the distributed path testable and measurable from one command, e.g. many simulated mocker
// workers behind the KV router.
#pragma once

#include <memory>
#include <string>

#include "apps/dyn/local_engine.h"
#include "base/status.h"
#include "runtime/remote_engine.h"

namespace dyn {

struct LocalClusterOptions {
  int workers = 1;            // aggregated workers, or decode workers when prefill_workers > 0
  int prefill_workers = 0;    // > 0: disaggregated serving (a DisaggRouter over both pools)
  std::string kv_transport = "shm";  // prefill workers' KV source: shm (same process, so same host) or tcp
  int max_local_prefill_tokens = 512;
  double kv_lease_timeout_s = 30;
  RemoteEngineOptions router;  // kv_block_size 0: the engines' block size
};

class LocalCluster {
 public:
  // Builds the engines from `flags` and the router over them. On success `served` is the model
  // to register, its engine the router.
  static Result<std::unique_ptr<LocalCluster>> Start(LocalEngineFlags flags, const LocalClusterOptions& options,
                                                     ServedModel* served);
  virtual ~LocalCluster() = default;
  // Stops the router, the servers and the engines. Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace dyn
