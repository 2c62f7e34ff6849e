// Batch-1 decode as one persistent kernel: a run of a step's one-row calls (RMSNorm, the GEMVs,
// decode attention with its RoPE + KV write) executed by one block per multiprocessor, phase after
// phase, with a grid barrier between phases.
//
// Why: at batch 1 the step is bound by reading the weights once (16 GB for the 8B shape), but as
// separate kernels HBM idles while each grid ramps up and drains and while the small kernels
// (norms, attention) run: the GEMVs alone stream at ~4 TB/s and the step loses a further ~20% to
// the kernels between them (docs/benchmarks/cuda.md, rounds 5-7). Here each warp streams its
// share of every weight through a private ring of shared-memory slots that cp.async fills
// kSlots - 1 tiles ahead of the tile it multiplies, across phase boundaries: while a block waits
// at a barrier, normalizes an input or runs attention, the next phase's weights are already in
// flight. RMSNorm runs inside the next GEMV's input staging (every block normalizes the row into
// shared memory), the residual add in the epilogue of the GEMV before it.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_attention_rows.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

constexpr int kWarps = 16, kThreads = kWarps * 32;
// Ring slots per warp (kernel template; DYN_CUDA_PERSIST_SLOTS picks 16 or 20); kSlots - 1 tiles
// are in flight, the slot being filled is the one read last.
constexpr int kDefaultSlots = 16;
constexpr int kTileBytes = 512;                      // a warp's tile: 16 bytes (8 bf16) a lane
constexpr int kTileCols = kTileBytes / 2;
constexpr int kStageFloats = 16384;  // the widest input row a GEMV phase stages
constexpr int kHeadDim = 128, kGroup = 4, kPerLane = 8;
constexpr int kMaxSplits = 16;
constexpr int kPartFloats = kGroup * (kHeadDim + 2);  // a (kv head, split)'s outputs [4][128], then (max, sum) [4]
constexpr int kMaxKvHeads = 16;
__host__ __device__ constexpr size_t RingBytes(int slots) { return size_t{kWarps} * slots * kTileBytes; }
constexpr size_t SmemBytes(int slots) { return RingBytes(slots) + kStageFloats * sizeof(float); }
constexpr int kMinGemvPhases = 8;  // shorter runs stay separate kernels
constexpr size_t kMaxPhases = 1024;  // sizes the trace buffer

enum PhaseKind : int32_t { kGemvPhase, kAttentionPhase, kMergePhase };

struct Phase {
  int32_t kind;
  // kGemvPhase: out[j] = input * w[j]^T; units are rows over the jobs in order, or (gate, up) row
  // pairs with SwiGLU.
  int32_t count, swiglu, tiles, cols;
  int64_t units;
  int64_t rows[kGemvMaxJobs];
  const uint16_t* w[kGemvMaxJobs];
  float* out[kGemvMaxJobs];
  float* swiglu_out;
  const float* in;      // the input row
  const float* norm_w;  // non-null: the input is RmsNorm(in) with this weight
  float eps;
  float* norm_out;  // with norm_w: block 0 also writes the normalized row here
  float* residual;  // non-null: residual[r] += out[0][r] (the Add after this GEMV)
  // kAttentionPhase, kMergePhase (one row)
  __nv_bfloat16* cache;
  CacheGeometry g;
  AttnRows meta;
  float* q;
  float* k;
  const float* v;
  const float* cos_sin;
  int32_t neox, num_heads, kv_heads;
  float scale;
  float* attn_out;
};

struct Program {
  int32_t num_phases;
  int32_t pad_;
  Phase phases[1];  // num_phases of them
};

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int Splits(int len) { return min(kMaxSplits, max(1, (len + 127) / 128)); }

// ---- the weight stream ----

// Where the warp's next tile to issue lies: phase p, unit u, tile t, sub-row s (SwiGLU: gate 0 and
// up 1 alternate tile by tile, so one load of the input serves both).
struct Cursor {
  int p, s, t, tiles, subs;
  int64_t u;
  const char* row[2];
};

__device__ __forceinline__ const char* RowAddress(const Phase& ph, int64_t u, int s) {
  if (ph.swiglu) return reinterpret_cast<const char*>(ph.w[s]) + u * ph.cols * 2;
  int j = 0;
  int64_t r = u;
  while (j + 1 < ph.count && r >= ph.rows[j]) r -= ph.rows[j++];
  return reinterpret_cast<const char*>(ph.w[j]) + r * ph.cols * 2;
}

// The first row of warp gw in the first GEMV phase >= p that gives it a unit.
__device__ __forceinline__ void Seek(const Phase* ph, int n, int p, int64_t gw, Cursor& c) {
  while (p < n && !(ph[p].kind == kGemvPhase && gw < ph[p].units)) ++p;
  c.p = p;
  if (p >= n) return;
  c.u = gw;
  c.s = c.t = 0;
  c.tiles = ph[p].tiles;
  c.subs = ph[p].swiglu ? 2 : 1;
  c.row[0] = RowAddress(ph[p], gw, 0);
  c.row[1] = ph[p].swiglu ? RowAddress(ph[p], gw, 1) : c.row[0];
}

__device__ __forceinline__ void Advance(const Phase* ph, int n, int64_t gw, int64_t nw, Cursor& c) {
  if (++c.s < c.subs) return;
  c.s = 0;
  if (++c.t < c.tiles) return;
  c.t = 0;
  c.u += nw;
  if (c.u < ph[c.p].units) {
    c.row[0] = RowAddress(ph[c.p], c.u, 0);
    c.row[1] = c.subs == 2 ? RowAddress(ph[c.p], c.u, 1) : c.row[0];
    return;
  }
  Seek(ph, n, c.p + 1, gw, c);
}

// Issues the cursor's tile (this lane's 16 bytes) into `slot` and commits it as one group; once
// the stream is exhausted, an empty group, so that every consumed tile is kSlots - 1 groups behind.
__device__ __forceinline__ void IssueTile(const Phase* ph, int n, int64_t gw, int64_t nw, Cursor& c, uint32_t slot, int lane) {
  if (c.p < n) {
    const char* src = (c.s != 0 ? c.row[1] : c.row[0]) + static_cast<size_t>(c.t) * kTileBytes + lane * 16;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(slot), "l"(src) : "memory");
    Advance(ph, n, gw, nw, c);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
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
  const Phase* ph;
  int n;
  int64_t gw, nw;
  Cursor c;
  uint32_t ring;  // this lane's 16 bytes of slot 0 of this warp's ring (shared address)
  int slot;       // next slot to consume
  int lane;
};

template <int kSlots>
__device__ __forceinline__ void GemvPhase(const Phase& ph, Stream& st, const float* stage) {
  const int lane = st.lane, subs = ph.swiglu ? 2 : 1;
  const float* hi = stage + ph.cols / 2;
  for (int64_t u = st.gw; u < ph.units; u += st.nw) {
    float acc[2] = {0.0f, 0.0f};  // the row's sum; with SwiGLU gate's and up's
    for (int t = 0; t < ph.tiles; ++t) {
      const int c = (t * 32 + lane) * 4;
      const float4 a = *reinterpret_cast<const float4*>(stage + c), b = *reinterpret_cast<const float4*>(hi + c);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        if (s == subs) break;
        asm volatile("cp.async.wait_group %0;" ::"n"(kSlots - 2) : "memory");
        uint4 wv;
        const uint32_t src = st.ring + st.slot * kTileBytes;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(wv.x), "=r"(wv.y), "=r"(wv.z), "=r"(wv.w) : "r"(src));
        IssueTile(st.ph, st.n, st.gw, st.nw, st.c, st.ring + ((st.slot + kSlots - 1) % kSlots) * kTileBytes, lane);
        st.slot = (st.slot + 1) % kSlots;
        acc[s] = Dot8(wv, a, b, acc[s]);
      }
    }
    const float acc0 = WarpSum(acc[0]), acc1 = subs == 2 ? WarpSum(acc[1]) : 0.0f;
    if (lane != 0) continue;
    if (ph.swiglu) {
      __stcg(ph.out[0] + u, acc0);
      __stcg(ph.out[1] + u, acc1);
      __stcg(ph.swiglu_out + u, __fmul_rn(acc0 / (1.0f + expf(-acc0)), acc1));  // SwiGluKernel's arithmetic; may alias gate
    } else {
      int j = 0;
      int64_t r = u;
      while (j + 1 < ph.count && r >= ph.rows[j]) r -= ph.rows[j++];
      __stcg(ph.out[j] + r, acc0);
      if (ph.residual != nullptr) __stcg(ph.residual + r, __ldcg(ph.residual + r) + acc0);
    }
  }
}

// Asks L2 for the keys and values the block's attention task will read (all but the new token,
// written by the attention phase itself), so that its loads do not queue behind the weight stream.
__device__ __forceinline__ void PrefetchKv(const Phase& ph) {
  const int pos = __ldg(ph.meta.pos), len = pos + 1, S = Splits(len), chunk = (len + S - 1) / S;
  const int32_t* table = ph.meta.tables + __ldg(ph.meta.table_offset);
  for (int task = blockIdx.x; task < ph.kv_heads * S; task += gridDim.x) {
    const int kv = task / S, begin = (task % S) * chunk, end = min(pos, begin + chunk);
    // 4 lines of 128 bytes a key: K and V of one kv head (128 bf16 each).
    for (int e = threadIdx.x; e < (end - begin) * 4; e += kThreads) {
      const int j = begin + e / 4, part = e % 4;
      const __nv_bfloat16* p = ph.cache + SlotOffset(ph.g, table, j) + static_cast<size_t>(kv) * kHeadDim + (part % 2) * 64 +
                               (part / 2) * ph.g.v_delta;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
  }
}

// RoPE + KV write + attention of one row: task (kv head, key split) per block; each task's
// normalized output and (max, sum) go to `partial` for the merge phase.
__device__ __noinline__ void AttentionPhase(const Phase& ph, float* stage, float* partial) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, half = lane / 16;
  const int pos = __ldg(ph.meta.pos), len = pos + 1, S = Splits(len);
  const int32_t* table = ph.meta.tables + __ldg(ph.meta.table_offset);
  const int chunk = (len + S - 1) / S;
  float* s_q = stage;                   // [4][128]
  float* s_k = stage + kGroup * kHeadDim;  // [128]
  auto& s_max = *reinterpret_cast<float(*)[kWarps][kGroup]>(stage + 5 * kHeadDim);
  auto& s_sum = *reinterpret_cast<float(*)[kWarps][kGroup]>(stage + 5 * kHeadDim + kWarps * kGroup);
  auto& s_acc = *reinterpret_cast<float(*)[kWarps][kGroup][kHeadDim]>(stage + 5 * kHeadDim + 2 * kWarps * kGroup);
  const int d0 = (lane % 16) * kPerLane;
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
    float qv[kGroup][kPerLane], acc[kGroup][kPerLane], mx[kGroup], sum[kGroup];
#pragma unroll
    for (int gi = 0; gi < kGroup; ++gi) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        qv[gi][i] = s_q[gi * kHeadDim + d0 + i];
        acc[gi][i] = 0.0f;
      }
      mx[gi] = -INFINITY;
      sum[gi] = 0.0f;
    }
    HalfWarpAttend<kPerLane, kGroup, true, kWarps>(ph.cache, ph.g, table, kv, begin, end, ph.scale, qv, mx, sum, acc);
#pragma unroll
    for (int gi = 0; gi < kGroup; ++gi) {
      if (lane == 0) {
        s_max[warp][gi] = mx[gi];
        s_sum[warp][gi] = sum[gi];
      }
      if (half == 0) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) s_acc[warp][gi][d0 + i] = acc[gi][i];
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
  }
}

// The key splits merged into the attention output (the cluster kernel's arithmetic), and q rotated
// in place as RopeWriteKv leaves it (the attention phase rotated private copies).
__device__ __forceinline__ void MergePhase(const Phase& ph, const float* partial) {
  const int pos = __ldg(ph.meta.pos), S = Splits(pos + 1);
  const int n = ph.num_heads * kHeadDim;
  for (int e = blockIdx.x * kThreads + threadIdx.x; e < n; e += gridDim.x * kThreads) {
    const int hq = e / kHeadDim, d = e % kHeadDim, kv = hq / kGroup, gi = hq % kGroup;
    const float* base = partial + static_cast<size_t>(kv) * S * kPartFloats;
    float total_max = -INFINITY;
    for (int s = 0; s < S; ++s) {
      const float* ml = base + s * kPartFloats + kGroup * kHeadDim + 2 * gi;
      if (__ldcg(ml + 1) > 0.0f) total_max = fmaxf(total_max, __ldcg(ml));
    }
    float total = 0.0f, o = 0.0f;
    for (int s = 0; s < S; ++s) {
      const float* ml = base + s * kPartFloats + kGroup * kHeadDim + 2 * gi;
      const float sm = __ldcg(ml + 1);
      const float w = sm > 0.0f ? sm * expf(__ldcg(ml) - total_max) : 0.0f;
      total += w;
      if (w > 0.0f) o += __ldcg(base + s * kPartFloats + gi * kHeadDim + d) * w;
    }
    __stcg(ph.attn_out + e, o * (1.0f / total));
  }
  const int half = kHeadDim / 2;
  for (int t = blockIdx.x * kThreads + threadIdx.x; t < ph.num_heads * half; t += gridDim.x * kThreads) {
    const int j = t % half, base = (t / half) * kHeadDim;
    const float c = ph.cos_sin[j * 2], s = ph.cos_sin[j * 2 + 1];
    const int a = base + (ph.neox ? j : 2 * j), b = base + (ph.neox ? j + half : 2 * j + 1);
    const float x0 = __ldcg(ph.q + a), x1 = __ldcg(ph.q + b);
    __stcg(ph.q + a, __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
    __stcg(ph.q + b, __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
  }
}

// scratch: [partial floats][barrier count][exit count].
// trace (DYN_CUDA_PERSIST_TRACE=1, eager launches): each block's global timer at each phase's start
// and end, [2][phases][grid] nanoseconds.
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

template <int kSlots>
__global__ void __launch_bounds__(kThreads, 1)
    PersistentKernel(const Program* __restrict__ prog, float* partial, unsigned* sync, unsigned long long* trace) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[kWarps + 1];
  const int n = prog->num_phases;
  const Phase* ph = prog->phases;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* stage = reinterpret_cast<float*>(smem + RingBytes(kSlots));
  Stream st;
  st.ph = ph;
  st.n = n;
  st.gw = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  st.nw = static_cast<int64_t>(gridDim.x) * kWarps;
  st.lane = lane;
  st.ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + warp * kSlots * kTileBytes + lane * 16;
  st.slot = 0;
  Seek(ph, n, 0, st.gw, st.c);
  // Weights do not depend on earlier kernels: the first tiles are requested before the wait.
  for (int i = 0; i < kSlots - 1; ++i) IssueTile(ph, n, st.gw, st.nw, st.c, st.ring + i * kTileBytes, lane);
  WaitForPreviousKernel();
  unsigned target = 0;
  for (int p = 0; p < n; ++p) {
    if (p > 0) GridBarrier(sync, target);
    if (p == n - 1) LetNextKernelLaunch();
    if (trace != nullptr && threadIdx.x == 0) trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x] = GlobalTimer();
    const Phase& cur = ph[p];
    if (cur.kind == kGemvPhase) {
      if (p + 1 < n && ph[p + 1].kind == kAttentionPhase) PrefetchKv(ph[p + 1]);
      StageInput(cur, stage, red);
      GemvPhase<kSlots>(cur, st, stage);
    } else if (cur.kind == kAttentionPhase) {
      AttentionPhase(cur, stage, partial);
    } else {
      MergePhase(cur, partial);
    }
    if (trace != nullptr) {
      __syncthreads();
      if (threadIdx.x == 0) trace[static_cast<size_t>(n + p) * gridDim.x + blockIdx.x] = GlobalTimer();
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
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

bool GemvFits(const PersistentCall& c) {
  if (c.count < 1 || c.count > kGemvMaxJobs || c.cols <= 0 || c.cols % kTileCols != 0 || c.cols > kStageFloats) return false;
  if (c.swiglu_out != nullptr && (c.count != 2 || c.rows[0] != c.rows[1])) return false;
  for (int j = 0; j < c.count; ++j) {
    if (c.w[j] == nullptr || c.rows[j] <= 0 || reinterpret_cast<uintptr_t>(c.w[j]) % 16 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(c.in) % 16 == 0;
}

bool AttentionFits(const PersistentCall& c) {
  const KvLayout& l = c.layout;
  return c.rope.cos_sin != nullptr && c.meta.decode && c.meta.rows == 1 && c.meta.num_rowwise == 1 && c.meta.num_tiles == 0 &&
         l.dtype == DType::kBF16 && l.head_dim == kHeadDim && l.num_kv_heads > 0 && l.num_kv_heads <= kMaxKvHeads &&
         c.num_heads == kGroup * l.num_kv_heads && c.rope.q == c.q;
}

std::atomic<int> g_launches{0};  // PersistentLaunches

}  // namespace

size_t PersistentScratchBytes() { return (size_t{kMaxKvHeads} * kMaxSplits * kPartFloats + 64) * sizeof(float); }

int PlanPersistent(std::span<const PersistentCall> calls, std::vector<unsigned char>* program) {
  std::vector<Phase> phases;
  struct {
    bool active = false;
    const float* x = nullptr;
    const float* w = nullptr;
    float eps = 0.0f;
    float* out = nullptr;
    int dim = 0;
  } norm;
  int complete = 0;                 // calls taken so far that leave no norm pending
  size_t complete_phases = 0;
  int residual_phase = -1;          // the phase an AddNorm not yet consumed gave a residual
  int gemv_phases = 0, complete_gemv_phases = 0;
  for (size_t i = 0; i < calls.size(); ++i) {
    const PersistentCall& c = calls[i];
    if (c.kind == PersistentCall::kNorm) {
      if (norm.active || c.dim <= 0) break;
      norm = {true, c.x, c.norm_w, c.eps, c.norm_out, c.dim};
      continue;
    }
    if (c.kind == PersistentCall::kAddNorm) {
      if (norm.active || phases.empty()) break;
      Phase& prev = phases.back();
      if (prev.kind != kGemvPhase || prev.swiglu || prev.count != 1 || prev.residual != nullptr || prev.out[0] != c.y ||
          prev.rows[0] != c.dim) {
        break;
      }
      prev.residual = c.x;
      residual_phase = static_cast<int>(phases.size()) - 1;
      norm = {true, c.x, c.norm_w, c.eps, c.norm_out, c.dim};
      continue;
    }
    if (c.kind == PersistentCall::kGemv) {
      if (!GemvFits(c)) break;
      Phase p{};
      p.kind = kGemvPhase;
      p.count = c.count;
      p.swiglu = c.swiglu_out != nullptr;
      p.cols = static_cast<int32_t>(c.cols);
      p.tiles = p.cols / kTileCols;
      p.units = 0;
      for (int j = 0; j < c.count; ++j) {
        p.rows[j] = c.rows[j];
        p.w[j] = c.w[j];
        p.out[j] = c.out[j];
        p.units += c.rows[j];
      }
      if (p.swiglu) p.units = c.rows[0];
      p.swiglu_out = c.swiglu_out;
      p.in = c.in;
      if (norm.active) {
        if (c.in != norm.out || c.cols != norm.dim || reinterpret_cast<uintptr_t>(norm.x) % 16 != 0) break;
        p.in = norm.x;
        p.norm_w = norm.w;
        p.eps = norm.eps;
        p.norm_out = norm.out;
        norm.active = false;
        residual_phase = -1;
      }
      phases.push_back(p);
      ++gemv_phases;
    } else if (c.kind == PersistentCall::kDecodeAttention) {
      if (norm.active || !AttentionFits(c)) break;
      Phase p{};
      p.kind = kAttentionPhase;
      p.cache = static_cast<__nv_bfloat16*>(c.cache);
      p.g = Geometry(c.layout, c.layer);
      p.meta = c.meta;
      p.q = c.rope.q;
      p.k = c.rope.k;
      p.v = c.rope.v;
      p.cos_sin = c.rope.cos_sin;
      p.neox = c.rope.neox ? 1 : 0;
      p.num_heads = c.num_heads;
      p.kv_heads = c.layout.num_kv_heads;
      p.scale = c.scale;
      p.attn_out = c.attn_out;
      phases.push_back(p);
      p.kind = kMergePhase;
      phases.push_back(p);
    } else {
      break;
    }
    complete = static_cast<int>(i) + 1;
    complete_phases = phases.size();
    complete_gemv_phases = gemv_phases;
  }
  if (residual_phase >= 0 && static_cast<size_t>(residual_phase) < complete_phases) phases[residual_phase].residual = nullptr;
  if (complete_gemv_phases < kMinGemvPhases) return 0;
  if (complete_phases > kMaxPhases) return 0;
  phases.resize(complete_phases);
  program->assign(offsetof(Program, phases) + phases.size() * sizeof(Phase), 0);
  const int32_t count = static_cast<int32_t>(phases.size());
  std::memcpy(program->data(), &count, sizeof(count));
  std::memcpy(program->data() + offsetof(Program, phases), phases.data(), phases.size() * sizeof(Phase));
  return complete;
}

// Per phase kind, averaged over the phases of that kind: the time from the phase's start (the
// earliest block's) to the median and the last block's end, and from the last end to the next
// phase's start (the barrier).
void PrintTrace(cudaStream_t stream, const void* program, const unsigned long long* trace, int grid) {
  Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize", __FILE__, __LINE__);
  int32_t n = 0;
  Check(cudaMemcpy(&n, program, sizeof(n), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  std::vector<Phase> phases(n);
  Check(cudaMemcpy(phases.data(), static_cast<const char*>(program) + offsetof(Program, phases), n * sizeof(Phase),
                   cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  std::vector<unsigned long long> t(size_t{2} * n * grid);
  Check(cudaMemcpy(t.data(), trace, t.size() * sizeof(t[0]), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  struct Acc { double work = 0, tail = 0, barrier = 0; int count = 0; };
  std::map<std::string, Acc> by_kind;
  const unsigned long long t0 = *std::min_element(t.begin(), t.begin() + grid);
  unsigned long long last_end = 0;
  for (int p = 0; p < n; ++p) {
    std::vector<unsigned long long> starts(t.begin() + static_cast<size_t>(p) * grid, t.begin() + static_cast<size_t>(p + 1) * grid);
    std::vector<unsigned long long> ends(t.begin() + static_cast<size_t>(n + p) * grid, t.begin() + static_cast<size_t>(n + p + 1) * grid);
    std::sort(ends.begin(), ends.end());
    const unsigned long long start = *std::min_element(starts.begin(), starts.end());
    const Phase& ph = phases[p];
    std::string kind = ph.kind == kAttentionPhase ? "attention" : ph.kind == kMergePhase ? "merge" : "gemv";
    if (ph.kind == kGemvPhase) kind += " " + std::to_string(ph.units) + "x" + std::to_string(ph.cols) + (ph.swiglu ? " swiglu" : "") + (ph.norm_w ? " norm" : "");
    Acc& a = by_kind[kind];
    a.work += (ends[grid / 2] - start) * 1e-3;
    a.tail += (ends.back() - ends[grid / 2]) * 1e-3;
    if (p > 0) by_kind[kind].barrier += (start - last_end) * 1e-3;
    ++a.count;
    last_end = ends.back();
  }
  std::fprintf(stderr, "persistent kernel: %d phases, %.1f us from the first block's start to the last end\n", n, (last_end - t0) * 1e-3);
  for (const auto& [kind, a] : by_kind) {
    std::fprintf(stderr, "  %-32s x%3d: work %7.2f us (median block), tail %6.2f, barrier before %6.2f; total %8.1f us\n", kind.c_str(), a.count,
                 a.work / a.count, a.tail / a.count, a.barrier / a.count, a.work + a.tail + a.barrier);
  }
}

void LaunchPersistent(cudaStream_t stream, const void* program, void* scratch) {
  static const int slots = [] {
    const char* v = std::getenv("DYN_CUDA_PERSIST_SLOTS");
    return v != nullptr && std::atoi(v) == 20 ? 20 : kDefaultSlots;
  }();
  auto kernel = slots == 20 ? PersistentKernel<20> : PersistentKernel<kDefaultSlots>;
  const size_t smem = SmemBytes(slots);
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
  unsigned* sync = reinterpret_cast<unsigned*>(partial + size_t{kMaxKvHeads} * kMaxSplits * kPartFloats);
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
  if (trace != nullptr) PrintTrace(stream, program, trace, grid);
  ++g_launches;
}

int PersistentLaunches() { return g_launches.load(); }

}  // namespace dyn::cuda
