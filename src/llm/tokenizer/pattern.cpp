// Pattern (PCRE2 regex or literal) and the JSON accessors shared by the component parsers.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "llm/tokenizer/components.h"

namespace dyn::tok {

namespace {

// One match-data block per thread: patterns are shared across threads, match data cannot be.
pcre2_match_data* ThreadMatchData() {
  struct Holder {
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    ~Holder() { pcre2_match_data_free(md); }
  };
  thread_local Holder holder;
  return holder.md;
}

}  // namespace

Result<std::unique_ptr<Pattern>> Pattern::Regex(std::string_view regex) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(regex.data()), regex.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &err_off, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    return Status::InvalidArgument("bad regex '" + std::string(regex) + "' at " + std::to_string(err_off) + ": " +
                                   reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  std::unique_ptr<Pattern> p(new Pattern());
  p->code_ = code;
  return p;
}

std::unique_ptr<Pattern> Pattern::Literal(std::string_view literal) {
  std::unique_ptr<Pattern> p(new Pattern());
  p->literal_ = std::string(literal);
  return p;
}

Result<std::unique_ptr<Pattern>> Pattern::FromJson(const boost::json::value& v) {
  if (!v.is_object()) return Status::InvalidArgument("pattern must be an object");
  const auto& o = v.get_object();
  if (const auto* s = JsonFind(o, "String"); s && s->is_string()) return Literal(std::string_view(s->get_string()));
  if (const auto* r = JsonFind(o, "Regex"); r && r->is_string()) return Regex(std::string_view(r->get_string()));
  return Status::InvalidArgument("pattern needs a String or Regex");
}

Pattern::~Pattern() {
  if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
}

void Pattern::FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  if (code_ == nullptr) {
    if (literal_.empty()) return;
    size_t pos = 0;
    while ((pos = text.find(literal_, pos)) != std::string_view::npos) {
      out.emplace_back(pos, pos + literal_.size());
      pos += literal_.size();
    }
    return;
  }
  auto* code = static_cast<pcre2_code*>(code_);
  pcre2_match_data* md = ThreadMatchData();
  auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start <= text.size()) {
    int rc = pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0) break;
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (e > b) {
      out.emplace_back(b, e);
      start = e;
    } else {
      // An empty match yields nothing; step over one character.
      if (b >= text.size()) break;
      start = b + 1;
      while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) ++start;
    }
  }
}

const boost::json::value* JsonFind(const boost::json::object& o, std::string_view key) {
  auto it = o.find(key);
  return it == o.end() ? nullptr : &it->value();
}

std::string JsonString(const boost::json::object& o, std::string_view key, std::string_view dflt) {
  const auto* v = JsonFind(o, key);
  return v && v->is_string() ? std::string(v->get_string()) : std::string(dflt);
}

bool JsonBool(const boost::json::object& o, std::string_view key, bool dflt) {
  const auto* v = JsonFind(o, key);
  return v && v->is_bool() ? v->get_bool() : dflt;
}

int64_t JsonInt(const boost::json::object& o, std::string_view key, int64_t dflt) {
  const auto* v = JsonFind(o, key);
  if (v && v->is_int64()) return v->get_int64();
  if (v && v->is_uint64()) return static_cast<int64_t>(v->get_uint64());
  return dflt;
}

}  // namespace dyn::tok
