// dyn_cuda_bench: CUDA backend speed on the GPU it runs on.
//
//   dyn_cuda_bench [--kernels] [--config DIR --load-format dummy] [--steps 128] [--batches 1,4,8]
//                  [--prompts 512,4096] [--context 512] [--host-sampling | --sync] [--peak-tflops T]
//                  [--repeat-prefill N]
//
// --kernels: device copy bandwidth (the roofline of a decode step), the bf16 GEMM rate (the
//   prefill ceiling, used for MFU below), then the bf16 decode matmul (GEMV kernel, m = 1, 2, 4)
//   against cuBLAS GemmEx on Llama-3.1-8B's shapes, as GB/s of weights.
// --config DIR --load-format dummy: builds the model from DIR/config.json alone with random bf16
//   weights made on the GPU (no weight files), then times a prefill of each --prompts length (MFU
//   against --kernels' GEMM rate or --peak-tflops) and batch-B greedy decode steps (B sequences
//   at --context cached tokens, each one new token a step, sampled on the GPU unless
//   --host-sampling), tok/s. Each step is launched before the previous step's ids are back
//   (Model::LaunchSample: the step's token is read on the device), as the server's decode steps
//   are; --sync waits for each step's ids first (ForwardSample, what every step did before).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <vector>

#include "engine/native/backend/cuda/cuda_backend.h"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/model/loaded_model.h"

namespace dyn {
namespace {

using Clock = std::chrono::steady_clock;

// Median seconds per call of fn over `iters` calls in each of 5 rounds (device work is synchronized
// at the end of each round; warm-up round first).
void CheckBlasStatus(cublasStatus_t s) {
  if (s != CUBLAS_STATUS_SUCCESS) std::fprintf(stderr, "cuBLAS error %d\n", static_cast<int>(s)), std::abort();
}

template <class Fn>
double TimeDevice(Fn&& fn, int iters) {
  std::vector<double> rounds;
  for (int r = 0; r < 6; ++r) {
    DYN_CUDA_CHECK(cudaDeviceSynchronize());
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) fn();
    DYN_CUDA_CHECK(cudaDeviceSynchronize());
    if (r > 0) rounds.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / iters);
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
}

// Returns the bf16 GEMM rate (TFLOP/s, the best of a few large square and Llama-shaped products).
double Kernels() {
  {
    const size_t n = size_t{2} << 30;
    void *a, *b;
    DYN_CUDA_CHECK(cudaMalloc(&a, n));
    DYN_CUDA_CHECK(cudaMalloc(&b, n));
    DYN_CUDA_CHECK(cudaMemset(a, 1, n));
    const double s = TimeDevice([&] { DYN_CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0)); }, 10);
    std::printf("device copy: %.0f GB/s (read + write of %zu MiB)\n", 2.0 * n / s / 1e9, n >> 20);
    cudaFree(a);
    cudaFree(b);
  }
  {  // Read-only: one pass over as many bytes as a batch-1 step of the 8B shape reads (15.01 GB).
    const size_t n = size_t{15010} * 1000 * 1000;  // a multiple of 16
    void* a;
    unsigned* sink;
    if (cudaMalloc(&a, n) == cudaSuccess) {
      DYN_CUDA_CHECK(cudaMalloc(&sink, 4));
      DYN_CUDA_CHECK(cudaMemset(a, 1, n));
      int device = 0, sms = 0;
      DYN_CUDA_CHECK(cudaGetDevice(&device));
      DYN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      for (int blocks : {2, 4, 8}) {
        const double s = TimeDevice([&] { cuda::ReadOnce(0, a, n, static_cast<unsigned>(sms * blocks), 256, sink); }, 3);
        std::printf("device read, %d blocks of 256 an SM: %.0f GB/s (one pass over %.2f GB: %.3f ms)\n", blocks, n / s / 1e9, n / 1e9,
                    s * 1e3);
      }
      cudaFree(sink);
      cudaFree(a);
    } else {
      (void)cudaGetLastError();
    }
  }
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 0;
  double peak = 0;
  {  // bf16 GEMM rate (cuBLAS, F32 accumulation, bf16 out), random inputs: the prefill ceiling
    struct Gemm {
      int m, n, k;
    };
    const Gemm gemms[] = {{8192, 8192, 8192}, {4096, 28672, 4096}, {4096, 4096, 14336}, {16384, 6144, 4096}};
    for (const Gemm& g : gemms) {
      void *a, *b, *d;
      DYN_CUDA_CHECK(cudaMalloc(&a, size_t{2} * g.m * g.k));
      DYN_CUDA_CHECK(cudaMalloc(&b, size_t{2} * g.k * g.n));
      DYN_CUDA_CHECK(cudaMalloc(&d, size_t{2} * g.m * g.n));
      cuda::FillRandomBf16(0, static_cast<uint16_t*>(a), size_t{1} * g.m * g.k, 3, 1.0f);
      cuda::FillRandomBf16(0, static_cast<uint16_t*>(b), size_t{1} * g.k * g.n, 5, 1.0f);
      const float one = 1.0f, zero = 0.0f;
      const double s = TimeDevice(
          [&] {
            CheckBlasStatus(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, g.n, g.m, g.k, &one, b, CUDA_R_16BF, g.k, a, CUDA_R_16BF, g.k,
                                         &zero, d, CUDA_R_16BF, g.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          },
          20);
      const double tflops = 2.0 * g.m * g.n * g.k / s / 1e12;
      peak = std::max(peak, tflops);
      std::printf("bf16 GEMM %5d x %5d x %5d (m x n x k): %7.3f ms, %5.0f TFLOP/s\n", g.m, g.n, g.k, s * 1e3, tflops);
      cudaFree(a);
      cudaFree(b);
      cudaFree(d);
    }
  }
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"qkv 6144x4096", 6144, 4096},    {"o 4096x4096", 4096, 4096},         {"kv 1024x4096", 1024, 4096},
                          {"gate+up 28672x4096", 28672, 4096}, {"down 4096x14336", 4096, 14336}, {"lm_head 128256x4096", 128256, 4096}};
  if (const char* rx = std::getenv("DYN_CUDA_GEMV_ROWS_X")) cuda::SetGemvRowsSharingX(rx);  // as the backend does
  // skinny: the tensor-core kernel for 2 <= m <= 8 (cuda_gemm_skinny.cu), bf16 x like cuBLAS.
  std::printf("%-22s %3s %10s %10s %10s %11s %10s %11s\n", "bf16 matmul", "m", "gemv us", "gemv GB/s", "skinny us", "skinny GB/s",
              "cublas us", "cublas GB/s");
  for (const Shape& s : shapes) {
    // Several copies of the weight so repeated calls stream from HBM, not from the 60 MB L2.
    const size_t wbytes = static_cast<size_t>(s.rows) * s.cols * 2;
    const int copies = static_cast<int>(std::max<size_t>(1, (size_t{512} << 20) / wbytes + 1));
    std::vector<void*> ws(copies);
    for (void*& w : ws) {
      DYN_CUDA_CHECK(cudaMalloc(&w, wbytes));
      cuda::FillRandomBf16(0, static_cast<uint16_t*>(w), wbytes / 2, 7, 0.02f);
    }
    for (int m : {1, 2, 4, 8}) {
      float *x, *out;
      void* xb;
      DYN_CUDA_CHECK(cudaMalloc(&x, s.cols * m * 4));
      DYN_CUDA_CHECK(cudaMalloc(&xb, s.cols * m * 2));
      DYN_CUDA_CHECK(cudaMalloc(&out, s.rows * m * 4));
      DYN_CUDA_CHECK(cudaMemset(x, 0x3c, s.cols * m * 4));  // ~0.01 in every float
      DYN_CUDA_CHECK(cudaMemset(xb, 0x3c, s.cols * m * 2));
      int i = 0;
      const double gemv = TimeDevice(
          [&] { cuda::GemvBf16(0, x, m, static_cast<const uint16_t*>(ws[i++ % copies]), s.rows, s.cols, out); }, 50);
      double skinny = 0;
      if (m > 1) {
        const uint16_t* xw = static_cast<const uint16_t*>(xb);
        skinny = TimeDevice(
            [&] {
              const uint16_t* w = static_cast<const uint16_t*>(ws[i++ % copies]);
              cuda::SkinnyGemmBf16(0, xw, m, 1, &w, &s.rows, s.cols, &out);
            },
            50);
      }
      const float one = 1.0f, zero = 0.0f;
      const double blas_s = TimeDevice(
          [&] {
            cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.rows), m, static_cast<int>(s.cols), &one,
                         ws[i++ % copies], CUDA_R_16BF, static_cast<int>(s.cols), xb, CUDA_R_16BF, static_cast<int>(s.cols), &zero,
                         out, CUDA_R_32F, static_cast<int>(s.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          },
          50);
      std::printf("%-22s %3d %10.1f %10.0f %10.1f %11.0f %10.1f %11.0f\n", s.name, m, gemv * 1e6, wbytes / gemv / 1e9, skinny * 1e6,
                  m > 1 ? wbytes / skinny / 1e9 : 0.0, blas_s * 1e6, wbytes / blas_s / 1e9);
      cudaFree(x);
      cudaFree(xb);
      cudaFree(out);
    }
    for (void* w : ws) cudaFree(w);
  }
  cublasDestroy(blas);
  return peak;
}

// Prefill rate: one sequence of each prompt length (tok/s and model FLOPs utilisation against
// `peak_tflops`, the bf16 GEMM rate measured by --kernels on the same GPU); then decode: B
// sequences of `context` cached tokens each decode one token per step, sampled greedily on the GPU
// (ForwardSample; pipelined: LaunchSample, each step launched before the previous one's ids are
// back) or, with host_sampling, from logits copied to the host.
int g_repeat_prefill = 0;  // --repeat-prefill N
bool g_pipelined = true;  // --sync: false

int ModelBench(const std::string& dir, int steps, const std::vector<int>& batches, const std::vector<int>& prompts, int context,
               bool host_sampling, double peak_tflops) {
  auto loaded = LoadHfConfigDummy(dir);  // the loader behind `dyn run --load-format dummy`
  if (!loaded.ok()) return std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str()), 1;
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) return std::fprintf(stderr, "%s\n", backend.status().ToString().c_str()), 1;
  const auto t0 = Clock::now();
  auto model = CreateLlamaModel(std::move(loaded).value(), std::move(backend).value());
  if (!model.ok()) return std::fprintf(stderr, "%s\n", model.status().ToString().c_str()), 1;
  Model& m = **model;
  const ModelConfig& c = m.config();
  DYN_CUDA_CHECK(cudaDeviceSynchronize());
  std::printf("%s\nload (dummy weights): %.2f s\n", m.Describe().c_str(), std::chrono::duration<double>(Clock::now() - t0).count());
  const int max_batch = batches.empty() ? 0 : *std::max_element(batches.begin(), batches.end());
  const int max_prompt = prompts.empty() ? 0 : *std::max_element(prompts.begin(), prompts.end());
  const int block_size = 16, per_seq = (context + steps + 8) / block_size + 1, prefill_blocks = max_prompt / block_size + 1;
  if (Status s = m.InitKvCache(per_seq * max_batch + prefill_blocks, block_size); !s.ok()) {
    return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  }
  std::vector<std::vector<int32_t>> tables(max_batch);
  for (int b = 0; b < max_batch; ++b)
    for (int i = 0; i < per_seq; ++i) tables[b].push_back(b * per_seq + i);
  std::vector<int32_t> prefill_table(prefill_blocks);
  for (int i = 0; i < prefill_blocks; ++i) prefill_table[i] = per_seq * max_batch + i;
  std::vector<float> logits(static_cast<size_t>(std::max(1, max_batch)) * c.vocab_size);
  const double H = c.hidden_size, q = double(c.num_heads) * c.head_dim, kv = double(c.num_kv_heads) * c.head_dim;
  const double layer_params = H * q * 2 + H * kv * 2 + 3 * H * c.intermediate_size;
  for (int len : prompts) {
    std::vector<uint32_t> prompt(len);
    for (int i = 0; i < len; ++i) prompt[i] = static_cast<uint32_t>((i * 7919) % c.vocab_size);
    auto prefill = [&] {
      ForwardSeq f;
      f.tokens = prompt;
      f.block_table = prefill_table;
      DYN_CUDA_CHECK(m.Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
    };
    prefill();  // warm-up
    std::vector<double> times;
    for (int r = 0; r < (len >= 8192 ? 2 : 5); ++r) {
      const auto t1 = Clock::now();
      prefill();
      times.push_back(std::chrono::duration<double>(Clock::now() - t1).count());
    }
    std::sort(times.begin(), times.end());
    const double s = times[times.size() / 2];
    // Matmul FLOPs of every layer and the LM head (one row), and causal attention (QK^T and PV:
    // 2 x 2 x heads x head_dim per query-key pair, len^2 / 2 pairs).
    const double matmul = 2.0 * layer_params * c.num_layers * len + 2.0 * H * c.vocab_size;
    const double attn = 4.0 * q * (double(len) * len / 2) * c.num_layers;
    const double tflops = (matmul + attn) / s / 1e12;
    std::printf("prefill %6d tokens: %9.1f ms %9.0f tok/s  %6.1f TFLOP/s (attention %4.1f%% of FLOPs)", len, s * 1e3, len / s, tflops,
                100 * attn / (matmul + attn));
    if (peak_tflops > 0) std::printf("  MFU %.1f%%", 100 * tflops / peak_tflops);
    std::printf("\n");
  }
  if (batches.empty()) return 0;
  const double weight_gb = (layer_params * c.num_layers + double(c.vocab_size) * H) * 2 / 1e9;  // embedding rows are negligible
  {  // every decode sequence starts with `context` cached tokens (one batched prefill)
    std::vector<uint32_t> ctx(std::max(context, 1));
    for (int i = 0; i < context; ++i) ctx[i] = static_cast<uint32_t>((i * 7919 + 11) % c.vocab_size);
    std::vector<ForwardSeq> fill(max_batch);
    const bool check = g_repeat_prefill > 0;
    for (int b = 0; b < max_batch && context > 0; ++b) fill[b] = ForwardSeq{std::span<const uint32_t>(ctx).first(context), 0, tables[b], check};
    if (context > 0) DYN_CUDA_CHECK(m.Forward(fill, logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
    // --repeat-prefill N: the same prefill again (same tables: each rewrites its slots before
    // reading them); its last-row logits must be bitwise those of the first.
    const std::vector<float> first(logits.begin(), logits.begin() + (check ? static_cast<size_t>(max_batch) * c.vocab_size : 0));
    if (check) {  // equal between processes when the prefill is repeatable across runs, not only within one
      uint64_t hash = 1469598103934665603ull;
      for (float f : first) hash = (hash ^ std::bit_cast<uint32_t>(f)) * 1099511628211ull;
      std::printf("prefill logits hash %016llx\n", static_cast<unsigned long long>(hash));
    }
    for (int rep = 1; check && context > 0 && rep <= g_repeat_prefill; ++rep) {
      DYN_CUDA_CHECK(m.Forward(fill, logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
      size_t differ = 0;
      double worst = 0;
      for (size_t i = 0; i < first.size(); ++i) {
        if (first[i] != logits[i]) ++differ, worst = std::max(worst, std::abs(double(first[i]) - logits[i]));
      }
      std::printf("prefill repeat %d: %zu of %zu logits differ (max abs diff %.3g)\n", rep, differ, first.size(), worst);
    }
  }
  std::printf("decode at context %d, sampling on the %s; weights read per step: %.2f GB\n", context,
              host_sampling ? "host" : g_pipelined ? "GPU, pipelined" : "GPU",
              weight_gb);
  // "tokens": a hash of every greedy token of the timed steps, equal between builds and settings
  // (DYN_CUDA_PDL, DYN_CUDA_FUSE) whose arithmetic is the same, and between runs
  // (docs/benchmarks/cuda.md "Determinism").
  std::printf("%6s %10s %12s %12s %14s %18s\n", "batch", "ms/step", "tok/s/seq", "tok/s", "weight GB/s", "tokens");
  for (int B : batches) {
    std::vector<std::vector<uint32_t>> tok(B, std::vector<uint32_t>(1));
    std::vector<ForwardSeq> batch(B);
    std::vector<DeviceSampling> greedy(B);
    std::vector<uint32_t> next(B);
    for (int b = 0; b < B; ++b) {
      batch[b].block_table = tables[b];
      tok[b][0] = static_cast<uint32_t>(b + 1);
    }
    int pos = context;
    uint64_t token_hash = 1469598103934665603ull;
    auto step = [&] {
      for (int b = 0; b < B; ++b) {
        batch[b].tokens = tok[b];
        batch[b].start_pos = pos;
      }
      if (host_sampling) {
        DYN_CUDA_CHECK(m.Forward(batch, logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
        for (int b = 0; b < B; ++b) {
          const float* l = logits.data() + static_cast<size_t>(b) * c.vocab_size;
          next[b] = static_cast<uint32_t>(std::max_element(l, l + c.vocab_size) - l);
        }
      } else {
        DYN_CUDA_CHECK(m.ForwardSample(batch, greedy, next.data()).ok() ? cudaSuccess : cudaErrorUnknown);
      }
      for (int b = 0; b < B; ++b) {
        tok[b][0] = next[b];
        token_hash = (token_hash ^ next[b]) * 1099511628211ull;
      }
      ++pos;
    };
    // Pipelined: a step's token is the previous step's sample, read on the device; the host takes
    // the ids one step behind.
    auto launch = [&](bool from_sample) {
      for (int b = 0; b < B; ++b) {
        batch[b].tokens = tok[b];
        batch[b].start_pos = pos;
        batch[b].sampled_row = from_sample ? b : -1;
      }
      DYN_CUDA_CHECK(m.LaunchSample(batch, greedy).ok() ? cudaSuccess : cudaErrorUnknown);
      ++pos;
    };
    auto take = [&] {
      DYN_CUDA_CHECK(m.TakeSample(next.data()).ok() ? cudaSuccess : cudaErrorUnknown);
      for (int b = 0; b < B; ++b) {
        tok[b][0] = next[b];
        token_hash = (token_hash ^ next[b]) * 1099511628211ull;
      }
    };
    auto run = [&](int n, bool first_from_host) {
      if (!g_pipelined || host_sampling) {
        for (int i = 0; i < n; ++i) step();
        return;
      }
      for (int i = 0; i < n; ++i) {
        launch(i > 0 || !first_from_host);
        if (i > 0) take();
      }
      take();
    };
    run(4, true);
    pos = context;  // the timed steps rewrite the warm-up's slots
    token_hash = 1469598103934665603ull;
    const auto t1 = Clock::now();
    run(steps, false);
    const double s = std::chrono::duration<double>(Clock::now() - t1).count() / steps;
    std::printf("%6d %10.2f %12.1f %12.1f %14.0f %18llx\n", B, s * 1e3, 1 / s, B / s, weight_gb / s,
                static_cast<unsigned long long>(token_hash));
  }
  return 0;
}

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    out.push_back(std::stoi(s.substr(i, j - i)));
    i = j + 1;
  }
  return out;
}

}  // namespace
}  // namespace dyn

int main(int argc, char** argv) {
  bool kernels = false, host_sampling = false;
  std::string config, load_format = "dummy", batches = "1,4,8", prompts = "512";
  int steps = 128, context = 512;
  double peak = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (flag == "--kernels") kernels = true;
    else if (flag == "--config") config = value();
    else if (flag == "--load-format") load_format = value();
    else if (flag == "--steps") steps = std::stoi(value());
    else if (flag == "--batches") batches = value();
    else if (flag == "--prompt" || flag == "--prompts") prompts = value();
    else if (flag == "--context") context = std::stoi(value());
    else if (flag == "--host-sampling") host_sampling = true;
    else if (flag == "--sync") dyn::g_pipelined = false;
    else if (flag == "--repeat-prefill") dyn::g_repeat_prefill = std::stoi(value());
    else if (flag == "--peak-tflops") peak = std::stod(value());
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (dyn::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  if (kernels) peak = dyn::Kernels();
  if (!config.empty()) {
    if (load_format != "dummy") {
      std::fprintf(stderr, "--load-format: only 'dummy' (random weights from config.json)\n");
      return 2;
    }
    return dyn::ModelBench(config, steps, dyn::ParseList(batches), dyn::ParseList(prompts), context, host_sampling, peak);
  }
  return 0;
}
