// Tokenizer: text <-> token ids, identical to the Hugging Face `tokenizers` library.
//
// Loads a Hugging Face tokenizer.json (+ optional tokenizer_config.json) or the tokenizer.ggml.*
// vocabulary of a GGUF file. Pure computation: no I/O after loading, no networking, no threads.
// A loaded Tokenizer is immutable and safe to use from many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace dyn {

class GgufFile;

// What the frontend needs besides encode/decode: special tokens and the chat template.
struct TokenizerInfo {
  std::optional<uint32_t> bos_id, eos_id, pad_id, unk_id;
  std::string bos_token, eos_token, pad_token, unk_token;  // token strings ("" when absent)
  bool add_bos = false;  // post-processing adds BOS when add_special_tokens is true
  bool add_eos = false;
  std::string chat_template;        // the default template ("" when none)
  std::vector<std::pair<std::string, std::string>> named_templates;  // e.g. {"tool_use", ...}
};

class Tokenizer {
 public:
  // Loads tokenizer.json; tokenizer_config.json beside it (or at config_path) supplies
  // add_bos_token/add_eos_token, special token strings and the chat template.
  // Unknown normalizers, pre-tokenizers, models, post-processors or decoders fail with an error
  // that names them.
  static Result<std::unique_ptr<Tokenizer>> FromJsonFile(const std::string& tokenizer_json_path,
                                                         const std::string& config_path = "");
  // `dir` holds tokenizer.json and optionally tokenizer_config.json.
  static Result<std::unique_ptr<Tokenizer>> FromDirectory(const std::string& dir);
  // tokenizer.ggml.model = "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE/unigram scores).
  static Result<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);

  ~Tokenizer();

  // add_special_tokens: apply the post-processor (e.g. prepend BOS) as HF's encode(..., add_special_tokens) does.
  std::vector<uint32_t> Encode(std::string_view text, bool add_special_tokens = true) const;
  // As HF's decode(ids, skip_special_tokens). Invalid UTF-8 produced by byte pieces becomes U+FFFD.
  std::string Decode(std::span<const uint32_t> ids, bool skip_special_tokens = true) const;

  uint32_t vocab_size() const;  // ids are < vocab_size (including added tokens)
  std::optional<uint32_t> TokenToId(std::string_view token) const;
  std::string IdToToken(uint32_t id) const;  // the raw vocabulary string; "" for an unknown id
  bool IsSpecial(uint32_t id) const;         // an added token marked special
  const TokenizerInfo& info() const;

  struct Impl;

 private:
  friend class IncrementalDecoder;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Streaming detokenization. Emits text only when it is complete UTF-8 and will not change when
// more tokens arrive. Given the prompt's ids as context, the text it emits in total equals
// Decode(prompt + generated) minus Decode(prompt) (so a SentencePiece leading space between the
// prompt and the first generated token is kept, as vLLM does); with no context it equals
// Decode(generated). Byte-fallback pieces (<0xHH>) are decoded as a group, and a later invalid
// byte turns the whole group into U+FFFD, so text is held back while the last token is one.
// Not thread-safe; one per stream.
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens,
                     std::span<const uint32_t> prompt_ids = {});
  // Adds one token; returns the newly completed text (possibly "").
  std::string Step(uint32_t id);
  // Returns whatever is still held back (e.g. an incomplete UTF-8 sequence, as U+FFFD).
  std::string Finish();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<uint32_t> ids_;
  size_t prefix_offset_ = 0;  // ids_[prefix_offset_, read_offset_) decode to already-emitted text
  size_t read_offset_ = 0;
  bool last_is_byte_piece_ = false;  // the last token that decodes to text is a <0xHH> piece
};

}  // namespace dyn
