// UTF-8 and Unicode helpers shared by the tokenizer's components (private to src/llm/tokenizer).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dyn::tok {

// Length of the UTF-8 sequence that starts with `lead` (1 for bytes that cannot start one).
inline size_t Utf8SeqLen(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

// Decodes the code point at s[i] and advances i. Requires valid UTF-8.
uint32_t DecodeUtf8(std::string_view s, size_t& i);
void AppendUtf8(std::string& out, uint32_t cp);
bool IsValidUtf8(std::string_view s);
// As Rust's String::from_utf8_lossy (and Python's errors="replace"): each maximal invalid
// subpart becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);
inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

bool IsWhitespace(uint32_t cp);    // Rust char::is_whitespace (White_Space property)
bool IsNumeric(uint32_t cp);       // Rust char::is_numeric (general category N*)
bool IsAlphanumeric(uint32_t cp);  // letters and numbers
bool IsPunctuation(uint32_t cp);   // ASCII punctuation or general category P*

// GPT-2's byte <-> printable-character table (bytes_to_unicode).
const std::array<std::string, 256>& ByteLevelChars();
// The byte a byte-level character stands for, or -1 when it is not in the alphabet.
int ByteLevelByte(uint32_t cp);

}  // namespace dyn::tok
