// Private to cuda_persistent.cu (included once, so its helpers may live in an unnamed namespace):
// the persistent kernel's attention phase: RoPE, the new token's K/V write and decode attention of
// one row, one task per (kv head, key split) per block, the splits merged by each kv head's last
// split through hand-off entries.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_attention_rows.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_persistent.cuh"
#include "engine/native/backend/cuda/cuda_persistent_device.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

// Key splits of a row of `len` keys: ~64 keys each (fewer, longer splits were slower: round 10).
__device__ __forceinline__ int Splits(int len) { return min(kMaxSplits, max(1, (len + 63) / 64)); }

constexpr int kAttnWarps = kConsumers;  // every consumer warp runs the attention task
// The key loop is the row-wise kernels' HalfWarpAttend (a half-warp a key, 8 dims a lane): a whole
// warp a key (4 dims a lane, 5 shuffles a head) made the loop issue-bound, 3.8 us a layer at 512
// and 17.4 at 4096 (round 11); this one 3.2 and 11.3. Two keys in flight a half-warp (a split of
// ~64 keys is one pass of the 15 warps): 4 were no faster at 512 and slower at 4096 (round 12).
constexpr int kLaneDims = 8, kKeysInFlight = 2;

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
  const int tid = threadIdx.x, lane = tid % 32;
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
  // MergeWarps with each warp's weight computed once per (warp, head) instead of once per output
  // element (15 exps an element: ~1 us a task).
  auto merge_warps = [&](int gi, int d) { return MergeWeightedWarps(s_wmax[gi], s_sum, s_acc, gi, d, [&](int w) { return s_wt[w][gi]; }); };
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
    const int d0 = (lane % 16) * kLaneDims;
    float qv[kGroup][kLaneDims], acc[kGroup][kLaneDims], mx[kGroup], sum[kGroup];
    StartWarpState(s_q, kHeadDim, kGroup, d0, qv, mx, sum, acc);
    HalfWarpAttend<kLaneDims, kGroup, true, kAttnWarps, kKeysInFlight>(ph.cache, ph.g, table, kv, begin, end, ph.scale, qv, mx, sum, acc);
    StoreWarpState(s_max, s_sum, s_acc, lane < 16, d0, mx, sum, acc);
    ConsumerSync();
    if (tid < kAttnWarps * kGroup) {
      const int w = tid / kGroup, gi = tid % kGroup;
      const float m = WarpsMax(s_max, gi);
      s_wt[w][gi] = WarpWeight(s_max[w][gi], s_sum[w][gi], m);
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

}  // namespace
}  // namespace dyn::cuda
