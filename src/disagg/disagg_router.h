// DisaggRouter: the Engine a frontend serves for a model that has prefill workers and decode
// workers (docs/disaggregation.md). It joins two RemoteEngines, the prefill pool and the decode
// pool (which also holds aggregated "both" workers), and decides per request where the prompt
// is computed.
//
// Conditional disaggregation (Dynamo's rule): a prompt is prefilled remotely only when a prefill
// worker exists and its uncached part, prompt tokens minus the longest prefix a decode worker
// already holds (RemoteEngine::CachedPrefixTokens, kv router mode; 0 otherwise), exceeds
// max_local_prefill_tokens. Otherwise the request goes unchanged (kFull) to the decode pool.
//
// Remote path: the request goes as kPrefillOnly to the prefill pool (routed over it, KV-aware in
// kv mode). Its one delta carries the first token and, when decoding must continue, the KV
// descriptor. The first token reaches the client at once (TTFT is the prefill worker's); then the
// request goes as kDecodeImported (descriptor + first token) to the decode pool and its deltas are
// forwarded. The client sees prompt_tokens / cached_tokens once, from the prefill worker (the one
// that computed the prompt; the decode worker's prefix hits only save transfer).
//
// Failures: a prefill call that fails with Unavailable (no prefill worker left, all busy, dead
// after the pool's own migrations) is served aggregated on the decode pool; a decode call that
// fails with Unavailable (KV transfer failed, no decode worker took it) continues aggregated with
// the first token (and any decoded tokens) appended to the prompt and max/min_tokens reduced.
// Each request falls back at most once; other errors reach the client. The client's context is
// passed to every sub-request, so cancelling it cancels whichever one runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "runtime/remote_engine.h"

namespace dyn {

struct DisaggRouterOptions {
  // Prefill on the decode worker when prompt tokens minus its cached prefix are at most this
  // (flag --max-local-prefill-tokens). 0: every prompt with something to compute goes remote.
  int max_local_prefill_tokens = 512;
  // Ends the lease of a KV descriptor the router gives up on (the decode call failed or was
  // cancelled: its worker may never have pulled); e.g. SendKvRelease. Unset: leases time out.
  std::function<void(const std::string& descriptor)> release_kv;
};

// Hold it in a std::shared_ptr (Create): streams in flight keep it alive.
class DisaggRouter : public Engine, public std::enable_shared_from_this<DisaggRouter> {
 public:
  static std::shared_ptr<DisaggRouter> Create(std::shared_ptr<RemoteEngine> prefill, std::shared_ptr<RemoteEngine> decode,
                                              DisaggRouterOptions options);
  DisaggRouter(std::shared_ptr<RemoteEngine> prefill, std::shared_ptr<RemoteEngine> decode, DisaggRouterOptions options);

  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override;

  // running, prompt_tokens and generated_tokens are this router's own (client requests, tokens
  // sent to clients); migrations and the router_* / kv_event* counters are the two pools' sums;
  // local_prefills: requests prefilled on the decode pool by choice (short uncached part, no
  // prefill worker); remote_prefills: requests sent to a prefill worker; disagg_fallbacks: of
  // those, the ones served aggregated after the prefill or the KV transfer failed.
  EngineMetrics Metrics() const override;
  // Shuts both pools down.
  void Shutdown() override;

  const std::shared_ptr<RemoteEngine>& prefill_pool() const { return prefill_; }
  const std::shared_ptr<RemoteEngine>& decode_pool() const { return decode_; }

 private:
  struct Flow;
  void Local(const std::shared_ptr<Flow>& flow);
  void Prefill(const std::shared_ptr<Flow>& flow);
  void OnPrefillDone(const std::shared_ptr<Flow>& flow, EngineOutput out);
  void Decode(const std::shared_ptr<Flow>& flow);
  void OnDecodeOutput(const std::shared_ptr<Flow>& flow, EngineOutput out);
  void Fallback(const std::shared_ptr<Flow>& flow, const std::string& why);
  void Forward(const std::shared_ptr<Flow>& flow, EngineOutput out);
  OutputSink ForwardingSink(const std::shared_ptr<Flow>& flow);

  std::shared_ptr<RemoteEngine> prefill_, decode_;
  DisaggRouterOptions options_;
  std::atomic<int> running_{0};
  std::atomic<uint64_t> prompt_tokens_{0}, generated_tokens_{0};
  std::atomic<uint64_t> local_prefills_{0}, remote_prefills_{0}, fallbacks_{0};
};

}  // namespace dyn
