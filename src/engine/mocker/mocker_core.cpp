#include "engine/mocker/mocker_core.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <string>

namespace dyn {

double MockerPrefillMs(int new_tokens) {
  if (new_tokens <= 0) return 0;
  const double t = new_tokens;
  return 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142;
}

double MockerDecodeMs(double kv_usage) {
  const double u = kv_usage;
  return std::max(1.0, -25.74 * u * u + 54.01 * u + 5.74);
}

int64_t MockerTransferBytes(const MockerConfig& c, int blocks) {
  return blocks <= 0 ? 0 : static_cast<int64_t>(blocks) * c.block_size * c.kv_bytes_per_token;
}

double MockerTransferMs(const MockerConfig& c, int blocks) {
  if (blocks <= 0) return 0;
  // GB/s = 1e9 bytes/s = 1e6 bytes/ms.
  return c.kv_transfer_latency_ms + static_cast<double>(MockerTransferBytes(c, blocks)) / (c.kv_transfer_gbps * 1e6);
}

Status ValidateMockerConfig(const MockerConfig& c) {
  if (c.block_size < 1) return Status::InvalidArgument("mocker: block_size must be >= 1");
  if (c.num_blocks < 1) return Status::InvalidArgument("mocker: num_blocks must be >= 1");
  if (c.max_num_seqs < 1) return Status::InvalidArgument("mocker: max_num_seqs must be >= 1");
  if (c.max_num_batched_tokens < 1) return Status::InvalidArgument("mocker: max_num_batched_tokens must be >= 1");
  if (c.vocab_size < 1) return Status::InvalidArgument("mocker: vocab_size must be >= 1");
  if (c.kv_bytes_per_token < 1) return Status::InvalidArgument("mocker: kv_bytes_per_token must be >= 1");
  if (!(c.kv_transfer_gbps > 0) || !std::isfinite(c.kv_transfer_gbps))
    return Status::InvalidArgument("mocker: kv_transfer_gbps must be a positive number");
  if (!(c.kv_transfer_latency_ms >= 0) || !std::isfinite(c.kv_transfer_latency_ms))
    return Status::InvalidArgument("mocker: kv_transfer_latency_ms must be >= 0");
  return Status::Ok();
}

MockerCore::MockerCore(const MockerConfig& config)
    : config_(config),
      pool_(config.num_blocks, config.block_size, config.enable_prefix_caching),
      scheduler_(pool_, SchedulerConfig{config.max_num_seqs, config.max_num_batched_tokens, 0}) {
  assert(ValidateMockerConfig(config).ok());
}

MockerCore::~MockerCore() = default;

uint32_t MockerCore::TokenAt(uint64_t seed, int index, uint32_t vocab_size) {
  // splitmix64 of (seed, index): a stateless generator, so a preempted and recomputed request
  // emits the same tokens as one that ran straight through.
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (static_cast<uint64_t>(index) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z % vocab_size);
}

Status MockerCore::Add(MockerRequest r) {
  const bool import = r.phase == RequestPhase::kDecodeImported;
  if (r.prompt.empty()) return Status::InvalidArgument("the prompt is empty");
  if (r.max_tokens < 1) return Status::InvalidArgument("max_tokens must be >= 1");
  if (import && r.max_tokens < 2)
    return Status::InvalidArgument("an imported request needs max_tokens >= 2 (its first token is already out)");
  if (reqs_.count(r.id)) return Status::InvalidArgument("request id " + std::to_string(r.id) + " is in use");
  // Every token but the last one emitted needs KV; checked here so that a sequence can never
  // outgrow the pool while running (the scheduler would only notice on re-admission).
  const int64_t capacity = static_cast<int64_t>(config_.num_blocks) * config_.block_size;
  const int64_t need = static_cast<int64_t>(r.prompt.size()) + r.max_tokens - 1;
  if (need > capacity) {
    return Status::InvalidArgument("prompt (" + std::to_string(r.prompt.size()) + " tokens) + max_tokens (" +
                                   std::to_string(r.max_tokens) + ") exceeds the KV cache capacity of " +
                                   std::to_string(capacity) + " tokens");
  }
  const size_t prompt_len = r.prompt.size();
  Req q;
  q.max_tokens = r.max_tokens;
  q.seed = r.seed;
  q.phase = r.phase;
  q.first_token = r.first_token;
  if (import) {
    q.generated = 1;  // the prefill side's token
    q.import_prompt = std::move(r.prompt);
    import_queue_.push_back(r.id);
  } else {
    DYN_RETURN_IF_ERROR(scheduler_.Add(r.id, std::move(r.prompt)));
  }
  reqs_.emplace(r.id, std::move(q));
  prompt_tokens_ += prompt_len;
  return Status::Ok();
}

bool MockerCore::Cancel(uint64_t id) {
  if (!reqs_.count(id)) return false;
  cancel_.insert(id);
  return true;
}

MockerStepResult MockerCore::Step() {
  MockerStepResult res;
  for (uint64_t id : cancel_) {
    if (reqs_.count(id)) {
      Remove(id);
      res.cancelled.push_back(id);
    }
  }
  cancel_.clear();
  ActivateImports();
  ReserveImports(res);
  if (!scheduler_.has_unfinished()) return res;

  SchedulerOutput out = scheduler_.Schedule();
  for (auto& [id, status] : out.failed) {
    reqs_.erase(id);
    res.failed.emplace_back(id, std::move(status));
  }
  res.preempted = std::move(out.preempted);
  res.batch_size = static_cast<int>(out.batch.size());
  if (out.batch.empty()) return res;

  // Prompt chunks, recomputation after preemption included, are prefill work; a decode is the
  // single next token of a fully computed sequence.
  res.decode_tokens = out.num_decode_tokens;
  res.prefill_tokens = out.num_batched_tokens - out.num_decode_tokens;
  res.kv_usage = static_cast<double>(pool_.num_used_blocks()) / pool_.num_blocks();
  res.prefill_ms = MockerPrefillMs(res.prefill_tokens);
  res.decode_ms = res.decode_tokens > 0 ? MockerDecodeMs(res.kv_usage) : 0.0;
  res.duration_ms = res.prefill_ms + res.decode_ms;
  scheduler_.CommitStep();
  simulated_ms_ += res.duration_ms;
  ++steps_;

  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample) continue;
    Req& r = reqs_.at(c.id);
    MockerToken t;
    t.id = c.id;
    t.index = r.generated;
    t.token = TokenAt(r.seed, r.generated, config_.vocab_size);
    if (!r.sent_first) {
      r.sent_first = true;
      t.first = true;
      t.prompt_tokens = scheduler_.prompt_len(c.id);
      t.cached_tokens = std::max(0, scheduler_.first_cached_tokens(c.id));
      cached_prompt_tokens_ += static_cast<uint64_t>(t.cached_tokens);
    }
    ++r.generated;
    ++generated_tokens_;
    if (r.generated >= r.max_tokens) {
      t.finished = true;
      scheduler_.Finish(c.id);
      reqs_.erase(c.id);
    } else if (r.phase == RequestPhase::kPrefillOnly) {
      // Decoding continues elsewhere: the prompt's blocks stay referenced under a lease.
      t.finished = true;
      t.lease_id = next_lease_++;
      t.lease_blocks = scheduler_.Detach(c.id);
      leases_.emplace(t.lease_id, t.lease_blocks);
      reqs_.erase(c.id);
    } else {
      scheduler_.AppendToken(c.id, t.token);
    }
    res.tokens.push_back(std::move(t));
  }
  return res;
}

EngineMetrics MockerCore::Metrics() const {
  EngineMetrics m;
  scheduler_.FillMetrics(m);
  m.prompt_tokens = prompt_tokens_;
  m.cached_prompt_tokens = cached_prompt_tokens_;
  m.generated_tokens = generated_tokens_;
  m.steps = steps_;
  m.kv_leases = static_cast<int>(leases_.size());
  m.kv_leased_blocks = 0;
  for (const auto& [id, blocks] : leases_) m.kv_leased_blocks += static_cast<int>(blocks.size());
  m.kv_transfers = kv_transfers_;
  m.kv_transfer_failures = kv_transfer_failures_;
  m.kv_transfer_bytes = kv_transfer_bytes_;
  m.kv_transfer_seconds = kv_transfer_ms_ / 1000.0;
  return m;
}

bool MockerCore::ReleaseLease(uint64_t lease_id) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) return false;
  scheduler_.ReleaseDetached(it->second);
  leases_.erase(it);
  return true;
}

bool MockerCore::CompleteImport(uint64_t id, bool ok) {
  if (!transferring_.erase(id)) return false;
  const Req& r = reqs_.at(id);
  ++kv_transfers_;
  if (!ok) {
    ++kv_transfer_failures_;
    Remove(id);
    return true;
  }
  kv_transfer_bytes_ += static_cast<uint64_t>(r.import.transfer_bytes);
  kv_transfer_ms_ += r.import.transfer_ms;
  transferred_.push_back(id);
  return true;
}

void MockerCore::ActivateImports() {
  // Imports join the running set only below max_num_seqs (Scheduler::ActivateImported does not
  // check); the rest wait, their KV in place, for running sequences to finish.
  while (!transferred_.empty() && scheduler_.num_running() < config_.max_num_seqs) {
    const uint64_t id = transferred_.front();
    transferred_.pop_front();
    scheduler_.ActivateImported(id, reqs_.at(id).first_token);
  }
}

void MockerCore::ReserveImports(MockerStepResult& res) {
  // Arrival order; one that does not fit now waits, and so do the ones behind it (FCFS).
  while (!import_queue_.empty()) {
    const uint64_t id = import_queue_.front();
    Req& r = reqs_.at(id);
    Result<Scheduler::ImportPlan> plan = scheduler_.ReserveForImport(id, r.import_prompt);
    if (!plan.ok() && plan.status().code() == StatusCode::kResourceExhausted) break;
    import_queue_.pop_front();
    if (!plan.ok()) {  // Add checked what could make it fail for good: defensive
      res.failed.emplace_back(id, plan.status());
      reqs_.erase(id);
      continue;
    }
    MockerImport& im = r.import;
    im.id = id;
    im.prompt_tokens = static_cast<int>(r.import_prompt.size());
    im.cached_tokens = std::max(0, scheduler_.first_cached_tokens(id));
    im.first_block = plan->cached_blocks;
    im.transfer_blocks = static_cast<int>(plan->block_table.size()) - plan->cached_blocks;
    im.transfer_bytes = MockerTransferBytes(config_, im.transfer_blocks);
    im.transfer_ms = MockerTransferMs(config_, im.transfer_blocks);
    r.import_prompt = {};
    transferring_.insert(id);
    res.imports.push_back(im);
  }
}

void MockerCore::Remove(uint64_t id) {
  std::erase(import_queue_, id);
  transferring_.erase(id);
  std::erase(transferred_, id);
  scheduler_.Finish(id);
  reqs_.erase(id);
}

}  // namespace dyn
