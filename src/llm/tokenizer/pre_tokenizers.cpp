// Pre-tokenizers: Split, ByteLevel, Metaspace, Digits, Whitespace, WhitespaceSplit, Punctuation,
// BertPreTokenizer, Sequence. Splitting follows HF's NormalizedString::split behaviours exactly.
#include <functional>

#include "llm/tokenizer/components.h"
#include "llm/tokenizer/text_util.h"

namespace dyn::tok {

namespace {

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Span {
  size_t b, e;
  bool match;
};

// Turns matches (sorted, non-overlapping) into spans covering all of [0, size).
void CoverWithSpans(size_t size, const std::vector<std::pair<size_t, size_t>>& matches, bool invert,
                    std::vector<Span>& spans) {
  spans.clear();
  size_t prev = 0;
  for (auto [b, e] : matches) {
    if (prev != b) spans.push_back({prev, b, invert});
    spans.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != size) spans.push_back({prev, size, invert});
}

// Applies `behavior` to the spans of `piece` and appends the resulting sub-pieces to `out`.
void EmitSplits(const Piece& piece, std::vector<Span>& spans, SplitBehavior behavior, std::vector<Piece>& out) {
  auto emit = [&](size_t b, size_t e) {
    if (e > b) out.push_back(Piece{piece.text.substr(b, e - b), piece.at_start && b == 0});
  };
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& s : spans) emit(s.b, s.e);
      return;
    case SplitBehavior::kRemoved:
      for (const auto& s : spans) {
        if (!s.match) emit(s.b, s.e);
      }
      return;
    case SplitBehavior::kContiguous:
    case SplitBehavior::kMergedWithPrevious: {
      std::vector<std::pair<size_t, size_t>> acc;
      bool previous_match = false;
      for (const auto& s : spans) {
        bool merge = behavior == SplitBehavior::kContiguous ? s.match == previous_match
                                                            : (s.match && !previous_match);
        if (merge && !acc.empty()) {
          acc.back().second = s.e;
        } else {
          acc.emplace_back(s.b, s.e);
        }
        previous_match = s.match;
      }
      for (auto [b, e] : acc) emit(b, e);
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      std::vector<std::pair<size_t, size_t>> acc;
      bool previous_match = false;
      for (size_t k = spans.size(); k-- > 0;) {
        const auto& s = spans[k];
        if (s.match && !previous_match && !acc.empty()) {
          acc.back().first = s.b;
        } else {
          acc.emplace_back(s.b, s.e);
        }
        previous_match = s.match;
      }
      for (size_t k = acc.size(); k-- > 0;) emit(acc[k].first, acc[k].second);
      return;
    }
  }
}

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    scratch.clear();
    std::vector<std::pair<size_t, size_t>> matches;
    std::vector<Span> spans;
    for (const auto& p : pieces) {
      matches.clear();
      pattern_->FindAll(p.text, matches);
      if (!invert_ && behavior_ == SplitBehavior::kIsolated && matches.size() == 1 && matches[0].first == 0 &&
          matches[0].second == p.text.size()) {
        scratch.push_back(p);  // the whole piece is one match
        continue;
      }
      CoverWithSpans(p.text.size(), matches, invert_, spans);
      EmitSplits(p, spans, behavior_, scratch);
    }
    pieces.swap(scratch);
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

// Splits on characters for which `pred` holds; each such character is one match.
class CharSplitPreTokenizer : public PreTokenizer {
 public:
  CharSplitPreTokenizer(std::function<bool(uint32_t)> pred, SplitBehavior behavior)
      : pred_(std::move(pred)), behavior_(behavior) {}
  void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    scratch.clear();
    std::vector<std::pair<size_t, size_t>> matches;
    std::vector<Span> spans;
    for (const auto& p : pieces) {
      matches.clear();
      size_t i = 0;
      while (i < p.text.size()) {
        size_t b = i;
        if (pred_(DecodeUtf8(p.text, i))) matches.emplace_back(b, i);
      }
      CoverWithSpans(p.text.size(), matches, false, spans);
      EmitSplits(p, spans, behavior_, scratch);
    }
    pieces.swap(scratch);
  }

 private:
  std::function<bool(uint32_t)> pred_;
  SplitBehavior behavior_;
};

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<PreTokenizer> regex_split)
      : add_prefix_space_(add_prefix_space), regex_split_(std::move(regex_split)) {}
  void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    if (add_prefix_space_) {
      for (auto& p : pieces) {
        if (p.text.empty() || p.text[0] != ' ') p.text.insert(0, 1, ' ');
      }
    }
    if (regex_split_) regex_split_->PreTokenize(pieces, scratch);
    const auto& chars = ByteLevelChars();
    std::string mapped;
    for (auto& p : pieces) {
      mapped.clear();
      for (unsigned char c : p.text) mapped.append(chars[c]);
      p.text.swap(mapped);
    }
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<PreTokenizer> regex_split_;
};

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  // prepend_scheme: 0 always, 1 first, 2 never.
  MetaspacePreTokenizer(std::string replacement, int prepend_scheme, bool split)
      : replacement_(std::move(replacement)), prepend_scheme_(prepend_scheme) {
    if (split) split_ = MakeSplitPreTokenizer(Pattern::Literal(replacement_), SplitBehavior::kMergedWithNext, false);
  }
  void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    for (auto& p : pieces) {
      std::string out;
      out.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ') {
          out.append(replacement_);
        } else {
          out.push_back(c);
        }
      }
      bool starts = out.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (prepend_scheme_ == 0 || (prepend_scheme_ == 1 && p.at_start))) out.insert(0, replacement_);
      p.text.swap(out);
    }
    if (split_) split_->PreTokenize(pieces, scratch);
  }

 private:
  std::string replacement_;
  int prepend_scheme_;
  std::unique_ptr<PreTokenizer> split_;
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void PreTokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    for (const auto& s : steps_) s->PreTokenize(pieces, scratch);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

Result<SplitBehavior> ParseBehavior(std::string_view name) {
  std::string n(name);
  for (auto& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (n == "removed") return SplitBehavior::kRemoved;
  if (n == "isolated") return SplitBehavior::kIsolated;
  if (n == "mergedwithprevious") return SplitBehavior::kMergedWithPrevious;
  if (n == "mergedwithnext") return SplitBehavior::kMergedWithNext;
  if (n == "contiguous") return SplitBehavior::kContiguous;
  return Status::Unsupported("unknown split behavior '" + std::string(name) + "'");
}

}  // namespace

std::unique_ptr<PreTokenizer> MakeSplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior,
                                                    bool invert) {
  return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert);
}

std::unique_ptr<PreTokenizer> MakeByteLevelPreTokenizer(bool add_prefix_space, bool use_regex) {
  std::unique_ptr<PreTokenizer> split;
  if (use_regex) {
    auto re = Pattern::Regex(kGpt2Regex);
    split = MakeSplitPreTokenizer(std::move(*re), SplitBehavior::kIsolated, false);
  }
  return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(split));
}

std::unique_ptr<PreTokenizer> MakeDigitsPreTokenizer(bool individual_digits) {
  return std::make_unique<CharSplitPreTokenizer>(
      IsNumeric, individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous);
}

std::unique_ptr<PreTokenizer> MakeMetaspacePreTokenizer(std::string replacement, int prepend_scheme, bool split) {
  return std::make_unique<MetaspacePreTokenizer>(std::move(replacement), prepend_scheme, split);
}

std::unique_ptr<PreTokenizer> MakeSequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps) {
  return std::make_unique<SequencePreTokenizer>(std::move(steps));
}

Result<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const boost::json::value& v) {
  if (v.is_null()) return std::unique_ptr<PreTokenizer>();
  if (!v.is_object()) return Status::InvalidArgument("pre_tokenizer must be an object");
  const auto& o = v.get_object();
  std::string type = JsonString(o, "type");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    const auto* list = JsonFind(o, "pretokenizers");
    if (list && list->is_array()) {
      for (const auto& s : list->get_array()) {
        DYN_ASSIGN_OR_RETURN(auto p, ParsePreTokenizer(s));
        if (p) steps.push_back(std::move(p));
      }
    }
    return MakeSequencePreTokenizer(std::move(steps));
  }
  if (type == "Split") {
    const auto* pat = JsonFind(o, "pattern");
    if (!pat) return Status::InvalidArgument("Split pre-tokenizer without pattern");
    DYN_ASSIGN_OR_RETURN(auto pattern, Pattern::FromJson(*pat));
    DYN_ASSIGN_OR_RETURN(auto behavior, ParseBehavior(JsonString(o, "behavior", "Isolated")));
    return MakeSplitPreTokenizer(std::move(pattern), behavior, JsonBool(o, "invert", false));
  }
  if (type == "ByteLevel") {
    return MakeByteLevelPreTokenizer(JsonBool(o, "add_prefix_space", true), JsonBool(o, "use_regex", true));
  }
  if (type == "Metaspace") {
    std::string replacement = JsonString(o, "replacement", "\xE2\x96\x81");
    int scheme = 0;
    std::string ps = JsonString(o, "prepend_scheme", "");
    if (ps.empty()) {
      scheme = JsonBool(o, "add_prefix_space", true) ? 0 : 2;
    } else if (ps == "always") {
      scheme = 0;
    } else if (ps == "first") {
      scheme = 1;
    } else if (ps == "never") {
      scheme = 2;
    } else {
      return Status::Unsupported("unknown Metaspace prepend_scheme '" + ps + "'");
    }
    return MakeMetaspacePreTokenizer(replacement, scheme, JsonBool(o, "split", true));
  }
  if (type == "Digits") return MakeDigitsPreTokenizer(JsonBool(o, "individual_digits", false));
  if (type == "Whitespace") {
    DYN_ASSIGN_OR_RETURN(auto re, Pattern::Regex(R"(\w+|[^\w\s]+)"));
    return MakeSplitPreTokenizer(std::move(re), SplitBehavior::kRemoved, true);
  }
  if (type == "WhitespaceSplit") {
    return std::unique_ptr<PreTokenizer>(new CharSplitPreTokenizer(IsWhitespace, SplitBehavior::kRemoved));
  }
  if (type == "Punctuation") {
    DYN_ASSIGN_OR_RETURN(auto behavior, ParseBehavior(JsonString(o, "behavior", "Isolated")));
    return std::unique_ptr<PreTokenizer>(new CharSplitPreTokenizer(IsPunctuation, behavior));
  }
  if (type == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    steps.emplace_back(new CharSplitPreTokenizer(IsWhitespace, SplitBehavior::kRemoved));
    steps.emplace_back(new CharSplitPreTokenizer(IsPunctuation, SplitBehavior::kIsolated));
    return MakeSequencePreTokenizer(std::move(steps));
  }
  return Status::Unsupported("unknown pre_tokenizer type '" + type + "'");
}

}  // namespace dyn::tok
