// KV events on the event plane: a worker's block pool events (kv/block_pool.h) as JSON messages
// on subject "dyn.<namespace>.kv_events", decoded by frontends into router events
// (router/kv_events.h). One message per event:
//
//   {"worker_id": "<u64>", "dp_rank": 0, "event_id": 7, "tier": "device",
//    "type": "stored", "parent_hash": "<u64>" | null,
//    "blocks": [{"block_hash": "<u64>", "tokens_hash": "<u64>", "token_ids": [..] (optional)}, ..]}
//   {"type": "removed", "block_hashes": ["<u64>", ..], ...}    {"type": "cleared", ...}
//
// 64-bit values travel as decimal strings (JSON readers elsewhere lose precision on them).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "kv/block_pool.h"
#include "router/kv_events.h"

namespace dyn {

std::string KvEventsSubject(std::string_view ns);  // "dyn.<ns>.kv_events"
// A pool event as the router sees it (tokens_hash recomputed from the token ids).
router::RouterEvent ToRouterEvent(uint64_t worker_id, const KvEvent& event);
// Token ids are left out unless asked for: routers need only the blocks' tokens_hash, and a
// 10k-token prompt's ids would make its event ~60 KB of JSON to write, send and parse.
std::string EncodeRouterEvent(const router::RouterEvent& event, bool with_token_ids = false);
std::string EncodeKvEvent(uint64_t worker_id, const KvEvent& event);
// InvalidArgument on malformed messages.
Result<router::RouterEvent> DecodeKvEvent(std::string_view json);

// A worker's whole cache as a router would index it, served on its "kv_dump" request-plane
// endpoint so a router that lost events (an event-id gap) or just started can resynchronise:
//   {"worker_id": "<u64>", "last_event_id": N, "events": [<unsequenced stored events>]}
// Applying Cleared, then the events, then last_event_id as the worker's last applied id gives the
// state after event N.
struct KvDump {
  uint64_t worker_id = 0;
  uint64_t last_event_id = 0;
  std::vector<router::RouterEvent> events;
};
std::string EncodeKvDump(const KvDump& dump);
Result<KvDump> DecodeKvDump(std::string_view json);

}  // namespace dyn
