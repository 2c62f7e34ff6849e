// Writing new K/V rows into the paged cache: plain copies, the same for every instruction set.
#include <algorithm>

#include "engine/native/backend/cpu/cpu_kernels.h"

namespace dyn::cpu {

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

}  // namespace dyn::cpu
