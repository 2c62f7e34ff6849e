// How an engine hands KV to, and takes KV from, another worker in disaggregated serving, without
// knowing any transport: the worker process wires these to a transfer backend
// (transfer/kv_transfer.h) and its request plane. Shared by the native engine and the mocker.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <cstddef>

#include "base/status.h"

namespace dyn {

// What one block of an engine's KV cache holds, and how many there are: a transfer between two
// engines is refused unless both agree on everything but num_blocks.
struct KvCacheGeometry {
  int block_size = 0;  // tokens per block
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  std::string dtype = "f32";
  size_t block_bytes = 0;  // one block, all layers, K and V, contiguous
  int num_blocks = 0;
};

struct KvTransferHooks {
  // Engine start-up, optional: host memory of num_blocks * block_bytes bytes for the KV cache,
  // given by the transfer layer (shared memory, so a same-host peer copies straight out of it).
  // Unset: the engine's backend allocates the cache itself.
  std::function<Result<void*>(const KvCacheGeometry&)> allocate_cache;
  // Engine start-up, after the cache exists: its geometry and host address (the transfer source
  // serves reads from there; the sink writes there). Failing it fails the engine's creation.
  std::function<Status(const KvCacheGeometry&, void* base)> cache_ready;
  // Prefill side: the descriptor (opaque text, JSON) of `blocks`, which the engine keeps under
  // lease `lease_id` and which hold the KV of the first `num_tokens` prompt tokens.
  std::function<Result<std::string>(uint64_t lease_id, std::span<const int32_t> blocks, int num_tokens)> describe;
  // Decode side: copies the descriptor's blocks [first_block, first_block + dst.size()) into the
  // local blocks `dst` (blocks before first_block were found in the local prefix cache). Runs on
  // a transfer thread, never the step thread; returns the bytes copied or the failure.
  std::function<Result<size_t>(const std::string& descriptor, int first_block, std::span<const int32_t> dst)> pull;
  // Decode side: the source's lease can go (after the copy, or after it failed).
  std::function<void(const std::string& descriptor)> release;
  // Prefill side: a lease nobody releases (decode worker dead, never pulled) ends after this.
  std::chrono::milliseconds lease_timeout{30000};

  bool can_prefill() const { return static_cast<bool>(describe); }
  bool can_import() const { return static_cast<bool>(pull); }
};

}  // namespace dyn
