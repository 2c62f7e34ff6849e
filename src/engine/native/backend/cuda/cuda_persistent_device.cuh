// Private to cuda_persistent.cu (included once, so its helpers may live in an unnamed namespace):
// the persistent decode kernel's block layout and the device primitives its phases share: the
// consumer warps' barrier, mbarriers and bulk copies for the weight ring, the trace's timer, and the
// hand-off entries through which phases pass values without a grid barrier.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/native/backend/cuda/cuda_persistent.cuh"

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

}  // namespace
}  // namespace dyn::cuda
