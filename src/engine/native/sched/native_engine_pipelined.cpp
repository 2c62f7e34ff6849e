// NativeEngine, pipelined decode (native_engine_impl.h; docs/native_engine.md "Pipelined decode"):
// when a decode step may be launched before the previous step's ids are back, the launch, and the
// taking of those ids into the scheduler and the streams.
#include <vector>

#include "base/log.h"
#include "engine/native/sched/native_engine_impl.h"

namespace dyn::native_engine_impl {

bool NativeEngine::PipelinableRow(SeqId id, const Active& a, int pending) const {
  const PreprocessedRequest& r = a.request;
  // The row's next sample is its (generated + pending + 1)-th token: it must be the device's
  // (no min_tokens ban), and the pending ones must not end the sequence by length (the step would
  // compute past its end).
  const int after_pending = a.generated + pending;
  if (r.phase == RequestPhase::kPrefillOnly || a.importing) return false;
  if (after_pending < r.stop.min_tokens) {  // banned ids (EOS, stop ids) send the row to the host sampler
    std::vector<uint32_t> banned;
    BannedIds(a, &banned, pending);
    if (!banned.empty()) return false;
  }
  if (!DeviceSamplable(r.sampling, vocab_size_, model_->samples_truncated_on_device())) return false;
  return after_pending < r.stop.max_tokens && scheduler_.prompt_len(id) + after_pending < context_length_;
}

bool NativeEngine::CanStartPipeline(const SchedulerOutput& out) const {
  if (!pipelined_ || !out.preempted.empty() || out.num_decode_tokens != static_cast<int>(out.batch.size())) return false;
  for (const ScheduledChunk& c : out.batch) {
    auto it = active_.find(c.id);
    if (!c.sample || it == active_.end() || !PipelinableRow(c.id, it->second, 0)) return false;
  }
  return true;
}

bool NativeEngine::CanContinuePipeline() const {
  // The next Schedule must give each in-flight row its one decode token and nothing else.
  if (scheduler_.num_waiting() > 0 || !import_waiting_.empty()) return false;
  int alive = 0;
  for (SeqId id : inflight_rows_) {
    auto it = active_.find(id);
    if (it == active_.end()) continue;  // cancelled
    if (!PipelinableRow(id, it->second, 1)) return false;
    ++alive;
  }
  return alive > 0 && alive == scheduler_.num_running() && scheduler_.pool().num_free_blocks() >= alive;
}

bool NativeEngine::ContinuesPipeline(const SchedulerOutput& out) const {
  if (out.batch.empty() || !out.preempted.empty() || !out.failed.empty()) return false;
  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample || c.tokens.size() != 1 || !inflight_row_of_.count(c.id)) return false;
  }
  return true;
}

void NativeEngine::LaunchPipelined(const SchedulerOutput& out) {
  const bool continues = inflight_;
  batch_.clear();
  device_sampling_.clear();
  for (const ScheduledChunk& c : out.batch) {
    ForwardSeq f{c.tokens, c.start_pos, c.block_table, true};
    if (continues) f.sampled_row = inflight_row_of_.at(c.id);
    batch_.push_back(f);
    device_sampling_.push_back(DeviceRow(active_.at(c.id)));
  }
  const Status st = model_->LaunchSample(batch_, device_sampling_);
  ++steps_;
  if (!st.ok()) {
    DYN_LOG(ERROR) << "forward pass failed: " << st.ToString();
    scheduler_.DiscardStep();
    if (continues) DrainAndDeliver();
    for (const ScheduledChunk& c : out.batch) Finish(c.id, FinishReason::kError, "forward pass failed: " + st.message());
    return;
  }
  ++pipelined_steps_;
  overlapped_steps_ += continues ? 1 : 0;
  // The previous step's ids replace their placeholders before this step (which computes them) is
  // committed, so the blocks it completes are hashed with the real ids; then they are sent.
  if (continues) TakeInflight();
  scheduler_.CommitStep();
  if (continues) EmitInflight();
  inflight_ = true;
  inflight_rows_.clear();
  inflight_row_of_.clear();
  for (const ScheduledChunk& c : out.batch) {
    inflight_row_of_[c.id] = static_cast<int>(inflight_rows_.size());
    inflight_rows_.push_back(c.id);
    if (active_.count(c.id)) scheduler_.AppendToken(c.id, 0);  // the placeholder: any id (never read)
  }
}

void NativeEngine::TakeInflight() {
  if (!inflight_) return;
  inflight_ = false;
  inflight_ids_.assign(inflight_rows_.size(), 0);
  if (Status st = model_->TakeSample(inflight_ids_.data()); !st.ok()) {
    // Not expected (the launch succeeded); the rows end with the error rather than hang.
    DYN_LOG(ERROR) << "pipelined step failed: " << st.ToString();
    for (SeqId id : inflight_rows_) Finish(id, FinishReason::kError, "forward pass failed: " + st.message());
    inflight_rows_.clear();
    return;
  }
  for (size_t r = 0; r < inflight_rows_.size(); ++r) {
    if (active_.count(inflight_rows_[r])) scheduler_.ReplaceLastToken(inflight_rows_[r], inflight_ids_[r]);
  }
}

void NativeEngine::EmitInflight() {
  for (size_t r = 0; r < inflight_rows_.size(); ++r) {
    auto it = active_.find(inflight_rows_[r]);
    if (it != active_.end()) EmitToken(inflight_rows_[r], it->second, inflight_ids_[r], nullptr, /*in_scheduler=*/true);
  }
  inflight_rows_.clear();
  inflight_row_of_.clear();
}

}  // namespace dyn::native_engine_impl
