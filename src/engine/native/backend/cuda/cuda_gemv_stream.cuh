// Private to the m = 1 GEMV kernels (cuda_gemv.cu, cuda_gemv_staged.cu): how a lane streams its
// chunks of a weight row, so that every kernel walks them in the same order (their sums are then
// bitwise the same) and keeps the same loads in flight.
#pragma once

#include <cstdint>

#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda::gemv {

constexpr int kWarpsPerRow = 4;             // warps that share a row's chunks
constexpr int kUnroll = 4;                  // chunks a lane keeps in flight
constexpr int kStride = kWarpsPerRow * 32;  // between a lane's chunks of a row

// A lane's group of kUnroll chunks from chunk c on: load(c, chunk) fills one.
template <class Chunk, class Load>
__device__ __forceinline__ void LoadGroup(int64_t c, Chunk (&group)[kUnroll], Load load) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load(c + u * kStride, group[u]);
}

// Whether a lane starting at chunk c has a whole first group in a row of n8 chunks.
__device__ __forceinline__ bool HasFirstGroup(int64_t c, int64_t n8) { return c + (kUnroll - 1) * kStride < n8; }

// A lane's chunks c, c + kStride, ... < n8 of its row(s), multiplied by use(chunk, c): `held` is
// the first group, loaded before the kernel's wait when first_group (weights do not depend on the
// previous kernel); then kUnroll loads in flight at a time, and the last chunks one at a time.
template <class Chunk, class Load, class Use>
__device__ __forceinline__ void StreamChunks(int64_t c, int64_t n8, bool first_group, Chunk (&held)[kUnroll], Load load, Use use) {
  if (first_group) {
    while (true) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) use(held[u], c + u * kStride);
      c += kUnroll * kStride;
      if (!HasFirstGroup(c, n8)) break;
      LoadGroup(c, held, load);
    }
  }
  for (; c < n8; c += kStride) {
    Chunk one;
    load(c, one);
    use(one, c);
  }
}

}  // namespace dyn::cuda::gemv
