// KV events of external engines (vLLM, SGLang) as they publish them on ZMQ, decoded into router
// events (design/FACTS.md, "vLLM/SGLang wire"). Pure decoding, no sockets: the ZMQ subscriber
// lives in runtime/zmq_kv_source.h.
//
// A message is three frames: topic, an 8-byte big-endian sequence number, and a msgpack payload
//   [timestamp: f64, events: [event...], dp_rank: int | nil]
// where each event is a tagged array:
//   ["BlockStored", block_hashes[], parent_hash | nil, token_ids[], block_size, lora_id | nil,
//    medium | nil, lora_name | nil, ...]
//   ["BlockRemoved", block_hashes[], medium | nil, ...]
//   ["AllBlocksCleared"]
// Hashes are signed or unsigned 64-bit ints, or bytes (the last 8, big-endian). Unknown trailing
// fields are ignored; unknown event tags are skipped and counted.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "router/kv_events.h"

namespace dyn::router {

struct ExternalEventBatch {
  double timestamp = 0;
  std::optional<uint32_t> dp_rank;
  std::vector<RouterEvent> events;  // worker = {worker_id, dp_rank or 0}; event_id 0 (unsequenced)
  size_t skipped = 0;               // events with an unknown tag
};

// Decodes one payload frame. Stored blocks get tokens_hash from their token ids (the router's
// own hash, with the LoRA adapter's seed when lora_name is given). InvalidArgument on malformed
// msgpack or events.
Result<ExternalEventBatch> DecodeVllmKvEvents(std::span<const uint8_t> payload, uint64_t worker_id);

// The sequence number frame: 8 bytes big-endian.
Result<uint64_t> DecodeVllmSequence(std::span<const uint8_t> frame);

}  // namespace dyn::router
