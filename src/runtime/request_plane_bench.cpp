// Request-plane overhead: the echo engine called directly vs behind RequestServer + RequestClient
// on loopback. Closed loop: `concurrency` threads each run requests back to back; latency is from
// the call to the end of the stream.
//
//   request_plane_bench [--requests 4000] [--prompt-tokens 64] [--max-tokens 16]
//                       [--concurrency 1,16,64] [--io-threads 1]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <sstream>
#include <thread>
#include <vector>

#include "base/flags.h"
#include "engine/echo/echo_engine.h"
#include "runtime/engine_codec.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

using Clock = std::chrono::steady_clock;

struct LoadResult {
  double p50_ms = 0, p99_ms = 0, rps = 0;
  int errors = 0;
};

// Runs `total` requests through `run_one` (which blocks until its request ends and returns
// whether it succeeded) from `concurrency` threads.
LoadResult RunLoad(int total, int concurrency, const std::function<bool(int)>& run_one) {
  std::atomic<int> next{0};
  std::atomic<int> errors{0};
  std::vector<std::vector<double>> latencies(concurrency);
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      for (int i; (i = next.fetch_add(1)) < total;) {
        const auto start = Clock::now();
        if (!run_one(i)) ++errors;
        latencies[t].push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
      }
    });
  }
  for (auto& th : threads) th.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> all;
  for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  LoadResult r;
  r.p50_ms = all[all.size() / 2];
  r.p99_ms = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  r.rps = total / seconds;
  r.errors = errors.load();
  return r;
}

PreprocessedRequest MakeRequest(int i, int prompt_tokens, int max_tokens) {
  PreprocessedRequest q;
  q.request_id = "bench-" + std::to_string(i);
  for (int t = 0; t < prompt_tokens; ++t) q.token_ids.push_back(static_cast<uint32_t>(1000 + (i + t) % 30000));
  q.stop.max_tokens = max_tokens;
  q.stop.ignore_eos = true;
  return q;
}

int Main(int argc, char** argv) {
  int64_t requests = 4000, prompt_tokens = 64, max_tokens = 16, io_threads = 1;
  std::string concurrency_list = "1,16,64";
  FlagSet flags("request_plane_bench", "Request-plane overhead: echo engine in-process vs over TCP loopback.");
  flags.Int("requests", &requests, "requests per run");
  flags.Int("prompt-tokens", &prompt_tokens, "prompt length");
  flags.Int("max-tokens", &max_tokens, "generated tokens per request");
  flags.String("concurrency", &concurrency_list, "comma-separated concurrency levels");
  flags.Int("io-threads", &io_threads, "io threads of server and client");
  if (Status s = flags.Parse(argc, argv); !s.ok() || flags.help_requested()) {
    std::fprintf(stderr, "%s\n%s", s.ok() ? "" : s.ToString().c_str(), flags.Usage().c_str());
    return s.ok() ? 0 : 2;
  }
  std::vector<int> levels;
  std::stringstream ss(concurrency_list);
  for (std::string item; std::getline(ss, item, ',');) levels.push_back(std::stoi(item));

  EnginePtr engine = CreateEchoEngine({});
  RequestServerOptions server_options;
  server_options.host = "127.0.0.1";
  server_options.io_threads = static_cast<int>(io_threads);
  auto server = RequestServer::Start(server_options);
  if (!server.ok()) {
    std::fprintf(stderr, "server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  (*server)->AddEngineEndpoint("generate", engine);
  const std::string address = "127.0.0.1:" + std::to_string((*server)->port());
  RequestClientOptions client_options;
  client_options.io_threads = static_cast<int>(io_threads);
  auto client = RequestClient::Create(client_options).value();

  const int n = static_cast<int>(requests), prompt = static_cast<int>(prompt_tokens), gen = static_cast<int>(max_tokens);
  auto in_process = [&](int i) {
    std::promise<bool> done;
    auto fut = done.get_future();
    int tokens = 0;
    engine->Generate(MakeRequest(i, prompt, gen), std::make_shared<RequestContext>("r"), [&](EngineOutput&& out) {
      tokens += static_cast<int>(out.token_ids.size());
      if (out.finish_reason) done.set_value(tokens == gen);
    });
    return fut.get();
  };
  auto over_tcp = [&](int i) {
    std::promise<bool> done;
    auto fut = done.get_future();
    int tokens = 0;
    CallCallbacks cb;
    cb.on_data = [&](std::string_view payload) {
      auto out = DecodeOutput(payload);
      if (out.ok()) tokens += static_cast<int>(out->token_ids.size());
    };
    cb.on_end = [&](const Status& s) { done.set_value(s.ok() && tokens == gen); };
    client->Call(address, "generate", EncodeRequest(MakeRequest(i, prompt, gen)), std::make_shared<RequestContext>("r"),
                 std::move(cb));
    return fut.get();
  };

  // Warm up both paths (connection setup, allocator).
  RunLoad(200, 4, in_process);
  RunLoad(200, 4, over_tcp);

  std::printf("echo engine, prompt %d tokens, max_tokens %d, %d requests per row, io_threads %d\n", prompt, gen, n,
              static_cast<int>(io_threads));
  std::printf("%-11s %5s %10s %10s %10s %7s\n", "path", "conc", "p50 ms", "p99 ms", "req/s", "errors");
  for (int c : levels) {
    for (auto [name, fn] : {std::pair<const char*, std::function<bool(int)>>{"in-process", in_process},
                            std::pair<const char*, std::function<bool(int)>>{"tcp", over_tcp}}) {
      LoadResult r = RunLoad(n, c, fn);
      std::printf("%-11s %5d %10.3f %10.3f %10.0f %7d\n", name, c, r.p50_ms, r.p99_ms, r.rps, r.errors);
      std::fflush(stdout);
    }
  }
  client->Stop();
  (*server)->Stop();
  engine->Shutdown();
  return 0;
}

}  // namespace
}  // namespace dyn

int main(int argc, char** argv) { return dyn::Main(argc, argv); }
