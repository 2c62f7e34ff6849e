#include "engine/native/sched/native_engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "engine/request_inbox.h"
#include "engine/native/sched/batch_sampler.h"
#include "engine/native/sched/sampler.h"
#include "engine/native/sched/scheduler.h"

namespace dyn {
namespace {

using Incoming = IncomingRequest;

bool Contains(const std::vector<uint32_t>& v, uint32_t t) { return std::find(v.begin(), v.end(), t) != v.end(); }

int SamplingThreads(const NativeEngineOptions& o, const Model& model) {
  if (o.sampling_threads > 0) return o.sampling_threads;
  if (!model.samples_on_device()) return 1;
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u));
}

class NativeEngine final : public Engine {
 public:
  NativeEngine(std::unique_ptr<Model> model, const NativeEngineOptions& options, int num_blocks)
      : model_(std::move(model)),
        vocab_size_(model_->config().vocab_size),
        pool_(num_blocks, options.block_size, options.enable_prefix_caching),
        scheduler_(pool_, SchedulerConfig{options.max_num_seqs, options.max_num_batched_tokens, 0}),
        sampler_(vocab_size_, SamplingThreads(options, *model_)),
        pipelined_(options.pipelined_decode && model_->samples_pipelined()),
        hooks_(options.kv_transfer) {
    const int pool_tokens = num_blocks * options.block_size;
    const int max_pos = model_->config().max_position_embeddings;
    context_length_ = max_pos > 0 ? std::min(max_pos, pool_tokens) : pool_tokens;
    pool_.SetEventSink(options.kv_event_sink);
    metrics_.kv_blocks_total = num_blocks;
    if (hooks_.can_import()) transfer_thread_ = std::thread([this] { TransferLoop(); });
    thread_ = std::thread([this] { Loop(); });
  }

  ~NativeEngine() override { Shutdown(); }

  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    inbox_.Push(std::move(request), std::move(context), std::move(sink));
  }

  EngineMetrics Metrics() const override {
    std::lock_guard lock(metrics_mu_);
    return metrics_;
  }

  void Shutdown() override {
    inbox_.Close();
    if (thread_.joinable()) thread_.join();
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
    std::vector<int32_t> dst;
  };
  struct ImportDone {
    SeqId id = 0;
    Result<size_t> bytes = Status::Ok();
    double seconds = 0;
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
  void FinishImport(const ImportDone& done);
  void TransferLoop();  // the transfer thread
  bool HasLeases();

  std::unique_ptr<Model> model_;
  const int vocab_size_;
  int context_length_ = 0;

  RequestInbox inbox_;

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

  mutable std::mutex metrics_mu_;
  EngineMetrics metrics_;

  // Disaggregated serving.
  KvTransferHooks hooks_;
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

  std::thread thread_;  // last: starts after everything above is built
};

Status NativeEngine::Validate(const PreprocessedRequest& r) const {
  if (r.token_ids.empty()) return Status::InvalidArgument("the prompt is empty");
  for (uint32_t t : r.token_ids) {
    if (t >= static_cast<uint32_t>(vocab_size_)) {
      return Status::InvalidArgument("prompt token id " + std::to_string(t) + " is out of range (vocabulary size " +
                                     std::to_string(vocab_size_) + ")");
    }
  }
  if (r.stop.max_tokens < 1) return Status::InvalidArgument("max_tokens must be >= 1");
  if (r.stop.min_tokens < 0) return Status::InvalidArgument("min_tokens must be >= 0");
  if (static_cast<int>(r.token_ids.size()) > context_length_) {
    return Status::InvalidArgument("the prompt has " + std::to_string(r.token_ids.size()) +
                                   " tokens, more than the context length of " + std::to_string(context_length_) +
                                   (context_length_ < model_->config().max_position_embeddings
                                        ? " (limited by the KV cache size)"
                                        : ""));
  }
  DYN_RETURN_IF_ERROR(ValidateSamplingParams(r.sampling));
  if (r.phase == RequestPhase::kPrefillOnly && !hooks_.can_prefill())
    return Status::InvalidArgument("this worker cannot hand KV to a decode worker (no transfer backend)");
  if (r.phase == RequestPhase::kDecodeImported) {
    if (!hooks_.can_import()) return Status::InvalidArgument("this worker cannot import KV (no transfer backend)");
    if (r.kv_transfer.empty()) return Status::InvalidArgument("decode request without a KV transfer descriptor");
    if (r.first_token >= static_cast<uint32_t>(vocab_size_))
      return Status::InvalidArgument("first token " + std::to_string(r.first_token) + " is out of range");
  }
  return Status::Ok();
}

void NativeEngine::Admit(Incoming in) {
  if (in.context && in.context->cancelled()) {
    EndLater(std::move(in.sink), FinishReason::kCancelled);
    return;
  }
  Status st = Validate(in.request);
  const SeqId id = next_id_++;
  const bool import = in.request.phase == RequestPhase::kDecodeImported;
  if (st.ok() && !import) st = scheduler_.Add(id, in.request.token_ids);
  if (!st.ok()) {
    EndLater(std::move(in.sink), FinishReason::kError, st.message());
    return;
  }
  prompt_tokens_ += in.request.token_ids.size();
  SamplerRng rng = MakeSamplerRng(in.request.sampling);
  Active a{std::move(in.request), std::move(in.context), std::move(in.sink), std::move(rng)};
  if (import) {
    a.importing = true;
    a.generated = 1;  // the prefill worker's token
    import_waiting_.push_back(id);
  }
  active_.emplace(id, std::move(a));
}

void NativeEngine::HandOff(SeqId id, Active& a, EngineOutput& delta) {
  std::vector<int32_t> blocks = scheduler_.Detach(id);
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
  if (!blocks.empty()) scheduler_.ReleaseDetached(blocks);
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
                  std::vector<int32_t>(plan->block_table.begin() + plan->cached_blocks, plan->block_table.end())};
    if (job.dst.empty()) {  // everything was cached here already
      FinishImport(ImportDone{id, size_t{0}, 0.0});
      continue;
    }
    std::lock_guard lock(transfer_mu_);
    transfer_jobs_.push_back(std::move(job));
    transfer_cv_.notify_one();
  }
  std::vector<ImportDone> done;
  {
    std::lock_guard lock(transfer_mu_);
    done.swap(transfer_done_);
  }
  for (const ImportDone& d : done) FinishImport(d);
}

void NativeEngine::FinishImport(const ImportDone& done) {
  Active& a = active_.at(done.id);
  hooks_.release(a.request.kv_transfer);
  a.importing = false;
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
    Result<size_t> bytes = hooks_.pull(job.descriptor, job.first_block, job.dst);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard lock(transfer_mu_);
    transfer_done_.push_back(ImportDone{job.id, std::move(bytes), seconds});
  }
}

void NativeEngine::Finish(SeqId id, FinishReason reason, std::string error) {
  auto it = active_.find(id);
  scheduler_.Finish(id);
  if (it == active_.end()) return;
  EndLater(std::move(it->second.sink), reason, std::move(error));
  active_.erase(it);
}

void NativeEngine::DropCancelled() {
  std::vector<SeqId> cancelled;
  for (auto& [id, a] : active_) {
    // An import in progress is ended when its copy is over (its blocks are being written).
    if (a.context && a.context->cancelled() && !a.importing) cancelled.push_back(id);
  }
  for (SeqId id : cancelled) Finish(id, FinishReason::kCancelled);
}

void NativeEngine::RunStep(const SchedulerOutput& out) {
  batch_.clear();
  int num_logits = 0;
  for (const ScheduledChunk& c : out.batch) {
    batch_.push_back(ForwardSeq{c.tokens, c.start_pos, c.block_table, c.sample});
    num_logits += c.sample ? 1 : 0;
  }
  // Rows the device can sample (greedy or temperature, with top-k/top-p/min-p where the device
  // truncates; no penalties, logprobs or banned ids) come back as token ids; only the others'
  // logits (vocab_size floats each) are copied, and drawn on the host. No device row: Forward.
  const bool device = model_->samples_on_device(), truncation = model_->samples_truncated_on_device();
  host_index_.assign(num_logits, -1);
  int host_rows = 0, row = 0;
  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample) continue;
    const int r_index = row++;
    bool on_host = !device;
    if (device) {
      const Active& a = active_.at(c.id);
      BannedIds(a, &banned_scratch_);
      on_host = !banned_scratch_.empty() || !DeviceSamplable(a.request.sampling, vocab_size_, truncation);
    }
    if (on_host) host_index_[r_index] = host_rows++;
  }
  const bool on_device = host_rows < num_logits;
  device_sampling_.clear();
  if (on_device) {
    row = 0;
    for (const ScheduledChunk& c : out.batch) {
      if (!c.sample) continue;
      if (host_index_[row++] >= 0) {
        device_sampling_.push_back({0.0f, 0.0f, SampleCut{}, true});
        continue;
      }
      Active& a = active_.at(c.id);
      const SamplingParams& p = a.request.sampling;
      const float t = p.temperature;
      device_sampling_.push_back({t, t > 0.0f ? static_cast<float>(SamplerUniform01(a.rng)) : 0.0f, SampleCut{p.top_k, p.top_p, p.min_p}});
    }
  }
  device_tokens_.resize(num_logits);
  logits_.resize(static_cast<size_t>(host_rows) * vocab_size_);
  Status st = on_device ? model_->ForwardSample(batch_, device_sampling_, device_tokens_.data(), host_rows > 0 ? logits_.data() : nullptr)
                        : model_->Forward(batch_, logits_.data());
  ++steps_;
  if (!st.ok()) {
    DYN_LOG(ERROR) << "forward pass failed: " << st.ToString();
    scheduler_.DiscardStep();
    for (const ScheduledChunk& c : out.batch) Finish(c.id, FinishReason::kError, "forward pass failed: " + st.message());
    return;
  }
  scheduler_.CommitStep();

  if (host_rows > 0) SampleOnHost(out);

  row = 0;
  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample) continue;
    const int r_index = row++;
    const int h_index = host_index_[r_index];
    const uint32_t token = h_index >= 0 ? host_rows_[h_index].token : device_tokens_[r_index];
    TokenLogprob* logprob = h_index >= 0 && host_rows_[h_index].logprob != nullptr ? &row_logprobs_[h_index] : nullptr;
    EmitToken(c.id, active_.at(c.id), token, logprob, /*in_scheduler=*/false);
  }
}

void NativeEngine::EmitToken(SeqId id, Active& a, uint32_t token, TokenLogprob* logprob, bool in_scheduler) {
  {
    const PreprocessedRequest& r = a.request;
    const int prompt_len = scheduler_.prompt_len(id);
    EngineOutput delta;
    ++a.generated;
    ++generated_tokens_;
    delta.token_ids.push_back(token);
    if (logprob != nullptr) delta.logprobs.push_back(std::move(*logprob));
    if (!a.sent_first) {
      a.sent_first = true;
      delta.prompt_tokens = static_cast<uint32_t>(prompt_len);
      delta.cached_tokens = static_cast<uint32_t>(std::max(0, scheduler_.first_cached_tokens(id)));
      cached_prompt_tokens_ += delta.cached_tokens;
    }
    const bool may_stop = a.generated >= r.stop.min_tokens;
    if (may_stop && ((!r.stop.ignore_eos && Contains(r.eos_token_ids, token)) || Contains(r.stop.stop_token_ids, token))) {
      delta.finish_reason = FinishReason::kStop;
    } else if (a.generated >= r.stop.max_tokens || prompt_len + a.generated >= context_length_) {
      delta.finish_reason = FinishReason::kLength;
    }
    if (!delta.finish_reason && r.phase == RequestPhase::kPrefillOnly) {
      HandOff(id, a, delta);
      outbox_.push_back({nullptr, std::move(a.sink), std::move(delta)});
      active_.erase(id);
    } else if (delta.finish_reason) {
      scheduler_.Finish(id);
      outbox_.push_back({nullptr, std::move(a.sink), std::move(delta)});
      active_.erase(id);
    } else {
      if (!in_scheduler) scheduler_.AppendToken(id, token);
      outbox_.push_back({&a.sink, nullptr, std::move(delta)});
    }
  }
}

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
    Active& a = active_.at(c.id);
    const SamplingParams& p = a.request.sampling;
    const float t = p.temperature;
    device_sampling_.push_back({t, t > 0.0f ? static_cast<float>(SamplerUniform01(a.rng)) : 0.0f, SampleCut{p.top_k, p.top_p, p.min_p}});
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

void NativeEngine::BannedIds(const Active& a, std::vector<uint32_t>* out, int pending) const {
  out->clear();
  const PreprocessedRequest& r = a.request;
  if (a.generated + pending >= r.stop.min_tokens) return;
  *out = r.stop.stop_token_ids;
  if (!r.stop.ignore_eos) out->insert(out->end(), r.eos_token_ids.begin(), r.eos_token_ids.end());
  std::erase_if(*out, [&](uint32_t t) { return t >= static_cast<uint32_t>(vocab_size_); });
}

void NativeEngine::SampleOnHost(const SchedulerOutput& out) {
  const int host_rows = static_cast<int>(std::count_if(host_index_.begin(), host_index_.end(), [](int h) { return h >= 0; }));
  host_rows_.assign(host_rows, {});
  row_banned_.resize(host_rows);
  row_logprobs_.assign(host_rows, {});
  int row = 0;
  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample) continue;
    const int h_index = host_index_[row++];  // its logits row and host_rows_ entry
    if (h_index < 0) continue;
    Active& a = active_.at(c.id);
    const PreprocessedRequest& r = a.request;
    auto all = scheduler_.tokens(c.id);
    const int prompt_len = scheduler_.prompt_len(c.id);
    BannedIds(a, &row_banned_[h_index]);
    BatchSampler::Row& h = host_rows_[h_index];
    h.logits = std::span<float>(logits_.data() + static_cast<size_t>(h_index) * vocab_size_, vocab_size_);
    h.params = &r.sampling;
    h.prompt = all.first(prompt_len);
    h.output = all.subspan(prompt_len);
    h.banned = row_banned_[h_index];
    h.rng = &a.rng;
    h.logprob = r.sampling.logprobs || r.sampling.top_logprobs > 0 ? &row_logprobs_[h_index] : nullptr;
  }
  sampler_.Sample(host_rows_);
}

void NativeEngine::EndLater(OutputSink sink, FinishReason reason, std::string error) {
  Delivery d;
  d.owned = std::move(sink);
  d.output.finish_reason = reason;
  d.output.error = std::move(error);
  outbox_.push_back(std::move(d));
}

void NativeEngine::Deliver() {
  for (Delivery& d : outbox_) {
    const OutputSink& sink = d.sink ? *d.sink : d.owned;
    sink(std::move(d.output));
  }
  outbox_.clear();
}

void NativeEngine::PublishMetrics() {
  std::lock_guard lock(metrics_mu_);
  scheduler_.FillMetrics(metrics_);
  metrics_.prompt_tokens = prompt_tokens_;
  metrics_.cached_prompt_tokens = cached_prompt_tokens_;
  metrics_.generated_tokens = generated_tokens_;
  metrics_.steps = steps_;
  metrics_.pipelined_steps = overlapped_steps_;
  metrics_.kv_transfers = kv_transfers_;
  metrics_.kv_transfer_failures = kv_transfer_failures_;
  metrics_.kv_transfer_bytes = kv_transfer_bytes_;
  metrics_.kv_transfer_seconds = kv_transfer_seconds_;
  std::lock_guard lease_lock(lease_mu_);
  metrics_.kv_leases = static_cast<int>(leases_.size());
  int leased = 0;
  for (const auto& [id, l] : leases_) leased += static_cast<int>(l.blocks.size());
  metrics_.kv_leased_blocks = leased;
}

void NativeEngine::Loop() {
  std::vector<Incoming> incoming;
  for (;;) {
    const bool leases = HasLeases();
    if (!inbox_.Take(&incoming, active_.empty() && !leases)) break;
    for (Incoming& in : incoming) Admit(std::move(in));
    incoming.clear();
    ProcessLeases();
    ProcessImports();
    DropCancelled();
    if (inflight_ && (active_.empty() || !CanContinuePipeline())) DrainAndDeliver();
    if (active_.empty()) {
      PublishMetrics();
      Deliver();
      // Only leases are left: wake up for their releases and timeouts.
      if (leases) inbox_.SleepUntil(std::chrono::steady_clock::now() + std::chrono::milliseconds(5));
      continue;
    }
    SchedulerOutput out = scheduler_.Schedule();
    for (auto& [id, status] : out.failed) Finish(id, FinishReason::kError, status.message());
    if (inflight_ && !ContinuesPipeline(out)) {
      // Not expected after CanContinuePipeline; the step is forgotten and scheduled again.
      scheduler_.DiscardStep();
      ++drains_;
      DrainInflight();
    } else if (inflight_ || (!out.batch.empty() && CanStartPipeline(out))) {
      LaunchPipelined(out);
    } else if (!out.batch.empty()) {
      RunStep(out);
    }
    PublishMetrics();
    Deliver();
    if (out.batch.empty() && !active_.empty()) {
      // Nothing could run (should not happen: an idle pool fits any admitted sequence); do not spin.
      inbox_.SleepUntil(std::chrono::steady_clock::now() + std::chrono::milliseconds(1));
    }
  }
  DrainAndDeliver();
  if (pipelined_) {
    DYN_LOG(INFO) << "pipelined decode: " << pipelined_steps_ << " of " << steps_ << " steps launched pipelined, " << overlapped_steps_
                  << " of them before the previous step's ids were back; " << drains_ << " drains";
  }
  // Shutting down: copies in progress finish first (they write into reserved blocks).
  if (transfer_thread_.joinable()) {
    {
      std::lock_guard lock(transfer_mu_);
      transfer_stop_ = true;
      transfer_cv_.notify_one();
    }
    transfer_thread_.join();
  }
  for (auto& [id, a] : active_) {
    if (a.importing) hooks_.release(a.request.kv_transfer);
  }
  // Every stream still open ends as cancelled.
  std::vector<SeqId> open;
  for (auto& [id, a] : active_) open.push_back(id);
  for (SeqId id : open) Finish(id, FinishReason::kCancelled);
  PublishMetrics();
  Deliver();
  inbox_.CancelRemaining();
}

}  // namespace

Result<EnginePtr> CreateNativeEngine(std::unique_ptr<Model> model, const NativeEngineOptions& options) {
  if (!model) return Status::InvalidArgument("CreateNativeEngine: no model");
  if (options.block_size < 1) return Status::InvalidArgument("block_size must be >= 1");
  if (options.max_num_seqs < 1) return Status::InvalidArgument("max_num_seqs must be >= 1");
  if (options.max_num_batched_tokens < 1) return Status::InvalidArgument("max_num_batched_tokens must be >= 1");
  if (options.num_kv_blocks < 0) return Status::InvalidArgument("num_kv_blocks must be >= 0");
  if (model->config().vocab_size < 1) return Status::InvalidArgument("the model has no vocabulary");
  int num_blocks = options.num_kv_blocks;
  if (num_blocks == 0) {
    const size_t per_block = model->KvBytesPerToken() * static_cast<size_t>(options.block_size);
    const size_t n = per_block ? options.kv_cache_bytes / per_block : 0;
    if (n < 1) {
      return Status::ResourceExhausted("kv_cache_bytes (" + std::to_string(options.kv_cache_bytes) +
                                       ") cannot hold one KV block of " + std::to_string(per_block) + " bytes");
    }
    num_blocks = static_cast<int>(std::min<size_t>(n, 1u << 30));
  }
  const KvTransferHooks& hooks = options.kv_transfer;
  if (hooks.allocate_cache || hooks.cache_ready) {
    // Disaggregated serving: the transfer layer reads and writes the cache's blocks directly.
    const ModelConfig& c = model->config();
    KvCacheGeometry g;
    g.block_size = options.block_size;
    g.num_layers = c.num_layers;
    g.num_kv_heads = c.num_kv_heads;
    g.head_dim = c.head_dim;
    g.block_bytes = model->KvBytesPerToken() * static_cast<size_t>(options.block_size);
    // The cache's element type (a backend may keep bf16), so a peer with another type is refused
    // by the layout check rather than copying misread bytes.
    g.dtype = model->KvCacheDType() == DType::kBF16 ? "bf16" : "f32";
    g.num_blocks = num_blocks;
    if (hooks.allocate_cache) {
      DYN_ASSIGN_OR_RETURN(void* memory, hooks.allocate_cache(g));
      DYN_RETURN_IF_ERROR(model->InitKvCacheAt(num_blocks, options.block_size, memory, g.block_bytes * num_blocks)
                              .WithContext("KV cache for transfer"));
    } else {
      DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
    }
    void* base = model->KvCacheHostMemory();
    if (base == nullptr) {
      return Status::Unsupported("KV transfer needs the KV cache in host memory; this backend keeps it on the device "
                                 "(a device transfer backend, CUDA IPC or NCCL, is not built yet)");
    }
    if (hooks.cache_ready) DYN_RETURN_IF_ERROR(hooks.cache_ready(g, base).WithContext("KV transfer"));
  } else {
    DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
  }
  DYN_LOG(INFO) << "native engine: " << model->Describe() << "; " << num_blocks << " KV blocks of "
                << options.block_size << " tokens";
  return EnginePtr(std::make_shared<NativeEngine>(std::move(model), options, num_blocks));
}

}  // namespace dyn
