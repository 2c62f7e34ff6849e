// dyn bench: a load generator for any OpenAI-compatible server (src/loadgen/).
//
//   dyn bench --url http://127.0.0.1:8000 --model NAME [workload] [load] [outputs]
// Workloads: synthetic (--input-tokens/--output-tokens with --*-stddev, --prefix-groups/
// --prefix-tokens), --sharegpt FILE, --trace FILE (Mooncake .jsonl or Azure .csv, --time-scale).
// Load: closed loop at --concurrency N, or open loop at --request-rate R (--arrival poisson|
// constant, --concurrency then caps requests in flight), or the trace's own arrival times;
// --sweep-concurrency 1,2,4 runs the closed loop once per value. Outputs: a summary table,
// --json, --csv, --plots DIR. The same flags and --seed send the same requests every time.
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <sstream>

#include <boost/json.hpp>

#include "apps/dyn/command_util.h"
#include "apps/dyn/commands.h"
#include "base/flags.h"
#include "base/log.h"
#include "llm/gguf.h"
#include "llm/tokenizer/tokenizer.h"
#include "loadgen/client.h"
#include "loadgen/plots.h"
#include "loadgen/report.h"
#include "loadgen/workload.h"
#include "workload/trace.h"

namespace dyn {
namespace {
namespace json = boost::json;
using namespace loadgen;

struct BenchFlags {
  std::string url = "http://127.0.0.1:8000", model, endpoint = "completions", api_key;
  int64_t concurrency = 0;
  double request_rate = 0;
  std::string arrival = "poisson";
  std::string trace, sharegpt, tokenizer;
  double time_scale = 1.0;
  double input_tokens = 128, input_stddev = 0, output_tokens = 128, output_stddev = 0;
  int64_t prefix_groups = 0, prefix_tokens = 0;
  int64_t num_requests = 100, warmup_requests = 0;
  double duration = 0;
  int64_t seed = 0;
  std::string sweep;
  double ttft_target_ms = 0, itl_target_ms = 0;
  std::string json_path, csv_path, plots_dir;
  double timeout = 600;
  bool stream = true, progress = true, ignore_eos = true, dry_run = false;
  std::string extra_body;
};

void RegisterFlags(FlagSet& fs, BenchFlags& f) {
  fs.String("url", &f.url, "server base URL (http://host:port)");
  fs.String("model", &f.model, "model name sent in requests (required)");
  fs.String("endpoint", &f.endpoint, "completions (token-id prompts) | chat");
  fs.String("api-key", &f.api_key, "sent as Authorization: Bearer");
  fs.Int("concurrency", &f.concurrency, "closed loop: requests in flight (default 1); with --request-rate: cap (0 none)");
  fs.Double("request-rate", &f.request_rate, "open loop: requests per second");
  fs.String("arrival", &f.arrival, "open-loop arrivals: poisson | constant");
  fs.String("trace", &f.trace, "replay a trace: Mooncake .jsonl (hash ids -> shared 512-token blocks) or Azure .csv");
  fs.Double("time-scale", &f.time_scale, "trace arrival times are divided by this (10 = ten times faster), as in dyn replay");
  fs.String("sharegpt", &f.sharegpt, "ShareGPT JSON file: its first human turns are the prompts");
  fs.String("tokenizer", &f.tokenizer, "tokenizer (.gguf, tokenizer.json or dir): token ids -> text for chat, counts for text prompts");
  fs.Double("input-tokens", &f.input_tokens, "synthetic: mean prompt length (tokens)");
  fs.Double("input-stddev", &f.input_stddev, "synthetic: prompt length stddev (0: fixed)");
  fs.Double("output-tokens", &f.output_tokens, "mean max_tokens (synthetic, ShareGPT)");
  fs.Double("output-stddev", &f.output_stddev, "max_tokens stddev (0: fixed)");
  fs.Int("prefix-groups", &f.prefix_groups, "synthetic: requests fall in this many groups sharing a prefix");
  fs.Int("prefix-tokens", &f.prefix_tokens, "synthetic: length of each group's shared prefix");
  fs.Int("num-requests", &f.num_requests, "measured requests per run (trace: first N, 0 = all)");
  fs.Int("warmup-requests", &f.warmup_requests, "requests sent before each run and left out of the results");
  fs.Double("duration", &f.duration, "stop sending after this many seconds (0: send all)");
  fs.Int("seed", &f.seed, "workload seed: same seed, same requests");
  fs.String("sweep-concurrency", &f.sweep, "closed-loop runs at each of these concurrencies, e.g. 1,2,4,8");
  fs.Double("ttft-target-ms", &f.ttft_target_ms, "goodput: TTFT target (0: none)");
  fs.Double("itl-target-ms", &f.itl_target_ms, "goodput: inter-token latency target (0: none)");
  fs.String("json", &f.json_path, "write every request and the summaries as JSON");
  fs.String("csv", &f.csv_path, "write every request as CSV");
  fs.String("plots", &f.plots_dir, "write PNG plots to this directory (needs python3 + matplotlib)");
  fs.Double("timeout", &f.timeout, "per-request timeout (s)");
  fs.Bool("stream", &f.stream, "stream responses (SSE)");
  fs.Bool("ignore-eos", &f.ignore_eos, "send ignore_eos so outputs have max_tokens tokens");
  fs.String("extra-body", &f.extra_body, "JSON object added to every request, e.g. '{\"temperature\":0.8,\"top_p\":0.9}'");
  fs.Bool("dry-run", &f.dry_run, "build the workload, print what it is (trace: prefix-hit ratios) and send nothing");
  fs.Bool("progress", &f.progress, "progress bar on stderr (when it is a terminal)");
}

Result<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".gguf") == 0) {
    DYN_ASSIGN_OR_RETURN(auto gguf, GgufFile::Open(path));
    return Tokenizer::FromGguf(*gguf);
  }
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) return Tokenizer::FromJsonFile(path);
  return Tokenizer::FromDirectory(path);
}

Result<std::vector<int>> ParseIntList(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    char* end = nullptr;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (*end != '\0' || v < 1) return Status::InvalidArgument("--sweep-concurrency: bad value '" + item + "'");
    out.push_back(static_cast<int>(v));
  }
  if (out.empty()) return Status::InvalidArgument("--sweep-concurrency: empty list");
  return out;
}

// Builds the workload; `config` records what it was (and, for Mooncake traces, the prefix-hit
// ratio of the hash ids next to that of the prompts built from them).
Result<std::vector<RequestSpec>> BuildWorkload(const BenchFlags& f, size_t total, const Tokenizer* tok,
                                               json::object* config) {
  std::vector<RequestSpec> specs;
  const LengthDistribution output{f.output_tokens, f.output_stddev};
  if (!f.trace.empty()) {
    DYN_ASSIGN_OR_RETURN(auto trace, workload::LoadTrace(f.trace));
    if (f.time_scale <= 0) return Status::InvalidArgument("--time-scale must be > 0");
    trace = workload::ScaleTrace(std::move(trace), f.time_scale, f.duration * 1000.0, total);
    workload::PromptSynthesis synth;
    synth.seed = static_cast<uint64_t>(f.seed);
    if (tok) synth.vocab_size = std::min<uint32_t>(synth.vocab_size, tok->vocab_size());
    specs = TraceWorkload(trace, synth);
    std::vector<std::vector<uint32_t>> prompts;
    prompts.reserve(specs.size());
    for (const auto& s : specs) prompts.push_back(s.prompt_ids);
    const double ids_ratio = workload::InfiniteCacheHitRatio(trace, synth.block_size);
    const double prompts_ratio = workload::InfiniteCacheHitRatioOfPrompts(prompts, synth.block_size);
    (*config)["trace_requests"] = trace.size();
    (*config)["trace_hit_ratio_hash_ids"] = ids_ratio;
    (*config)["trace_hit_ratio_prompts"] = prompts_ratio;
    std::printf("trace %s: %zu requests over %.1f s; infinite-cache prefix hit ratio: hash ids %.6f, prompts sent %.6f\n",
                f.trace.c_str(), trace.size(), trace.empty() ? 0.0 : trace.back().arrival_ms / 1000.0, ids_ratio,
                prompts_ratio);
  } else if (!f.sharegpt.empty()) {
    DYN_ASSIGN_OR_RETURN(auto prompts, LoadShareGptPrompts(f.sharegpt));
    specs = ShareGptWorkload(prompts, total, output, static_cast<uint64_t>(f.seed));
    if (tok)
      for (auto& s : specs) s.input_tokens = static_cast<int>(tok->Encode(s.prompt_text).size());
  } else {
    SyntheticOptions o;
    o.num_requests = total;
    o.input = {f.input_tokens, f.input_stddev};
    o.output = output;
    o.prefix_groups = static_cast<int>(f.prefix_groups);
    o.prefix_tokens = static_cast<int>(f.prefix_tokens);
    o.seed = static_cast<uint64_t>(f.seed);
    if (tok) o.vocab.vocab_size = std::min<uint32_t>(o.vocab.vocab_size, tok->vocab_size());
    specs = SyntheticWorkload(o);
  }
  if (f.endpoint == "chat") {
    for (auto& s : specs) {
      if (!s.prompt_text.empty()) continue;
      if (!tok) return Status::InvalidArgument("--endpoint chat with token-id prompts needs --tokenizer (ids -> text)");
      s.prompt_text = tok->Decode(s.prompt_ids);
      s.prompt_ids.clear();
      s.input_tokens = 0;  // the chat template changes the count: take it from usage
    }
  }
  return specs;
}

int Bench(int argc, char** argv) {
  BenchFlags f;
  FlagSet fs("dyn bench", "Load generator for OpenAI-compatible servers: latency, throughput, goodput.");
  RegisterFlags(fs, f);
  if (int rc = ParseCommandFlags(fs, argc, argv, "dyn bench"); rc >= 0) return rc;
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "dyn bench: %s\n", s.ToString().c_str());
    return 1;
  };
  if (f.model.empty()) return fail(Status::InvalidArgument("--model is required (the name the server serves)"));
  if (f.endpoint != "chat" && f.endpoint != "completions")
    return fail(Status::InvalidArgument("--endpoint: chat or completions"));
  if (f.arrival != "poisson" && f.arrival != "constant")
    return fail(Status::InvalidArgument("--arrival: poisson or constant"));
  if (!f.sweep.empty() && (f.request_rate > 0 || !f.trace.empty()))
    return fail(Status::InvalidArgument("--sweep-concurrency is a closed-loop sweep: not with --request-rate or --trace"));
  std::vector<int> concurrencies;
  if (!f.sweep.empty()) {
    auto list = ParseIntList(f.sweep);
    if (!list.ok()) return fail(list.status());
    concurrencies = *list;
  } else {
    concurrencies.push_back(static_cast<int>(f.concurrency));
  }

  std::unique_ptr<Tokenizer> tok;
  if (!f.tokenizer.empty()) {
    auto t = LoadTokenizer(f.tokenizer);
    if (!t.ok()) return fail(t.status().WithContext("--tokenizer"));
    tok = std::move(*t);
  }
  const size_t warmup = static_cast<size_t>(std::max<int64_t>(0, f.warmup_requests));
  const size_t measured = static_cast<size_t>(std::max<int64_t>(0, f.num_requests));
  json::object config{{"url", f.url},         {"model", f.model},         {"endpoint", f.endpoint},
                      {"stream", f.stream},   {"seed", f.seed},           {"num_requests", f.num_requests},
                      {"warmup_requests", f.warmup_requests},             {"request_rate", f.request_rate},
                      {"arrival", f.arrival}, {"trace", f.trace},         {"time_scale", f.time_scale},
                      {"sharegpt", f.sharegpt}, {"input_tokens", f.input_tokens}, {"input_stddev", f.input_stddev},
                      {"output_tokens", f.output_tokens}, {"output_stddev", f.output_stddev},
                      {"prefix_groups", f.prefix_groups}, {"prefix_tokens", f.prefix_tokens},
                      {"duration_s", f.duration}, {"ttft_target_ms", f.ttft_target_ms},
                      {"itl_target_ms", f.itl_target_ms}, {"tokenizer", f.tokenizer}, {"extra_body", f.extra_body}};
  // The measured requests are the workload's first num_requests whatever the warm-up count: the
  // warm-up requests are generated after them and moved to the front. A trace's warm-up is its
  // own first requests.
  auto specs = BuildWorkload(f, f.trace.empty() ? warmup + measured : (measured ? warmup + measured : 0), tok.get(),
                             &config);
  if (!specs.ok()) return fail(specs.status());
  if (specs->empty()) return fail(Status::InvalidArgument("the workload has no requests"));
  if (f.trace.empty() && warmup > 0 && warmup < specs->size())
    std::rotate(specs->begin(), specs->end() - static_cast<std::ptrdiff_t>(warmup), specs->end());
  if (f.dry_run) {
    uint64_t in = 0, out = 0;
    for (const auto& s : *specs) in += s.input_tokens, out += s.max_tokens;
    std::printf("%zu requests, %llu known input tokens, %llu output tokens wanted, last arrival %.1f s\n",
                specs->size(), static_cast<unsigned long long>(in), static_cast<unsigned long long>(out),
                specs->back().arrival_ms / 1000.0);
    return 0;
  }
  const bool open_loop = f.request_rate > 0 || !f.trace.empty();
  if (f.request_rate > 0) {
    AssignArrivals(std::span(*specs).subspan(std::min(warmup, specs->size())), f.request_rate,
                   f.arrival == "poisson" ? Arrival::kPoisson : Arrival::kConstant, static_cast<uint64_t>(f.seed));
  } else if (!f.trace.empty() && warmup > 0 && warmup < specs->size()) {
    // The measured phase starts with the first measured request.
    const double t0 = (*specs)[warmup].arrival_ms;
    for (size_t i = warmup; i < specs->size(); ++i) (*specs)[i].arrival_ms -= t0;
  }

  ClientOptions co;
  co.url = f.url;
  co.model = f.model;
  co.endpoint = f.endpoint == "chat" ? Endpoint::kChat : Endpoint::kCompletions;
  co.stream = f.stream;
  co.ignore_eos = f.ignore_eos;
  co.timeout_s = f.timeout;
  co.api_key = f.api_key;
  co.extra_body = f.extra_body;
  auto client = LoadClient::Create(co);
  if (!client.ok()) return fail(client.status());

  BenchReport report;
  report.config = config;
  const GoodputTargets targets{f.ttft_target_ms, f.itl_target_ms};
  for (int c : concurrencies) {
    RunOptions run;
    run.open_loop = open_loop;
    run.concurrency = open_loop ? c : std::max(1, c);
    run.warmup = std::min(warmup, specs->size());
    run.duration_s = f.trace.empty() ? f.duration : 0;  // a trace was already cut to --duration
    run.progress = f.progress;
    auto records = (*client)->Run(*specs, run);
    if (!records.ok()) return fail(records.status());
    RunResult r;
    r.concurrency = run.concurrency;
    r.request_rate = f.request_rate;
    r.label = !f.trace.empty()          ? "trace x" + std::to_string(f.time_scale).substr(0, 6)
              : f.request_rate > 0      ? "rate " + std::to_string(f.request_rate).substr(0, 6) + "/s"
                                        : "concurrency " + std::to_string(run.concurrency);
    r.summary = SummarizeRun(*records, targets);
    r.records = std::move(*records);
    std::fputs(RunTable(r).c_str(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    report.runs.push_back(std::move(r));
  }
  if (report.runs.size() > 1) std::fputs(SweepTable(report.runs).c_str(), stdout);

  int rc = 0;
  if (!f.json_path.empty()) {
    if (Status s = WriteJson(report, f.json_path); !s.ok()) rc = fail(s);
    else std::printf("wrote %s\n", f.json_path.c_str());
  }
  if (!f.csv_path.empty()) {
    if (Status s = WriteCsv(report, f.csv_path); !s.ok()) rc = fail(s);
    else std::printf("wrote %s\n", f.csv_path.c_str());
  }
  if (!f.plots_dir.empty()) {
    // The plots are drawn from the JSON: write one beside them when --json was not given.
    std::string json_path = f.json_path;
    if (json_path.empty()) {
      json_path = f.plots_dir + "/bench.json";
      ::mkdir(f.plots_dir.c_str(), 0755);
      if (Status s = WriteJson(report, json_path); !s.ok()) return fail(s);
    }
    std::vector<std::string> written;
    if (Status s = WritePlots(json_path, f.plots_dir, &written); !s.ok()) {
      rc = fail(s);
    } else {
      for (const auto& p : written) std::printf("wrote %s\n", p.c_str());
    }
  }
  size_t completed = 0;
  for (const auto& r : report.runs) completed += r.summary.completed;
  if (completed == 0) {
    std::fprintf(stderr, "dyn bench: no request completed\n");
    return 1;
  }
  return rc;
}

}  // namespace

DYN_REGISTER_COMMAND("bench", "load generator: latency, throughput and goodput of an OpenAI server", 60, &Bench);

}  // namespace dyn
