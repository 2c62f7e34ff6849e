#include "frontend/metrics.h"

#include <cstdio>

#include "frontend/frontend.h"

namespace dyn {
namespace {

std::string FormatDouble(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

// Whole numbers print as integers (byte and token counters stay exact), the rest as %.9g.
std::string FormatSample(double v) {
  if (v >= 0 && v < 9007199254740992.0 && v == static_cast<double>(static_cast<uint64_t>(v)))
    return std::to_string(static_cast<uint64_t>(v));
  return FormatDouble(v);
}

std::string EscapeLabel(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void Header(std::string* out, std::string_view name, std::string_view type, std::string_view help) {
  out->append("# HELP ").append(name).append(" ").append(help).append("\n");
  out->append("# TYPE ").append(name).append(" ").append(type).append("\n");
}

}  // namespace

void FrontendMetrics::Histogram::Observe(double v, uint64_t times) {
  for (size_t i = 0; i < kBounds.size(); ++i) {
    if (v <= kBounds[i]) buckets[i] += times;
  }
  count += times;
  sum += v * static_cast<double>(times);
}

void FrontendMetrics::Histogram::Render(std::string* out, std::string_view name, std::string_view help) const {
  Header(out, name, "histogram", help);
  for (size_t i = 0; i < kBounds.size(); ++i) {
    out->append(name).append("_bucket{le=\"").append(FormatDouble(kBounds[i])).append("\"} ");
    out->append(std::to_string(buckets[i])).append("\n");
  }
  out->append(name).append("_bucket{le=\"+Inf\"} ").append(std::to_string(count)).append("\n");
  out->append(name).append("_sum ").append(FormatDouble(sum)).append("\n");
  out->append(name).append("_count ").append(std::to_string(count)).append("\n");
}

void FrontendMetrics::RequestStarted() {
  std::lock_guard lock(mu_);
  ++inflight_;
}

void FrontendMetrics::RequestFinished(std::string_view endpoint, int status) {
  std::lock_guard lock(mu_);
  --inflight_;
  ++requests_[{std::string(endpoint), status}];
}

void FrontendMetrics::ErrorReturned(std::string_view code) {
  std::lock_guard lock(mu_);
  ++errors_[std::string(code)];
}

void FrontendMetrics::ObserveTimeToFirstToken(double seconds) {
  std::lock_guard lock(mu_);
  ttft_.Observe(seconds, 1);
}

void FrontendMetrics::ObserveInterTokenLatency(double seconds, uint64_t tokens) {
  std::lock_guard lock(mu_);
  itl_.Observe(seconds, tokens);
}

void FrontendMetrics::AddTokens(uint64_t prompt, uint64_t cached_prompt, uint64_t generated) {
  std::lock_guard lock(mu_);
  prompt_tokens_ += prompt;
  cached_tokens_ += cached_prompt;
  generated_tokens_ += generated;
}

std::string FrontendMetrics::Render(const ModelRegistry& registry) const {
  std::string out;
  {
    std::lock_guard lock(mu_);
    Header(&out, "dyn_frontend_requests_total", "counter", "HTTP requests by endpoint and status code.");
    for (const auto& [key, count] : requests_) {
      out += "dyn_frontend_requests_total{endpoint=\"" + EscapeLabel(key.first) + "\",status=\"" +
             std::to_string(key.second) + "\"} " + std::to_string(count) + "\n";
    }
    Header(&out, "dyn_frontend_inflight_requests", "gauge", "HTTP requests being served.");
    out += "dyn_frontend_inflight_requests " + std::to_string(inflight_) + "\n";
    Header(&out, "dyn_frontend_errors_total", "counter", "Error responses by error code.");
    for (const auto& [code, count] : errors_) {
      out += "dyn_frontend_errors_total{code=\"" + EscapeLabel(code) + "\"} " + std::to_string(count) + "\n";
    }
    ttft_.Render(&out, "dyn_frontend_time_to_first_token_seconds", "Time from request receipt to the first generated token.");
    itl_.Render(&out, "dyn_frontend_inter_token_latency_seconds", "Time between generated tokens of one stream.");
    Header(&out, "dyn_frontend_input_tokens_total", "counter", "Prompt tokens of finished engine requests.");
    out += "dyn_frontend_input_tokens_total " + std::to_string(prompt_tokens_) + "\n";
    Header(&out, "dyn_frontend_cached_tokens_total", "counter", "Prompt tokens served from the prefix cache.");
    out += "dyn_frontend_cached_tokens_total " + std::to_string(cached_tokens_) + "\n";
    Header(&out, "dyn_frontend_output_tokens_total", "counter", "Generated tokens.");
    out += "dyn_frontend_output_tokens_total " + std::to_string(generated_tokens_) + "\n";
  }
  // One line per model for each engine metric (EngineMetrics, engine/engine.h).
  struct EngineSeries {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const EngineMetrics&);
  };
#define DYN_VALUE(field) [](const EngineMetrics& m) { return static_cast<double>(m.field); }
  static constexpr EngineSeries kEngine[] = {
      {"dyn_engine_running_requests", "gauge", "Requests being generated.", DYN_VALUE(running)},
      {"dyn_engine_waiting_requests", "gauge", "Requests queued.", DYN_VALUE(waiting)},
      {"dyn_engine_kv_blocks_total", "gauge", "KV cache blocks.", DYN_VALUE(kv_blocks_total)},
      {"dyn_engine_kv_blocks_used", "gauge", "KV blocks held by running requests.", DYN_VALUE(kv_blocks_used)},
      {"dyn_engine_kv_blocks_cached", "gauge", "Free KV blocks holding a reusable prefix.", DYN_VALUE(kv_blocks_cached)},
      {"dyn_engine_prompt_tokens_total", "counter", "Prompt tokens.", DYN_VALUE(prompt_tokens)},
      {"dyn_engine_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
       DYN_VALUE(cached_prompt_tokens)},
      {"dyn_engine_generated_tokens_total", "counter", "Generated tokens.", DYN_VALUE(generated_tokens)},
      {"dyn_engine_preemptions_total", "counter", "Preempted requests.", DYN_VALUE(preemptions)},
      {"dyn_engine_steps_total", "counter", "Engine steps.", DYN_VALUE(steps)},
      {"dyn_engine_pipelined_steps_total", "counter", "Engine steps launched before the previous step's tokens were back.",
       DYN_VALUE(pipelined_steps)},
      {"dyn_engine_migrations_total", "counter", "Streams migrated to another worker after theirs failed.",
       DYN_VALUE(migrations)},
      {"dyn_engine_kv_leases", "gauge", "Disaggregation, prefill side: KV leases held for decode workers.",
       DYN_VALUE(kv_leases)},
      {"dyn_engine_kv_leased_blocks", "gauge", "Disaggregation, prefill side: KV blocks held by leases.",
       DYN_VALUE(kv_leased_blocks)},
      {"dyn_engine_kv_transfers_total", "counter", "Disaggregation, decode side: KV copies from prefill workers (done or failed).",
       DYN_VALUE(kv_transfers)},
      {"dyn_engine_kv_transfer_failures_total", "counter", "Disaggregation, decode side: KV copies that failed.",
       DYN_VALUE(kv_transfer_failures)},
      {"dyn_engine_kv_transfer_bytes_total", "counter", "Disaggregation, decode side: KV bytes copied.",
       DYN_VALUE(kv_transfer_bytes)},
      {"dyn_engine_kv_transfer_seconds_total", "counter",
       "Disaggregation, decode side: time spent copying KV (bytes / seconds = bandwidth).", DYN_VALUE(kv_transfer_seconds)},
      {"dyn_router_remote_prefills_total", "counter", "Disaggregation: requests sent to a prefill worker.",
       DYN_VALUE(remote_prefills)},
      {"dyn_router_local_prefills_total", "counter",
       "Disaggregation: requests prefilled on the decode worker (short uncached part, or no prefill worker).",
       DYN_VALUE(local_prefills)},
      {"dyn_router_disagg_fallbacks_total", "counter",
       "Disaggregation: remote prefills served aggregated after the prefill or the KV transfer failed.",
       DYN_VALUE(disagg_fallbacks)},
      {"dyn_router_decisions_total", "counter", "KV router: requests routed.", DYN_VALUE(router_decisions)},
      {"dyn_router_rejections_total", "counter", "KV router: requests refused with 503 because every worker was busy.",
       DYN_VALUE(router_rejections)},
      {"dyn_router_kv_events_applied_total", "counter", "KV router: worker KV events applied to the index.",
       DYN_VALUE(kv_events_applied)},
      {"dyn_router_kv_events_dropped_total", "counter", "KV router: stored events dropped (parent block unknown).",
       DYN_VALUE(kv_events_dropped)},
      {"dyn_router_kv_event_gaps_total", "counter", "KV router: event-id gaps (lost events) detected.",
       DYN_VALUE(kv_event_gaps)},
      {"dyn_router_kv_dumps_applied_total", "counter", "KV router: workers resynchronised from their dump.",
       DYN_VALUE(kv_dumps_applied)},
  };
#undef DYN_VALUE
  auto models = registry.List();
  std::vector<std::pair<std::string, EngineMetrics>> per_model;
  for (const auto& m : models) per_model.emplace_back(m->name, m->engine->Metrics());
  for (const EngineSeries& series : kEngine) {
    Header(&out, series.name, series.type, series.help);
    for (const auto& [name, em] : per_model) {
      out += std::string(series.name) + "{model=\"" + EscapeLabel(name) + "\"} " + FormatSample(series.value(em)) + "\n";
    }
  }
  return out;
}

}  // namespace dyn
