// Paged KV writes and the row-wise causal paged attention of the CUDA backend (cache layout in
// KvLayout: F32, or bf16 for bf16 models). Query tiles of long prefill chunks run on the
// tensor-core kernel instead (cuda_attention_mma.cu); Attention dispatches both.
//
// Row-wise kernel: one block of 4 warps per (kv head, row, key split). The block serves all query
// heads of its kv head (GQA: each K/V element is read once per group, not once per query head).
// Each warp walks every 4th key of its split, four keys per iteration (their loads issued
// together), computes q.k with warp reductions and keeps an online softmax (running max, sum and
// V accumulator) per query head; the warps merge through shared memory. With one split the block
// writes the output; with several (flash-decoding: a batch-1 decode has only kv_heads blocks
// otherwise) each writes a normalized partial result and its (max, sum), and the last block of each
// (kv head, row) to finish merges the splits (or, without counters, a combine kernel does).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_attention_rows.cuh"
#include "engine/native/backend/cuda/cuda_launch.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

constexpr int kMaxHeadDim = 256;
int g_multiprocessors = 132;  // an H100/H200's, until SetMultiprocessorCount
bool g_half_warp_rows = true;  // RowAttentionHalfWarpKernel where it applies (SetHalfWarpAttention)
int g_forced_splits = 0;       // ForceAttentionSplits

// One block per row; threads over kv_heads * head_dim.
template <class T>
__global__ void WriteKvKernel(T* cache, CacheGeometry g, AttnRows meta, const float* k, const float* v) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int r = blockIdx.x;
  const size_t off = SlotOffset(g, meta.tables + meta.table_offset[r], meta.pos[r]);
  const float* kr = k + static_cast<size_t>(r) * g.token_elems;
  const float* vr = v + static_cast<size_t>(r) * g.token_elems;
  for (int i = threadIdx.x; i < g.token_elems; i += blockDim.x) {
    StoreElem(cache + off + i, kr[i]);
    StoreElem(cache + off + g.v_delta + i, vr[i]);
  }
}

// Block (row, y) handles heads [y * per_block, (y + 1) * per_block) of the row, head_threads
// threads each (a decode row of the 8B shape: 10 blocks of 4 heads; one block per head made 40k
// blocks of 64 threads at 1024 rows, whose scheduling cost 3-4x the memory time). Head h <
// num_heads rotates that q head; the others rotate a k head and write it and the same v head to
// the row's cache slot. Each thread stores the k elements it rotated itself: no barrier needed.
template <class T>
__global__ void RopeWriteKvKernel(T* cache, CacheGeometry g, AttnRows meta, float* q, int num_heads, float* k, const float* v,
                                  const float* cos_sin, bool neox, int head_threads, int per_block) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int r = blockIdx.x, head = blockIdx.y * per_block + static_cast<int>(threadIdx.x) / head_threads;
  const int tid = static_cast<int>(threadIdx.x) % head_threads, D = g.head_dim, half = D / 2;
  if (head >= num_heads + g.token_elems / D) return;
  const float* cs = cos_sin + static_cast<size_t>(r) * half * 2;
  if (head < num_heads) {
    float* qh = q + (static_cast<size_t>(r) * num_heads + head) * D;
    for (int t = tid; t < half; t += head_threads) RotatePair(qh, t, D, cs, neox);
    return;
  }
  const int kvh = head - num_heads;
  const size_t off = SlotOffset(g, meta.tables + meta.table_offset[r], meta.pos[r]) + static_cast<size_t>(kvh) * D;
  float* kh = k + static_cast<size_t>(r) * g.token_elems + static_cast<size_t>(kvh) * D;
  for (int t = tid; t < half; t += head_threads) {
    const int2 e = RotatePair(kh, t, D, cs, neox);
    StoreElem(cache + off + e.x, kh[e.x]);
    StoreElem(cache + off + e.y, kh[e.y]);
  }
  const float* vh = v + static_cast<size_t>(r) * g.token_elems + static_cast<size_t>(kvh) * D;
  for (int i = tid; i < D; i += head_threads) StoreElem(cache + off + g.v_delta + i, vh[i]);
}

constexpr int kMaxSplits = 128;       // AttentionSplits' cap
constexpr int kMaxMergePairs = 1024;  // (query head, split) pairs one merge handles: kG (<= 8) x kMaxSplits

// Merges the splits of query heads [h0, h0 + nh) of row-wise row ri (cache row r): each output is
// the splits' outputs weighted by sum * exp(max - max'). Used by the combine kernel and by the
// attention kernel's last block, so both give the same bits. The (max, sum) pairs go through
// shared memory once (s_w: kMaxMergePairs floats, s_l: as many, s_inv: nh), so each output element
// reads only its splits' partial values. The partials were written by other blocks: read via L2.
__device__ void MergeSplits(const AttnRows& meta, int ri, int r, int h0, int nh, int num_heads, int head_dim, int splits,
                            const float* partial, float* out, float* s_w, float* s_l, float* s_inv) {
  const size_t part0 = (static_cast<size_t>(ri) * num_heads + h0) * splits;  // first (head, split) of this merge
  const float* ml = partial + static_cast<size_t>(meta.num_rowwise) * num_heads * splits * head_dim + part0 * 2;
  for (int i = threadIdx.x; i < nh * splits; i += blockDim.x) {
    s_w[i] = __ldcg(ml + 2 * i);  // the max for now, the weight below
    s_l[i] = __ldcg(ml + 2 * i + 1);
  }
  __syncthreads();
  for (int gi = threadIdx.x; gi < nh; gi += blockDim.x) {
    float* w = s_w + gi * splits;
    const float* l = s_l + gi * splits;
    float total_max = -INFINITY;
    for (int s = 0; s < splits; ++s) total_max = fmaxf(total_max, l[s] > 0.0f ? w[s] : -INFINITY);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
      w[s] = l[s] > 0.0f ? l[s] * expf(w[s] - total_max) : 0.0f;
      total += w[s];
    }
    s_inv[gi] = 1.0f / total;
  }
  __syncthreads();
  // Each thread's loads for kChunk splits of kElems of its elements are issued before any is used:
  // this runs in one block at the end of the step's attention, and loads one after another (L2
  // latency each) made it the longest part of a batch-1 attention call.
  constexpr int kChunk = 16, kElems = 4;
  const int n = nh * head_dim;
  for (int e0 = threadIdx.x; e0 < n; e0 += kElems * blockDim.x) {
    float o[kElems] = {};
    for (int s0 = 0; s0 < splits; s0 += kChunk) {
      float v[kElems][kChunk];
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        const int e = e0 + k * blockDim.x;
        const float* p = partial + (part0 + static_cast<size_t>(e / head_dim) * splits + s0) * head_dim + e % head_dim;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) v[k][i] = e < n && s0 + i < splits ? __ldcg(p + static_cast<size_t>(i) * head_dim) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        const int e = e0 + k * blockDim.x;
        if (e >= n) continue;
        const float* w = s_w + (e / head_dim) * splits + s0;
        const float* l = s_l + (e / head_dim) * splits + s0;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          if (s0 + i < splits && l[i] > 0.0f) o[k] += v[k][i] * w[i];  // the splits in order, as before
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      const int e = e0 + k * blockDim.x;
      if (e < n) out[(static_cast<size_t>(r) * num_heads + h0 + e / head_dim) * head_dim + e % head_dim] = o[k] * s_inv[e / head_dim];
    }
  }
}

// The end of a row-wise block: the warps' (max, sum, V accumulator) per query head merge through
// shared memory into the output (one split) or into this split's partial result; with arrival
// counters, the last split of the (kv head chunk, row) to finish merges all splits. Lanes with
// `active` hold dims [d0, d0 + kPerLane) of acc.
template <int kPerLane, int kG>
__device__ __forceinline__ void FinishRow(const AttnRows& meta, const RowArgs& a, int D, int h0, int nh, int ri, int r, int split,
                                          bool active, int d0, const float (&mx)[kG], const float (&sum)[kG],
                                          const float (&acc)[kG][kPerLane]) {
  __shared__ float s_max[kRowWarps][kG], s_sum[kRowWarps][kG];
  __shared__ float s_acc[kRowWarps][kG][kPerLane * 32];
  StoreWarpState(s_max, s_sum, s_acc, active, d0, mx, sum, acc);
  __syncthreads();
  for (int e = threadIdx.x; e < nh * D; e += blockDim.x) {
    const int gi = e / D, d = e % D;
    const WarpMerged mw = MergeWarps(s_max, s_sum, s_acc, gi, d);
    const float total_max = mw.max, total_sum = mw.sum, o = mw.o;
    const int h = h0 + gi;
    if (a.splits == 1) {
      a.out[(static_cast<size_t>(r) * a.num_heads + h) * D + d] = o / total_sum;
      continue;
    }
    StoreSplitResult(meta, a, D, SplitSlot(a, ri, h, split), d, total_max, total_sum, o);
  }
  if (a.splits == 1 || a.counters == nullptr) return;
  // The last block of this (kv head chunk, row) to finish merges the splits (threadfence
  // reduction): no separate combine launch.
  __shared__ bool s_last;
  __shared__ float s_w[kMaxMergePairs], s_l[kMaxMergePairs], s_inv[kG];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = a.counters + static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    s_last = atomicAdd(counter, 1) == a.splits - 1;
    if (s_last) *counter = 0;  // every split has arrived: ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  MergeSplits(meta, ri, r, h0, nh, a.num_heads, D, a.splits, a.partial, a.out, s_w, s_l, s_inv);
}

// Lane l holds elements [l * kPerLane, (l + 1) * kPerLane) of a head; kG query heads per block.
template <class T, int kPerLane, int kG>
__global__ void __launch_bounds__(kRowWarps * 32) RowAttentionKernel(const T* __restrict__ cache, CacheGeometry g, AttnRows meta,
                                                                     RowArgs a) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = g.head_dim;
  const RowBlock b(meta, a, kG);
  const int kv_head = b.kv_head, h0 = b.h0, nh = b.nh, ri = b.ri, r = b.r, split = b.split, begin = b.begin, end = b.end;
  const int32_t* table = b.table;
  const int d0 = lane * kPerLane;
  const bool active = d0 < D;

  float qv[kG][kPerLane], acc[kG][kPerLane], mx[kG], sum[kG];
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) qv[gi][i] = acc[gi][i] = 0.0f;
    if (active && gi < nh) LoadVec(a.q + (static_cast<size_t>(r) * a.num_heads + h0 + gi) * D + d0, qv[gi]);
    mx[gi] = -INFINITY;
    sum[gi] = 0.0f;
  }
  for (int j0 = begin + warp; j0 < end; j0 += kRowWarps * kKeys) {
    const T* kp[kKeys];
    float kv[kKeys][kPerLane];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int j = min(j0 + u * kRowWarps, end - 1);  // past the end: a valid key, masked below
      kp[u] = cache + SlotOffset(g, table, j) + static_cast<size_t>(kv_head) * D + d0;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) kv[u][i] = 0.0f;
      if (active) LoadVec(kp[u], kv[u]);
    }
    float s[kKeys][kG];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
#pragma unroll
      for (int gi = 0; gi < kG; ++gi) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) dot = fmaf(qv[gi][i], kv[u][i], dot);
        s[u][gi] = j0 + u * kRowWarps < end ? WarpSum(dot) * a.scale : -INFINITY;
      }
    }
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      if (active) LoadVec(kp[u] + g.v_delta, kv[u]);
    }
#pragma unroll
    for (int gi = 0; gi < kG; ++gi) {
      float new_mx = mx[gi];
#pragma unroll
      for (int u = 0; u < kKeys; ++u) new_mx = fmaxf(new_mx, s[u][gi]);
      const float corr = expf(mx[gi] - new_mx);  // new_mx is finite: key j0 is in range
      sum[gi] *= corr;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[gi][i] *= corr;
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const float p = expf(s[u][gi] - new_mx);  // 0 for a masked key
        sum[gi] += p;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[gi][i] = fmaf(p, kv[u][i], acc[gi][i]);
      }
      mx[gi] = new_mx;
    }
  }

  FinishRow<kPerLane, kG>(meta, a, g.head_dim, h0, nh, ri, r, split, active, d0, mx, sum, acc);
}

// The decode variant for a bf16 cache with head_dim = 16 x kPerLane (128: 8, 64: 4): half a
// warp per key, each lane one 16-byte (or 8-byte) load of K and one of V per key. Against
// RowAttentionKernel (a whole warp per key, K then V): the V loads are issued with the K loads,
// so an iteration waits for memory once, and a q.k dot needs 4 shuffles for two keys instead of
// 5 for one, which was the limit at large batches (batch 1024: 36% of a step, at ~1 TB/s).
template <int kPerLane, int kG>
__global__ void __launch_bounds__(kRowWarps * 32, 4) RowAttentionHalfWarpKernel(const __nv_bfloat16* __restrict__ cache, CacheGeometry g,
                                                                             AttnRows meta, RowArgs a) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int lane = threadIdx.x % 32, half = lane / 16;
  const int D = g.head_dim;
  const RowBlock b(meta, a, kG);
  const int d0 = (lane % 16) * kPerLane;
  float qv[kG][kPerLane], acc[kG][kPerLane], mx[kG], sum[kG];
#pragma unroll
  for (int gi = 0; gi < kG; ++gi) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) qv[gi][i] = acc[gi][i] = 0.0f;
    if (gi < b.nh) LoadVec(a.q + (static_cast<size_t>(b.r) * a.num_heads + b.h0 + gi) * D + d0, qv[gi]);
    mx[gi] = -INFINITY;
    sum[gi] = 0.0f;
  }
  HalfWarpAttend<kPerLane, kG, false>(cache, g, b.table, b.kv_head, b.begin, b.end, a.scale, qv, mx, sum, acc);
  FinishRow<kPerLane, kG>(meta, a, D, b.h0, b.nh, b.ri, b.r, b.split, half == 0, d0, mx, sum, acc);
}

// One block per (head, row-wise row): out = the splits' outputs weighted by sum * exp(max - max').
__global__ void CombineSplitsKernel(AttnRows meta, int num_heads, int head_dim, int splits, const float* partial, float* out) {
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  __shared__ float s_w[kMaxSplits], s_l[kMaxSplits], s_inv[1];
  const int ri = blockIdx.y;
  MergeSplits(meta, ri, meta.rowwise[ri], blockIdx.x, 1, num_heads, head_dim, splits, partial, out, s_w, s_l, s_inv);
}

template <class T, int kPerLane>
void LaunchRows(cudaStream_t stream, const T* cache, const CacheGeometry& g, const AttnRows& meta, const RowArgs& a, int kg) {
  const dim3 grid(a.num_heads / a.group * a.head_chunks, meta.num_rowwise, a.splits);
  switch (kg) {
    case 1: LaunchKernel(RowAttentionKernel<T, kPerLane, 1>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
    case 2: LaunchKernel(RowAttentionKernel<T, kPerLane, 2>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
    case 4: LaunchKernel(RowAttentionKernel<T, kPerLane, 4>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
    default: LaunchKernel(RowAttentionKernel<T, kPerLane, 8>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
  }
}

template <int kPerLane>
void LaunchHalfWarpRows(cudaStream_t stream, const __nv_bfloat16* cache, const CacheGeometry& g, const AttnRows& meta, const RowArgs& a,
                        int kg) {
  const dim3 grid(a.num_heads / a.group * a.head_chunks, meta.num_rowwise, a.splits);
  switch (kg) {
    case 1: LaunchKernel(RowAttentionHalfWarpKernel<kPerLane, 1>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
    case 2: LaunchKernel(RowAttentionHalfWarpKernel<kPerLane, 2>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
    default: LaunchKernel(RowAttentionHalfWarpKernel<kPerLane, 4>, grid, kRowWarps * 32, 0, stream, cache, g, meta, a); break;
  }
}

template <class T>
void LaunchRowsAnyDim(cudaStream_t stream, const T* cache, const CacheGeometry& g, const AttnRows& meta, const RowArgs& a, int kg) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if ((g.head_dim == 128 || g.head_dim == 64) && kg <= 4 && g_half_warp_rows) {
      if (g.head_dim == 128) {
        LaunchHalfWarpRows<8>(stream, cache, g, meta, a, kg);
      } else {
        LaunchHalfWarpRows<4>(stream, cache, g, meta, a, kg);
      }
      return;
    }
  }
  if (g.head_dim <= 32) {
    LaunchRows<T, 1>(stream, cache, g, meta, a, kg);
  } else if (g.head_dim <= 64) {
    LaunchRows<T, 2>(stream, cache, g, meta, a, kg);
  } else if (g.head_dim <= 128) {
    LaunchRows<T, 4>(stream, cache, g, meta, a, kg);
  } else {
    LaunchRows<T, 8>(stream, cache, g, meta, a, kg);
  }
}

}  // namespace

void SetMultiprocessorCount(int n) { g_multiprocessors = n > 0 ? n : 1; }
int MultiprocessorCount() { return g_multiprocessors; }
void SetHalfWarpAttention(bool on) { g_half_warp_rows = on; }
namespace {
int g_late_trigger = 3;  // measured: docs/benchmarks/cuda.md round 15
}
void SetLateTrigger(int mask) { g_late_trigger = mask; }
int LateTrigger() { return g_late_trigger; }
bool HalfWarpAttention() { return g_half_warp_rows; }
void ForceAttentionSplits(int splits) { g_forced_splits = std::clamp(splits, 0, kMaxSplits); }

void WriteKv(cudaStream_t stream, void* cache, const KvLayout& layout, int layer, const AttnRows& meta, const float* k,
             const float* v) {
  if (meta.rows == 0) return;
  const CacheGeometry g = Geometry(layout, layer);
  const int threads = g.token_elems >= 256 ? 256 : 64;
  if (layout.dtype == DType::kBF16) {
    LaunchKernel(WriteKvKernel<__nv_bfloat16>, meta.rows, threads, 0, stream, static_cast<__nv_bfloat16*>(cache), g, meta, k, v);
  } else {
    LaunchKernel(WriteKvKernel<float>, meta.rows, threads, 0, stream, static_cast<float*>(cache), g, meta, k, v);
  }
  DYN_CUDA_CHECK_LAUNCH();
}

void RopeWriteKv(cudaStream_t stream, float* q, int num_heads, float* k, const float* v, const float* cos_sin, RopeStyle style,
                 void* cache, const KvLayout& layout, int layer, const AttnRows& meta) {
  if (meta.rows == 0) return;
  const CacheGeometry g = Geometry(layout, layer);
  const int head_threads = std::min(128, (layout.head_dim / 2 + 31) / 32 * 32), per_block = 256 / head_threads;
  const int heads = num_heads + layout.num_kv_heads;
  const bool neox = style == RopeStyle::kNeox;
  const dim3 grid(meta.rows, (heads + per_block - 1) / per_block);
  if (layout.dtype == DType::kBF16) {
    LaunchKernel(RopeWriteKvKernel<__nv_bfloat16>, grid, head_threads * per_block, 0, stream, static_cast<__nv_bfloat16*>(cache), g,
                 meta, q, num_heads, k, v, cos_sin, neox, head_threads, per_block);
  } else {
    LaunchKernel(RopeWriteKvKernel<float>, grid, head_threads * per_block, 0, stream, static_cast<float*>(cache), g, meta, q,
                 num_heads, k, v, cos_sin, neox, head_threads, per_block);
  }
  DYN_CUDA_CHECK_LAUNCH();
}

int AttentionSplits(const KvLayout& layout, int num_heads, const AttnRows& meta) {
  if (meta.num_rowwise == 0) return 1;
  if (g_forced_splits > 0) return g_forced_splits;
  const int group = num_heads / layout.num_kv_heads, kg = GroupPerBlock(group);
  const int base = layout.num_kv_heads * ((group + kg - 1) / kg) * meta.num_rowwise;
  // Measured on an H200 (8B shape, docs/benchmarks/cuda.md): splitting only to fill the GPU twice
  // leaves small batches at long contexts bound by HBM latency (each warp has only 4 keys' loads in
  // flight; batch 8 at context 4096: 13.6 ms a step with 4 splits, 11.2 with 16), while splits of
  // fewer than ~128 keys cost more in blocks and combining than they gain (batch 1 at 4096: 6.6 ms
  // with 32 splits, 7.3 with 128). So: the larger of "fill twice, >= 32 keys a split" and "8 blocks
  // per multiprocessor, >= 128 keys a split"; none once the rows alone fill the GPU twice.
  if (base >= 2 * g_multiprocessors) return 1;
  const int fill = std::min((2 * g_multiprocessors + base - 1) / base, (meta.max_len + 31) / 32);
  const int deep = std::min((8 * g_multiprocessors + base - 1) / base, (meta.max_len + 127) / 128);
  const int want = std::min(std::max(fill, deep), kMaxSplits);
  int splits = 1;
  while (splits * 2 <= want) splits *= 2;
  return splits;
}

size_t AttentionPartialFloats(const KvLayout& layout, int num_heads, const AttnRows& meta, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(meta.num_rowwise) * num_heads * splits * (layout.head_dim + 2);
}

size_t AttentionCounters(const KvLayout& layout, int num_heads, const AttnRows& meta) {
  const int group = num_heads / layout.num_kv_heads, kg = GroupPerBlock(group);
  return static_cast<size_t>(layout.num_kv_heads) * ((group + kg - 1) / kg) * meta.num_rowwise;
}

void Attention(cudaStream_t stream, const void* cache, const KvLayout& layout, int layer, const AttnRows& meta,
               const float* q, int num_heads, float scale, int splits, float* partial, int* counters, float* out) {
  if (meta.rows == 0) return;
  if (layout.head_dim > kMaxHeadDim || layout.head_dim % 8 != 0) {
    Check(cudaErrorInvalidValue, "Attention: head_dim must be a multiple of 8 and <= 256", __FILE__, __LINE__);
  }
  if (meta.num_tiles > 0) AttentionTiles(stream, cache, layout, layer, meta, q, num_heads, scale, out);
  if (meta.num_rowwise == 0) return;
  const CacheGeometry g = Geometry(layout, layer);
  const int group = num_heads / layout.num_kv_heads, kg = GroupPerBlock(group);
  const RowArgs a{q, num_heads, group, (group + kg - 1) / kg, splits, scale, partial, out, counters};
  if (layout.dtype == DType::kBF16) {
    LaunchRowsAnyDim(stream, static_cast<const __nv_bfloat16*>(cache), g, meta, a, kg);
  } else {
    LaunchRowsAnyDim(stream, static_cast<const float*>(cache), g, meta, a, kg);
  }
  DYN_CUDA_CHECK_LAUNCH();
  if (splits > 1 && counters == nullptr) {
    LaunchKernel(CombineSplitsKernel, dim3(num_heads, meta.num_rowwise), 128, 0, stream, meta, num_heads, layout.head_dim, splits,
                 partial, out);
    DYN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dyn::cuda
