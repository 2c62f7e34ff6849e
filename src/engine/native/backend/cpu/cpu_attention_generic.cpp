// Portable paged causal attention (used where the AVX-512 kernels are not built). Work items are
// (sequence, new row, kv head) as in cpu_attention.cpp; each item's arithmetic is fixed, so results
// do not depend on the batch or the thread count.
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
  const size_t v_offset = static_cast<size_t>(bs) * layout.TokenFloats();  // V follows K in a block

  struct ItemScratch {
    std::vector<float> scores;
    std::vector<const float*> keys;
  };
  auto run_item = [&](const Item& it, ItemScratch& ws) {
    const AttentionSeq& s = seqs[it.seq];
    const int len = s.start_pos + it.row + 1;
    const size_t row = static_cast<size_t>(s.row_begin + it.row);
    if (ws.scores.size() < static_cast<size_t>(len)) ws.scores.resize(len);
    if (ws.keys.size() < static_cast<size_t>(len)) ws.keys.resize(len);
    const float** keys = ws.keys.data();
    for (int j = 0; j < len; ++j) {
      keys[j] = cache + layout.Offset(s.block_table[j / bs], layer, 0, j % bs) + static_cast<size_t>(it.kv_head) * D;
    }
    float* sc = ws.scores.data();
    for (int g = 0; g < group; ++g) {
      const size_t head_off = row * row_floats + (static_cast<size_t>(it.kv_head) * group + g) * D;
      const float* qg = q + head_off;
      float* og = out + head_off;
      float mx = -INFINITY;
      for (int j = 0; j < len; ++j) {
        sc[j] = Dot16(qg, keys[j], D) * scale;
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
  };

  pool.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    static thread_local ItemScratch scratch;
    run_item(items[i], scratch);
  });
}

}  // namespace dyn::cpu

#endif  // !DYN_CPU_AVX512
