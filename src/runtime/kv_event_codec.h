// KV events on the event plane: a worker's block pool events (kv/block_pool.h) as JSON messages
// on subject "dyn.<namespace>.kv_events", decoded by frontends into router events
// (router/kv_events.h). One message per event:
//
//   {"worker_id": "<u64>", "dp_rank": 0, "event_id": 7, "tier": "device",
//    "type": "stored", "parent_hash": "<u64>" | null,
//    "blocks": [{"block_hash": "<u64>", "tokens_hash": "<u64>", "token_ids": [..]}, ..]}
//   {"type": "removed", "block_hashes": ["<u64>", ..], ...}    {"type": "cleared", ...}
//
// 64-bit values travel as decimal strings (JSON readers elsewhere lose precision on them).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"
#include "kv/block_pool.h"
#include "router/kv_events.h"

namespace dyn {

std::string KvEventsSubject(std::string_view ns);  // "dyn.<ns>.kv_events"
std::string EncodeKvEvent(uint64_t worker_id, const KvEvent& event);
// InvalidArgument on malformed messages.
Result<router::RouterEvent> DecodeKvEvent(std::string_view json);

}  // namespace dyn
