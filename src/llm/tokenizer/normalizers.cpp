// Normalizers: NFC/NFD/NFKC/NFKD (utf8proc), Prepend, Replace, Lowercase, Strip, Sequence.
#include <utf8proc.h>

#include <cstdlib>

#include "llm/tokenizer/components.h"
#include "llm/tokenizer/text_util.h"

namespace dyn::tok {

namespace {

bool IsAscii(std::string_view s) {
  for (unsigned char c : s) {
    if (c >= 0x80) return false;
  }
  return true;
}

class UnicodeNormalizer : public Normalizer {
 public:
  explicit UnicodeNormalizer(int options) : options_(options) {}
  void Normalize(std::string& text) const override {
    if (IsAscii(text)) return;  // every normalization form leaves ASCII unchanged
    utf8proc_uint8_t* out = nullptr;
    auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                          static_cast<utf8proc_ssize_t>(text.size()), &out,
                          static_cast<utf8proc_option_t>(options_));
    if (n >= 0) text.assign(reinterpret_cast<char*>(out), static_cast<size_t>(n));
    std::free(out);
  }

 private:
  int options_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  void Normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prepend_);
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Normalize(std::string& text) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    pattern_->FindAll(text, matches);
    if (matches.empty()) return;
    std::string out;
    out.reserve(text.size() + matches.size() * content_.size());
    size_t prev = 0;
    for (auto [b, e] : matches) {
      out.append(text, prev, b - prev);
      out.append(content_);
      prev = e;
    }
    out.append(text, prev, std::string::npos);
    text.swap(out);
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

class LowercaseNormalizer : public Normalizer {
 public:
  void Normalize(std::string& text) const override {
    std::string out;
    out.reserve(text.size());
    size_t i = 0;
    while (i < text.size()) {
      uint32_t cp = DecodeUtf8(text, i);
      if (cp == 0x130) {  // Rust lowercases İ to "i̇" (two code points)
        out.append("i\xCC\x87");
        continue;
      }
      AppendUtf8(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
    }
    text.swap(out);
  }
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void Normalize(std::string& text) const override {
    size_t b = 0, e = text.size();
    if (left_) {
      while (b < e) {
        size_t i = b;
        if (!IsWhitespace(DecodeUtf8(text, i))) break;
        b = i;
      }
    }
    if (right_) {
      while (e > b) {
        size_t s = e - 1;
        while (s > b && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
        size_t i = s;
        if (!IsWhitespace(DecodeUtf8(text, i))) break;
        e = s;
      }
    }
    text = text.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  void Normalize(std::string& text) const override {
    for (const auto& s : steps_) s->Normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

Result<std::unique_ptr<Normalizer>> ParseNormalizer(const boost::json::value& v) {
  if (v.is_null()) return std::unique_ptr<Normalizer>();
  if (!v.is_object()) return Status::InvalidArgument("normalizer must be an object");
  const auto& o = v.get_object();
  std::string type = JsonString(o, "type");
  if (type == "NFC") return std::unique_ptr<Normalizer>(new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (type == "NFD") return std::unique_ptr<Normalizer>(new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE));
  if (type == "NFKC") {
    return std::unique_ptr<Normalizer>(new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
  }
  if (type == "NFKD") {
    return std::unique_ptr<Normalizer>(
        new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  }
  if (type == "Prepend") return std::unique_ptr<Normalizer>(new PrependNormalizer(JsonString(o, "prepend")));
  if (type == "Replace") {
    const auto* pat = JsonFind(o, "pattern");
    if (!pat) return Status::InvalidArgument("Replace normalizer without pattern");
    DYN_ASSIGN_OR_RETURN(auto pattern, Pattern::FromJson(*pat));
    return std::unique_ptr<Normalizer>(new ReplaceNormalizer(std::move(pattern), JsonString(o, "content")));
  }
  if (type == "Lowercase") return std::unique_ptr<Normalizer>(new LowercaseNormalizer());
  if (type == "Strip") {
    return std::unique_ptr<Normalizer>(
        new StripNormalizer(JsonBool(o, "strip_left", true), JsonBool(o, "strip_right", true)));
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> steps;
    const auto* list = JsonFind(o, "normalizers");
    if (list && list->is_array()) {
      for (const auto& s : list->get_array()) {
        DYN_ASSIGN_OR_RETURN(auto n, ParseNormalizer(s));
        if (n) steps.push_back(std::move(n));
      }
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(steps)));
  }
  return Status::Unsupported("unknown normalizer type '" + type + "'");
}

}  // namespace dyn::tok
