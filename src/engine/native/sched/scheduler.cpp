#include "engine/native/sched/scheduler.h"

#include <algorithm>
#include <cassert>
#include <string>

#include "engine/engine.h"
#include "kv/block_hash.h"

namespace dyn {

struct Scheduler::Sequence {
  SeqId id = 0;
  std::vector<uint32_t> tokens;  // prompt, then generated
  int prompt_len = 0;
  int num_computed = 0;   // tokens whose KV is in block_table (committed)
  int num_scheduled = 0;  // tokens of the uncommitted batch
  std::vector<int32_t> block_table;
  std::vector<uint64_t> local_hashes, sequence_hashes;  // of every full block of tokens
  int num_registered = 0;  // leading blocks of block_table already in the prefix cache
  int first_cached_tokens = -1;
  bool running = false;
  bool importing = false;  // reserved for imported KV, not yet activated
};

Scheduler::Scheduler(BlockPool& pool, SchedulerConfig config) : pool_(pool), config_(config) {
  assert(config_.max_num_seqs >= 1 && config_.max_num_batched_tokens >= 1);
  if (config_.hash_seed == 0) config_.hash_seed = kBlockHashSeed;
}

Scheduler::~Scheduler() = default;

Scheduler::Sequence& Scheduler::Get(SeqId id) const {
  auto it = seqs_.find(id);
  assert(it != seqs_.end());
  return *it->second;
}

Status Scheduler::Add(SeqId id, std::vector<uint32_t> prompt) {
  if (prompt.empty()) return Status::InvalidArgument("empty prompt");
  if (seqs_.count(id)) return Status::InvalidArgument("sequence id " + std::to_string(id) + " is already in use");
  const int need = BlocksFor(static_cast<int>(prompt.size()));
  if (need > pool_.num_blocks()) {
    return Status::ResourceExhausted("prompt of " + std::to_string(prompt.size()) + " tokens needs " +
                                     std::to_string(need) + " KV blocks but the pool has only " +
                                     std::to_string(pool_.num_blocks()) + " of " +
                                     std::to_string(pool_.block_size()) + " tokens");
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->prompt_len = static_cast<int>(prompt.size());
  seq->tokens = std::move(prompt);
  if (pool_.prefix_caching()) {
    ExtendBlockHashes(seq->tokens, pool_.block_size(), config_.hash_seed, seq->local_hashes, seq->sequence_hashes);
  }
  waiting_.push_back(seq.get());
  seqs_.emplace(id, std::move(seq));
  return Status::Ok();
}

void Scheduler::RegisterComputedBlocks(Sequence& seq) {
  Sequence* s = &seq;
  const int bs = pool_.block_size();
  const int full = std::min(s->num_computed / bs, static_cast<int>(s->sequence_hashes.size()));
  if (full <= s->num_registered) return;
  const int from = s->num_registered;
  const int count = full - from;
  std::optional<uint64_t> parent;
  if (from > 0) parent = s->sequence_hashes[from - 1];
  pool_.RegisterBlocks(std::span(s->block_table).subspan(from, count),
                       std::span(s->sequence_hashes).subspan(from, count),
                       std::span(s->local_hashes).subspan(from, count), parent,
                       std::span(s->tokens).subspan(static_cast<size_t>(from) * bs, static_cast<size_t>(count) * bs));
  s->num_registered = full;
}

void Scheduler::CommitStep() {
  for (Sequence* s : pending_) {
    s->num_computed += s->num_scheduled;
    s->num_scheduled = 0;
    RegisterComputedBlocks(*s);
  }
  pending_.clear();
}

void Scheduler::DiscardStep() {
  for (Sequence* s : pending_) s->num_scheduled = 0;
  pending_.clear();
}

void Scheduler::AppendToken(SeqId id, uint32_t token) {
  Sequence& s = Get(id);
  assert(s.running && s.num_scheduled == 0);
  s.tokens.push_back(token);
  if (pool_.prefix_caching()) {
    ExtendBlockHashes(s.tokens, pool_.block_size(), config_.hash_seed, s.local_hashes, s.sequence_hashes);
  }
}

bool Scheduler::ReplaceLastToken(SeqId id, uint32_t token) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return false;
  Sequence& s = *it->second;
  assert(static_cast<int>(s.tokens.size()) > s.prompt_len && s.num_computed < static_cast<int>(s.tokens.size()));
  s.tokens.back() = token;
  const size_t bs = static_cast<size_t>(pool_.block_size());
  if (pool_.prefix_caching() && s.tokens.size() % bs == 0 && s.local_hashes.size() == s.tokens.size() / bs) {
    // The block the token completes was hashed with the placeholder; it is not registered yet
    // (its KV is not committed), so its hash is simply recomputed.
    assert(static_cast<size_t>(s.num_registered) < s.local_hashes.size());
    s.local_hashes.pop_back();
    s.sequence_hashes.pop_back();
    ExtendBlockHashes(s.tokens, pool_.block_size(), config_.hash_seed, s.local_hashes, s.sequence_hashes);
  }
  return true;
}

void Scheduler::ReleaseBlocks(Sequence& s) {
  pool_.Release(s.block_table);
  s.block_table.clear();
  s.num_computed = 0;
  s.num_scheduled = 0;
  s.num_registered = 0;
}

bool Scheduler::Finish(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return false;
  CommitStep();  // a finished sequence's last blocks are still worth caching
  Sequence* s = it->second.get();
  if (s->running) {
    running_.erase(std::find(running_.begin(), running_.end(), s));
  } else if (s->importing) {
    --num_importing_;
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), s));
  }
  ReleaseBlocks(*s);
  seqs_.erase(it);
  return true;
}

std::vector<int32_t> Scheduler::Detach(SeqId id) {
  CommitStep();
  Sequence& s = Get(id);
  assert(s.running && s.num_computed >= s.prompt_len);
  running_.erase(std::find(running_.begin(), running_.end(), &s));
  std::vector<int32_t> blocks = std::move(s.block_table);
  seqs_.erase(id);
  return blocks;
}

Result<Scheduler::ImportPlan> Scheduler::ReserveForImport(SeqId id, std::vector<uint32_t> prompt) {
  if (prompt.empty()) return Status::InvalidArgument("empty prompt");
  if (seqs_.count(id)) return Status::InvalidArgument("sequence id " + std::to_string(id) + " is already in use");
  const int total = static_cast<int>(prompt.size());
  if (BlocksFor(total) > pool_.num_blocks()) {
    return Status::InvalidArgument("prompt of " + std::to_string(total) + " tokens needs " +
                                   std::to_string(BlocksFor(total)) + " KV blocks but the pool has only " +
                                   std::to_string(pool_.num_blocks()));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->prompt_len = total;
  seq->tokens = std::move(prompt);
  if (pool_.prefix_caching()) {
    ExtendBlockHashes(seq->tokens, pool_.block_size(), config_.hash_seed, seq->local_hashes, seq->sequence_hashes);
  }
  // Nothing is computed here, so every cached full block counts (no last-token rule).
  std::vector<int32_t> hit = pool_.MatchPrefix(seq->sequence_hashes, seq->sequence_hashes.size());
  const int need = BlocksFor(total) - static_cast<int>(hit.size());
  if (need > pool_.num_free_blocks() - pool_.CountUnreferenced(hit)) {
    return Status::ResourceExhausted("not enough free KV blocks to import " + std::to_string(total) + " tokens now");
  }
  pool_.Acquire(hit);
  seq->block_table = std::move(hit);
  const int cached = static_cast<int>(seq->block_table.size());
  if (need > 0) {
    [[maybe_unused]] bool ok = pool_.Allocate(need, seq->block_table);
    assert(ok);
  }
  seq->num_registered = cached;
  seq->first_cached_tokens = std::min(total, cached * pool_.block_size());
  prefix_hit_tokens_ += static_cast<uint64_t>(seq->first_cached_tokens);
  seq->importing = true;
  ++num_importing_;
  ImportPlan plan{seq->block_table, cached};
  seqs_.emplace(id, std::move(seq));
  return plan;
}

void Scheduler::ActivateImported(SeqId id, uint32_t first_token) {
  Sequence& s = Get(id);
  assert(s.importing);
  s.importing = false;
  --num_importing_;
  s.num_computed = s.prompt_len;
  RegisterComputedBlocks(s);
  s.running = true;
  running_.push_back(&s);
  AppendToken(id, first_token);
}

void Scheduler::Preempt(Sequence& s, SchedulerOutput& out) {
  running_.erase(std::find(running_.begin(), running_.end(), &s));
  ReleaseBlocks(s);
  s.running = false;
  waiting_.push_front(&s);
  out.preempted.push_back(s.id);
  ++num_preemptions_;
}

void Scheduler::Emit(Sequence& s, int n, SchedulerOutput& out) {
  const bool decode = n == 1 && s.num_computed + 1 == static_cast<int>(s.tokens.size()) &&
                      s.num_computed >= s.prompt_len;
  ScheduledChunk c;
  c.id = s.id;
  c.tokens = std::span<const uint32_t>(s.tokens).subspan(s.num_computed, n);
  c.start_pos = s.num_computed;
  c.block_table = s.block_table;
  c.sample = s.num_computed + n == static_cast<int>(s.tokens.size());
  s.num_scheduled = n;
  pending_.push_back(&s);
  out.batch.push_back(c);
  out.num_batched_tokens += n;
  if (decode) ++out.num_decode_tokens;
  computed_tokens_ += n;
}

SchedulerOutput Scheduler::Schedule() {
  CommitStep();
  SchedulerOutput out;
  int budget = config_.max_num_batched_tokens;

  // Running sequences, oldest first; preemption takes the newest.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i];
    const int n = std::min(static_cast<int>(s->tokens.size()) - s->num_computed, budget);
    if (n <= 0) {  // sampled but not yet given its token: nothing to compute
      ++i;
      continue;
    }
    const int need = BlocksFor(s->num_computed + n) - static_cast<int>(s->block_table.size());
    bool self_preempted = false;
    while (need > pool_.num_free_blocks()) {
      Sequence* victim = running_.back();
      Preempt(*victim, out);
      if (victim == s) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    if (need > 0) {
      [[maybe_unused]] bool ok = pool_.Allocate(need, s->block_table);
      assert(ok);
    }
    Emit(*s, n, out);
    budget -= n;
    ++i;
  }

  // Waiting sequences, FCFS, unless this step had to preempt (then memory is tight).
  while (out.preempted.empty() && !waiting_.empty() && budget > 0 &&
         static_cast<int>(running_.size()) < config_.max_num_seqs) {
    Sequence* s = waiting_.front();
    const int total = static_cast<int>(s->tokens.size());
    if (BlocksFor(total) > pool_.num_blocks()) {
      const SeqId id = s->id;
      waiting_.pop_front();
      out.failed.emplace_back(id, Status::ResourceExhausted(
                                         "sequence of " + std::to_string(total) + " tokens needs " +
                                         std::to_string(BlocksFor(total)) + " KV blocks but the pool has only " +
                                         std::to_string(pool_.num_blocks())));
      seqs_.erase(id);
      continue;
    }
    const size_t max_hit_blocks = static_cast<size_t>((total - 1) / pool_.block_size());
    std::vector<int32_t> hit = pool_.MatchPrefix(s->sequence_hashes, max_hit_blocks);
    const int hit_tokens = static_cast<int>(hit.size()) * pool_.block_size();
    const int n = std::min(total - hit_tokens, budget);
    const int need = BlocksFor(hit_tokens + n) - static_cast<int>(hit.size());
    if (need > pool_.num_free_blocks() - pool_.CountUnreferenced(hit)) break;
    pool_.Acquire(hit);
    s->block_table = std::move(hit);
    if (need > 0) {
      [[maybe_unused]] bool ok = pool_.Allocate(need, s->block_table);
      assert(ok);
    }
    s->num_computed = hit_tokens;
    s->num_registered = hit_tokens / pool_.block_size();
    if (s->first_cached_tokens < 0) s->first_cached_tokens = hit_tokens;
    prefix_hit_tokens_ += static_cast<uint64_t>(hit_tokens);
    waiting_.pop_front();
    s->running = true;
    running_.push_back(s);
    Emit(*s, n, out);
    budget -= n;
  }
  return out;
}

void Scheduler::FillMetrics(EngineMetrics& m) const {
  m.running = num_running();
  m.waiting = num_waiting();
  m.kv_blocks_total = pool_.num_blocks();
  m.kv_blocks_used = pool_.num_used_blocks();
  m.kv_blocks_cached = pool_.num_cached_free_blocks();
  m.preemptions = num_preemptions_;
}

int Scheduler::first_cached_tokens(SeqId id) const { return Get(id).first_cached_tokens; }
std::span<const uint32_t> Scheduler::tokens(SeqId id) const { return Get(id).tokens; }
int Scheduler::prompt_len(SeqId id) const { return Get(id).prompt_len; }

}  // namespace dyn
