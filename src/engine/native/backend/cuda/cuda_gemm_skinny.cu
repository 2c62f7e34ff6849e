// Skinny GEMM for small decode batches (2 <= m <= 8): out[m][rows] = x[m][cols] * w^T, bf16 w and
// x (x converted once by the caller), F32 accumulation and output, on the tensor cores.
//
// Why: a decode step at batch m reads every weight once and does 2 m FLOP per weight, so it should
// take about as long as batch 1. cuBLAS streams the weights at 2-4 TB/s at these shapes, and the
// m = 1 GEMV re-reads x per activation row. Here a block of 8 warps owns 16 output rows; warp w
// takes every 8th 32-column chunk of them. Per chunk a lane loads 16 bytes of weight row g and of
// row g + 8 (g = lane / 4) and 16 bytes of x row g, and issues two mma.m16n8k16 (bf16 in, F32
// accumulate): the weight is read once for all m rows, with one 16-byte load per lane and row.
// The K order inside a chunk is permuted the same way for both operands (lane t of a row group
// holds physical columns 8t..8t+7), which leaves each dot product whole. The warps' partial
// 16 x 8 tiles are summed in shared memory in a fixed order (deterministic).
#include <cuda_runtime.h>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerBlock = 16;
constexpr int kUnroll = 4;  // chunks per warp with their loads in flight together

// d += a (16 x 16, row) * b (16 x 8, col): bf16 in, F32 accumulate.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-column chunk: lo/hi are 16 bytes of weight rows g and g + 8, xb 16 bytes of x row g.
__device__ __forceinline__ void MmaChunk(float (&d)[4], const uint4& lo, const uint4& hi, const uint4& xb) {
  Mma(d, lo.x, hi.x, lo.y, hi.y, xb.x, xb.y);
  Mma(d, lo.z, hi.z, lo.w, hi.w, xb.z, xb.w);
}

__global__ void __launch_bounds__(kWarps * 32) SkinnyGemmKernel(const uint16_t* __restrict__ x, int m, GemvJobs jobs, int64_t cols) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint16_t* w;
  float* out;
  int64_t rows;
  unsigned first;
  PickJob(jobs, w, out, rows, first);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x - first) * kRowsPerBlock;
  const int64_t r_lo = min(row0 + g, rows - 1), r_hi = min(row0 + g + 8, rows - 1);  // past the end: a valid row, not written
  const int64_t chunks = cols / 32, n16 = cols / 8;  // 16-byte units per row
  const uint4* wlo = reinterpret_cast<const uint4*>(w) + r_lo * n16 + t;
  const uint4* whi = reinterpret_cast<const uint4*>(w) + r_hi * n16 + t;
  const uint4* xr = reinterpret_cast<const uint4*>(x) + static_cast<int64_t>(min(g, m - 1)) * n16 + t;
  const bool x_live = g < m;

  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t c = warp;  // this warp's chunks: c, c + kWarps, ...
  uint4 lo[kUnroll], hi[kUnroll];
  // Weights depend on no kernel: the first loads are issued before waiting for the previous one.
  const bool full = c + (kUnroll - 1) * kWarps < chunks;
  if (full) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      lo[u] = LoadStreaming(wlo + (c + u * kWarps) * 4);
      hi[u] = LoadStreaming(whi + (c + u * kWarps) * 4);
    }
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  if (full) {
    while (true) {
      uint4 xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) xv[u] = x_live ? __ldg(xr + (c + u * kWarps) * 4) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) MmaChunk(d, lo[u], hi[u], xv[u]);
      c += kUnroll * kWarps;
      if (c + (kUnroll - 1) * kWarps >= chunks) break;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        lo[u] = LoadStreaming(wlo + (c + u * kWarps) * 4);
        hi[u] = LoadStreaming(whi + (c + u * kWarps) * 4);
      }
    }
  }
  for (; c < chunks; c += kWarps) {
    const uint4 xv = x_live ? __ldg(xr + c * 4) : make_uint4(0, 0, 0, 0);
    MmaChunk(d, LoadStreaming(wlo + c * 4), LoadStreaming(whi + c * 4), xv);
  }

  // d: (row g, x rows 2t, 2t + 1), (row g + 8, the same); warps summed in order.
  __shared__ float partial[kWarps][32][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = d[i];
  __syncthreads();
  if (warp != 0) return;
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int wi = 0; wi < kWarps; ++wi) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] += partial[wi][lane][i];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = 2 * t + (i & 1);
    const int64_t row = row0 + g + (i >= 2 ? 8 : 0);
    if (n < m && row < rows) out[n * rows + row] = s[i];
  }
}

}  // namespace

bool SkinnyGemmApplies(int m, int64_t cols) { return m >= 1 && m <= kSkinnyMaxRows && cols % 32 == 0 && cols > 0; }

void SkinnyGemmBf16(cudaStream_t stream, const uint16_t* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                    int64_t cols, float* const* out) {
  if (!SkinnyGemmApplies(m, cols) || count < 1 || count > kGemvMaxJobs) {
    Check(cudaErrorInvalidValue, "SkinnyGemmBf16: shape", __FILE__, __LINE__);
  }
  int64_t blocks = 0;
  const GemvJobs jobs = MakeGemvJobs(count, w, rows, out, kRowsPerBlock, &blocks);
  if (blocks == 0) return;
  LaunchKernel(SkinnyGemmKernel, static_cast<unsigned>(blocks), kWarps * 32, 0, stream, x, m, jobs, cols);
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
