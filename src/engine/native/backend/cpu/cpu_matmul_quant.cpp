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
    pool.ParallelFor(m, [&](int64_t i) { row(static_cast<int>(i)); });
  }
  return q;
}

// Per weight type: the block struct, its 32 quants as bytes for vpdpbusd's unsigned operand, and
// how a block's integer dot product becomes a float contribution.
// Two consecutive 32-element blocks (b, b + 1) fill one 512-bit register: lanes 0-7 of the int32
// dot products and of the scales belong to block b, lanes 8-15 to block b + 1. A missing b + 1
// (odd block count) is all zeros, so every output element still runs the same instructions.
inline __m512i UnpackNibblePair(const uint8_t* qs0, const uint8_t* qs1) {
  const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs0));
  const __m128i r1 = qs1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs1)) : _mm_set1_epi8(0);
  const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(r0), r1, 1);
  const __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
  // [lo0 hi0 lo1 hi1]: elements 0-15 of a block are its low nibbles, 16-31 its high ones.
  const __m512i idx = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  return _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), idx, _mm512_castsi256_si512(hi));
}

inline __m512 PairOf(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
// a in lane 0, b in lane 8, zero elsewhere.
inline __m512 LeadLanes(float a, float b) { return _mm512_maskz_mov_ps(0x0101, PairOf(a, b)); }

struct Q4_1Kind {
  using Block = BlockQ4_1;
  static __m512i Unpack(const Block* b0, const Block* b1) { return UnpackNibblePair(b0->qs, b1 ? b1->qs : nullptr); }
  static __m512i Dot(__m512i acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }
};
struct Q4_0Kind {
  using Block = BlockQ4_0;
  static __m512i Unpack(const Block* b0, const Block* b1) { return UnpackNibblePair(b0->qs, b1 ? b1->qs : nullptr); }
  static __m512i Dot(__m512i acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }
};
struct Q8_0Kind {
  using Block = BlockQ8_0;
  static __m512i Unpack(const Block* b0, const Block* b1) {
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0->qs));
    const __m256i q1 = b1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1->qs)) : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
  }
  // vpdpbusd wants one unsigned operand: |w| * (x with w's sign) is the same product.
  static __m512i Dot(__m512i acc, __m512i w, __m512i x) {
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i abs_w = _mm512_abs_epi8(w);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(acc, abs_w, signed_x);
  }
};

template <class Kind, int NR, int MR>
void Tile(const uint8_t* w, size_t row_bytes, const QuantizedRows& q, int row0, int64_t N, float* out) {
  using Block = typename Kind::Block;
  constexpr bool kHasMin = std::is_same_v<Kind, Q4_1Kind>;
  constexpr bool kOffset8 = std::is_same_v<Kind, Q4_0Kind>;
  const int nb = q.blocks;
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int b = 0; b < nb; b += 2) {
    const bool pair = b + 1 < nb;
    __m512i wv[NR];
    __m512 wd[NR];
    __m512 wm[NR];
    for (int r = 0; r < NR; ++r) {
      const Block* blk = reinterpret_cast<const Block*>(w + r * row_bytes) + b;
      wv[r] = Kind::Unpack(blk, pair ? blk + 1 : nullptr);
      wd[r] = PairOf(F16ToF32(blk->d), pair ? F16ToF32(blk[1].d) : 0.0f);
      if constexpr (kHasMin) wm[r] = LeadLanes(F16ToF32(blk->m), pair ? F16ToF32(blk[1].m) : 0.0f);
    }
    for (int i = 0; i < MR; ++i) {
      const size_t xb = static_cast<size_t>(row0 + i) * nb + b;
      const __m512i xv = _mm512_maskz_loadu_epi8(pair ? ~__mmask64{0} : __mmask64{0xFFFFFFFF}, q.qs + xb * 32);
      const __m512 xd = PairOf(q.d[xb], pair ? q.d[xb + 1] : 0.0f);
      // Q4_0 stores q + 8: start the integer sum at -8 * sum(x) (exact) in each block's lead lane.
      __m512i init = _mm512_setzero_si512();
      if constexpr (kOffset8) {
        init = _mm512_maskz_set1_epi32(0x0001, -8 * q.isum[xb]);
        if (pair) init = _mm512_mask_set1_epi32(init, 0x0100, -8 * q.isum[xb + 1]);
      }
      __m512 xs;
      if constexpr (kHasMin) xs = PairOf(q.s[xb], pair ? q.s[xb + 1] : 0.0f);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = Kind::Dot(init, wv[r], xv);
        acc[r][i] = _mm512_fmadd_ps(_mm512_mul_ps(wd[r], xd), _mm512_cvtepi32_ps(dot), acc[r][i]);
        if constexpr (kHasMin) acc[r][i] = _mm512_fmadd_ps(wm[r], xs, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) out[i * N + r] = _mm512_reduce_add_ps(acc[r][i]);
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
  // Work units of a few row tiles, claimed dynamically; each output element is computed by one
  // unit with the same code whichever thread runs it.
  const int64_t tiles = (N + kNR - 1) / kNR;
  const int64_t units = std::max<int64_t>(1, std::min<int64_t>(tiles / 4, 16 * pool.size()));
  pool.ParallelFor(units, [&](int64_t u) {
    const int64_t t0 = tiles * u / units, t1 = tiles * (u + 1) / units;
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
