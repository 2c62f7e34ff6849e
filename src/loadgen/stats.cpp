#include "loadgen/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dyn::loadgen {

double Percentile(std::span<const double> sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  d.count = values.size();
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  d.mean = sum / static_cast<double>(values.size());
  double sq = 0;
  for (double v : values) sq += (v - d.mean) * (v - d.mean);
  d.stddev = std::sqrt(sq / static_cast<double>(values.size()));
  d.min = values.front();
  d.max = values.back();
  d.p50 = Percentile(values, 50);
  d.p90 = Percentile(values, 90);
  d.p95 = Percentile(values, 95);
  d.p99 = Percentile(values, 99);
  return d;
}

RunSummary SummarizeRun(std::span<const RequestRecord> records, const GoodputTargets& targets) {
  RunSummary s;
  double first = std::numeric_limits<double>::infinity(), last = -std::numeric_limits<double>::infinity();
  std::vector<double> ttft, itl, gaps, e2e, in, out;
  double out_tokens = 0, in_tokens = 0, cached_tokens = 0, cached_of = 0;
  for (const RequestRecord& r : records) {
    if (r.warmup) continue;
    ++s.requests;
    first = std::min(first, r.start_ms);
    last = std::max(last, r.start_ms + std::max(0.0, r.e2e_ms));
    if (!r.ok()) {
      ++s.errors;
      ++s.errors_by_kind[r.error_kind];
      continue;
    }
    ++s.completed;
    if (r.ttft_ms >= 0) ttft.push_back(r.ttft_ms);
    const double request_itl = r.itl_ms();
    if (request_itl >= 0) itl.push_back(request_itl);
    for (size_t i = 1; i < r.chunk_ms.size(); ++i) gaps.push_back(r.chunk_ms[i] - r.chunk_ms[i - 1]);
    e2e.push_back(r.e2e_ms);
    in.push_back(r.input_tokens);
    out.push_back(r.output_tokens);
    in_tokens += r.input_tokens;
    out_tokens += r.output_tokens;
    if (r.cached_tokens >= 0) {
      cached_tokens += r.cached_tokens;
      cached_of += r.input_tokens;
    }
    const bool ttft_ok = targets.ttft_ms <= 0 || (r.ttft_ms >= 0 && r.ttft_ms <= targets.ttft_ms);
    const bool itl_ok = targets.itl_ms <= 0 || request_itl <= targets.itl_ms;
    if (ttft_ok && itl_ok) ++s.good_requests;
  }
  s.window_s = s.requests > 0 ? std::max(0.0, last - first) / 1000.0 : 0;
  if (s.window_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / s.window_s;
    s.output_token_throughput = out_tokens / s.window_s;
    s.input_token_throughput = in_tokens / s.window_s;
    s.goodput = static_cast<double>(s.good_requests) / s.window_s;
  }
  if (cached_of > 0) s.prefix_hit_rate = cached_tokens / cached_of;
  s.ttft_ms = Summarize(std::move(ttft));
  s.itl_ms = Summarize(std::move(itl));
  s.gap_ms = Summarize(std::move(gaps));
  s.e2e_ms = Summarize(std::move(e2e));
  s.input_tokens = Summarize(std::move(in));
  s.output_tokens = Summarize(std::move(out));
  return s;
}

}  // namespace dyn::loadgen
