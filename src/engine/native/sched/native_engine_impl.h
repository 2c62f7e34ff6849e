// The NativeEngine class behind CreateNativeEngine (native_engine.h), shared by its source files:
// native_engine.cpp (the step loop, admission, synchronous steps, deltas, metrics),
// native_engine_pipelined.cpp (pipelined decode) and native_engine_disagg.cpp (KV leases, imports
// and the transfer thread). Not a public header: include native_engine.h.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/native/sched/batch_sampler.h"
#include "engine/native/sched/native_engine.h"
#include "engine/native/sched/sampler.h"
#include "engine/native/sched/scheduler.h"
#include "engine/request_inbox.h"

namespace dyn::native_engine_impl {

using Incoming = IncomingRequest;

inline int SamplingThreads(const NativeEngineOptions& o, const Model& model) {
  if (o.sampling_threads > 0) return o.sampling_threads;
  if (!model.samples_on_device()) return 1;
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u));
}

// Host blocks through which a device KV cache's blocks travel in disaggregated serving (the
// transfer layer reads and writes host memory only). Prefill side: a finished prompt's blocks are
// copied here at hand-off (their device blocks are freed at once) and leased from here. Decode
// side: a pull lands here and is copied to its device blocks when it is done.
struct KvStaging {
  KvStaging(std::byte* memory, size_t block_bytes, int num_blocks, std::unique_ptr<std::byte[]> owned = nullptr)
      : base(memory), block_bytes(block_bytes), num_blocks(num_blocks), owned(std::move(owned)) {
    for (int b = num_blocks - 1; b >= 0; --b) free.push_back(b);  // taken from the back: ascending runs
  }
  // n blocks, or none when fewer are free.
  std::optional<std::vector<int32_t>> Take(size_t n) {
    if (n > free.size()) return std::nullopt;
    std::vector<int32_t> out(free.end() - static_cast<std::ptrdiff_t>(n), free.end());
    std::reverse(out.begin(), out.end());
    free.resize(free.size() - n);
    return out;
  }
  void Give(std::span<const int32_t> blocks) { free.insert(free.end(), blocks.rbegin(), blocks.rend()); }
  std::vector<std::byte*> Addresses(std::span<const int32_t> blocks) const {
    std::vector<std::byte*> out;
    for (int32_t b : blocks) out.push_back(base + static_cast<size_t>(b) * block_bytes);
    return out;
  }

  std::byte* base;
  size_t block_bytes;
  int num_blocks;
  bool pinned = false;  // page-locked by the model's backend (unpinned when the engine goes)
  std::vector<int32_t> free;
  std::unique_ptr<std::byte[]> owned;  // the memory, when the transfer layer did not provide it
};

class NativeEngine final : public StepLoopEngine {
 public:
  NativeEngine(std::unique_ptr<Model> model, const NativeEngineOptions& options, int num_blocks,
               std::optional<KvStaging> staging = std::nullopt)
      : model_(std::move(model)),
        vocab_size_(model_->config().vocab_size),
        pool_(num_blocks, options.block_size, options.enable_prefix_caching),
        scheduler_(pool_, SchedulerConfig{options.max_num_seqs, options.max_num_batched_tokens, 0}),
        sampler_(vocab_size_, SamplingThreads(options, *model_)),
        pipelined_(options.pipelined_decode && model_->samples_pipelined()),
        hooks_(options.kv_transfer),
        staging_(std::move(staging)) {
    const int pool_tokens = num_blocks * options.block_size;
    const int max_pos = model_->config().max_position_embeddings;
    context_length_ = max_pos > 0 ? std::min(max_pos, pool_tokens) : pool_tokens;
    pool_.SetEventSink(options.kv_event_sink);
    metrics_.kv_blocks_total = num_blocks;
    if (hooks_.can_import()) transfer_thread_ = std::thread([this] { TransferLoop(); });
    thread_ = std::thread([this] { Loop(); });
  }

  ~NativeEngine() override {
    Shutdown();
    if (staging_ && staging_->pinned) model_->UnpinHostMemory(staging_->base);
  }

  bool ReleaseKvLease(uint64_t lease_id) override {
    std::lock_guard lock(lease_mu_);
    auto it = leases_.find(lease_id);
    if (it == leases_.end()) return false;
    released_blocks_.insert(released_blocks_.end(), it->second.blocks.begin(), it->second.blocks.end());
    leases_.erase(it);
    return true;
  }

 private:
  // One admitted request, owned by the step thread.
  struct Active {
    PreprocessedRequest request;
    std::shared_ptr<RequestContext> context;
    OutputSink sink;
    SamplerRng rng;
    int generated = 0;
    bool sent_first = false;
    bool importing = false;  // kDecodeImported, KV not yet in place (a copy may be running)
  };

  struct Lease {
    std::vector<int32_t> blocks;
    std::chrono::steady_clock::time_point deadline;
  };
  struct ImportJob {
    SeqId id = 0;
    std::string descriptor;
    int first_block = 0;
    std::vector<int32_t> dst;     // the cache's blocks to fill
    std::vector<int32_t> staged;  // with a device cache: the staging blocks the pull fills first
  };
  struct ImportDone {
    SeqId id = 0;
    Result<size_t> bytes = Status::Ok();
    double seconds = 0;
    std::vector<int32_t> dst, staged;
    bool written = false;  // staged blocks already copied to dst (on the transfer thread)
  };

  // A delta waiting for the end of the step: streams see it after Metrics() reflects the step.
  struct Delivery {
    const OutputSink* sink = nullptr;  // the Active's own sink (stream still open)
    OutputSink owned;                  // or the sink itself, moved out of a finished stream
    EngineOutput output;
  };

  void Loop();
  void Deliver();
  void EndLater(OutputSink sink, FinishReason reason, std::string error = {});
  void Admit(Incoming in);
  void DropCancelled();
  void RunStep(const SchedulerOutput& out);
  // One sampled token of a sequence: its delta, then the stop checks (Finish, or the token joins
  // the sequence). `in_scheduler`: the token is already the sequence's last (a pipelined step's
  // placeholder, replaced).
  void EmitToken(SeqId id, Active& a, uint32_t token, TokenLogprob* logprob, bool in_scheduler);

  // ---- pipelined decode (Model::LaunchSample): step N + 1 is launched before N's ids are back ----
  // While a step is in flight each of its sampled sequences has a placeholder as its last token in
  // the scheduler; the next step reads the real id on the device (ForwardSeq::sampled_row). Only
  // pure decode steps whose rows the device samples run this way, and only while nothing else can
  // change the batch: no waiting or importing sequence, blocks for every row, no row that a stop by
  // length or a min_tokens ban would end or send to the host sampler. Anything else drains the
  // pipeline first (DrainInflight) and runs the step synchronously.
  bool PipelinableRow(SeqId id, const Active& a, int pending) const;
  bool CanStartPipeline(const SchedulerOutput& out) const;
  bool CanContinuePipeline() const;
  bool ContinuesPipeline(const SchedulerOutput& out) const;
  void LaunchPipelined(const SchedulerOutput& out);
  // Takes the in-flight step's ids into the scheduler (replacing the placeholders); then
  // EmitInflight sends them (and ends the sequences they stop).
  void TakeInflight();
  void EmitInflight();
  void DrainInflight() {
    TakeInflight();
    EmitInflight();
  }
  // DrainInflight, then the deltas go out at once: a later Finish in the same iteration moves the
  // sink that an undelivered delta still points to.
  void DrainAndDeliver() {
    if (!inflight_) return;
    ++drains_;
    DrainInflight();
    PublishMetrics();
    Deliver();
  }
  // Draws the token (and logprobs) of every sampled row with a host_index_ into that entry of
  // host_rows_, on the sampling threads; their logits are in logits_, one row each in that order.
  void SampleOnHost(const SchedulerOutput& out);
  // A row the device samples: its temperature and cut, and the step's uniform draw (one a step).
  DeviceSampling DeviceRow(Active& a);
  // Ids the request may not produce yet (min_tokens not reached: its stop ids and EOS), within
  // the vocabulary.
  // `pending`: tokens sampled but not yet counted in a.generated (pipelined decode).
  void BannedIds(const Active& a, std::vector<uint32_t>* out, int pending = 0) const;
  void Finish(SeqId id, FinishReason reason, std::string error = {});
  void PublishMetrics();
  Status Validate(const PreprocessedRequest& r) const;
  // Disaggregated serving (step thread).
  void HandOff(SeqId id, Active& a, EngineOutput& delta);
  void ProcessLeases();
  void ProcessImports();
  void FinishImport(ImportDone done);
  void TransferLoop();  // the transfer thread
  bool HasLeases();

  std::unique_ptr<Model> model_;
  const int vocab_size_;
  int context_length_ = 0;

  // Step-thread state.
  BlockPool pool_;
  Scheduler scheduler_;
  BatchSampler sampler_;
  std::vector<int> host_index_;                     // per sampled row: its entry in host_rows_; -1: the device samples it
  std::vector<BatchSampler::Row> host_rows_;       // per row the host samples
  std::vector<std::vector<uint32_t>> row_banned_;  // their banned ids
  std::vector<uint32_t> banned_scratch_;           // BannedIds of a row being routed
  std::vector<TokenLogprob> row_logprobs_;
  std::unordered_map<SeqId, Active> active_;
  SeqId next_id_ = 1;
  std::vector<float> logits_;
  std::vector<DeviceSampling> device_sampling_;  // per sampled row, when the device samples the step
  std::vector<uint32_t> device_tokens_;
  std::vector<ForwardSeq> batch_;
  std::vector<Delivery> outbox_;
  const bool pipelined_;                // the model pipelines sampling and the options allow it
  bool inflight_ = false;               // a LaunchSample not yet taken
  std::vector<SeqId> inflight_rows_;    // its sampled rows' sequences
  std::vector<uint32_t> inflight_ids_;  // their ids once taken
  std::unordered_map<SeqId, int> inflight_row_of_;
  uint64_t pipelined_steps_ = 0, overlapped_steps_ = 0, drains_ = 0;  // logged at shutdown
  uint64_t prompt_tokens_ = 0, cached_prompt_tokens_ = 0, generated_tokens_ = 0, steps_ = 0;

  // Disaggregated serving.
  KvTransferHooks hooks_;
  // A device cache's host staging blocks: its free list is the step thread's; the transfer thread
  // only computes addresses (base and block_bytes do not change).
  std::optional<KvStaging> staging_;
  std::mutex lease_mu_;  // leases_ and released_blocks_ (ReleaseKvLease runs on other threads)
  std::unordered_map<uint64_t, Lease> leases_;
  std::vector<int32_t> released_blocks_;
  uint64_t next_lease_ = 1;
  std::deque<SeqId> import_waiting_;  // step thread: admitted, no blocks reserved yet
  std::mutex transfer_mu_;
  std::condition_variable transfer_cv_;
  std::deque<ImportJob> transfer_jobs_;
  std::vector<ImportDone> transfer_done_;
  bool transfer_stop_ = false;
  uint64_t kv_transfers_ = 0, kv_transfer_failures_ = 0, kv_transfer_bytes_ = 0;
  double kv_transfer_seconds_ = 0;
  std::thread transfer_thread_;
};

}  // namespace dyn::native_engine_impl
