// Matmul with block-quantized weights (Q8_0, Q4_0, Q4_1), computed as llama.cpp does: activation
// rows are quantized to 32-element int8 blocks, each (weight block, activation block) pair is an
// integer dot product (AVX-512 VNNI vpdpbusd), scaled by d_w * d_x and accumulated in F32.
//
// Layout of the work: 4 blocks (128 elements) per step. The weight quants of 4 blocks are loaded
// into two 512-bit registers, "lo" = elements 0-15 of each block (a Q4 block's low nibbles) and
// "hi" = elements 16-31 (its high nibbles); the activations are stored pre-arranged the same way
// (see QuantizedRows), so two vpdpbusd give 4 int32 lanes per block with no shuffles. Scales are
// fetched 16 blocks at a time (one gather of the block headers per weight row, one load per
// activation row) and broadcast to their block's 4 lanes with one permute. The accumulator keeps
// 16 lanes until the end: one horizontal sum per output element.
//
// Register tiles of NR weight rows x MR activation rows unpack each weight group once for MR rows;
// every output element follows the same instruction sequence whatever the tile, the row count or
// the thread, so results do not depend on the batch.
#include "engine/native/backend/cpu/simd.h"

#if DYN_CPU_AVX512

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "engine/native/backend/cpu/cpu_kernels.h"
#include "engine/native/backend/cpu/quant_blocks.h"

namespace dyn::cpu {
namespace {

constexpr int kGroup = 4;    // blocks per dot step
constexpr int kChunk = 16;   // blocks per scale vector

// flip: store q + 128 as uint8 (the unsigned operand of vpdpbusd when the weights are signed).
void QuantizeRow(const float* x, int blocks, int padded, bool flip, int8_t* qs, float* d_out, float* s_out) {
  const __m512 sign_mask = _mm512_set1_ps(-0.0f);
  const __m128i bias = _mm_set1_epi8(flip ? static_cast<char>(0x80) : 0);
  for (int b = 0; b < blocks; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
    const __m512 a = _mm512_max_ps(_mm512_andnot_ps(sign_mask, v0), _mm512_andnot_ps(sign_mask, v1));
    const float amax = _mm512_reduce_max_ps(a);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    int8_t* g = qs + (b / kGroup) * (kGroup * 32) + (b % kGroup) * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g), _mm_xor_si128(_mm512_cvtsepi32_epi8(q0), bias));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + kGroup * 16), _mm_xor_si128(_mm512_cvtsepi32_epi8(q1), bias));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    d_out[b] = F16ToF32(F32ToF16(d));
    s_out[b] = F16ToF32(F32ToF16(d * static_cast<float>(sum)));
  }
  // Padding: whole groups of zero quants (a partial last group is completed too), zero scales.
  const int filled = (blocks + kGroup - 1) / kGroup * kGroup;
  for (int b = blocks; b < filled; ++b) {
    int8_t* g = qs + (b / kGroup) * (kGroup * 32) + (b % kGroup) * 16;
    std::memset(g, 0, 16);
    std::memset(g + kGroup * 16, 0, 16);
  }
  std::memset(qs + static_cast<size_t>(filled) * 32, 0, static_cast<size_t>(padded - filled) * 32);
  for (int b = blocks; b < padded; ++b) d_out[b] = s_out[b] = 0.0f;
}

struct Scratch {
  std::vector<int8_t> qs;
  std::vector<float> d, s;
};

QuantizedRows Quantize(ThreadPool& pool, const float* x, int m, int64_t K, bool flip, Scratch& scratch) {
  QuantizedRows q;
  q.rows = m;
  q.blocks = static_cast<int>(K / kQuantBlock);
  q.padded = (q.blocks + kChunk - 1) / kChunk * kChunk;
  const size_t nb = static_cast<size_t>(m) * q.padded;
  if (scratch.qs.size() < nb * 32) scratch.qs.resize(nb * 32);
  if (scratch.d.size() < nb) {
    scratch.d.resize(nb);
    scratch.s.resize(nb);
  }
  q.qs = scratch.qs.data();
  q.d = scratch.d.data();
  q.s = scratch.s.data();
  auto row = [&](int i) {
    const size_t o = static_cast<size_t>(i) * q.padded;
    QuantizeRow(x + i * K, q.blocks, q.padded, flip, q.qs + o * 32, q.d + o, q.s + o);
  };
  if (m < 16) {
    for (int i = 0; i < m; ++i) row(i);
  } else {
    pool.ParallelFor(m, [&](int64_t i) { row(static_cast<int>(i)); });
  }
  return q;
}

// Loads 16 bytes at `offset` of each of n <= 4 consecutive blocks (zeros for the missing ones).
template <class Block>
inline __m512i LoadGroup(const Block* b, int n, int offset) {
  auto at = [&](int j) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[j].qs + offset)); };
  __m512i r = _mm512_zextsi128_si512(at(0));
  if (n > 1) r = _mm512_inserti32x4(r, at(1), 1);
  if (n > 2) r = _mm512_inserti32x4(r, at(2), 2);
  if (n > 3) r = _mm512_inserti32x4(r, at(3), 3);
  return r;
}

struct Q4_1Kind { using Block = BlockQ4_1; };
struct Q4_0Kind { using Block = BlockQ4_0; };
struct Q8_0Kind { using Block = BlockQ8_0; };

// One weight row's group of 4 blocks as vpdpbusd operands.
template <class Kind>
struct WGroup {
  __m512i lo, hi;
  __m512i corr;  // Q8_0: 128 * sum(w) per lane (the activations carry +128)
};

template <class Kind>
inline WGroup<Kind> UnpackGroup(const typename Kind::Block* b, int n) {
  WGroup<Kind> g;
  if constexpr (std::is_same_v<Kind, Q8_0Kind>) {
    g.lo = LoadGroup(b, n, 0);
    g.hi = LoadGroup(b, n, 16);
    const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
    g.corr = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, g.lo), c128, g.hi);
  } else {
    const __m512i raw = LoadGroup(b, n, 0);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    g.lo = _mm512_and_si512(raw, mask);
    g.hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
    g.corr = _mm512_setzero_si512();
  }
  return g;
}

// Integer dot products of one group: 4 int32 lanes per block.
template <class Kind>
inline __m512i GroupDot(const WGroup<Kind>& w, __m512i xlo, __m512i xhi, __m512i xcorr) {
  if constexpr (std::is_same_v<Kind, Q8_0Kind>) {
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xlo, w.lo), xhi, w.hi);
    return _mm512_sub_epi32(d, w.corr);
  } else {
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo, xlo), w.hi, xhi);
    if constexpr (std::is_same_v<Kind, Q4_0Kind>) return _mm512_sub_epi32(d, xcorr);  // quants stored as q + 8
    return d;
  }
}

template <class Kind, int NR, int MR>
void Tile(const uint8_t* w, size_t row_bytes, const QuantizedRows& q, int row0, int64_t N, float* out) {
  using Block = typename Kind::Block;
  constexpr bool kHasMin = std::is_same_v<Kind, Q4_1Kind>;
  constexpr bool kOffset8 = std::is_same_v<Kind, Q4_0Kind>;
  const int nb = q.blocks;
  const size_t xstride = static_cast<size_t>(q.padded);
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m512i lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int c = 0; c < nb; c += kChunk) {
    const int valid = std::min(kChunk, nb - c);
    __m512 wd[NR];
    for (int r = 0; r < NR; ++r) {
      const Block* blk = reinterpret_cast<const Block*>(w + r * row_bytes) + c;
      // Block headers (f16 d, and f16 m for Q4_1) of the chunk's blocks; zero past the row's end.
      // Scalar loads, not a gather: the headers are the first touch of each weight cache line, and
      // a gather serializes those misses.
      alignas(64) uint32_t hv[kChunk];
      for (int j = 0; j < kChunk; ++j) {
        uint32_t v = 0;
        if (j < valid) std::memcpy(&v, &blk[j], sizeof(v));
        hv[j] = v;
      }
      const __m512i h = _mm512_load_si512(hv);
      wd[r] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
      if constexpr (kHasMin) {
        const __m512 wm = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
        for (int i = 0; i < MR; ++i) {
          const __m512 xs = _mm512_loadu_ps(q.s + static_cast<size_t>(row0 + i) * xstride + c);
          acc[r][i] = _mm512_fmadd_ps(wm, xs, acc[r][i]);
        }
      }
    }
    for (int g = 0; g * kGroup < valid; ++g) {
      const int n = std::min(kGroup, valid - g * kGroup);
      const __m512i idx = _mm512_add_epi32(lane_block, _mm512_set1_epi32(g * kGroup));
      WGroup<Kind> wg[NR];
      __m512 wdg[NR];
      for (int r = 0; r < NR; ++r) {
        const Block* blk = reinterpret_cast<const Block*>(w + r * row_bytes) + c + g * kGroup;
        wg[r] = UnpackGroup<Kind>(blk, n);
        wdg[r] = _mm512_permutexvar_ps(idx, wd[r]);
      }
      for (int i = 0; i < MR; ++i) {
        const size_t xrow = static_cast<size_t>(row0 + i) * xstride;
        const int8_t* xq = q.qs + (xrow + c + g * kGroup) * 32;
        const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
        __m512i xcorr = _mm512_setzero_si512();
        if constexpr (kOffset8) {
          const __m512i c8 = _mm512_set1_epi8(8);
          xcorr = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c8, xlo), c8, xhi);
        }
        const __m512 xd = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(q.d + xrow + c));
        for (int r = 0; r < NR; ++r) {
          const __m512i dot = GroupDot<Kind>(wg[r], xlo, xhi, xcorr);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wdg[r], xd), acc[r][i]);
        }
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

constexpr int kNR = 4;
constexpr int kPrefetchTiles = 1;  // measured: 1-2 best, 8 no better than none

// Output-row tiles [t0, t1) of one weight (kNR rows each), all activation rows.
template <class Kind>
void RunTiles(const QuantizedRows& q, const Weight& w, float* out, int64_t t0, int64_t t1) {
  const int64_t N = w.rows;
  const int m = q.rows;
  const size_t row_bytes = DTypeRowBytes(w.dtype, w.cols);
  const auto* base = static_cast<const uint8_t*>(w.data);
  constexpr int kMChunk = 64;
  for (int mc = 0; mc < m; mc += kMChunk) {
    const int mm = std::min(kMChunk, m - mc);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kNR;
      const uint8_t* wr = base + n0 * row_bytes;
      float* o = out + static_cast<int64_t>(mc) * N + n0;
      if (t + kPrefetchTiles < t1) {
        // Decode streams every weight from memory once per step: ask for the tile kPrefetchTiles
        // ahead while this one computes.
        const uint8_t* ahead = wr + kPrefetchTiles * kNR * row_bytes;
        for (size_t off = 0; off < kNR * row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
      }
      switch (std::min<int64_t>(kNR, N - n0)) {
        case 4: RowTile<Kind, 4>(wr, row_bytes, q, mc, mm, N, o); break;
        case 3: RowTile<Kind, 3>(wr, row_bytes, q, mc, mm, N, o); break;
        case 2: RowTile<Kind, 2>(wr, row_bytes, q, mc, mm, N, o); break;
        default: RowTile<Kind, 1>(wr, row_bytes, q, mc, mm, N, o); break;
      }
    }
  }
}

void RunTilesOf(const QuantizedRows& q, const Weight& w, float* out, int64_t t0, int64_t t1) {
  switch (w.dtype) {
    case DType::kQ8_0: RunTiles<Q8_0Kind>(q, w, out, t0, t1); break;
    case DType::kQ4_0: RunTiles<Q4_0Kind>(q, w, out, t0, t1); break;
    case DType::kQ4_1: RunTiles<Q4_1Kind>(q, w, out, t0, t1); break;
    default: break;
  }
}

// Work units of a few row tiles, claimed dynamically; each output element is computed by one unit
// with the same code whichever thread runs it.
struct Unit {
  int weight;
  int64_t t0, t1;
};
void AppendUnits(int weight, int64_t rows, int threads, std::vector<Unit>& units) {
  const int64_t tiles = (rows + kNR - 1) / kNR;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(tiles / 4, 16 * threads));
  for (int64_t u = 0; u < n; ++u) units.push_back({weight, tiles * u / n, tiles * (u + 1) / n});
}

void RunShared(ThreadPool& pool, const QuantizedRows& q, std::span<const Weight> ws, std::span<float* const> outs) {
  static thread_local std::vector<Unit> caller_units;
  std::vector<Unit>& units = caller_units;  // the workers read the caller's list
  units.clear();
  for (size_t i = 0; i < ws.size(); ++i) AppendUnits(static_cast<int>(i), ws[i].rows, pool.size(), units);
  pool.ParallelFor(static_cast<int64_t>(units.size()), [&](int64_t u) {
    const Unit& unit = units[u];
    RunTilesOf(q, ws[unit.weight], outs[unit.weight], unit.t0, unit.t1);
  });
}

}  // namespace

void MatMulQuant(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  float* const outs[1] = {out};
  MatMulQuantShared(pool, x, m, std::span<const Weight>(&w, 1), outs);
}

void MatMulQuantShared(ThreadPool& pool, const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) {
  static thread_local Scratch scratch;
  const QuantizedRows q = Quantize(pool, x, m, ws[0].cols, ws[0].dtype == DType::kQ8_0, scratch);
  RunShared(pool, q, ws, outs);
}

}  // namespace dyn::cpu

#endif  // DYN_CPU_AVX512
