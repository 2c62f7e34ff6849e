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
// A weight block as the unsigned operand of maddubs. Q4_1's quants are unsigned (0..15) as they
// are; Q8_0/Q4_0 are signed, so |w| is the operand and their signs move onto the activations
// (llama.cpp's sign trick).
struct WBlock {
  __m256i u;     // unsigned operand
  __m256i sign;  // the signed quants (Q8_0, Q4_0)
};

template <class Kind>
inline WBlock Unpack(const typename Kind::Block& b) {
  WBlock r;
  if constexpr (std::is_same_v<Kind, Q8_0Kind>) {
    r.sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    if constexpr (std::is_same_v<Kind, Q4_1Kind>) {
      r.u = w;
      r.sign = w;
      return r;
    }
    r.sign = _mm256_sub_epi8(w, _mm256_set1_epi8(8));
  }
  r.u = _mm256_sign_epi8(r.sign, r.sign);
  return r;
}

// The integer dot of one (weight block, activation block) pair as 8 int32 lanes.
template <class Kind>
inline __m256i BlockDot(const WBlock& w, __m256i x) {
  if constexpr (!std::is_same_v<Kind, Q4_1Kind>) x = _mm256_sign_epi8(x, w.sign);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w.u, x), _mm256_set1_epi16(1));
}

// One weight row against MR activation rows starting at row0. Blocks alternate between two
// accumulator sets (even / odd blocks) so consecutive blocks do not wait on one FMA chain; each
// block's 8 int32 partial dots are converted to F32 and accumulated in 8 lanes (llama.cpp's AVX2
// scheme); one horizontal sum per output element at the end. The order is the same for every MR.
template <class Kind, int MR>
void Tile(const typename Kind::Block* blk, const Rows& q, int row0, int64_t N, float* out) {
  constexpr bool kHasMin = std::is_same_v<Kind, Q4_1Kind>;
  __m256 acc[2][MR];
  float acc_min[2][MR] = {};
  for (int i = 0; i < MR; ++i) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
  const size_t xstride = static_cast<size_t>(q.blocks);
  const int8_t* xq = q.qs + static_cast<size_t>(row0) * xstride * 32;
  const float* xd = q.d + static_cast<size_t>(row0) * xstride;
  const float* xs = q.s + static_cast<size_t>(row0) * xstride;
  auto step = [&](int b, __m256* a, float* am) {
    const float wd = F16ToF32(blk[b].d);
    float wm = 0.0f;
    if constexpr (kHasMin) wm = F16ToF32(blk[b].m);
    const WBlock w = Unpack<Kind>(blk[b]);
    for (int i = 0; i < MR; ++i) {
      const size_t xb = i * xstride + b;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + xb * 32));
      const __m256i dot = BlockDot<Kind>(w, xv);
      a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(wd * xd[xb]), a[i]);
      if constexpr (kHasMin) am[i] = std::fma(wm, xs[xb], am[i]);
    }
  };
  int b = 0;
  for (; b + 2 <= q.blocks; b += 2) {
    step(b, acc[0], acc_min[0]);
    step(b + 1, acc[1], acc_min[1]);
  }
  if (b < q.blocks) step(b, acc[0], acc_min[0]);
  for (int i = 0; i < MR; ++i) {
    const __m256 a = _mm256_add_ps(acc[0][i], acc[1][i]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[i * N] = _mm_cvtss_f32(h) + (acc_min[0][i] + acc_min[1][i]);
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

// Decode streams every weight from memory once per step, and the hardware prefetchers stop at
// each 4 KiB page: ask for the bytes this far ahead of the row being computed (measured on the
// 2-core EPYC: 1-3 KiB best, 35 % less time per decode step than none; 4 KiB no better).
constexpr int64_t kPrefetchBytes = 2048;

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
      if (n + 1 < n1) {
        const uint8_t* from = base + n * row_bytes + kPrefetchBytes;
        const uint8_t* end = std::min(from + row_bytes, base + n1 * row_bytes);
        for (const uint8_t* p = from; p < end; p += 64) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
      }
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
