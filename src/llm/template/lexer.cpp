#include "llm/template/lexer.h"

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace dyn::tmpl {
namespace {

// Python's str.isspace() for the ASCII range plus the common Unicode spaces is more than chat
// templates need; jinja2's \s on ASCII text is what matters.
bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsNameChar(char c) { return IsNameStart(c) || IsDigit(c); }

std::string NormalizeNewlines(std::string_view source) {
  std::string out;
  out.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      out += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      out += source[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();  // keep_trailing_newline=False
  return out;
}

Status SyntaxError(const std::string& message, int line) {
  return Status::InvalidArgument("template syntax error: " + message + " (line " + std::to_string(line) + ")");
}

class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {}

  Result<std::vector<Token>> Run() {
    while (pos_ < src_.size()) {
      DYN_RETURN_IF_ERROR(RootStep());
    }
    Emit(TokenType::kEof, "");
    return std::move(tokens_);
  }

 private:
  void Emit(TokenType type, std::string value) { tokens_.push_back(Token{type, std::move(value), Line()}); }

  void EmitData(std::string_view text) {
    if (!text.empty()) Emit(TokenType::kData, std::string(text));
  }

  void Advance(size_t to) { pos_ = to; }

  // Line number at pos_, counted incrementally.
  int Line() {
    if (pos_ < counted_pos_) {
      counted_pos_ = 0;
      counted_line_ = 1;
    }
    while (counted_pos_ < pos_ && counted_pos_ < src_.size()) counted_line_ += src_[counted_pos_++] == '\n';
    return counted_line_;
  }

  // Applies the whitespace control of a tag opening to the text before it.
  std::string_view StripBefore(std::string_view text, char sign, bool is_variable) {
    if (sign == '-') {
      size_t end = text.size();
      while (end > 0 && IsSpace(text[end - 1])) --end;
      return text.substr(0, end);
    }
    if (sign != '+' && !is_variable) {  // lstrip_blocks
      size_t nl = text.rfind('\n');
      size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
      if ((l_pos > 0 || line_starting_) && l_pos < text.size()) {
        bool all_space = true;
        for (size_t i = l_pos; i < text.size(); ++i) all_space &= IsSpace(text[i]);
        if (all_space) return text.substr(0, l_pos);
      }
    }
    return text;
  }

  char SignAt(size_t p) const { return p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0; }

  // Matches `{%[-+]? \s* raw \s* (-%}\s* | %})` at p; returns the end or npos.
  size_t MatchRawBegin(size_t p) const {
    p += 2;
    if (SignAt(p)) ++p;
    while (p < src_.size() && IsSpace(src_[p])) ++p;
    if (src_.compare(p, 3, "raw") != 0) return std::string::npos;
    p += 3;
    while (p < src_.size() && IsSpace(src_[p])) ++p;
    if (src_.compare(p, 3, "-%}") == 0) {
      p += 3;
      while (p < src_.size() && IsSpace(src_[p])) ++p;
      return p;
    }
    if (src_.compare(p, 2, "%}") == 0) return p + 2;
    return std::string::npos;
  }

  // Consumes a tag end at pos_: `+END`, `-END\s*` or `END` plus one newline when `trim`.
  bool MatchEnd(const char* end, bool trim) {
    size_t n = std::strlen(end);
    size_t p = pos_;
    char sign = SignAt(p);
    if (sign) ++p;
    if (src_.compare(p, n, end) != 0) return false;
    p += n;
    if (sign == '-') {
      while (p < src_.size() && IsSpace(src_[p])) ++p;
    } else if (sign == 0 && trim && p < src_.size() && src_[p] == '\n') {
      ++p;
    }
    line_starting_ = p > 0 && src_[p - 1] == '\n';
    Advance(p);
    return true;
  }

  Status RootStep() {
    size_t p = pos_;
    while (true) {
      p = src_.find('{', p);
      if (p == std::string::npos || p + 1 >= src_.size()) {
        EmitData(std::string_view(src_).substr(pos_));
        pos_ = src_.size();
        return Status::Ok();
      }
      char next = src_[p + 1];
      if (next == '{' || next == '%' || next == '#') break;
      ++p;
    }
    std::string_view text = std::string_view(src_).substr(pos_, p - pos_);
    char kind = src_[p + 1];
    char sign = SignAt(p + 2);
    size_t raw_end = kind == '%' ? MatchRawBegin(p) : std::string::npos;
    EmitData(StripBefore(text, sign, kind == '{'));
    pos_ = p;
    if (raw_end != std::string::npos) {
      line_starting_ = src_[raw_end - 1] == '\n';
      Advance(raw_end);
      return LexRaw();
    }
    Advance(p + 2 + (sign ? 1 : 0));
    line_starting_ = false;
    if (kind == '#') return LexComment();
    return LexTag(kind == '{');
  }

  Status LexComment() {
    size_t q = src_.find("#}", pos_);
    if (q == std::string::npos) return SyntaxError("Missing end of comment tag", Line());
    size_t end_start = q;
    if (q > pos_ && (src_[q - 1] == '-' || src_[q - 1] == '+')) end_start = q - 1;
    Advance(end_start);
    MatchEnd("#}", /*trim=*/true);
    return Status::Ok();
  }

  Status LexRaw() {
    size_t p = pos_;
    while (true) {
      p = src_.find("{%", p);
      if (p == std::string::npos) return SyntaxError("Missing end of raw directive", Line());
      size_t q = p + 2;
      char sign = SignAt(q);
      if (sign) ++q;
      while (q < src_.size() && IsSpace(src_[q])) ++q;
      if (src_.compare(q, 6, "endraw") == 0) {
        q += 6;
        while (q < src_.size() && IsSpace(src_[q])) ++q;
        std::string stripped(StripBefore(std::string_view(src_).substr(pos_, p - pos_), sign, false));
        size_t saved_pos = pos_;
        pos_ = q;
        if (MatchEnd("%}", /*trim=*/true)) {
          EmitData(stripped);
          return Status::Ok();
        }
        pos_ = saved_pos;
      }
      p += 2;
    }
  }

  Status LexTag(bool is_variable) {
    Emit(is_variable ? TokenType::kVarBegin : TokenType::kBlockBegin, "");
    int balance = 0;
    const char* end = is_variable ? "}}" : "%}";
    while (true) {
      if (pos_ >= src_.size()) {
        return SyntaxError(std::string("unexpected end of template, expected '") + end + "'", Line());
      }
      if (balance == 0 && MatchEnd(end, /*trim=*/!is_variable)) {
        Emit(is_variable ? TokenType::kVarEnd : TokenType::kBlockEnd, "");
        return Status::Ok();
      }
      char c = src_[pos_];
      if (IsSpace(c)) {
        Advance(pos_ + 1);
        continue;
      }
      if (IsDigit(c)) {
        DYN_RETURN_IF_ERROR(LexNumber());
        continue;
      }
      if (IsNameStart(c)) {
        size_t q = pos_;
        while (q < src_.size() && IsNameChar(src_[q])) ++q;
        Emit(TokenType::kName, src_.substr(pos_, q - pos_));
        pos_ = q;
        continue;
      }
      if (c == '\'' || c == '"') {
        DYN_RETURN_IF_ERROR(LexString(c));
        continue;
      }
      static const char* kTwo[] = {"//", "**", "==", "!=", ">=", "<="};
      std::string op;
      for (const char* two : kTwo) {
        if (src_.compare(pos_, 2, two) == 0) op = two;
      }
      if (op.empty() && std::strchr("+-/*%~[](){}><=.:|,;", c)) op = std::string(1, c);
      if (op.empty()) return SyntaxError(std::string("unexpected char '") + c + "'", Line());
      if (op == "(" || op == "[" || op == "{") ++balance;
      if (op == ")" || op == "]" || op == "}") {
        if (balance == 0) return SyntaxError("unexpected '" + op + "'", Line());
        --balance;
      }
      Emit(TokenType::kOp, op);
      pos_ += op.size();
    }
  }

  Status LexNumber() {
    if (src_[pos_] == '0' && pos_ + 2 < src_.size() && std::strchr("xXoObB", src_[pos_ + 1])) {
      int base = std::strchr("xX", src_[pos_ + 1]) ? 16 : std::strchr("oO", src_[pos_ + 1]) ? 8 : 2;
      size_t q = pos_ + 2;
      std::string digits;
      while (q < src_.size() && (std::isxdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) {
        if (src_[q] != '_') digits += src_[q];
        ++q;
      }
      char* end = nullptr;
      errno = 0;
      long long value = std::strtoll(digits.c_str(), &end, base);
      if (digits.empty() || *end != '\0' || errno == ERANGE) return SyntaxError("invalid integer literal", Line());
      Token tok{TokenType::kInt, src_.substr(pos_, q - pos_), Line()};
      tok.int_value = value;
      tokens_.push_back(std::move(tok));
      pos_ = q;
      return Status::Ok();
    }
    size_t q = pos_;
    auto digits = [&](size_t& i) {
      size_t start = i;
      while (i < src_.size() && (IsDigit(src_[i]) || (src_[i] == '_' && i > start && i + 1 < src_.size() && IsDigit(src_[i + 1])))) ++i;
      return i > start;
    };
    bool after_dot = pos_ > 0 && src_[pos_ - 1] == '.';
    digits(q);
    bool is_float = false;
    size_t f = q;
    if (!after_dot && f + 1 < src_.size() && src_[f] == '.' && IsDigit(src_[f + 1])) {
      ++f;
      digits(f);
      is_float = true;
    }
    if (!after_dot && f < src_.size() && (src_[f] == 'e' || src_[f] == 'E')) {
      size_t e = f + 1;
      if (e < src_.size() && (src_[e] == '+' || src_[e] == '-')) ++e;
      if (digits(e)) {
        f = e;
        is_float = true;
      }
    }
    std::string text;
    size_t end = is_float ? f : q;
    for (size_t i = pos_; i < end; ++i) {
      if (src_[i] != '_') text += src_[i];
    }
    Token tok{is_float ? TokenType::kFloat : TokenType::kInt, text, Line()};
    if (is_float) {
      tok.float_value = std::strtod(text.c_str(), nullptr);
    } else {
      errno = 0;
      tok.int_value = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == ERANGE) return SyntaxError("integer literal too large", Line());
    }
    tokens_.push_back(std::move(tok));
    pos_ = end;
    return Status::Ok();
  }

  Status LexString(char quote) {
    std::string value;
    size_t q = pos_ + 1;
    int start_line = Line();
    while (true) {
      if (q >= src_.size()) return SyntaxError("unterminated string", start_line);
      char c = src_[q];
      if (c == quote) break;
      if (c != '\\') {
        value += c;
        ++q;
        continue;
      }
      if (q + 1 >= src_.size()) return SyntaxError("unterminated string", start_line);
      char e = src_[q + 1];
      q += 2;
      switch (e) {
        case 'n': value += '\n'; break;
        case 't': value += '\t'; break;
        case 'r': value += '\r'; break;
        case '\\': value += '\\'; break;
        case '\'': value += '\''; break;
        case '"': value += '"'; break;
        case 'a': value += '\a'; break;
        case 'b': value += '\b'; break;
        case 'f': value += '\f'; break;
        case 'v': value += '\v'; break;
        case '\n': break;
        case 'x': case 'u': case 'U': {
          size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (q + n > src_.size()) return SyntaxError("truncated \\" + std::string(1, e) + " escape", start_line);
          std::string hex = src_.substr(q, n);
          char* endp = nullptr;
          unsigned long cp = std::strtoul(hex.c_str(), &endp, 16);
          if (endp != hex.c_str() + n || cp > 0x10ffff) return SyntaxError("bad escape", start_line);
          q += n;
          AppendUtf8(static_cast<uint32_t>(cp), value);
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = e - '0';
            for (int k = 0; k < 2 && q < src_.size() && src_[q] >= '0' && src_[q] <= '7'; ++k) cp = cp * 8 + (src_[q++] - '0');
            AppendUtf8(cp, value);
          } else {
            value += '\\';
            value += e;
          }
      }
    }
    Emit(TokenType::kString, std::move(value));
    Advance(q + 1);
    tokens_.back().line = start_line;
    return Status::Ok();
  }

  static void AppendUtf8(uint32_t cp, std::string& out) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  std::string src_;
  size_t pos_ = 0;
  size_t counted_pos_ = 0;
  int counted_line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> tokens_;
};

}  // namespace

Result<std::vector<Token>> Tokenize(std::string_view source) {
  Lexer lexer(NormalizeNewlines(source));
  return lexer.Run();
}

}  // namespace dyn::tmpl
