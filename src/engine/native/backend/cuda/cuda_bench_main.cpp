// dyn_cuda_bench: CUDA backend speed on the GPU it runs on.
//
//   dyn_cuda_bench [--kernels] [--config DIR --load-format dummy] [--steps 128] [--batches 1,4,8]
//                  [--prompt 512]
//
// --kernels: device copy bandwidth (the roofline of a decode step), then the bf16 decode matmul
//   (GEMV kernel, m = 1 and 4) against cuBLAS GemmEx on Llama-3.1-8B's shapes, as GB/s of weights.
// --config DIR --load-format dummy: builds the model from DIR/config.json alone with random bf16
//   weights made on the GPU (no weight files), then times a prefill of --prompt tokens and
//   batch-B greedy decode steps (B sequences, each one new token a step), tok/s.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
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

void Kernels() {
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
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return;
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"qkv 6144x4096", 6144, 4096},    {"o 4096x4096", 4096, 4096},         {"kv 1024x4096", 1024, 4096},
                          {"gate+up 28672x4096", 28672, 4096}, {"down 4096x14336", 4096, 14336}, {"lm_head 128256x4096", 128256, 4096}};
  std::printf("%-22s %3s %12s %12s %12s %12s\n", "bf16 matmul", "m", "gemv us", "gemv GB/s", "cublas us", "cublas GB/s");
  for (const Shape& s : shapes) {
    // Several copies of the weight so repeated calls stream from HBM, not from the 60 MB L2.
    const size_t wbytes = static_cast<size_t>(s.rows) * s.cols * 2;
    const int copies = static_cast<int>(std::max<size_t>(1, (size_t{512} << 20) / wbytes + 1));
    std::vector<void*> ws(copies);
    for (void*& w : ws) {
      DYN_CUDA_CHECK(cudaMalloc(&w, wbytes));
      cuda::FillRandomBf16(0, static_cast<uint16_t*>(w), wbytes / 2, 7, 0.02f);
    }
    for (int m : {1, 2, 4}) {
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
      const float one = 1.0f, zero = 0.0f;
      const double blas_s = TimeDevice(
          [&] {
            cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.rows), m, static_cast<int>(s.cols), &one,
                         ws[i++ % copies], CUDA_R_16BF, static_cast<int>(s.cols), xb, CUDA_R_16BF, static_cast<int>(s.cols), &zero,
                         out, CUDA_R_32F, static_cast<int>(s.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          },
          50);
      std::printf("%-22s %3d %12.1f %12.0f %12.1f %12.0f\n", s.name, m, gemv * 1e6, wbytes / gemv / 1e9, blas_s * 1e6,
                  wbytes / blas_s / 1e9);
      cudaFree(x);
      cudaFree(xb);
      cudaFree(out);
    }
    for (void* w : ws) cudaFree(w);
  }
  cublasDestroy(blas);
}

int ModelBench(const std::string& dir, int steps, const std::vector<int>& batches, int prompt_len) {
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
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int block_size = 16, per_seq = (prompt_len + steps + 8) / block_size + 1;
  if (Status s = m.InitKvCache(per_seq * max_batch, block_size); !s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  std::vector<std::vector<int32_t>> tables(max_batch);
  for (int b = 0; b < max_batch; ++b)
    for (int i = 0; i < per_seq; ++i) tables[b].push_back(b * per_seq + i);
  std::vector<float> logits(static_cast<size_t>(max_batch) * c.vocab_size);
  // Prefill: one sequence of prompt_len tokens.
  std::vector<uint32_t> prompt(prompt_len);
  for (int i = 0; i < prompt_len; ++i) prompt[i] = static_cast<uint32_t>((i * 7919) % c.vocab_size);
  auto prefill = [&] {
    ForwardSeq f;
    f.tokens = prompt;
    f.block_table = tables[0];
    DYN_CUDA_CHECK(m.Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
  };
  prefill();
  const double prefill_s = TimeDevice(prefill, 3);
  std::printf("prefill %d tokens: %.1f ms, %.0f tok/s\n", prompt_len, prefill_s * 1e3, prompt_len / prefill_s);
  const double weight_gb = [&] {
    const double H = c.hidden_size, q = double(c.num_heads) * c.head_dim, kv = double(c.num_kv_heads) * c.head_dim;
    const double per_layer = H * q * 2 + H * kv * 2 + 3 * H * c.intermediate_size;
    return (per_layer * c.num_layers + double(c.vocab_size) * H) * 2 / 1e9;  // embedding rows read are negligible
  }();
  std::printf("weights read per decode step: %.2f GB\n", weight_gb);
  std::printf("%6s %10s %12s %12s %14s\n", "batch", "ms/step", "tok/s/seq", "tok/s", "weight GB/s");
  for (int B : batches) {
    std::vector<std::vector<uint32_t>> tok(B, std::vector<uint32_t>(1));
    std::vector<ForwardSeq> batch(B);
    for (int b = 0; b < B; ++b) {
      batch[b].block_table = tables[b];
      tok[b][0] = static_cast<uint32_t>(b + 1);
    }
    int pos = 0;
    auto step = [&] {
      for (int b = 0; b < B; ++b) {
        batch[b].tokens = tok[b];
        batch[b].start_pos = pos;
      }
      DYN_CUDA_CHECK(m.Forward(batch, logits.data()).ok() ? cudaSuccess : cudaErrorUnknown);
      for (int b = 0; b < B; ++b) {
        const float* l = logits.data() + static_cast<size_t>(b) * c.vocab_size;
        tok[b][0] = static_cast<uint32_t>(std::max_element(l, l + c.vocab_size) - l);
      }
      ++pos;
    };
    for (int i = 0; i < 4; ++i) step();
    const auto t1 = Clock::now();
    for (int i = 0; i < steps; ++i) step();
    const double s = std::chrono::duration<double>(Clock::now() - t1).count() / steps;
    std::printf("%6d %10.2f %12.1f %12.1f %14.0f\n", B, s * 1e3, 1 / s, B / s, weight_gb / s);
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
  bool kernels = false;
  std::string config, load_format = "dummy", batches = "1,4,8";
  int steps = 128, prompt = 512;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (flag == "--kernels") kernels = true;
    else if (flag == "--config") config = value();
    else if (flag == "--load-format") load_format = value();
    else if (flag == "--steps") steps = std::stoi(value());
    else if (flag == "--batches") batches = value();
    else if (flag == "--prompt") prompt = std::stoi(value());
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (dyn::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  if (kernels) dyn::Kernels();
  if (!config.empty()) {
    if (load_format != "dummy") {
      std::fprintf(stderr, "--load-format: only 'dummy' (random weights from config.json)\n");
      return 2;
    }
    return dyn::ModelBench(config, steps, dyn::ParseList(batches), prompt);
  }
  return 0;
}
