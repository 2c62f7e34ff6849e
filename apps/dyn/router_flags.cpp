#include "apps/dyn/router_flags.h"

#include "base/flags.h"

namespace dyn {

void RouterFlags::Register(FlagSet& fs) {
  fs.String("router-mode", &mode, "round-robin | random | least-loaded | kv");
  fs.String("router", &mode_alias, "same as --router-mode (wins when set)");
  fs.Double("kv-overlap-score-weight", &overlap_weight, "kv router: weight of prefill cost against decode load");
  fs.Double("router-temperature", &temperature, "kv router: 0 picks the cheapest worker; > 0 samples");
  fs.Bool("kv-events", &kv_events, "kv router: index the workers' KV events; false: approximate mode (no events)");
  fs.Int("kv-block-size", &kv_block_size, "kv router: block size in tokens (0: the workers' own)");
  fs.Double("active-decode-blocks-threshold", &busy_kv_usage,
            "kv router: a worker whose KV usage (0..1) is above this is busy; all busy -> 503 (< 0: off)");
  fs.Int("active-prefill-tokens-threshold", &busy_prefill_tokens,
         "kv router: a worker with more active prefill tokens than this is busy (< 0: off)");
  fs.Int("migration-limit", &migration_limit, "times a stream may move to another worker when its own fails");
}

void RouterFlags::RegisterDisagg(FlagSet& fs) {
  fs.Int("max-local-prefill-tokens", &max_local_prefill_tokens,
         "disaggregated serving: prefill on the decode worker when prompt tokens minus the prefix it already "
         "holds (kv router) are at most this; more go to a prefill worker (0: all that have a prefill worker)");
}

Result<RemoteEngineOptions> RouterFlags::ToOptions(bool have_events) const {
  RemoteEngineOptions ro;
  DYN_ASSIGN_OR_RETURN(ro.mode, ParseRouterMode(mode_alias.empty() ? mode : mode_alias));
  ro.migration_limit = static_cast<int>(migration_limit);
  ro.overlap_weight = overlap_weight;
  ro.temperature = temperature;
  ro.use_kv_events = kv_events && have_events;
  ro.kv_block_size = static_cast<int>(kv_block_size);
  if (busy_kv_usage >= 0) ro.busy_kv_usage = busy_kv_usage;
  if (busy_prefill_tokens >= 0) ro.busy_prefill_tokens = busy_prefill_tokens;
  return ro;
}

}  // namespace dyn
