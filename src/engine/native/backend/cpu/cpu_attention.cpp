// Paged causal attention on the CPU. Work items are (sequence, new row, kv head): the heads that
// share a kv head (GQA) are processed together so each cached K/V vector is loaded once for all of
// them. Items are claimed dynamically (prefill rows have triangular cost), but each item's
// arithmetic is fixed, so results do not depend on the batch or the thread count.
#include "engine/native/backend/cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/native/backend/cpu/cpu_kernels.h"

namespace dyn::cpu {
namespace {

inline __mmask16 TailMask(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

inline float Dot(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[0..n) += p * v[0..n)
inline void Axpy(float p, const float* v, float* out, int n) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, out + i)));
  }
}

struct Item {
  int seq;
  int row;  // within the sequence
  int kv_head;
};

}  // namespace

void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
             const float* v) {
  const size_t tf = layout.TokenFloats();
  for (const AttentionSeq& s : seqs) {
    for (int i = 0; i < s.num_rows; ++i) {
      const int pos = s.start_pos + i;
      const int block = s.block_table[pos / layout.block_size];
      const int slot = pos % layout.block_size;
      const size_t row = static_cast<size_t>(s.row_begin + i);
      std::copy_n(k + row * tf, tf, cache + layout.Offset(block, layer, 0, slot));
      std::copy_n(v + row * tf, tf, cache + layout.Offset(block, layer, 1, slot));
    }
  }
}

void Attention(ThreadPool& pool, const float* cache, const KvLayout& layout, int layer,
               std::span<const AttentionSeq> seqs, const float* q, int num_heads, float scale, float* out) {
  const int kv_heads = layout.num_kv_heads, D = layout.head_dim, bs = layout.block_size;
  const int group = num_heads / kv_heads;
  std::vector<Item> items;
  for (int s = 0; s < static_cast<int>(seqs.size()); ++s)
    for (int i = 0; i < seqs[s].num_rows; ++i)
      for (int h = 0; h < kv_heads; ++h) items.push_back({s, i, h});
  const size_t row_floats = static_cast<size_t>(num_heads) * D;

  auto run_item = [&](const Item& it, std::vector<float>& scores) {
    const AttentionSeq& s = seqs[it.seq];
    const int pos = s.start_pos + it.row;
    const int len = pos + 1;
    const size_t row = static_cast<size_t>(s.row_begin + it.row);
    if (scores.size() < static_cast<size_t>(group) * len) scores.resize(static_cast<size_t>(group) * len);
    const float* qh = q + row * row_floats + static_cast<size_t>(it.kv_head) * group * D;
    float* oh = out + row * row_floats + static_cast<size_t>(it.kv_head) * group * D;
    for (int j = 0; j < len; ++j) {
      const float* kj = cache + layout.Offset(s.block_table[j / bs], layer, 0, j % bs) + static_cast<size_t>(it.kv_head) * D;
      for (int g = 0; g < group; ++g) scores[static_cast<size_t>(g) * len + j] = Dot(qh + g * D, kj, D) * scale;
    }
    for (int g = 0; g < group; ++g) {
      float* sc = scores.data() + static_cast<size_t>(g) * len;
      float mx = sc[0];
      for (int j = 1; j < len; ++j) mx = std::max(mx, sc[j]);
      float sum = 0.0f;
      for (int j = 0; j < len; ++j) {
        sc[j] = std::exp(sc[j] - mx);
        sum += sc[j];
      }
      const float inv = 1.0f / sum;
      for (int j = 0; j < len; ++j) sc[j] *= inv;
      std::fill_n(oh + g * D, D, 0.0f);
    }
    for (int j = 0; j < len; ++j) {
      const float* vj = cache + layout.Offset(s.block_table[j / bs], layer, 1, j % bs) + static_cast<size_t>(it.kv_head) * D;
      for (int g = 0; g < group; ++g) Axpy(scores[static_cast<size_t>(g) * len + j], vj, oh + g * D, D);
    }
  };

  pool.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    static thread_local std::vector<float> scores;
    run_item(items[i], scores);
  });
}

}  // namespace dyn::cpu
