// NativeEngine, disaggregated serving (native_engine_impl.h): a prefill-only request's hand-off
// under a KV lease, the leases' release and timeout, and imports of a decode request's prompt KV
// on the transfer thread.
#include <chrono>
#include <string>
#include <vector>

#include "base/log.h"
#include "engine/native/sched/native_engine_impl.h"

namespace dyn::native_engine_impl {

void NativeEngine::HandOff(SeqId id, Active& a, EngineOutput& delta) {
  std::vector<int32_t> blocks = scheduler_.Detach(id);
  if (staging_) {
    // A device cache: the prompt's KV moves to staging blocks, leased from there; the device
    // blocks go back to the pool (and its prefix cache) now.
    std::optional<std::vector<int32_t>> staged = staging_->Take(blocks.size());
    Status s = staged ? model_->CopyKvBlocks(blocks, staging_->Addresses(*staged), /*to_host=*/true)
                      : Status::ResourceExhausted("the KV staging area is full (" + std::to_string(staging_->free.size()) +
                                                  " of " + std::to_string(staging_->num_blocks) + " blocks free, " +
                                                  std::to_string(blocks.size()) + " needed)");
    scheduler_.ReleaseDetached(blocks);
    if (!s.ok()) {
      // Unavailable and no token: the frontend serves the request aggregated instead (a fallback).
      if (staged) staging_->Give(*staged);
      delta.token_ids.clear();
      delta.logprobs.clear();
      delta.finish_reason = FinishReason::kError;
      delta.error = "Unavailable: cannot stage the prompt's KV: " + s.ToString();
      return;
    }
    blocks = std::move(*staged);
  }
  uint64_t lease_id;
  {
    std::lock_guard lock(lease_mu_);
    lease_id = next_lease_++;
    leases_[lease_id] = Lease{blocks, std::chrono::steady_clock::now() + hooks_.lease_timeout};
  }
  auto desc = hooks_.describe(lease_id, blocks, static_cast<int>(a.request.token_ids.size()));
  if (!desc.ok()) {
    ReleaseKvLease(lease_id);
    delta.finish_reason = FinishReason::kError;
    delta.error = "Internal: cannot describe the prompt's KV: " + desc.status().message();
    return;
  }
  delta.kv_transfer = std::move(*desc);
  delta.finish_reason = FinishReason::kLength;  // this worker's part is done
}

bool NativeEngine::HasLeases() {
  std::lock_guard lock(lease_mu_);
  return !leases_.empty() || !released_blocks_.empty();
}

void NativeEngine::ProcessLeases() {
  std::vector<int32_t> blocks;
  {
    std::lock_guard lock(lease_mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (it->second.deadline <= now) {
        DYN_LOG(WARN) << "KV lease " << it->first << " expired unreleased (" << it->second.blocks.size() << " blocks)";
        released_blocks_.insert(released_blocks_.end(), it->second.blocks.begin(), it->second.blocks.end());
        it = leases_.erase(it);
      } else {
        ++it;
      }
    }
    blocks.swap(released_blocks_);
  }
  if (blocks.empty()) return;
  if (staging_) staging_->Give(blocks);  // leases hold staging blocks
  else scheduler_.ReleaseDetached(blocks);
}

void NativeEngine::ProcessImports() {
  // Reserve blocks for waiting imports, in arrival order; one that does not fit waits (FCFS).
  while (!import_waiting_.empty()) {
    const SeqId id = import_waiting_.front();
    Active& a = active_.at(id);
    if (a.context && a.context->cancelled()) {
      hooks_.release(a.request.kv_transfer);
      EndLater(std::move(a.sink), FinishReason::kCancelled);
      active_.erase(id);
      import_waiting_.pop_front();
      continue;
    }
    if (staging_) {
      // The pull lands in staging blocks first: wait until the whole prompt would fit there.
      const size_t bs = static_cast<size_t>(pool_.block_size());
      const size_t prompt_blocks = (a.request.token_ids.size() + bs - 1) / bs;
      if (prompt_blocks > static_cast<size_t>(staging_->num_blocks)) {
        import_waiting_.pop_front();
        hooks_.release(a.request.kv_transfer);
        EndLater(std::move(a.sink), FinishReason::kError,
                 "ResourceExhausted: the prompt's KV (" + std::to_string(prompt_blocks) + " blocks) is larger than the KV staging area (" +
                     std::to_string(staging_->num_blocks) + " blocks; --kv-staging-mb)");
        active_.erase(id);
        continue;
      }
      if (prompt_blocks > staging_->free.size()) break;
    }
    auto plan = scheduler_.ReserveForImport(id, a.request.token_ids);
    if (!plan.ok() && plan.status().code() == StatusCode::kResourceExhausted) break;
    import_waiting_.pop_front();
    if (!plan.ok()) {
      hooks_.release(a.request.kv_transfer);
      EndLater(std::move(a.sink), FinishReason::kError, plan.status().message());
      active_.erase(id);
      continue;
    }
    ImportJob job{id, a.request.kv_transfer, plan->cached_blocks,
                  std::vector<int32_t>(plan->block_table.begin() + plan->cached_blocks, plan->block_table.end()), {}};
    if (job.dst.empty()) {  // everything was cached here already
      FinishImport(ImportDone{id, size_t{0}, 0.0, {}, {}, false});
      continue;
    }
    if (staging_) job.staged = *staging_->Take(job.dst.size());  // fits: checked above
    std::lock_guard lock(transfer_mu_);
    transfer_jobs_.push_back(std::move(job));
    transfer_cv_.notify_one();
  }
  std::vector<ImportDone> done;
  {
    std::lock_guard lock(transfer_mu_);
    done.swap(transfer_done_);
  }
  for (ImportDone& d : done) FinishImport(std::move(d));
}

void NativeEngine::FinishImport(ImportDone done) {
  Active& a = active_.at(done.id);
  hooks_.release(a.request.kv_transfer);
  a.importing = false;
  if (!done.staged.empty()) {  // a device cache: from the staging blocks to the cache's
    if (done.bytes.ok() && !done.written) {
      Status s = model_->CopyKvBlocks(done.dst, staging_->Addresses(done.staged), /*to_host=*/false);
      if (!s.ok()) done.bytes = s.WithContext("copying the pulled KV to the device");
    }
    staging_->Give(done.staged);
  }
  if (done.bytes.ok()) {
    kv_transfer_bytes_ += *done.bytes;
    kv_transfer_seconds_ += done.seconds;
  }
  ++kv_transfers_;
  if (!done.bytes.ok() || (a.context && a.context->cancelled())) {
    if (!done.bytes.ok()) {
      ++kv_transfer_failures_;
      DYN_LOG(WARN) << "request " << (a.context ? a.context->id() : std::string("?"))
                    << ": KV transfer failed: " << done.bytes.status().ToString();
    }
    scheduler_.Finish(done.id);  // the copy is over: the reserved blocks can go
    const bool cancelled = done.bytes.ok();
    EndLater(std::move(a.sink), cancelled ? FinishReason::kCancelled : FinishReason::kError,
             cancelled ? std::string() : "Unavailable: KV transfer failed: " + done.bytes.status().message());
    active_.erase(done.id);
    return;
  }
  scheduler_.ActivateImported(done.id, a.request.first_token);
}

void NativeEngine::TransferLoop() {
  for (;;) {
    ImportJob job;
    {
      std::unique_lock lock(transfer_mu_);
      transfer_cv_.wait(lock, [&] { return transfer_stop_ || !transfer_jobs_.empty(); });
      if (transfer_jobs_.empty()) return;  // stopping, nothing left
      job = std::move(transfer_jobs_.front());
      transfer_jobs_.pop_front();
    }
    const auto t0 = std::chrono::steady_clock::now();
    Result<size_t> bytes = hooks_.pull(job.descriptor, job.first_block, job.staged.empty() ? job.dst : job.staged);
    bool written = false;
    if (bytes.ok() && !job.staged.empty()) {
      // Staged: on to the device here, off the step thread, where the model can (the blocks are
      // reserved for this import: no step reads or writes them). Else FinishImport copies.
      Status s = model_->WriteKvBlocksConcurrently(job.dst, staging_->Addresses(job.staged));
      if (s.ok()) written = true;
      else if (s.code() != StatusCode::kUnsupported) bytes = s.WithContext("copying the pulled KV to the device");
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard lock(transfer_mu_);
    transfer_done_.push_back(ImportDone{job.id, std::move(bytes), seconds, std::move(job.dst), std::move(job.staged), written});
  }
}

}  // namespace dyn::native_engine_impl
