// Decoders: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence, as HF's decode_chain.
#include "llm/tokenizer/components.h"
#include "llm/tokenizer/text_util.h"

namespace dyn::tok {

namespace {

class ByteLevelDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      size_t mark = bytes.size();
      size_t i = 0;
      bool all_mapped = true;
      while (i < t.size()) {
        int b = ByteLevelByte(DecodeUtf8(t, i));
        if (b < 0) {
          all_mapped = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      if (!all_mapped) {  // a token outside the byte alphabet (an added token) is taken as is
        bytes.resize(mark);
        bytes.append(t);
      }
    }
    tokens.assign(1, Utf8Lossy(bytes));
  }
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first) : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  void DecodeChain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      std::string out;
      const std::string& t = tokens[k];
      size_t pos = 0, hit;
      while ((hit = t.find(replacement_, pos)) != std::string::npos) {
        out.append(t, pos, hit - pos);
        if (!(k == 0 && strip_first_)) out.push_back(' ');
        pos = hit + replacement_.size();
      }
      out.append(t, pos, std::string::npos);
      tokens[k].swap(out);
    }
  }

 private:
  std::string replacement_;
  bool strip_first_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    for (auto& t : tokens) {
      matches.clear();
      pattern_->FindAll(t, matches);
      if (matches.empty()) continue;
      std::string out;
      size_t prev = 0;
      for (auto [b, e] : matches) {
        out.append(t, prev, b - prev);
        out.append(content_);
        prev = e;
      }
      out.append(t, prev, std::string::npos);
      t.swap(out);
    }
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class ByteFallbackDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back(kReplacementChar);
      }
      pending.clear();
    };
    for (auto& t : tokens) {
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        int hi = HexValue(t[3]), lo = HexValue(t[4]);
        if (hi >= 0 && lo >= 0) {
          pending.push_back(static_cast<char>(hi * 16 + lo));
          continue;
        }
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    tokens.swap(out);
  }
};

class FuseDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(uint32_t content, size_t start, size_t stop) : content_(content), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, uint32_t>> chars;  // byte offset, code point
      size_t i = 0;
      while (i < t.size()) {
        size_t b = i;
        chars.emplace_back(b, DecodeUtf8(t, i));
      }
      size_t start_cut = 0;
      for (size_t k = 0; k < start_ && k < chars.size(); ++k) {
        if (chars[k].second != content_) break;
        start_cut = k + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t k = 0; k < stop_ && k < chars.size(); ++k) {
        size_t idx = chars.size() - k - 1;
        if (chars[idx].second != content_) break;
        stop_cut = idx;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      size_t b = start_cut < chars.size() ? chars[start_cut].first : t.size();
      size_t e = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(b, e - b);
    }
  }

 private:
  uint32_t content_;
  size_t start_, stop_;
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  void DecodeChain(std::vector<std::string>& tokens) const override {
    for (const auto& s : steps_) s->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

}  // namespace

std::unique_ptr<Decoder> MakeByteLevelDecoder() { return std::make_unique<ByteLevelDecoder>(); }

std::unique_ptr<Decoder> MakeSentencePieceDecoder(bool strip_leading_space) {
  std::vector<std::unique_ptr<Decoder>> steps;
  steps.push_back(std::make_unique<ReplaceDecoder>(Pattern::Literal("\xE2\x96\x81"), " "));
  steps.push_back(std::make_unique<ByteFallbackDecoder>());
  steps.push_back(std::make_unique<FuseDecoder>());
  if (strip_leading_space) steps.push_back(std::make_unique<StripDecoder>(' ', 1, 0));
  return std::make_unique<SequenceDecoder>(std::move(steps));
}

Result<std::unique_ptr<Decoder>> ParseDecoder(const boost::json::value& v) {
  if (v.is_null()) return std::unique_ptr<Decoder>();
  if (!v.is_object()) return Status::InvalidArgument("decoder must be an object");
  const auto& o = v.get_object();
  std::string type = JsonString(o, "type");
  if (type == "ByteLevel") return MakeByteLevelDecoder();
  if (type == "Metaspace") {
    std::string ps = JsonString(o, "prepend_scheme", "");
    bool strip_first = ps.empty() ? JsonBool(o, "add_prefix_space", true) : ps != "never";
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(JsonString(o, "replacement", "\xE2\x96\x81"), strip_first));
  }
  if (type == "Replace") {
    const auto* pat = JsonFind(o, "pattern");
    if (!pat) return Status::InvalidArgument("Replace decoder without pattern");
    DYN_ASSIGN_OR_RETURN(auto pattern, Pattern::FromJson(*pat));
    return std::unique_ptr<Decoder>(new ReplaceDecoder(std::move(pattern), JsonString(o, "content")));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    std::string content = JsonString(o, "content", " ");
    size_t i = 0;
    uint32_t cp = content.empty() ? ' ' : DecodeUtf8(content, i);
    return std::unique_ptr<Decoder>(new StripDecoder(cp, static_cast<size_t>(JsonInt(o, "start", 0)),
                                                     static_cast<size_t>(JsonInt(o, "stop", 0))));
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> steps;
    const auto* list = JsonFind(o, "decoders");
    if (list && list->is_array()) {
      for (const auto& s : list->get_array()) {
        DYN_ASSIGN_OR_RETURN(auto d, ParseDecoder(s));
        if (d) steps.push_back(std::move(d));
      }
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(steps)));
  }
  return Status::Unsupported("unknown decoder type '" + type + "'");
}

}  // namespace dyn::tok
