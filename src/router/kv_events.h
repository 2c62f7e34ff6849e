// KV cache events as the router consumes them (see design/FACTS.md, "KV events").
//
// Engines announce which prefix blocks they hold. Each event names its worker, the data-parallel
// rank that emitted it and a per-(worker, rank) monotonic event id, so the router can see lost
// events (a gap) and recover with a dump. A block carries two hashes: the engine's opaque id
// (block_hash: used only to link a child to its parent and to name blocks in Removed) and the
// router's local hash of the block's tokens (tokens_hash: XXH3-64 of the token ids, block_hash.h),
// from which the router derives its own chained sequence hash. Event decoders (ZMQ/msgpack,
// BlockPool's KvEventSink) fill tokens_hash with FillTokensHashes when they only have token ids.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "kv/block_hash.h"

namespace dyn::router {

// One candidate for routing: a worker instance and one of its data-parallel ranks.
struct WorkerKey {
  uint64_t worker_id = 0;
  uint32_t dp_rank = 0;
  friend bool operator==(const WorkerKey&, const WorkerKey&) = default;
  friend auto operator<=>(const WorkerKey&, const WorkerKey&) = default;
  std::string ToString() const { return std::to_string(worker_id) + "/" + std::to_string(dp_rank); }
};

struct WorkerKeyHash {
  size_t operator()(const WorkerKey& k) const {
    return std::hash<uint64_t>()(k.worker_id * 0x9E3779B97F4A7C15ull ^ k.dp_rank);
  }
};

// Where the blocks live. The indexer tracks device blocks by default: a block offloaded to host
// memory is not a GPU prefix hit, and Removed from one tier must not erase it from another.
enum class StorageTier { kDevice, kHost, kDisk, kExternal };

struct StoredBlock {
  uint64_t block_hash = 0;             // engine's opaque id
  uint64_t tokens_hash = 0;            // router's local hash of the block's tokens
  std::vector<uint32_t> token_ids;     // optional; empty when the engine did not send them
};

struct StoredData {
  std::optional<uint64_t> parent_hash;  // engine id of the block before blocks[0]; none: a root
  std::vector<StoredBlock> blocks;      // a chain, parent first
};

struct RemovedData {
  std::vector<uint64_t> block_hashes;  // engine ids
};

struct ClearedData {};

struct RouterEvent {
  WorkerKey worker;
  // Per-worker monotonic, starting at 1. 0 means "unsequenced" (dumps, the router's own
  // approximate-mode inserts): no gap check, does not move the sequence.
  uint64_t event_id = 0;
  StorageTier tier = StorageTier::kDevice;
  std::variant<StoredData, RemovedData, ClearedData> data;
};

// Sets tokens_hash of every block that has token ids from those ids (seed: kBlockHashSeed, or
// BlockHashSeedForLora(adapter)). Blocks without token ids keep their tokens_hash.
inline void FillTokensHashes(StoredData& stored, uint64_t seed = kBlockHashSeed) {
  for (auto& b : stored.blocks) {
    if (!b.token_ids.empty()) b.tokens_hash = HashBlockTokens(b.token_ids, seed);
  }
}

}  // namespace dyn::router
