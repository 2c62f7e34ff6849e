// Block layouts of the ggml quantized types (bit-compatible with GGUF files) and the scalar
// conversions shared by the CPU kernels and the loaders.
#pragma once

#include "engine/native/backend/cpu/simd.h"

#include <cstdint>
#include <cstring>

#include "engine/native/backend/backend.h"

namespace dyn {

constexpr int kQuantBlock = 32;

struct BlockQ8_0 {
  uint16_t d;  // f16 scale
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;         // f16 scale; value = d * (q - 8)
  uint8_t qs[16];     // element j < 16 in the low nibble of qs[j], element j + 16 in the high nibble
};
struct BlockQ4_1 {
  uint16_t d;  // f16 scale; value = d * q + m
  uint16_t m;  // f16 minimum
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20);

inline float F16ToF32(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t F32ToF16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
// Round to nearest even, as the GPU's __float2bfloat16_rn (NaN stays NaN).
inline uint16_t F32ToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float BF16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts n elements of one row of type `dtype` to F32.
void DequantizeRow(DType dtype, const void* row, int64_t n, float* out);

}  // namespace dyn
