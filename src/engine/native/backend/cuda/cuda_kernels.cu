// Element-wise, normalization, RoPE, embedding and conversion kernels of the CUDA backend.
// Arithmetic follows the CPU backend's order (cpu_backend.cpp) where it is cheap to do so:
// products and sums that the CPU keeps separate use __fmul_rn/__fadd_rn so nvcc does not fuse
// them, which keeps these kernels within a rounding or two of the CPU results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {

namespace {
bool g_programmatic_launch = true;
}  // namespace

void SetProgrammaticLaunch(bool on) { g_programmatic_launch = on; }
bool ProgrammaticLaunch() { return g_programmatic_launch; }

void Check(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s:%d: CUDA error in %s: %s\n", file, line, what, cudaGetErrorString(err));
  std::abort();
}

namespace {

// ggml block layouts, bit-compatible with quant_blocks.h (which needs <immintrin.h>, so it is not
// included in device code).
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20);

__device__ __forceinline__ float Half(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// Element c of one row of `dtype` as F32, exactly as DequantizeRow computes it.
__device__ __forceinline__ float LoadElement(DType dtype, const uint8_t* row, int64_t c) {
  switch (dtype) {
    case DType::kF32: return reinterpret_cast<const float*>(row)[c];
    case DType::kF16: return Half(reinterpret_cast<const uint16_t*>(row)[c]);
    case DType::kBF16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[c]);
    case DType::kQ8_0: {
      const BlockQ8_0& b = reinterpret_cast<const BlockQ8_0*>(row)[c / 32];
      return __fmul_rn(Half(b.d), static_cast<float>(b.qs[c % 32]));
    }
    case DType::kQ4_0: {
      const BlockQ4_0& b = reinterpret_cast<const BlockQ4_0*>(row)[c / 32];
      const int j = static_cast<int>(c % 32);
      const int q = j < 16 ? (b.qs[j] & 0x0F) : (b.qs[j - 16] >> 4);
      return __fmul_rn(Half(b.d), static_cast<float>(q - 8));
    }
    case DType::kQ4_1: {
      const BlockQ4_1& b = reinterpret_cast<const BlockQ4_1*>(row)[c / 32];
      const int j = static_cast<int>(c % 32);
      const int q = j < 16 ? (b.qs[j] & 0x0F) : (b.qs[j - 16] >> 4);
      return __fadd_rn(__fmul_rn(Half(b.d), static_cast<float>(q)), Half(b.m));
    }
  }
  return 0.0f;
}

size_t RowBytes(DType t, int64_t cols) {
  switch (t) {
    case DType::kF32: return cols * 4;
    case DType::kF16: case DType::kBF16: return cols * 2;
    case DType::kQ8_0: return cols / 32 * sizeof(BlockQ8_0);
    case DType::kQ4_0: return cols / 32 * sizeof(BlockQ4_0);
    case DType::kQ4_1: return cols / 32 * sizeof(BlockQ4_1);
  }
  return 0;
}

int Blocks(size_t n, int threads) {
  const size_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 65535u * 16u ? b : 65535u * 16u);  // grid-stride loops cover the rest
}

__global__ void EmbeddingKernel(DType dtype, const uint8_t* table, size_t row_bytes, int64_t cols, const uint32_t* ids,
                                const uint32_t* sampled, float* out) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  uint32_t id = ids[blockIdx.x];
  if (id & kSampledRow) id = sampled[id & ~kSampledRow];
  const uint8_t* row = table + size_t{id} * row_bytes;
  float* o = out + blockIdx.x * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = LoadElement(dtype, row, c);
}

// Weight preparation: no early launch of the next kernel, which may be a GEMV that reads weights
// before it waits (cuda_launch.cuh).
__global__ void ConvertToBf16Kernel(DType dtype, const uint8_t* src, size_t row_bytes, int64_t rows, int64_t cols,
                                    __nv_bfloat16* dst) {
  WaitForPreviousKernel();
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[i] = __float2bfloat16_rn(LoadElement(dtype, src + r * row_bytes, c));
  }
}

__global__ void FillRandomBf16Kernel(__nv_bfloat16* dst, size_t n, uint64_t seed, float scale) {
  WaitForPreviousKernel();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    dst[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * scale);
  }
}

// Each thread keeps 4 loads in flight (64 bytes), the loop's stride is the whole grid.
__global__ void ReadOnceKernel(const uint4* __restrict__ p, size_t n16, unsigned* sink) {
  WaitForPreviousKernel();
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  unsigned acc = 0;
  size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = LoadStreaming(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = LoadStreaming(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // keeps the loads; almost never stores
}

// Element-wise kernels take four elements per thread (16-byte loads) where the arrays allow: the
// large-batch decode step runs them over 1024 x 14336 floats, where scalar loads reached about
// half the bandwidth. Vec4 says whether all of them are 16-byte aligned.
__host__ __device__ inline bool Vec4(const void* a, const void* b, const void* c = nullptr) {
  return (reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c)) % 16 == 0;
}

// A grid-stride loop over n elements: quad(q) for each group of four [4q, 4q + 4) when vec4, then
// one(i) for each element left (all of them without vec4).
template <class Quad, class One>
__device__ __forceinline__ void GridStride(size_t n, bool vec4, Quad quad, One one) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (vec4) {
    for (; i < n / 4; i += stride) quad(i);
    i = n / 4 * 4 + (i - n / 4);  // this thread's first element of the tail: the tail is n % 4 < stride
  }
  for (; i < n; i += stride) one(i);
}

// Runs right before a cuBLAS matmul that reads `out`, so it does not let the next kernel launch
// early: whether cuBLAS launches its kernels with programmatic serialization, and whether they wait
// before reading their inputs, is not documented (a precaution, see cuda_launch.cuh).
__global__ void F32ToBf16Kernel(const float* x, size_t n, __nv_bfloat16* out, bool vec4, bool next_early) {
  if (next_early) LetNextKernelLaunch();
  WaitForPreviousKernel();
  GridStride(
      n, vec4,
      [&](size_t q) {
        const float4 v = reinterpret_cast<const float4*>(x)[q];
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out) + 2 * q;
        o[0] = __floats2bfloat162_rn(v.x, v.y);
        o[1] = __floats2bfloat162_rn(v.z, v.w);
      },
      [&](size_t i) { out[i] = __float2bfloat16_rn(x[i]); });
}

// f(k, i) for this thread's elements i = threadIdx.x + k * blockDim.x of a row of dim (< kNormMaxPerThread
// of them), with k a constant after unrolling, so arrays indexed by k stay in registers.
constexpr int kNormMaxPerThread = 8;
template <class F>
__device__ __forceinline__ void ForThreadElements(int dim, F f) {
#pragma unroll
  for (int k = 0; k < kNormMaxPerThread; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < dim) f(k, i);
  }
}

// RMSNorm of a row (one block per row), x += y first when y is given (Add followed by RmsNorm in
// one pass, the same arithmetic as the two kernels). late (DYN_CUDA_LATE bit 1, where the row fits
// in kNormMaxPerThread elements a thread): the norm weight is loaded before the wait (it is a
// weight), the row is kept in registers (its loads issued together, and no second read of x after
// the reduction: the store to x evicts it from L1, so that was an L2 round trip on the critical
// path), and the next kernel launches only once the row has been read, so the next GEMV's early
// weight loads do not queue ahead of this kernel's loads.
__global__ void RmsNormKernel(float* x, const float* y, const float* w, int dim, float eps, float* out, bool late) {
  late = late && dim <= kNormMaxPerThread * static_cast<int>(blockDim.x);
  float wv[kNormMaxPerThread], xv[kNormMaxPerThread];
  if (late) ForThreadElements(dim, [&](int k, int i) { wv[k] = w[i]; });
  if (!late) LetNextKernelLaunch();
  WaitForPreviousKernel();
  __shared__ float partial[32];
  __shared__ float scale_shared;
  float* xr = x + blockIdx.x * int64_t{dim};
  const float* yr = y != nullptr ? y + blockIdx.x * int64_t{dim} : nullptr;
  float ss = 0.0f;
  if (late) {
    ForThreadElements(dim, [&](int k, int i) { xv[k] = xr[i]; });
    if (yr != nullptr) {
      ForThreadElements(dim, [&](int k, int i) {
        xv[k] += yr[i];
        xr[i] = xv[k];
      });
    }
    ForThreadElements(dim, [&](int k, int) { ss = fmaf(xv[k], xv[k], ss); });
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = xr[i];
      if (yr != nullptr) {
        v += yr[i];
        xr[i] = v;
      }
      ss = fmaf(v, v, ss);
    }
  }
  ss = WarpSum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  if (late) LetNextKernelLaunch();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += partial[i];
    scale_shared = RmsScale(total, dim, eps);
  }
  __syncthreads();
  const float scale = scale_shared;
  float* o = out + blockIdx.x * int64_t{dim};
  if (late) {
    ForThreadElements(dim, [&](int k, int i) { o[i] = __fmul_rn(__fmul_rn(xv[k], scale), wv[k]); });
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
  }
  BlockTraceEnd();
}

__global__ void GatherRowsKernel(const float* x, int dim, const uint32_t* rows, float* out) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const float* src = x + rows[blockIdx.x] * int64_t{dim};
  float* dst = out + blockIdx.x * int64_t{dim};
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

__global__ void AddBiasKernel(float* x, int64_t total, int n, const float* bias) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x)
    x[i] += bias[i % n];
}

__global__ void AddKernel(float* x, const float* y, size_t n) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) x[i] += y[i];
}

__global__ void SwiGluKernel(const float* gate, const float* up, size_t n, float* out, bool vec4) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  GridStride(
      n, vec4,
      [&](size_t q) {
        const float4 g = reinterpret_cast<const float4*>(gate)[q], u = reinterpret_cast<const float4*>(up)[q];
        reinterpret_cast<float4*>(out)[q] = make_float4(SiluMul(g.x, u.x), SiluMul(g.y, u.y), SiluMul(g.z, u.z), SiluMul(g.w, u.w));
      },
      [&](size_t i) { out[i] = SiluMul(gate[i], up[i]); });
}

__global__ void RopeTableKernel(const int32_t* positions, int m, const float* inv_freq, int half, float* cos_sin) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int total = m * half;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const int i = t / half, j = t % half;
    const float angle = __fmul_rn(static_cast<float>(positions[i]), inv_freq[j]);
    float s, c;
    sincosf(angle, &s, &c);
    cos_sin[2 * t] = c;
    cos_sin[2 * t + 1] = s;
  }
}

// One thread per (row, head, pair).
__global__ void RopeKernel(float* x, int m, int heads, int head_dim, const float* cos_sin, bool neox) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int half = head_dim / 2;
  const int64_t per_row = int64_t{heads} * half, total = m * per_row;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < total; t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = t / per_row;
    RotatePair(x + row * heads * head_dim, static_cast<int>(t % per_row), head_dim, cos_sin + row * half * 2, neox);
  }
}

// One block per row: at decode batch sizes the rows are few, so a wide block keeps each row short.
int NormThreads(int dim) {
  if (dim >= 4096) return 1024;
  if (dim >= 1024) return 256;
  if (dim >= 256) return 128;
  if (dim >= 64) return 64;
  return 32;
}

}  // namespace

int RmsNormThreads(int dim) { return NormThreads(dim); }

void Embedding(cudaStream_t stream, DType dtype, const void* table, int64_t cols, const uint32_t* ids, const uint32_t* sampled, int n,
               float* out) {
  if (n == 0) return;
  LaunchKernel(EmbeddingKernel, n, 256, 0, stream, dtype, static_cast<const uint8_t*>(table), RowBytes(dtype, cols), cols, ids, sampled, out);
  DYN_CUDA_CHECK_LAUNCH();
}

void ConvertToBf16(cudaStream_t stream, DType dtype, const void* src, int64_t rows, int64_t cols, uint16_t* dst) {
  LaunchKernel(ConvertToBf16Kernel, Blocks(rows * cols, 256), 256, 0, stream, dtype, static_cast<const uint8_t*>(src),
                                                                    RowBytes(dtype, cols), rows, cols,
                                                                    reinterpret_cast<__nv_bfloat16*>(dst));
  DYN_CUDA_CHECK_LAUNCH();
}

void FillRandomBf16(cudaStream_t stream, uint16_t* dst, size_t n, uint64_t seed, float scale) {
  LaunchKernel(FillRandomBf16Kernel, Blocks(n, 256), 256, 0, stream, reinterpret_cast<__nv_bfloat16*>(dst), n, seed, scale);
  DYN_CUDA_CHECK_LAUNCH();
}

#ifdef DYN_CUDA_BLOCK_TRACE
namespace {
std::vector<void (*)(BlockTrace*)>& BlockTraceSetters() {
  static std::vector<void (*)(BlockTrace*)> setters;
  return setters;
}
BlockTrace g_trace_host;           // device pointers
BlockTrace* g_trace_dev = nullptr;  // the struct on the device
int g_trace_sms = 0;
}  // namespace

int RegisterBlockTraceSetter(void (*set)(BlockTrace*)) {
  BlockTraceSetters().push_back(set);
  return 0;
}

bool BlockTraceStart() {
  if (g_trace_dev == nullptr) {
    g_trace_sms = MultiprocessorCount();
    g_trace_host.sms = static_cast<unsigned>(g_trace_sms);
    DYN_CUDA_CHECK(cudaMalloc(&g_trace_host.counts, sizeof(unsigned) * g_trace_sms));
    DYN_CUDA_CHECK(cudaMalloc(&g_trace_host.records, sizeof(BlockTraceRecord) * kBlockTracePerSm * g_trace_sms));
    DYN_CUDA_CHECK(cudaMalloc(&g_trace_dev, sizeof(BlockTrace)));
    DYN_CUDA_CHECK(cudaMemcpy(g_trace_dev, &g_trace_host, sizeof(BlockTrace), cudaMemcpyHostToDevice));
  }
  DYN_CUDA_CHECK(cudaDeviceSynchronize());
  DYN_CUDA_CHECK(cudaMemset(g_trace_host.counts, 0, sizeof(unsigned) * g_trace_sms));
  for (auto set : BlockTraceSetters()) set(g_trace_dev);
  DYN_CUDA_CHECK(cudaDeviceSynchronize());
  return true;
}

bool BlockTraceStop(const char* path) {
  DYN_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto set : BlockTraceSetters()) set(nullptr);
  std::vector<unsigned> counts(g_trace_sms);
  DYN_CUDA_CHECK(cudaMemcpy(counts.data(), g_trace_host.counts, sizeof(unsigned) * g_trace_sms, cudaMemcpyDeviceToHost));
  std::vector<BlockTraceRecord> all, sm(kBlockTracePerSm);
  size_t dropped = 0;
  for (int s = 0; s < g_trace_sms; ++s) {
    const unsigned n = std::min(counts[s], kBlockTracePerSm);
    dropped += counts[s] - n;
    DYN_CUDA_CHECK(cudaMemcpy(sm.data(), g_trace_host.records + size_t{kBlockTracePerSm} * s, sizeof(BlockTraceRecord) * n,
                              cudaMemcpyDeviceToHost));
    all.insert(all.end(), sm.begin(), sm.begin() + n);
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.released_ns < b.released_ns; });
  FILE* f = std::fopen(path, "w");
  if (f == nullptr) return false;
  std::fprintf(f, "resident_ns,released_ns,ended_ns,mark0_ns,mark1_ns,mark2_ns,grid,threads,sm\n");
  const unsigned long long t0 = all.empty() ? 0 : all.front().released_ns;
  for (const auto& r : all) {
    auto rel = [t0](unsigned long long t) { return t == 0 ? -1LL : static_cast<long long>(t - t0); };
    std::fprintf(f, "%lld,%lld,%lld,%lld,%lld,%lld,%u,%u,%u\n", rel(r.resident_ns), rel(r.released_ns), rel(r.ended_ns), rel(r.mark_ns[0]),
                 rel(r.mark_ns[1]), rel(r.mark_ns[2]), r.grid, r.threads & 0xffffu, r.threads >> 16);
  }
  std::fclose(f);
  std::fprintf(stderr, "block trace: %zu blocks (%zu dropped) -> %s\n", all.size(), dropped, path);
  return true;
}
#else
bool BlockTraceStart() { return false; }
bool BlockTraceStop(const char*) { return false; }
#endif

void ReadOnce(cudaStream_t stream, const void* p, size_t bytes, unsigned blocks, int threads, unsigned* sink) {
  LaunchKernel(ReadOnceKernel, blocks, threads, 0, stream, static_cast<const uint4*>(p), bytes / 16, sink);
  DYN_CUDA_CHECK_LAUNCH();
}

// Waits for the previous kernel and lets the next one start only when it has finished.
static __global__ void BeforeLibraryCallKernel() { WaitForPreviousKernel(); }

void BeforeLibraryCall(cudaStream_t stream) {
  LaunchKernel(BeforeLibraryCallKernel, 1, 32, 0, stream);
  DYN_CUDA_CHECK_LAUNCH();
}

void F32ToBf16(cudaStream_t stream, const float* x, size_t n, uint16_t* out, bool next_early) {
  const bool vec4 = Vec4(x, out) && reinterpret_cast<uintptr_t>(out) % 8 == 0;
  LaunchKernel(F32ToBf16Kernel, Blocks(vec4 ? (n + 3) / 4 : n, 256), 256, 0, stream, x, n, reinterpret_cast<__nv_bfloat16*>(out), vec4,
               next_early);
  DYN_CUDA_CHECK_LAUNCH();
}

void RmsNorm(cudaStream_t stream, const float* x, const float* w, int64_t rows, int dim, float eps, float* out) {
  if (rows == 0) return;
  LaunchKernel(RmsNormKernel, static_cast<unsigned>(rows), NormThreads(dim), 0, stream, const_cast<float*>(x), nullptr, w, dim, eps, out,
               (LateTrigger() & 1) != 0);
  DYN_CUDA_CHECK_LAUNCH();
}

void AddRmsNorm(cudaStream_t stream, float* x, const float* y, const float* w, int64_t rows, int dim, float eps, float* out) {
  if (rows == 0) return;
  LaunchKernel(RmsNormKernel, static_cast<unsigned>(rows), NormThreads(dim), 0, stream, x, y, w, dim, eps, out, (LateTrigger() & 1) != 0);
  DYN_CUDA_CHECK_LAUNCH();
}

void GatherRows(cudaStream_t stream, const float* x, int dim, const uint32_t* rows, int n, float* out) {
  if (n == 0) return;
  LaunchKernel(GatherRowsKernel, n, 256, 0, stream, x, dim, rows, out);
  DYN_CUDA_CHECK_LAUNCH();
}

void AddBias(cudaStream_t stream, float* x, int m, int n, const float* bias) {
  const int64_t total = int64_t{m} * n;
  if (total == 0) return;
  LaunchKernel(AddBiasKernel, Blocks(total, 256), 256, 0, stream, x, total, n, bias);
  DYN_CUDA_CHECK_LAUNCH();
}

void Add(cudaStream_t stream, float* x, const float* y, size_t n) {
  if (n == 0) return;
  LaunchKernel(AddKernel, Blocks(n, 256), 256, 0, stream, x, y, n);
  DYN_CUDA_CHECK_LAUNCH();
}

void SwiGlu(cudaStream_t stream, const float* gate, const float* up, size_t n, float* out) {
  if (n == 0) return;
  const bool vec4 = Vec4(gate, up, out);
  LaunchKernel(SwiGluKernel, Blocks(vec4 ? (n + 3) / 4 : n, 256), 256, 0, stream, gate, up, n, out, vec4);
  DYN_CUDA_CHECK_LAUNCH();
}

void RopeTable(cudaStream_t stream, const int32_t* positions, int m, const float* inv_freq, int half, float* cos_sin) {
  if (m == 0) return;
  LaunchKernel(RopeTableKernel, Blocks(size_t{1} * m * half, 256), 256, 0, stream, positions, m, inv_freq, half, cos_sin);
  DYN_CUDA_CHECK_LAUNCH();
}

void Rope(cudaStream_t stream, float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style) {
  const size_t total = size_t{1} * m * heads * (head_dim / 2);
  if (total == 0) return;
  LaunchKernel(RopeKernel, Blocks(total, 256), 256, 0, stream, x, m, heads, head_dim, cos_sin, style == RopeStyle::kNeox);
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
