// Encode/Decode over the assembled pipeline, the added-token matcher, and the public API.
#include "llm/tokenizer/tokenizer.h"

#include <algorithm>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/text_util.h"
#include "llm/tokenizer/tokenizer_impl.h"

namespace dyn {

namespace tok {

int64_t AddedTokenMatcher::Child(uint32_t node, uint8_t byte) const {
  const auto& next = nodes_[node].next;
  auto it = std::lower_bound(next.begin(), next.end(), byte,
                             [](const std::pair<uint8_t, uint32_t>& p, uint8_t b) { return p.first < b; });
  return it != next.end() && it->first == byte ? static_cast<int64_t>(it->second) : -1;
}

void AddedTokenMatcher::Add(std::string_view pattern, size_t token_index) {
  if (pattern.empty()) return;
  uint32_t node = 0;
  for (unsigned char c : pattern) {
    int64_t child = Child(node, c);
    if (child < 0) {
      child = static_cast<int64_t>(nodes_.size());
      auto& next = nodes_[node].next;
      auto it = std::lower_bound(next.begin(), next.end(), c,
                                 [](const std::pair<uint8_t, uint32_t>& p, uint8_t b) { return p.first < b; });
      next.insert(it, {c, static_cast<uint32_t>(child)});
      nodes_.emplace_back();
    }
    node = static_cast<uint32_t>(child);
  }
  if (nodes_[node].token < 0) nodes_[node].token = static_cast<int64_t>(token_index);
  first_byte_[static_cast<unsigned char>(pattern[0])] = true;
}

bool AddedTokenMatcher::FindNext(std::string_view text, size_t from, size_t* b, size_t* e,
                                 size_t* token_index) const {
  if (empty()) return false;
  for (size_t i = from; i < text.size(); ++i) {
    if (!first_byte_[static_cast<unsigned char>(text[i])]) continue;
    uint32_t node = 0;
    int64_t best = -1;
    size_t best_end = 0;
    for (size_t k = i; k < text.size(); ++k) {
      int64_t child = Child(node, static_cast<uint8_t>(text[k]));
      if (child < 0) break;
      node = static_cast<uint32_t>(child);
      if (nodes_[node].token >= 0) {
        best = nodes_[node].token;
        best_end = k + 1;
      }
    }
    if (best >= 0) {
      *b = i;
      *e = best_end;
      *token_index = static_cast<size_t>(best);
      return true;
    }
  }
  return false;
}

namespace {

uint32_t LastChar(std::string_view s) {
  size_t b = s.size() - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  return DecodeUtf8(s, b);
}

// Splits `s` on added tokens as HF's AddedVocabulary::find_matches: on_text(segment, offset) for
// the text between tokens, on_token(id) for each token (with lstrip/rstrip/single_word applied).
template <class OnText, class OnToken>
void SplitOnAddedTokens(const AddedTokenMatcher& matcher, const std::vector<AddedToken>& added, std::string_view s,
                        OnText on_text, OnToken on_token) {
  size_t start_offset = 0, pos = 0, b = 0, e = 0, idx = 0;
  while (pos < s.size() && matcher.FindNext(s, pos, &b, &e, &idx)) {
    pos = e;
    const AddedToken& t = added[idx];
    size_t start = b, stop = e;
    if (t.single_word) {
      bool start_space = b == 0 || !IsAlphanumeric(LastChar(s.substr(0, b)));
      size_t k = e;
      bool stop_space = e == s.size() || !IsAlphanumeric(DecodeUtf8(s, k));
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) {
      size_t newstart = b;
      while (newstart > 0) {
        size_t c = newstart - 1;
        while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
        size_t k = c;
        if (!IsWhitespace(DecodeUtf8(s, k))) break;
        newstart = c;
      }
      start = std::max(newstart, start_offset);
    }
    if (t.rstrip) {
      while (stop < s.size()) {
        size_t k = stop;
        if (!IsWhitespace(DecodeUtf8(s, k))) break;
        stop = k;
      }
    }
    if (start_offset < start) on_text(s.substr(start_offset, start - start_offset), start_offset);
    on_token(t.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) on_text(s.substr(start_offset), start_offset);
}

struct EncodeScratch {
  std::vector<Piece> pieces, spare;
  std::string normalized;
};

}  // namespace

}  // namespace tok

Status Tokenizer::Impl::Finalize() {
  uint32_t bound = model.id_bound();
  for (size_t k = 0; k < added.size(); ++k) {
    const auto& t = added[k];
    bound = std::max(bound, t.id + 1);
    added_by_id[t.id] = k;
    added_by_content.emplace(t.content, k);
    if (t.normalized && normalizer) {
      std::string content = t.content;
      normalizer->Normalize(content);
      normalized_matcher.Add(content, k);
    } else if (t.normalized) {
      normalized_matcher.Add(t.content, k);
    } else {
      raw_matcher.Add(t.content, k);
    }
  }
  vocab_size = bound;
  auto id_of = [&](const std::string& s) -> std::optional<uint32_t> {
    if (s.empty()) return std::nullopt;
    if (auto it = added_by_content.find(s); it != added_by_content.end()) return added[it->second].id;
    return model.TokenToId(s);
  };
  if (!info.bos_id) info.bos_id = id_of(info.bos_token);
  if (!info.eos_id) info.eos_id = id_of(info.eos_token);
  if (!info.pad_id) info.pad_id = id_of(info.pad_token);
  if (!info.unk_id) info.unk_id = id_of(info.unk_token);
  auto name_of = [&](std::optional<uint32_t> id, std::string& name) {
    if (id && name.empty()) {
      if (const auto* s = TokenString(*id)) name = *s;
    }
  };
  name_of(info.bos_id, info.bos_token);
  name_of(info.eos_id, info.eos_token);
  name_of(info.pad_id, info.pad_token);
  name_of(info.unk_id, info.unk_token);
  return Status::Ok();
}

bool Tokenizer::Impl::IsBytePiece(uint32_t id) const {
  const std::string* s = TokenString(id);
  return s && s->size() == 6 && s->compare(0, 3, "<0x") == 0 && (*s)[5] == '>';
}

const std::string* Tokenizer::Impl::TokenString(uint32_t id) const {
  if (auto it = added_by_id.find(id); it != added_by_id.end()) return &added[it->second].content;
  return model.IdToToken(id);
}

void Tokenizer::Impl::EncodeNormalizedSegment(std::string_view segment, bool at_start,
                                              std::vector<uint32_t>& out) const {
  if (segment.empty()) return;
  if (!pre_tokenizer) {
    model.Tokenize(segment, out);
    return;
  }
  thread_local tok::EncodeScratch scratch;
  auto& pieces = scratch.pieces;
  pieces.clear();
  pieces.push_back(tok::Piece{std::string(segment), at_start});
  pre_tokenizer->PreTokenize(pieces, scratch.spare);
  for (const auto& p : pieces) model.Tokenize(p.text, out);
}

std::vector<uint32_t> Tokenizer::Impl::Encode(std::string_view text, bool add_special_tokens) const {
  std::string repaired;
  if (!tok::IsValidUtf8(text)) {
    repaired = tok::Utf8Lossy(text);
    text = repaired;
  }
  std::vector<uint32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), post_prefix.begin(), post_prefix.end());
  auto push_id = [&](uint32_t id) { out.push_back(id); };
  tok::SplitOnAddedTokens(raw_matcher, added, text, [&](std::string_view segment, size_t offset) {
    std::string_view normalized_view = segment;
    std::string normalized;
    if (normalizer) {
      normalized.assign(segment);
      normalizer->Normalize(normalized);
      normalized_view = normalized;
    }
    if (normalized_matcher.empty()) {
      EncodeNormalizedSegment(normalized_view, offset == 0, out);
      return;
    }
    tok::SplitOnAddedTokens(normalized_matcher, added, normalized_view, [&](std::string_view seg, size_t off) {
      EncodeNormalizedSegment(seg, offset == 0 && off == 0, out);
    }, push_id);
  }, push_id);
  if (add_special_tokens) out.insert(out.end(), post_suffix.begin(), post_suffix.end());
  return out;
}

std::string Tokenizer::Impl::Decode(std::span<const uint32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (uint32_t id : ids) {
    const std::string* s = nullptr;
    bool special = false;
    if (auto it = added_by_id.find(id); it != added_by_id.end()) {
      s = &added[it->second].content;
      special = added[it->second].special;
    } else {
      s = model.IdToToken(id);
      if (s && skip_special_tokens) {
        auto c = added_by_content.find(*s);
        special = c != added_by_content.end() && added[c->second].special;
      }
    }
    if (s == nullptr || (skip_special_tokens && special)) continue;
    tokens.push_back(*s);
  }
  std::string out;
  if (decoder) {
    decoder->DecodeChain(tokens);
    for (const auto& t : tokens) out += t;
  } else {
    for (size_t k = 0; k < tokens.size(); ++k) {
      if (k) out.push_back(' ');
      out += tokens[k];
    }
  }
  return out;
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonFile(const std::string& tokenizer_json_path,
                                                           const std::string& config_path) {
  std::string config = config_path;
  if (config.empty()) {
    auto slash = tokenizer_json_path.find_last_of('/');
    std::string dir = slash == std::string::npos ? "." : tokenizer_json_path.substr(0, slash);
    std::string candidate = dir + "/tokenizer_config.json";
    if (FileExists(candidate)) config = candidate;
  }
  DYN_ASSIGN_OR_RETURN(auto impl, LoadTokenizerJson(tokenizer_json_path, config));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromDirectory(const std::string& dir) {
  std::string path = dir + "/tokenizer.json";
  if (!FileExists(path)) return Status::NotFound("no tokenizer.json in " + dir);
  return FromJsonFile(path);
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  DYN_ASSIGN_OR_RETURN(auto impl, LoadGgufTokenizer(gguf));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<uint32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  return impl_->Encode(text, add_special_tokens);
}

std::string Tokenizer::Decode(std::span<const uint32_t> ids, bool skip_special_tokens) const {
  return impl_->Decode(ids, skip_special_tokens);
}

uint32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<uint32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) {
    return impl_->added[it->second].id;
  }
  return impl_->model.TokenToId(token);
}

std::string Tokenizer::IdToToken(uint32_t id) const {
  const std::string* s = impl_->TokenString(id);
  return s ? *s : std::string();
}

bool Tokenizer::IsSpecial(uint32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

const TokenizerInfo& Tokenizer::info() const { return impl_->info; }

// vLLM's incremental detokenization: decode a short window ending at the new token and emit what
// it adds to the window's already-emitted prefix, once it no longer ends in U+FFFD.
namespace {
constexpr size_t kInitialWindow = 5;

bool EndsWithReplacement(const std::string& s) {
  return s.size() >= 3 && std::string_view(s).substr(s.size() - 3) == tok::kReplacementChar;
}

// Whether Decode drops the id: unknown, or special when skipping those (as Impl::Decode decides).
bool DroppedByDecode(const Tokenizer::Impl& impl, uint32_t id, bool skip_special) {
  if (auto it = impl.added_by_id.find(id); it != impl.added_by_id.end()) {
    return skip_special && impl.added[it->second].special;
  }
  const std::string* s = impl.model.IdToToken(id);
  if (s == nullptr) return true;
  if (!skip_special) return false;
  auto c = impl.added_by_content.find(*s);
  return c != impl.added_by_content.end() && impl.added[c->second].special;
}
}  // namespace

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens,
                                       std::span<const uint32_t> prompt_ids)
    : tok_(tokenizer), skip_special_(skip_special_tokens), ids_(prompt_ids.begin(), prompt_ids.end()) {
  const Tokenizer::Impl& impl = *tok_.impl_;
  read_offset_ = ids_.size();
  prefix_offset_ = ids_.size() > kInitialWindow ? ids_.size() - kInitialWindow : 0;
  // The window starts at a token Decode keeps: one made only of dropped ids (unknown, skipped
  // specials) decodes to "", and a SentencePiece leading space after it would be stripped.
  auto prev_kept = [&](size_t i) -> std::optional<size_t> {
    while (i-- > 0) {
      if (!DroppedByDecode(impl, ids_[i], skip_special_)) return i;
    }
    return std::nullopt;
  };
  std::optional<size_t> first = prev_kept(ids_.size());
  if (!first) return;  // nothing visible in the prompt: the window's decode is "" either way
  // The first kept id at or after prefix_offset_, else the last kept one before it.
  for (size_t i = prefix_offset_; i < *first; ++i) {
    if (!DroppedByDecode(impl, ids_[i], skip_special_)) {
      first = i;
      break;
    }
  }
  // Never start the window inside a group of byte pieces: the group decodes as a unit (ids that
  // Decode drops between the pieces do not end it).
  while (impl.IsBytePiece(ids_[*first])) {
    std::optional<size_t> p = prev_kept(*first);
    if (!p || !impl.IsBytePiece(ids_[*p])) break;
    first = p;
  }
  prefix_offset_ = std::min(prefix_offset_, *first);
}

std::string IncrementalDecoder::Step(uint32_t id) {
  ids_.push_back(id);
  // Ids that Decode drops (unknown, or skipped specials) do not end a group of byte pieces.
  if (!DroppedByDecode(*tok_.impl_, id, skip_special_)) last_is_byte_piece_ = tok_.impl_->IsBytePiece(id);
  if (last_is_byte_piece_) return std::string();
  std::span<const uint32_t> all(ids_);
  std::string prefix_text = tok_.Decode(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_);
  std::string new_text = tok_.Decode(all.subspan(prefix_offset_), skip_special_);
  if (new_text.size() > prefix_text.size() && !EndsWithReplacement(new_text)) {
    prefix_offset_ = read_offset_;
    read_offset_ = ids_.size();
    return new_text.substr(prefix_text.size());
  }
  return std::string();
}

std::string IncrementalDecoder::Finish() {
  if (read_offset_ >= ids_.size()) return std::string();
  std::span<const uint32_t> all(ids_);
  std::string prefix_text = tok_.Decode(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_);
  std::string new_text = tok_.Decode(all.subspan(prefix_offset_), skip_special_);
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  if (new_text.size() > prefix_text.size()) return new_text.substr(prefix_text.size());
  return std::string();
}

}  // namespace dyn
