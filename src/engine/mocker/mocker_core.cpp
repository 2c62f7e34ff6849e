#include "engine/mocker/mocker_core.h"

#include <algorithm>
#include <cassert>
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

Status ValidateMockerConfig(const MockerConfig& c) {
  if (c.block_size < 1) return Status::InvalidArgument("mocker: block_size must be >= 1");
  if (c.num_blocks < 1) return Status::InvalidArgument("mocker: num_blocks must be >= 1");
  if (c.max_num_seqs < 1) return Status::InvalidArgument("mocker: max_num_seqs must be >= 1");
  if (c.max_num_batched_tokens < 1) return Status::InvalidArgument("mocker: max_num_batched_tokens must be >= 1");
  if (c.vocab_size < 1) return Status::InvalidArgument("mocker: vocab_size must be >= 1");
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
  if (r.prompt.empty()) return Status::InvalidArgument("the prompt is empty");
  if (r.max_tokens < 1) return Status::InvalidArgument("max_tokens must be >= 1");
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
  DYN_RETURN_IF_ERROR(scheduler_.Add(r.id, std::move(r.prompt)));
  reqs_.emplace(r.id, Req{r.max_tokens, r.seed, 0});
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
    if (reqs_.erase(id)) {
      scheduler_.Finish(id);
      res.cancelled.push_back(id);
    }
  }
  cancel_.clear();
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
    t.token = TokenAt(r.seed, r.generated, config_.vocab_size);
    if (r.generated == 0) {
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
    } else {
      scheduler_.AppendToken(c.id, t.token);
    }
    res.tokens.push_back(t);
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
  return m;
}

}  // namespace dyn
