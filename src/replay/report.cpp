// Text and JSON forms of ReplayReport (replay.h).
#include <boost/json.hpp>
#include <cstdio>
#include <string>

#include "replay/replay.h"

namespace dyn::replay {
namespace {

namespace json = boost::json;

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

json::object LatencyJson(const LatencySummary& s) {
  return json::object{{"count", s.count}, {"mean", s.mean}, {"p50", s.p50},
                      {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
}

json::object ReportJson(const ReplayReport& r) {
  json::array per_worker;
  for (uint64_t n : r.worker_requests) per_worker.push_back(n);
  return json::object{
      {"policy", r.policy},
      {"workers", r.num_workers},
      {"requests", r.requests},
      {"completed", r.completed},
      {"failed", r.failed},
      {"prompt_tokens", r.prompt_tokens},
      {"cached_tokens", r.cached_tokens},
      {"output_tokens", r.output_tokens},
      {"preemptions", r.preemptions},
      {"prefix_hit_rate", r.prefix_hit_rate},
      {"ttft_ms", LatencyJson(r.ttft_ms)},
      {"itl_ms", LatencyJson(r.itl_ms)},
      {"e2e_ms", LatencyJson(r.e2e_ms)},
      {"simulated_s", r.simulated_ms / 1000.0},
      {"output_tokens_per_s", r.output_tokens_per_s},
      {"wall_s", r.wall_ms / 1000.0},
      {"load_imbalance", r.load_imbalance},
      {"kv_events", r.kv_events},
      {"worker_requests", std::move(per_worker)},
      {"prefill_workers", r.num_prefill_workers},
      {"remote_prefills", r.remote_prefills},
      {"local_prefills", r.local_prefills},
      {"kv_transfers", r.kv_transfers},
      {"kv_transfer_bytes", r.kv_transfer_bytes},
      {"kv_transfer_ms", LatencyJson(r.kv_transfer_ms)},
      {"request_rate", r.request_rate},
      {"goodput",
       json::object{{"ttft_target_ms", r.ttft_target_ms},
                    {"itl_target_ms", r.itl_target_ms},
                    {"itl_criterion", r.itl_target_p99 ? "p99" : "mean"},
                    {"requests", r.good_requests},
                    {"requests_per_s", r.goodput_rps},
                    {"output_tokens_per_s", r.goodput_tokens_per_s}}},
  };
}

}  // namespace

std::string ReportToJson(const ReplayReport& report) { return json::serialize(ReportJson(report)); }

std::string ReportsToJson(std::span<const ReplayReport> reports) {
  json::array a;
  for (const ReplayReport& r : reports) a.push_back(ReportJson(r));
  return json::serialize(a);
}

std::string FormatReports(std::span<const ReplayReport> reports) {
  struct Row {
    const char* label;
    std::string (*cell)(const ReplayReport&);
  };
  static const Row kRows[] = {
      {"workers (P+D)",
       [](const ReplayReport& r) {
         return r.num_prefill_workers == 0 ? std::to_string(r.num_workers)
                                           : std::to_string(r.num_prefill_workers) + "+" + std::to_string(r.num_workers);
       }},
      {"request rate /s", [](const ReplayReport& r) { return Fmt("%.2f", r.request_rate); }},
      {"requests (done/all)",
       [](const ReplayReport& r) { return std::to_string(r.completed) + "/" + std::to_string(r.requests); }},
      {"failed", [](const ReplayReport& r) { return std::to_string(r.failed); }},
      {"prefix hit rate", [](const ReplayReport& r) { return Fmt("%.1f %%", 100 * r.prefix_hit_rate); }},
      {"TTFT mean ms", [](const ReplayReport& r) { return Fmt("%.0f", r.ttft_ms.mean); }},
      {"TTFT p50 ms", [](const ReplayReport& r) { return Fmt("%.0f", r.ttft_ms.p50); }},
      {"TTFT p90 ms", [](const ReplayReport& r) { return Fmt("%.0f", r.ttft_ms.p90); }},
      {"TTFT p99 ms", [](const ReplayReport& r) { return Fmt("%.0f", r.ttft_ms.p99); }},
      {"ITL mean ms", [](const ReplayReport& r) { return Fmt("%.1f", r.itl_ms.mean); }},
      {"ITL p50 ms", [](const ReplayReport& r) { return Fmt("%.1f", r.itl_ms.p50); }},
      {"ITL p90 ms", [](const ReplayReport& r) { return Fmt("%.1f", r.itl_ms.p90); }},
      {"ITL p99 ms", [](const ReplayReport& r) { return Fmt("%.1f", r.itl_ms.p99); }},
      {"e2e p50 s", [](const ReplayReport& r) { return Fmt("%.2f", r.e2e_ms.p50 / 1000); }},
      {"e2e p99 s", [](const ReplayReport& r) { return Fmt("%.2f", r.e2e_ms.p99 / 1000); }},
      {"output tok/s", [](const ReplayReport& r) { return Fmt("%.0f", r.output_tokens_per_s); }},
      {"goodput req/s", [](const ReplayReport& r) { return Fmt("%.2f", r.goodput_rps); }},
      {"goodput tok/s", [](const ReplayReport& r) { return Fmt("%.0f", r.goodput_tokens_per_s); }},
      {"good requests %",
       [](const ReplayReport& r) {
         return Fmt("%.1f", r.completed == 0 ? 0.0 : 100.0 * r.good_requests / static_cast<double>(r.requests));
       }},
      {"remote/local prefill",
       [](const ReplayReport& r) { return std::to_string(r.remote_prefills) + "/" + std::to_string(r.local_prefills); }},
      {"KV transfer GB", [](const ReplayReport& r) { return Fmt("%.2f", r.kv_transfer_bytes / 1e9); }},
      {"transfer p50 ms", [](const ReplayReport& r) { return Fmt("%.1f", r.kv_transfer_ms.p50); }},
      {"transfer p99 ms", [](const ReplayReport& r) { return Fmt("%.1f", r.kv_transfer_ms.p99); }},
      {"preemptions", [](const ReplayReport& r) { return std::to_string(r.preemptions); }},
      {"load max/mean", [](const ReplayReport& r) { return Fmt("%.2f", r.load_imbalance); }},
      {"simulated s", [](const ReplayReport& r) { return Fmt("%.1f", r.simulated_ms / 1000); }},
      {"wall s", [](const ReplayReport& r) { return Fmt("%.2f", r.wall_ms / 1000); }},
  };
  std::string out;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%-22s", "");
  out += buf;
  for (const ReplayReport& r : reports) {
    std::snprintf(buf, sizeof(buf), "%16s", r.policy.c_str());
    out += buf;
  }
  out += "\n";
  for (const Row& row : kRows) {
    std::snprintf(buf, sizeof(buf), "%-22s", row.label);
    out += buf;
    for (const ReplayReport& r : reports) {
      std::snprintf(buf, sizeof(buf), "%16s", row.cell(r).c_str());
      out += buf;
    }
    out += "\n";
  }
  return out;
}

}  // namespace dyn::replay
