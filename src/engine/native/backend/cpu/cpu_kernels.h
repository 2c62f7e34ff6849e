// Private declarations of the CPU kernels, split by kind into cpu_*.cpp files.
#pragma once

#include <cstdint>
#include <span>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/thread_pool.h"

namespace dyn::cpu {

// out[m][w.rows] = x[m][w.cols] * w^T for F32/F16/BF16 weights (F32 accumulation).
void MatMulFloat(ThreadPool& pool, const float* x, int m, const Weight& w, float* out);

// Activation rows quantized to 32-element 8-bit blocks (llama.cpp's Q8_0/Q8_1 for activations),
// stored in the order the integer-dot kernels consume them: blocks in groups of 4, each group
// 128 bytes = elements 0-15 of its 4 blocks (64 bytes), then elements 16-31 of the same blocks.
// Rows are padded to a multiple of 16 blocks (zero quants, zero scales).
struct QuantizedRows {
  int rows = 0;
  int blocks = 0;         // per row, K / 32
  int padded = 0;         // blocks rounded up to 16: the row stride of d and s, qs stride / 32
  int8_t* qs = nullptr;   // [rows][padded * 32]; int8, or int8 + 128 as uint8 for Q8_0 weights
  float* d = nullptr;     // [rows][padded] scale (rounded through f16 as llama.cpp stores it)
  float* s = nullptr;     // [rows][padded] d * sum(q) (rounded through f16), for Q4_1's minimum
};
// out[m][w.rows] for Q8_0/Q4_0/Q4_1 weights.
void MatMulQuant(ThreadPool& pool, const float* x, int m, const Weight& w, float* out);
// outs[i] = x * ws[i]^T for weights of one quantized type and one column count: x is quantized
// once and all the weights' tiles run as one parallel job.
void MatMulQuantShared(ThreadPool& pool, const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs);

void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
             const float* v);
void Attention(ThreadPool& pool, const float* cache, const KvLayout& layout, int layer,
               std::span<const AttentionSeq> seqs, const float* q, int num_heads, float scale, float* out);

}  // namespace dyn::cpu
