// Test helpers shared by the CUDA backend's tests: random inputs and a relative error that
// treats NaN (an element a kernel forgot to write) as infinitely wrong.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/quant_blocks.h"

namespace dyn {

// A paged KV layout for the tests.
inline KvLayout TestKvLayout(int num_layers, int num_kv_heads, int head_dim, int block_size, int num_blocks,
                             DType dtype = DType::kF32) {
  return KvLayout{.num_layers = num_layers, .num_kv_heads = num_kv_heads, .head_dim = head_dim, .block_size = block_size,
                  .num_blocks = num_blocks, .dtype = dtype};
}

inline std::vector<float> RandomVec(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// ||got - want|| / ||want||; infinity when got has a NaN (an unwritten or broken element).
inline double RelErr(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Random weight bytes of type t: random payload with finite, modest scales.
inline std::vector<uint8_t> RandomWeightBytes(DType t, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(rows * DTypeRowBytes(t, cols));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const size_t n = static_cast<size_t>(rows) * cols;
  switch (t) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) reinterpret_cast<float*>(bytes.data())[i] = u(rng);
      break;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(bytes.data())[i] = F32ToF16(u(rng));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        const float f = u(rng);
        uint32_t b;
        std::memcpy(&b, &f, 4);
        reinterpret_cast<uint16_t*>(bytes.data())[i] = static_cast<uint16_t>(b >> 16);
      }
      break;
    case DType::kQ8_0:
      for (size_t b = 0; b < n / 32; ++b) {
        auto& blk = reinterpret_cast<BlockQ8_0*>(bytes.data())[b];
        blk.d = F32ToF16(0.01f * (1.0f + u(rng)));
        for (auto& q : blk.qs) q = static_cast<int8_t>(rng());
      }
      break;
    case DType::kQ4_0:
      for (size_t b = 0; b < n / 32; ++b) {
        auto& blk = reinterpret_cast<BlockQ4_0*>(bytes.data())[b];
        blk.d = F32ToF16(0.1f * (1.0f + u(rng)));
        for (auto& q : blk.qs) q = static_cast<uint8_t>(rng());
      }
      break;
    case DType::kQ4_1:
      for (size_t b = 0; b < n / 32; ++b) {
        auto& blk = reinterpret_cast<BlockQ4_1*>(bytes.data())[b];
        blk.d = F32ToF16(0.1f * (1.0f + u(rng)));
        blk.m = F32ToF16(-0.75f + 0.1f * u(rng));
        for (auto& q : blk.qs) q = static_cast<uint8_t>(rng());
      }
      break;
  }
  return bytes;
}


}  // namespace dyn
