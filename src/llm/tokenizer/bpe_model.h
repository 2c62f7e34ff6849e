// Byte-pair-encoding model as HF's `models::bpe::BPE`: vocabulary, ranked merges, unk/fuse_unk,
// byte_fallback, ignore_merges, continuing_subword_prefix/end_of_word_suffix. Private.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace dyn::tok {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// Open-addressing map from an id pair to (rank, merged id).
class PairMap {
 public:
  struct Entry {
    uint64_t key = kEmpty;
    uint32_t rank = 0, new_id = 0;
  };
  void Reserve(size_t n);
  // Keeps the first insertion of a pair (the lower rank when merges are added in rank order).
  void Insert(uint32_t a, uint32_t b, uint32_t rank, uint32_t new_id);
  const Entry* Find(uint32_t a, uint32_t b) const {
    if (slots_.empty()) return nullptr;
    uint64_t key = Key(a, b);
    size_t i = Hash(key);
    while (true) {
      const Entry& e = slots_[i];
      if (e.key == key) return &e;
      if (e.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }
  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t Key(uint32_t a, uint32_t b) { return (uint64_t{a} << 32) | b; }
  size_t Hash(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask_; }
  std::vector<Entry> slots_;
  size_t mask_ = 0, size_ = 0;
  int shift_ = 0;
};

class BpeModel {
 public:
  struct Options {
    std::optional<std::string> unk_token;
    bool fuse_unk = false;
    bool byte_fallback = false;
    bool ignore_merges = false;
    std::string continuing_subword_prefix;
    std::string end_of_word_suffix;
  };
  BpeModel();
  // `vocab[i]` is (token, id). Ids need not be dense.
  Status Init(std::vector<std::pair<std::string, uint32_t>> vocab, Options options);
  // Merges in rank order; a merge whose parts or result are not in the vocabulary is skipped.
  void AddMerge(std::string_view left, std::string_view right);

  // Appends the ids of one pre-tokenized word.
  void Tokenize(std::string_view word, std::vector<uint32_t>& out) const;

  std::optional<uint32_t> TokenToId(std::string_view token) const;
  const std::string* IdToToken(uint32_t id) const;  // null when unknown
  uint32_t id_bound() const { return static_cast<uint32_t>(id_to_token_.size()); }
  size_t num_merges() const { return merges_.size(); }

 private:
  void TokenizeCached(std::string_view word, std::vector<uint32_t>& out) const;
  void TokenizeUncached(std::string_view word, std::vector<uint32_t>& out) const;
  void MergeSymbols(std::vector<uint32_t>& ids) const;

  StringMap<uint32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<uint8_t> id_known_;
  PairMap merges_;
  uint32_t next_rank_ = 0;
  Options opt_;
  std::optional<uint32_t> unk_id_;
  int64_t byte_ids_[256];       // <0xHH> token ids, -1 when absent
  std::vector<int32_t> char_ids_;  // code point (< 0x10000) -> id of that one-character token, -1 when absent
  uint64_t cache_owner_;        // identifies this model in the per-thread word cache
  // SentencePiece-style vocabularies put "▁" only in a leading run of a token, so no merge
  // crosses the start of a "▁" run: a long word splits there into independent, cacheable chunks.
  bool split_at_metaspace_ = false;
};

}  // namespace dyn::tok
