#include "loadgen/report.h"

#include <cstdio>
#include <fstream>

#include <boost/json.hpp>

namespace dyn::loadgen {
namespace json = boost::json;

namespace {

std::string Format(const char* fmt, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

std::string Row(const char* name, const Distribution& d) {
  return Format("%-28s %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f\n", name, d.mean, d.min, d.p50, d.p90, d.p95,
                d.p99, d.max);
}

json::object DistJson(const Distribution& d) {
  return {{"count", d.count}, {"mean", d.mean}, {"min", d.min}, {"max", d.max}, {"stddev", d.stddev},
          {"p50", d.p50},     {"p90", d.p90},   {"p95", d.p95}, {"p99", d.p99}};
}

std::string CsvField(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c == '\n' ? ' ' : c;
  }
  return out + "\"";
}

}  // namespace

std::string RunTable(const RunResult& run) {
  const RunSummary& s = run.summary;
  std::string t = "dyn bench: " + run.label + "\n";
  t += Format("%-28s %10s %10s %10s %10s %10s %10s %10s\n", "metric", "avg", "min", "p50", "p90", "p95", "p99", "max");
  t += Row("time to first token (ms)", s.ttft_ms);
  t += Row("inter-token latency (ms)", s.itl_ms);
  t += Row("inter-chunk gap (ms)", s.gap_ms);
  t += Row("request latency (ms)", s.e2e_ms);
  t += Row("input tokens", s.input_tokens);
  t += Row("output tokens", s.output_tokens);
  t += Format("requests %zu  completed %zu  errors %zu", s.requests, s.completed, s.errors);
  for (const auto& [kind, n] : s.errors_by_kind) t += Format(" (%s %zu)", kind.c_str(), n);
  t += Format("\nwindow %.2f s  request throughput %.3f req/s  output token throughput %.2f tok/s  input %.2f tok/s\n",
              s.window_s, s.request_throughput, s.output_token_throughput, s.input_token_throughput);
  t += Format("goodput %.3f req/s (%zu requests met the targets)\n", s.goodput, s.good_requests);
  if (s.prefix_hit_rate >= 0) t += Format("prefix cache hits %.1f %% of prompt tokens (server-reported)\n", 100 * s.prefix_hit_rate);
  return t;
}

std::string SweepTable(const std::vector<RunResult>& runs) {
  std::string t = Format("%-20s %9s %11s %11s %11s %10s %10s %9s %7s\n", "run", "req/s", "out tok/s", "TTFT p50",
                         "TTFT p99", "ITL p50", "ITL p99", "goodput", "errors");
  for (const RunResult& r : runs) {
    const RunSummary& s = r.summary;
    t += Format("%-20s %9.3f %11.2f %9.2fms %9.2fms %8.2fms %8.2fms %9.3f %7zu\n", r.label.c_str(),
                s.request_throughput, s.output_token_throughput, s.ttft_ms.p50, s.ttft_ms.p99, s.itl_ms.p50,
                s.itl_ms.p99, s.goodput, s.errors);
  }
  return t;
}

json::object SummaryJson(const RunSummary& s) {
  json::object errors;
  for (const auto& [kind, n] : s.errors_by_kind) errors[kind] = n;
  return {{"requests", s.requests},
          {"completed", s.completed},
          {"errors", s.errors},
          {"errors_by_kind", std::move(errors)},
          {"window_s", s.window_s},
          {"request_throughput", s.request_throughput},
          {"output_token_throughput", s.output_token_throughput},
          {"input_token_throughput", s.input_token_throughput},
          {"goodput", s.goodput},
          {"good_requests", s.good_requests},
          {"prefix_hit_rate", s.prefix_hit_rate},
          {"ttft_ms", DistJson(s.ttft_ms)},
          {"itl_ms", DistJson(s.itl_ms)},
          {"gap_ms", DistJson(s.gap_ms)},
          {"e2e_ms", DistJson(s.e2e_ms)},
          {"input_tokens", DistJson(s.input_tokens)},
          {"output_tokens", DistJson(s.output_tokens)}};
}

json::object ReportJson(const BenchReport& report) {
  json::array runs;
  for (const RunResult& r : report.runs) {
    json::array requests;
    for (const RequestRecord& q : r.records) {
      json::array chunks;
      for (double t : q.chunk_ms) chunks.push_back(t);
      requests.push_back(json::object{{"index", q.index},
                                      {"warmup", q.warmup},
                                      {"start_ms", q.start_ms},
                                      {"ttft_ms", q.ttft_ms},
                                      {"e2e_ms", q.e2e_ms},
                                      {"itl_ms", q.itl_ms()},
                                      {"input_tokens", q.input_tokens},
                                      {"output_tokens", q.output_tokens},
                                      {"max_tokens", q.max_tokens},
                                      {"cached_tokens", q.cached_tokens},
                                      {"usage_reported", q.usage_reported},
                                      {"http_status", q.http_status},
                                      {"error_kind", q.error_kind},
                                      {"error", q.error},
                                      {"chunk_ms", std::move(chunks)}});
    }
    runs.push_back(json::object{{"label", r.label},
                                {"concurrency", r.concurrency},
                                {"request_rate", r.request_rate},
                                {"summary", SummaryJson(r.summary)},
                                {"requests", std::move(requests)}});
  }
  return {{"config", report.config}, {"runs", std::move(runs)}};
}

Status WriteJson(const BenchReport& report, const std::string& path) {
  std::ofstream f(path);
  if (!f) return Status::IoError("cannot write " + path);
  f << json::serialize(ReportJson(report)) << "\n";
  return f ? Status::Ok() : Status::IoError("write failed: " + path);
}

Status WriteCsv(const BenchReport& report, const std::string& path) {
  std::ofstream f(path);
  if (!f) return Status::IoError("cannot write " + path);
  f << "run,concurrency,request_rate,index,warmup,start_ms,ttft_ms,e2e_ms,itl_ms,input_tokens,output_tokens,"
       "max_tokens,chunks,http_status,error_kind,error\n";
  for (const RunResult& r : report.runs) {
    for (const RequestRecord& q : r.records) {
      f << CsvField(r.label) << ',' << r.concurrency << ',' << r.request_rate << ',' << q.index << ','
        << (q.warmup ? 1 : 0) << ',' << Format("%.3f,%.3f,%.3f,%.3f", q.start_ms, q.ttft_ms, q.e2e_ms, q.itl_ms())
        << ',' << q.input_tokens << ',' << q.output_tokens << ',' << q.max_tokens << ',' << q.chunk_ms.size() << ','
        << q.http_status << ',' << CsvField(q.error_kind) << ',' << CsvField(q.error) << '\n';
    }
  }
  return f ? Status::Ok() : Status::IoError("write failed: " + path);
}

}  // namespace dyn::loadgen
