// What one request measured, and the aggregates over a run. Pure computation.
//
// Definitions (the same as NVIDIA aiperf / genai-perf, so the two can be compared):
//   TTFT   from sending the request to the first chunk with generated text;
//   ITL    per request (e2e - TTFT) / (output_tokens - 1), its mean gap between tokens;
//   gaps   every gap between consecutive text chunks (the distribution, not per request);
//   window from the first measured request's send to the last one's end; throughputs divide
//          completed requests and their tokens by it. Warm-up requests are never counted.
//   goodput completed requests per second whose TTFT and ITL meet the targets (0 = no target).
#pragma once

#include <map>
#include <span>
#include <string>
#include <vector>

namespace dyn::loadgen {

struct RequestRecord {
  size_t index = 0;           // position in the workload
  bool warmup = false;
  double start_ms = 0;        // sent, from the start of the run (steady clock)
  double ttft_ms = -1;        // -1: no text arrived
  double e2e_ms = -1;         // until the response's last byte; -1 when it failed before
  std::vector<double> chunk_ms;  // arrival of every text chunk, from start_ms
  int input_tokens = 0;       // usage.prompt_tokens, else the spec's known length
  int output_tokens = 0;      // usage.completion_tokens, else text chunks counted
  int max_tokens = 0;         // what was asked
  int cached_tokens = -1;     // usage.prompt_tokens_details.cached_tokens; -1: not reported
  bool usage_reported = false;
  int http_status = 0;
  std::string error_kind;     // "" = success; connect, write, read, timeout, http_4xx, http_5xx, stream_error, incomplete, malformed
  std::string error;          // the message

  bool ok() const { return error_kind.empty(); }
  double itl_ms() const { return output_tokens > 1 && ttft_ms >= 0 ? (e2e_ms - ttft_ms) / (output_tokens - 1) : -1; }
};

struct Distribution {
  size_t count = 0;
  double mean = 0, min = 0, max = 0, stddev = 0;
  double p50 = 0, p90 = 0, p95 = 0, p99 = 0;
};

// Linear interpolation between closest ranks (numpy's default), p in [0, 100]; `sorted` ascending.
double Percentile(std::span<const double> sorted, double p);
Distribution Summarize(std::vector<double> values);

struct GoodputTargets {
  double ttft_ms = 0;  // 0: no target
  double itl_ms = 0;
};

struct RunSummary {
  size_t requests = 0;   // measured (warm-up excluded)
  size_t completed = 0;
  size_t errors = 0;
  std::map<std::string, size_t> errors_by_kind;
  double window_s = 0;
  double request_throughput = 0;       // completed requests / s
  double output_token_throughput = 0;  // output tokens of completed requests / s
  double input_token_throughput = 0;
  double goodput = 0;                  // requests / s meeting the targets
  size_t good_requests = 0;
  // Prompt tokens the server said it served from its prefix cache / prompt tokens, over the
  // completed requests that reported it (-1: none did).
  double prefix_hit_rate = -1;
  Distribution ttft_ms, itl_ms, gap_ms, e2e_ms, input_tokens, output_tokens;
};

RunSummary SummarizeRun(std::span<const RequestRecord> records, const GoodputTargets& targets);

}  // namespace dyn::loadgen
