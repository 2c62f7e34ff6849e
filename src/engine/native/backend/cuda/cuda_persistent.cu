// Batch-1 decode as one persistent kernel: a run of a step's one-row calls (RMSNorm, the GEMVs,
// decode attention with its RoPE + KV write) executed by one block per multiprocessor, phase after
// phase; a phase waits only for the values it reads, which earlier phases hand on as stamped
// entries (cuda_persistent.cuh), not at a grid barrier. Opt-in (DYN_CUDA_PERSIST=1): at context
// 512 as fast as the kernel-by-kernel step, at 4096 0.1-0.15 ms slower (its attention key loop;
// docs/benchmarks/cuda.md, rounds 8-11).
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
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

using namespace persist;

// One block per multiprocessor: kConsumers warps compute (the GEMV phases, attention) and one
// producer warp streams the block's weights, phase after phase, through a ring of kRingSlots
// shared-memory slots of kChunkBytes filled by bulk copies (TMA) on mbarriers. The producer runs
// ahead of the consumers across phase boundaries, norms and attention (up to the ring's 160 KB a
// multiprocessor, ~21 MB over the grid), so HBM keeps streaming while the latency-bound steps
// between the matrices run.
constexpr int kConsumers = 15, kConsumerThreads = kConsumers * 32;
constexpr int kThreads = kConsumerThreads + 32;
constexpr int kChunkTiles = kChunkBytes / kTileBytes;
constexpr int kRingSlots = 20;
constexpr size_t kRingOffset = kStageFloats * sizeof(float);
constexpr size_t kBarrierOffset = kRingOffset + size_t{kRingSlots} * kChunkBytes;
constexpr size_t kDynamicSmem = kBarrierOffset + kRingSlots * (sizeof(uint64_t) + sizeof(unsigned));

std::atomic<int> g_launches{0};  // PersistentLaunches

__device__ __forceinline__ int Splits(int len) { return min(kMaxSplits, max(1, (len + 63) / 64)); }

// The consumer warps' barrier (the producer warp never joins it).
__device__ __forceinline__ void ConsumerSync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory"); }

// ---- mbarriers and bulk copies ----

__device__ __forceinline__ uint32_t SmemAddress(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void BarrierInit(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddress(bar)), "r"(count) : "memory");
}

// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void BarrierWait(uint64_t* bar, unsigned parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(SmemAddress(bar)), "r"(parity)
        : "memory");
  }
}

// Whether the barrier's phase of this parity has completed, without waiting (the trace's count).
__device__ __forceinline__ bool BarrierTest(uint64_t* bar, unsigned parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(SmemAddress(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// trace (DYN_CUDA_PERSIST_TRACE=1, eager launches): each block's global timer at each phase's start
// and end, [2][phases][grid] nanoseconds, then per block the attention tasks' step times summed
// over the launch's attention phases ([grid][kAttnMarks], AttentionPhase's `marks`).
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// ns one L2 load of *p takes (traced launches): the second timer read waits for the load, since
// it is behind a branch on the loaded value.
__device__ __forceinline__ unsigned long long TimedL2Load(const unsigned* p) {
  const unsigned long long t0 = GlobalTimer();
  unsigned v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  unsigned long long t1 = t0;
  if (v != 0xdeadbeefu) t1 = GlobalTimer();
  return t1 - t0;
}

// ---- hand-off entries (cuda_persistent.cuh: no grid barrier) ----

// An entry: a float's bits and the stamp of the launch that wrote it, as one 8-byte store, so a
// reader that sees the stamp sees the value (no fence on either side).
__device__ __forceinline__ void LlPut(uint64_t* e, float v, unsigned stamp) {
  const uint64_t bits = (static_cast<uint64_t>(stamp) << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(e), "l"(bits) : "memory");
}
__device__ __forceinline__ ulonglong2 LlLoad2(const uint64_t* e) {
  ulonglong2 v;
  asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(v.x), "=l"(v.y) : "l"(e) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t LlLoad(const uint64_t* e) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(e) : "memory");
  return v;
}
__device__ __forceinline__ bool LlReady(uint64_t v, unsigned stamp) { return static_cast<unsigned>(v >> 32) == stamp; }
__device__ __forceinline__ float LlValue(uint64_t v) { return __uint_as_float(static_cast<unsigned>(v)); }
// Entries e[0..1] (16-byte aligned) once both carry the stamp, polling as long as needed.
__device__ __forceinline__ float2 LlWait2(const uint64_t* e, unsigned stamp, ulonglong2 v) {
  while (!LlReady(v.x, stamp) || !LlReady(v.y, stamp)) {
    __nanosleep(32);
    v = LlLoad2(e);
  }
  return make_float2(LlValue(v.x), LlValue(v.y));
}
__device__ __forceinline__ float LlWait(const uint64_t* e, unsigned stamp) {
  uint64_t v = LlLoad(e);
  while (!LlReady(v, stamp)) {
    __nanosleep(32);
    v = LlLoad(e);
  }
  return LlValue(v);
}

// A slot's count of consumed rounds: monotonic, so a warp several rounds ahead of a slot cannot
// mistake an old round for its own (an mbarrier's parity only tells its last two phases apart).
// backoff: nanoseconds to sleep between polls (consumers that wait for a slot to come round again
// should leave the issue slots to the warps that compute).
__device__ __forceinline__ void WaitConsumed(const unsigned* count, unsigned rounds, unsigned backoff = 0) {
  while (true) {
    unsigned v;
    asm volatile("ld.acquire.cta.shared::cta.u32 %0, [%1];" : "=r"(v) : "r"(SmemAddress(count)) : "memory");
    if (v >= rounds) return;
    if (backoff != 0) __nanosleep(backoff);
  }
}
// Relaxed, not release: a release store is MEMBAR.ALL.CTA + STS, and the fence waited for the warp's
// global stores and loads in flight (the previous row's epilogue, the residual load ahead), ~1 us a
// chunk behind the weight stream (docs/benchmarks/cuda.md, round 10). The warp's shared-memory reads
// of the slot are performed in order before this store, which is all the producer needs.
__device__ __forceinline__ void SetConsumed(unsigned* count, unsigned rounds) {
  asm volatile("st.relaxed.cta.shared::cta.u32 [%0], %1;" ::"r"(SmemAddress(count)), "r"(rounds) : "memory");
}

// bytes from global src into shared dst; bar's phase completes when they have landed.
__device__ __forceinline__ void BulkLoad(void* dst, const void* src, unsigned bytes, uint64_t* bar, uint64_t policy) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddress(bar)), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          SmemAddress(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddress(bar)), "l"(policy)
      : "memory");
}

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

// The phase's input row into shared memory, RMS-normalized when the phase says so (RmsNorm's
// arithmetic: x * scale rounded, then * weight rounded). Each thread issues its loads of a pass
// (kStageVecs float4 of the input, and of the norm weight) together: a loop of dependent round trips
// to L2 took 1.3-3 us a phase (docs/benchmarks/cuda.md, round 10).
constexpr int kStageVecs = 3, kStagePass = kConsumerThreads * 4 * kStageVecs;

// One barrier: every thread adds the warps' sums itself, in warp order (thread 0 adding them and a
// second barrier to publish the scale cost ~1 us a norm phase behind the weight stream).
__device__ __forceinline__ float BlockRms(float ss, int cols, float eps, float* red) {
  const int tid = threadIdx.x;
  ss = WarpSum(ss);
  if (tid % 32 == 0) red[tid / 32] = ss;
  ConsumerSync();
  float total = 0.0f;
  for (int w = 0; w < kConsumers; ++w) total += red[w];
  return 1.0f / sqrtf(total / cols + eps);
}

__device__ __forceinline__ float4 Normalized(float4 v, float scale, float4 w) {
  return make_float4(__fmul_rn(__fmul_rn(v.x, scale), w.x), __fmul_rn(__fmul_rn(v.y, scale), w.y), __fmul_rn(__fmul_rn(v.z, scale), w.z),
                     __fmul_rn(__fmul_rn(v.w, scale), w.w));
}

// The input row into `stage` (and with kNormW the norm weight into w_stage) by passes of loads
// issued together, from the row's hand-off entries (ll, this launch's stamp) or, for a row written
// before the launch (ll null), plainly; returns the thread's sum of squares.
template <bool kNormW>
__device__ __forceinline__ float StageRow(const Phase& ph, const uint64_t* ll, unsigned stamp, float* stage, float* w_stage) {
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
      // Until all carry the stamp, the ones that do not are loaded again together: waiting for
      // them one after another (each stale one found only after the one before it had arrived)
      // took a round trip to L2 per entry.
      while (true) {
        bool ready = true;
#pragma unroll
        for (int u = 0; u < kStageVecs; ++u) {
          ready = ready && LlReady(e[u][0].x, stamp) && LlReady(e[u][0].y, stamp) && LlReady(e[u][1].x, stamp) && LlReady(e[u][1].y, stamp);
        }
        if (ready) break;
        __nanosleep(32);
#pragma unroll
        for (int u = 0; u < kStageVecs; ++u) {
          const int i = min(base + u * kConsumerThreads * 4, cols - 4);
          if (!LlReady(e[u][0].x, stamp) || !LlReady(e[u][0].y, stamp)) e[u][0] = LlLoad2(ll + i);
          if (!LlReady(e[u][1].x, stamp) || !LlReady(e[u][1].y, stamp)) e[u][1] = LlLoad2(ll + i + 2);
        }
      }
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        v[u] = make_float4(LlValue(e[u][0].x), LlValue(e[u][0].y), LlValue(e[u][1].x), LlValue(e[u][1].y));
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
        *reinterpret_cast<float4*>(stage + StagePos(i, cols)) = v[u];
        if (kNormW) *reinterpret_cast<float4*>(w_stage + i) = w[u];
        ss = fmaf(v[u].x, v[u].x, ss);
        ss = fmaf(v[u].y, v[u].y, ss);
        ss = fmaf(v[u].z, v[u].z, ss);
        ss = fmaf(v[u].w, v[u].w, ss);
      }
    }
  }
  return ss;
}

// marks (traced launches): the phase's start time and the block's PhaseMark words.
__device__ __forceinline__ void StageInput(const Phase& ph, const uint64_t* ll_base, unsigned stamp, float* stage, float* red,
                                        unsigned long long t_start, unsigned long long* marks) {
  const int tid = threadIdx.x, cols = ph.cols;
  const float eps = ph.eps;
  const bool norm = ph.norm_w != nullptr, write = norm && blockIdx.x == 0 && ph.norm_out != nullptr;
  // The norm weight waits for the scale beside the staged row (the GEMV's row sums use that space
  // only after staging), when there is room; else it is loaded again.
  float* w_stage = norm && 2 * cols <= kStageFloats ? stage + cols : nullptr;
  const uint64_t* ll = ph.ll_in >= 0 ? ll_base + ph.ll_in : nullptr;
  const float ss = w_stage != nullptr ? StageRow<true>(ph, ll, stamp, stage, w_stage) : StageRow<false>(ph, ll, stamp, stage, nullptr);
  if (marks != nullptr) {  // the block's last thread: one atomic a warp
    const unsigned loaded = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(GlobalTimer() - t_start));
    if (tid % 32 == 0) atomicMax(marks + kMarkStageLoaded, static_cast<unsigned long long>(loaded));
  }
  if (norm) {  // each thread scales what it staged
    const float scale = BlockRms(ss, cols, eps, red);
    if (marks != nullptr && tid == 0) marks[kMarkStageNormed] = GlobalTimer() - t_start;
    for (int i = tid * 4; i < cols; i += kConsumerThreads * 4) {
      float4& v = *reinterpret_cast<float4*>(stage + StagePos(i, cols));
      const float4 w = w_stage != nullptr ? *reinterpret_cast<const float4*>(w_stage + i)
                                          : __ldg(reinterpret_cast<const float4*>(ph.norm_w + i));
      v = Normalized(v, scale, w);
      if (write) __stcg(reinterpret_cast<float4*>(ph.norm_out + i), v);
    }
  }
  ConsumerSync();
}

// Unit u's outputs from its row sums (with SwiGLU sum0 the gate's, sum1 the up's).
// res: residual[u] loaded ahead (the dependent L2 load after the sums held the warp ~1 us a row).
// A phase with a residual has one weight, so its unit is the row; its entries hand on the sums.
// The plain stores are for readers after the launch; phases of this launch read the entries (ll).
__device__ __forceinline__ void GemvEpilogue(const Phase& ph, uint64_t* ll, unsigned stamp, int u, float sum0, float sum1, float res) {
  if (ph.swiglu) {
    const float g = __fmul_rn(sum0 / (1.0f + expf(-sum0)), sum1);  // SwiGluKernel's arithmetic
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
                                          unsigned long long* gm) {
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
  const int stride = 2 * row_chunks + 2;
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
        GemvEpilogue(ph, ll, stamp, u, total0, total1, unit_sums[2 * row_chunks + 1]);
      }
    } else {
      GemvEpilogue(ph, ll, stamp, bu.first + k, sum0, sum1, res);
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

constexpr int kAttnWarps = kConsumers;  // every consumer warp runs the attention task
constexpr int kKeyUnroll = 4;   // keys a warp has in flight (5: the key loop 4.3 us against 3.6 at 512)
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

// Element e of a kv head's attention output: written plainly to `out` and handed on at `ll_out`,
// with its rotated q element written back (as RopeWriteKv leaves it).
__device__ __forceinline__ void PutHeadElement(float* out, uint64_t* ll_out, float* q, const float* s_q, int e, float v, unsigned stamp) {
  __stcg(out + e, v);
  LlPut(ll_out + e, v, stamp);
  __stcg(q + e, s_q[e]);
}

// A kv head's attention output merged from its `splits` key splits' partial entries at `base`
// (waiting for each), handed on at `ll_out` and written plainly to `out`, and its rotated q heads
// written back (as RopeWriteKv leaves them): MergeSplitElement's arithmetic (each split's normalized
// output weighted by sum * exp(max - max'), in split order). The (max, sum) pairs are staged in
// shared memory first; then each of 256 threads merges two adjacent elements, their entries of all
// splits loaded 16 bytes at a time and together: one element a thread, loaded one split after
// another, took ~10 us at 9 splits (round 9), and with 480 threads for 512 elements a third of the
// warps merged two elements one after the other (round 11: 5.3 us).
constexpr int kMergeLoads = 4;  // a thread's loads in flight (8 spilled AttentionPhase's registers)
__device__ __forceinline__ void MergeKvHead(const uint64_t* base, int splits, unsigned stamp, float* out, uint64_t* ll_out, float* q,
                                            const float* s_q, float2* s_ml) {
  const int tid = threadIdx.x;
  if (tid < splits * kGroup) {
    const int sp = tid / kGroup, gi = tid % kGroup;
    const uint64_t* ml = base + sp * kPartEntries + kGroup * kHeadDim + 2 * gi;
    s_ml[tid] = LlWait2(ml, stamp, LlLoad2(ml));
  }
  ConsumerSync();
  const int e = 2 * tid;
  if (e >= kGroup * kHeadDim) return;
  const int gi = e / kHeadDim;
  float total_max = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) {
    const float2 m = s_ml[sp * kGroup + gi];
    if (m.y > 0.0f) total_max = fmaxf(total_max, m.x);
  }
  float total = 0.0f, o0 = 0.0f, o1 = 0.0f;
  for (int s0 = 0; s0 < splits; s0 += kMergeLoads) {
    ulonglong2 part[kMergeLoads];
#pragma unroll
    for (int t = 0; t < kMergeLoads; ++t) {
      if (s0 + t < splits) part[t] = LlLoad2(base + (s0 + t) * kPartEntries + e);
    }
#pragma unroll
    for (int t = 0; t < kMergeLoads; ++t) {
      if (s0 + t >= splits) continue;
      const float2 pv = LlWait2(base + (s0 + t) * kPartEntries + e, stamp, part[t]);
      const float2 m = s_ml[(s0 + t) * kGroup + gi];
      const float w = m.y > 0.0f ? m.y * expf(m.x - total_max) : 0.0f;
      total += w;
      if (w > 0.0f) {
        o0 += pv.x * w;
        o1 += pv.y * w;
      }
    }
  }
  PutHeadElement(out, ll_out, q, s_q, e, o0 * (1.0f / total), stamp);
  PutHeadElement(out, ll_out, q, s_q, e + 1, o1 * (1.0f / total), stamp);
}

// RoPE + KV write + attention of one row: task (kv head, key split) per block; each task's
// normalized output and (max, sum) are handed on as partial entries, and the kv head's last split's
// task merges them once they are there (tasks run in index order in each block and a merging task
// waits only for lower ones, so every wait ends).
__device__ __noinline__ void AttentionPhase(const Phase& ph, uint64_t* ll_base, unsigned stamp, float* stage, unsigned long long* marks) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  unsigned long long before = 0;
  // Step k of a task took from the last mark to now (thread 0, traced launches only).
  auto mark = [&](int k) {
    if (marks == nullptr || tid != 0) return;
    const unsigned long long now = GlobalTimer();
    if (k >= 0) marks[k] += now - before;
    before = now;
  };
  const int pos = __ldg(ph.meta.pos), len = pos + 1, S = Splits(len);
  const int32_t* table = ph.meta.tables + __ldg(ph.meta.table_offset);
  const int chunk = (len + S - 1) / S;
  float* s_q = stage;                      // [4][128]
  float* s_k = stage + kGroup * kHeadDim;  // [128]
  auto& s_max = *reinterpret_cast<float(*)[kAttnWarps][kGroup]>(stage + 5 * kHeadDim);
  auto& s_sum = *reinterpret_cast<float(*)[kAttnWarps][kGroup]>(stage + 5 * kHeadDim + kAttnWarps * kGroup);
  auto& s_acc = *reinterpret_cast<float(*)[kAttnWarps][kGroup][kHeadDim]>(stage + 5 * kHeadDim + 2 * kAttnWarps * kGroup);
  float2* s_ml = reinterpret_cast<float2*>(stage + 5 * kHeadDim + 2 * kAttnWarps * kGroup + kAttnWarps * kGroup * kHeadDim);  // [kMaxSplits][kGroup]
  // Each warp's weight in the merge of the warps, [kAttnWarps][kGroup], and each head's max.
  auto& s_wt = *reinterpret_cast<float(*)[kAttnWarps][kGroup]>(reinterpret_cast<float*>(s_ml + kMaxSplits * kGroup));
  float* s_wmax = reinterpret_cast<float*>(s_ml + kMaxSplits * kGroup) + kAttnWarps * kGroup;
  // MergeWarps's arithmetic with each warp's weight exp(max_w - max) computed once per (warp, head)
  // instead of once per output element (15 exps an element: ~1 us a task).
  auto merge_warps = [&](int gi, int d) {
    WarpMerged m{s_wmax[gi], 0.0f, 0.0f};
    for (int w = 0; w < kAttnWarps; ++w) {
      const float wt = s_wt[w][gi];
      m.sum += s_sum[w][gi] * wt;
      m.o += s_acc[w][gi][d] * wt;
    }
    return m;
  };
  for (int task = blockIdx.x; task < ph.kv_heads * S; task += gridDim.x) {
    const int kv = task / S, split = task % S;
    const int begin = split * chunk, end = min(len, begin + chunk);
    const bool owner = begin <= pos && pos < end;
    const size_t q_off = static_cast<size_t>(kv) * kGroup * kHeadDim;
    float* k = ph.k + static_cast<size_t>(kv) * kHeadDim;
    ConsumerSync();  // the previous task's reads of shared memory are done
    mark(-1);
    if (marks != nullptr && tid == 0) marks[kAttnTasksMark] += 1;
    if (2 * tid < kGroup * kHeadDim) {  // two q elements a thread: one round trip to L2, not two for some
      const uint64_t* qe = ll_base + ph.ll_q + q_off + 2 * tid;
      const float2 v = LlWait2(qe, stamp, LlLoad2(qe));
      s_q[2 * tid] = v.x;
      s_q[2 * tid + 1] = v.y;
    }
    if (owner && tid < kHeadDim) s_k[tid] = LlWait(ll_base + ph.ll_k + kv * kHeadDim + tid, stamp);
    ConsumerSync();
    mark(0);  // q (and k) loaded
    for (int t = tid; t < kGroup * (kHeadDim / 2); t += kConsumerThreads) RotatePair(s_q, t, kHeadDim, ph.cos_sin, ph.neox);
    if (owner && tid < kHeadDim / 2) RotatePair(s_k, tid, kHeadDim, ph.cos_sin, ph.neox);
    ConsumerSync();
    mark(1);  // rotated
    if (owner && tid < kHeadDim) {
      const size_t off = SlotOffset(ph.g, table, pos) + static_cast<size_t>(kv) * kHeadDim;
      __stcg(k + tid, s_k[tid]);
      StoreElem(ph.cache + off + tid, s_k[tid]);
      StoreElem(ph.cache + off + ph.g.v_delta + tid, LlWait(ll_base + ph.ll_v + kv * kHeadDim + tid, stamp));
    }
    ConsumerSync();
    mark(2);  // new K/V written
    if (marks != nullptr && tid == 0) {
      marks[kAttnKeyProbeMark] += TimedL2Load(reinterpret_cast<const unsigned*>(ph.cache + SlotOffset(ph.g, table, begin) + static_cast<size_t>(kv) * kHeadDim));
      before = GlobalTimer();
    }
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
    ConsumerSync();
    if (tid < kAttnWarps * kGroup) {
      const int w = tid / kGroup, gi = tid % kGroup;
      float m = -INFINITY;
      for (int ww = 0; ww < kAttnWarps; ++ww) m = fmaxf(m, s_max[ww][gi]);
      s_wt[w][gi] = s_sum[w][gi] > 0.0f ? expf(s_max[w][gi] - m) : 0.0f;  // a warp with no keys has max -inf
      if (w == 0) s_wmax[gi] = m;
    }
    ConsumerSync();
    mark(3);  // keys attended
    uint64_t* out_ll = ll_base + ph.ll_out + q_off;
    if (S == 1) {  // the kv head's one task: its output is the attention's, no partial to merge
      for (int e = tid; e < kGroup * kHeadDim; e += kConsumerThreads) {
        const WarpMerged m = merge_warps(e / kHeadDim, e % kHeadDim);
        PutHeadElement(ph.attn_out + q_off, out_ll, ph.q + q_off, s_q, e, m.sum > 0.0f ? m.o / m.sum : 0.0f, stamp);
      }
      continue;
    }
    uint64_t* head_part = ll_base + ph.ll_part + static_cast<size_t>(kv) * S * kPartEntries;
    uint64_t* part = head_part + static_cast<size_t>(split) * kPartEntries;
    for (int e = tid; e < kGroup * kHeadDim; e += kConsumerThreads) {
      const int gi = e / kHeadDim, d = e % kHeadDim;
      const WarpMerged m = merge_warps(gi, d);
      LlPut(part + e, m.sum > 0.0f ? m.o / m.sum : 0.0f, stamp);  // an empty split: weight 0 in the merge
      if (d == 0) {
        LlPut(part + kGroup * kHeadDim + 2 * gi, m.max, stamp);
        LlPut(part + kGroup * kHeadDim + 2 * gi + 1, m.sum, stamp);
      }
    }
    mark(4);  // partial handed on
    // The kv head's last split merges the splits (the cluster kernel's arithmetic) and writes the
    // rotated q heads back, as RopeWriteKv leaves them.
    if (split != S - 1) continue;
    MergeKvHead(head_part, S, stamp, ph.attn_out + q_off, out_ll, ph.q + q_off, s_q, s_ml);
    mark(5);  // splits merged (the last task)
    if (marks != nullptr && tid == 0) marks[kAttnMergesMark] += 1;
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
      StageInput(cur, ll_base, stamp, stage, red, gm != nullptr ? trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x] : 0, gm);
      if (gm != nullptr && threadIdx.x == 0) gm[kMarkStaged] = GlobalTimer() - trace[static_cast<size_t>(p) * gridDim.x + blockIdx.x];
      GemvPhase(cur, ll_base, stamp, ring, seq, stage, gm);
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
