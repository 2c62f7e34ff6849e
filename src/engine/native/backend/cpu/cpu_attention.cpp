// Paged causal attention on the CPU. Work items are (sequence, new row, kv head): the heads that
// share a kv head (GQA) are processed together so each cached K/V vector is loaded once for all of
// them. Items are claimed dynamically (prefill rows have triangular cost), but each item's
// arithmetic is fixed, so results do not depend on the batch or the thread count.
#include "engine/native/backend/cpu/simd.h"

#if DYN_CPU_AVX512

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/native/backend/cpu/cpu_kernels.h"

namespace dyn::cpu {
namespace {

inline __mmask16 TailMask(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// exp(x) for x <= 0 (softmax arguments), Cephes' single-precision polynomial (about 1 ulp).
inline __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane l of the result = the sum of the 16 lanes of v[l] (a fixed transpose-and-add tree).
inline __m512 Reduce16(const __m512 v[16]) {
  __m512 quad[4];
  for (int k = 0; k < 4; ++k) {
    const __m512 a = v[4 * k], b = v[4 * k + 1], c = v[4 * k + 2], d = v[4 * k + 3];
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    // Per 128-bit lane: partial sums of keys 4k .. 4k + 3.
    quad[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  }
  const __m512 pq = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
  const __m512 rs = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(pq, rs, 0x88), _mm512_shuffle_f32x4(pq, rs, 0xDD));
}

struct Item {
  int seq;
  int row;  // within the sequence
  int kv_head;
};

}  // namespace

void Attention(ThreadPool& pool, const float* cache, const KvLayout& layout, int layer,
               std::span<const AttentionSeq> seqs, const float* q, int num_heads, float scale, float* out) {
  const int kv_heads = layout.num_kv_heads, D = layout.head_dim, bs = layout.block_size;
  const int group = num_heads / kv_heads;
  std::vector<Item> items;
  for (int s = 0; s < static_cast<int>(seqs.size()); ++s)
    for (int i = 0; i < seqs[s].num_rows; ++i)
      for (int h = 0; h < kv_heads; ++h) items.push_back({s, i, h});
  const size_t row_floats = static_cast<size_t>(num_heads) * D;

  // Per item: scores of 16 keys at a time (one reduction tree for 16 dot products), a vectorized
  // softmax, then the value rows accumulated in registers, 16 output columns x up to 4 heads at a
  // time, scaled by 1 / sum at the end. The arithmetic depends only on the item.
  struct ItemScratch {
    std::vector<float> scores;
    std::vector<const float*> keys;
    std::vector<float> inv_sum;
  };
  auto run_item = [&](const Item& it, ItemScratch& ws) {
    const AttentionSeq& s = seqs[it.seq];
    const int pos = s.start_pos + it.row;
    const int len = pos + 1;
    const int padded = (len + 15) / 16 * 16;
    const size_t row = static_cast<size_t>(s.row_begin + it.row);
    if (ws.scores.size() < static_cast<size_t>(group) * padded) ws.scores.resize(static_cast<size_t>(group) * padded);
    if (ws.keys.size() < static_cast<size_t>(padded)) ws.keys.resize(padded);
    if (ws.inv_sum.size() < static_cast<size_t>(group)) ws.inv_sum.resize(group);
    const float* qh = q + row * row_floats + static_cast<size_t>(it.kv_head) * group * D;
    float* oh = out + row * row_floats + static_cast<size_t>(it.kv_head) * group * D;
    const float** keys = ws.keys.data();
    for (int j = 0; j < len; ++j) {
      keys[j] = cache + layout.Offset(s.block_table[j / bs], layer, 0, j % bs) + static_cast<size_t>(it.kv_head) * D;
    }
    for (int j = len; j < padded; ++j) keys[j] = keys[0];  // lanes past the end are ignored
    const size_t v_offset = static_cast<size_t>(bs) * layout.TokenFloats();  // V follows K in a block
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int g = 0; g < group; ++g) {
      const float* qg = qh + g * D;
      float* sc = ws.scores.data() + static_cast<size_t>(g) * padded;
      for (int j0 = 0; j0 < len; j0 += 16) {
        __m512 acc[16];
        for (int l = 0; l < 16; ++l) {
          const float* kj = keys[j0 + l];
          __m512 a = _mm512_setzero_ps();
          for (int i = 0; i < D; i += 16) {
            const __mmask16 m = TailMask(D - i);
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qg + i), _mm512_maskz_loadu_ps(m, kj + i), a);
          }
          acc[l] = a;
        }
        _mm512_storeu_ps(sc + j0, _mm512_mul_ps(Reduce16(acc), scale_v));
      }
      __m512 mxv = _mm512_set1_ps(-INFINITY);
      for (int j0 = 0; j0 < len; j0 += 16) mxv = _mm512_mask_max_ps(mxv, TailMask(len - j0), mxv, _mm512_loadu_ps(sc + j0));
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
      __m512 sumv = _mm512_setzero_ps();
      for (int j0 = 0; j0 < padded; j0 += 16) {
        const __m512 e = _mm512_maskz_mov_ps(TailMask(len - j0), ExpNonPositive(_mm512_sub_ps(_mm512_loadu_ps(sc + j0), mx)));
        _mm512_storeu_ps(sc + j0, e);
        sumv = _mm512_add_ps(sumv, e);
      }
      ws.inv_sum[g] = 1.0f / _mm512_reduce_add_ps(sumv);
    }
    for (int g0 = 0; g0 < group; g0 += 4) {
      const int ng = std::min(4, group - g0);
      for (int i = 0; i < D; i += 16) {
        const __mmask16 m = TailMask(D - i);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j = 0; j < len; ++j) {
          const __m512 vj = _mm512_maskz_loadu_ps(m, keys[j] + v_offset + i);
          for (int g = 0; g < ng; ++g) {
            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(ws.scores[static_cast<size_t>(g0 + g) * padded + j]), vj, acc[g]);
          }
        }
        for (int g = 0; g < ng; ++g) {
          _mm512_mask_storeu_ps(oh + (g0 + g) * D + i, m, _mm512_mul_ps(acc[g], _mm512_set1_ps(ws.inv_sum[g0 + g])));
        }
      }
    }
  };

  pool.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    static thread_local ItemScratch scratch;
    run_item(items[i], scratch);
  });
}

}  // namespace dyn::cpu

#endif  // DYN_CPU_AVX512
