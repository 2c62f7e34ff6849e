// Scheduler: continuous batching over a BlockPool, in the manner of vLLM v1.
//
// Sequences wait in a FCFS queue and run in admission order. Each Schedule() builds one step's
// batch under max_num_batched_tokens (tokens computed this step) and max_num_seqs (running
// sequences): running sequences first (a decode is one token, a partially prefilled prompt gets
// its next chunk), then waiting sequences are admitted in order while blocks and budget last (a
// sequence that does not fit blocks the queue: no overtaking). On admission the prefix cache is
// consulted: the longest cached run of full blocks is taken over, capped so that at least the
// last token is computed (it yields the logits); a fully cached prompt whose length is a
// multiple of the block size therefore recomputes its last block. Long prompts are split across
// steps (chunked prefill). When a running sequence needs a block and none is free, the most
// recently admitted running sequence is preempted in recompute mode: its blocks are released
// (registered ones stay cached), and it goes back to the front of the waiting queue with its
// generated tokens, to be recomputed as prompt + generated.
//
// The scheduler owns no model, thread or clock: the native engine runs a forward pass over the
// batch, the mocker a timing model. Protocol per step:
//   out = Schedule();  run out.batch;  CommitStep();
//   for each chunk with sample: AppendToken(id, token) or Finish(id);
// Finish(id) may also be called at any step boundary (cancellation). Not thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"
#include "kv/block_pool.h"

namespace dyn {

struct EngineMetrics;
using SeqId = uint64_t;

struct SchedulerConfig {
  int max_num_seqs = 64;              // running sequences
  int max_num_batched_tokens = 2048;  // tokens computed per step, >= 1
  uint64_t hash_seed = 0;             // 0: kBlockHashSeed (block_hash.h)
};

// One sequence's share of a step. Spans point into the scheduler's state and stay valid until
// the next call that changes that sequence (AppendToken, Finish, Schedule).
struct ScheduledChunk {
  SeqId id = 0;
  std::span<const uint32_t> tokens;      // tokens to compute this step
  int start_pos = 0;                     // position of tokens[0]; KV of [0, start_pos) is cached
  std::span<const int32_t> block_table;  // covers [0, start_pos + tokens.size())
  bool sample = false;                   // the chunk ends at the sequence's last token
};

struct SchedulerOutput {
  std::vector<ScheduledChunk> batch;             // running order
  std::vector<SeqId> preempted;                  // moved back to the waiting queue this step
  std::vector<std::pair<SeqId, Status>> failed;  // removed: they can never fit in the pool
  int num_batched_tokens = 0;
  int num_decode_tokens = 0;  // chunks of one token continuing a fully computed sequence
};

class Scheduler {
 public:
  // Borrows `pool`, which must outlive the scheduler and serve no one else.
  Scheduler(BlockPool& pool, SchedulerConfig config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a sequence at the back of the waiting queue. Fails, queueing nothing, if the prompt
  // is empty, the id is in use, or the prompt needs more blocks than the pool has.
  Status Add(SeqId id, std::vector<uint32_t> prompt);

  // Builds the next step's batch (and commits the previous step if CommitStep was not called).
  SchedulerOutput Schedule();

  // Records that the last batch's KV is computed, registering blocks that became full in the
  // prefix cache. Idempotent until the next Schedule.
  void CommitStep();

  // Forgets the last batch without marking its KV computed (its forward pass failed): the
  // sequences will recompute those tokens if they are scheduled again.
  void DiscardStep();

  // Appends a sampled token to a running sequence; it is computed in a later step.
  void AppendToken(SeqId id, uint32_t token);

  // Pipelined decode (the engine launches a step before the previous one's ids are back): the
  // engine appends a placeholder, schedules it, and replaces it with the real id before the step
  // that computes it is committed (so the block it completes is hashed with the real id). False if
  // the id is unknown.
  bool ReplaceLastToken(SeqId id, uint32_t token);

  // Removes a running, waiting or importing sequence and releases its blocks. False if the id is
  // unknown.
  bool Finish(SeqId id);

  // ---- disaggregated serving (prefill on one worker, decode on another) ----
  // Prefill side: removes a running sequence whose prompt KV is computed but keeps its blocks
  // referenced, and returns them. The caller owns those references (a lease while a decode worker
  // copies them) and gives them back with ReleaseDetached. Full blocks were registered in the
  // prefix cache as usual, so later requests still reuse them.
  std::vector<int32_t> Detach(SeqId id);
  void ReleaseDetached(std::span<const int32_t> blocks) { pool_.Release(blocks); }

  // Decode side: a sequence whose prompt KV is computed elsewhere. Reserve allocates blocks for the
  // whole prompt now, reusing the longest run of full blocks already in the local prefix cache
  // (those need no copy); the sequence then waits, never scheduled, until ActivateImported (the
  // copy into blocks [cached_blocks, end) is done) or Finish (it failed). ResourceExhausted when
  // the blocks are not free now (retry later); InvalidArgument for an empty prompt or a used id.
  struct ImportPlan {
    std::vector<int32_t> block_table;  // covers the prompt
    int cached_blocks = 0;             // leading blocks found locally
  };
  Result<ImportPlan> ReserveForImport(SeqId id, std::vector<uint32_t> prompt);
  // The whole prompt's KV is in the blocks: the sequence joins the running set as if it had been
  // prefilled here (its full blocks enter the prefix cache) with `first_token`, sampled by the
  // prefill worker, appended. It may take the running set past max_num_seqs until it drains: call
  // it when num_running() < max_num_seqs to avoid that.
  void ActivateImported(SeqId id, uint32_t first_token);
  int num_importing() const { return num_importing_; }

  bool Contains(SeqId id) const { return seqs_.count(id) != 0; }
  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool has_unfinished() const { return !seqs_.empty(); }

  // Prompt tokens served from the prefix cache when the sequence was first admitted; -1 before.
  int first_cached_tokens(SeqId id) const;
  // All tokens of the sequence (prompt, then generated) and the prompt length.
  std::span<const uint32_t> tokens(SeqId id) const;
  int prompt_len(SeqId id) const;

  // Totals since construction.
  uint64_t num_preemptions() const { return num_preemptions_; }
  uint64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }  // every admission, resumes included
  uint64_t computed_tokens() const { return computed_tokens_; }

  const BlockPool& pool() const { return pool_; }
  // Sets the metrics the scheduler and its pool know (running, waiting, KV blocks total / used /
  // cached, preemptions), for the engines that drive it.
  void FillMetrics(EngineMetrics& m) const;

 private:
  struct Sequence;

  int BlocksFor(int tokens) const { return (tokens + pool_.block_size() - 1) / pool_.block_size(); }
  Sequence& Get(SeqId id) const;
  void Preempt(Sequence& seq, SchedulerOutput& out);
  void ReleaseBlocks(Sequence& seq);
  void Emit(Sequence& seq, int n, SchedulerOutput& out);
  void RegisterComputedBlocks(Sequence& seq);

  BlockPool& pool_;
  SchedulerConfig config_;
  std::unordered_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  std::vector<Sequence*> running_;  // admission order
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> pending_;  // scheduled in the last batch, not yet committed
  uint64_t num_preemptions_ = 0;
  uint64_t prefix_hit_tokens_ = 0;
  uint64_t computed_tokens_ = 0;
  int num_importing_ = 0;
};

}  // namespace dyn
