// Portable matmul with F32/F16/BF16 weights (used where the AVX-512 kernels are not built). Each
// weight row is converted to F32 16 elements at a time and multiplied into up to 4 activation rows;
// every output element accumulates in the same 16-lane order over k whatever the tile shape.
#include "engine/native/backend/cpu/simd.h"

#if !DYN_CPU_AVX512

#include <algorithm>
#include <cmath>

#include "engine/native/backend/cpu/cpu_kernels.h"
#include "engine/native/backend/cpu/quant_blocks.h"

namespace dyn::cpu {
namespace {

template <DType T>
inline void Convert16(const void* row, int64_t k, int n, float* out) {
  if constexpr (T == DType::kF32) {
    const float* p = static_cast<const float*>(row) + k;
    for (int l = 0; l < n; ++l) out[l] = p[l];
  } else if constexpr (T == DType::kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + k;
#if defined(__F16C__)
    if (n == 16) {
      _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
      return;
    }
#endif
    for (int l = 0; l < n; ++l) out[l] = F16ToF32(p[l]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + k;
    for (int l = 0; l < n; ++l) out[l] = BF16ToF32(p[l]);
  }
  for (int l = n; l < 16; ++l) out[l] = 0.0f;
}

// One weight row against MR activation rows.
template <DType T, int MR>
void Tile(const uint8_t* w, int64_t K, const float* x, int64_t N, float* out) {
  float acc[MR][16] = {};
  float wv[16];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    Convert16<T>(w, k, 16, wv);
    for (int i = 0; i < MR; ++i) {
      const float* xr = x + i * K + k;
      for (int l = 0; l < 16; ++l) acc[i][l] = std::fma(wv[l], xr[l], acc[i][l]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    Convert16<T>(w, k, n, wv);
    for (int i = 0; i < MR; ++i)
      for (int l = 0; l < n; ++l) acc[i][l] = std::fma(wv[l], x[i * K + k + l], acc[i][l]);
  }
  for (int i = 0; i < MR; ++i) {
    float sum = 0.0f;
    for (int l = 0; l < 16; ++l) sum += acc[i][l];
    out[i * N] = sum;
  }
}

template <DType T>
void Run(ThreadPool& pool, const float* x, int m, const Weight& w, float* out) {
  const int64_t N = w.rows, K = w.cols;
  const size_t row_bytes = DTypeRowBytes(T, K);
  const auto* base = static_cast<const uint8_t*>(w.data);
  constexpr int kMChunk = 64;  // activation rows kept hot while weight rows stream past
  const int64_t units = std::max<int64_t>(1, std::min<int64_t>(N / 16, 16 * pool.size()));
  pool.ParallelFor(units, [&](int64_t u) {
    const int64_t n0 = N * u / units, n1 = N * (u + 1) / units;
    for (int mc = 0; mc < m; mc += kMChunk) {
      const int mm = std::min(kMChunk, m - mc);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = base + n * row_bytes;
        int i = 0;
        for (; i + 4 <= mm; i += 4) Tile<T, 4>(wr, K, x + (mc + i) * K, N, out + (mc + i) * N + n);
        for (; i < mm; ++i) Tile<T, 1>(wr, K, x + (mc + i) * K, N, out + (mc + i) * N + n);
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

#endif  // !DYN_CPU_AVX512
