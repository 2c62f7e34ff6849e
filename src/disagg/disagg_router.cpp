#include "disagg/disagg_router.h"

#include <algorithm>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/log.h"

namespace dyn {

// One client request across its sub-requests (prefill, decode, fallback). They run one after the
// other and each engine calls its sink in order and never concurrently, so the fields need no
// lock: the next sub-request starts from the previous one's last delta, and nothing touches the
// flow after that start.
struct DisaggRouter::Flow {
  PreprocessedRequest request;  // as the client sent it
  std::shared_ptr<RequestContext> context;
  OutputSink sink;
  bool prompt_counts_sent = false;
  bool finished = false;
  bool fell_back = false;
  // Remote path.
  std::vector<uint32_t> prefill_tokens;  // the prefill call's deltas before its last (normally none)
  std::vector<TokenLogprob> prefill_logprobs;
  bool have_first_token = false;
  uint32_t first_token = 0;
  std::string kv_transfer;       // the prefill worker's descriptor
  std::vector<uint32_t> decoded;  // tokens the decode call has sent so far
};

namespace {

bool IsUnavailable(const EngineOutput& out) {
  return out.finish_reason == FinishReason::kError && std::string_view(out.error).starts_with("Unavailable");
}

// Sums the pools' fields the router does not count itself.
void AddPoolMetrics(EngineMetrics* into, const EngineMetrics& from) {
  into->waiting += from.waiting;
  into->kv_blocks_total += from.kv_blocks_total;
  into->kv_blocks_used += from.kv_blocks_used;
  into->kv_blocks_cached += from.kv_blocks_cached;
  into->cached_prompt_tokens += from.cached_prompt_tokens;
  into->preemptions += from.preemptions;
  into->steps += from.steps;
  into->pipelined_steps += from.pipelined_steps;
  into->migrations += from.migrations;
  into->kv_leases += from.kv_leases;
  into->kv_leased_blocks += from.kv_leased_blocks;
  into->kv_transfers += from.kv_transfers;
  into->kv_transfer_failures += from.kv_transfer_failures;
  into->kv_transfer_bytes += from.kv_transfer_bytes;
  into->kv_transfer_seconds += from.kv_transfer_seconds;
  into->router_decisions += from.router_decisions;
  into->router_rejections += from.router_rejections;
  into->kv_events_applied += from.kv_events_applied;
  into->kv_events_dropped += from.kv_events_dropped;
  into->kv_event_gaps += from.kv_event_gaps;
  into->kv_dumps_applied += from.kv_dumps_applied;
}

}  // namespace

std::shared_ptr<DisaggRouter> DisaggRouter::Create(std::shared_ptr<RemoteEngine> prefill,
                                                   std::shared_ptr<RemoteEngine> decode, DisaggRouterOptions options) {
  return std::make_shared<DisaggRouter>(std::move(prefill), std::move(decode), options);
}

DisaggRouter::DisaggRouter(std::shared_ptr<RemoteEngine> prefill, std::shared_ptr<RemoteEngine> decode,
                           DisaggRouterOptions options)
    : prefill_(std::move(prefill)), decode_(std::move(decode)), options_(options) {
  options_.max_local_prefill_tokens = std::max(0, options_.max_local_prefill_tokens);
}

void DisaggRouter::Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) {
  auto flow = std::make_shared<Flow>();
  flow->request = std::move(request);
  flow->request.phase = RequestPhase::kFull;  // the client's request is a whole one
  flow->context = std::move(context);
  flow->sink = std::move(sink);
  running_.fetch_add(1);
  prompt_tokens_.fetch_add(flow->request.token_ids.size());
  if (prefill_->num_instances() == 0) {
    Local(flow);
    return;
  }
  const int prompt = static_cast<int>(flow->request.token_ids.size());
  const int uncached = prompt - decode_->CachedPrefixTokens(flow->request.token_ids);
  if (uncached <= options_.max_local_prefill_tokens) {
    Local(flow);
    return;
  }
  Prefill(flow);
}

void DisaggRouter::Local(const std::shared_ptr<Flow>& flow) {
  local_prefills_.fetch_add(1);
  decode_->Generate(flow->request, flow->context, ForwardingSink(flow));
}

void DisaggRouter::Prefill(const std::shared_ptr<Flow>& flow) {
  remote_prefills_.fetch_add(1);
  PreprocessedRequest p = flow->request;
  p.phase = RequestPhase::kPrefillOnly;
  auto self = shared_from_this();
  prefill_->Generate(std::move(p), flow->context, [self, flow](EngineOutput&& out) {
    if (!out.finish_reason) {
      // A prefill worker sends one delta; keep anything earlier for the forwarded first delta.
      flow->prefill_tokens.insert(flow->prefill_tokens.end(), out.token_ids.begin(), out.token_ids.end());
      flow->prefill_logprobs.insert(flow->prefill_logprobs.end(), out.logprobs.begin(), out.logprobs.end());
      return;
    }
    self->OnPrefillDone(flow, std::move(out));
  });
}

void DisaggRouter::OnPrefillDone(const std::shared_ptr<Flow>& flow, EngineOutput out) {
  out.token_ids.insert(out.token_ids.begin(), flow->prefill_tokens.begin(), flow->prefill_tokens.end());
  out.logprobs.insert(out.logprobs.begin(), flow->prefill_logprobs.begin(), flow->prefill_logprobs.end());
  if (IsUnavailable(out) && out.token_ids.empty()) {
    Fallback(flow, "prefill failed: " + out.error);
    return;
  }
  const bool continues = !out.kv_transfer.empty() && out.finish_reason != FinishReason::kError &&
                         out.finish_reason != FinishReason::kCancelled;
  if (!continues) {
    // The first token ended the request (EOS, a stop id, max_tokens 1), or an error / cancel.
    Forward(flow, std::move(out));
    return;
  }
  if (out.token_ids.size() != 1) {
    EngineOutput bad;
    bad.finish_reason = FinishReason::kError;
    bad.error = "Internal: prefill worker returned " + std::to_string(out.token_ids.size()) + " tokens, expected 1";
    Forward(flow, std::move(bad));
    return;
  }
  flow->have_first_token = true;
  flow->first_token = out.token_ids[0];
  flow->kv_transfer = std::move(out.kv_transfer);
  out.kv_transfer.clear();
  out.finish_reason.reset();
  Forward(flow, std::move(out));  // the client's first token, at once
  Decode(flow);
}

void DisaggRouter::Decode(const std::shared_ptr<Flow>& flow) {
  PreprocessedRequest d = flow->request;
  d.phase = RequestPhase::kDecodeImported;
  d.kv_transfer = flow->kv_transfer;
  d.first_token = flow->first_token;
  auto self = shared_from_this();
  decode_->Generate(std::move(d), flow->context,
                    [self, flow](EngineOutput&& out) { self->OnDecodeOutput(flow, std::move(out)); });
}

void DisaggRouter::OnDecodeOutput(const std::shared_ptr<Flow>& flow, EngineOutput out) {
  if (out.finish_reason == FinishReason::kCancelled || (IsUnavailable(out) && !flow->fell_back)) {
    // The decode worker may never have pulled (and so never released) the prompt's KV. A second
    // release of a lease it did end is answered "not held" and changes nothing.
    if (options_.release_kv && !flow->kv_transfer.empty()) options_.release_kv(flow->kv_transfer);
  }
  if (IsUnavailable(out) && !flow->fell_back) {
    if (!out.token_ids.empty()) {
      EngineOutput partial;
      partial.token_ids = out.token_ids;
      partial.logprobs = std::move(out.logprobs);
      partial.worker_id = out.worker_id;
      flow->decoded.insert(flow->decoded.end(), out.token_ids.begin(), out.token_ids.end());
      Forward(flow, std::move(partial));
    }
    Fallback(flow, "decode failed: " + out.error);
    return;
  }
  flow->decoded.insert(flow->decoded.end(), out.token_ids.begin(), out.token_ids.end());
  Forward(flow, std::move(out));
}

// Serves the rest of the request on the decode pool as an aggregated (kFull) request: from the
// start when the prefill failed, else with the tokens the client already has as prompt.
void DisaggRouter::Fallback(const std::shared_ptr<Flow>& flow, const std::string& why) {
  fallbacks_.fetch_add(1);
  flow->fell_back = true;
  PreprocessedRequest r = flow->request;
  std::vector<uint32_t> carried;
  if (flow->have_first_token) carried.push_back(flow->first_token);
  carried.insert(carried.end(), flow->decoded.begin(), flow->decoded.end());
  const int done = static_cast<int>(carried.size());
  DYN_LOG(WARN) << "request " << flow->context->id() << ": " << why << "; serving it aggregated after " << done
                << " tokens";
  if (done >= r.stop.max_tokens) {
    EngineOutput end;
    end.finish_reason = FinishReason::kLength;
    Forward(flow, std::move(end));
    return;
  }
  r.token_ids.insert(r.token_ids.end(), carried.begin(), carried.end());
  r.stop.max_tokens -= done;
  r.stop.min_tokens = std::max(0, r.stop.min_tokens - done);
  decode_->Generate(std::move(r), flow->context, ForwardingSink(flow));
}

OutputSink DisaggRouter::ForwardingSink(const std::shared_ptr<Flow>& flow) {
  auto self = shared_from_this();
  return [self, flow](EngineOutput&& out) { self->Forward(flow, std::move(out)); };
}

// Sends a delta to the client: prompt counts once (on its first delta), never a descriptor.
void DisaggRouter::Forward(const std::shared_ptr<Flow>& flow, EngineOutput out) {
  if (flow->finished) return;
  if (!flow->prompt_counts_sent) {
    flow->prompt_counts_sent = true;
    out.prompt_tokens = static_cast<uint32_t>(flow->request.token_ids.size());
    out.cached_tokens = std::min(out.cached_tokens, out.prompt_tokens);
  } else {
    out.prompt_tokens = 0;
    out.cached_tokens = 0;
  }
  out.kv_transfer.clear();
  generated_tokens_.fetch_add(out.token_ids.size());
  if (out.finish_reason) {
    flow->finished = true;
    running_.fetch_sub(1);
  }
  flow->sink(std::move(out));
}

EngineMetrics DisaggRouter::Metrics() const {
  EngineMetrics m;
  AddPoolMetrics(&m, decode_->Metrics());
  AddPoolMetrics(&m, prefill_->Metrics());
  m.running = running_.load();
  m.prompt_tokens = prompt_tokens_.load();
  m.generated_tokens = generated_tokens_.load();
  m.local_prefills = local_prefills_.load();
  m.remote_prefills = remote_prefills_.load();
  m.disagg_fallbacks = fallbacks_.load();
  return m;
}

void DisaggRouter::Shutdown() {
  prefill_->Shutdown();
  decode_->Shutdown();
}

}  // namespace dyn
