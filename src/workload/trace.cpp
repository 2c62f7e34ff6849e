#include "workload/trace.h"

#include <algorithm>
#include <boost/json.hpp>
#include <charconv>
#include <cmath>
#include <string_view>
#include <unordered_set>

#include "base/file.h"

namespace dyn::workload {
namespace {

namespace json = boost::json;

// splitmix64 finalizer: a stateless, well-mixed 64-bit hash, so token i of a block is a pure
// function of (seed, block key, i) and prompts never depend on generation order.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Keys of the two kinds of blocks never collide: hash-id blocks and request-unique filler differ
// in a domain tag mixed in before the key.
constexpr uint64_t kHashIdDomain = 0x68617368'69640000ULL;  // "hashid"
constexpr uint64_t kUniqueDomain = 0x756e6971'75650000ULL;  // "unique"

uint32_t TokenOf(uint64_t domain, uint64_t key, uint64_t index, const PromptSynthesis& synth) {
  const uint64_t span = synth.vocab_size > synth.first_token ? synth.vocab_size - synth.first_token : 1;
  const uint64_t h = Mix(Mix(Mix(synth.seed ^ domain) ^ key) + index);
  return synth.first_token + static_cast<uint32_t>(h % span);
}

std::string LineError(const std::string& path, size_t line, std::string_view what) {
  return path + ":" + std::to_string(line) + ": " + std::string(what);
}

// Splits `text` into lines (LF or CRLF; a last line without newline counts).
template <class Fn>
Status ForEachLine(std::string_view text, Fn&& fn) {
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    ++line_no;
    DYN_RETURN_IF_ERROR(fn(line_no, line));
    pos = end + 1;
  }
  return Status::Ok();
}

// "\"key\"" built by appending: GCC 12 warns (-Wrestrict, a false positive) on "literal" + string.
std::string Quoted(std::string_view key) {
  std::string q;
  q.reserve(key.size() + 2);
  q += '"';
  q.append(key);
  q += '"';
  return q;
}

Result<double> JsonNumber(const json::object& obj, std::string_view key) {
  const json::value* v = obj.if_contains(key);
  if (v == nullptr) return Status::InvalidArgument("missing " + Quoted(key));
  if (v->is_int64()) return static_cast<double>(v->get_int64());
  if (v->is_uint64()) return static_cast<double>(v->get_uint64());
  if (v->is_double()) return v->get_double();
  return Status::InvalidArgument(Quoted(key) + " is not a number");
}

Result<int> JsonCount(const json::object& obj, std::string_view key) {
  DYN_ASSIGN_OR_RETURN(double d, JsonNumber(obj, key));
  if (d < 0 || d > 1e9 || d != std::floor(d)) {
    return Status::InvalidArgument(Quoted(key) + " is not a count");
  }
  return static_cast<int>(d);
}

Result<TraceRequest> ParseMooncakeLine(std::string_view line) {
  boost::system::error_code ec;
  json::value v = json::parse(line, ec);
  if (ec) return Status::InvalidArgument("bad JSON: " + ec.message());
  if (!v.is_object()) return Status::InvalidArgument("not a JSON object");
  const json::object& obj = v.get_object();
  TraceRequest r;
  DYN_ASSIGN_OR_RETURN(r.arrival_ms, JsonNumber(obj, "timestamp"));
  DYN_ASSIGN_OR_RETURN(r.input_length, JsonCount(obj, "input_length"));
  DYN_ASSIGN_OR_RETURN(r.output_length, JsonCount(obj, "output_length"));
  if (const json::value* ids = obj.if_contains("hash_ids")) {
    if (!ids->is_array()) return Status::InvalidArgument("\"hash_ids\" is not an array");
    r.hash_ids.reserve(ids->get_array().size());
    for (const json::value& id : ids->get_array()) {
      if (id.is_uint64()) {
        r.hash_ids.push_back(id.get_uint64());
      } else if (id.is_int64() && id.get_int64() >= 0) {
        r.hash_ids.push_back(static_cast<uint64_t>(id.get_int64()));
      } else {
        return Status::InvalidArgument("\"hash_ids\" holds a non-integer");
      }
    }
  }
  return r;
}

// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
int64_t DaysFromCivil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

template <class T>
bool ParseInt(std::string_view s, T& out) {
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

// Whole seconds since the epoch and the fraction of a second, kept apart so that ms differences
// keep sub-microsecond precision (epoch ms in one double would round to ~0.2 us).
struct CivilTime {
  int64_t seconds = 0;
  double fraction = 0;
  double MsSince(const CivilTime& start) const {
    return static_cast<double>(seconds - start.seconds) * 1000.0 + (fraction - start.fraction) * 1000.0;
  }
};

// "2023-11-16 18:17:03.9799600" (any number of fractional digits, or none).
Result<CivilTime> ParseAzureTimestamp(std::string_view s) {
  int64_t year = 0;
  unsigned month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (s.size() < 19 || s[4] != '-' || s[7] != '-' || (s[10] != ' ' && s[10] != 'T') || s[13] != ':' ||
      s[16] != ':' || !ParseInt(s.substr(0, 4), year) || !ParseInt(s.substr(5, 2), month) ||
      !ParseInt(s.substr(8, 2), day) || !ParseInt(s.substr(11, 2), hour) || !ParseInt(s.substr(14, 2), minute) ||
      !ParseInt(s.substr(17, 2), second) || month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 ||
      minute > 59 || second > 60) {
    return Status::InvalidArgument("bad timestamp \"" + std::string(s) + "\"");
  }
  double frac = 0;
  if (s.size() > 19) {
    std::string_view digits = s.substr(20);
    if (s[19] != '.' || digits.empty() || digits.size() > 12) {
      return Status::InvalidArgument("bad timestamp \"" + std::string(s) + "\"");
    }
    uint64_t n = 0;
    if (!ParseInt(digits, n)) return Status::InvalidArgument("bad timestamp \"" + std::string(s) + "\"");
    frac = static_cast<double>(n) / std::pow(10.0, static_cast<double>(digits.size()));
  }
  return CivilTime{DaysFromCivil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second, frac};
}

std::vector<std::string_view> SplitCsv(std::string_view line) {
  std::vector<std::string_view> out;
  size_t pos = 0;
  while (true) {
    size_t comma = line.find(',', pos);
    out.push_back(line.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos));
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  for (auto& f : out) {
    while (!f.empty() && (f.front() == ' ' || f.front() == '"')) f.remove_prefix(1);
    while (!f.empty() && (f.back() == ' ' || f.back() == '"')) f.remove_suffix(1);
  }
  return out;
}

}  // namespace

Result<std::vector<TraceRequest>> LoadMooncakeTrace(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::vector<TraceRequest> out;
  Status st = ForEachLine(text, [&](size_t line_no, std::string_view line) -> Status {
    if (line.find_first_not_of(" \t") == std::string_view::npos) return Status::Ok();
    Result<TraceRequest> r = ParseMooncakeLine(line);
    if (!r.ok()) return Status::InvalidArgument(LineError(path, line_no, r.status().message()));
    out.push_back(std::move(*r));
    return Status::Ok();
  });
  if (!st.ok()) return st;
  return out;
}

Result<std::vector<TraceRequest>> LoadAzureTrace(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string_view body = text;
  if (body.substr(0, 3) == "\xEF\xBB\xBF") body.remove_prefix(3);
  std::vector<TraceRequest> out;
  int ts_col = -1, in_col = -1, out_col = -1;
  size_t columns = 0;
  CivilTime first;
  Status st = ForEachLine(body, [&](size_t line_no, std::string_view line) -> Status {
    if (line.find_first_not_of(" \t") == std::string_view::npos) return Status::Ok();
    std::vector<std::string_view> fields = SplitCsv(line);
    if (ts_col < 0) {
      for (size_t i = 0; i < fields.size(); ++i) {
        if (fields[i] == "TIMESTAMP") ts_col = static_cast<int>(i);
        if (fields[i] == "ContextTokens") in_col = static_cast<int>(i);
        if (fields[i] == "GeneratedTokens") out_col = static_cast<int>(i);
      }
      if (ts_col < 0 || in_col < 0 || out_col < 0) {
        return Status::InvalidArgument(
            LineError(path, line_no, "header lacks TIMESTAMP, ContextTokens or GeneratedTokens"));
      }
      columns = fields.size();
      return Status::Ok();
    }
    if (fields.size() != columns) {
      return Status::InvalidArgument(LineError(path, line_no, "expected " + std::to_string(columns) + " fields"));
    }
    Result<CivilTime> ts = ParseAzureTimestamp(fields[ts_col]);
    if (!ts.ok()) return Status::InvalidArgument(LineError(path, line_no, ts.status().message()));
    TraceRequest r;
    if (!ParseInt(fields[in_col], r.input_length) || r.input_length < 0 ||
        !ParseInt(fields[out_col], r.output_length) || r.output_length < 0) {
      return Status::InvalidArgument(LineError(path, line_no, "token counts are not non-negative integers"));
    }
    if (out.empty()) first = *ts;
    r.arrival_ms = ts->MsSince(first);
    out.push_back(std::move(r));
    return Status::Ok();
  });
  if (!st.ok()) return st;
  if (ts_col < 0) return Status::InvalidArgument(path + ": no header");
  return out;
}

Result<std::vector<TraceRequest>> LoadTrace(const std::string& path) {
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with(".jsonl")) return LoadMooncakeTrace(path);
  if (ends_with(".csv")) return LoadAzureTrace(path);
  return Status::InvalidArgument(path + ": unknown trace format (want .jsonl for Mooncake or .csv for Azure)");
}

std::vector<uint32_t> HashIdBlock(uint64_t hash_id, const PromptSynthesis& synth) {
  std::vector<uint32_t> block(static_cast<size_t>(std::max(synth.block_size, 0)));
  for (size_t i = 0; i < block.size(); ++i) block[i] = TokenOf(kHashIdDomain, hash_id, i, synth);
  return block;
}

std::vector<uint32_t> SynthesizePrompt(const TraceRequest& request, size_t request_index,
                                       const PromptSynthesis& synth) {
  const size_t length = static_cast<size_t>(std::max(request.input_length, 0));
  const size_t block = static_cast<size_t>(std::max(synth.block_size, 1));
  std::vector<uint32_t> prompt;
  prompt.reserve(length);
  for (uint64_t id : request.hash_ids) {
    if (prompt.size() >= length) break;
    const size_t n = std::min(block, length - prompt.size());
    for (size_t i = 0; i < n; ++i) prompt.push_back(TokenOf(kHashIdDomain, id, i, synth));
  }
  // Tokens the ids do not cover (Azure, or a Mooncake line with too few ids) are unique to the
  // request, so they never produce a prefix hit.
  for (size_t i = 0; prompt.size() < length; ++i) {
    prompt.push_back(TokenOf(kUniqueDomain, request_index, i, synth));
  }
  return prompt;
}

double InfiniteCacheHitRatio(std::span<const TraceRequest> requests, int block_size) {
  const uint64_t block = static_cast<uint64_t>(std::max(block_size, 1));
  std::unordered_set<uint64_t> seen_chains;
  uint64_t total = 0, hits = 0;
  for (const TraceRequest& r : requests) {
    const uint64_t length = static_cast<uint64_t>(std::max(r.input_length, 0));
    total += length;
    uint64_t chain = 0;
    bool matching = true;
    uint64_t hit_blocks = 0;
    for (uint64_t id : r.hash_ids) {
      chain = Mix(chain ^ Mix(id));
      bool inserted = seen_chains.insert(chain).second;
      if (matching && !inserted) {
        ++hit_blocks;
      } else {
        matching = false;
      }
    }
    hits += std::min(hit_blocks * block, length);
  }
  return total == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(total);
}

double InfiniteCacheHitRatioOfPrompts(std::span<const std::vector<uint32_t>> prompts, int block_size) {
  const size_t block = static_cast<size_t>(std::max(block_size, 1));
  std::unordered_set<uint64_t> seen_chains;
  uint64_t total = 0, hits = 0;
  for (const std::vector<uint32_t>& prompt : prompts) {
    total += prompt.size();
    uint64_t chain = 0;
    bool matching = true;
    for (size_t start = 0; start < prompt.size(); start += block) {
      const size_t end = std::min(prompt.size(), start + block);
      for (size_t i = start; i < end; ++i) chain = Mix(chain ^ prompt[i]);
      chain = Mix(chain ^ (end - start));  // a short last block differs from a full one
      bool inserted = seen_chains.insert(chain).second;
      if (matching && !inserted) {
        hits += end - start;
      } else {
        matching = false;
      }
    }
  }
  return total == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(total);
}

std::vector<TraceRequest> ScaleTrace(std::vector<TraceRequest> requests, double speedup, double max_ms,
                                     size_t limit) {
  if (!(speedup > 0)) speedup = 1;
  std::vector<TraceRequest> out;
  out.reserve(limit > 0 ? std::min(limit, requests.size()) : requests.size());
  for (TraceRequest& r : requests) {
    if (limit > 0 && out.size() >= limit) break;
    r.arrival_ms /= speedup;
    if (max_ms > 0 && r.arrival_ms >= max_ms) continue;
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace dyn::workload
