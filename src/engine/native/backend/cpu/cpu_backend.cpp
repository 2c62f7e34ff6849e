// The CPU backend: memory is host memory, weights are used in place, kernels run on a persistent
// thread pool. Matmuls and attention are parallel; the element-wise kernels are cheap next to them
// and run on the calling thread unless the batch is large.
#include "engine/native/backend/cpu/simd.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/cpu_kernels.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#if DYN_HAVE_CUDA
#include "engine/native/backend/cuda/cuda_backend.h"
#endif

namespace dyn {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kQ8_0: return "Q8_0";
    case DType::kQ4_0: return "Q4_0";
    case DType::kQ4_1: return "Q4_1";
  }
  return "?";
}

bool DTypeIsQuantized(DType t) { return t == DType::kQ8_0 || t == DType::kQ4_0 || t == DType::kQ4_1; }

size_t DTypeRowBytes(DType t, int64_t cols) {
  const size_t n = static_cast<size_t>(cols);
  switch (t) {
    case DType::kF32: return n * 4;
    case DType::kF16: case DType::kBF16: return n * 2;
    case DType::kQ8_0: return n / kQuantBlock * sizeof(BlockQ8_0);
    case DType::kQ4_0: return n / kQuantBlock * sizeof(BlockQ4_0);
    case DType::kQ4_1: return n / kQuantBlock * sizeof(BlockQ4_1);
  }
  return 0;
}

void DequantizeRow(DType dtype, const void* row, int64_t n, float* out) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, row, n * sizeof(float));
      return;
    case DType::kF16: {
      auto* p = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) out[i] = F16ToF32(p[i]);
      return;
    }
    case DType::kBF16: {
      auto* p = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) out[i] = BF16ToF32(p[i]);
      return;
    }
    case DType::kQ8_0: {
      auto* b = static_cast<const BlockQ8_0*>(row);
      for (int64_t i = 0; i < n / kQuantBlock; ++i) {
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < 32; ++j) out[i * 32 + j] = d * b[i].qs[j];
      }
      return;
    }
    case DType::kQ4_0: {
      auto* b = static_cast<const BlockQ4_0*>(row);
      for (int64_t i = 0; i < n / kQuantBlock; ++i) {
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < 16; ++j) {
          out[i * 32 + j] = d * ((b[i].qs[j] & 0x0F) - 8);
          out[i * 32 + j + 16] = d * ((b[i].qs[j] >> 4) - 8);
        }
      }
      return;
    }
    case DType::kQ4_1: {
      auto* b = static_cast<const BlockQ4_1*>(row);
      for (int64_t i = 0; i < n / kQuantBlock; ++i) {
        const float d = F16ToF32(b[i].d), m = F16ToF32(b[i].m);
        for (int j = 0; j < 16; ++j) {
          out[i * 32 + j] = d * (b[i].qs[j] & 0x0F) + m;
          out[i * 32 + j + 16] = d * (b[i].qs[j] >> 4) + m;
        }
      }
      return;
    }
  }
}

namespace {

class HostBuffer : public Buffer {
 public:
  HostBuffer(void* p, size_t n) : p_(p), n_(n) {}
  ~HostBuffer() override { std::free(p_); }
  void* data() override { return p_; }
  size_t size() const override { return n_; }

 private:
  void* p_;
  size_t n_;
};

float SumSquares(const float* x, int n) {
  // Fixed 16-lane order so a row's result never depends on its neighbours.
#if DYN_CPU_AVX512
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (i < n) {
    __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(x[i + l], x[i + l], acc[l]);
  for (int l = 0; i + l < n; ++l) acc[l] = std::fma(x[i + l], x[i + l], acc[l]);
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += acc[l];
  return sum;
#endif
}

void NormRow(const float* x, const float* w, int n, float eps, float* out) {
  const float scale = 1.0f / std::sqrt(SumSquares(x, n) / n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) {}

  bool host_memory() const override { return true; }
  std::string Describe() const override { return "cpu (" + std::to_string(pool_.size()) + (DYN_CPU_AVX512 ? " threads, AVX-512)" : " threads, portable kernels)"); }

  Result<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (p == nullptr) return Status::ResourceExhausted("cpu backend: cannot allocate " + std::to_string(bytes) + " bytes");
    return std::unique_ptr<Buffer>(new HostBuffer(p, bytes));
  }

  Result<Weight> PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>*) override { return host; }
  void CopyToBackend(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void CopyToHost(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  void Embedding(const Weight& table, std::span<const uint32_t> ids, float* out) override {
    const size_t row_bytes = DTypeRowBytes(table.dtype, table.cols);
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto* row = static_cast<const uint8_t*>(table.data) + ids[i] * row_bytes;
      DequantizeRow(table.dtype, row, table.cols, out + i * table.cols);
    }
  }

  void RmsNorm(const float* x, const float* weight, int m, int dim, float eps, float* out) override {
    ForRows(m, [&](int i) { NormRow(x + static_cast<size_t>(i) * dim, weight, dim, eps, out + static_cast<size_t>(i) * dim); });
  }

  void MatMul(const float* x, int m, const Weight& w, float* out) override {
    if (DTypeIsQuantized(w.dtype)) {
      cpu::MatMulQuant(pool_, x, m, w, out);
    } else {
      cpu::MatMulFloat(pool_, x, m, w, out);
    }
  }

  void MatMulShared(const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) override {
    bool one_job = !ws.empty() && DTypeIsQuantized(ws[0].dtype);
    for (const Weight& w : ws) one_job = one_job && w.dtype == ws[0].dtype && w.cols == ws[0].cols;
    if (one_job) {
      cpu::MatMulQuantShared(pool_, x, m, ws, outs);
      return;
    }
    for (size_t i = 0; i < ws.size(); ++i) MatMul(x, m, ws[i], outs[i]);
  }

  void GatherRows(const float* x, int dim, std::span<const uint32_t> rows, float* out) override {
    for (size_t i = 0; i < rows.size(); ++i) std::memcpy(out + i * dim, x + static_cast<size_t>(rows[i]) * dim, dim * sizeof(float));
  }

  void AddBias(float* x, int m, int n, const float* bias) override {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) x[static_cast<size_t>(i) * n + j] += bias[j];
  }

  void Add(float* x, const float* y, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
  }

  void SwiGlu(const float* gate, const float* up, size_t n, float* out) override {
    for (size_t i = 0; i < n; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }

  void RopeTable(std::span<const int32_t> positions, std::span<const float> inv_freq, float* cos_sin) override {
    const size_t half = inv_freq.size();
    for (size_t i = 0; i < positions.size(); ++i) {
      const float pos = static_cast<float>(positions[i]);
      for (size_t j = 0; j < half; ++j) {
        const float angle = pos * inv_freq[j];
        cos_sin[(i * half + j) * 2] = std::cos(angle);
        cos_sin[(i * half + j) * 2 + 1] = std::sin(angle);
      }
    }
  }

  void Rope(float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style) override {
    const int half = head_dim / 2;
    for (int i = 0; i < m; ++i) {
      const float* cs = cos_sin + static_cast<size_t>(i) * half * 2;
      for (int h = 0; h < heads; ++h) {
        float* v = x + (static_cast<size_t>(i) * heads + h) * head_dim;
        for (int j = 0; j < half; ++j) {
          const int a = style == RopeStyle::kNeox ? j : 2 * j;
          const int b = style == RopeStyle::kNeox ? j + half : 2 * j + 1;
          const float c = cs[2 * j], s = cs[2 * j + 1];
          const float x0 = v[a], x1 = v[b];
          v[a] = x0 * c - x1 * s;
          v[b] = x1 * c + x0 * s;
        }
      }
    }
  }

  void HeadRmsNorm(float* x, int m, int heads, int head_dim, const float* weight, float eps) override {
    for (int64_t r = 0; r < static_cast<int64_t>(m) * heads; ++r) NormRow(x + r * head_dim, weight, head_dim, eps, x + r * head_dim);
  }

  void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
               const float* v) override {
    cpu::WriteKv(cache, layout, layer, seqs, k, v);
  }

  void Attention(const float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs,
                 const float* q, int num_heads, float scale, float* out) override {
    cpu::Attention(pool_, cache, layout, layer, seqs, q, num_heads, scale, out);
  }

 private:
  // Row-parallel for large batches; inline for decode-sized ones where a fork/join costs more.
  template <class Fn>
  void ForRows(int m, Fn&& fn) {
    if (m < 32) {
      for (int i = 0; i < m; ++i) fn(i);
      return;
    }
    pool_.ParallelFor(m, [&](int64_t i) { fn(static_cast<int>(i)); });
  }

  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<CpuBackend>(num_threads);
}

Result<std::unique_ptr<Backend>> CreateBackend(const std::string& device, int num_threads) {
  if (device == "cpu") return CreateCpuBackend(num_threads);
#if DYN_HAVE_CUDA
  if (device == "cuda") return CreateCudaBackend(0);
  return Status::Unsupported("compute backend '" + device + "' (have: cpu, cuda)");
#else
  return Status::Unsupported("compute backend '" + device + "' is not available in this build (have: cpu)");
#endif
}

std::string DefaultDevice() {
#if DYN_HAVE_CUDA
  if (CudaDeviceCount() > 0) return "cuda";
#endif
  return "cpu";
}

}  // namespace dyn
