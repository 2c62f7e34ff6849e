// LocalCluster: `dyn run --workers N`: N engines in this process, each behind its own request-plane
// server on loopback, routed by the same RemoteEngine a `dyn frontend` uses (round-robin, random,
// least-loaded or KV-aware with the engines' KV events, dumps, busy thresholds, migration). It
// makes the distributed path testable and measurable from one command, e.g. many simulated
// mocker workers behind the KV router.
#pragma once

#include <memory>

#include "apps/dyn/local_engine.h"
#include "base/status.h"
#include "runtime/remote_engine.h"

namespace dyn {

class LocalCluster {
 public:
  // Builds `workers` engines from `flags` and the router over them. On success `served` is the
  // model to register, its engine the router. ro.kv_block_size 0: the engines' block size.
  static Result<std::unique_ptr<LocalCluster>> Start(LocalEngineFlags flags, int workers, RemoteEngineOptions ro,
                                                     ServedModel* served);
  virtual ~LocalCluster() = default;
  // Stops the router, the servers and the engines. Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace dyn
