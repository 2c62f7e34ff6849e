// Matmul with F32/F16/BF16 weights: register tiles of NR weight rows x MR activation rows, so each
// weight vector is loaded (and converted) once for MR rows. Every output element accumulates in the
// same 16-lane order over k whatever the tile shape, so results are independent of the batch.
#include "engine/native/backend/cpu/simd.h"

#if DYN_CPU_AVX512

#include <algorithm>

#include "engine/native/backend/cpu/cpu_kernels.h"

namespace dyn::cpu {
namespace {

template <DType T>
inline __m512 LoadWeight(const void* row, int64_t k, __mmask16 mask) {
  if constexpr (T == DType::kF32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(row) + k);
  } else if constexpr (T == DType::kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k));
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <DType T, int NR, int MR>
void Tile(const uint8_t* w, size_t row_bytes, int64_t K, const float* x, int64_t N, float* out) {
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = LoadWeight<T>(w + r * row_bytes, k, mask);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) out[i * N + r] = _mm512_reduce_add_ps(acc[r][i]);
}

template <DType T, int NR>
void RowTile(const uint8_t* w, size_t row_bytes, int64_t K, const float* x, int m, int64_t N, float* out) {
  constexpr int kMR = 4;
  int i = 0;
  for (; i + kMR <= m; i += kMR) Tile<T, NR, kMR>(w, row_bytes, K, x + i * K, N, out + i * N);
  switch (m - i) {
    case 1: Tile<T, NR, 1>(w, row_bytes, K, x + i * K, N, out + i * N); break;
    case 2: Tile<T, NR, 2>(w, row_bytes, K, x + i * K, N, out + i * N); break;
    case 3: Tile<T, NR, 3>(w, row_bytes, K, x + i * K, N, out + i * N); break;
    default: break;
  }
}

template <DType T>
void Run(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  constexpr int kNR = 4;
  const int64_t N = w.rows, K = w.cols;
  const size_t row_bytes = DTypeRowBytes(T, K);
  const auto* base = static_cast<const uint8_t*>(w.data);
  constexpr int kMChunk = 64;  // activation rows kept hot while a weight tile streams past
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
        const float* xr = x + static_cast<int64_t>(mc) * K;
        float* o = out + static_cast<int64_t>(mc) * N + n0;
        switch (std::min<int64_t>(kNR, N - n0)) {
          case 4: RowTile<T, 4>(wr, row_bytes, K, xr, mm, N, o); break;
          case 3: RowTile<T, 3>(wr, row_bytes, K, xr, mm, N, o); break;
          case 2: RowTile<T, 2>(wr, row_bytes, K, xr, mm, N, o); break;
          default: RowTile<T, 1>(wr, row_bytes, K, xr, mm, N, o); break;
        }
      }
    }
  });
}

}  // namespace

void MatMulFloat(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  switch (w.dtype) {
    case DType::kF32: Run<DType::kF32>(pool, x, m, w, out); break;
    case DType::kF16: Run<DType::kF16>(pool, x, m, w, out); break;
    case DType::kBF16: Run<DType::kBF16>(pool, x, m, w, out); break;
    default: break;
  }
}

}  // namespace dyn::cpu

#endif  // DYN_CPU_AVX512
