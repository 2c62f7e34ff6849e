// BlockPool: a fixed set of KV blocks with reference counts and a prefix cache.
//
// Blocks hold block_size tokens of KV. A running request references the blocks of its block
// table; a full block whose KV is computed is registered under its sequence hash (block_hash.h)
// and stays cached after its last reference is dropped: it is then free (allocatable) but a new
// request with the same prefix can take it back. Free blocks wait in one LRU queue; allocation
// takes from the head, evicting the cached prefix a block held. Blocks are released tail-first
// (a chain's last block enters the queue before its parents), so leaves are evicted before their
// parents, as in vLLM. Blocks that hold no registered prefix go to the head: they are reused
// before any cached block.
//
// Pure logic: no threads, no I/O, not thread-safe (the engine's step thread owns it).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace dyn {

struct KvStoredBlock {
  uint64_t block_hash = 0;   // the sequence hash the pool registered the block under
  uint64_t tokens_hash = 0;  // local hash of the block's tokens
  std::vector<uint32_t> token_ids;
};

// A change to the set of cached blocks, in the shape of Dynamo's KV events.
struct KvEvent {
  enum class Type { kStored, kRemoved, kCleared };
  Type type = Type::kStored;
  uint64_t event_id = 0;                // per pool, starts at 1, +1 per event: a gap means loss
  std::optional<uint64_t> parent_hash;  // kStored: hash of the block before blocks[0], if any
  std::vector<KvStoredBlock> blocks;    // kStored: a chain, parent first
  std::vector<uint64_t> removed;        // kRemoved: block hashes
};

// Receives KV events synchronously, on the thread that calls the pool. Must not call back into it.
class KvEventSink {
 public:
  virtual ~KvEventSink() = default;
  virtual void OnKvEvent(const KvEvent& event) = 0;
};

class BlockPool {
 public:
  // num_blocks >= 1, block_size >= 1. With prefix caching off, nothing is ever registered.
  BlockPool(int num_blocks, int block_size, bool enable_prefix_caching = true);

  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }

  // Blocks that Allocate can hand out now (unreferenced, cached or not).
  int num_free_blocks() const { return num_free_; }
  // Blocks referenced by at least one request.
  int num_used_blocks() const { return num_blocks() - num_free_; }
  // Free blocks that still hold a registered prefix.
  int num_cached_free_blocks() const { return num_cached_free_; }
  // Registered blocks, referenced or not.
  int num_cached_blocks() const { return static_cast<int>(cached_.size()); }

  // The blocks caching the longest prefix of `sequence_hashes` (leading hashes that are all
  // registered), at most max_blocks. Takes no references: call Acquire before the next Allocate.
  std::vector<int32_t> MatchPrefix(std::span<const uint64_t> sequence_hashes, size_t max_blocks) const;

  // How many of `ids` are unreferenced (taking them reduces num_free_blocks by that much).
  int CountUnreferenced(std::span<const int32_t> ids) const;

  // Takes one reference on each block (cached free blocks leave the free queue).
  void Acquire(std::span<const int32_t> ids);

  // Appends n fresh blocks (one reference each) to `out`, LRU first, evicting the prefixes they
  // held (one kRemoved event). Returns false and changes nothing if fewer than n are free.
  bool Allocate(int n, std::vector<int32_t>& out);

  // Drops one reference per block. `block_table` is in chain order; blocks are released from the
  // last to the first, so a chain's tail is evicted before its head.
  void Release(std::span<const int32_t> block_table);

  // Registers full, computed blocks of one sequence: ids[i] holds the tokens
  // tokens[i*block_size, (i+1)*block_size) whose sequence hash is sequence_hashes[i] and local
  // hash local_hashes[i]; parent_hash is the sequence hash of the block before ids[0] (none for
  // the first block of a sequence). Blocks must be referenced. A block whose hash is already
  // registered (to another block: a duplicate computed concurrently) stays unregistered. Emits
  // kStored for each contiguous run of newly registered blocks. No-op without prefix caching.
  void RegisterBlocks(std::span<const int32_t> ids, std::span<const uint64_t> sequence_hashes,
                      std::span<const uint64_t> local_hashes, std::optional<uint64_t> parent_hash,
                      std::span<const uint32_t> tokens);

  // Whether block `id` is registered in the prefix cache.
  bool IsRegistered(int32_t id) const { return blocks_[id].registered; }
  int RefCount(int32_t id) const { return blocks_[id].ref; }

  // Forgets every registered prefix (referenced blocks stay allocated) and emits kCleared.
  void ClearCache();

  // Events go to `sink` from now on (nullptr: none). The sink must outlive the pool or be reset.
  void SetEventSink(KvEventSink* sink) { sink_ = sink; }
  uint64_t last_event_id() const { return next_event_id_ - 1; }

 private:
  struct Block {
    int ref = 0;
    bool registered = false;
    bool in_free_queue = false;
    uint64_t hash = 0;
    int32_t prev = -1, next = -1;  // free queue links
  };

  void PushFront(int32_t id);
  void PushBack(int32_t id);
  void Unlink(int32_t id);
  void Emit(KvEvent event);

  int block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  int32_t head_ = -1, tail_ = -1;
  int num_free_ = 0;
  int num_cached_free_ = 0;
  std::unordered_map<uint64_t, int32_t> cached_;  // sequence hash -> block
  KvEventSink* sink_ = nullptr;
  uint64_t next_event_id_ = 1;
};

}  // namespace dyn
