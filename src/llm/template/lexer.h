// Template lexer (private header): source text -> tokens, applying jinja2's whitespace rules
// as transformers configures them (trim_blocks, lstrip_blocks, no trailing newline kept).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace dyn::tmpl {

enum class TokenType : uint8_t {
  kData,        // literal template text (already whitespace-processed)
  kVarBegin,    // {{
  kVarEnd,      // }}
  kBlockBegin,  // {%
  kBlockEnd,    // %}
  kName,        // identifiers and keywords
  kString,      // value is unescaped
  kInt,
  kFloat,
  kOp,          // value is the operator text
  kEof,
};

struct Token {
  TokenType type;
  std::string value;
  int line;
  int64_t int_value = 0;
  double float_value = 0;
};

// Tokenizes `source`. Errors (unterminated tags, bad characters) carry the line number.
Result<std::vector<Token>> Tokenize(std::string_view source);

}  // namespace dyn::tmpl
