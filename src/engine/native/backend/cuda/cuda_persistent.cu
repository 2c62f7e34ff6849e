// Batch-1 decode as one persistent kernel: a run of a step's one-row calls (RMSNorm, the GEMVs,
// decode attention with its RoPE + KV write) executed by one block per multiprocessor, phase after
// phase, with a grid barrier between phases. Opt-in (DYN_CUDA_PERSIST=1): so far slower than the
// kernel-by-kernel step (docs/benchmarks/cuda.md, round 8, has the per-phase times).
//
// Why: at batch 1 the step is bound by reading the weights once (16 GB for the 8B shape), but as
// separate kernels HBM idles while each grid ramps up and drains and while the small kernels
// (norms, attention) run: the GEMVs alone stream at ~4 TB/s and the step loses a further ~20% to
// the kernels between them (rounds 5-7). Here each warp streams its rows in steps of 8 KB held in
// registers, and the last step of a phase requests the next phase's first: the next matrix is on
// its way while the grid meets at the barrier and the input row is staged. RMSNorm runs inside the
// next GEMV's input staging (every block normalizes the row into shared memory), the residual add
// in the epilogue of the GEMV before it, the attention split merge in the last task of each kv
// head. DYN_CUDA_PERSIST_TRACE=1 (with DYN_CUDA_GRAPHS=0) prints where a launch spent its time.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_attention_rows.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"
#include "engine/native/backend/cuda/cuda_persistent.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

using namespace persist;

// One block of 16 warps per multiprocessor, each lane with a step of 16 loads of 16 bytes in flight
// (8 KB a warp, 128 KB a multiprocessor, about what the per-row GEMV's resident blocks hold).
// Measured on an H200 (docs/benchmarks/cuda.md, round 8): 32 warps of 8 loads (64 registers) and
// 16 warps of 20 loads spill registers and were 0.1-1.5 ms a step slower.
constexpr int kWarps = 16, kThreads = kWarps * 32;
constexpr int kStepLoads = 16;

std::atomic<int> g_launches{0};  // PersistentLaunches

__device__ __forceinline__ int Splits(int len) { return min(kMaxSplits, max(1, (len + 63) / 64)); }

// ---- the weight stream ----

// Unit u of a phase without SwiGLU as (weight j, row r): units count rows over the weights in order.
__device__ __forceinline__ int JobRow(const Phase& ph, int u, int& r) {
  int j = 0;
  r = u;
  while (j + 1 < ph.count && r >= ph.rows[j]) r -= static_cast<int>(ph.rows[j++]);
  return j;
}

// The first byte of unit u's weight row (with SwiGLU s = 0: the gate row, 1: the up row).
__device__ __forceinline__ const char* RowAddress(const Phase& ph, int u, int s) {
  int r = u;
  const int j = ph.swiglu ? s : JobRow(ph, u, r);
  return reinterpret_cast<const char*>(ph.w[j]) + static_cast<size_t>(r) * ph.cols * 2;
}

// A step of a warp's weight stream: kStepLoads tiles of one row from tile t0 (fewer at the row's
// end), or with SwiGLU tiles [t0, t0 + kStepLoads / 2) of the gate row and of the up row, so one
// read of the input serves both. p < 0: none.
struct StepPos {
  int p, t0, u;
};

__device__ __forceinline__ int StepTiles(const Phase& ph) { return ph.swiglu ? kStepLoads / 2 : kStepLoads; }

// Warp gw's first step of phase p, when p is a GEMV phase that gives it a unit.
__device__ __forceinline__ StepPos FirstStep(const Phase* ph, int n, int p, int gw) {
  if (p < n && ph[p].kind == kGemvPhase && gw < ph[p].units) return {p, 0, gw};
  return {-1, 0, 0};
}

// The step after s in its phase, or none at the phase's end.
__device__ __forceinline__ StepPos NextInPhase(const Phase& ph, StepPos s, int nw) {
  s.t0 += StepTiles(ph);
  if (s.t0 < ph.tiles) return s;
  s.t0 = 0;
  s.u += nw;
  if (s.u >= ph.units) s.p = -1;
  return s;
}

// Requests a step's weights into registers (this lane's 16 bytes of each tile).
__device__ __forceinline__ void LoadStep(const Phase& ph, StepPos s, int lane, uint4 (&buf)[kStepLoads]) {
  const size_t off = static_cast<size_t>(s.t0) * kTileBytes + lane * 16;
  if (ph.swiglu) {
    const char* g = RowAddress(ph, s.u, 0) + off;
    const char* up = RowAddress(ph, s.u, 1) + off;
    const int count = min(kStepLoads / 2, ph.tiles - s.t0);
#pragma unroll
    for (int i = 0; i < kStepLoads / 2; ++i) {
      if (i < count) {
        buf[i] = LoadStreaming(reinterpret_cast<const uint4*>(g + i * kTileBytes));
        buf[kStepLoads / 2 + i] = LoadStreaming(reinterpret_cast<const uint4*>(up + i * kTileBytes));
      }
    }
  } else {
    const char* r = RowAddress(ph, s.u, 0) + off;
    const int count = min(kStepLoads, ph.tiles - s.t0);
#pragma unroll
    for (int i = 0; i < kStepLoads; ++i) {
      if (i < count) buf[i] = LoadStreaming(reinterpret_cast<const uint4*>(r + i * kTileBytes));
    }
  }
}

// The 8 products of a lane's 16 weight bytes with its 8 inputs (a: the first 4, b: the last 4).
__device__ __forceinline__ float Dot8(const uint4& wv, const float4& a, const float4& b, float acc) {
  const uint32_t ws[4] = {wv.x, wv.y, wv.z, wv.w};
  const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(__uint_as_float(ws[i] << 16), xs[2 * i], acc);
    acc = fmaf(__uint_as_float(ws[i] & 0xFFFF0000u), xs[2 * i + 1], acc);
  }
  return acc;
}

// ---- grid barrier ----

// Every block arrives at the monotonic counter and waits until all have (target grows by the grid
// each barrier). Writes before it are visible after it (fence before the arrival, acquire load).
__device__ __forceinline__ void GridBarrier(unsigned* count, unsigned& target) {
  __syncthreads();
  target += gridDim.x;
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(count, 1u);
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

// ---- phases ----

// Where input elements i..i+3 (i % 4 == 0) lie in the staged row: the first halves of the 8-element
// chunks, then the second halves, so that a warp reading chunk t * 32 + lane (16 bytes from each
// half) reads 512 contiguous bytes twice, without bank conflicts.
__device__ __forceinline__ int StagePos(int i, int cols) { return (i / 8) * 4 + ((i / 4) % 2) * (cols / 2); }

// The phase's input row into shared memory, RMS-normalized when the phase says so (RmsNorm's
// arithmetic: x * scale rounded, then * weight rounded).
__device__ __forceinline__ void StageInput(const Phase& ph, float* stage, float* red) {
  const int tid = threadIdx.x;
  float ss = 0.0f;
  for (int i = tid * 4; i < ph.cols; i += kThreads * 4) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(ph.in + i));
    *reinterpret_cast<float4*>(stage + StagePos(i, ph.cols)) = v;
    ss = fmaf(v.x, v.x, ss);
    ss = fmaf(v.y, v.y, ss);
    ss = fmaf(v.z, v.z, ss);
    ss = fmaf(v.w, v.w, ss);
  }
  if (ph.norm_w != nullptr) {
    ss = WarpSum(ss);
    if (tid % 32 == 0) red[tid / 32] = ss;
    __syncthreads();
    if (tid == 0) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += red[w];
      red[kWarps] = 1.0f / sqrtf(total / ph.cols + ph.eps);
    }
    __syncthreads();
    const float scale = red[kWarps];
    const bool write = blockIdx.x == 0 && ph.norm_out != nullptr;
    for (int i = tid * 4; i < ph.cols; i += kThreads * 4) {
      float4& v = *reinterpret_cast<float4*>(stage + StagePos(i, ph.cols));
      const float4 w = __ldg(reinterpret_cast<const float4*>(ph.norm_w + i));
      v.x = __fmul_rn(__fmul_rn(v.x, scale), w.x);
      v.y = __fmul_rn(__fmul_rn(v.y, scale), w.y);
      v.z = __fmul_rn(__fmul_rn(v.z, scale), w.z);
      v.w = __fmul_rn(__fmul_rn(v.w, scale), w.w);
      if (write) __stcg(reinterpret_cast<float4*>(ph.norm_out + i), v);
    }
  }
  __syncthreads();
}

struct Stream {
  int gw, nw;  // this warp's index in the grid, warps in the grid
  int lane;
  StepPos pos;  // the step in buf
};

// Warp gw takes units gw, gw + nw, ...; buf holds its first step of this phase on entry (loaded
// before the barrier). Each step's weights are multiplied while the next step's are requested,
// and the last step of the phase requests the next phase's first when that is a GEMV too.
__device__ __forceinline__ void GemvPhase(const Phase* phs, int n, int p, Stream& st, const float* stage, uint4 (&buf)[kStepLoads]) {
  const Phase& ph = phs[p];
  const int lane = st.lane;
  const float* hi = stage + ph.cols / 2;
  if (st.pos.p != p) {  // not loaded ahead
    st.pos = FirstStep(phs, n, p, st.gw);
    if (st.pos.p == p) LoadStep(ph, st.pos, lane, buf);
  }
  float acc0 = 0.0f, acc1 = 0.0f;  // the row's sum; with SwiGLU gate's and up's
  while (st.pos.p == p) {
    const StepPos cur = st.pos;
    if (ph.swiglu) {
      const int count = min(kStepLoads / 2, ph.tiles - cur.t0);
#pragma unroll
      for (int i = 0; i < kStepLoads / 2; ++i) {
        if (i < count) {
          const int c = ((cur.t0 + i) * 32 + lane) * 4;
          const float4 a = *reinterpret_cast<const float4*>(stage + c), b = *reinterpret_cast<const float4*>(hi + c);
          acc0 = Dot8(buf[i], a, b, acc0);
          acc1 = Dot8(buf[kStepLoads / 2 + i], a, b, acc1);
        }
      }
    } else {
      const int count = min(kStepLoads, ph.tiles - cur.t0);
#pragma unroll
      for (int i = 0; i < kStepLoads; ++i) {
        if (i < count) {
          const int c = ((cur.t0 + i) * 32 + lane) * 4;
          const float4 a = *reinterpret_cast<const float4*>(stage + c), b = *reinterpret_cast<const float4*>(hi + c);
          acc0 = Dot8(buf[i], a, b, acc0);
        }
      }
    }
    StepPos next = NextInPhase(ph, cur, st.nw);
    if (next.p < 0) next = FirstStep(phs, n, p + 1, st.gw);
    st.pos = next;
    if (next.p >= 0) LoadStep(phs[next.p], next, lane, buf);
    if (cur.t0 + StepTiles(ph) < ph.tiles) continue;
    // The row's end: reduce and write.
    const int u = cur.u;
    const float sum0 = WarpSum(acc0), sum1 = ph.swiglu ? WarpSum(acc1) : 0.0f;
    acc0 = acc1 = 0.0f;
    if (lane != 0) continue;
    if (ph.swiglu) {
      __stcg(ph.out[0] + u, sum0);
      __stcg(ph.out[1] + u, sum1);
      __stcg(ph.swiglu_out + u, __fmul_rn(sum0 / (1.0f + expf(-sum0)), sum1));  // SwiGluKernel's arithmetic; may alias gate
    } else {
      int r;
      const int j = JobRow(ph, u, r);
      __stcg(ph.out[j] + r, sum0);
      if (ph.residual != nullptr) __stcg(ph.residual + r, __ldcg(ph.residual + r) + sum0);
    }
  }
}

constexpr int kAttnWarps = 16;  // warps of a block that run an attention task (the rest wait)
constexpr int kKeyUnroll = 4;   // keys a warp has in flight
constexpr int kDimsPerLane = kHeadDim / 32;

// The keys [begin, end) of kv head kv for the kGroup query heads qv: warp w takes keys begin + w +
// k * kAttnWarps, each lane 4 of the 128 dims; per head an online softmax (mx, sum, acc).
__device__ __forceinline__ void WarpAttend(const __nv_bfloat16* __restrict__ cache, const CacheGeometry& g, const int32_t* table, int kv,
                                           int begin, int end, float scale, const float (&qv)[kGroup][kDimsPerLane], float (&mx)[kGroup],
                                           float (&sum)[kGroup], float (&acc)[kGroup][kDimsPerLane]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j0 = begin + warp; j0 < end; j0 += kAttnWarps * kKeyUnroll) {
    uint2 kr[kKeyUnroll], vr[kKeyUnroll];
#pragma unroll
    for (int u = 0; u < kKeyUnroll; ++u) {
      const int j = min(j0 + u * kAttnWarps, end - 1);
      const __nv_bfloat16* kp = cache + SlotOffset(g, table, j) + static_cast<size_t>(kv) * kHeadDim + lane * kDimsPerLane;
      kr[u] = __ldcg(reinterpret_cast<const uint2*>(kp));  // the new token's K/V were written in this kernel
      vr[u] = __ldcg(reinterpret_cast<const uint2*>(kp + g.v_delta));
    }
    float s[kKeyUnroll][kGroup];
#pragma unroll
    for (int u = 0; u < kKeyUnroll; ++u) {
      float kf[kDimsPerLane];
      LoadVec<kDimsPerLane>(reinterpret_cast<const __nv_bfloat16*>(&kr[u]), kf);
      const bool valid = j0 + u * kAttnWarps < end;
#pragma unroll
      for (int gi = 0; gi < kGroup; ++gi) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) dot = fmaf(qv[gi][i], kf[i], dot);
        dot = WarpSum(dot);
        s[u][gi] = valid ? dot * scale : -INFINITY;
      }
    }
    OnlineSoftmaxStep(s, vr, mx, sum, acc);
  }
}

// RoPE + KV write + attention of one row: task (kv head, key split) per block; each task's
// normalized output and (max, sum) go to `partial`, and the kv head's last task merges them.
__device__ __noinline__ void AttentionPhase(const Phase& ph, float* stage, float* partial, unsigned* arrivals) {
  __shared__ bool s_last;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int pos = __ldg(ph.meta.pos), len = pos + 1, S = Splits(len);
  const int32_t* table = ph.meta.tables + __ldg(ph.meta.table_offset);
  const int chunk = (len + S - 1) / S;
  float* s_q = stage;                      // [4][128]
  float* s_k = stage + kGroup * kHeadDim;  // [128]
  auto& s_max = *reinterpret_cast<float(*)[kAttnWarps][kGroup]>(stage + 5 * kHeadDim);
  auto& s_sum = *reinterpret_cast<float(*)[kAttnWarps][kGroup]>(stage + 5 * kHeadDim + kAttnWarps * kGroup);
  auto& s_acc = *reinterpret_cast<float(*)[kAttnWarps][kGroup][kHeadDim]>(stage + 5 * kHeadDim + 2 * kAttnWarps * kGroup);
  for (int task = blockIdx.x; task < ph.kv_heads * S; task += gridDim.x) {
    const int kv = task / S, split = task % S;
    const int begin = split * chunk, end = min(len, begin + chunk);
    const bool owner = begin <= pos && pos < end;
    const size_t q_off = static_cast<size_t>(kv) * kGroup * kHeadDim;
    float* k = ph.k + static_cast<size_t>(kv) * kHeadDim;
    __syncthreads();  // the previous task's reads of shared memory are done
    for (int e = tid; e < kGroup * kHeadDim; e += kThreads) s_q[e] = __ldcg(ph.q + q_off + e);
    if (owner && tid < kHeadDim) s_k[tid] = __ldcg(k + tid);
    __syncthreads();
    for (int t = tid; t < kGroup * (kHeadDim / 2); t += kThreads) RotatePair(s_q, t, kHeadDim, ph.cos_sin, ph.neox);
    if (owner && tid < kHeadDim / 2) RotatePair(s_k, tid, kHeadDim, ph.cos_sin, ph.neox);
    __syncthreads();
    if (owner && tid < kHeadDim) {
      const size_t off = SlotOffset(ph.g, table, pos) + static_cast<size_t>(kv) * kHeadDim;
      __stcg(k + tid, s_k[tid]);
      StoreElem(ph.cache + off + tid, s_k[tid]);
      StoreElem(ph.cache + off + ph.g.v_delta + tid, __ldcg(ph.v + static_cast<size_t>(kv) * kHeadDim + tid));
    }
    __syncthreads();
    if (warp < kAttnWarps) {
      float qv[kGroup][kDimsPerLane], acc[kGroup][kDimsPerLane], mx[kGroup], sum[kGroup];
#pragma unroll
      for (int gi = 0; gi < kGroup; ++gi) {
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          qv[gi][i] = s_q[gi * kHeadDim + lane * kDimsPerLane + i];
          acc[gi][i] = 0.0f;
        }
        mx[gi] = -INFINITY;
        sum[gi] = 0.0f;
      }
      WarpAttend(ph.cache, ph.g, table, kv, begin, end, ph.scale, qv, mx, sum, acc);
#pragma unroll
      for (int gi = 0; gi < kGroup; ++gi) {
        if (lane == 0) {
          s_max[warp][gi] = mx[gi];
          s_sum[warp][gi] = sum[gi];
        }
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) s_acc[warp][gi][lane * kDimsPerLane + i] = acc[gi][i];
      }
    }
    __syncthreads();
    float* part = partial + static_cast<size_t>(kv * S + split) * kPartFloats;
    for (int e = tid; e < kGroup * kHeadDim; e += kThreads) {
      const int gi = e / kHeadDim, d = e % kHeadDim;
      const WarpMerged m = MergeWarps(s_max, s_sum, s_acc, gi, d);
      __stcg(part + e, m.sum > 0.0f ? m.o / m.sum : 0.0f);  // an empty split: weight 0 in the merge
      if (d == 0) {
        __stcg(part + kGroup * kHeadDim + 2 * gi, m.max);
        __stcg(part + kGroup * kHeadDim + 2 * gi + 1, m.sum);
      }
    }
    // The last of the kv head's S tasks to finish merges the splits (the cluster kernel's
    // arithmetic) and writes the rotated q heads back, as RopeWriteKv leaves them.
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      const bool last = atomicAdd(arrivals + kv, 1u) == static_cast<unsigned>(S - 1);
      if (last) arrivals[kv] = 0;  // for the next layer (every task of this kv head has arrived)
      s_last = last;
    }
    __syncthreads();
    if (!s_last) continue;
    __threadfence();
    const float* base = partial + static_cast<size_t>(kv) * S * kPartFloats;
    for (int e = tid; e < kGroup * kHeadDim; e += kThreads) {
      const int gi = e / kHeadDim;
      const float o = MergeSplitElement(
          S,
          [&](int sp) {
            const float* ml = base + sp * kPartFloats + kGroup * kHeadDim + 2 * gi;
            return make_float2(__ldcg(ml), __ldcg(ml + 1));
          },
          [&](int sp) { return __ldcg(base + sp * kPartFloats + e); });
      __stcg(ph.attn_out + q_off + e, o);
      __stcg(ph.q + q_off + e, s_q[e]);
    }
  }
}

// trace (DYN_CUDA_PERSIST_TRACE=1, eager launches): each block's global timer at each phase's start
// and end, [2][phases][grid] nanoseconds.
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Gives buf new values (it is not read before the next LoadStep), so that its old ones are dead in
// the code before and need no registers or saving there.
__device__ __forceinline__ void Forget(uint4 (&buf)[kStepLoads]) {
#pragma unroll
  for (int i = 0; i < kStepLoads; ++i) buf[i] = make_uint4(0, 0, 0, 0);
}

__global__ void __launch_bounds__(kThreads, 1)
    PersistentKernel(const Program* __restrict__ prog, float* partial, unsigned* sync, unsigned long long* trace) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[kWarps + 1];
  const int n = prog->num_phases;
  const Phase* ph = prog->phases;
  float* stage = reinterpret_cast<float*>(smem);
  Stream st;
  st.gw = static_cast<int>(blockIdx.x * kWarps + threadIdx.x / 32);
  st.nw = static_cast<int>(gridDim.x * kWarps);
  st.lane = threadIdx.x % 32;
  uint4 buf[kStepLoads];
  // Weights do not depend on earlier kernels: the first step is requested before the wait.
  st.pos = FirstStep(ph, n, 0, st.gw);
  if (st.pos.p == 0) LoadStep(ph[0], st.pos, st.lane, buf);
  WaitForPreviousKernel();
  unsigned target = 0;
  for (int p = 0; p < n; ++p) {
    if (p > 0) GridBarrier(sync, target);
    if (p == n - 1) LetNextKernelLaunch();
    if (trace != nullptr && threadIdx.x == 0) trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x] = GlobalTimer();
    const Phase& cur = ph[p];
    if (cur.kind == kGemvPhase) {
      StageInput(cur, stage, red);
      GemvPhase(ph, n, p, st, stage, buf);
    } else if (cur.kind == kAttentionPhase) {
      AttentionPhase(cur, stage, partial, sync + 2);
      Forget(buf);  // nothing is loaded across attention: its registers are free for it
      // The next GEMV's first step streams while the grid meets.
      st.pos = FirstStep(ph, n, p + 1, st.gw);
      if (st.pos.p >= 0) LoadStep(ph[st.pos.p], st.pos, st.lane, buf);
    }
    if (trace != nullptr) {
      __syncthreads();
      if (threadIdx.x == 0) trace[static_cast<size_t>(n + p) * gridDim.x + blockIdx.x] = GlobalTimer();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Every block is past its last barrier once all have arrived here: the last one resets the
    // counters for the next launch (which reads them only after this grid has finished).
    if (atomicAdd(sync + 1, 1u) == gridDim.x - 1) {
      sync[0] = 0;
      sync[1] = 0;
    }
  }
}

}  // namespace

void LaunchPersistent(cudaStream_t stream, const void* program, void* scratch) {
  auto kernel = PersistentKernel;
  const size_t smem = kSmemBytes;
  static const int grid = [&] {
    Check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), "cudaFuncSetAttribute",
          __FILE__, __LINE__);
    int per_sm = 0;
    Check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem), "cudaOccupancyMaxActiveBlocksPerMultiprocessor",
          __FILE__, __LINE__);
    if (per_sm < 1) Check(cudaErrorInvalidConfiguration, "PersistentKernel does not fit a multiprocessor", __FILE__, __LINE__);
    return MultiprocessorCount();  // one block each: all resident at once, as the barriers need
  }();
  float* partial = static_cast<float*>(scratch);
  unsigned* sync = reinterpret_cast<unsigned*>(partial + kPartialFloats);
  static const bool tracing = [] {
    const char* t = std::getenv("DYN_CUDA_PERSIST_TRACE");
    return t != nullptr && std::string(t) == "1";
  }();
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  Check(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing", __FILE__, __LINE__);
  unsigned long long* trace = nullptr;
  if (tracing && capturing == cudaStreamCaptureStatusNone) {
    static unsigned long long* buf = nullptr;
    if (buf == nullptr) Check(cudaMalloc(&buf, 2 * kMaxPhases * grid * sizeof(unsigned long long)), "cudaMalloc", __FILE__, __LINE__);
    trace = buf;
  }
  LaunchKernel(kernel, grid, kThreads, smem, stream, static_cast<const Program*>(program), partial, sync, trace);
  DYN_CUDA_CHECK_LAUNCH();
  if (trace != nullptr) PrintPersistentTrace(stream, program, trace, grid);
  ++g_launches;
}

int PersistentLaunches() { return g_launches.load(); }

}  // namespace dyn::cuda
