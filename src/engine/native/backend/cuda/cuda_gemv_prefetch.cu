// The m = 1 GEMV whose whole weight is on chip before its input exists (GemvBf16Prefetched in
// cuda_kernels.h): the o projection after decode attention.
//
// Why: at batch 1 decode attention is ~12 us a layer of latency chains (q and RoPE, the key loop's
// dependent loads, the merges) during which HBM is nearly idle, and the o projection after it then
// streams its 32 MB (8B shape) in ~10 us. Launched early (PDL), this kernel's blocks - one a
// multiprocessor, resident beside attention's - copy their share of the weight into shared memory
// (cp.async, each thread the chunks it will multiply itself, so no barrier is needed) and the rest
// into registers, all before the wait; when attention ends, only the products, a reduction and the
// stores are left. An L2 prefetch of the same bytes was slower (round 18): L2 still has to be read
// at the GEMV's rate afterwards, while here the bytes are already in the multiprocessor.
//
// Layout: thread t of a block takes chunks (8 columns) t, t + 256, ... of each of the block's
// kRows rows; the row sums are reduced across a warp's lanes 16 rows at a time by a reduce-scatter
// (16 shuffles leave lane r with row r's warp sum), then the 8 warps' sums in order. Deterministic, but
// not the one-row kernels' summation order (within rounding of GemvBf16 + Add).
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 32;                      // rows a block
constexpr int kHalf = kRows / 2;               // rows reduced across a warp at once
constexpr int kChunkCols = 8;                  // bf16 columns a 16-byte chunk
constexpr int kRowCols = kThreads * kChunkCols;  // columns a block covers with one chunk a thread
constexpr int kRegChunks = 16;                 // 16-byte chunks a thread holds in registers
// Shared memory a block may take for its rows: beside one decode attention block (~21 KB) on a
// 228 KB multiprocessor.
constexpr int kSharedBudget = 192 * 1024;

__device__ __forceinline__ void CopyAsync16(void* smem, const void* global) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global) : "memory");
}
__device__ __forceinline__ void WaitAllCopies() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// One step of a warp's reduce-scatter of kHalf row sums: each lane keeps the half of its rows
// [0, 2S) that (lane & S) selects, plus its partner's values of them, in acc[0, S). After the steps
// 8, 4, 2, 1, acc[0] is row (lane % 16)'s sum over the lanes of the warp's half.
template <int S>
__device__ __forceinline__ void ReduceScatterStep(float (&acc)[kHalf], int lane) {
  const bool upper = (lane & S) != 0;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const float keep = upper ? acc[j + S] : acc[j], send = upper ? acc[j] : acc[j + S];
    acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, S);
  }
}

// kC chunks a thread per row (cols = kC * kRowCols); rows [0, kShared) of the block's kRows go
// through shared memory, the rest through registers. Rows past the weight's end read its last row
// and write nothing.
template <int kC, int kShared>
__global__ void __launch_bounds__(kThreads, 2)  // <= 128 registers: beside attention's 32K
    GemvPrefetchedKernel(const float* __restrict__ x, const uint16_t* __restrict__ w, int rows, float* out, float* residual) {
  constexpr int kHeld = kRows - kShared;
  static_assert(kHeld * kC <= kRegChunks, "rows held in registers");
  extern __shared__ uint4 s_w[];  // [kShared][kC][kThreads]
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int row0 = static_cast<int>(blockIdx.x) * kRows;
  const uint4* wb = reinterpret_cast<const uint4*>(w);
  auto chunk = [&](int r, int i) {  // this thread's chunk i of block row r
    const int row = min(row0 + r, rows - 1);
    return wb + (static_cast<size_t>(row) * kC + i) * kThreads + t;
  };
#pragma unroll
  for (int r = 0; r < kShared; ++r) {
#pragma unroll
    for (int i = 0; i < kC; ++i) CopyAsync16(&s_w[(r * kC + i) * kThreads + t], chunk(r, i));
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  uint4 held[kHeld > 0 ? kHeld : 1][kC];
#pragma unroll
  for (int r = 0; r < kHeld; ++r) {
#pragma unroll
    for (int i = 0; i < kC; ++i) held[r][i] = LoadStreaming(chunk(kShared + r, i));
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();

  float4 xv[kC][2];
#pragma unroll
  for (int i = 0; i < kC; ++i) {
    const float4* xp = reinterpret_cast<const float4*>(x + (static_cast<size_t>(i) * kThreads + t) * kChunkCols);
    xv[i][0] = xp[0];
    xv[i][1] = xp[1];
  }
  float res = 0.0f;
  if (residual != nullptr && t < kRows && row0 + t < rows) res = LoadNow(residual + row0 + t);

  // Two halves of 16 rows, the half with the register rows first (their registers are free
  // before the shared rows are read); each half's row sums reduced across the warp at once.
  __shared__ float s_sum[kWarps][kRows];
  auto half = [&](auto first_row) {
    constexpr int kFirst = decltype(first_row)::value;
    float acc[kHalf];
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const int r = kFirst + j;
      acc[j] = 0.0f;
#pragma unroll
      for (int i = 0; i < kC; ++i) {
        uint4 one[1];
        if (r < kShared) {
          one[0] = s_w[(r * kC + i) * kThreads + t];
        } else {
          one[0] = held[r >= kShared ? r - kShared : 0][i];
        }
        float a[1] = {acc[j]};
        FmaChunk<1>(one, xv[i][0], xv[i][1], a);
        acc[j] = a[0];
      }
    }
    ReduceScatterStep<8>(acc, lane);
    ReduceScatterStep<4>(acc, lane);
    ReduceScatterStep<2>(acc, lane);
    ReduceScatterStep<1>(acc, lane);
    const float row_sum = acc[0] + __shfl_xor_sync(0xffffffffu, acc[0], 16);  // lanes l and l + 16 held row l % 16
    if (lane < kHalf) s_sum[warp][kFirst + lane] = row_sum;
  };
  WaitAllCopies();  // each thread reads only the chunks it copied itself
  half(std::integral_constant<int, kHalf>{});
  half(std::integral_constant<int, 0>{});
  __syncthreads();
  if (t < kRows && row0 + t < rows) {
    float s = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) s += s_sum[v][t];
    out[row0 + t] = s;
    if (residual != nullptr) residual[row0 + t] = res + s;  // AddKernel's x + y
  }
  BlockTraceEnd();
}

int SharedRows(int64_t cols) { return std::min<int64_t>(kRows, kSharedBudget / (cols * 2)); }

template <int kC, int kShared>
void Launch(cudaStream_t stream, const float* x, const uint16_t* w, int64_t rows, float* out, float* residual) {
  constexpr size_t smem = sizeof(uint4) * kShared * kC * kThreads;
  static const bool configured = [] {
    auto* kernel = GemvPrefetchedKernel<kC, kShared>;
    Check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), "cudaFuncSetAttribute",
          __FILE__, __LINE__);
    Check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared),
          "cudaFuncSetAttribute", __FILE__, __LINE__);
    return true;
  }();
  (void)configured;
  const unsigned blocks = static_cast<unsigned>((rows + kRows - 1) / kRows);
  LaunchKernel(GemvPrefetchedKernel<kC, kShared>, blocks, kThreads, smem, stream, x, w, static_cast<int>(rows), out, residual);
}

}  // namespace

bool GemvPrefetchedApplies(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || cols % kRowCols != 0) return false;
  const int64_t c = cols / kRowCols;
  if (c != 1 && c != 2) return false;
  const int shared = SharedRows(cols);
  // Every block resident at once (one a multiprocessor), its rows on chip.
  return (kRows - shared) * c <= kRegChunks && (rows + kRows - 1) / kRows <= MultiprocessorCount();
}

void GemvBf16Prefetched(cudaStream_t stream, const float* x, const uint16_t* w, int64_t rows, int64_t cols, float* out,
                        float* residual) {
  if (!GemvPrefetchedApplies(rows, cols)) Check(cudaErrorInvalidValue, "GemvBf16Prefetched: does not apply", __FILE__, __LINE__);
  if (cols == kRowCols) {
    Launch<1, kRows>(stream, x, w, rows, out, residual);  // 128 KB of shared memory
  } else {
    Launch<2, kSharedBudget / (2 * kRowCols * 2)>(stream, x, w, rows, out, residual);  // 24 rows shared, 8 in registers
  }
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
