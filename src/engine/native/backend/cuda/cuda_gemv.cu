// bf16-weight GEMV for decode-sized batches (m <= 8): out[m][rows] = x[m][cols] * w^T.
//
// A decode step reads every weight once and does 2 * m FLOP per weight, so it is bound by memory
// bandwidth; cuBLAS's GEMM kernels at m = 1 leave a good part of it unused. Here each output row
// is one group of kWarpsPerRow warps: the lanes stream the row with 16-byte loads (8 bf16 each,
// kUnroll loads in flight per lane, not kept in L1), multiply with the F32 activations (small,
// served from L1/L2) and reduce with warp shuffles and a little shared memory. The weight is read
// once for all m activation rows; several weights that share x (Q/K/V) run as one launch, and
// gate/up can end in SwiGLU in the same kernel. With programmatic dependent launch the first
// weight loads of each block are issued before the previous kernel has finished.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

constexpr int kWarpsPerRow = 4;
constexpr int kRowsPerBlock = 2;  // SwiGLU (gate and up rows together) and m > 1
// Rows per block at m = 1 without SwiGLU (SetGemvRowsPerBlock). Measured on an H200
// (docs/benchmarks/cuda.md, round 6): one row per block streams the down projection (28 KB rows)
// at 4.08 TB/s instead of 3.67 (two 28 KB rows kept a block ~9 us, so the grid's last blocks left
// SMs idle longer), the o projection 2% faster, Q/K/V and the LM head level.
int g_rows_at_m1 = 1;
// Output rows per block of a non-SwiGLU launch: the block count and the kernel's R follow it.
int RowsPerBlock(int m) { return m == 1 ? g_rows_at_m1 : kRowsPerBlock; }
constexpr int kUnroll = 4;

template <int M>
__device__ __forceinline__ void Accumulate(const uint4& wv, const float* __restrict__ x, int64_t cols, int64_t c8,
                                           float (&acc)[M]) {
  float w[8];
  Bf16x2ToFloat(wv.x, w[0], w[1]);
  Bf16x2ToFloat(wv.y, w[2], w[3]);
  Bf16x2ToFloat(wv.z, w[4], w[5]);
  Bf16x2ToFloat(wv.w, w[6], w[7]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float4* xp = reinterpret_cast<const float4*>(x + m * cols + c8 * 8);
    const float4 a = __ldg(xp), b = __ldg(xp + 1);
    acc[m] = fmaf(w[0], a.x, acc[m]);
    acc[m] = fmaf(w[1], a.y, acc[m]);
    acc[m] = fmaf(w[2], a.z, acc[m]);
    acc[m] = fmaf(w[3], a.w, acc[m]);
    acc[m] = fmaf(w[4], b.x, acc[m]);
    acc[m] = fmaf(w[5], b.y, acc[m]);
    acc[m] = fmaf(w[6], b.z, acc[m]);
    acc[m] = fmaf(w[7], b.w, acc[m]);
  }
}

// kSwiGlu: jobs are (gate, up) of equal rows; block b computes row b of both (row_in_block 0: gate,
// 1: up) and also writes silu(gate) * up to jobs.swiglu_out.
template <int M, bool kSwiGlu, int R = kRowsPerBlock>
__global__ void __launch_bounds__(kWarpsPerRow * R * 32)
    GemvBf16Kernel(const float* __restrict__ x, GemvJobs jobs, int64_t cols) {
  static_assert(!kSwiGlu || R == 2);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_block = warp / kWarpsPerRow, part = warp % kWarpsPerRow;
  // Constant indices only, so the parameter struct is not copied to local memory.
  const uint16_t* wj = jobs.w[0];
  float* outj = jobs.out[0];
  int64_t rows = jobs.rows[0];
  int64_t row;
  if constexpr (kSwiGlu) {
    if (row_in_block == 1) wj = jobs.w[1];
    row = blockIdx.x;
  } else {
    // A block never straddles two weights (each weight's block range is rounded up).
    unsigned first;
    PickJob(jobs, wj, outj, rows, first);
    row = (blockIdx.x - first) * int64_t{R} + row_in_block;
  }
  const bool live = row < rows;
  const int64_t n8 = cols / 8;
  constexpr int kStride = kWarpsPerRow * 32;
  const uint4* wr = reinterpret_cast<const uint4*>(wj) + (live ? row : 0) * n8;
  int64_t c = part * 32 + lane;
  // The weights do not depend on the previous kernel: the first kUnroll loads are issued before
  // waiting for it (programmatic dependent launch), so they overlap its tail.
  uint4 wv[kUnroll];
  const bool first_group = live && c + (kUnroll - 1) * kStride < n8;
  if (first_group) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wv[u] = LoadStreaming(wr + c + u * kStride);
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  if (first_group) {
    while (true) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) Accumulate<M>(wv[u], x, cols, c + u * kStride, acc);
      c += kUnroll * kStride;
      if (c + (kUnroll - 1) * kStride >= n8) break;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) wv[u] = LoadStreaming(wr + c + u * kStride);
    }
  }
  if (live) {
    for (; c < n8; c += kStride) Accumulate<M>(LoadStreaming(wr + c), x, cols, c, acc);
  }
  __shared__ float partial[R][kWarpsPerRow][M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[row_in_block][part][m] = v;
  }
  __syncthreads();
  if constexpr (kSwiGlu) {
    if (row_in_block == 0 && part == 0 && lane < M && live) {
      float g = 0.0f, u = 0.0f;
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) g += partial[0][p][lane];
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) u += partial[1][p][lane];
      const int64_t i = lane * rows + row;
      jobs.out[0][i] = g;
      jobs.out[1][i] = u;
      jobs.swiglu_out[i] = __fmul_rn(g / (1.0f + expf(-g)), u);  // SwiGluKernel's arithmetic; may alias gate
    }
  } else if (part == 0 && lane < M && live) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarpsPerRow; ++p) s += partial[row_in_block][p][lane];
    outj[lane * rows + row] = s;
  }
  BlockTraceEnd();
}

// m = 1 gate/up + SwiGLU with one group of 4 warps a block taking both rows (SetSwiGluPair): each
// x chunk is loaded once for the two products (the 8-warp kernel's halves load it each), and a
// block holds both rows' first loads before its wait. Each row's chunk order and reductions are
// the 8-warp kernel's, so the sums are bitwise the same.
__device__ __forceinline__ void AccumulatePair(const uint4& gv, const uint4& uv, const float* __restrict__ x, int64_t c8, float& ag,
                                               float& au) {
  float g[8], u[8];
  Bf16x2ToFloat(gv.x, g[0], g[1]);
  Bf16x2ToFloat(gv.y, g[2], g[3]);
  Bf16x2ToFloat(gv.z, g[4], g[5]);
  Bf16x2ToFloat(gv.w, g[6], g[7]);
  Bf16x2ToFloat(uv.x, u[0], u[1]);
  Bf16x2ToFloat(uv.y, u[2], u[3]);
  Bf16x2ToFloat(uv.z, u[4], u[5]);
  Bf16x2ToFloat(uv.w, u[6], u[7]);
  const float4* xp = reinterpret_cast<const float4*>(x + c8 * 8);
  const float4 a = __ldg(xp), b = __ldg(xp + 1);
  const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    ag = fmaf(g[k], xs[k], ag);
    au = fmaf(u[k], xs[k], au);
  }
}

// !kSwiGlu (SetGemvPair): two consecutive rows of one weight (a weight's odd last row alone), as
// the one-row kernel computes each.
template <bool kSwiGlu>
__global__ void __launch_bounds__(kWarpsPerRow * 32) GemvPairKernel(const float* __restrict__ x, GemvJobs jobs, int64_t cols) {
  const int part = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n8 = cols / 8;
  constexpr int kStride = kWarpsPerRow * 32;
  int64_t row = blockIdx.x, row2 = row;
  const uint16_t* w0 = jobs.w[0];
  const uint16_t* w1 = jobs.w[1];
  float* out0 = jobs.out[0];
  bool second = true;
  if constexpr (!kSwiGlu) {
    int64_t rows;
    unsigned first;
    PickJob(jobs, w0, out0, rows, first);
    row = (blockIdx.x - first) * int64_t{2};
    second = row + 1 < rows;
    row2 = second ? row + 1 : row;
    w1 = w0;
  }
  const uint4* wg = reinterpret_cast<const uint4*>(w0) + row * n8;
  const uint4* wu = reinterpret_cast<const uint4*>(w1) + row2 * n8;
  int64_t c = part * 32 + lane;
  uint4 vg[kUnroll], vu[kUnroll];
  const bool first_group = c + (kUnroll - 1) * kStride < n8;
  if (first_group) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      vg[u] = LoadStreaming(wg + c + u * kStride);
      vu[u] = LoadStreaming(wu + c + u * kStride);
    }
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  float ag = 0.0f, au = 0.0f;
  if (first_group) {
    while (true) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) AccumulatePair(vg[u], vu[u], x, c + u * kStride, ag, au);
      c += kUnroll * kStride;
      if (c + (kUnroll - 1) * kStride >= n8) break;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        vg[u] = LoadStreaming(wg + c + u * kStride);
        vu[u] = LoadStreaming(wu + c + u * kStride);
      }
    }
  }
  for (; c < n8; c += kStride) AccumulatePair(LoadStreaming(wg + c), LoadStreaming(wu + c), x, c, ag, au);
  __shared__ float partial[2][kWarpsPerRow];
  for (int o = 16; o > 0; o >>= 1) {
    ag += __shfl_xor_sync(0xffffffffu, ag, o);
    au += __shfl_xor_sync(0xffffffffu, au, o);
  }
  if (lane == 0) {
    partial[0][part] = ag;
    partial[1][part] = au;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float g = 0.0f, u = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarpsPerRow; ++p) g += partial[0][p];
#pragma unroll
    for (int p = 0; p < kWarpsPerRow; ++p) u += partial[1][p];
    if constexpr (kSwiGlu) {
      jobs.out[0][row] = g;
      jobs.out[1][row] = u;
      jobs.swiglu_out[row] = __fmul_rn(g / (1.0f + expf(-g)), u);  // as GemvBf16Kernel
    } else {
      out0[row] = g;
      if (second) out0[row2] = u;
    }
  }
  BlockTraceEnd();
}
bool g_swiglu_pair = false, g_gemv_pair = false;

template <int M, bool kSwiGlu = false>
void Launch(cudaStream_t stream, const float* x, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  if constexpr (!kSwiGlu && M == 1) {
    if (RowsPerBlock(M) == 1) {
      LaunchKernel(GemvBf16Kernel<M, kSwiGlu, 1>, blocks, kWarpsPerRow * 32, 0, stream, x, jobs, cols);
      return;
    }
  }
  LaunchKernel(GemvBf16Kernel<M, kSwiGlu>, blocks, kWarpsPerRow * kRowsPerBlock * 32, 0, stream, x, jobs, cols);
}

template <bool kSwiGlu>
void LaunchAnyM(cudaStream_t stream, const float* x, int m, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  switch (m) {
    case 1: Launch<1, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 2: Launch<2, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 3: Launch<3, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 4: Launch<4, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 5: Launch<5, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 6: Launch<6, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 7: Launch<7, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    case 8: Launch<8, kSwiGlu>(stream, x, jobs, cols, blocks); break;
    default: Check(cudaErrorInvalidValue, "GemvBf16: m out of range", __FILE__, __LINE__);
  }
}

}  // namespace

void SetGemvRowsPerBlock(int rows) { g_rows_at_m1 = rows == 2 ? 2 : 1; }
void SetSwiGluPair(bool on) { g_swiglu_pair = on; }
void SetGemvPair(bool on) { g_gemv_pair = on; }

void GemvBf16Multi(cudaStream_t stream, const float* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                   int64_t cols, float* const* out) {
  if (count < 1 || count > kGemvMaxJobs) Check(cudaErrorInvalidValue, "GemvBf16Multi: job count", __FILE__, __LINE__);
  int64_t blocks = 0;
  if (m == 1 && g_gemv_pair) {
    const GemvJobs jobs = MakeGemvJobs(count, w, rows, out, 2, &blocks);
    LaunchKernel(GemvPairKernel<false>, static_cast<unsigned>(blocks), kWarpsPerRow * 32, 0, stream, x, jobs, cols);
    DYN_CUDA_CHECK_LAUNCH();
    return;
  }
  const GemvJobs jobs = MakeGemvJobs(count, w, rows, out, RowsPerBlock(m), &blocks);
  LaunchAnyM<false>(stream, x, m, jobs, cols, static_cast<unsigned>(blocks));
  DYN_CUDA_CHECK_LAUNCH();
}

void GemvBf16(cudaStream_t stream, const float* x, int m, const uint16_t* w, int64_t rows, int64_t cols, float* out) {
  GemvBf16Multi(stream, x, m, 1, &w, &rows, cols, &out);
}

void GemvBf16SwiGlu(cudaStream_t stream, const float* x, int m, const uint16_t* w_gate, const uint16_t* w_up, int64_t rows,
                    int64_t cols, float* gate, float* up, float* out) {
  GemvJobs jobs{};
  jobs.count = 2;
  jobs.w[0] = w_gate;
  jobs.w[1] = w_up;
  jobs.out[0] = gate;
  jobs.out[1] = up;
  jobs.rows[0] = jobs.rows[1] = rows;
  jobs.swiglu_out = out;
  if (m == 1 && g_swiglu_pair) {
    LaunchKernel(GemvPairKernel<true>, static_cast<unsigned>(rows), kWarpsPerRow * 32, 0, stream, x, jobs, cols);
    DYN_CUDA_CHECK_LAUNCH();
    return;
  }
  LaunchAnyM<true>(stream, x, m, jobs, cols, static_cast<unsigned>(rows));
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
