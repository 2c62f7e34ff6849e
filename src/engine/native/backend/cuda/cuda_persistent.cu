// Batch-1 decode as one persistent kernel: a run of a step's one-row calls (RMSNorm, the GEMVs,
// decode attention with its RoPE + KV write) executed by one block per multiprocessor, phase after
// phase; a phase waits only for the values it reads, which earlier phases hand on as stamped
// entries (cuda_persistent.cuh), not at a grid barrier. Opt-in (DYN_CUDA_PERSIST=1): as fast as
// the kernel-by-kernel step at contexts 512 and 4096, not faster (docs/benchmarks/cuda.md, rounds
// 8-12).
//
// Why: at batch 1 the step is bound by reading the weights once (16 GB for the 8B shape), but as
// separate kernels HBM idles while each grid ramps up and drains and while the small kernels
// (norms, attention) run: the GEMVs alone stream at ~4 TB/s and the step loses a further ~20% to
// the kernels between them (rounds 5-7). Here a producer warp in each block streams the block's
// rows of every matrix, one after another, into a shared-memory ring by bulk copies, ahead of the
// warps that multiply them: the next matrix is on its way while a phase waits for its input, a
// norm is computed or attention runs. RMSNorm runs inside the next GEMV's input staging (every
// block normalizes the row into shared memory), the residual add in the epilogue of the GEMV
// before it, the attention split merge in the task of each kv head's last split.
// DYN_CUDA_PERSIST_TRACE=1 (with DYN_CUDA_GRAPHS=0) prints where a launch spent its time.
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
#include "engine/native/backend/cuda/cuda_persistent_attention.cuh"
#include "engine/native/backend/cuda/cuda_persistent_device.cuh"

namespace dyn::cuda {
namespace {

using namespace persist;

std::atomic<int> g_launches{0};  // PersistentLaunches

// ---- the weight stream ----

// Unit u of a phase without SwiGLU as (weight j, row r): units count rows over the weights in order.
__device__ __forceinline__ int JobRow(const Phase& ph, int u, int& r) {
  int j = 0;
  r = u;
  while (j + 1 < ph.count && r >= ph.rows[j]) r -= static_cast<int>(ph.rows[j++]);
  return j;
}

// Block b's units of a GEMV phase are [first, first + count): contiguous, so its weights are a few
// long runs of memory. In the stream each unit is its row's chunks in order, or with SwiGLU the gate
// row's and the up row's chunks alternately.
struct BlockUnits {
  int first, count;
};
__device__ __forceinline__ BlockUnits UnitsOf(const Phase& ph, int b, int blocks) {
  const int a = static_cast<int>(ph.units * b / blocks), e = static_cast<int>(ph.units * (b + 1) / blocks);
  return {a, e - a};
}
__device__ __forceinline__ int RowChunks(const Phase& ph) { return (ph.tiles + kChunkTiles - 1) / kChunkTiles; }

// Chunk `seq` of a block's stream goes to slot seq % kRingSlots in round seq / kRingSlots. Its
// producer and its consumer warp first wait until the slot's earlier rounds are consumed; then the
// consumer waits on the slot's mbarrier for the copy (no other round of it can be pending).
struct Ring {
  unsigned char* slots;  // kRingSlots x kChunkBytes
  uint64_t* full;        // completes a phase when a slot's copy has landed
  unsigned* consumed;    // rounds of each slot read by their consumer warp
};

// The producer (one lane): every GEMV phase's chunks of this block, in the order the consumers take
// them, each into the next slot once its previous contents have been read. The phase's fields are
// read once per phase and the rows walked by pointer: a load from the program in global memory per
// chunk waits on L2 behind the weight stream and throttled it (docs/benchmarks/cuda.md, round 9).
__device__ void ProduceWeights(const Program* prog, const Ring& ring) {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  unsigned seq = 0;
  const int n = prog->num_phases;
  for (int p = 0; p < n; ++p) {
    const Phase& ph = prog->phases[p];
    if (ph.kind != kGemvPhase) continue;
    const BlockUnits bu = UnitsOf(ph, blockIdx.x, gridDim.x);
    if (bu.count == 0) continue;
    const bool swiglu = ph.swiglu != 0;
    const int count = ph.count, row_chunks = RowChunks(ph);
    const size_t row_bytes = static_cast<size_t>(ph.cols) * 2;
    const unsigned last_bytes = static_cast<unsigned>(row_bytes - static_cast<size_t>(row_chunks - 1) * kChunkBytes);
    int r;
    int j = JobRow(ph, bu.first, r);  // with SwiGLU (0, unit): units stay below the gate's rows
    int64_t job_rows = ph.rows[j];
    const char* row = reinterpret_cast<const char*>(ph.w[j]) + static_cast<size_t>(r) * row_bytes;
    const char* up = swiglu ? reinterpret_cast<const char*>(ph.w[1]) + static_cast<size_t>(r) * row_bytes : nullptr;
    for (int i = 0; i < bu.count; ++i) {
      for (int c = 0; c < row_chunks; ++c) {
        const unsigned bytes = c + 1 < row_chunks ? kChunkBytes : last_bytes;
        for (int half = 0; half < (swiglu ? 2 : 1); ++half, ++seq) {
          const int slot = static_cast<int>(seq % kRingSlots);
          WaitConsumed(ring.consumed + slot, seq / kRingSlots);
          BulkLoad(ring.slots + static_cast<size_t>(slot) * kChunkBytes, (half ? up : row) + static_cast<size_t>(c) * kChunkBytes, bytes,
                   ring.full + slot, policy);
        }
      }
      row += row_bytes;
      if (swiglu) {
        up += row_bytes;
      } else if (++r == job_rows && j + 1 < count) {
        ++j;
        r = 0;
        job_rows = ph.rows[j];
        row = reinterpret_cast<const char*>(ph.w[j]);
      }
    }
  }
}

// The 8 products of a lane's 16 weight bytes with its 8 inputs (a: the first 4, b: the last 4).
__device__ __forceinline__ float Dot8(const uint4& wv, const float4& a, const float4& b, float acc) {
  const uint32_t ws[4] = {wv.x, wv.y, wv.z, wv.w};
  const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    Bf16x2ToFloat(ws[i], lo, hi);
    acc = fmaf(lo, xs[2 * i], acc);
    acc = fmaf(hi, xs[2 * i + 1], acc);
  }
  return acc;
}

// A lane's share of one chunk's products: `count` tiles of w0 (and with kTwo of w1) against the
// staged input (lo, hi: this lane's first tile's halves; a tile is 128 floats further). Tiles go in
// groups of kGroupTiles whose shared-memory loads issue together, each with its own accumulator, so
// a warp's chunk costs a few load latencies: one tile at a time (loads, then 8 dependent FMAs) took
// ~1.5 us a chunk, and with 15 warps the ring's landed chunks drained no faster than HBM fills it
// (docs/benchmarks/cuda.md, round 10).
constexpr int kGroupTiles = 4;
template <bool kTwo>
__device__ __forceinline__ void ChunkDot(const unsigned char* w0, const unsigned char* w1, const float* lo, const float* hi, int count,
                                         float& sum0, float& sum1) {
  float acc0[kGroupTiles] = {}, acc1[kGroupTiles] = {};
  int t = 0;
  for (; t + kGroupTiles <= count; t += kGroupTiles) {
    uint4 wa[kGroupTiles], wb[kGroupTiles];
    float4 a[kGroupTiles], b[kGroupTiles];
#pragma unroll
    for (int u = 0; u < kGroupTiles; ++u) {
      wa[u] = *reinterpret_cast<const uint4*>(w0 + (t + u) * kTileBytes);
      if (kTwo) wb[u] = *reinterpret_cast<const uint4*>(w1 + (t + u) * kTileBytes);
      a[u] = *reinterpret_cast<const float4*>(lo + (t + u) * kTileCols / 2);
      b[u] = *reinterpret_cast<const float4*>(hi + (t + u) * kTileCols / 2);
    }
#pragma unroll
    for (int u = 0; u < kGroupTiles; ++u) {
      acc0[u] = Dot8(wa[u], a[u], b[u], acc0[u]);
      if (kTwo) acc1[u] = Dot8(wb[u], a[u], b[u], acc1[u]);
    }
  }
  for (; t < count; ++t) {
    const float4 a = *reinterpret_cast<const float4*>(lo + t * kTileCols / 2), b = *reinterpret_cast<const float4*>(hi + t * kTileCols / 2);
    acc0[0] = Dot8(*reinterpret_cast<const uint4*>(w0 + t * kTileBytes), a, b, acc0[0]);
    if (kTwo) acc1[0] = Dot8(*reinterpret_cast<const uint4*>(w1 + t * kTileBytes), a, b, acc1[0]);
  }
  sum0 = (acc0[0] + acc0[1]) + (acc0[2] + acc0[3]);
  sum1 = kTwo ? (acc1[0] + acc1[1]) + (acc1[2] + acc1[3]) : 0.0f;
}
static_assert(kGroupTiles == 4, "ChunkDot's final sums add four accumulators");

// ---- phases ----

// Where input elements i..i+3 (i % 4 == 0) lie in the staged row: the first halves of the 8-element
// chunks, then the second halves, so that a warp reading chunk t * 32 + lane (16 bytes from each
// half) reads 512 contiguous bytes twice, without bank conflicts.
__device__ __forceinline__ int StagePos(int i, int cols) { return (i / 8) * 4 + ((i / 4) % 2) * (cols / 2); }

// The phase's input row into shared memory (times the norm weight for a norm phase). Each thread
// issues its loads of a pass (kStageVecs float4 of the input, and of the norm weight) together: a
// loop of dependent round trips to L2 took 1.3-3 us a phase (docs/benchmarks/cuda.md, round 10).
constexpr int kStageVecs = 3, kStagePass = kConsumerThreads * 4 * kStageVecs;

// The input row into `stage` by passes of loads issued together, from the row's hand-off entries
// (ll, this launch's stamp) or, for a row written before the launch (ll null), plainly; with kNormW
// each element times its norm weight (x * w rounded: the norm's scale comes in the epilogue);
// returns the thread's sum of squares of x.
template <bool kNormW>
__device__ __forceinline__ float StageRow(const Phase& ph, const uint64_t* ll, unsigned stamp, float* stage) {
  const int cols = ph.cols;
  float ss = 0.0f;
  for (int base = threadIdx.x * 4; base < cols; base += kStagePass) {
    float4 v[kStageVecs], w[kStageVecs];
    if (ll != nullptr) {
      ulonglong2 e[kStageVecs][2];
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        const int i = min(base + u * kConsumerThreads * 4, cols - 4);
        e[u][0] = LlLoad2(ll + i);
        e[u][1] = LlLoad2(ll + i + 2);
        if (kNormW) w[u] = __ldg(reinterpret_cast<const float4*>(ph.norm_w + i));
      }
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        const int i = min(base + u * kConsumerThreads * 4, cols - 4);
        const float2 a = LlWait2(ll + i, stamp, e[u][0]), b = LlWait2(ll + i + 2, stamp, e[u][1]);
        v[u] = make_float4(a.x, a.y, b.x, b.y);
      }
    } else {
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        const int i = min(base + u * kConsumerThreads * 4, cols - 4);  // in bounds; the stores below skip repeats
        v[u] = __ldcg(reinterpret_cast<const float4*>(ph.in + i));
        if (kNormW) w[u] = __ldg(reinterpret_cast<const float4*>(ph.norm_w + i));
      }
    }
#pragma unroll
    for (int u = 0; u < kStageVecs; ++u) {
      const int i = base + u * kConsumerThreads * 4;
      if (i < cols) {
        *reinterpret_cast<float4*>(stage + StagePos(i, cols)) =
            kNormW ? make_float4(__fmul_rn(v[u].x, w[u].x), __fmul_rn(v[u].y, w[u].y), __fmul_rn(v[u].z, w[u].z), __fmul_rn(v[u].w, w[u].w))
                   : v[u];
        ss = fmaf(v[u].x, v[u].x, ss);
        ss = fmaf(v[u].y, v[u].y, ss);
        ss = fmaf(v[u].z, v[u].z, ss);
        ss = fmaf(v[u].w, v[u].w, ss);
      }
    }
  }
  return ss;
}

// marks (traced launches): the phase's start time and the block's PhaseMark words. Returns the
// scale the phase's outputs take: RmsNorm's 1 / rms(x) for a norm phase (the staged row is x * w,
// and W (x * w * s) = s * W (x * w)), else 1. Folding the scale into the epilogue spares the
// block a barrier and a pass over the row before its warps start on the chunks (~1.2 us a norm
// phase: round 12); the products round in another order than RmsNorm's (x * s, then * w).
__device__ __forceinline__ float StageInput(const Phase& ph, const uint64_t* ll_base, unsigned stamp, float* stage, float* red,
                                         unsigned long long t_start, unsigned long long* marks) {
  const int tid = threadIdx.x, cols = ph.cols;
  const bool norm = ph.norm_w != nullptr;
  const uint64_t* ll = ph.ll_in >= 0 ? ll_base + ph.ll_in : nullptr;
  float ss = norm ? StageRow<true>(ph, ll, stamp, stage) : StageRow<false>(ph, ll, stamp, stage);
  if (marks != nullptr) {  // the block's last thread: one atomic a warp
    const unsigned loaded = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(GlobalTimer() - t_start));
    if (tid % 32 == 0) atomicMax(marks + kMarkStageLoaded, static_cast<unsigned long long>(loaded));
  }
  if (norm) {
    ss = WarpSum(ss);
    if (tid % 32 == 0) red[tid / 32] = ss;
  }
  ConsumerSync();
  if (!norm) return 1.0f;
  float total = 0.0f;  // every thread adds the warps' sums, in warp order
  for (int w = 0; w < kConsumers; ++w) total += red[w];
  const float scale = 1.0f / sqrtf(total / cols + ph.eps);
  if (marks != nullptr && tid == 0) marks[kMarkStageNormed] = GlobalTimer() - t_start;
  if (blockIdx.x == 0 && ph.norm_out != nullptr) {  // the normalized row for readers after the launch
    for (int i = tid * 4; i < cols; i += kConsumerThreads * 4) {
      const float4 v = *reinterpret_cast<const float4*>(stage + StagePos(i, cols));
      __stcg(reinterpret_cast<float4*>(ph.norm_out + i),
             make_float4(__fmul_rn(v.x, scale), __fmul_rn(v.y, scale), __fmul_rn(v.z, scale), __fmul_rn(v.w, scale)));
    }
  }
  return scale;
}

// Unit u's outputs from its row sums (with SwiGLU sum0 the gate's, sum1 the up's).
// res: residual[u] loaded ahead (the dependent L2 load after the sums held the warp ~1 us a row).
// A phase with a residual has one weight, so its unit is the row; its entries hand on the sums.
// The plain stores are for readers after the launch; phases of this launch read the entries (ll).
__device__ __forceinline__ void GemvEpilogue(const Phase& ph, uint64_t* ll, unsigned stamp, int u, float sum0, float sum1, float res,
                                             float scale) {
  sum0 *= scale;
  sum1 *= scale;
  if (ph.swiglu) {
    const float g = SiluMul(sum0, sum1);
    __stcg(ph.out[0] + u, sum0);
    __stcg(ph.out[1] + u, sum1);
    __stcg(ph.swiglu_out + u, g);  // may alias gate
    if (ll != nullptr) LlPut(ll + u, g, stamp);
  } else {
    int r;
    const int j = JobRow(ph, u, r);
    __stcg(ph.out[j] + r, sum0);
    const float handed = ph.residual != nullptr ? res + sum0 : sum0;
    if (ph.residual != nullptr) __stcg(ph.residual + u, handed);
    if (ll != nullptr) LlPut(ll + u, handed, stamp);
  }
}

// The residual row's element u before this phase's add: from the entry of the phase that last
// added to it, or plainly when it was written before the launch.
__device__ __forceinline__ float ResidualIn(const Phase& ph, const uint64_t* ll_base, unsigned stamp, int u) {
  return ph.ll_res >= 0 ? LlWait(ll_base + ph.ll_res + u, stamp) : __ldcg(ph.residual + u);
}

// The block's chunks of the phase, consumed by warp w as items w, w + kConsumers, ...: item k is
// chunk k % row_chunks of unit k / row_chunks (with SwiGLU, that chunk of the gate row and of the
// up row against one read of the input). Rows of one chunk are finished by their warp; longer rows
// leave each chunk's sum in shared memory (after the staged input) and are added up in chunk order
// once all are in. `seq` is the stream position of the block's first chunk of the phase (the
// producer's count), advanced here.
__device__ __forceinline__ void GemvPhase(const Phase& ph, uint64_t* ll_base, unsigned stamp, const Ring& ring, unsigned& seq, float* stage,
                                          float scale, unsigned long long* gm) {
  uint64_t* ll = ph.ll_out >= 0 ? ll_base + ph.ll_out : nullptr;
  unsigned long long ready = 0, waited = 0, taken = 0, processed = 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool swiglu = ph.swiglu != 0;
  const int cols = ph.cols, tiles = ph.tiles, row_chunks = RowChunks(ph), per_chunk = swiglu ? 2 : 1;
  const float* hi = stage + cols / 2;
  // Rows longer than a slot: per unit its chunks' (gate, up) sums, a count of its chunks done and
  // its residual element (loaded by the chunk-0 warp ahead of its chunk wait). The warp that
  // completes a row finishes it, so rows are handed on as they complete, not all after the block's
  // last chunk (that took 2.6 us after the down projection's chunks: round 11).
  float* sums = stage + cols;
  const int stride = UnitSumsFloats(row_chunks);
  const BlockUnits bu = UnitsOf(ph, blockIdx.x, gridDim.x);
  const int items = bu.count * row_chunks;
  if (row_chunks > 1) {
    for (int i = threadIdx.x; i < bu.count; i += kConsumerThreads) reinterpret_cast<unsigned*>(sums)[i * stride + 2 * row_chunks] = 0;
    ConsumerSync();
  }
  for (int k = warp; k < items; k += kConsumers) {
    const int c = k % row_chunks, t0 = c * kChunkTiles, count = min(kChunkTiles, tiles - t0);
    const unsigned s0 = seq + static_cast<unsigned>(k * per_chunk);
    const int slot0 = static_cast<int>(s0 % kRingSlots), slot1 = static_cast<int>((s0 + 1) % kRingSlots);
    const unsigned r0 = s0 / kRingSlots, r1 = (s0 + 1) / kRingSlots;
    float res = 0.0f;
    if (lane == 0 && c == 0 && ph.residual != nullptr) res = ResidualIn(ph, ll_base, stamp, bu.first + k / row_chunks);
    unsigned long long t_wait = 0;
    if (gm != nullptr && lane == 0) {
      t_wait = GlobalTimer();
      taken += per_chunk;
      ready += BarrierTest(ring.full + slot0, r0 % 2) ? 1 : 0;
      if (swiglu) ready += BarrierTest(ring.full + slot1, r1 % 2) ? 1 : 0;
    }
    if (lane == 0) {
      WaitConsumed(ring.consumed + slot0, r0, 64);
      if (swiglu) WaitConsumed(ring.consumed + slot1, r1, 64);
    }
    __syncwarp();
    BarrierWait(ring.full + slot0, r0 % 2);
    if (swiglu) BarrierWait(ring.full + slot1, r1 % 2);
    unsigned long long t_ready = 0;
    if (gm != nullptr && lane == 0) {
      t_ready = GlobalTimer();
      waited += t_ready - t_wait;
    }
    const unsigned char* w0 = ring.slots + static_cast<size_t>(slot0) * kChunkBytes + lane * 16;
    const unsigned char* w1 = ring.slots + static_cast<size_t>(slot1) * kChunkBytes + lane * 16;
    float acc0, acc1 = 0.0f;  // with SwiGLU gate's and up's
    const int x0 = (t0 * 32 + lane) * 4;
    if (swiglu) {
      ChunkDot<true>(w0, w1, stage + x0, hi + x0, count, acc0, acc1);
    } else {
      ChunkDot<false>(w0, w1, stage + x0, hi + x0, count, acc0, acc1);
    }
    __syncwarp();
    if (lane == 0) {
      SetConsumed(ring.consumed + slot0, r0 + 1);
      if (swiglu) SetConsumed(ring.consumed + slot1, r1 + 1);
    }
    const float sum0 = WarpSum(acc0), sum1 = swiglu ? WarpSum(acc1) : 0.0f;
    if (lane != 0) continue;
    if (row_chunks > 1) {
      float* unit_sums = sums + (k / row_chunks) * stride;
      unit_sums[2 * c] = sum0;
      unit_sums[2 * c + 1] = sum1;
      if (c == 0) unit_sums[2 * row_chunks + 1] = res;
      __threadfence_block();  // the sums before the count
      if (atomicAdd(reinterpret_cast<unsigned*>(unit_sums + 2 * row_chunks), 1u) == static_cast<unsigned>(row_chunks - 1)) {
        __threadfence_block();  // the other chunks' sums after their counts
        float total0 = 0.0f, total1 = 0.0f;  // in chunk order, whichever warp finishes
        for (int cc = 0; cc < row_chunks; ++cc) {
          total0 += unit_sums[2 * cc];
          total1 += unit_sums[2 * cc + 1];
        }
        const int u = bu.first + k / row_chunks;
        GemvEpilogue(ph, ll, stamp, u, total0, total1, unit_sums[2 * row_chunks + 1], scale);
      }
    } else {
      GemvEpilogue(ph, ll, stamp, bu.first + k, sum0, sum1, res, scale);
    }
    if (gm != nullptr) processed += GlobalTimer() - t_ready;
  }
  seq += static_cast<unsigned>(items * per_chunk);
  if (gm != nullptr && lane == 0) {
    atomicAdd(gm + kMarkLanded, ready);
    atomicAdd(gm + kMarkTaken, taken);
    atomicAdd(gm + kMarkWaitNs, waited);
    atomicAdd(gm + kMarkWorkNs, processed);
    atomicMax(gm + kMarkChunksDone, GlobalTimer());
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    PersistentKernel(const Program* __restrict__ prog, unsigned* sync, uint64_t* ll_base, unsigned long long* trace) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float red[kConsumers + 1];
  __shared__ unsigned s_stamp;
  const int n = prog->num_phases;
  const Phase* ph = prog->phases;
  float* stage = reinterpret_cast<float*>(smem);
  Ring ring;
  ring.slots = smem + kRingOffset;
  ring.full = reinterpret_cast<uint64_t*>(smem + kBarrierOffset);
  ring.consumed = reinterpret_cast<unsigned*>(ring.full + kRingSlots);
  if (threadIdx.x < kRingSlots) {
    BarrierInit(ring.full + threadIdx.x, 1);  // the producer's arrival (with the copy's bytes)
    ring.consumed[threadIdx.x] = 0;
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  if (threadIdx.x >= kConsumerThreads) {
    // Weights do not depend on earlier kernels: the producer starts before the wait.
    if (threadIdx.x == kConsumerThreads) ProduceWeights(prog, ring);
    return;
  }
  WaitForPreviousKernel();
  // This launch's stamp: one more than the last launch's (every block reads the same count: the
  // last launch has finished and no block of this one writes it before all have read it).
  if (threadIdx.x == 0) s_stamp = __ldcg(sync + kLaunchWord) + 1;
  ConsumerSync();
  const unsigned stamp = s_stamp;
  if (trace != nullptr && threadIdx.x == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    trace[TraceSmidOffset(gridDim.x) + blockIdx.x] = smid;
  }
  unsigned seq = 0;
  for (int p = 0; p < n; ++p) {
    // The block's warps are done with the last phase's shared memory (the staged row, attention's
    // partial sums) before any of them stages this phase's.
    ConsumerSync();
    if (p == n - 1) LetNextKernelLaunch();
    if (trace != nullptr && threadIdx.x == 0) trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x] = GlobalTimer();
    const Phase& cur = ph[p];
    unsigned long long* gm = nullptr;
    if (trace != nullptr) {
      gm = trace + TraceGemvOffset(gridDim.x) + (static_cast<size_t>(p) * gridDim.x + blockIdx.x) * kGemvMarks;
      if (threadIdx.x == 0) gm[kMarkProbeStart] = TimedL2Load(sync + kLaunchWord);
      ConsumerSync();
    }
    if (cur.kind == kGemvPhase) {
      const float scale =
          StageInput(cur, ll_base, stamp, stage, red, gm != nullptr ? trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x] : 0, gm);
      if (gm != nullptr && threadIdx.x == 0) gm[kMarkStaged] = GlobalTimer() - trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x];
      GemvPhase(cur, ll_base, stamp, ring, seq, stage, scale, gm);
    } else if (cur.kind == kAttentionPhase) {
      unsigned long long* marks = trace != nullptr ? trace + TraceMarksOffset(gridDim.x) + blockIdx.x * kAttnMarks : nullptr;
      AttentionPhase(cur, ll_base, stamp, stage, marks);
    }
    if (trace != nullptr) {
      ConsumerSync();
      if (threadIdx.x == 0) {
        gm[kMarkProbeEnd] = TimedL2Load(sync + kLaunchWord);
        trace[static_cast<size_t>(n + p) * gridDim.x + blockIdx.x] = GlobalTimer();
      }
    }
  }
  ConsumerSync();
  if (threadIdx.x == 0) {
    // Every block has read the stamp once all have arrived here: the last one counts the launch
    // (the next launch reads it only after this grid has finished) and resets the exit count.
    if (atomicAdd(sync + kExitWord, 1u) == gridDim.x - 1) {
      sync[kLaunchWord] = stamp;
      sync[kExitWord] = 0;
    }
  }
}

}  // namespace

void LaunchPersistent(cudaStream_t stream, const void* program, void* scratch) {
  auto kernel = PersistentKernel;
  const size_t smem = kDynamicSmem;
  static const int grid = [&] {
    Check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), "cudaFuncSetAttribute",
          __FILE__, __LINE__);
    int per_sm = 0;
    Check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem), "cudaOccupancyMaxActiveBlocksPerMultiprocessor",
          __FILE__, __LINE__);
    if (per_sm < 1) Check(cudaErrorInvalidConfiguration, "PersistentKernel does not fit a multiprocessor", __FILE__, __LINE__);
    if (MultiprocessorCount() < kMinGrid) Check(cudaErrorInvalidConfiguration, "PersistentKernel needs more multiprocessors", __FILE__, __LINE__);
    return MultiprocessorCount();  // one block each: all resident at once, as the blocks wait for each other
  }();
  unsigned* sync = static_cast<unsigned*>(scratch);
  uint64_t* ll_base = reinterpret_cast<uint64_t*>(static_cast<char*>(scratch) + kLlOffset);
  static const bool tracing = [] {
    const char* t = std::getenv("DYN_CUDA_PERSIST_TRACE");
    return t != nullptr && std::string(t) == "1";
  }();
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  Check(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing", __FILE__, __LINE__);
  unsigned long long* trace = nullptr;
  if (tracing && capturing == cudaStreamCaptureStatusNone) {
    static unsigned long long* buf = nullptr;
    const size_t words = TraceWords(grid);
    if (buf == nullptr) Check(cudaMalloc(&buf, words * sizeof(unsigned long long)), "cudaMalloc", __FILE__, __LINE__);
    Check(cudaMemsetAsync(buf, 0, words * sizeof(unsigned long long), stream), "cudaMemsetAsync", __FILE__, __LINE__);
    trace = buf;
  }
  LaunchKernel(kernel, grid, kThreads, smem, stream, static_cast<const Program*>(program), sync, ll_base, trace);
  DYN_CUDA_CHECK_LAUNCH();
  if (trace != nullptr) PrintPersistentTrace(stream, program, trace, grid);
  ++g_launches;
}

int PersistentLaunches() { return g_launches.load(); }

}  // namespace dyn::cuda
