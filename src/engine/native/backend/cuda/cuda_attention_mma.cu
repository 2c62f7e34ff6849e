// Tensor-core causal attention for query tiles of prefill chunks (bf16 KV cache, head_dim 64 or
// 128), flash-attention-2 style: one block of 4 warps per (query tile of up to 64 consecutive rows
// of one sequence, query head); each warp owns 16 query rows. Per 64-key tile of the paged cache
// (K and V staged in shared memory), S = Q K^T and O += P V run on mma.sync m16n8k16 (bf16 in, F32
// accumulate); the softmax is online in registers (FA2: the S accumulator's layout is the P
// operand's, so P never leaves registers). Q is rounded to bf16 once, P to bf16 per tile; the
// running max, sum and O stay F32. Keys past the tile's last row's position are skipped.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

constexpr int kTileWarps = 4;
constexpr int kKeyTile = 64;
static_assert(kTileWarps * 16 == kAttnTileRows);

// D (16x8, F32) += A (16x16, bf16, row-major) * B (16x8, bf16, column-major). Fragments (PTX ISA,
// mma.m16n8k16): with g = lane / 4, t = lane % 4, a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 =
// A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..][g]; d0,d1 = D[g][2t..],
// d2,d3 = D[g+8][2t..].
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lower 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t Pack(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

template <int kD>
__global__ void __launch_bounds__(kTileWarps * 32) TileAttentionKernel(const __nv_bfloat16* __restrict__ cache, CacheGeometry g,
                                                                       AttnRows meta, const float* __restrict__ q, int num_heads,
                                                                       int group, float scale_log2, float* __restrict__ out) {
  constexpr int kLd = kD + 8;  // padded rows: the fragment loads below hit 32 different banks
  __shared__ alignas(16) __nv_bfloat16 sk[kKeyTile][kLd];
  __shared__ alignas(16) __nv_bfloat16 sv[kKeyTile][kLd];
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int r0 = meta.tiles[2 * blockIdx.x], nr = meta.tiles[2 * blockIdx.x + 1];
  const int h = blockIdx.y, kv_head = h / group;
  const int pos0 = meta.pos[r0], last = pos0 + nr - 1;
  const int32_t* table = meta.tables + meta.table_offset[r0];
  const int ra = warp * 16 + g8, rb = ra + 8;  // this thread's two rows within the tile
  const int qpos_a = pos0 + ra, qpos_b = pos0 + rb;
  const int warp_last = pos0 + min(warp * 16 + 15, nr - 1);

  auto qat = [&](int row, int col) {
    return row < nr ? q[(static_cast<size_t>(r0 + row) * num_heads + h) * kD + col] : 0.0f;
  };
  uint32_t qa[kD / 16][4];
#pragma unroll
  for (int kb = 0; kb < kD / 16; ++kb) {
    const int c = kb * 16 + 2 * t4;
    qa[kb][0] = Pack(qat(ra, c), qat(ra, c + 1));
    qa[kb][1] = Pack(qat(rb, c), qat(rb, c + 1));
    qa[kb][2] = Pack(qat(ra, c + 8), qat(ra, c + 9));
    qa[kb][3] = Pack(qat(rb, c + 8), qat(rb, c + 9));
  }
  float o[kD / 8][4];
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  for (int k0 = 0; k0 <= last; k0 += kKeyTile) {
    __syncthreads();  // the previous tile's readers are done
    constexpr int kChunks = kKeyTile * kD / 8;  // 16-byte pieces of K (and of V)
    for (int c = threadIdx.x; c < kChunks; c += kTileWarps * 32) {
      const int key = c / (kD / 8), part = (c % (kD / 8)) * 8, j = k0 + key;
      uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;  // keys past `last`: zeros (masked, and no NaN in P V)
      if (j <= last) {
        const __nv_bfloat16* p = cache + SlotOffset(g, table, j) + static_cast<size_t>(kv_head) * kD + part;
        kx = *reinterpret_cast<const uint4*>(p);
        vx = *reinterpret_cast<const uint4*>(p + g.v_delta);
      }
      *reinterpret_cast<uint4*>(&sk[key][part]) = kx;
      *reinterpret_cast<uint4*>(&sv[key][part]) = vx;
    }
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of this tile is in the future of this warp's rows

    float s[kKeyTile / 8][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kb = 0; kb < kD / 16; ++kb) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&sk[nt * 8 + g8][kb * 16 + 2 * t4]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&sk[nt * 8 + g8][kb * 16 + 8 + 2 * t4]);
        Mma(s[nt], qa[kb], b0, b1);
      }
    }
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t4 + (e & 1);
        const bool in = key <= (e < 2 ? qpos_a : qpos_b);
        s[nt][e] = in ? s[nt][e] * scale_log2 : -INFINITY;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {  // the 4 threads of a quad share rows
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o2));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o2));
    }
    const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    // A row with no key yet (only padding rows past nr can be) keeps everything at 0.
    const float base_a = new_a == -INFINITY ? 0.0f : new_a, base_b = new_b == -INFINITY ? 0.0f : new_b;
    const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
    m_a = new_a, m_b = new_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - base_a), s[nt][1] = exp2f(s[nt][1] - base_a);
      s[nt][2] = exp2f(s[nt][2] - base_b), s[nt][3] = exp2f(s[nt][3] - base_b);
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) o[nt][0] *= corr_a, o[nt][1] *= corr_a, o[nt][2] *= corr_b, o[nt][3] *= corr_b;
#pragma unroll
    for (int kb = 0; kb < kKeyTile / 16; ++kb) {
      const uint32_t pa[4] = {Pack(s[2 * kb][0], s[2 * kb][1]), Pack(s[2 * kb][2], s[2 * kb][3]), Pack(s[2 * kb + 1][0], s[2 * kb + 1][1]),
                              Pack(s[2 * kb + 1][2], s[2 * kb + 1][3])};
      const int key = kb * 16 + 2 * t4;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + g8;
        const uint32_t b0 = Pack(sv[key][d], sv[key + 1][d]);
        const uint32_t b1 = Pack(sv[key + 8][d], sv[key + 9][d]);
        Mma(o[nt], pa, b0, b1);
      }
    }
  }
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o2);
  }
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) {
    const int col = nt * 8 + 2 * t4;
    if (ra < nr) {
      float* p = out + (static_cast<size_t>(r0 + ra) * num_heads + h) * kD + col;
      *reinterpret_cast<float2*>(p) = make_float2(o[nt][0] * inv_a, o[nt][1] * inv_a);
    }
    if (rb < nr) {
      float* p = out + (static_cast<size_t>(r0 + rb) * num_heads + h) * kD + col;
      *reinterpret_cast<float2*>(p) = make_float2(o[nt][2] * inv_b, o[nt][3] * inv_b);
    }
  }
}

}  // namespace

bool AttentionHasTileKernel(const KvLayout& layout) {
  return layout.dtype == DType::kBF16 && (layout.head_dim == 64 || layout.head_dim == 128);
}

void AttentionTiles(cudaStream_t stream, const void* cache, const KvLayout& layout, int layer, const AttnRows& meta,
                    const float* q, int num_heads, float scale, float* out) {
  if (meta.num_tiles == 0) return;
  if (!AttentionHasTileKernel(layout)) Check(cudaErrorInvalidValue, "AttentionTiles: layout has no tile kernel", __FILE__, __LINE__);
  const CacheGeometry g = Geometry(layout, layer);
  const int group = num_heads / layout.num_kv_heads;
  const float scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid(meta.num_tiles, num_heads);
  const auto* c = static_cast<const __nv_bfloat16*>(cache);
  if (layout.head_dim == 64) {
    LaunchKernel(TileAttentionKernel<64>, grid, kTileWarps * 32, 0, stream, c, g, meta, q, num_heads, group, scale_log2, out);
  } else {
    LaunchKernel(TileAttentionKernel<128>, grid, kTileWarps * 32, 0, stream, c, g, meta, q, num_heads, group, scale_log2, out);
  }
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
