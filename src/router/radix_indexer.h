// RadixIndexer: which worker holds which prefix blocks, built from KV events.
//
// The tree is the prefix tree of block chains, keyed by the router's sequence hash (block_hash.h:
// seq[0] = local[0], seq[i] = chain(seq[i-1], local[i])). Because a sequence hash names the whole
// prefix up to its block, the tree needs no child maps: one flat hash map from sequence hash to
// node is the tree, and a lookup of the request's i-th sequence hash is the walk to depth i. Each
// node lists the workers (dense indices, sorted) that hold the block.
//
// Per worker there is a map engine block hash -> entry, because engines name parents and removed
// blocks by their own opaque ids. A Stored block's sequence hash is computed from its parent's
// (looked up by engine id for that worker) and its tokens_hash.
//
// Semantics (design/FACTS.md "KV events"):
// - Stored with a parent the worker does not hold: the event is dropped and counted.
// - Removed does not cascade: descendants stay, but a match can no longer pass the hole.
// - Cleared drops all of a worker's blocks; RemoveWorker also forgets the worker.
// - event_id must be last + 1 per worker (the first expected is 1). A gap is reported and counted
//   and the event is still applied; the caller should fetch a dump (Dump on a peer router, or the
//   engine's) and apply Cleared + the dump + SetLastEventId. An id <= last is a duplicate and is
//   ignored. event_id 0 is unsequenced.
// - Events of a tier not in Config::tiers advance the sequence but change nothing.
//
// Not thread-safe: one owner thread (the router's event loop) or an external mutex.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "router/kv_events.h"

namespace dyn::router {

enum class ApplyCode {
  kApplied,
  kGap,                    // applied, but events before it were lost
  kDroppedUnknownParent,   // Stored whose parent the worker does not hold: nothing changed
  kDuplicate,              // event_id <= the last applied: ignored
  kIgnoredTier,            // a tier the indexer does not track: only the sequence moved
};

struct ApplyResult {
  ApplyCode code = ApplyCode::kApplied;
  std::string message;  // "gap: expected N got M", ...
  // True when the caller must resynchronise the worker (request a dump).
  bool needs_resync() const { return code == ApplyCode::kGap; }
  bool changed_nothing() const { return code == ApplyCode::kDroppedUnknownParent || code == ApplyCode::kDuplicate; }
};

struct WorkerMatch {
  WorkerKey worker;
  uint32_t depth = 0;      // consecutive request blocks from the start this worker holds
  size_t tree_size = 0;    // blocks the worker holds
};

struct IndexerStats {
  uint64_t events_applied = 0;
  uint64_t dropped_unknown_parent = 0;
  uint64_t gaps = 0;
  uint64_t duplicates = 0;
  uint64_t ignored_tier = 0;
};

class RadixIndexer {
 public:
  struct Config {
    uint64_t hash_seed = kBlockHashSeed;  // for chaining sequence hashes (LoRA: its seed)
    bool track_device = true, track_host = false, track_disk = false, track_external = false;
  };
  RadixIndexer() : RadixIndexer(Config{}) {}
  explicit RadixIndexer(Config config);

  ApplyResult ApplyEvent(const RouterEvent& event);

  // Matches a request given its router *sequence* hashes (ComputeSequenceBlockHashes): one hash
  // lookup per block, no chaining work here. Returns the workers holding at least the first block,
  // with their matched depth, in no particular order. Walks the chain once, intersecting the set
  // of still-matching workers, and stops when it is empty.
  std::vector<WorkerMatch> FindMatches(std::span<const uint64_t> sequence_hashes) const;
  // Same, from local block hashes (chains them first).
  std::vector<WorkerMatch> FindMatchesLocal(std::span<const uint64_t> local_hashes) const;

  // Blocks a worker holds (0 for an unknown worker).
  size_t TreeSize(const WorkerKey& worker) const;
  // Blocks held, summed over workers.
  size_t total_blocks() const { return total_blocks_; }
  // Distinct sequence hashes indexed.
  size_t num_nodes() const { return nodes_.size(); }
  std::vector<WorkerKey> Workers() const;

  // Drops the worker's blocks and forgets its event sequence.
  void RemoveWorker(const WorkerKey& worker);

  // The worker's blocks as unsequenced Stored events (one block each), every parent before its
  // children. Blocks cut off from the root by a Removed (orphans, which no match can reach) are
  // left out: applying Cleared and then the dump gives the same FindMatches results, and the same
  // tree size unless the worker had orphans.
  std::vector<RouterEvent> Dump(const WorkerKey& worker) const;
  // Sets the last applied event id of a worker (after a resync from a dump).
  void SetLastEventId(const WorkerKey& worker, uint64_t event_id);
  uint64_t LastEventId(const WorkerKey& worker) const;

  const IndexerStats& stats() const { return stats_; }

 private:
  struct Holder {
    uint32_t worker;  // dense index
    uint32_t refs;    // engine blocks of this worker with this sequence hash (normally 1)
  };
  struct Node {
    uint64_t tokens_hash = 0;
    std::vector<Holder> holders;  // sorted by worker
  };
  struct Entry {
    uint64_t seq_hash = 0;
    bool has_parent = false;
    uint64_t parent_engine_hash = 0;
  };
  struct WorkerState {
    WorkerKey key;
    bool live = false;
    uint64_t last_event_id = 0;
    std::unordered_map<uint64_t, Entry> blocks;  // engine hash -> entry
  };
  // Sequence hashes are already uniformly distributed; rehashing them buys nothing.
  struct IdentityHash {
    size_t operator()(uint64_t h) const { return static_cast<size_t>(h); }
  };

  uint32_t WorkerIndex(const WorkerKey& key);  // creates
  const WorkerState* FindWorker(const WorkerKey& key) const;
  bool Tracks(StorageTier tier) const;
  ApplyCode ApplyStored(uint32_t w, const StoredData& stored);
  void ApplyRemoved(uint32_t w, const RemovedData& removed);
  void ClearWorker(uint32_t w);
  void AddHolder(uint64_t seq_hash, uint64_t tokens_hash, uint32_t w);
  void DropHolder(uint64_t seq_hash, uint32_t w);

  Config config_;
  std::unordered_map<uint64_t, Node, IdentityHash> nodes_;
  std::vector<WorkerState> workers_;
  std::unordered_map<WorkerKey, uint32_t, WorkerKeyHash> worker_index_;
  std::vector<uint32_t> free_indices_;
  size_t total_blocks_ = 0;
  IndexerStats stats_;
};

const char* ApplyCodeName(ApplyCode code);

}  // namespace dyn::router
