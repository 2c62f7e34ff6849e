// Tokenizer::Impl: the assembled pipeline (added tokens, normalizer, pre-tokenizer, BPE model,
// post-processor, decoder) that both loaders (tokenizer.json and GGUF) fill in. Private.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "llm/tokenizer/bpe_model.h"
#include "llm/tokenizer/components.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {

namespace tok {

struct AddedToken {
  std::string content;
  uint32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
};

// Finds added tokens in text, leftmost-longest (HF uses aho-corasick with that match kind).
class AddedTokenMatcher {
 public:
  void Add(std::string_view pattern, size_t token_index);
  bool empty() const { return nodes_.size() <= 1; }
  // The leftmost-longest match at or after `from`: sets [*b, *e) and the token index.
  bool FindNext(std::string_view text, size_t from, size_t* b, size_t* e, size_t* token_index) const;

 private:
  struct Node {
    std::vector<std::pair<uint8_t, uint32_t>> next;  // sorted by byte
    int64_t token = -1;
  };
  int64_t Child(uint32_t node, uint8_t byte) const;
  std::vector<Node> nodes_{1};
  bool first_byte_[256] = {};
};

}  // namespace tok

struct Tokenizer::Impl {
  tok::BpeModel model;
  std::vector<tok::AddedToken> added;
  std::unordered_map<uint32_t, size_t> added_by_id;
  tok::StringMap<size_t> added_by_content;
  tok::AddedTokenMatcher raw_matcher;         // added tokens with normalized = false
  tok::AddedTokenMatcher normalized_matcher;  // normalized = true, matched on normalized text
  std::unique_ptr<tok::Normalizer> normalizer;
  std::unique_ptr<tok::PreTokenizer> pre_tokenizer;
  std::vector<uint32_t> post_prefix, post_suffix;  // ids the post-processor puts around the sequence
  std::unique_ptr<tok::Decoder> decoder;
  TokenizerInfo info;
  uint32_t vocab_size = 0;

  // After the fields above are set: builds the matchers, vocab_size and the special ids in `info`
  // (from the token strings already in info).
  Status Finalize();

  std::vector<uint32_t> Encode(std::string_view text, bool add_special_tokens) const;
  std::string Decode(std::span<const uint32_t> ids, bool skip_special_tokens) const;
  const std::string* TokenString(uint32_t id) const;
  // A byte-fallback piece "<0xHH>": its text depends on the byte tokens around it.
  bool IsBytePiece(uint32_t id) const;

 private:
  void EncodeNormalizedSegment(std::string_view segment, bool at_start, std::vector<uint32_t>& out) const;
};

// Loaders (tokenizer_json.cpp, tokenizer_gguf.cpp).
Result<std::unique_ptr<Tokenizer::Impl>> LoadTokenizerJson(const std::string& json_path, const std::string& config_path);
Result<std::unique_ptr<Tokenizer::Impl>> LoadGgufTokenizer(const GgufFile& gguf);

}  // namespace dyn
