// The engine interface: one token-in request, a stream of token-out deltas.
//
// Every engine (native, echo, mocker, and later a remote worker behind the request plane)
// implements Engine. The frontend does templating, tokenization, detokenization and stop strings;
// the engine does everything measured in tokens (sampling, max_tokens, stop token ids, EOS).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace dyn {

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  float top_p = 1.0f;
  int top_k = 0;  // 0 = off
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;  // divides positive logits of seen tokens (prompt and output)
  float frequency_penalty = 0.0f;   // subtracts count * penalty for output tokens
  float presence_penalty = 0.0f;    // subtracts penalty once for output tokens present
  std::optional<uint64_t> seed;     // same seed + same request -> same output
  bool logprobs = false;            // return the sampled token's logprob
  int top_logprobs = 0;             // and this many alternatives (0..20)
};

struct StopConditions {
  int max_tokens = 16;                   // generated tokens, >= 1
  int min_tokens = 0;                    // EOS and stop ids are ignored before this many
  std::vector<uint32_t> stop_token_ids;  // finish with reason "stop"; the token is emitted
  bool ignore_eos = false;
};

// Disaggregated serving: which part of the work this engine does for a request.
enum class RequestPhase : uint8_t {
  kFull,            // prefill and decode here (aggregated serving)
  kPrefillOnly,     // compute the prompt, sample the first token, hold the KV for a decode worker:
                    // the stream's one delta carries the token and kv_transfer (the descriptor)
  kDecodeImported,  // the prompt's KV is copied from the prefill worker named by kv_transfer;
                    // first_token is what it sampled; generate from the second token on
};

struct PreprocessedRequest {
  std::string request_id;
  std::vector<uint32_t> token_ids;  // the prompt
  SamplingParams sampling;
  StopConditions stop;
  std::vector<uint32_t> eos_token_ids;  // from the model card; ignored with ignore_eos
  RequestPhase phase = RequestPhase::kFull;
  std::string kv_transfer;   // kDecodeImported: the prefill worker's descriptor (transfer/kv_transfer.h)
  uint32_t first_token = 0;  // kDecodeImported: counts as the first generated token
};

enum class FinishReason { kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason r);  // "stop", "length", "cancelled", "error"

struct TopLogprob {
  uint32_t token = 0;
  float logprob = 0;
};

struct TokenLogprob {
  uint32_t token = 0;
  float logprob = 0;
  std::vector<TopLogprob> top;  // best first
};

// One delta of a stream. The last delta of every stream has finish_reason set.
struct EngineOutput {
  std::vector<uint32_t> token_ids;     // tokens generated since the previous delta
  std::vector<TokenLogprob> logprobs;  // parallel to token_ids when requested
  std::optional<FinishReason> finish_reason;
  std::string error;                   // with kError: what went wrong
  uint32_t prompt_tokens = 0;          // on the first delta: prompt length
  uint32_t cached_tokens = 0;          // on the first delta: prompt tokens served from the prefix cache
  // The worker that produced this delta, when a router chose one (0: not routed). The frontend
  // reports it to the client (x-dyn-worker-id header, nvext.worker_id).
  uint64_t worker_id = 0;
  // kPrefillOnly, on the final delta when decoding should continue elsewhere: the descriptor of
  // the KV the engine now holds under a lease (released by Engine::ReleaseKvLease or a timeout).
  std::string kv_transfer;
};

// Shared between the caller and the engine for one request. Cancel() may be called from any
// thread; the engine notices at its next step, frees the request's resources and ends the
// stream with kCancelled.
class RequestContext {
 public:
  explicit RequestContext(std::string id) : id_(std::move(id)) {}
  const std::string& id() const { return id_; }
  // Sets the flag and runs the OnCancel callbacks once, on the calling thread.
  void Cancel() {
    std::vector<std::function<void()>> fns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
      fns.swap(on_cancel_);
    }
    for (auto& fn : fns) fn();
  }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  // Runs `fn` when the request is cancelled (at once, here, if it already is). For layers that
  // must forward a cancellation instead of polling for it (the request plane). Keep fn cheap.
  void OnCancel(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!cancelled()) {
        on_cancel_.push_back(std::move(fn));
        return;
      }
    }
    fn();
  }

 private:
  std::string id_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::vector<std::function<void()>> on_cancel_;
};

// Receives deltas. Called on the engine's thread, in order, never concurrently for one request;
// it must not block for long (hand the delta to another thread's queue).
using OutputSink = std::function<void(EngineOutput&&)>;

struct EngineMetrics {
  int running = 0;                 // requests being generated
  int waiting = 0;                 // requests queued
  int kv_blocks_total = 0;
  int kv_blocks_used = 0;          // blocks held by running requests
  int kv_blocks_cached = 0;        // free blocks still holding a reusable prefix
  uint64_t prompt_tokens = 0;      // totals since start
  uint64_t cached_prompt_tokens = 0;
  uint64_t generated_tokens = 0;
  uint64_t preemptions = 0;
  uint64_t steps = 0;
  uint64_t pipelined_steps = 0;    // native engine on a GPU: steps launched before the previous step's ids were back
  uint64_t migrations = 0;         // streams moved to another worker after theirs failed
  // Disaggregated serving.
  int kv_leases = 0;                   // prefill side: leases held now
  int kv_leased_blocks = 0;            // blocks they hold
  uint64_t kv_transfers = 0;           // decode side: KV copies done (and failed)
  uint64_t kv_transfer_failures = 0;
  uint64_t kv_transfer_bytes = 0;
  double kv_transfer_seconds = 0;
  // Frontend side (the disaggregating router, disagg/disagg_router.h): where prompts were prefilled.
  uint64_t remote_prefills = 0;    // on a prefill worker, KV moved to the decode worker
  uint64_t local_prefills = 0;     // on the decode worker: short uncached part, or no prefill worker
  uint64_t disagg_fallbacks = 0;   // remote prefill or KV transfer failed: served aggregated instead
  // KV-aware routing (a frontend's engine for remote workers in kv mode; 0 elsewhere).
  uint64_t router_decisions = 0;
  uint64_t router_rejections = 0;  // every worker was busy: the client got 503
  uint64_t kv_events_applied = 0;
  uint64_t kv_events_dropped = 0;  // stored events whose parent block the worker did not hold
  uint64_t kv_event_gaps = 0;      // lost events detected (each triggers a dump request)
  uint64_t kv_dumps_applied = 0;   // resynchronisations from a worker's dump
};

class Engine {
 public:
  virtual ~Engine() = default;
  // Queues the request and returns at once; deltas arrive on `sink`. Invalid requests end with
  // one kError delta. Thread-safe.
  virtual void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) = 0;
  virtual EngineMetrics Metrics() const = 0;
  // Disaggregated serving: the decode worker has copied a prefill lease's KV (or gave up); its
  // blocks can be freed. False when the engine holds no such lease.
  virtual bool ReleaseKvLease(uint64_t lease_id) { return false; }
  // Stops the engine's threads; streams still running end with kCancelled. Idempotent.
  virtual void Shutdown() = 0;
};

using EnginePtr = std::shared_ptr<Engine>;

}  // namespace dyn
