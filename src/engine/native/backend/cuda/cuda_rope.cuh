// Private to the CUDA backend's .cu files: the rotary embedding of one pair of a row, shared by
// RopeKernel (cuda_kernels.cu) and the fused RoPE + KV write (cuda_attention.cu), so the two give
// the same bits.
#pragma once

#include <cuda_runtime.h>

namespace dyn::cuda {

// Rotates pair t (head t / half, index t % half) of one row x[heads][head_dim] in place by the
// row's (cos, sin) pairs, neox (i, i + half) or interleaved (2i, 2i + 1); returns the element
// offsets it wrote. Products and sums are rounded one by one, as the CPU backend computes them.
__device__ __forceinline__ int2 RotatePair(float* x, int t, int head_dim, const float* cos_sin_row, bool neox) {
  const int half = head_dim / 2, j = t % half;
  const int base = (t / half) * head_dim;
  const float c = cos_sin_row[j * 2], s = cos_sin_row[j * 2 + 1];
  const int a = base + (neox ? j : 2 * j), b = base + (neox ? j + half : 2 * j + 1);
  const float x0 = x[a], x1 = x[b];
  x[a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  x[b] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
  return make_int2(a, b);
}

}  // namespace dyn::cuda
