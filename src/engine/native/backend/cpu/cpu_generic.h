// Helpers of the portable kernels (cpu_*_generic.cpp): fixed-order reductions written so that GCC
// vectorizes them (16 independent lanes = two AVX2 registers), and whose result for one output
// element never depends on the batch or the thread that computes it.
#pragma once

#include <cmath>
#include <cstdint>

namespace dyn::cpu {

// sum_i a[i] * b[i] in 16 lanes (lane l takes i = l mod 16), lanes added in order.
inline float Dot16(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  for (int l = 0; i + l < n; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += acc[l];
  return sum;
}

}  // namespace dyn::cpu
