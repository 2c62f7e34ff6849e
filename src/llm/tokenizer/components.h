// The pipeline stages of a tokenizer, as in Hugging Face `tokenizers`: normalizers,
// pre-tokenizers, decoders, and the search patterns they share. Private to src/llm/tokenizer.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/json.hpp>

#include "base/status.h"

namespace dyn::tok {

// A regular expression (PCRE2, UTF + UCP, JIT-compiled) or a literal string.
class Pattern {
 public:
  static Result<std::unique_ptr<Pattern>> Regex(std::string_view regex);
  static std::unique_ptr<Pattern> Literal(std::string_view literal);
  // {"Regex": "..."} or {"String": "..."} as in tokenizer.json.
  static Result<std::unique_ptr<Pattern>> FromJson(const boost::json::value& v);
  ~Pattern();
  // Appends the [begin, end) byte ranges of all non-overlapping, non-empty matches in `text`
  // (valid UTF-8), left to right.
  void FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  Pattern() = default;
  std::string literal_;
  void* code_ = nullptr;  // pcre2_code_8*, null for a literal
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string& text) const = 0;
};
// null JSON gives a null normalizer (no normalization).
Result<std::unique_ptr<Normalizer>> ParseNormalizer(const boost::json::value& v);

// A piece of text between pre-tokenization steps. `at_start`: it begins at offset 0 of the
// original input (Metaspace's prepend_scheme "first" needs this).
struct Piece {
  std::string text;
  bool at_start = false;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` with their pre-tokenized sub-pieces; `scratch` is reusable storage.
  virtual void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const = 0;
};
Result<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const boost::json::value& v);
// Pre-tokenizers the GGUF loader assembles by hand.
std::unique_ptr<PreTokenizer> MakeByteLevelPreTokenizer(bool add_prefix_space, bool use_regex);
std::unique_ptr<PreTokenizer> MakeDigitsPreTokenizer(bool individual_digits);
std::unique_ptr<PreTokenizer> MakeSplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior,
                                                    bool invert);
std::unique_ptr<PreTokenizer> MakeMetaspacePreTokenizer(std::string replacement, int prepend_scheme, bool split);
std::unique_ptr<PreTokenizer> MakeSequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps);

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Transforms the token strings in place, as HF's Decoder::decode_chain.
  virtual void DecodeChain(std::vector<std::string>& tokens) const = 0;
};
Result<std::unique_ptr<Decoder>> ParseDecoder(const boost::json::value& v);
std::unique_ptr<Decoder> MakeByteLevelDecoder();
// Replace "▁" -> " ", ByteFallback, Fuse, Strip(" ", 1, 0): Llama's SentencePiece decoder.
std::unique_ptr<Decoder> MakeSentencePieceDecoder(bool strip_leading_space);

// JSON accessors that tolerate absent keys.
const boost::json::value* JsonFind(const boost::json::object& o, std::string_view key);
std::string JsonString(const boost::json::object& o, std::string_view key, std::string_view dflt = "");
bool JsonBool(const boost::json::object& o, std::string_view key, bool dflt);
int64_t JsonInt(const boost::json::object& o, std::string_view key, int64_t dflt);

}  // namespace dyn::tok
