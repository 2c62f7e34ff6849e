// Private to cuda_attention.cu and cuda_attention_decode.cu: the row-wise attention pieces both
// use - a block's work (RowBlock), element loads, and the half-warp key loop over the paged bf16
// cache with its online softmax (HalfWarpAttend).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "engine/native/backend/cuda/cuda_attention.cuh"

namespace dyn::cuda {

constexpr int kRowWarps = 4;
constexpr int kKeys = 4;  // keys per warp per iteration, loads in flight together

// Query heads of a GQA group one row-wise block serves.
inline int GroupPerBlock(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }
// Whether the half-warp kernels run where they apply (DYN_CUDA_ATTN=warp: no; SetHalfWarpAttention).
bool HalfWarpAttention();

// n contiguous elements at p (16-byte vector loads where n allows) as floats.
template <int kN>
__device__ __forceinline__ void LoadVec(const float* p, float (&out)[kN]) {
  if constexpr (kN % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kN; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
    }
  } else if constexpr (kN == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else {
    out[0] = *p;
  }
}
template <int kN>
__device__ __forceinline__ void LoadVec(const __nv_bfloat16* p, float (&out)[kN]) {
  if constexpr (kN == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  } else if constexpr (kN == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  } else if constexpr (kN == 2) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    out[0] = f.x, out[1] = f.y;
  } else {
    out[0] = __bfloat162float(*p);
  }
}

__device__ __forceinline__ void StoreElem(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreElem(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Folds kN keys into each query head's online softmax: s[u][gi] the scores (-inf: masked or past
// the end), vr[u] this lane's kPerLane bf16 values of key u (a uint2 or uint4), then (mx, sum, acc)
// rescaled to the new maximum and the weighted values added.
template <int kN, int kG, int kPerLane, class Raw>
__device__ __forceinline__ void OnlineSoftmaxStep(const float (&s)[kN][kG], const Raw (&vr)[kN], float (&mx)[kG], float (&sum)[kG],
                                                  float (&acc)[kG][kPerLane]) {
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
    float new_mx = mx[gi];
#pragma unroll
    for (int u = 0; u < kN; ++u) new_mx = fmaxf(new_mx, s[u][gi]);
    if (new_mx == -INFINITY) continue;  // no key yet
    const float corr = expf(mx[gi] - new_mx);  // 0 while mx is -inf
    sum[gi] *= corr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[gi][i] *= corr;
    mx[gi] = new_mx;
  }
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    float vf[kPerLane];
    LoadVec<kPerLane>(reinterpret_cast<const __nv_bfloat16*>(&vr[u]), vf);
#pragma unroll
    for (int gi = 0; gi < kG; ++gi) {
      const float p = s[u][gi] == -INFINITY ? 0.0f : expf(s[u][gi] - mx[gi]);
      sum[gi] += p;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[gi][i] = fmaf(p, vf[i], acc[gi][i]);
    }
  }
}

// One output element merged over `splits` key splits (MergeSplits' arithmetic: each split's
// normalized output weighted by sum * exp(max - max')): ml(s) gives split s's (max, sum) (sum 0:
// an empty split), out(s) its output element. Used where the splits' results sit in a cluster's
// shared memory (DecodeAttentionKernel) or in global memory (the persistent kernel).
template <class Ml, class Out>
__device__ __forceinline__ float MergeSplitElement(int splits, Ml ml, Out out) {
  float total_max = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    const float2 m = ml(s);
    if (m.y > 0.0f) total_max = fmaxf(total_max, m.x);
  }
  float total = 0.0f, o = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float2 m = ml(s);
    const float w = m.y > 0.0f ? m.y * expf(m.x - total_max) : 0.0f;
    total += w;
    if (w > 0.0f) o += out(s) * w;
  }
  return o * (1.0f / total);
}

struct RowArgs {
  const float* q;
  int num_heads, group, head_chunks, splits;
  float scale;
  float* partial;  // [num_rowwise][heads][splits][head_dim] outputs, then [..][splits][2] (max, sum)
  float* out;
  int* counters;  // splits > 1: per (block column, row) arrival counts, zero between launches; null: separate combine kernel
};

// One split's result of (row-wise row ri, query head h) in RowArgs::partial: its output at
// a.partial + SplitSlot(..) * head_dim, its (max, sum) at SplitMaxSum(..).
__device__ __forceinline__ size_t SplitSlot(const RowArgs& a, int ri, int h, int split) {
  return (static_cast<size_t>(ri) * a.num_heads + h) * a.splits + split;
}
__device__ __forceinline__ float* SplitMaxSum(const AttnRows& meta, const RowArgs& a, int head_dim, size_t slot) {
  return a.partial + static_cast<size_t>(meta.num_rowwise) * a.num_heads * a.splits * head_dim + slot * 2;
}
// A split's output element d, normalized (0 for an empty split: weight 0 in the merge), and at d = 0
// its (max, sum).
__device__ __forceinline__ void StoreSplitResult(const AttnRows& meta, const RowArgs& a, int head_dim, size_t slot, int d, float max,
                                                 float sum, float o) {
  a.partial[slot * head_dim + d] = sum > 0.0f ? o / sum : 0.0f;
  if (d == 0) {
    float* ml = SplitMaxSum(meta, a, head_dim, slot);
    ml[0] = max;
    ml[1] = sum;
  }
}

// What a row-wise block works on: blockIdx.x = (kv head, chunk of kG of its query heads),
// blockIdx.y = row-wise row, blockIdx.z = key split.
struct RowBlock {
  int kv_head, h0, nh, ri, r, split, begin, end;
  const int32_t* table;
  __device__ RowBlock(const AttnRows& meta, const RowArgs& a, int kG) {
    kv_head = blockIdx.x / a.head_chunks;
    h0 = kv_head * a.group + (blockIdx.x % a.head_chunks) * kG;
    nh = min(kG, (kv_head + 1) * a.group - h0);
    ri = blockIdx.y;
    r = meta.rowwise[ri];
    split = blockIdx.z;
    const int len = meta.pos[r] + 1, chunk = (len + a.splits - 1) / a.splits;
    begin = split * chunk;
    end = min(len, begin + chunk);
    table = meta.tables + meta.table_offset[r];
  }
};

// A lane's online-softmax start for query heads [0, nh) of a group: its q dims d0.. from the
// block's shared q rows ([kG][head_dim], 0 for heads past nh), empty (max, sum, acc).
template <int kPerLane, int kG>
__device__ __forceinline__ void StartWarpState(const float* s_q, int head_dim, int nh, int d0, float (&qv)[kG][kPerLane], float (&mx)[kG],
                                               float (&sum)[kG], float (&acc)[kG][kPerLane]) {
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      qv[gi][i] = gi < nh ? s_q[gi * head_dim + d0 + i] : 0.0f;
      acc[gi][i] = 0.0f;
    }
    mx[gi] = -INFINITY;
    sum[gi] = 0.0f;
  }
}

// The half-warp key loop of RowAttentionHalfWarpKernel and DecodeAttentionKernel: the keys
// [begin, end) of kv head `kv_head` by a block of kWarps warps, warp w taking keys begin + 2w +
// {0, 1} (its two halves) + k * kStride; per query head an online softmax (mx, sum, acc) per lane, the warp's two halves
// merged at the end (lanes l and l + 16 hold the same dims). kCoherent: the cache is read with
// L2-coherent loads, for a kernel that wrote some of the keys itself (not via the read-only path).
// kN: keys a half-warp has in flight.
template <int kPerLane, int kG, bool kCoherent, int kWarps = kRowWarps, int kN = kKeys>
__device__ __forceinline__ void HalfWarpAttend(const __nv_bfloat16* __restrict__ cache, const CacheGeometry& g, const int32_t* table,
                                               int kv_head, int begin, int end, float scale, const float (&qv)[kG][kPerLane],
                                               float (&mx)[kG], float (&sum)[kG], float (&acc)[kG][kPerLane]) {
  using Raw = std::conditional_t<kPerLane == 8, uint4, uint2>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16;
  const int D = g.head_dim, d0 = (lane % 16) * kPerLane;
  constexpr int kStride = kWarps * 2;  // keys per block per step
  // Warp-uniform loop; each half takes key j0 + half + u * kStride (masked past the end).
  for (int j0 = begin + warp * 2; j0 < end; j0 += kStride * kN) {
    Raw kr[kN], vr[kN];
#pragma unroll
    for (int u = 0; u < kN; ++u) {
      const int j = min(j0 + half + u * kStride, end - 1);
      const __nv_bfloat16* kp = cache + SlotOffset(g, table, j) + static_cast<size_t>(kv_head) * D + d0;
      if constexpr (kCoherent) {
        kr[u] = __ldcg(reinterpret_cast<const Raw*>(kp));
        vr[u] = __ldcg(reinterpret_cast<const Raw*>(kp + g.v_delta));
      } else {
        kr[u] = __ldg(reinterpret_cast<const Raw*>(kp));
        vr[u] = __ldg(reinterpret_cast<const Raw*>(kp + g.v_delta));
      }
    }
    float s[kN][kG];
#pragma unroll
    for (int u = 0; u < kN; ++u) {
      float kf[kPerLane];
      LoadVec<kPerLane>(reinterpret_cast<const __nv_bfloat16*>(&kr[u]), kf);
      const bool valid = j0 + half + u * kStride < end;
#pragma unroll
      for (int gi = 0; gi < kG; ++gi) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) dot = fmaf(qv[gi][i], kf[i], dot);
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[u][gi] = valid ? dot * scale : -INFINITY;
      }
    }
    OnlineSoftmaxStep(s, vr, mx, sum, acc);
  }
  // The two halves of the warp merge (lanes l and l + 16 hold the same dims).
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
    const float other_mx = __shfl_xor_sync(0xffffffffu, mx[gi], 16);
    const float other_sum = __shfl_xor_sync(0xffffffffu, sum[gi], 16);
    const float m = fmaxf(mx[gi], other_mx);
    const float ws = sum[gi] > 0.0f ? expf(mx[gi] - m) : 0.0f, wo = other_sum > 0.0f ? expf(other_mx - m) : 0.0f;
    sum[gi] = sum[gi] * ws + other_sum * wo;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, acc[gi][i], 16);
      acc[gi][i] = acc[gi][i] * ws + other * wo;
    }
    mx[gi] = sum[gi] > 0.0f ? m : -INFINITY;
  }
}

// The kWarps warps' online-softmax states of query head gi (max, sum; V accumulator at dim d),
// merged in warp order: the block's (max, sum) and unnormalized output of (gi, d).
struct WarpMerged {
  float max, sum, o;
};
// The largest of the warps' maxima of query head gi, and warp w's weight in the merge against it:
// exp(max_w - max), 0 for a warp with no keys (its max is -inf).
template <int kWarps, int kG>
__device__ __forceinline__ float WarpsMax(const float (&s_max)[kWarps][kG], int gi) {
  float m = -INFINITY;
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_max[w][gi]);
  return m;
}
__device__ __forceinline__ float WarpWeight(float max_w, float sum_w, float max) { return sum_w > 0.0f ? expf(max_w - max) : 0.0f; }
// The merge with warp w's weight wt(w) (WarpWeight), for callers that compute the weights once per
// (warp, head) rather than once per output element.
template <int kWarps, int kG, int kDims, class Weight>
__device__ __forceinline__ WarpMerged MergeWeightedWarps(float max, const float (&s_sum)[kWarps][kG], const float (&s_acc)[kWarps][kG][kDims],
                                                         int gi, int d, Weight wt) {
  WarpMerged m{max, 0.0f, 0.0f};
  for (int w = 0; w < kWarps; ++w) {
    const float x = wt(w);
    m.sum += s_sum[w][gi] * x;
    m.o += s_acc[w][gi][d] * x;
  }
  return m;
}
// Warp `warp`'s online-softmax state into the block's arrays that MergeWarps reads; `holds`: this
// lane writes its dims d0.. (after HalfWarpAttend, lanes l and l + 16 hold the same ones).
template <int kWarps, int kG, int kDims, int kPerLane>
__device__ __forceinline__ void StoreWarpState(float (&s_max)[kWarps][kG], float (&s_sum)[kWarps][kG], float (&s_acc)[kWarps][kG][kDims],
                                               bool holds, int d0, const float (&mx)[kG], const float (&sum)[kG],
                                               const float (&acc)[kG][kPerLane]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
    if (lane == 0) {
      s_max[warp][gi] = mx[gi];
      s_sum[warp][gi] = sum[gi];
    }
    if (holds) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) s_acc[warp][gi][d0 + i] = acc[gi][i];
    }
  }
}
template <int kWarps, int kG, int kDims>
__device__ __forceinline__ WarpMerged MergeWarps(const float (&s_max)[kWarps][kG], const float (&s_sum)[kWarps][kG],
                                                 const float (&s_acc)[kWarps][kG][kDims], int gi, int d) {
  const float max = WarpsMax(s_max, gi);
  return MergeWeightedWarps(max, s_sum, s_acc, gi, d, [&](int w) { return WarpWeight(s_max[w][gi], s_sum[w][gi], max); });
}

}  // namespace dyn::cuda
