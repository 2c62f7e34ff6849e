// Portable matmul with block-quantized weights (Q8_0, Q4_0, Q4_1), used where the AVX-512 VNNI
// kernels are not built. Same arithmetic as llama.cpp: activation rows are quantized to 32-element
// int8 blocks, each (weight block, activation block) pair is an exact integer dot product, scaled by
// d_w * d_x and accumulated in F32 in block order. The integer dot uses AVX2 (maddubs + madd) where
// available and a scalar loop otherwise; both give the same integer, so the same result.
#include "engine/native/backend/cpu/simd.h"

#if !DYN_CPU_AVX512

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "engine/native/backend/cpu/cpu_kernels.h"
#include "engine/native/backend/cpu/quant_blocks.h"

namespace dyn::cpu {
namespace {

// Activation rows as plain int8 blocks: qs [rows][blocks * 32], d and s [rows][blocks].
struct Rows {
  int rows = 0;
  int blocks = 0;
  const int8_t* qs = nullptr;
  const float* d = nullptr;
  const float* s = nullptr;  // d * sum(q), for Q4_1's minimum
};

struct Scratch {
  std::vector<int8_t> qs;
  std::vector<float> d, s;
};

void QuantizeRow(const float* x, int blocks, int8_t* qs, float* d_out, float* s_out) {
  for (int b = 0; b < blocks; ++b) {
    const float* v = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const float r = std::nearbyint(v[j] * id);  // round to nearest even, as cvtps2dq
      const int q = static_cast<int>(std::clamp(r, -127.0f, 127.0f));
      qs[b * 32 + j] = static_cast<int8_t>(q);
      sum += q;
    }
    d_out[b] = F16ToF32(F32ToF16(d));
    s_out[b] = F16ToF32(F32ToF16(d * static_cast<float>(sum)));
  }
}

Rows Quantize(ThreadPool& pool, const float* x, int m, int64_t K, Scratch& scratch) {
  Rows q;
  q.rows = m;
  q.blocks = static_cast<int>(K / kQuantBlock);
  const size_t nb = static_cast<size_t>(m) * q.blocks;
  if (scratch.qs.size() < nb * 32) scratch.qs.resize(nb * 32);
  if (scratch.d.size() < nb) {
    scratch.d.resize(nb);
    scratch.s.resize(nb);
  }
  auto row = [&](int i) {
    const size_t o = static_cast<size_t>(i) * q.blocks;
    QuantizeRow(x + i * K, q.blocks, scratch.qs.data() + o * 32, scratch.d.data() + o, scratch.s.data() + o);
  };
  if (m < 16) {
    for (int i = 0; i < m; ++i) row(i);
  } else {
    pool.ParallelFor(m, [&](int64_t i) { row(static_cast<int>(i)); });
  }
  q.qs = scratch.qs.data();
  q.d = scratch.d.data();
  q.s = scratch.s.data();
  return q;
}

struct Q4_1Kind { using Block = BlockQ4_1; };
struct Q4_0Kind { using Block = BlockQ4_0; };
struct Q8_0Kind { using Block = BlockQ8_0; };

#if defined(__AVX2__)
using WVec = __m256i;  // a weight block's 32 quants as int8 (Q4_1: 0..15)

template <class Kind>
inline WVec Unpack(const typename Kind::Block& b) {
  if constexpr (std::is_same_v<Kind, Q8_0Kind>) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
    if constexpr (std::is_same_v<Kind, Q4_0Kind>) return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
    return v;
  }
}

#else
struct WVec {
  int8_t q[32];
};

template <class Kind>
inline WVec Unpack(const typename Kind::Block& b) {
  WVec v;
  if constexpr (std::is_same_v<Kind, Q8_0Kind>) {
    std::memcpy(v.q, b.qs, 32);
  } else {
    const int off = std::is_same_v<Kind, Q4_0Kind> ? 8 : 0;
    for (int j = 0; j < 16; ++j) {
      v.q[j] = static_cast<int8_t>((b.qs[j] & 0x0F) - off);
      v.q[j + 16] = static_cast<int8_t>((b.qs[j] >> 4) - off);
    }
  }
  return v;
}

inline int32_t Dot(const WVec& w, const int8_t* x) {
  int32_t s = 0;
  for (int j = 0; j < 32; ++j) s += static_cast<int32_t>(w.q[j]) * x[j];
  return s;
}
#endif

// One weight row against MR activation rows starting at row0.
#if defined(__AVX2__)
// Each block's 8 int32 partial dots are converted to F32 and accumulated in 8 lanes (llama.cpp's
// AVX2 scheme); one horizontal sum per output element at the end.
template <class Kind, int MR>
void Tile(const typename Kind::Block* blk, const Rows& q, int row0, int64_t N, float* out) {
  constexpr bool kHasMin = std::is_same_v<Kind, Q4_1Kind>;
  __m256 acc[MR];
  float acc_min[MR] = {};
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int b = 0; b < q.blocks; ++b) {
    const WVec w = Unpack<Kind>(blk[b]);
    const __m256i aw = _mm256_sign_epi8(w, w);
    const float wd = F16ToF32(blk[b].d);
    for (int i = 0; i < MR; ++i) {
      const size_t xb = static_cast<size_t>(row0 + i) * q.blocks + b;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.qs + xb * 32));
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(wd * q.d[xb]), acc[i]);
      if constexpr (kHasMin) acc_min[i] = std::fma(F16ToF32(blk[b].m), q.s[xb], acc_min[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[i * N] = _mm_cvtss_f32(h) + acc_min[i];
  }
}
#else
template <class Kind, int MR>
void Tile(const typename Kind::Block* blk, const Rows& q, int row0, int64_t N, float* out) {
  constexpr bool kHasMin = std::is_same_v<Kind, Q4_1Kind>;
  float acc[MR] = {}, acc_min[MR] = {};
  for (int b = 0; b < q.blocks; ++b) {
    const WVec w = Unpack<Kind>(blk[b]);
    const float wd = F16ToF32(blk[b].d);
    for (int i = 0; i < MR; ++i) {
      const size_t xb = static_cast<size_t>(row0 + i) * q.blocks + b;
      const int32_t dot = Dot(w, q.qs + xb * 32);
      acc[i] = std::fma(static_cast<float>(dot), wd * q.d[xb], acc[i]);
      if constexpr (kHasMin) acc_min[i] = std::fma(F16ToF32(blk[b].m), q.s[xb], acc_min[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i * N] = acc[i] + acc_min[i];
}

#endif

// Output rows [n0, n1) of one weight, all activation rows.
template <class Kind>
void RunRows(const Rows& q, const Weight& w, float* out, int64_t n0, int64_t n1) {
  using Block = typename Kind::Block;
  const int64_t N = w.rows;
  const size_t row_bytes = DTypeRowBytes(w.dtype, w.cols);
  const auto* base = static_cast<const uint8_t*>(w.data);
  constexpr int kMChunk = 64;
  for (int mc = 0; mc < q.rows; mc += kMChunk) {
    const int mm = std::min(kMChunk, q.rows - mc);
    for (int64_t n = n0; n < n1; ++n) {
      const auto* blk = reinterpret_cast<const Block*>(base + n * row_bytes);
      int i = 0;
      for (; i + 4 <= mm; i += 4) Tile<Kind, 4>(blk, q, mc + i, N, out + static_cast<int64_t>(mc + i) * N + n);
      for (; i < mm; ++i) Tile<Kind, 1>(blk, q, mc + i, N, out + static_cast<int64_t>(mc + i) * N + n);
    }
  }
}

void RunRowsOf(const Rows& q, const Weight& w, float* out, int64_t n0, int64_t n1) {
  switch (w.dtype) {
    case DType::kQ8_0: RunRows<Q8_0Kind>(q, w, out, n0, n1); break;
    case DType::kQ4_0: RunRows<Q4_0Kind>(q, w, out, n0, n1); break;
    case DType::kQ4_1: RunRows<Q4_1Kind>(q, w, out, n0, n1); break;
    default: break;
  }
}

struct Unit {
  int weight;
  int64_t n0, n1;
};

}  // namespace

void MatMulQuant(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  float* const outs[1] = {out};
  MatMulQuantShared(pool, x, m, std::span<const Weight>(&w, 1), outs);
}

void MatMulQuantShared(ThreadPool& pool, const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) {
  static thread_local Scratch scratch;
  static thread_local std::vector<Unit> units;  // the workers read the caller's list
  const Rows q = Quantize(pool, x, m, ws[0].cols, scratch);
  units.clear();
  for (size_t i = 0; i < ws.size(); ++i) {
    const int64_t rows = ws[i].rows;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(rows / 16, 16 * pool.size()));
    for (int64_t u = 0; u < n; ++u) units.push_back({static_cast<int>(i), rows * u / n, rows * (u + 1) / n});
  }
  std::vector<Unit>& list = units;
  pool.ParallelFor(static_cast<int64_t>(list.size()), [&](int64_t u) {
    const Unit& unit = list[u];
    RunRowsOf(q, ws[unit.weight], outs[unit.weight], unit.n0, unit.n1);
  });
}

}  // namespace dyn::cpu

#endif  // !DYN_CPU_AVX512
