// Private to cuda_attention*.cu: where a token's K and V live in the paged cache (KvLayout).
#pragma once

#include <cuda_runtime.h>

#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn::cuda {

struct CacheGeometry {
  size_t block_elems;  // elements of one block (all layers)
  size_t k_layer_off;  // elements from a block's start to this layer's K slot 0
  size_t v_delta;      // elements from a K slot to the same slot's V
  int token_elems;     // kv_heads * head_dim
  int block_size;
  int head_dim;
};

inline CacheGeometry Geometry(const KvLayout& l, int layer) {
  CacheGeometry g;
  g.block_elems = l.BlockFloats();
  g.k_layer_off = l.Offset(0, layer, 0, 0);
  g.v_delta = l.Offset(0, layer, 1, 0) - g.k_layer_off;
  g.token_elems = static_cast<int>(l.TokenFloats());
  g.block_size = l.block_size;
  g.head_dim = l.head_dim;
  return g;
}

// Element offset of token `pos`'s K slot (kv head 0) in the sequence with block table `table`.
__device__ __forceinline__ size_t SlotOffset(const CacheGeometry& g, const int32_t* table, int pos) {
  return static_cast<size_t>(table[pos / g.block_size]) * g.block_elems + g.k_layer_off +
         static_cast<size_t>(pos % g.block_size) * g.token_elems;
}

}  // namespace dyn::cuda
