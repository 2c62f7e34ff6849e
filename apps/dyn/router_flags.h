// The routing flags `dyn frontend` and `dyn run --workers N` share, and the RemoteEngineOptions
// they make.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"
#include "runtime/remote_engine.h"

namespace dyn {

class FlagSet;

struct RouterFlags {
  std::string mode = "round-robin", mode_alias;
  double overlap_weight = 1.0, temperature = 0.0;
  bool kv_events = true;
  int64_t kv_block_size = 0;  // 0: the workers' own
  double busy_kv_usage = -1;  // < 0: off
  int64_t busy_prefill_tokens = -1;
  int64_t migration_limit = 3;
  // Disaggregated serving (frontend only): prefill on the decode worker when the prompt's part
  // the decode workers do not hold is at most this many tokens (disagg/disagg_router.h).
  int64_t max_local_prefill_tokens = 512;

  void Register(FlagSet& fs);
  // The flags of the frontend's disaggregating router (dyn frontend only).
  void RegisterDisagg(FlagSet& fs);
  // `have_events`: KV events can reach the router (an event plane, or in-process workers).
  Result<RemoteEngineOptions> ToOptions(bool have_events) const;
};

}  // namespace dyn
