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

#include <atomic>

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

// Adds v >= 0 (a float's square) to the limbs at acc exactly: limb k holds 32-bit digits of weight
// 2^(32k - 80), in a 64-bit word, so 2^32 additions cannot overflow it; the 24-bit mantissa lands
// in at most two limbs. Bits below 2^-80 are dropped; squares of 2^48 and more saturate.
__device__ __forceinline__ void AddSquareToLimbs(unsigned long long* acc, float v) {
  const unsigned bits = __float_as_uint(v);
  const int e = static_cast<int>((bits >> 23) & 0xffu);
  unsigned long long mant = (bits & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
  int p = (e != 0 ? e : 1) - 150 + 80;  // the mantissa's lowest bit, counted from 2^-80
  if (e == 0xff || p > kNormFoldLimbs * 32 - 56) {
    mant = 0xffffffffffffffull >> 0;  // saturate: the largest value the top limbs hold
    p = kNormFoldLimbs * 32 - 56;
  }
  if (p < 0) {
    mant = -p < 64 ? mant >> -p : 0;
    p = 0;
  }
  const unsigned long long shifted = mant << (p % 32);
  const int k = p / 32;
  if (const unsigned long long lo = shifted & 0xffffffffull; lo != 0) atomicAdd(acc + k, lo);
  if (const unsigned long long hi = shifted >> 32; hi != 0) atomicAdd(acc + k + 1, hi);
}

// The norm's scale 1 / sqrt(sum / dim + eps) from the limbs' totals (every copy summed), in F32
// (a double's ldexp and division at the end of every consumer block cost ~0.3 us a block).
__device__ __forceinline__ float NormScaleFromLimbs(const unsigned long long* limbs, int dim, float eps) {
  float total = 0.0f;
#pragma unroll
  for (int k = kNormFoldLimbs - 1; k >= 0; --k) total = fmaf(static_cast<float>(limbs[k]), __int_as_float((127 + 32 * k - 80) << 23), total);
  return 1.0f / sqrtf(total / static_cast<float>(dim) + eps);
}

// kSwiGlu: jobs are (gate, up) of equal rows; block b computes row b of both (row_in_block 0: gate,
// 1: up) and also writes silu(gate) * up to jobs.swiglu_out.
// kFold (M = 1): 1 produces a folded RMSNorm, 2 consumes one (GemvNormFold in cuda_kernels.h).
template <int M, bool kSwiGlu, int R = kRowsPerBlock, int kFold = 0>
__global__ void __launch_bounds__(kWarpsPerRow * R * 32)
    GemvBf16Kernel(const float* __restrict__ x, GemvJobs jobs, int64_t cols) {
  static_assert(!kSwiGlu || R == 2);
  static_assert(kFold == 0 || M == 1);
  static_assert(kFold != 1 || !kSwiGlu);
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
  // Folded norm: the producer's row writer needs the norm weight (constant: before the wait) and
  // the residual's entry; the consumer's first threads the limbs, thread 32 its entry of h.
  const bool row_writer = part == 0 && lane == 0 && live;
  float fold_w = 0.0f, fold_res = 0.0f;
  const int64_t h_index = blockIdx.x;
  if constexpr (kFold == 1) {
    if (row_writer) fold_w = jobs.fold.w[row];
  } else if constexpr (kFold == 2) {
    if (threadIdx.x == 32 && jobs.fold.h != nullptr && h_index < jobs.fold.dim) fold_w = jobs.fold.w[h_index];
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  // Consumer: thread t < 5 x 16 loads one word (limb t / 16 of copy t % 16); its first use is after
  // the row's loop, so the load's latency hides behind the loop (a loop of dependent adds here kept
  // warp 0 from starting its row).
  constexpr int kLimbThreads = kNormFoldLimbs * kNormFoldCopies;
  static_assert(kNormFoldCopies == 16 && kWarpsPerRow * R * 32 >= kLimbThreads + 16);
  unsigned long long limb = 0;
  if constexpr (kFold == 1) {
    if (row_writer) fold_res = jobs.fold.res[row];
  } else if constexpr (kFold == 2) {
    if (threadIdx.x < kLimbThreads && (jobs.fold_debug & 2) == 0) {
      limb = jobs.fold.acc[(threadIdx.x % kNormFoldCopies) * kNormFoldCopyStride + threadIdx.x / kNormFoldCopies];
    }
    if (threadIdx.x == 32 && jobs.fold.h != nullptr && h_index < jobs.fold.dim) fold_res = jobs.fold.res[h_index];
  }
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
  __shared__ unsigned long long s_limbs[kFold == 2 ? kNormFoldLimbs : 1];
  if constexpr (kFold == 2) {  // each 16 lanes sum one limb's copies (integers: any order gives the same sum)
    if (threadIdx.x < kLimbThreads + 16) {
      for (int o = kNormFoldCopies / 2; o > 0; o >>= 1) limb += __shfl_xor_sync(0xffffffffu, limb, o);
      if (threadIdx.x % kNormFoldCopies == 0 && threadIdx.x < kLimbThreads) s_limbs[threadIdx.x / kNormFoldCopies] = limb;
    }
  }
  __syncthreads();
  float fold_scale = 1.0f;
  if constexpr (kFold == 2) {
    if (threadIdx.x == 0 || threadIdx.x == 32) fold_scale = NormScaleFromLimbs(s_limbs, jobs.fold.dim, jobs.fold.eps);
    if (threadIdx.x == 32 && jobs.fold.h != nullptr && (jobs.fold_debug & 4) == 0) {
      for (int64_t j = h_index; j < jobs.fold.dim; j += gridDim.x) {
        if (j != h_index) {
          fold_res = jobs.fold.res[j];
          fold_w = jobs.fold.w[j];
        }
        jobs.fold.h[j] = __fmul_rn(__fmul_rn(fold_res, fold_scale), fold_w);  // RmsNorm's order
      }
    }
  }
  if constexpr (kSwiGlu) {
    if (row_in_block == 0 && part == 0 && lane < M && live) {
      float g = 0.0f, u = 0.0f;
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) g += partial[0][p][lane];
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) u += partial[1][p][lane];
      if constexpr (kFold == 2) {
        g *= fold_scale;
        u *= fold_scale;
      }
      const int64_t i = lane * rows + row;
      jobs.out[0][i] = g;
      jobs.out[1][i] = u;
      jobs.swiglu_out[i] = __fmul_rn(g / (1.0f + expf(-g)), u);  // SwiGluKernel's arithmetic; may alias gate
    }
  } else if (part == 0 && lane < M && live) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarpsPerRow; ++p) s += partial[row_in_block][p][lane];
    if constexpr (kFold == 2) s *= fold_scale;
    outj[lane * rows + row] = s;
    if constexpr (kFold == 1) {  // the residual add, the norm's elementwise part and its sum of squares
      const float xn = fold_res + s;
      if ((jobs.fold_debug & 8) == 0) {
        jobs.fold.res[row] = xn;
        jobs.fold.xg[row] = __fmul_rn(xn, fold_w);
      }
      if ((jobs.fold_debug & 1) == 0) {
        AddSquareToLimbs(jobs.fold.acc + (row % kNormFoldCopies) * kNormFoldCopyStride, __fmul_rn(xn, xn));
      }
    }
  }
  BlockTraceEnd();
}

template <int M, bool kSwiGlu = false, int kFold = 0>
void Launch(cudaStream_t stream, const float* x, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  if constexpr (!kSwiGlu && M == 1) {
    if (RowsPerBlock(M) == 1) {
      LaunchKernel(GemvBf16Kernel<M, kSwiGlu, 1, kFold>, blocks, kWarpsPerRow * 32, 0, stream, x, jobs, cols);
      return;
    }
  }
  if constexpr (kFold != 1 || kSwiGlu) {
    LaunchKernel(GemvBf16Kernel<M, kSwiGlu, kRowsPerBlock, kFold>, blocks, kWarpsPerRow * kRowsPerBlock * 32, 0, stream, x, jobs,
                 cols);
  }
}

// m = 1 with a folded norm's role (0: none).
template <bool kSwiGlu>
void LaunchFold(cudaStream_t stream, const float* x, int fold, const GemvJobs& jobs, int64_t cols, unsigned blocks) {
  if (fold == 1) {
    if constexpr (!kSwiGlu) Launch<1, false, 1>(stream, x, jobs, cols, blocks);
  } else if (fold == 2) {
    Launch<1, kSwiGlu, 2>(stream, x, jobs, cols, blocks);
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

void SetGemvRowsPerBlock(int rows) { g_rows_at_m1 = rows == 2 ? 2 : 1; }

namespace {
std::atomic<int> g_folded_norms{0};  // FoldedNormLaunches
int g_fold_debug = 0;
}  // namespace
void SetFoldNormDebug(int mask) { g_fold_debug = mask; }
int FoldedNormLaunches() { return g_folded_norms.load(); }

void GemvBf16Multi(cudaStream_t stream, const float* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                   int64_t cols, float* const* out, const GemvNormFold* produce, const GemvNormFold* consume) {
  if (count < 1 || count > kGemvMaxJobs) Check(cudaErrorInvalidValue, "GemvBf16Multi: job count", __FILE__, __LINE__);
  if ((produce != nullptr || consume != nullptr) &&
      (m != 1 || (produce != nullptr && (consume != nullptr || count != 1 || rows[0] != produce->dim || RowsPerBlock(1) != 1)))) {
    Check(cudaErrorInvalidValue, "GemvBf16Multi: a folded norm needs m = 1 and one weight of dim rows", __FILE__, __LINE__);
  }
  int64_t blocks = 0;
  GemvJobs jobs = MakeGemvJobs(count, w, rows, out, RowsPerBlock(m), &blocks);
  if (produce != nullptr || consume != nullptr) {
    jobs.fold = produce != nullptr ? *produce : *consume;
    jobs.fold_debug = g_fold_debug;
    if (produce != nullptr) g_folded_norms.fetch_add(1);
    LaunchFold<false>(stream, x, produce != nullptr ? 1 : 2, jobs, cols, static_cast<unsigned>(blocks));
  } else {
    LaunchAnyM<false>(stream, x, m, jobs, cols, static_cast<unsigned>(blocks));
  }
  DYN_CUDA_CHECK_LAUNCH();
}

void GemvBf16(cudaStream_t stream, const float* x, int m, const uint16_t* w, int64_t rows, int64_t cols, float* out) {
  GemvBf16Multi(stream, x, m, 1, &w, &rows, cols, &out);
}

void GemvBf16SwiGlu(cudaStream_t stream, const float* x, int m, const uint16_t* w_gate, const uint16_t* w_up, int64_t rows,
                    int64_t cols, float* gate, float* up, float* out, const GemvNormFold* consume) {
  if (consume != nullptr && m != 1) Check(cudaErrorInvalidValue, "GemvBf16SwiGlu: a folded norm needs m = 1", __FILE__, __LINE__);
  GemvJobs jobs{};
  jobs.count = 2;
  jobs.w[0] = w_gate;
  jobs.w[1] = w_up;
  jobs.out[0] = gate;
  jobs.out[1] = up;
  jobs.rows[0] = jobs.rows[1] = rows;
  jobs.swiglu_out = out;
  if (consume != nullptr) {
    jobs.fold = *consume;
    jobs.fold_debug = g_fold_debug;
    LaunchFold<true>(stream, x, 2, jobs, cols, static_cast<unsigned>(rows));
  } else {
    LaunchAnyM<true>(stream, x, m, jobs, cols, static_cast<unsigned>(rows));
  }
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
