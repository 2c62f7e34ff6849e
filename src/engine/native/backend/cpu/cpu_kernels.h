// Private declarations of the CPU kernels, split by kind into cpu_*.cpp files.
#pragma once

#include <cstdint>
#include <span>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/thread_pool.h"

namespace dyn::cpu {

// out[m][w.rows] = x[m][w.cols] * w^T for F32/F16/BF16 weights (F32 accumulation).
void MatMulFloat(ThreadPool& pool, const float* x, int m, const Weight& w, float* out);

// Activation rows quantized to 32-element 8-bit blocks (llama.cpp's Q8_0/Q8_1 for activations).
struct QuantizedRows {
  int rows = 0;
  int blocks = 0;          // per row
  int8_t* qs = nullptr;    // [rows][blocks * 32]
  float* d = nullptr;      // [rows][blocks] scale (rounded through f16 as llama.cpp stores it)
  float* s = nullptr;      // [rows][blocks] d * sum(q) (rounded through f16), for Q4_1's minimum
  int32_t* isum = nullptr; // [rows][blocks] sum(q), for Q4_0's -8 offset
};
// out[m][w.rows] for Q8_0/Q4_0/Q4_1 weights.
void MatMulQuant(ThreadPool& pool, const float* x, int m, const Weight& w, float* out);

void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
             const float* v);
void Attention(ThreadPool& pool, const float* cache, const KvLayout& layout, int layer,
               std::span<const AttentionSeq> seqs, const float* q, int num_heads, float scale, float* out);

}  // namespace dyn::cpu
