// Single-thread encode throughput of dyn's tokenizer on the ShareGPT prompts (first human turn),
// plus load time and resident memory per tokenizer. Compare with bench/tokenizer_bench_hf.py.
//
//   build-x/bench/tokenizer_bench [--passes N] [NAME=PATH ...]
// PATH: a directory with tokenizer.json or a .gguf file. Defaults: qwen3, mistral-nemo, gpt2,
// mistral-7b-v0.1 from /work/shared/tokenizers.
#include <boost/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

long RssKiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return 0;
}

std::vector<std::string> Prompts(const std::string& path) {
  std::vector<std::string> out;
  auto text = dyn::ReadFile(path);
  if (!text.ok()) return out;
  auto v = boost::json::parse(*text);
  for (const auto& conv : v.as_array()) {
    for (const auto& turn : conv.at("conversations").as_array()) {
      if (turn.at("from").as_string() == "human") {
        out.emplace_back(turn.at("value").as_string());
        break;
      }
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int passes = 5;
  std::vector<std::pair<std::string, std::string>> models;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--passes") == 0 && i + 1 < argc) {
      passes = std::atoi(argv[++i]);
    } else if (const char* eq = std::strchr(argv[i], '=')) {
      models.emplace_back(std::string(argv[i], static_cast<size_t>(eq - argv[i])), std::string(eq + 1));
    }
  }
  if (models.empty()) {
    for (const char* n : {"qwen3", "mistral-nemo", "gpt2", "mistral-7b-v0.1"}) {
      models.emplace_back(n, std::string("/work/shared/tokenizers/") + n);
    }
  }
  auto prompts = Prompts("/work/shared/traces/sharegpt/ShareGPT_V3_filtered_1000.json");
  size_t bytes = 0;
  for (const auto& p : prompts) bytes += p.size();
  std::printf("%zu prompts, %.2f MB; %d passes (first pass = cold word cache)\n", prompts.size(), bytes / 1e6, passes);
  std::printf("%-16s %9s %9s %12s %9s %12s %9s\n", "tokenizer", "load_ms", "rss_MiB", "cold_tok/s", "cold_MB/s",
              "warm_tok/s", "warm_MB/s");
  std::vector<std::unique_ptr<dyn::Tokenizer>> keep;  // kept loaded so each RSS delta is its own
  std::vector<std::unique_ptr<dyn::GgufFile>> keep_gguf;
  for (const auto& [name, path] : models) {
    long rss0 = RssKiB();
    auto t0 = Clock::now();
    std::unique_ptr<dyn::GgufFile> gguf;
    dyn::Result<std::unique_ptr<dyn::Tokenizer>> tok = dyn::Status::NotFound("unset");
    if (path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0) {
      auto g = dyn::GgufFile::Open(path);
      if (!g.ok()) {
        std::fprintf(stderr, "%s: %s\n", name.c_str(), g.status().ToString().c_str());
        continue;
      }
      gguf = std::move(*g);
      tok = dyn::Tokenizer::FromGguf(*gguf);
    } else {
      tok = dyn::Tokenizer::FromDirectory(path);
    }
    auto t1 = Clock::now();
    if (!tok.ok()) {
      std::fprintf(stderr, "%s: %s\n", name.c_str(), tok.status().ToString().c_str());
      continue;
    }
    long rss1 = RssKiB();
    double cold = 0, warm = 1e30;
    size_t tokens = 0;
    for (int p = 0; p < passes; ++p) {
      size_t n = 0;
      auto a = Clock::now();
      for (const auto& s : prompts) n += (*tok)->Encode(s, true).size();
      double sec = Seconds(a, Clock::now());
      tokens = n;
      if (p == 0) {
        cold = sec;
      } else if (sec < warm) {
        warm = sec;
      }
    }
    if (passes < 2) warm = cold;
    std::printf("%-16s %9.1f %9.1f %12.0f %9.2f %12.0f %9.2f\n", name.c_str(), Seconds(t0, t1) * 1e3,
                (rss1 - rss0) / 1024.0, tokens / cold, bytes / cold / 1e6, tokens / warm, bytes / warm / 1e6);
    keep.push_back(std::move(*tok));
    keep_gguf.push_back(std::move(gguf));
  }
  return 0;
}
