// Portable paged causal attention (used where the AVX-512 kernels are not built). Work items are
// (sequence, new row, kv head, a range of that kv head's query heads): the heads of one item share
// each K/V load. Batch-1 decode has few kv heads, so there the heads are split into separate items
// to keep every thread busy; a head's arithmetic is the same however its heads are grouped, so
// results do not depend on the batch or the thread count.
//
// With AVX2/FMA and head_dim % 8 == 0: scores of 8 keys at a time (one fixed reduction tree for 8
// dot products), a vectorized softmax (polynomial exp), then the value rows accumulated in
// registers, 64 output columns x up to 3 heads at a time. Otherwise a scalar version.
#include "engine/native/backend/cpu/simd.h"

#if !DYN_CPU_AVX512

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/native/backend/cpu/cpu_generic.h"
#include "engine/native/backend/cpu/cpu_kernels.h"

namespace dyn::cpu {
namespace {

struct Item {
  int seq;
  int row;  // within the sequence
  int kv_head;
  int g0, ng;  // query heads kv_head * group + [g0, g0 + ng)
};

struct ItemScratch {
  std::vector<float> scores;
  std::vector<const float*> keys;
  std::vector<float> inv_sum;
};

// What every item needs: the layer's geometry and its inputs.
struct Job {
  const float* cache;
  const KvLayout* layout;
  int layer;
  std::span<const AttentionSeq> seqs;
  const float* q;
  float* out;
  int num_heads, group, D;
  float scale;
};

#if defined(__AVX2__) && defined(__FMA__)

// exp(x) for x <= 0 (softmax arguments), Cephes' single-precision polynomial (about 1 ulp); 0 below
// -87.
inline __m256 ExpNonPositive(__m256 x) {
  const __m256 in_range = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), in_range);
}

// Lane l of the result = the sum of the 8 lanes of v[l] (a fixed hadd tree).
inline __m256 Reduce8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high 128-bit halves of keys 0-3), b the same for 4-7.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline float HorizontalSum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

inline float HorizontalMax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// out[g][c0 .. c0 + 8 * NV) = sum_j p[g][j] * v_j[c0 ..], for ng <= 3 heads.
template <int NV>
void AccumulateValues(const float* const* keys, size_t v_offset, int len, const float* p, size_t p_stride, int ng,
                      int c0, const float* inv_sum, float* out, int D) {
  __m256 acc[3][NV];
  for (int g = 0; g < 3; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_setzero_ps();
  for (int j = 0; j < len; ++j) {
    const float* vj = keys[j] + v_offset + c0;
    __m256 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm256_loadu_ps(vj + 8 * v);
    for (int g = 0; g < ng; ++g) {
      const __m256 pj = _mm256_set1_ps(p[g * p_stride + j]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_fmadd_ps(pj, vv[v], acc[g][v]);
    }
  }
  for (int g = 0; g < ng; ++g)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + g * D + c0 + 8 * v, _mm256_mul_ps(acc[g][v], _mm256_set1_ps(inv_sum[g])));
}

void RunItemVector(const Job& job, const Item& it, ItemScratch& ws) {
  const KvLayout& layout = *job.layout;
  const int D = job.D, bs = layout.block_size;
  const AttentionSeq& s = job.seqs[it.seq];
  const int len = s.start_pos + it.row + 1;
  const int padded = (len + 7) / 8 * 8;
  const size_t row = static_cast<size_t>(s.row_begin + it.row);
  if (ws.scores.size() < static_cast<size_t>(it.ng) * padded) ws.scores.resize(static_cast<size_t>(it.ng) * padded);
  if (ws.keys.size() < static_cast<size_t>(padded)) ws.keys.resize(padded);
  if (ws.inv_sum.size() < static_cast<size_t>(it.ng)) ws.inv_sum.resize(it.ng);
  const size_t head0 = static_cast<size_t>(it.kv_head) * job.group + it.g0;
  const float* qh = job.q + row * job.num_heads * D + head0 * D;
  float* oh = job.out + row * job.num_heads * D + head0 * D;
  const float** keys = ws.keys.data();
  for (int j = 0; j < len; ++j) {
    keys[j] = job.cache + layout.Offset(s.block_table[j / bs], job.layer, 0, j % bs) + static_cast<size_t>(it.kv_head) * D;
  }
  for (int j = len; j < padded; ++j) keys[j] = keys[0];  // lanes past the end are dropped
  const size_t v_offset = static_cast<size_t>(bs) * layout.TokenFloats();  // V follows K in a block
  const __m256 scale_v = _mm256_set1_ps(job.scale);
  for (int g = 0; g < it.ng; ++g) {
    const float* qg = qh + g * D;
    float* sc = ws.scores.data() + static_cast<size_t>(g) * padded;
    for (int j0 = 0; j0 < len; j0 += 8) {
      __m256 acc[8];
      for (int l = 0; l < 8; ++l) {
        const float* kj = keys[j0 + l];
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(kj));
        for (int i = 8; i < D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), _mm256_loadu_ps(kj + i), a);
        acc[l] = a;
      }
      _mm256_storeu_ps(sc + j0, _mm256_mul_ps(Reduce8(acc), scale_v));
    }
    for (int j = len; j < padded; ++j) sc[j] = -INFINITY;
    __m256 mxv = _mm256_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < padded; j0 += 8) mxv = _mm256_max_ps(mxv, _mm256_loadu_ps(sc + j0));
    const __m256 mx = _mm256_set1_ps(HorizontalMax(mxv));
    __m256 sumv = _mm256_setzero_ps();
    for (int j0 = 0; j0 < padded; j0 += 8) {
      const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(sc + j0), mx));
      _mm256_storeu_ps(sc + j0, e);
      sumv = _mm256_add_ps(sumv, e);
    }
    ws.inv_sum[g] = 1.0f / HorizontalSum(sumv);
  }
  for (int c0 = 0; c0 < D; c0 += 64) {
    const float* p = ws.scores.data();
    switch (std::min(8, (D - c0) / 8)) {
      case 8: AccumulateValues<8>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 7: AccumulateValues<7>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 6: AccumulateValues<6>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 5: AccumulateValues<5>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 4: AccumulateValues<4>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 3: AccumulateValues<3>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      case 2: AccumulateValues<2>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
      default: AccumulateValues<1>(keys, v_offset, len, p, padded, it.ng, c0, ws.inv_sum.data(), oh, D); break;
    }
  }
}

constexpr bool kHaveVector = true;
constexpr int kMaxHeadsPerItem = 3;  // the register budget of AccumulateValues

#else

void RunItemVector(const Job&, const Item&, ItemScratch&) {}
constexpr bool kHaveVector = false;
constexpr int kMaxHeadsPerItem = 1 << 30;

#endif

void RunItemScalar(const Job& job, const Item& it, ItemScratch& ws) {
  const KvLayout& layout = *job.layout;
  const int D = job.D, bs = layout.block_size;
  const AttentionSeq& s = job.seqs[it.seq];
  const int len = s.start_pos + it.row + 1;
  const size_t row = static_cast<size_t>(s.row_begin + it.row);
  if (ws.scores.size() < static_cast<size_t>(len)) ws.scores.resize(len);
  if (ws.keys.size() < static_cast<size_t>(len)) ws.keys.resize(len);
  const float** keys = ws.keys.data();
  for (int j = 0; j < len; ++j) {
    keys[j] = job.cache + layout.Offset(s.block_table[j / bs], job.layer, 0, j % bs) + static_cast<size_t>(it.kv_head) * D;
  }
  const size_t v_offset = static_cast<size_t>(bs) * layout.TokenFloats();
  float* sc = ws.scores.data();
  for (int g = it.g0; g < it.g0 + it.ng; ++g) {
    const size_t head_off = row * job.num_heads * D + (static_cast<size_t>(it.kv_head) * job.group + g) * D;
    const float* qg = job.q + head_off;
    float* og = job.out + head_off;
    float mx = -INFINITY;
    for (int j = 0; j < len; ++j) {
      sc[j] = Dot16(qg, keys[j], D) * job.scale;
      mx = std::max(mx, sc[j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < len; ++j) {
      sc[j] = std::exp(sc[j] - mx);
      sum += sc[j];
    }
    const float inv = 1.0f / sum;
    std::fill_n(og, D, 0.0f);
    for (int j = 0; j < len; ++j) {
      const float* vj = keys[j] + v_offset;
      const float p = sc[j];
      for (int i = 0; i < D; ++i) og[i] = std::fma(p, vj[i], og[i]);
    }
    for (int i = 0; i < D; ++i) og[i] *= inv;
  }
}

}  // namespace

void Attention(ThreadPool& pool, const float* cache, const KvLayout& layout, int layer,
               std::span<const AttentionSeq> seqs, const float* q, int num_heads, float scale, float* out) {
  const int kv_heads = layout.num_kv_heads;
  const Job job{cache, &layout, layer, seqs, q, out, num_heads, num_heads / kv_heads, layout.head_dim, scale};
  const bool vector = kHaveVector && job.D % 8 == 0;
  int rows = 0;
  for (const AttentionSeq& s : seqs) rows += s.num_rows;
  // Heads per item: a whole group (up to the register budget) when there are enough items to go
  // round, single heads when there are not (batch-1 decode: 3 kv heads for 2+ threads).
  int per_item = std::min(job.group, vector ? kMaxHeadsPerItem : job.group);
  if (static_cast<int64_t>(rows) * kv_heads * ((job.group + per_item - 1) / per_item) < 4 * pool.size()) per_item = 1;
  std::vector<Item> items;
  for (int s = 0; s < static_cast<int>(seqs.size()); ++s)
    for (int i = 0; i < seqs[s].num_rows; ++i)
      for (int h = 0; h < kv_heads; ++h)
        for (int g0 = 0; g0 < job.group; g0 += per_item) items.push_back({s, i, h, g0, std::min(per_item, job.group - g0)});
  pool.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    static thread_local ItemScratch scratch;
    if (vector) {
      RunItemVector(job, items[i], scratch);
    } else {
      RunItemScalar(job, items[i], scratch);
    }
  });
}

}  // namespace dyn::cpu

#endif  // !DYN_CPU_AVX512
