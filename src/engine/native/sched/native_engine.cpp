#include "engine/native/sched/native_engine.h"

#include <algorithm>
#include <string>
#include <vector>

#include "base/log.h"
#include "engine/native/sched/native_engine_impl.h"

namespace dyn {
namespace native_engine_impl {
namespace {

bool Contains(const std::vector<uint32_t>& v, uint32_t t) { return std::find(v.begin(), v.end(), t) != v.end(); }

}  // namespace

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
      device_sampling_.push_back(DeviceRow(active_.at(c.id)));
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

DeviceSampling NativeEngine::DeviceRow(Active& a) {
  const SamplingParams& p = a.request.sampling;
  const float t = p.temperature;
  return {t, t > 0.0f ? static_cast<float>(SamplerUniform01(a.rng)) : 0.0f, SampleCut{p.top_k, p.top_p, p.min_p}};
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

}  // namespace native_engine_impl

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
  std::optional<native_engine_impl::KvStaging> staging;
  if (hooks.allocate_cache || hooks.cache_ready) {
    // Disaggregated serving: the transfer layer reads and writes host memory holding the cache's
    // blocks: the cache itself where the CPU addresses it, else host staging blocks.
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
    size_t free_bytes = 0, total_bytes = 0;
    void* base = nullptr;
    if (model->DeviceMemory(&free_bytes, &total_bytes)) {
      DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
      g.num_blocks = static_cast<int>(std::clamp<size_t>(options.kv_staging_bytes / std::max<size_t>(g.block_bytes, 1), 1, static_cast<size_t>(num_blocks)));
      std::unique_ptr<std::byte[]> owned;
      if (hooks.allocate_cache) {
        DYN_ASSIGN_OR_RETURN(base, hooks.allocate_cache(g));
      } else {
        owned = std::make_unique_for_overwrite<std::byte[]>(g.block_bytes * static_cast<size_t>(g.num_blocks));
        base = owned.get();
      }
      staging.emplace(static_cast<std::byte*>(base), g.block_bytes, g.num_blocks, std::move(owned));
    } else if (hooks.allocate_cache) {
      DYN_ASSIGN_OR_RETURN(void* memory, hooks.allocate_cache(g));
      DYN_RETURN_IF_ERROR(model->InitKvCacheAt(num_blocks, options.block_size, memory, g.block_bytes * num_blocks)
                              .WithContext("KV cache for transfer"));
      base = model->KvCacheHostMemory();
    } else {
      DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
      base = model->KvCacheHostMemory();
    }
    if (base == nullptr) return Status::Unsupported("KV transfer needs a KV cache in host memory or a device cache to stage from");
    if (hooks.cache_ready) DYN_RETURN_IF_ERROR(hooks.cache_ready(g, base).WithContext("KV transfer"));
    if (staging) {  // last: nothing after it fails, and the engine unpins it when it goes
      const size_t bytes = g.block_bytes * static_cast<size_t>(g.num_blocks);
      staging->pinned = model->PinHostMemory(base, bytes);
      DYN_LOG(INFO) << "KV transfer through " << g.num_blocks << " host staging blocks (" << (bytes >> 20) << " MiB, "
                    << (staging->pinned ? "pinned" : "pageable") << "; the cache is in device memory)";
    }
  } else {
    DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
  }
  DYN_LOG(INFO) << "native engine: " << model->Describe() << "; " << num_blocks << " KV blocks of "
                << options.block_size << " tokens";
  return EnginePtr(std::make_shared<native_engine_impl::NativeEngine>(std::move(model), options, num_blocks, std::move(staging)));
}

}  // namespace dyn
