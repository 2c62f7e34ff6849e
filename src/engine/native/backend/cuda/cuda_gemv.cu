// bf16-weight GEMV for decode-sized batches (m <= 8): out[m][rows] = x[m][cols] * w^T.
//
// A decode step reads every weight once and does 2 * m FLOP per weight, so it is bound by memory
// bandwidth; cuBLAS's GEMM kernels at m = 1 leave a good part of it unused. Each output row is
// streamed by one group of kWarpsPerRow warps: the lanes read the row with 16-byte loads (8 bf16
// each, kUnroll loads in flight per lane, not kept in L1), multiply with the F32 activations
// (served from L1/L2) and reduce with warp shuffles and a little shared memory. The weight is read
// once for all m activation rows; several weights that share x (Q/K/V) run as one launch, and
// gate/up can end in SwiGLU in the same kernel. With programmatic dependent launch the first
// weight loads of each block are issued before the previous kernel has finished.
//
// At m = 1 the default is GemvRowsKernel: one group of 4 warps takes 2 rows (or a gate/up pair)
// and loads each x chunk once for both. x's L1 loads (two 16-byte loads a lane for each 16-byte
// weight load) limit the stream as much as HBM does, so halving them took a batch-1 step of the
// 8B shape from 4.45-4.47 to 4.27-4.32 ms on an H200 (docs/benchmarks/cuda.md, round 16).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_gemv_stream.cuh"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

using gemv::HasFirstGroup;
using gemv::kStride;
using gemv::kUnroll;
using gemv::kWarpsPerRow;
using gemv::LoadGroup;
using gemv::StreamChunks;

constexpr int kRowsPerBlock = 2;  // SwiGLU (gate and up rows together) and m > 1
// Output rows per block of a non-SwiGLU GemvBf16Kernel launch: the block count and the kernel's R
// follow it. One at m = 1: measured on an H200 (docs/benchmarks/cuda.md, round 6), one row per
// block streams the down projection (28 KB rows) at 4.08 TB/s instead of 3.67 (two 28 KB rows kept
// a block ~9 us, so the grid's last blocks left SMs idle longer), the o projection 2% faster.
int RowsPerBlock(int m) { return m == 1 ? 1 : kRowsPerBlock; }
// The lane's first group of chunks (when `live` and the row has one) loaded before the wait for
// the previous kernel: weights do not depend on it, so with programmatic dependent launch the loads
// overlap its tail. Returns whether the group was loaded (StreamChunks' first_group).
template <class Chunk, class Load>
__device__ __forceinline__ bool LoadFirstGroupThenWait(bool live, int64_t c, int64_t n8, Chunk (&held)[kUnroll], Load load) {
  const bool first_group = live && HasFirstGroup(c, n8);
  if (first_group) LoadGroup(c, held, load);
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  return first_group;
}

template <int M>
__device__ __forceinline__ void Accumulate(const uint4& wv, const float* __restrict__ x, int64_t cols, int64_t c8,
                                           float (&acc)[M]) {
  float w[8];
  Bf16x8ToFloat(wv, w);
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
  const uint4* wr = reinterpret_cast<const uint4*>(wj) + (live ? row : 0) * n8;
  const int64_t c = part * 32 + lane;
  auto load = [&](int64_t at, uint4& v) { v = LoadStreaming(wr + at); };
  uint4 wv[kUnroll];
  const bool first_group = LoadFirstGroupThenWait(live, c, n8, wv, load);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  if (live) StreamChunks(c, n8, first_group, wv, load, [&](const uint4& v, int64_t at) { Accumulate<M>(v, x, cols, at, acc); });
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
      jobs.swiglu_out[i] = SiluMul(g, u);  // may alias gate
    }
  } else if (part == 0 && lane < M && live) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarpsPerRow; ++p) s += partial[row_in_block][p][lane];
    outj[lane * rows + row] = s;
  }
  BlockTraceEnd();
}

// m = 1 with R rows a 4-warp block that share each x chunk (SetGemvRowsSharingX): the one-row
// kernel loads x once a row, and those L1 loads (2 x 16 bytes for each 16-byte weight load) bound
// the stream as much as HBM does; R rows a block load x once for R weight loads (measured on an
// H200: round 16 in docs/benchmarks/cuda.md). Every row keeps the one-row kernel's per-thread chunk
// order and reductions, so the sums are bitwise the same. kSwiGlu: R / 2 (gate, up) pairs of
// consecutive rows, the gate row first, and SwiGLU as GemvBf16Kernel computes it.
template <int R>
__device__ __forceinline__ void AccumulateRows(const uint4 (&wv)[R], const float* __restrict__ x, int64_t c8, float (&acc)[R]) {
  const float4* xp = reinterpret_cast<const float4*>(x + c8 * 8);
  FmaChunk<R>(wv, __ldg(xp), __ldg(xp + 1), acc);
}

template <bool kSwiGlu, int R>
__global__ void __launch_bounds__(kWarpsPerRow * 32) GemvRowsKernel(const float* __restrict__ x, GemvJobs jobs, int64_t cols) {
  static_assert(R >= 2 && (!kSwiGlu || R % 2 == 0));
  const int part = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n8 = cols / 8;
  const uint16_t* wj = jobs.w[0];
  float* outj = jobs.out[0];
  int64_t rows = jobs.rows[0], first_row;
  if constexpr (kSwiGlu) {
    first_row = int64_t{blockIdx.x} * (R / 2);
  } else {
    unsigned first;
    PickJob(jobs, wj, outj, rows, first);
    first_row = int64_t{blockIdx.x - first} * R;
  }
  // Slot r reads row first_row + r (kSwiGlu: row first_row + r / 2 of gate, r even, or up); the
  // slots past a weight's last row read the block's first row again and write nothing. Offsets
  // from one or two base pointers, so the slots cost no registers of their own.
  const uint4* base0 = reinterpret_cast<const uint4*>(wj) + first_row * n8;
  const uint4* base1 = reinterpret_cast<const uint4*>(kSwiGlu ? jobs.w[1] : wj) + first_row * n8;
  auto slot = [&](int r) {
    const int k = kSwiGlu ? r / 2 : r;
    const uint4* base = kSwiGlu && r % 2 == 1 ? base1 : base0;
    return k == 0 || first_row + k < rows ? base + k * n8 : base;
  };
  const int64_t c = part * 32 + lane;
  auto load = [&](int64_t at, uint4 (&v)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = LoadStreaming(slot(r) + at);
  };
  uint4 wv[kUnroll][R];
  const bool first_group = LoadFirstGroupThenWait(true, c, n8, wv, load);
  // The residual this block's rows are added to (GemvBf16Residual), loaded now that the previous
  // kernel is done, so its latency hides behind the weight stream.
  float res = 0.0f;
  if (!kSwiGlu && jobs.residual != nullptr && threadIdx.x < R && first_row + threadIdx.x < rows) {
    res = LoadNow(jobs.residual + first_row + threadIdx.x);
  }
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  StreamChunks(c, n8, first_group, wv, load, [&](const uint4 (&v)[R], int64_t at) { AccumulateRows<R>(v, x, at, acc); });
  __shared__ float partial[R][kWarpsPerRow];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[r][part] = v;
  }
  __syncthreads();
  if constexpr (kSwiGlu) {
    const int i = threadIdx.x;  // pair i: slots 2i (gate) and 2i + 1 (up)
    if (i < R / 2 && first_row + i < rows) {
      float g = 0.0f, u = 0.0f;
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) g += partial[2 * i][p];
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) u += partial[2 * i + 1][p];
      const int64_t row = first_row + i;
      jobs.out[0][row] = g;
      jobs.out[1][row] = u;
      jobs.swiglu_out[row] = SiluMul(g, u);
    }
  } else {
    const int r = threadIdx.x;
    if (r < R && first_row + r < rows) {
      float s = 0.0f;
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) s += partial[r][p];
      outj[first_row + r] = s;
      if (jobs.residual != nullptr) jobs.residual[first_row + r] = res + s;  // AddKernel's x + y
    }
  }
  BlockTraceEnd();
}

// Rows a GemvRowsKernel block takes at m = 1 (0: GemvBf16Kernel, a row a group of 4 warps). 2 for
// both (round 16: 4.27-4.32 ms a batch-1 step at context 512 against 4.45-4.47; 4 level with 2).
int g_rows_sharing_x = 2, g_swiglu_rows_sharing_x = 2;

template <bool kSwiGlu>
void LaunchRows(cudaStream_t stream, int r, const float* x, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  if (r == 4) {
    LaunchKernel(GemvRowsKernel<kSwiGlu, 4>, blocks, kWarpsPerRow * 32, 0, stream, x, jobs, cols);
  } else {
    LaunchKernel(GemvRowsKernel<kSwiGlu, 2>, blocks, kWarpsPerRow * 32, 0, stream, x, jobs, cols);
  }
}

template <int M, bool kSwiGlu = false>
void Launch(cudaStream_t stream, const float* x, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  if constexpr (!kSwiGlu && M == 1) {
    LaunchKernel(GemvBf16Kernel<M, kSwiGlu, 1>, blocks, kWarpsPerRow * 32, 0, stream, x, jobs, cols);
  } else {
    LaunchKernel(GemvBf16Kernel<M, kSwiGlu>, blocks, kWarpsPerRow * kRowsPerBlock * 32, 0, stream, x, jobs, cols);
  }
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

void SetGemvRowsSharingX(int rows, int swiglu_rows) {
  auto valid = [](int r) { return r == 2 || r == 4 ? r : 0; };
  g_rows_sharing_x = valid(rows);
  g_swiglu_rows_sharing_x = valid(swiglu_rows);
}
void SetGemvRowsSharingX(const char* spec) {
  int rows = 2, swiglu_rows = 2;
  const int n = std::sscanf(spec, "%d,%d", &rows, &swiglu_rows);
  SetGemvRowsSharingX(rows, n >= 2 ? swiglu_rows : rows);
}

void GemvBf16Multi(cudaStream_t stream, const float* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                   int64_t cols, float* const* out) {
  if (count < 1 || count > kGemvMaxJobs) Check(cudaErrorInvalidValue, "GemvBf16Multi: job count", __FILE__, __LINE__);
  int64_t blocks = 0;
  if (const int r = m == 1 ? g_rows_sharing_x : 0; r >= 2) {
    const GemvJobs jobs = MakeGemvJobs(count, w, rows, out, r, &blocks);
    LaunchRows<false>(stream, r, x, jobs, cols, static_cast<unsigned>(blocks));
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

bool GemvResidualApplies() { return g_rows_sharing_x >= 2; }

void GemvBf16Residual(cudaStream_t stream, const float* x, const uint16_t* w, int64_t rows, int64_t cols, float* out, float* residual) {
  if (!GemvResidualApplies()) Check(cudaErrorInvalidValue, "GemvBf16Residual: needs rows sharing x", __FILE__, __LINE__);
  int64_t blocks = 0;
  GemvJobs jobs = MakeGemvJobs(1, &w, &rows, &out, g_rows_sharing_x, &blocks);
  jobs.residual = residual;
  LaunchRows<false>(stream, g_rows_sharing_x, x, jobs, cols, static_cast<unsigned>(blocks));
  DYN_CUDA_CHECK_LAUNCH();
}

void GemvBf16SwiGlu(cudaStream_t stream, const float* x, int m, const uint16_t* w_gate, const uint16_t* w_up, int64_t rows,
                    int64_t cols, float* gate, float* up, float* out) {
  const GemvJobs jobs = GateUpJobs(w_gate, w_up, rows, gate, up, out);
  if (const int r = m == 1 ? g_swiglu_rows_sharing_x : 0; r >= 2) {
    const int64_t pairs = r / 2;
    LaunchRows<true>(stream, r, x, jobs, cols, static_cast<unsigned>((rows + pairs - 1) / pairs));
    DYN_CUDA_CHECK_LAUNCH();
    return;
  }
  LaunchAnyM<true>(stream, x, m, jobs, cols, static_cast<unsigned>(rows));
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
