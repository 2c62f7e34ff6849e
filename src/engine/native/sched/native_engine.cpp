#include "engine/native/sched/native_engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "engine/request_inbox.h"
#include "engine/native/sched/sampler.h"
#include "engine/native/sched/scheduler.h"

namespace dyn {
namespace {

using Incoming = IncomingRequest;

bool Contains(const std::vector<uint32_t>& v, uint32_t t) { return std::find(v.begin(), v.end(), t) != v.end(); }

class NativeEngine final : public Engine {
 public:
  NativeEngine(std::unique_ptr<Model> model, const NativeEngineOptions& options, int num_blocks)
      : model_(std::move(model)),
        vocab_size_(model_->config().vocab_size),
        pool_(num_blocks, options.block_size, options.enable_prefix_caching),
        scheduler_(pool_, SchedulerConfig{options.max_num_seqs, options.max_num_batched_tokens, 0}),
        sampler_(vocab_size_) {
    const int pool_tokens = num_blocks * options.block_size;
    const int max_pos = model_->config().max_position_embeddings;
    context_length_ = max_pos > 0 ? std::min(max_pos, pool_tokens) : pool_tokens;
    pool_.SetEventSink(options.kv_event_sink);
    metrics_.kv_blocks_total = num_blocks;
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

 private:
  // One admitted request, owned by the step thread.
  struct Active {
    PreprocessedRequest request;
    std::shared_ptr<RequestContext> context;
    OutputSink sink;
    SamplerRng rng;
    int generated = 0;
    bool sent_first = false;
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
  void Finish(SeqId id, FinishReason reason, std::string error = {});
  void PublishMetrics();
  Status Validate(const PreprocessedRequest& r) const;

  std::unique_ptr<Model> model_;
  const int vocab_size_;
  int context_length_ = 0;

  RequestInbox inbox_;

  // Step-thread state.
  BlockPool pool_;
  Scheduler scheduler_;
  Sampler sampler_;
  std::unordered_map<SeqId, Active> active_;
  SeqId next_id_ = 1;
  std::vector<float> logits_;
  std::vector<ForwardSeq> batch_;
  std::vector<uint32_t> banned_;
  std::vector<Delivery> outbox_;
  uint64_t prompt_tokens_ = 0, cached_prompt_tokens_ = 0, generated_tokens_ = 0, steps_ = 0;

  mutable std::mutex metrics_mu_;
  EngineMetrics metrics_;

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
  return Status::Ok();
}

void NativeEngine::Admit(Incoming in) {
  if (in.context && in.context->cancelled()) {
    EndLater(std::move(in.sink), FinishReason::kCancelled);
    return;
  }
  Status st = Validate(in.request);
  const SeqId id = next_id_++;
  if (st.ok()) st = scheduler_.Add(id, in.request.token_ids);
  if (!st.ok()) {
    EndLater(std::move(in.sink), FinishReason::kError, st.message());
    return;
  }
  prompt_tokens_ += in.request.token_ids.size();
  SamplerRng rng = MakeSamplerRng(in.request.sampling);
  active_.emplace(id, Active{std::move(in.request), std::move(in.context), std::move(in.sink), std::move(rng)});
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
    if (a.context && a.context->cancelled()) cancelled.push_back(id);
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
  logits_.resize(static_cast<size_t>(num_logits) * vocab_size_);
  Status st = model_->Forward(batch_, logits_.data());
  ++steps_;
  if (!st.ok()) {
    DYN_LOG(ERROR) << "forward pass failed: " << st.ToString();
    scheduler_.DiscardStep();
    for (const ScheduledChunk& c : out.batch) Finish(c.id, FinishReason::kError, "forward pass failed: " + st.message());
    return;
  }
  scheduler_.CommitStep();

  int row = 0;
  for (const ScheduledChunk& c : out.batch) {
    if (!c.sample) continue;
    std::span<float> logits(logits_.data() + static_cast<size_t>(row++) * vocab_size_, vocab_size_);
    Active& a = active_.at(c.id);
    const PreprocessedRequest& r = a.request;
    auto all = scheduler_.tokens(c.id);
    const int prompt_len = scheduler_.prompt_len(c.id);
    banned_.clear();
    if (a.generated < r.stop.min_tokens) {
      banned_ = r.stop.stop_token_ids;
      if (!r.stop.ignore_eos) banned_.insert(banned_.end(), r.eos_token_ids.begin(), r.eos_token_ids.end());
      std::erase_if(banned_, [&](uint32_t t) { return t >= static_cast<uint32_t>(vocab_size_); });
    }
    EngineOutput delta;
    TokenLogprob lp;
    const bool want_lp = r.sampling.logprobs || r.sampling.top_logprobs > 0;
    const uint32_t token = sampler_.Sample(logits, r.sampling, all.first(prompt_len), all.subspan(prompt_len),
                                           banned_, a.rng, want_lp ? &lp : nullptr);
    ++a.generated;
    ++generated_tokens_;
    delta.token_ids.push_back(token);
    if (want_lp) delta.logprobs.push_back(std::move(lp));
    if (!a.sent_first) {
      a.sent_first = true;
      delta.prompt_tokens = static_cast<uint32_t>(prompt_len);
      delta.cached_tokens = static_cast<uint32_t>(std::max(0, scheduler_.first_cached_tokens(c.id)));
      cached_prompt_tokens_ += delta.cached_tokens;
    }
    const bool may_stop = a.generated >= r.stop.min_tokens;
    if (may_stop && ((!r.stop.ignore_eos && Contains(r.eos_token_ids, token)) || Contains(r.stop.stop_token_ids, token))) {
      delta.finish_reason = FinishReason::kStop;
    } else if (a.generated >= r.stop.max_tokens || prompt_len + a.generated >= context_length_) {
      delta.finish_reason = FinishReason::kLength;
    }
    if (delta.finish_reason) {
      scheduler_.Finish(c.id);
      outbox_.push_back({nullptr, std::move(a.sink), std::move(delta)});
      active_.erase(c.id);
    } else {
      scheduler_.AppendToken(c.id, token);
      outbox_.push_back({&a.sink, nullptr, std::move(delta)});
    }
  }
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
  metrics_.running = scheduler_.num_running();
  metrics_.waiting = scheduler_.num_waiting();
  metrics_.kv_blocks_used = pool_.num_used_blocks();
  metrics_.kv_blocks_cached = pool_.num_cached_free_blocks();
  metrics_.prompt_tokens = prompt_tokens_;
  metrics_.cached_prompt_tokens = cached_prompt_tokens_;
  metrics_.generated_tokens = generated_tokens_;
  metrics_.preemptions = scheduler_.num_preemptions();
  metrics_.steps = steps_;
}

void NativeEngine::Loop() {
  std::vector<Incoming> incoming;
  for (;;) {
    if (!inbox_.Take(&incoming, active_.empty())) break;
    for (Incoming& in : incoming) Admit(std::move(in));
    incoming.clear();
    DropCancelled();
    if (active_.empty()) {
      PublishMetrics();
      Deliver();
      continue;
    }
    SchedulerOutput out = scheduler_.Schedule();
    for (auto& [id, status] : out.failed) Finish(id, FinishReason::kError, status.message());
    if (!out.batch.empty()) RunStep(out);
    PublishMetrics();
    Deliver();
    if (out.batch.empty() && !active_.empty()) {
      // Nothing could run (should not happen: an idle pool fits any admitted sequence); do not spin.
      inbox_.SleepUntil(std::chrono::steady_clock::now() + std::chrono::milliseconds(1));
    }
  }
  // Shutting down: every stream still open ends as cancelled.
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
  DYN_RETURN_IF_ERROR(model->InitKvCache(num_blocks, options.block_size).WithContext("InitKvCache"));
  DYN_LOG(INFO) << "native engine: " << model->Describe() << "; " << num_blocks << " KV blocks of "
                << options.block_size << " tokens";
  return EnginePtr(std::make_shared<NativeEngine>(std::move(model), options, num_blocks));
}

}  // namespace dyn
