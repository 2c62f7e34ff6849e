// Builds a tokenizer from a GGUF file's tokenizer.ggml.* metadata: "gpt2" (byte-level BPE) and
// "llama" (SentencePiece-style BPE over scores, with byte fallback).
#include <algorithm>
#include <map>

#include "llm/gguf.h"
#include "llm/tokenizer/text_util.h"
#include "llm/tokenizer/tokenizer_impl.h"

namespace dyn {

namespace {

constexpr int64_t kTokenTypeControl = 3;
constexpr int64_t kTokenTypeUserDefined = 4;

// tokenizer.ggml.pre names -> the split regex its merges were learned with (as llama.cpp and
// transformers map them). Empty: GPT-2's ByteLevel regex.
constexpr std::string_view kLlama3Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kTekkenSplit =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kGpt4oSplit =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

Result<std::unique_ptr<tok::PreTokenizer>> GgufPreTokenizer(const std::string& pre) {
  static const std::map<std::string, std::string_view, std::less<>> kSplits = {
      {"llama3", kLlama3Split},  {"llama-v3", kLlama3Split}, {"llama-bpe", kLlama3Split},
      {"falcon3", kLlama3Split}, {"dbrx", kLlama3Split},     {"smaug-bpe", kLlama3Split},
      {"pixtral", kLlama3Split}, {"qwen2", kQwen2Split},     {"deepseek-r1-qwen", kQwen2Split},
      {"megrez", kQwen2Split},   {"tekken", kTekkenSplit},   {"gpt-4o", kGpt4oSplit},
      {"llama4", kGpt4oSplit},
  };
  if (auto it = kSplits.find(pre); it != kSplits.end()) {
    DYN_ASSIGN_OR_RETURN(auto pattern, tok::Pattern::Regex(it->second));
    std::vector<std::unique_ptr<tok::PreTokenizer>> steps;
    steps.push_back(tok::MakeSplitPreTokenizer(std::move(pattern), tok::SplitBehavior::kIsolated, false));
    steps.push_back(tok::MakeByteLevelPreTokenizer(false, false));
    return tok::MakeSequencePreTokenizer(std::move(steps));
  }
  // StarCoder-family vocabularies (SmolLM among them) isolate every digit, then use GPT-2's regex:
  // llama.cpp's "\p{N}" + GPT-2 split, the original tokenizer.json's Digits + ByteLevel.
  if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" || pre == "codeshell" ||
      pre == "exaone") {
    std::vector<std::unique_ptr<tok::PreTokenizer>> steps;
    steps.push_back(tok::MakeDigitsPreTokenizer(true));
    steps.push_back(tok::MakeByteLevelPreTokenizer(false, true));
    return tok::MakeSequencePreTokenizer(std::move(steps));
  }
  if (pre.empty() || pre == "default" || pre == "gpt-2" || pre == "gpt2" || pre == "mpt" || pre == "olmo" ||
      pre == "jais") {
    return tok::MakeByteLevelPreTokenizer(false, true);
  }
  return Status::Unsupported("unknown tokenizer.ggml.pre '" + pre + "'");
}

// Merges implied by SentencePiece scores, ordered as transformers' generate_merges does: by the
// merged token's score (best first), then longer left piece, then longer right piece.
std::vector<std::pair<std::string, std::string>> MergesFromScores(const std::vector<std::string>& tokens,
                                                                  const std::vector<double>& scores) {
  tok::StringMap<uint32_t> vocab;
  for (uint32_t i = 0; i < tokens.size(); ++i) vocab.emplace(tokens[i], i);
  struct M {
    uint32_t left, right;
    double score;
    size_t left_chars, right_chars;
  };
  auto chars = [](std::string_view s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
  };
  std::vector<M> merges;
  for (uint32_t id = 0; id < tokens.size(); ++id) {
    const std::string& t = tokens[id];
    std::vector<M> local;
    for (size_t cut = 1; cut < t.size(); ++cut) {
      if ((static_cast<unsigned char>(t[cut]) & 0xC0) == 0x80) continue;
      auto l = vocab.find(std::string_view(t).substr(0, cut));
      auto r = vocab.find(std::string_view(t).substr(cut));
      if (l == vocab.end() || r == vocab.end()) continue;
      local.push_back(M{l->second, r->second, id < scores.size() ? scores[id] : 0.0, chars(l->first), chars(r->first)});
    }
    std::sort(local.begin(), local.end(), [](const M& a, const M& b) {
      return a.left != b.left ? a.left < b.left : a.right < b.right;
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const M& a, const M& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.left_chars != b.left_chars) return a.left_chars > b.left_chars;
    return a.right_chars > b.right_chars;
  });
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(merges.size());
  for (const auto& m : merges) out.emplace_back(tokens[m.left], tokens[m.right]);
  return out;
}

bool InByteAlphabet(std::string_view token) {
  size_t i = 0;
  while (i < token.size()) {
    if (tok::ByteLevelByte(tok::DecodeUtf8(token, i)) < 0) return false;
  }
  return true;
}

}  // namespace

Result<std::unique_ptr<Tokenizer::Impl>> LoadGgufTokenizer(const GgufFile& gguf) {
  auto model_type = gguf.GetString("tokenizer.ggml.model");
  if (!model_type) return Status::InvalidArgument(gguf.path() + ": no tokenizer.ggml.model");
  const auto* tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens || tokens->empty()) return Status::InvalidArgument(gguf.path() + ": no tokenizer.ggml.tokens");
  const auto* types = gguf.GetIntArray("tokenizer.ggml.token_type");
  auto impl = std::make_unique<Tokenizer::Impl>();
  const bool byte_level = *model_type == "gpt2";
  if (!byte_level && *model_type != "llama") {
    return Status::Unsupported("unknown tokenizer.ggml.model '" + *model_type + "' (dyn supports gpt2 and llama)");
  }

  std::vector<std::pair<std::string, uint32_t>> vocab;
  vocab.reserve(tokens->size());
  for (uint32_t i = 0; i < tokens->size(); ++i) vocab.emplace_back((*tokens)[i], i);
  tok::BpeModel::Options opt;
  bool add_bos_default = false;
  if (byte_level) {
    DYN_RETURN_IF_ERROR(impl->model.Init(std::move(vocab), opt));
    const auto* merges = gguf.GetStringArray("tokenizer.ggml.merges");
    if (!merges) return Status::InvalidArgument(gguf.path() + ": gpt2 vocabulary without tokenizer.ggml.merges");
    for (const auto& m : *merges) {
      auto sp = m.find(' ');
      if (sp == std::string::npos) return Status::InvalidArgument("bad merge '" + m + "'");
      impl->model.AddMerge(std::string_view(m).substr(0, sp), std::string_view(m).substr(sp + 1));
    }
    DYN_ASSIGN_OR_RETURN(impl->pre_tokenizer, GgufPreTokenizer(gguf.GetString("tokenizer.ggml.pre").value_or("")));
    impl->decoder = tok::MakeByteLevelDecoder();
  } else {
    opt.byte_fallback = true;
    opt.fuse_unk = true;
    if (auto unk = gguf.GetInt("tokenizer.ggml.unknown_token_id"); unk && *unk >= 0 && *unk < static_cast<int64_t>(tokens->size())) {
      opt.unk_token = (*tokens)[static_cast<size_t>(*unk)];
    }
    DYN_RETURN_IF_ERROR(impl->model.Init(std::move(vocab), opt));
    std::vector<std::pair<std::string, std::string>> merges;
    if (const auto* m = gguf.GetStringArray("tokenizer.ggml.merges")) {
      for (const auto& s : *m) {
        auto sp = s.find(' ');
        if (sp != std::string::npos) merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      }
    } else {
      const auto* scores = gguf.GetFloatArray("tokenizer.ggml.scores");
      if (!scores) return Status::InvalidArgument(gguf.path() + ": llama vocabulary without scores or merges");
      merges = MergesFromScores(*tokens, *scores);
    }
    for (const auto& [l, r] : merges) impl->model.AddMerge(l, r);
    bool prefix_space = gguf.GetInt("tokenizer.ggml.add_space_prefix").value_or(1) != 0;
    impl->pre_tokenizer = tok::MakeMetaspacePreTokenizer("\xE2\x96\x81", prefix_space ? 1 : 2, false);
    impl->decoder = tok::MakeSentencePieceDecoder(prefix_space);
    add_bos_default = true;  // llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
  }

  // Control tokens are special added tokens; user-defined ones are plain added tokens.
  if (types) {
    for (uint32_t i = 0; i < tokens->size() && i < types->size(); ++i) {
      int64_t type = (*types)[i];
      const std::string& t = (*tokens)[i];
      if (type == kTokenTypeControl && (!byte_level || InByteAlphabet(t))) {
        impl->added.push_back(tok::AddedToken{t, i, true, false, false, false, false});
      } else if (type == kTokenTypeUserDefined) {
        impl->added.push_back(tok::AddedToken{t, i, false, false, false, false, false});
      }
    }
  }

  auto& info = impl->info;
  auto id_key = [&](std::string_view key) -> std::optional<uint32_t> {
    auto v = gguf.GetInt(key);
    if (!v || *v < 0 || *v >= static_cast<int64_t>(tokens->size())) return std::nullopt;
    return static_cast<uint32_t>(*v);
  };
  info.bos_id = id_key("tokenizer.ggml.bos_token_id");
  info.eos_id = id_key("tokenizer.ggml.eos_token_id");
  info.unk_id = id_key("tokenizer.ggml.unknown_token_id");
  info.pad_id = id_key("tokenizer.ggml.padding_token_id");
  info.chat_template = gguf.GetString("tokenizer.chat_template").value_or("");
  DYN_RETURN_IF_ERROR(impl->Finalize());
  bool add_bos = gguf.GetInt("tokenizer.ggml.add_bos_token").value_or(add_bos_default ? 1 : 0) != 0;
  bool add_eos = gguf.GetInt("tokenizer.ggml.add_eos_token").value_or(0) != 0;
  if (add_bos && info.bos_id) impl->post_prefix.push_back(*info.bos_id);
  if (add_eos && info.eos_id) impl->post_suffix.push_back(*info.eos_id);
  info.add_bos = add_bos && info.bos_id.has_value();
  info.add_eos = add_eos && info.eos_id.has_value();
  return impl;
}

}  // namespace dyn
