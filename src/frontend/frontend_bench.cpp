// frontend_bench: frontend overhead with the echo engine. Streams 64-token completions at
// concurrency 1, 16 and 64 over keep-alive connections and reports requests/s, output tokens/s
// and latency percentiles (time to first token, full response). With --port it measures a
// running server instead of starting one in-process.
//   frontend_bench [--tokenizer DIR] [--port N] [--io-threads T] [--seconds S] [--tokens K]
//                  [--concurrency 1,16,64] [--echo-delay-ms D]
// With --echo-delay-ms the engine takes D ms per step (like a decode step), so latency minus
// tokens * D is what the frontend adds.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include "engine/echo/echo_engine.h"
#include "frontend/frontend.h"
#include "llm/tokenizer/tokenizer.h"

namespace {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Sample {
  double ttft_ms;
  double total_ms;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

// One keep-alive connection sending streaming requests back to back until `stop`.
void Worker(int port, const std::string& request, std::atomic<bool>& stop, std::vector<Sample>& out, std::atomic<int>& errors) {
  asio::io_context ioc;
  tcp::socket socket(ioc);
  boost::system::error_code ec;
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) {
    ++errors;
    return;
  }
  socket.set_option(tcp::no_delay(true));
  std::string buf;
  char chunk[16384];
  while (!stop.load(std::memory_order_relaxed)) {
    const auto t0 = Clock::now();
    asio::write(socket, asio::buffer(request), ec);
    if (ec) {
      ++errors;
      return;
    }
    buf.clear();
    double ttft = -1;
    for (;;) {
      size_t n = socket.read_some(asio::buffer(chunk), ec);
      if (ec) {
        ++errors;
        return;
      }
      buf.append(chunk, n);
      if (ttft < 0 && buf.find("\"text\":\"") != std::string::npos) {
        ttft = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      }
      if (buf.size() >= 5 && buf.compare(buf.size() - 5, 5, "0\r\n\r\n") == 0 && buf.find("[DONE]") != std::string::npos) break;
    }
    if (buf.rfind("HTTP/1.1 200", 0) != 0) {
      ++errors;
      return;
    }
    out.push_back({ttft, std::chrono::duration<double, std::milli>(Clock::now() - t0).count()});
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_dir = "../shared/models/stories260K/hf";
  int port = 0, io_threads = 1, tokens = 64;
  double seconds = 5, echo_delay_ms = 0;
  std::vector<int> concurrency = {1, 16, 64};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--tokenizer") tokenizer_dir = v;
    else if (a == "--port") port = std::atoi(v.c_str());
    else if (a == "--io-threads") io_threads = std::atoi(v.c_str());
    else if (a == "--seconds") seconds = std::atof(v.c_str());
    else if (a == "--tokens") tokens = std::atoi(v.c_str());
    else if (a == "--echo-delay-ms") echo_delay_ms = std::atof(v.c_str());
    else if (a == "--concurrency") {
      concurrency.clear();
      for (size_t p = 0; p < v.size();) {
        size_t q = v.find(',', p);
        concurrency.push_back(std::atoi(v.substr(p, q - p).c_str()));
        p = q == std::string::npos ? v.size() : q + 1;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }

  std::unique_ptr<dyn::HttpFrontend> frontend;
  dyn::EnginePtr engine;
  if (port == 0) {
    auto tok = dyn::Tokenizer::FromDirectory(tokenizer_dir);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
      return 1;
    }
    auto registry = std::make_shared<dyn::ModelRegistry>();
    dyn::ServedModel m;
    m.name = "echo";
    m.tokenizer = std::shared_ptr<const dyn::Tokenizer>(std::move(*tok));
    engine = dyn::CreateEchoEngine({.token_delay_ms = echo_delay_ms});
    m.engine = engine;
    m.context_length = 4096;
    m.eos_token_ids = {2};
    (void)registry->Add(std::move(m));
    auto fe = dyn::HttpFrontend::Start({.host = "127.0.0.1", .port = 0, .io_threads = io_threads}, registry);
    if (!fe.ok()) {
      std::fprintf(stderr, "%s\n", fe.status().ToString().c_str());
      return 1;
    }
    frontend = std::move(*fe);
    port = frontend->port();
  }

  const std::string body = R"({"model":"echo","prompt":"Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.","max_tokens":)" +
                           std::to_string(tokens) + R"(,"ignore_eos":true,"stream":true})";
  const std::string request = "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: " +
                              std::to_string(body.size()) + "\r\n\r\n" + body;

  std::printf("| concurrency | requests/s | output tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | errors |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (int c : concurrency) {
    std::atomic<bool> stop{false};
    std::atomic<int> errors{0};
    std::vector<std::vector<Sample>> per(c);
    std::vector<std::thread> threads;
    const auto t0 = Clock::now();
    for (int i = 0; i < c; ++i) threads.emplace_back(Worker, port, std::cref(request), std::ref(stop), std::ref(per[i]), std::ref(errors));
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop = true;
    for (auto& t : threads) t.join();
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> ttft, total;
    for (const auto& v : per) {
      for (const auto& s : v) {
        ttft.push_back(s.ttft_ms);
        total.push_back(s.total_ms);
      }
    }
    const double rps = static_cast<double>(total.size()) / elapsed;
    std::printf("| %d | %.0f | %.0f | %.3f | %.3f | %.3f | %.3f | %d |\n", c, rps, rps * tokens, Percentile(ttft, 50),
                Percentile(ttft, 99), Percentile(total, 50), Percentile(total, 99), errors.load());
    std::fflush(stdout);
  }
  if (frontend) frontend->Stop();
  if (engine) engine->Shutdown();
  return 0;
}
