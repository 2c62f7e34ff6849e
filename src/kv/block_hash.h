// Block hashing compatible with NVIDIA Dynamo's KV router (see design/FACTS.md).
//
// Tokens are u32; only full blocks are hashed. A block's local hash is XXH3-64 over its tokens as
// little-endian u32 bytes; the sequence hash chains them, so equal sequence hashes mean equal
// prefixes. The block pool keys its prefix cache by sequence hash and the router recomputes the
// same values from token ids. Pure functions, thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace dyn {

inline constexpr uint64_t kBlockHashSeed = 1337;

// The seed for blocks computed under a LoRA adapter: 1337 + XXH3-64(name) (wrapping add).
// An empty name means the base model: kBlockHashSeed.
uint64_t BlockHashSeedForLora(std::string_view adapter_name);

// XXH3-64 of `tokens` as little-endian u32 bytes.
uint64_t HashBlockTokens(std::span<const uint32_t> tokens, uint64_t seed = kBlockHashSeed);

// seq[i] = XXH3-64(le64(parent_sequence_hash) || le64(local_hash), seed).
uint64_t ChainBlockHash(uint64_t parent_sequence_hash, uint64_t local_hash, uint64_t seed = kBlockHashSeed);

// Local hashes of the floor(tokens.size() / block_size) full blocks of `tokens`.
std::vector<uint64_t> ComputeLocalBlockHashes(std::span<const uint32_t> tokens, int block_size,
                                              uint64_t seed = kBlockHashSeed);

// Sequence hashes of the full blocks of `tokens` (seq[0] = local[0]).
std::vector<uint64_t> ComputeSequenceBlockHashes(std::span<const uint32_t> tokens, int block_size,
                                                 uint64_t seed = kBlockHashSeed);

// Extends `local` and `sequence` (parallel, already covering the first local.size() blocks of
// `tokens`) with every further full block of `tokens`. Used to hash a growing sequence
// incrementally.
void ExtendBlockHashes(std::span<const uint32_t> tokens, int block_size, uint64_t seed,
                       std::vector<uint64_t>& local, std::vector<uint64_t>& sequence);

}  // namespace dyn
