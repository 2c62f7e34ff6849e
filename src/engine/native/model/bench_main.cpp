// dyn_model_bench: CPU kernel and model throughput on this machine.
//   dyn_model_bench [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 1,2] [--quick]
//                   [--no-kernels] [--no-prefill] [--batches 1,4,16] [--steps N]
// Prints: memcpy bandwidth (the roofline), matmul GFLOP/s and weight GB/s per weight type at
// M = 1/16/128, then prefill tok/s (prompt 128, 512) and decode tok/s at batch 1/4/16.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/file.h"
#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/model/model.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); }

// Runs fn repeatedly for at least min_s seconds; returns seconds per call (best of 3 rounds).
template <class Fn>
double TimeIt(Fn&& fn, double min_s) {
  fn();
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    int n = 0;
    auto t0 = Clock::now();
    do {
      fn();
      ++n;
    } while (Seconds(t0) < min_s);
    best = std::min(best, Seconds(t0) / n);
  }
  return best;
}

double MemcpyBandwidth(double min_s) {
  const size_t n = size_t{256} << 20;
  std::vector<char> a(n, 1), b(n, 2);
  const double s = TimeIt([&] { std::memcpy(b.data(), a.data(), n); }, min_s);
  return 2.0 * n / s / 1e9;  // bytes read + written
}

std::vector<uint8_t> RandomWeight(dyn::DType t, int64_t rows, int64_t cols) {
  std::vector<uint8_t> w(rows * dyn::DTypeRowBytes(t, cols));
  std::mt19937 rng(7);
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  if (t == dyn::DType::kF32 || t == dyn::DType::kF16 || t == dyn::DType::kBF16 || dyn::DTypeIsQuantized(t)) {
    // Keep the f16/bf16/f32 values and block scales finite: overwrite with small numbers.
    const size_t row_bytes = dyn::DTypeRowBytes(t, cols);
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* row = w.data() + r * row_bytes;
      if (t == dyn::DType::kF32) {
        for (int64_t j = 0; j < cols; ++j) reinterpret_cast<float*>(row)[j] = 0.01f * static_cast<float>(j % 17);
      } else if (t == dyn::DType::kF16 || t == dyn::DType::kBF16) {
        for (int64_t j = 0; j < cols; ++j) reinterpret_cast<uint16_t*>(row)[j] = t == dyn::DType::kF16 ? 0x2000 : 0x3c00;
      } else {
        const size_t bb = row_bytes / (cols / 32);
        for (int64_t b = 0; b < cols / 32; ++b) {
          uint16_t* h = reinterpret_cast<uint16_t*>(row + b * bb);
          h[0] = dyn::F32ToF16(0.01f);
          if (t == dyn::DType::kQ4_1) h[1] = dyn::F32ToF16(-0.05f);
        }
      }
    }
  }
  return w;
}

void BenchMatMul(int threads, double min_s, double bw) {
  auto backend = dyn::CreateCpuBackend(threads);
  const int64_t N = 16384, K = 2048;
  for (dyn::DType t : {dyn::DType::kQ4_1, dyn::DType::kQ8_0, dyn::DType::kQ4_0, dyn::DType::kF16, dyn::DType::kF32}) {
    const std::vector<uint8_t> bytes = RandomWeight(t, N, K);
    const dyn::Weight w{t, N, K, bytes.data()};
    for (int m : {1, 16, 128}) {
      std::vector<float> x(m * K, 0.5f), out(m * N);
      const double s = TimeIt([&] { backend->MatMul(x.data(), m, w, out.data()); }, min_s);
      const double gflops = 2.0 * m * N * K / s / 1e9;
      const double gbs = w.bytes() / s / 1e9;
      const double roof_gflops = 2.0 * m * N * K / (w.bytes() / (bw / 2 * 1e9)) / 1e9;  // weights read once at copy-read speed
      std::printf("matmul %-5s threads=%d M=%-4d N=%lld K=%lld: %8.3f ms  %7.1f GFLOP/s  weights %6.1f GB/s  (memory roofline %7.1f GFLOP/s)\n",
                  dyn::DTypeName(t), threads, m, static_cast<long long>(N), static_cast<long long>(K), s * 1e3, gflops, gbs,
                  roof_gflops);
    }
  }
}

void BenchModel(const std::string& path, int threads, bool quick, bool prefill, const std::vector<int>& batches, int steps_arg) {
  dyn::ModelLoadOptions opt;
  opt.num_threads = threads;
  auto loaded = dyn::LoadModel(path, opt);
  if (!loaded.ok()) {
    std::printf("model: %s\n", loaded.status().ToString().c_str());
    return;
  }
  dyn::Model& model = **loaded;
  const int bs = 16, max_seqs = 16, blocks_per_seq = 64;  // 1024 tokens per sequence
  if (!model.InitKvCache(max_seqs * blocks_per_seq, bs).ok()) return;
  const int V = model.config().vocab_size;
  std::vector<float> logits(max_seqs * V);
  std::vector<std::vector<int32_t>> tables(max_seqs);
  for (int s = 0; s < max_seqs; ++s)
    for (int b = 0; b < blocks_per_seq; ++b) tables[s].push_back(s * blocks_per_seq + b);
  std::mt19937 rng(1);
  auto tokens = [&](int n) {
    std::vector<uint32_t> t(n);
    for (auto& x : t) x = rng() % 1000 + 100;
    return t;
  };
  for (int prompt : {128, 512}) {
    if (!prefill) break;
    const std::vector<uint32_t> ids = tokens(prompt);
    dyn::ForwardSeq f;
    f.tokens = ids;
    f.block_table = tables[0];
    const double s = TimeIt([&] { (void)model.Forward(std::span(&f, 1), logits.data()); }, quick ? 0.2 : 1.0);
    std::printf("prefill threads=%d prompt=%d: %.1f ms, %.0f tok/s\n", threads, prompt, s * 1e3, prompt / s);
  }
  for (int batch : batches) {
    const int ctx = 128, steps = steps_arg > 0 ? steps_arg : quick ? 16 : 48;
    std::vector<std::vector<uint32_t>> prompts;
    std::vector<dyn::ForwardSeq> fs(batch);
    for (int s = 0; s < batch; ++s) {
      prompts.push_back(tokens(ctx));
      fs[s].tokens = prompts[s];
      fs[s].block_table = tables[s];
      (void)model.Forward(std::span(&fs[s], 1), logits.data());
    }
    std::vector<uint32_t> next(batch, 200);
    std::vector<double> step_s;
    auto t0 = Clock::now();
    for (int step = 0; step < steps; ++step) {
      const auto ts = Clock::now();
      for (int s = 0; s < batch; ++s) {
        fs[s].tokens = std::span<const uint32_t>(&next[s], 1);
        fs[s].start_pos = ctx + step;
      }
      (void)model.Forward(fs, logits.data());
      for (int s = 0; s < batch; ++s) next[s] = static_cast<uint32_t>(std::max_element(&logits[s * V], &logits[(s + 1) * V]) - &logits[s * V]);
      step_s.push_back(Seconds(ts));
    }
    const double s = Seconds(t0);
    // Median and fastest step too: on a shared machine the mean includes the other jobs' slices.
    std::sort(step_s.begin(), step_s.end());
    std::printf("decode threads=%d batch=%d (context %d..%d): %.2f ms/step, %.1f tok/s per sequence, %.1f tok/s total"
                " (step median %.2f ms, min %.2f ms)\n", threads, batch, ctx, ctx + steps, s / steps * 1e3, steps / s,
                batch * steps / s, step_s[step_s.size() / 2] * 1e3, step_s[0] * 1e3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::vector<int> threads = {1, 2};
  std::vector<int> batches = {1, 4, 16};
  bool quick = false, kernels = true, prefill = true;
  int steps = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) model = argv[++i];
    else if (a == "--threads" && i + 1 < argc) {
      threads.clear();
      for (char c : std::string(argv[++i])) if (c >= '1' && c <= '9') threads.push_back(c - '0');
    } else if (a == "--quick") quick = true;
    else if (a == "--no-kernels") kernels = false;
    else if (a == "--no-prefill") prefill = false;
    else if (a == "--steps" && i + 1 < argc) steps = std::stoi(argv[++i]);
    else if (a == "--batches" && i + 1 < argc) {
      batches.clear();
      std::string list = argv[++i];
      for (size_t p = 0; p < list.size();) {
        const size_t e = std::min(list.find(',', p), list.size());
        batches.push_back(std::stoi(list.substr(p, e - p)));
        p = e + 1;
      }
    }
  }
  const double bw = MemcpyBandwidth(quick ? 0.2 : 0.5);
  std::printf("memcpy bandwidth (1 thread, 256 MiB, read+write): %.1f GB/s\n", bw);
  for (int t : threads) {
    if (kernels) BenchMatMul(t, quick ? 0.1 : 0.3, bw);
    if (dyn::FileExists(model)) BenchModel(model, t, quick, prefill, batches, steps);
  }
  return 0;
}
