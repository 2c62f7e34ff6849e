// The m = 1 GEMV with the RMSNorm that produces its input inside it (GemvBf16Staged in
// cuda_kernels.h).
//
// At batch 1 each RMSNorm is a one-block kernel between two GEMVs: its own work (~2.6 us: a
// dependent load, a block reduction, a store) and two kernel hand-offs sit on the critical path
// twice a layer (~10 us of the ~124 us a layer of the 8B shape on an H200, docs/benchmarks/cuda.md
// rounds 15-17). Folding the norm into the GEMV's short one-row blocks was slower (every block paid
// the reduction, rounds 6 and 16), so here the GEMV's blocks live for the whole launch (one a
// multiprocessor, made of 4 groups of 4 warps that walk the row groups grid-stride) and each
// block normalizes the row once into shared memory, in a layout where a warp's loads of x are
// bank-conflict free (the L1 loads of the one-row kernels take two wavefronts per 16 bytes of
// weights). The first weights are loaded before the wait for the previous kernel, as in every GEMV.
//
// Bitwise: the normalized row is RmsNormKernel's arithmetic (the block plays the norm's threads in
// order: per-thread sums, then each warp's butterfly, then the warps' partial sums in order) and
// each row's sum is GemvRowsKernel's (the same chunks a lane in the same order, the same shuffles,
// the 4 warps' partials added in order), so outputs equal the separate kernels' bit for bit.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/native/backend/cuda/cuda_gemv_stream.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

using gemv::HasFirstGroup;
using gemv::kStride;
using gemv::kUnroll;
using gemv::LoadGroup;
using gemv::StreamChunks;

constexpr int kGroups = 4;                         // row groups a block (one block a multiprocessor)
constexpr int kPartWarps = gemv::kWarpsPerRow;     // warps of a row group (GemvRowsKernel's block)
constexpr int kGroupThreads = kPartWarps * 32;
constexpr int kThreads = kGroups * kGroupThreads;
constexpr int kRows = 2;                // rows a group takes at a time (gate/up: one pair)
constexpr int kMaxStagedPerThread = 4;  // float4s of x a thread keeps while it normalizes (cols <= 16 x threads)

// Float4 slot of half h (0: elements 0-3, 1: 4-7) of 8-element chunk c8 of x in shared memory:
// the 32 consecutive chunks a warp reads at once have each half in 32 consecutive slots, so a
// warp's 16-byte load is 4 wavefronts, the minimum for 512 bytes (8 with the chunks in order).
__device__ __forceinline__ int StagedSlot(int c8, int h) { return (c8 >> 5) * 64 + h * 32 + (c8 & 31); }
// Float index of element i of x in that layout.
__device__ __forceinline__ int StagedIndex(int i) { return StagedSlot(i >> 3, (i >> 2) & 1) * 4 + (i & 3); }

// Float4 slots of the staged row (whole warps' worth of chunks).
__host__ __device__ __forceinline__ int StagedSlots(int64_t cols) { return static_cast<int>((cols / 8 + 31) / 32) * 64; }

// Named barrier of one row group's 4 warps (barrier 0 is __syncthreads).
__device__ __forceinline__ void GroupSync(int group) {
  asm volatile("bar.sync %0, %1;" ::"r"(group + 1), "r"(kGroupThreads) : "memory");
}

// The norm's warp partials added in order (RmsNormKernel's thread 0 does the same additions), all
// loaded first so that the chain is 32 dependent adds rather than 32 dependent shared loads.
__device__ __forceinline__ float SumPartials(const float* s_partial, int warps) {
  float p[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) p[i] = i < warps ? s_partial[i] : 0.0f;
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    if (i < warps) total += p[i];
  }
  return total;
}

// RmsNormKernel's rounding of four normalized elements: (x * scale) * w.
__device__ __forceinline__ float4 NormOut(const float4& x, float scale, const float4& w) {
  return make_float4(__fmul_rn(__fmul_rn(x.x, scale), w.x), __fmul_rn(__fmul_rn(x.y, scale), w.y), __fmul_rn(__fmul_rn(x.z, scale), w.z),
                     __fmul_rn(__fmul_rn(x.w, scale), w.w));
}

// RmsNormKernel's output for row x into shared memory, which block 0 also writes to st.norm_out as
// the norm would. wn: this thread's float4s of the norm weight.
__device__ __forceinline__ void StageRow(const float* __restrict__ x, const GemvStage& st, int cols, float4* s_x,
                                         const float4 (&wn)[kMaxStagedPerThread]) {
  const int t = threadIdx.x, n4 = cols / 4;  // n4 <= kMaxStagedPerThread * kThreads
  float4 xv[kMaxStagedPerThread];
#pragma unroll
  for (int k = 0; k < kMaxStagedPerThread; ++k) {
    const int q = t + k * kThreads;
    if (q < n4) xv[k] = reinterpret_cast<const float4*>(x)[q];
  }
#pragma unroll
  for (int k = 0; k < kMaxStagedPerThread; ++k) {
    const int q = t + k * kThreads;
    if (q < n4) s_x[StagedSlot(q >> 1, q & 1)] = xv[k];
  }
  __syncthreads();
  // The norm's nt threads: thread v sums x[v + k * nt]^2 over k in order; its warp (v / 32)
  // butterflies; the partials add in warp order. Thread v is played by thread v % kThreads, whose
  // lane is v's lane (kThreads is a multiple of 32), so the butterflies are the real warp's.
  const int nt = st.norm_threads;
  const float* sf = reinterpret_cast<const float*>(s_x);
  __shared__ float s_partial[32];
  for (int v0 = 0; v0 < nt; v0 += kThreads) {
    const int v = v0 + t;
    float ss = 0.0f;
    if (v < nt) {
      for (int i = v; i < cols; i += nt) {
        const float e = sf[StagedIndex(i)];
        ss = fmaf(e, e, ss);
      }
    }
    ss = WarpSum(ss);
    if (v < nt && v % 32 == 0) s_partial[v / 32] = ss;
  }
  __syncthreads();
  const float scale = RmsScale(SumPartials(s_partial, nt / 32), cols, st.eps);
  float4* out = reinterpret_cast<float4*>(st.norm_out);
#pragma unroll
  for (int k = 0; k < kMaxStagedPerThread; ++k) {
    const int q = t + k * kThreads;
    if (q >= n4) continue;
    const float4 o = NormOut(xv[k], scale, wn[k]);
    s_x[StagedSlot(q >> 1, q & 1)] = o;  // this thread's own slot: no one else reads it before the barrier
    if (blockIdx.x == 0 && out != nullptr) out[q] = o;
  }
  __syncthreads();
}

// The late-scale staging (GemvStage::late_scale): x * w into shared memory and the row's 1 / rms
// returned, with one barrier; each row's sum is multiplied by it at the end. Block 0 writes the
// norm's output (RmsNormKernel's rounding) to st.norm_out.
__device__ __forceinline__ float StageRowLateScale(const float* __restrict__ x, const GemvStage& st, int cols, float4* s_x,
                                                   const float4 (&wn)[kMaxStagedPerThread]) {
  const int t = threadIdx.x, n4 = cols / 4;  // n4 <= kMaxStagedPerThread * kThreads
  float4 xv[kMaxStagedPerThread];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxStagedPerThread; ++k) {
    const int q = t + k * kThreads;
    if (q >= n4) continue;
    xv[k] = reinterpret_cast<const float4*>(x)[q];
    const float4 w = wn[k];
    ss = fmaf(xv[k].x, xv[k].x, ss);
    ss = fmaf(xv[k].y, xv[k].y, ss);
    ss = fmaf(xv[k].z, xv[k].z, ss);
    ss = fmaf(xv[k].w, xv[k].w, ss);
    s_x[StagedSlot(q >> 1, q & 1)] = make_float4(__fmul_rn(xv[k].x, w.x), __fmul_rn(xv[k].y, w.y), __fmul_rn(xv[k].z, w.z),
                                                 __fmul_rn(xv[k].w, w.w));
  }
  __shared__ float s_partial[kThreads / 32];
  ss = WarpSum(ss);
  if (t % 32 == 0) s_partial[t / 32] = ss;
  __syncthreads();
  const float scale = RmsScale(SumPartials(s_partial, kThreads / 32), cols, st.eps);
  if (blockIdx.x == 0 && st.norm_out != nullptr) {
    float4* out = reinterpret_cast<float4*>(st.norm_out);
#pragma unroll
    for (int k = 0; k < kMaxStagedPerThread; ++k) {
      const int q = t + k * kThreads;
      if (q >= n4) continue;
      out[q] = NormOut(xv[k], scale, wn[k]);
    }
  }
  return scale;
}

// Row group g's rows: the weight (or gate/up pair) and output. kSwiGlu: group g is pair row g.
struct GroupRows {
  const uint4* base0;
  const uint4* base1;
  float* out;
  int64_t first_row, rows;
};
template <bool kSwiGlu>
__device__ __forceinline__ GroupRows LocateGroup(const GemvJobs& jobs, unsigned g, int64_t n8) {
  GroupRows r;
  if constexpr (kSwiGlu) {
    r.first_row = g;
    r.rows = jobs.rows[0];
    r.out = jobs.out[0];
    r.base0 = reinterpret_cast<const uint4*>(jobs.w[0]) + r.first_row * n8;
    r.base1 = reinterpret_cast<const uint4*>(jobs.w[1]) + r.first_row * n8;
  } else {
    const uint16_t* w;
    float* out;
    int64_t rows;
    unsigned first;
    PickJobOf(jobs, g, w, out, rows, first);
    r.first_row = int64_t{g - first} * kRows;
    r.rows = rows;
    r.out = out;
    r.base0 = r.base1 = reinterpret_cast<const uint4*>(w) + r.first_row * n8;
  }
  return r;
}

// Slot r's row (GemvRowsKernel's rule: kSwiGlu slots are gate, up; a slot past the weight's last
// row reads the group's first row again and writes nothing).
template <bool kSwiGlu>
__device__ __forceinline__ const uint4* SlotRow(const GroupRows& g, int r, int64_t n8) {
  if constexpr (kSwiGlu) {
    return r == 0 ? g.base0 : g.base1;
  } else {
    return r == 0 || g.first_row + r < g.rows ? g.base0 + r * n8 : g.base0;
  }
}

template <bool kSwiGlu>
__device__ __forceinline__ void LoadChunks(const GroupRows& g, int64_t n8, int64_t at, uint4 (&v)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) v[r] = LoadStreaming(SlotRow<kSwiGlu>(g, r, n8) + at);
}

// AccumulateRows (cuda_gemv.cu) with x from the staged row.
__device__ __forceinline__ void AccumulateStaged(const uint4 (&wv)[kRows], const float4* s_x, int64_t c8, float (&acc)[kRows]) {
  const int c = static_cast<int>(c8);
  FmaChunk<kRows>(wv, s_x[StagedSlot(c, 0)], s_x[StagedSlot(c, 1)], acc);
}

// Blocks of kGroups row groups (4 warps each); group gi of block b takes row groups
// b * kGroups + gi, then + gridDim.x * kGroups, ... < total.
template <bool kSwiGlu, bool kLateScale>
__global__ void __launch_bounds__(kThreads)
    GemvStagedKernel(const float* __restrict__ x, GemvStage st, GemvJobs jobs, int64_t cols, unsigned total) {
  extern __shared__ float4 s_x[];
  const int gi = threadIdx.x / kGroupThreads, part = (threadIdx.x / 32) % kPartWarps, lane = threadIdx.x % 32;
  const int64_t n8 = cols / 8;
  const int64_t c0 = part * 32 + lane;
  const unsigned step = gridDim.x * kGroups;
  unsigned g = blockIdx.x * kGroups + gi;
  GroupRows rows = LocateGroup<kSwiGlu>(jobs, g < total ? g : 0, n8);
  const bool full_group = HasFirstGroup(c0, n8);  // the same for every row
  auto load = [&](int64_t at, uint4 (&v)[kRows]) { LoadChunks<kSwiGlu>(rows, n8, at, v); };
  uint4 wv[kUnroll][kRows];
  if (g < total && full_group) LoadGroup(c0, wv, load);
  float4 wn[kMaxStagedPerThread];  // the norm weight: a weight, so loaded before the wait too
#pragma unroll
  for (int k = 0; k < kMaxStagedPerThread; ++k) {
    const int q = threadIdx.x + k * kThreads;
    if (q < cols / 4) wn[k] = reinterpret_cast<const float4*>(st.norm_w)[q];
  }
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  float scale = 1.0f;
  if constexpr (kLateScale) {
    scale = StageRowLateScale(x, st, static_cast<int>(cols), s_x, wn);
  } else {
    StageRow(x, st, static_cast<int>(cols), s_x, wn);
  }
  BlockTraceMark(0);  // the row staged and normalized

  __shared__ float partial[2][kGroups][kRows][kPartWarps];
  int buf = 0;
  const int i = threadIdx.x % kGroupThreads;
  while (g < total) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    StreamChunks(c0, n8, full_group, wv, load, [&](const uint4 (&v)[kRows], int64_t at) { AccumulateStaged(v, s_x, at, acc); });
    const GroupRows done = rows;
    const unsigned next = g + step;
    if (next < total) {  // the next group's first loads go out before this group's reduction
      rows = LocateGroup<kSwiGlu>(jobs, next, n8);
      if (full_group) LoadGroup(c0, wv, load);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[r];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[buf][gi][r][part] = v;
    }
    GroupSync(gi);
    if constexpr (kSwiGlu) {
      if (i == 0 && done.first_row < done.rows) {
        float gs = 0.0f, us = 0.0f;
#pragma unroll
        for (int p = 0; p < kPartWarps; ++p) gs += partial[buf][gi][0][p];
#pragma unroll
        for (int p = 0; p < kPartWarps; ++p) us += partial[buf][gi][1][p];
        const int64_t row = done.first_row;
        if constexpr (kLateScale) {
          gs = __fmul_rn(gs, scale);
          us = __fmul_rn(us, scale);
        }
        jobs.out[0][row] = gs;
        jobs.out[1][row] = us;
        jobs.swiglu_out[row] = SiluMul(gs, us);
      }
    } else {
      if (i < kRows && done.first_row + i < done.rows) {
        float s = 0.0f;
#pragma unroll
        for (int p = 0; p < kPartWarps; ++p) s += partial[buf][gi][i][p];
        if constexpr (kLateScale) s = __fmul_rn(s, scale);
        done.out[done.first_row + i] = s;
      }
    }
    buf ^= 1;
    g = next;
  }
  BlockTraceEnd();
}

template <bool kSwiGlu, bool kLateScale>
void LaunchStagedAs(cudaStream_t stream, const float* x, const GemvStage& st, const GemvJobs& jobs, int64_t cols, unsigned total) {
  // At most 32 KB (GemvStagedApplies' width limit), within the default 48 KB of dynamic shared memory.
  const size_t smem = StagedSlots(cols) * sizeof(float4);
  auto* kernel = GemvStagedKernel<kSwiGlu, kLateScale>;
  const unsigned blocks = std::min<unsigned>(static_cast<unsigned>(MultiprocessorCount()), (total + kGroups - 1) / kGroups);
  LaunchKernel(kernel, blocks, kThreads, smem, stream, x, st, jobs, cols, total);
}
template <bool kSwiGlu>
void LaunchStaged(cudaStream_t stream, const float* x, const GemvStage& st, const GemvJobs& jobs, int64_t cols, unsigned total) {
  if (st.late_scale) {
    LaunchStagedAs<kSwiGlu, true>(stream, x, st, jobs, cols, total);
  } else {
    LaunchStagedAs<kSwiGlu, false>(stream, x, st, jobs, cols, total);
  }
}

}  // namespace

bool GemvStagedApplies(int64_t cols, const GemvStage& st) {
  return st.norm_w != nullptr && cols % 8 == 0 && cols / 4 <= int64_t{kMaxStagedPerThread} * kThreads &&
         st.norm_threads % 32 == 0 && st.norm_threads <= 1024;
}

void GemvBf16Staged(cudaStream_t stream, const float* x, const GemvStage& st, int count, const uint16_t* const* w,
                    const int64_t* rows, int64_t cols, float* const* out) {
  int64_t groups = 0;
  const GemvJobs jobs = MakeGemvJobs(count, w, rows, out, kRows, &groups);
  LaunchStaged<false>(stream, x, st, jobs, cols, static_cast<unsigned>(groups));
  DYN_CUDA_CHECK_LAUNCH();
}

void GemvBf16SwiGluStaged(cudaStream_t stream, const float* x, const GemvStage& st, const uint16_t* w_gate, const uint16_t* w_up,
                          int64_t rows, int64_t cols, float* gate, float* up, float* out) {
  LaunchStaged<true>(stream, x, st, GateUpJobs(w_gate, w_up, rows, gate, up, out), cols, static_cast<unsigned>(rows));
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
