// Decode attention with the key splits of a (kv head, row) merged inside a thread-block cluster.
//
// Why: at batch 1 the row-wise kernel splits the context over 16+ blocks per kv head to have
// enough loads in flight; their partial results then went through global memory to the last block
// to arrive or to a combine kernel, and the RoPE + KV write ran as a kernel before it. Each of
// those is a dependent step of a few microseconds, 32 times a token. Here the splits of one
// (kv head, row) are one cluster: each block writes its (max, sum, output) to global scratch, and
// after one cluster barrier (which orders those stores for the peers) every block merges a share
// of the outputs, one lane per split; or, without scratch, through the blocks' shared memory with a
// second barrier. Optionally the kernel starts with RopeWriteKv's work for its row. The key loop
// is the half-warp one of RowAttentionHalfWarpKernel (cuda_attention_rows.cuh).
//
// Its phases are latency-bound (a few hundred dependent instructions a warp, one or two warps a
// scheduler): round 17 timed the key loop's arithmetic alone at ~2.5 us with 4 warps a block.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "engine/native/backend/cuda/cuda_attention_rows.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"
#include "engine/native/backend/cuda/cuda_rope.cuh"

namespace dyn::cuda {
namespace {

namespace cg = cooperative_groups;
constexpr int kMaxDecodeDim = 128;

// The splits' results merged with one lane per split (MergeSplits' arithmetic, the sums as a tree):
// the cluster's blocks share the n outputs, splits lanes each (a power of two, <= 16), and each
// lane loads its split's (max, sum) and output at once - load(e, s) - rather than one thread
// loading all splits' in turn. The output goes to out[e].
template <class Load>
__device__ __forceinline__ void MergeSplitsByLanes(int splits, int rank, int n, float* out, Load load) {
  const int s = threadIdx.x % splits, groups = blockDim.x / splits;
  for (int e0 = rank * groups; e0 < n; e0 += splits * groups) {  // the same trips for all threads (shuffles)
    const int e = e0 + static_cast<int>(threadIdx.x) / splits;
    float o;
    const float2 ml = load(min(e, n - 1), s, o);
    float m = ml.y > 0.0f ? ml.x : -INFINITY;  // sum 0: an empty split
    for (int x = splits / 2; x > 0; x >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, x));
    const float w = ml.y > 0.0f ? ml.y * expf(ml.x - m) : 0.0f;
    float total = w, sum = w > 0.0f ? o * w : 0.0f;
    for (int x = splits / 2; x > 0; x >>= 1) {
      total += __shfl_xor_sync(0xffffffffu, total, x);
      sum += __shfl_xor_sync(0xffffffffu, sum, x);
    }
    if (s == 0 && e < n) out[e] = sum * (1.0f / total);
  }
}

// The block's rotated q heads (n floats in shared memory) back into the call's q at q_off, as
// RopeWriteKv leaves them: once per (kv head, row), after every block of the cluster has read q.
__device__ __forceinline__ void StoreRotatedQ(const DecodeRope& rope, size_t q_off, const float* s_q, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) rope.q[q_off + e] = s_q[e];
}

// The cluster's merge without the warps' merge or global memory (DYN_CUDA_DECODE_MERGE=push): every
// warp of every block pushes its online-softmax state straight into the shared memory of the
// blocks that own its dims (lane group q, dims q * kPerLane.., belongs to rank q % splits) and its
// (max, sum) into every block's; after the one cluster barrier each block merges its dims over all
// splits x kWarps states from its own shared memory (the weights exp(max_p - max) once per state
// and head, the sums in a fixed order) and writes them. Replaces the warps' merge through shared
// memory, the split results' stores to global memory, their release at the barrier and the loads
// after it (~4.3 us a layer at batch 1, context 512: round 19's trace). Another summation order
// than the other merges (within rounding of them).
template <int kPerLane, int kG, int kWarps>
__device__ __forceinline__ void PushMergeSplits(const RowArgs& a, const RowBlock& b, const DecodeRope& rope, size_t q_off,
                                                const float* s_q, int D, const float (&mx)[kG], const float (&sum)[kG],
                                                const float (&acc)[kG][kPerLane]) {
  static_assert(kPerLane % 4 == 0, "whole float4s of a lane's dims");
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int S = a.splits, P = S * kWarps, L = (16 / S) * kPerLane;  // states, dims a rank owns
  const int slot = rank * kWarps + warp;
  // [P][kG][L] states' accumulators for this block's dims; [P][kG] (max, sum); weights; totals.
  __shared__ __align__(16) float r_acc[kWarps * kG * kMaxDecodeDim];
  __shared__ __align__(16) float r_ml[kMaxClusterSplits * kWarps * kG * 2];
  __shared__ float r_w[kMaxClusterSplits * kWarps * kG], r_total[kG], r_part[kWarps * 32];
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every peer has started (the kernel's first arrive)
  if (lane < 16) {  // lanes l and l + 16 hold the same dims after HalfWarpAttend
    float* dst = cluster.map_shared_rank(r_acc, lane % S);
    const int local0 = (lane / S) * kPerLane;
#pragma unroll
    for (int gi = 0; gi < kG; ++gi) {
#pragma unroll
      for (int i = 0; i < kPerLane; i += 4) {
        *reinterpret_cast<float4*>(dst + (slot * kG + gi) * L + local0 + i) =
            make_float4(acc[gi][i], acc[gi][i + 1], acc[gi][i + 2], acc[gi][i + 3]);
      }
    }
  }
  if (lane < S) {
    float* dst = cluster.map_shared_rank(r_ml, lane);
#pragma unroll
    for (int gi = 0; gi < kG; ++gi) *reinterpret_cast<float2*>(dst + (slot * kG + gi) * 2) = make_float2(mx[gi], sum[gi]);
  }
  cluster.sync();  // every state has landed; no block reads a peer's memory after this
  BlockTraceMark(2);
  if (rope.cos_sin != nullptr && rank == 0) StoreRotatedQ(rope, q_off, s_q, b.nh * D);
  if (warp < kG) {  // warp gi: head gi's largest max, each state's weight, the total
    const int gi = warp;
    float m = -INFINITY;
    for (int p = lane; p < P; p += 32) {
      const float2 ml = *reinterpret_cast<const float2*>(r_ml + (p * kG + gi) * 2);
      if (ml.y > 0.0f) m = fmaxf(m, ml.x);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float total = 0.0f;
    for (int p = lane; p < P; p += 32) {
      const float2 ml = *reinterpret_cast<const float2*>(r_ml + (p * kG + gi) * 2);
      const float w = WarpWeight(ml.x, ml.y, m);  // 0 for an empty state
      r_w[p * kG + gi] = w;
      total += w * ml.y;
    }
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) r_total[gi] = total;
  }
  __syncthreads();
  // Output e = (head gi, owned dim local) summed over the states in C interleaved chunks, then the
  // chunks in order; local is dim (local / kPerLane * S + rank) * kPerLane + local % kPerLane.
  const int outs = b.nh * L, threads = static_cast<int>(blockDim.x);
  const int C = outs <= threads ? threads / outs : 1;
  auto store = [&](int e, float v) {
    const int gi = e / L, local = e % L;
    const int d = ((local / kPerLane) * S + rank) * kPerLane + local % kPerLane;
    a.out[q_off + static_cast<size_t>(gi) * D + d] = v / r_total[gi];
  };
  for (int idx = threadIdx.x; idx < outs * C; idx += threads) {
    const int e = idx % outs, c = idx / outs, gi = e / L, local = e % L;
    float v = 0.0f;
    for (int p = c; p < P; p += C) v = fmaf(r_w[p * kG + gi], r_acc[(p * kG + gi) * L + local], v);
    if (C == 1) {
      store(e, v);
    } else {
      r_part[c * outs + e] = v;
    }
  }
  if (C > 1) {
    __syncthreads();
    for (int e = threadIdx.x; e < outs; e += threads) {
      float v = 0.0f;
      for (int c = 0; c < C; ++c) v += r_part[c * outs + e];
      store(e, v);
    }
  }
  BlockTraceEnd();
}

// Grid (kv heads x head chunks, rows, splits), clusters of (1, 1, splits); kWarps warps a block.
template <int kPerLane, int kG, int kWarps, int kN, bool kPush>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps)
    DecodeAttentionKernel(__nv_bfloat16* cache, CacheGeometry g, AttnRows meta, RowArgs a, DecodeRope rope, bool late_trigger) {
  // A block may write a peer's shared memory only once the peer runs: this phase of the cluster
  // barrier completes when every block has started (waited for before PushMergeSplits' stores).
  if constexpr (kPush) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  if (!late_trigger) LetNextKernelLaunch();
  WaitForPreviousKernel();
  const int lane = threadIdx.x % 32, half = lane / 16;
  const int D = g.head_dim, d0 = (lane % 16) * kPerLane;
  const RowBlock b(meta, a, kG);
  __shared__ float s_q[kG * kMaxDecodeDim], s_k[kMaxDecodeDim];
  const size_t q_off = (static_cast<size_t>(b.r) * a.num_heads + b.h0) * D;
  for (int e = threadIdx.x; e < b.nh * D; e += blockDim.x) s_q[e] = a.q[q_off + e];
  if (rope.cos_sin != nullptr) {
    // RopeWriteKv's arithmetic (RotatePair), on shared copies: every split's block rotates its q
    // heads; the block whose split holds the new token (and serves the kv head's first query
    // heads) rotates k and writes K and V to the cache before its own loads read them.
    const int pos = meta.pos[b.r];
    const bool owner = b.begin <= pos && pos < b.end && blockIdx.x % a.head_chunks == 0;
    float* k = rope.k + static_cast<size_t>(b.r) * g.token_elems + static_cast<size_t>(b.kv_head) * D;
    if (owner) {
      for (int e = threadIdx.x; e < D; e += blockDim.x) s_k[e] = k[e];
    }
    __syncthreads();
    const float* cs = rope.cos_sin + static_cast<size_t>(b.r) * D;  // head_dim / 2 (cos, sin) pairs
    for (int t = threadIdx.x; t < b.nh * (D / 2); t += blockDim.x) RotatePair(s_q, t, D, cs, rope.neox);
    if (owner) {
      for (int t = threadIdx.x; t < D / 2; t += blockDim.x) RotatePair(s_k, t, D, cs, rope.neox);
    }
    __syncthreads();
    if (a.splits == 1) StoreRotatedQ(rope, q_off, s_q, b.nh * D);  // with several: rank 0, after the cluster barrier
    if (owner) {
      const size_t off = SlotOffset(g, b.table, pos) + static_cast<size_t>(b.kv_head) * D;
      const float* v = rope.v + static_cast<size_t>(b.r) * g.token_elems + static_cast<size_t>(b.kv_head) * D;
      for (int e = threadIdx.x; e < D; e += blockDim.x) {
        k[e] = s_k[e];
        StoreElem(cache + off + e, s_k[e]);
        StoreElem(cache + off + g.v_delta + e, v[e]);
      }
    }
  }
  __syncthreads();
  BlockTraceMark(0);  // q (and the new k) loaded, rotated, the new token written

  float qv[kG][kPerLane], acc[kG][kPerLane], mx[kG], sum[kG];
  StartWarpState(s_q, D, b.nh, d0, qv, mx, sum, acc);
  HalfWarpAttend<kPerLane, kG, true, kWarps, kN>(cache, g, b.table, b.kv_head, b.begin, b.end, a.scale, qv, mx, sum, acc);
  BlockTraceMark(1);  // the key loop done
  if (late_trigger) LetNextKernelLaunch();
  if constexpr (kPush) {  // (the launch checks that the splits are a power of two, over 1)
    PushMergeSplits<kPerLane, kG, kWarps>(a, b, rope, q_off, s_q, D, mx, sum, acc);
    return;
  }

  // The warps merge in shared memory (FinishRow's arithmetic): this split's normalized output and
  // its (max, sum), or with one split the output itself.
  __shared__ float s_max[kWarps][kG], s_sum[kWarps][kG], s_acc[kWarps][kG][kMaxDecodeDim];
  __shared__ float s_o[kG * kMaxDecodeDim], s_ml[kG][2];
  StoreWarpState(s_max, s_sum, s_acc, half == 0, d0, mx, sum, acc);
  __syncthreads();
  for (int e = threadIdx.x; e < b.nh * D; e += blockDim.x) {
    const int gi = e / D, d = e % D;
    const WarpMerged mw = MergeWarps(s_max, s_sum, s_acc, gi, d);
    const float total_max = mw.max, total_sum = mw.sum, o = mw.o;
    if (a.splits == 1) {
      a.out[q_off + e] = o / total_sum;
      continue;
    }
    if (a.partial != nullptr) {
      StoreSplitResult(meta, a, D, SplitSlot(a, b.ri, b.h0 + gi, b.split), d, total_max, total_sum, o);
      continue;
    }
    s_o[e] = total_sum > 0.0f ? o / total_sum : 0.0f;  // an empty split: weight 0 below
    if (d == 0) {
      s_ml[gi][0] = total_max;
      s_ml[gi][1] = total_sum;
    }
  }
  if (a.splits == 1) {
    BlockTraceEnd();
    return;
  }
  // The splits merge (MergeSplits' arithmetic) after a cluster barrier: every split's result is in
  // scratch or in its block's shared memory.
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  BlockTraceMark(2);
  const int rank = static_cast<int>(cluster.block_rank());
  if (rope.cos_sin != nullptr && rank == 0) StoreRotatedQ(rope, q_off, s_q, b.nh * D);
  if (a.partial != nullptr) {
    // From global memory (the barrier's release and acquire order the peers' stores before these
    // loads), a lane a split; no second barrier, since no block reads a peer's shared memory.
    MergeSplitsByLanes(a.splits, rank, b.nh * D, a.out + q_off, [&](int e, int s, float& o) {
      const size_t slot = SplitSlot(a, b.ri, b.h0 + e / D, s);
      o = __ldcg(a.partial + slot * D + e % D);
      return __ldcg(reinterpret_cast<const float2*>(SplitMaxSum(meta, a, D, slot)));
    });
    BlockTraceEnd();
    return;
  }
  // From the peers' shared memory, block `rank` writing every splits-th share of the outputs.
  // (MergeSplitsByLanes here, every lane loading from a peer at once, was slower: 5.3 us from the
  // barrier to the block's end against 3.4, round 17.)
  for (int e = rank * blockDim.x + threadIdx.x; e < b.nh * D; e += a.splits * blockDim.x) {
    const int gi = e / D;
    a.out[q_off + e] = MergeSplitElement(
        a.splits,
        [&](int s) {
          const float* ml = cluster.map_shared_rank(&s_ml[gi][0], s);
          return make_float2(ml[0], ml[1]);
        },
        [&](int s) { return *cluster.map_shared_rank(&s_o[e], s); });
  }
  cluster.sync();  // no block leaves while a peer reads its shared memory
  BlockTraceEnd();
}

template <int kPerLane, int kG, int kWarps, int kN, bool kPush>
void LaunchDecodeKernel(cudaStream_t stream, dim3 grid, int splits, __nv_bfloat16* cache, const CacheGeometry& g, const AttnRows& meta,
                        const RowArgs& a, const DecodeRope& rope) {
  static const bool non_portable = [] {  // clusters of up to 16 blocks (8 is the portable size)
    Check(cudaFuncSetAttribute(DecodeAttentionKernel<kPerLane, kG, kWarps, kN, kPush>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "cudaFuncSetAttribute", __FILE__, __LINE__);
    return true;
  }();
  (void)non_portable;
  LaunchKernelIn(splits, DecodeAttentionKernel<kPerLane, kG, kWarps, kN, kPush>, grid, kWarps * 32, 0, stream, cache, g, meta, a, rope,
                 (LateTrigger() & 2) != 0);
}

// push: PushMergeSplits, for a power of two of splits over 1 (its own instantiation, so that the
// default kernel's registers do not change).
template <int kPerLane, int kG, int kWarps, int kN = kKeys>
void LaunchDecode(cudaStream_t stream, dim3 grid, int splits, __nv_bfloat16* cache, const CacheGeometry& g, const AttnRows& meta,
                  const RowArgs& a, const DecodeRope& rope, bool push) {
  if (push && splits > 1 && (splits & (splits - 1)) == 0) {
    LaunchDecodeKernel<kPerLane, kG, kWarps, kN, true>(stream, grid, splits, cache, g, meta, a, rope);
  } else {
    LaunchDecodeKernel<kPerLane, kG, kWarps, kN, false>(stream, grid, splits, cache, g, meta, a, rope);
  }
}

// warps 8 with kn 2 or 4 keys a half-warp in flight, or 4 warps with 4 (kKeys).
template <int kPerLane, int kG>
void LaunchDecodeWarps(cudaStream_t stream, dim3 grid, int splits, int warps, int kn, __nv_bfloat16* cache, const CacheGeometry& g,
                       const AttnRows& meta, const RowArgs& a, const DecodeRope& rope, bool push) {
  if (warps == 8 && kn == 2) {
    LaunchDecode<kPerLane, kG, 8, 2>(stream, grid, splits, cache, g, meta, a, rope, push);
  } else if (warps == 8) {
    LaunchDecode<kPerLane, kG, 8>(stream, grid, splits, cache, g, meta, a, rope, push);
  } else {
    LaunchDecode<kPerLane, kG, kRowWarps>(stream, grid, splits, cache, g, meta, a, rope, push);
  }
}

// The row-wise rule's split count beyond the cluster limit (32 at batch 1 from ~1k tokens) runs
// as half as many blocks of twice the warps, so the keys in flight stay the same.
int ClusterSplits(int splits) { return splits <= kMaxClusterSplits ? splits : splits / 2; }
int ClusterWarps(int splits) { return splits <= kMaxClusterSplits ? kRowWarps : 2 * kRowWarps; }

// The grid's size in 4-warp blocks.
int DecodeBlocks(const KvLayout& layout, int num_heads, const AttnRows& meta, int splits) {
  const int group = num_heads / layout.num_kv_heads, kg = GroupPerBlock(group);
  return layout.num_kv_heads * ((group + kg - 1) / kg) * meta.num_rowwise * ClusterSplits(splits) * ClusterWarps(splits) / kRowWarps;
}

}  // namespace

// Measured on an H200 (8B shape, docs/benchmarks/cuda.md round 7): batch 1 at context 512 (16
// splits, 128 blocks) 0.13 ms a step faster than the row-wise kernel + combine; batch 8 at 4096
// (16 splits, 1024 blocks, several waves of 16-block clusters) 0.65 ms slower. So: only grids of
// at most two blocks per multiprocessor. 32 splits run as 16 blocks of 8 warps (not bitwise the
// row-wise kernel's sums: the keys are spread over the warps differently): batch 1 at 2048-4096
// 0.25 ms a step faster; batch 2 at 4096 (256 such blocks) 0.3 ms slower, so the limit counts
// 4-warp blocks.
//
// A grid of at most one block per multiprocessor (batch 1 below ~1k tokens: 16 splits of <= 64
// keys) runs blocks of 8 warps, each half-warp with 2 keys in flight for splits of up to 32 keys
// (4 beyond), rather than 4 warps with 4 keys: the phases of this kernel are bound by the latency
// of each warp's serial instructions (one warp per scheduler at 4 warps a block; round 17 timed
// the key loop's arithmetic alone, with no loads, at ~2.5 us), so more, shorter warps finish
// sooner. Batch 1 at context 512: 4.21-4.22 ms a step against 4.27-4.30 (round 17); 16 warps (all
// of a multiprocessor's registers, so the o projection's blocks cannot start beside them) were slower.
bool DecodeAttentionApplies(const KvLayout& layout, int num_heads, const AttnRows& meta, int splits) {
  const int group = num_heads / layout.num_kv_heads;
  return meta.decode && meta.num_tiles == 0 && meta.num_rowwise == meta.rows && meta.rows > 0 && layout.dtype == DType::kBF16 &&
         (layout.head_dim == 128 || layout.head_dim == 64) && GroupPerBlock(group) <= 4 && HalfWarpAttention() && splits >= 1 &&
         ClusterSplits(splits) <= kMaxClusterSplits && DecodeBlocks(layout, num_heads, meta, splits) <= 2 * MultiprocessorCount();
}

void DecodeAttention(cudaStream_t stream, void* cache, const KvLayout& layout, int layer, const AttnRows& meta, const float* q,
                     int num_heads, float scale, int splits, const DecodeRope& rope, const DecodeOptions& opt, float* out) {
  if (!DecodeAttentionApplies(layout, num_heads, meta, splits)) {
    Check(cudaErrorInvalidValue, "DecodeAttention: does not apply", __FILE__, __LINE__);
  }
  const CacheGeometry g = Geometry(layout, layer);
  const int group = num_heads / layout.num_kv_heads, kg = GroupPerBlock(group);
  const int cluster = ClusterSplits(splits);
  // The lanes' merge takes a power of two of splits (the rule's always are; DYN_CUDA_SPLITS may not be).
  float* partial = (cluster & (cluster - 1)) == 0 ? opt.partial : nullptr;
  const RowArgs a{q, num_heads, group, (group + kg - 1) / kg, cluster, scale, partial, out, nullptr};
  const dim3 grid(layout.num_kv_heads * a.head_chunks, meta.num_rowwise, cluster);
  int warps = ClusterWarps(splits), kn = kKeys;
  if (warps == kRowWarps && opt.warps == 8 && static_cast<int>(grid.x * grid.y * grid.z) <= MultiprocessorCount()) {
    warps = 8;
    const int keys_per_split = (meta.max_len + cluster - 1) / cluster;
    kn = keys_per_split <= 2 * warps * 2 ? 2 : kKeys;  // 16 half-warps with 2 keys each cover 32
  }
  auto* c = static_cast<__nv_bfloat16*>(cache);
  if (layout.head_dim == 128) {
    switch (kg) {
      case 1: LaunchDecodeWarps<8, 1>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
      case 2: LaunchDecodeWarps<8, 2>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
      default: LaunchDecodeWarps<8, 4>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
    }
  } else {
    switch (kg) {
      case 1: LaunchDecodeWarps<4, 1>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
      case 2: LaunchDecodeWarps<4, 2>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
      default: LaunchDecodeWarps<4, 4>(stream, grid, cluster, warps, kn, c, g, meta, a, rope, opt.push); break;
    }
  }
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
