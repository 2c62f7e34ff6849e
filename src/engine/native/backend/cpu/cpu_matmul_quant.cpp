// Matmul with block-quantized weights (Q8_0, Q4_0, Q4_1), computed as llama.cpp does: activation
// rows are quantized to 32-element int8 blocks, each (weight block, activation block) pair is an
// integer dot product (AVX-512 VNNI vpdpbusd on 256-bit lanes), scaled by d_w * d_x and accumulated
// in F32. Register tiles of NR weight rows x MR activation rows unpack each weight block once for
// MR rows; every output element follows the same instruction sequence whatever the tile, so results
// do not depend on the batch.
#include "engine/native/backend/cpu/simd.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "engine/native/backend/cpu/cpu_kernels.h"
#include "engine/native/backend/cpu/quant_blocks.h"

namespace dyn::cpu {
namespace {

void QuantizeRow(const float* x, int blocks, int8_t* qs, float* d_out, float* s_out, int32_t* isum_out) {
  const __m512 sign_mask = _mm512_set1_ps(-0.0f);
  for (int b = 0; b < blocks; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
    const __m512 a = _mm512_max_ps(_mm512_andnot_ps(sign_mask, v0), _mm512_andnot_ps(sign_mask, v1));
    const float amax = _mm512_reduce_max_ps(a);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + b * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    d_out[b] = F16ToF32(F32ToF16(d));
    s_out[b] = F16ToF32(F32ToF16(d * static_cast<float>(sum)));
    isum_out[b] = sum;
  }
}

struct Scratch {
  std::vector<int8_t> qs;
  std::vector<float> d, s;
  std::vector<int32_t> isum;
};

QuantizedRows Quantize(ThreadPool& pool, const float* x, int m, int64_t K, Scratch& scratch) {
  QuantizedRows q;
  q.rows = m;
  q.blocks = static_cast<int>(K / kQuantBlock);
  const size_t nb = static_cast<size_t>(m) * q.blocks;
  if (scratch.qs.size() < nb * 32) scratch.qs.resize(nb * 32);
  if (scratch.d.size() < nb) {
    scratch.d.resize(nb);
    scratch.s.resize(nb);
    scratch.isum.resize(nb);
  }
  q.qs = scratch.qs.data();
  q.d = scratch.d.data();
  q.s = scratch.s.data();
  q.isum = scratch.isum.data();
  auto row = [&](int i) {
    const size_t o = static_cast<size_t>(i) * q.blocks;
    QuantizeRow(x + i * K, q.blocks, q.qs + o * 32, q.d + o, q.s + o, q.isum + o);
  };
  if (m < 16) {
    for (int i = 0; i < m; ++i) row(i);
  } else {
    pool.Run([&](int tid, int n) {
      for (int i = tid; i < m; i += n) row(i);
    });
  }
  return q;
}

// Per weight type: the block struct, its 32 quants as bytes for vpdpbusd's unsigned operand, and
// how a block's integer dot product becomes a float contribution.
inline __m256i UnpackNibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
  return _mm256_set_m128i(hi, lo);
}

struct Q4_1Kind {
  using Block = BlockQ4_1;
  static __m256i Unpack(const Block& b) { return UnpackNibbles(b.qs); }
  static __m256i Dot(__m256i w, __m256i x) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x); }
};
struct Q4_0Kind {
  using Block = BlockQ4_0;
  static __m256i Unpack(const Block& b) { return UnpackNibbles(b.qs); }
  static __m256i Dot(__m256i w, __m256i x) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x); }
};
struct Q8_0Kind {
  using Block = BlockQ8_0;
  static __m256i Unpack(const Block& b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs)); }
  // vpdpbusd wants one unsigned operand: |w| * (x with w's sign) is the same product.
  static __m256i Dot(__m256i w, __m256i x) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
};

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class Kind, int NR, int MR>
void Tile(const uint8_t* w, size_t row_bytes, const QuantizedRows& q, int row0, int64_t N, float* out) {
  using Block = typename Kind::Block;
  const int nb = q.blocks;
  __m256 acc[NR][MR];
  float acc_min[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) {
      acc[r][i] = _mm256_setzero_ps();
      acc_min[r][i] = 0.0f;
    }
  for (int b = 0; b < nb; ++b) {
    __m256i wv[NR];
    float wd[NR];
    float wm[NR];
    for (int r = 0; r < NR; ++r) {
      const Block& blk = reinterpret_cast<const Block*>(w + r * row_bytes)[b];
      wv[r] = Kind::Unpack(blk);
      wd[r] = F16ToF32(blk.d);
      if constexpr (std::is_same_v<Kind, Q4_1Kind>) wm[r] = F16ToF32(blk.m);
    }
    for (int i = 0; i < MR; ++i) {
      const size_t xb = static_cast<size_t>(row0 + i) * nb + b;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.qs + xb * 32));
      const float xd = q.d[xb];
      for (int r = 0; r < NR; ++r) {
        __m256i dot = Kind::Dot(wv[r], xv);
        if constexpr (std::is_same_v<Kind, Q4_0Kind>) {
          // Stored quants are q + 8: subtract 8 * sum(x) from lane 0 (exact integer arithmetic).
          dot = _mm256_sub_epi32(dot, _mm256_setr_epi32(8 * q.isum[xb], 0, 0, 0, 0, 0, 0, 0));
        }
        acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(wd[r] * xd), _mm256_cvtepi32_ps(dot), acc[r][i]);
        if constexpr (std::is_same_v<Kind, Q4_1Kind>) acc_min[r][i] += wm[r] * q.s[xb];
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) out[i * N + r] = HorizontalSum(acc[r][i]) + acc_min[r][i];
}

template <class Kind, int NR>
void RowTile(const uint8_t* w, size_t row_bytes, const QuantizedRows& q, int row0, int m, int64_t N, float* out) {
  constexpr int kMR = 4;
  int i = 0;
  for (; i + kMR <= m; i += kMR) Tile<Kind, NR, kMR>(w, row_bytes, q, row0 + i, N, out + i * N);
  switch (m - i) {
    case 1: Tile<Kind, NR, 1>(w, row_bytes, q, row0 + i, N, out + i * N); break;
    case 2: Tile<Kind, NR, 2>(w, row_bytes, q, row0 + i, N, out + i * N); break;
    case 3: Tile<Kind, NR, 3>(w, row_bytes, q, row0 + i, N, out + i * N); break;
    default: break;
  }
}

template <class Kind>
void Run(ThreadPool& pool, const QuantizedRows& q, const Weight& w, float* out) {
  constexpr int kNR = 4;
  const int64_t N = w.rows;
  const int m = q.rows;
  const size_t row_bytes = DTypeRowBytes(w.dtype, w.cols);
  const auto* base = static_cast<const uint8_t*>(w.data);
  constexpr int kMChunk = 64;
  pool.Run([&](int tid, int nthreads) {
    const int64_t tiles = (N + kNR - 1) / kNR;
    const int64_t t0 = tiles * tid / nthreads, t1 = tiles * (tid + 1) / nthreads;
    for (int mc = 0; mc < m; mc += kMChunk) {
      const int mm = std::min(kMChunk, m - mc);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        const uint8_t* wr = base + n0 * row_bytes;
        float* o = out + static_cast<int64_t>(mc) * N + n0;
        switch (std::min<int64_t>(kNR, N - n0)) {
          case 4: RowTile<Kind, 4>(wr, row_bytes, q, mc, mm, N, o); break;
          case 3: RowTile<Kind, 3>(wr, row_bytes, q, mc, mm, N, o); break;
          case 2: RowTile<Kind, 2>(wr, row_bytes, q, mc, mm, N, o); break;
          default: RowTile<Kind, 1>(wr, row_bytes, q, mc, mm, N, o); break;
        }
      }
    }
  });
}

}  // namespace

void MatMulQuant(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  static thread_local Scratch scratch;
  const QuantizedRows q = Quantize(pool, x, m, w.cols, scratch);
  switch (w.dtype) {
    case DType::kQ8_0: Run<Q8_0Kind>(pool, q, w, out); break;
    case DType::kQ4_0: Run<Q4_0Kind>(pool, q, w, out); break;
    case DType::kQ4_1: Run<Q4_1Kind>(pool, q, w, out); break;
    default: break;
  }
}

}  // namespace dyn::cpu
