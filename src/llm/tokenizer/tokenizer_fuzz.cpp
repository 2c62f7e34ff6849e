// Fuzz target for Tokenizer::Encode/Decode and IncrementalDecoder over real vocabularies. Built as
// a libFuzzer target with DYN_FUZZ (clang), and as a plain replay program otherwise.
//
// Input: byte 0 picks the tokenizer (low 3 bits, modulo the number loaded), add_special_tokens
// (bit 3), skip_special_tokens (bit 4) and where the prompt/generated split falls for the
// incremental decoder (bits 5-7, in eighths). The remaining bytes are both the text to encode (any
// bytes, invalid UTF-8 included) and, read 3 bytes at a time, token ids to decode (modulo
// vocab_size + 4, so a few are out of range; a 0xFF high byte gives a huge id).
//
// Invariants (each violation prints what differed and aborts, so libFuzzer saves the input):
//  * Encode returns ids < vocab_size; with add_special_tokens it is the plain encoding wrapped in
//    BOS/EOS exactly as info().add_bos/add_eos say.
//  * Decode always returns valid UTF-8, drops unknown ids (same text as with them filtered out).
//  * IncrementalDecoder: the concatenated Step()/Finish() output equals one-shot Decode; with the
//    prompt as context it equals Decode(prompt + generated) minus Decode(prompt) whenever the
//    latter is a prefix of the former (the property documented in tokenizer.h).
//  * Round trip Decode(Encode(text, false), false) == text for valid UTF-8 text, only where that
//    holds in HF too: byte-level BPE without a normalizer (when every byte of the text has its
//    byte-level token in the vocabulary), with NFC (also when the text is already NFC), SentencePiece-style byte fallback (when the text has no U+2581 and encodes to
//    no added token, since each segment around an added token gets its own "▁" prefix).
//
// Tokenizers come from DYN_FUZZ_TOKENIZERS, a ':'-separated list of `mode=path` (path: a directory
// with tokenizer.json, or a .gguf file; mode: bytelevel, nfc, spm or none, which round trip to
// check), else from the defaults below, relative to the repository root (the working directory).
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <utf8proc.h>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/text_util.h"
#include "llm/tokenizer/tokenizer.h"

namespace {

enum class RoundTrip { kNone, kByteLevel, kNfc, kSentencePiece };

struct Loaded {
  std::string name;
  RoundTrip mode = RoundTrip::kNone;
  std::unique_ptr<dyn::GgufFile> gguf;  // kept alive beside a GGUF tokenizer
  std::unique_ptr<dyn::Tokenizer> tok;
  // Bytes whose byte-level character is not in the vocabulary: with no unk token BPE drops them,
  // in HF too (SmolLM2's GGUF lacks 21, e.g. 0x14 and 0xF1), so a round trip cannot hold.
  std::array<bool, 256> byte_missing{};
};

// Byte-level BPE (no normalizer, NFC), SentencePiece byte fallback, and a GGUF "gpt2" vocabulary.
constexpr const char* kDefaultTokenizers =
    "bytelevel=../shared/tokenizers/gpt2:"
    "nfc=../shared/tokenizers/qwen3:"
    "spm=../shared/models/stories260K/hf:"
    "spm=../shared/tokenizers/mistral-7b-v0.1:"
    "bytelevel=models/SmolLM2-135M-Instruct.Q4_1.gguf";

std::vector<Loaded> LoadAll() {
  const char* env = std::getenv("DYN_FUZZ_TOKENIZERS");
  std::string spec = env && *env ? env : kDefaultTokenizers;
  std::vector<Loaded> out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(':', start);
    if (end == std::string::npos) end = spec.size();
    std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    Loaded l;
    std::string path = item;
    if (size_t eq = item.find('='); eq != std::string::npos) {
      std::string mode = item.substr(0, eq);
      path = item.substr(eq + 1);
      if (mode == "bytelevel") l.mode = RoundTrip::kByteLevel;
      else if (mode == "nfc") l.mode = RoundTrip::kNfc;
      else if (mode == "spm") l.mode = RoundTrip::kSentencePiece;
    }
    l.name = path;
    dyn::Result<std::unique_ptr<dyn::Tokenizer>> tok = dyn::Status::NotFound("unset");
    if (path.size() > 5 && path.ends_with(".gguf")) {
      if (!dyn::FileExists(path)) {
        std::fprintf(stderr, "tokenizer_fuzz: skipping absent %s\n", path.c_str());
        continue;
      }
      auto g = dyn::GgufFile::Open(path);
      if (!g.ok()) {
        std::fprintf(stderr, "tokenizer_fuzz: %s: %s\n", path.c_str(), g.status().ToString().c_str());
        std::abort();
      }
      l.gguf = std::move(*g);
      tok = dyn::Tokenizer::FromGguf(*l.gguf);
    } else {
      if (!dyn::FileExists(path + "/tokenizer.json")) {
        std::fprintf(stderr, "tokenizer_fuzz: skipping absent %s\n", path.c_str());
        continue;
      }
      tok = dyn::Tokenizer::FromDirectory(path);
    }
    if (!tok.ok()) {
      std::fprintf(stderr, "tokenizer_fuzz: %s: %s\n", path.c_str(), tok.status().ToString().c_str());
      std::abort();
    }
    l.tok = std::move(*tok);
    const std::array<std::string, 256>& chars = dyn::tok::ByteLevelChars();
    for (int b = 0; b < 256; ++b) l.byte_missing[b] = !l.tok->TokenToId(chars[b]).has_value();
    out.push_back(std::move(l));
  }
  if (out.empty()) {
    // Fuzzing nothing would pass silently; make a missing data directory loud instead.
    std::fprintf(stderr, "tokenizer_fuzz: no tokenizer loaded (set DYN_FUZZ_TOKENIZERS)\n");
    std::abort();
  }
  return out;
}

const std::vector<Loaded>& Tokenizers() {
  static const std::vector<Loaded>* all = new std::vector<Loaded>(LoadAll());
  return *all;
}

// Strict UTF-8 check written here rather than shared with the tokenizer, so it checks the
// tokenizer's own repair instead of agreeing with it (no overlongs, surrogates or > U+10FFFF).
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated sequence
    for (size_t k = 1; k <= n; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

bool IsNfc(std::string_view s) {
  std::string z(s);  // utf8proc wants NUL-terminated input; an embedded NUL just ends it early
  if (z.find('\0') != std::string::npos) return false;
  utf8proc_uint8_t* nfc = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(z.c_str()));
  if (!nfc) return false;
  bool same = z == reinterpret_cast<const char*>(nfc);
  std::free(nfc);
  return same;
}

std::string Ids(std::span<const uint32_t> ids) {
  std::string s;
  for (uint32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

// Prints both sides in escaped form and aborts; libFuzzer then writes the input as crash-*.
[[noreturn]] void Fail(const Loaded& t, const char* what, std::string_view got, std::string_view want,
                       std::span<const uint32_t> ids) {
  auto esc = [](std::string_view s) {
    std::string o;
    for (unsigned char c : s) {
      if (c >= 0x20 && c < 0x7F && c != '\\') {
        o += static_cast<char>(c);
      } else {
        char b[8];
        std::snprintf(b, sizeof(b), "\\x%02X", c);
        o += b;
      }
    }
    return o;
  };
  std::fprintf(stderr, "tokenizer_fuzz: %s violated for %s\n  got:  \"%s\"\n  want: \"%s\"\n  ids:  %s\n", what,
               t.name.c_str(), esc(got).c_str(), esc(want).c_str(), Ids(ids).c_str());
  std::abort();
}

void CheckEncode(const Loaded& t, std::string_view text, bool add_special) {
  const dyn::Tokenizer& tok = *t.tok;
  std::vector<uint32_t> plain = tok.Encode(text, false);
  for (uint32_t id : plain) {
    if (id >= tok.vocab_size()) Fail(t, "encode id < vocab_size", std::to_string(id), "", plain);
  }
  if (add_special) {
    std::vector<uint32_t> wrapped = tok.Encode(text, true);
    const dyn::TokenizerInfo& info = tok.info();
    std::vector<uint32_t> want;
    if (info.add_bos && info.bos_id) want.push_back(*info.bos_id);
    want.insert(want.end(), plain.begin(), plain.end());
    if (info.add_eos && info.eos_id) want.push_back(*info.eos_id);
    if (wrapped != want) Fail(t, "encode(add_special) == BOS + encode + EOS", Ids(wrapped), Ids(want), plain);
  }
  std::string decoded = tok.Decode(plain, false);
  if (!ValidUtf8(decoded)) Fail(t, "decode is valid UTF-8", decoded, "", plain);
  if (!ValidUtf8(text)) return;
  bool check = false;
  switch (t.mode) {
    case RoundTrip::kNone:
      break;
    case RoundTrip::kByteLevel:
      check = true;
      for (unsigned char c : text) check = check && !t.byte_missing[c];
      break;
    case RoundTrip::kNfc:
      check = IsNfc(text);
      for (unsigned char c : text) check = check && !t.byte_missing[c];
      break;
    case RoundTrip::kSentencePiece: {
      check = text.find("\xE2\x96\x81") == std::string_view::npos;
      for (uint32_t id : plain) check = check && !tok.IsSpecial(id);
      break;
    }
  }
  if (check && decoded != text) Fail(t, "decode(encode(text)) == text", decoded, text, plain);
}

void CheckDecode(const Loaded& t, std::span<const uint32_t> ids, bool skip_special, size_t prompt_len) {
  const dyn::Tokenizer& tok = *t.tok;
  std::string once = tok.Decode(ids, skip_special);
  if (!ValidUtf8(once)) Fail(t, "decode is valid UTF-8", once, "", ids);
  std::vector<uint32_t> known;
  for (uint32_t id : ids) {
    if (id < tok.vocab_size()) known.push_back(id);
  }
  if (std::string k = tok.Decode(known, skip_special); k != once) {
    Fail(t, "decode drops unknown ids", once, k, ids);
  }

  dyn::IncrementalDecoder inc(tok, skip_special);
  std::string streamed;
  for (uint32_t id : ids) streamed += inc.Step(id);
  streamed += inc.Finish();
  if (streamed != once) Fail(t, "incremental == one-shot decode", streamed, once, ids);

  std::span<const uint32_t> prompt = ids.first(prompt_len);
  std::string prompt_text = tok.Decode(prompt, skip_special);
  if (once.starts_with(prompt_text)) {
    dyn::IncrementalDecoder ctx(tok, skip_special, prompt);
    std::string gen;
    for (uint32_t id : ids.subspan(prompt_len)) gen += ctx.Step(id);
    gen += ctx.Finish();
    if (gen != once.substr(prompt_text.size())) {
      Fail(t, "incremental with prompt == decode(all) - decode(prompt)", gen, once.substr(prompt_text.size()), ids);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::vector<Loaded>& all = Tokenizers();
  const Loaded& t = all[(data[0] & 7) % all.size()];
  bool add_special = data[0] & 8;
  bool skip_special = data[0] & 16;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  CheckEncode(t, text, add_special);

  std::vector<uint32_t> ids;
  const uint32_t vocab = t.tok->vocab_size();
  for (size_t i = 1; i + 3 <= size; i += 3) {
    uint32_t v = data[i] | (uint32_t{data[i + 1]} << 8) | (uint32_t{data[i + 2]} << 16);
    ids.push_back(data[i + 2] == 0xFF ? 0xFFFFFFFFu - data[i] : v % (vocab + 4));
  }
  size_t prompt_len = ids.size() * (data[0] >> 5) / 8;
  CheckDecode(t, ids, skip_special, prompt_len);
  return 0;
}

#ifdef DYN_TOKENIZER_FUZZ_MAIN
#include "base/fuzz_replay.h"

int main(int argc, char** argv) {
  const int rc = dyn::ReplayFuzzInputs(argc, argv);
  if (rc == 0) std::printf("replayed %d inputs over %zu tokenizers\n", argc - 1, Tokenizers().size());
  return rc;
}
#endif
