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
  struct Gauge {
    const char* name;
    const char* type;
    const char* help;
  };
  static constexpr Gauge kEngine[] = {
      {"dyn_engine_running_requests", "gauge", "Requests being generated."},
      {"dyn_engine_waiting_requests", "gauge", "Requests queued."},
      {"dyn_engine_kv_blocks_total", "gauge", "KV cache blocks."},
      {"dyn_engine_kv_blocks_used", "gauge", "KV blocks held by running requests."},
      {"dyn_engine_kv_blocks_cached", "gauge", "Free KV blocks holding a reusable prefix."},
      {"dyn_engine_prompt_tokens_total", "counter", "Prompt tokens."},
      {"dyn_engine_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache."},
      {"dyn_engine_generated_tokens_total", "counter", "Generated tokens."},
      {"dyn_engine_preemptions_total", "counter", "Preempted requests."},
      {"dyn_engine_steps_total", "counter", "Engine steps."},
      {"dyn_engine_migrations_total", "counter", "Streams migrated to another worker after theirs failed."},
      {"dyn_router_decisions_total", "counter", "KV router: requests routed."},
      {"dyn_router_rejections_total", "counter", "KV router: requests refused with 503 because every worker was busy."},
      {"dyn_router_kv_events_applied_total", "counter", "KV router: worker KV events applied to the index."},
      {"dyn_router_kv_events_dropped_total", "counter", "KV router: stored events dropped (parent block unknown)."},
      {"dyn_router_kv_event_gaps_total", "counter", "KV router: event-id gaps (lost events) detected."},
      {"dyn_router_kv_dumps_applied_total", "counter", "KV router: workers resynchronised from their dump."},
  };
  auto models = registry.List();
  std::vector<std::pair<std::string, EngineMetrics>> per_model;
  for (const auto& m : models) per_model.emplace_back(m->name, m->engine->Metrics());
  for (size_t g = 0; g < std::size(kEngine); ++g) {
    Header(&out, kEngine[g].name, kEngine[g].type, kEngine[g].help);
    for (const auto& [name, em] : per_model) {
      const uint64_t values[] = {static_cast<uint64_t>(em.running), static_cast<uint64_t>(em.waiting),
                                 static_cast<uint64_t>(em.kv_blocks_total), static_cast<uint64_t>(em.kv_blocks_used),
                                 static_cast<uint64_t>(em.kv_blocks_cached), em.prompt_tokens, em.cached_prompt_tokens,
                                 em.generated_tokens, em.preemptions, em.steps, em.migrations,
                                 em.router_decisions, em.router_rejections, em.kv_events_applied,
                                 em.kv_events_dropped, em.kv_event_gaps, em.kv_dumps_applied};
      out += std::string(kEngine[g].name) + "{model=\"" + EscapeLabel(name) + "\"} " + std::to_string(values[g]) + "\n";
    }
  }
  return out;
}

}  // namespace dyn
