// Paged KV writes and causal paged attention of the CUDA backend (F32 cache, layout in KvLayout).
//
// Attention: one block of W warps per (query head, row). Each warp walks every W-th key of the
// row's causal range through the block table, four keys per iteration (their loads issued
// together), computes q.k with a warp reduction and keeps an
// online softmax (running max, sum and V accumulator, head_dim / 32 values per lane); the four
// partial states are merged through shared memory at the end. Prefill rows and decode rows run
// the same code: a row's range is [0, its position]. W is 4 when there are enough (head, row)
// blocks to fill the GPU, and 16 for decode-sized calls, where one block per head would leave
// most multiprocessors idle and each warp would walk a long range alone.
#include <cuda_runtime.h>

#include <cmath>

#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn::cuda {
namespace {

constexpr int kMaxHeadDim = 256;
int g_multiprocessors = 132;  // an H100/H200's, until SetMultiprocessorCount

struct CacheGeometry {
  size_t block_floats;   // floats of one block (all layers)
  size_t k_layer_off;    // floats from a block's start to this layer's K slot 0
  size_t v_delta;        // floats from a K slot to the same slot's V
  int token_floats;      // kv_heads * head_dim
  int block_size;
  int head_dim;
};

CacheGeometry Geometry(const KvLayout& l, int layer) {
  CacheGeometry g;
  g.block_floats = l.BlockFloats();
  g.k_layer_off = l.Offset(0, layer, 0, 0);
  g.v_delta = l.Offset(0, layer, 1, 0) - g.k_layer_off;
  g.token_floats = static_cast<int>(l.TokenFloats());
  g.block_size = l.block_size;
  g.head_dim = l.head_dim;
  return g;
}

__device__ __forceinline__ size_t SlotOffset(const CacheGeometry& g, const int32_t* table, int pos) {
  return static_cast<size_t>(table[pos / g.block_size]) * g.block_floats + g.k_layer_off +
         static_cast<size_t>(pos % g.block_size) * g.token_floats;
}

// One block per row; threads over kv_heads * head_dim.
__global__ void WriteKvKernel(float* cache, CacheGeometry g, AttnRows meta, const float* k, const float* v) {
  const int r = blockIdx.x;
  const size_t off = SlotOffset(g, meta.tables + meta.table_offset[r], meta.pos[r]);
  const float* kr = k + static_cast<size_t>(r) * g.token_floats;
  const float* vr = v + static_cast<size_t>(r) * g.token_floats;
  for (int i = threadIdx.x; i < g.token_floats; i += blockDim.x) {
    cache[off + i] = kr[i];
    cache[off + g.v_delta + i] = vr[i];
  }
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kPerLane, int kAttnWarps>
__global__ void __launch_bounds__(kAttnWarps * 32) AttentionKernel(const float* __restrict__ cache, CacheGeometry g, AttnRows meta,
                                                                   const float* __restrict__ q, int num_heads, int group,
                                                                   float scale, float* __restrict__ out) {
  const int h = blockIdx.x, r = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = g.head_dim;
  const int kv_head = h / group;
  const int len = meta.pos[r] + 1;
  const int32_t* table = meta.tables + meta.table_offset[r];
  const size_t row_head = (static_cast<size_t>(r) * num_heads + h) * D;

  float qv[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < D ? q[row_head + d] : 0.0f;
    acc[i] = 0.0f;
  }
  float mx = -INFINITY, sum = 0.0f;
  // kKeys keys per warp per iteration: their K (then V) loads are all in flight before the first
  // is used, instead of one dependent HBM round trip per key (decode is latency-bound otherwise).
  constexpr int kKeys = 4;
  for (int j0 = warp; j0 < len; j0 += kAttnWarps * kKeys) {
    const float* kp[kKeys];
    float kv[kKeys][kPerLane], s[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int j = min(j0 + u * kAttnWarps, len - 1);  // past the end: a valid key, masked below
      kp[u] = cache + SlotOffset(g, table, j) + static_cast<size_t>(kv_head) * D;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) kv[u][i] = lane + 32 * i < D ? kp[u][lane + 32 * i] : 0.0f;
    }
    float new_mx = mx;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) dot = fmaf(qv[i], kv[u][i], dot);
      s[u] = j0 + u * kAttnWarps < len ? WarpSum(dot) * scale : -INFINITY;
      new_mx = fmaxf(new_mx, s[u]);
    }
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) kv[u][i] = lane + 32 * i < D ? kp[u][lane + 32 * i + g.v_delta] : 0.0f;
    }
    const float corr = expf(mx - new_mx);
    sum *= corr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const float p = expf(s[u] - new_mx);  // 0 for a masked key
      sum += p;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = fmaf(p, kv[u][i], acc[i]);
    }
    mx = new_mx;
  }

  __shared__ float s_max[kAttnWarps], s_sum[kAttnWarps];
  __shared__ float s_acc[kAttnWarps][kPerLane * 32];
  if (lane == 0) {
    s_max[warp] = mx;
    s_sum[warp] = sum;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) s_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) total_max = fmaxf(total_max, s_max[w]);
  float weights[kAttnWarps], total_sum = 0.0f;
  for (int w = 0; w < kAttnWarps; ++w) {
    weights[w] = s_sum[w] > 0.0f ? expf(s_max[w] - total_max) : 0.0f;  // a warp with no keys has max -inf
    total_sum += s_sum[w] * weights[w];
  }
  const float inv = 1.0f / total_sum;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += s_acc[w][d] * weights[w];
    out[row_head + d] = o * inv;
  }
}

template <int kWarps>
void Launch(cudaStream_t stream, const float* cache, const CacheGeometry& g, const AttnRows& meta, const float* q, int num_heads,
            int group, float scale, float* out) {
  const dim3 grid(num_heads, meta.rows);
  const int threads = kWarps * 32;
  if (g.head_dim <= 32) {
    AttentionKernel<1, kWarps><<<grid, threads, 0, stream>>>(cache, g, meta, q, num_heads, group, scale, out);
  } else if (g.head_dim <= 64) {
    AttentionKernel<2, kWarps><<<grid, threads, 0, stream>>>(cache, g, meta, q, num_heads, group, scale, out);
  } else if (g.head_dim <= 128) {
    AttentionKernel<4, kWarps><<<grid, threads, 0, stream>>>(cache, g, meta, q, num_heads, group, scale, out);
  } else if (g.head_dim <= kMaxHeadDim) {
    AttentionKernel<8, kWarps><<<grid, threads, 0, stream>>>(cache, g, meta, q, num_heads, group, scale, out);
  } else {
    Check(cudaErrorInvalidValue, "Attention: head_dim > 256", __FILE__, __LINE__);
  }
}

}  // namespace

void SetMultiprocessorCount(int n) { g_multiprocessors = n > 0 ? n : 1; }

void WriteKv(cudaStream_t stream, float* cache, const KvLayout& layout, int layer, const AttnRows& meta, const float* k,
             const float* v) {
  if (meta.rows == 0) return;
  const CacheGeometry g = Geometry(layout, layer);
  WriteKvKernel<<<meta.rows, g.token_floats >= 256 ? 256 : 64, 0, stream>>>(cache, g, meta, k, v);
  DYN_CUDA_CHECK_LAUNCH();
}

void Attention(cudaStream_t stream, const float* cache, const KvLayout& layout, int layer, const AttnRows& meta,
               const float* q, int num_heads, float scale, float* out) {
  if (meta.rows == 0) return;
  const CacheGeometry g = Geometry(layout, layer);
  const int group = num_heads / layout.num_kv_heads;
  if (num_heads * meta.rows >= 2 * g_multiprocessors) {
    Launch<4>(stream, cache, g, meta, q, num_heads, group, scale, out);
  } else {
    Launch<16>(stream, cache, g, meta, q, num_heads, group, scale, out);
  }
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
