// Results of dyn bench: the summary table printed at the end, and the JSON and CSV files with
// every request. The JSON is also what the plotting script reads (plots.h).
#pragma once

#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "base/status.h"
#include "loadgen/stats.h"

namespace dyn::loadgen {

// One measured run (a sweep has one per concurrency).
struct RunResult {
  std::string label;        // "concurrency 4", "rate 2.0/s", "trace"
  int concurrency = 0;      // closed loop: in flight; open loop: the cap (0 = none)
  double request_rate = 0;  // open loop: requests/s asked for (0 = closed loop or trace)
  RunSummary summary;
  std::vector<RequestRecord> records;
};

struct BenchReport {
  boost::json::object config;  // the flags and workload, as given
  std::vector<RunResult> runs;
};

// aiperf-style table (metric x avg/min/p50/p90/p95/p99/max) for one run.
std::string RunTable(const RunResult& run);
// One line per run: the sweep at a glance.
std::string SweepTable(const std::vector<RunResult>& runs);

boost::json::object SummaryJson(const RunSummary& s);
boost::json::object ReportJson(const BenchReport& report);
Status WriteJson(const BenchReport& report, const std::string& path);
// One row per request of every run (run label, concurrency, index, warmup, times, tokens, error).
Status WriteCsv(const BenchReport& report, const std::string& path);

}  // namespace dyn::loadgen
