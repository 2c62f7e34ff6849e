#include "kv/block_hash.h"

#include <xxhash.h>

#include <bit>
#include <cassert>
#include <cstring>

namespace dyn {
namespace {

// Writes v as little-endian bytes; the hash is defined over the wire order, not the host's.
void StoreLe64(uint64_t v, unsigned char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

}  // namespace

uint64_t BlockHashSeedForLora(std::string_view adapter_name) {
  if (adapter_name.empty()) return kBlockHashSeed;
  return kBlockHashSeed + XXH3_64bits(adapter_name.data(), adapter_name.size());
}

uint64_t HashBlockTokens(std::span<const uint32_t> tokens, uint64_t seed) {
  if constexpr (std::endian::native == std::endian::little) {
    return XXH3_64bits_withSeed(tokens.data(), tokens.size() * sizeof(uint32_t), seed);
  } else {
    std::vector<unsigned char> bytes(tokens.size() * 4);
    for (size_t i = 0; i < tokens.size(); ++i) {
      for (int b = 0; b < 4; ++b) bytes[4 * i + b] = static_cast<unsigned char>(tokens[i] >> (8 * b));
    }
    return XXH3_64bits_withSeed(bytes.data(), bytes.size(), seed);
  }
}

uint64_t ChainBlockHash(uint64_t parent_sequence_hash, uint64_t local_hash, uint64_t seed) {
  unsigned char buf[16];
  StoreLe64(parent_sequence_hash, buf);
  StoreLe64(local_hash, buf + 8);
  return XXH3_64bits_withSeed(buf, sizeof(buf), seed);
}

void ExtendBlockHashes(std::span<const uint32_t> tokens, int block_size, uint64_t seed,
                       std::vector<uint64_t>& local, std::vector<uint64_t>& sequence) {
  assert(block_size > 0 && local.size() == sequence.size());
  const size_t full = tokens.size() / static_cast<size_t>(block_size);
  for (size_t i = local.size(); i < full; ++i) {
    uint64_t h = HashBlockTokens(tokens.subspan(i * block_size, block_size), seed);
    local.push_back(h);
    sequence.push_back(i == 0 ? h : ChainBlockHash(sequence[i - 1], h, seed));
  }
}

std::vector<uint64_t> ComputeLocalBlockHashes(std::span<const uint32_t> tokens, int block_size, uint64_t seed) {
  std::vector<uint64_t> local, sequence;
  ExtendBlockHashes(tokens, block_size, seed, local, sequence);
  return local;
}

std::vector<uint64_t> ComputeSequenceBlockHashes(std::span<const uint32_t> tokens, int block_size, uint64_t seed) {
  std::vector<uint64_t> local, sequence;
  ExtendBlockHashes(tokens, block_size, seed, local, sequence);
  return sequence;
}

}  // namespace dyn
