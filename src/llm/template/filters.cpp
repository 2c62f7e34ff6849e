// jinja2's builtin filters (jinja2/filters.py) plus transformers' tojson, with Python semantics.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "llm/template/interpreter.h"

namespace dyn::tmpl {
namespace {

Status Err(const std::string& message) { return Status::InvalidArgument(message); }

// jinja2's make_attrgetter: "a.b.0" walks attributes/items; integers index.
Result<Value> GetPath(Interpreter& in, const Value& item, const Value& attribute) {
  if (attribute.is_int()) return in.GetItem(item, attribute);
  Value cur = item;
  const std::string path = attribute.ToStr();
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
    DYN_ASSIGN_OR_RETURN(cur, in.GetItem(cur, numeric ? Value::Int(std::atoll(part.c_str())) : Value::Str(part)));
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

// Sort/compare key: lowercased strings unless case-sensitive.
Value SortKey(const Value& v, bool case_sensitive) {
  return (!case_sensitive && v.is_string()) ? Value::Str(PyLower(v.str())) : v;
}

Status StableSort(std::vector<std::pair<Value, Value>>& keyed, bool reverse) {
  Status error;
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    if (!error.ok()) return false;
    auto r = reverse ? Less(y.first, x.first) : Less(x.first, y.first);
    if (!r.ok()) {
      error = r.status();
      return false;
    }
    return *r;
  });
  return error;
}

Result<Value> Round(const Value& v, const Args& a) {
  if (!v.is_number()) return Err(std::string("type ") + v.TypeName() + " doesn't define __round__ method");
  Value precision = a.GetOr(0, "precision", Value::Int(0));
  std::string method = a.GetOr(1, "method", Value::Str("common")).ToStr();
  int64_t p = precision.as_int();
  if (method == "common") {
    if (!v.is_float()) return Value::Int(v.as_int());  // round(int, n) stays an int for n >= 0
    if (p > 300 || p < -300) return Value::Float(v.as_double());
    if (p >= 0) {
      // printf rounds the exact binary value half-to-even, as Python's round() does.
      char buf[512];
      std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(p), v.as_double());
      return Value::Float(std::strtod(buf, nullptr));
    }
    double scale = std::pow(10.0, static_cast<double>(-p));
    return Value::Float(std::nearbyint(v.as_double() / scale) * scale);
  }
  double scale = std::pow(10.0, static_cast<double>(p));
  double x = v.as_double() * scale;
  if (method == "ceil") x = std::ceil(x);
  else if (method == "floor") x = std::floor(x);
  else return Err("method must be common, ceil or floor");
  return Value::Float(x / scale);
}

Result<Value> ToJson(const Value& v, const Args& a) {
  JsonDumpOptions o;
  o.ensure_ascii = a.GetOr(0, "ensure_ascii", Value::Bool(false)).Truthy();
  Value indent = a.GetOr(1, "indent", Value::None());
  if (indent.is_int()) {
    o.has_indent = true;
    o.indent = std::string(std::max<int64_t>(0, std::min<int64_t>(indent.as_int(), 64)), ' ');
  } else if (indent.is_string()) {
    o.has_indent = true;
    o.indent = indent.str();
  } else if (!indent.is_none() && !indent.is_undefined()) {
    return Err("tojson: indent must be an int or a string");
  }
  if (o.has_indent) o.item_separator = ",";
  Value separators = a.GetOr(2, "separators", Value::None());
  if (separators.is_list()) {
    if (separators.list().items.size() != 2) return Err("tojson: separators must be a pair");
    o.item_separator = separators.list().items[0].ToStr();
    o.key_separator = separators.list().items[1].ToStr();
  }
  o.sort_keys = a.GetOr(3, "sort_keys", Value::Bool(false)).Truthy();
  DYN_ASSIGN_OR_RETURN(std::string s, JsonDumps(v, o));
  return Value::Str(std::move(s));
}

std::string Indent(const std::string& text, const Args& a) {
  Value width = a.GetOr(0, "width", Value::Int(4));
  bool first = a.GetOr(1, "first", Value::Bool(false)).Truthy();
  bool blank = a.GetOr(2, "blank", Value::Bool(false)).Truthy();
  std::string indention = width.is_string() ? width.str() : std::string(std::max<int64_t>(0, std::min<int64_t>(width.as_int(), 256)), ' ');
  // s + "\n", then str.splitlines() (the trailing newline yields no extra line).
  std::vector<std::string> lines;
  std::string cur;
  std::string s = text + "\n";
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= '\x1c' && c <= '\x1e')) {
      if (c == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
      lines.push_back(std::move(cur));
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) lines.push_back(std::move(cur));
  std::string rv;
  if (blank) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (i) rv += "\n" + indention;
      rv += lines[i];
    }
  } else if (!lines.empty()) {
    rv = lines[0];
    for (size_t i = 1; i < lines.size(); ++i) rv += "\n" + (lines[i].empty() ? "" : indention) + lines[i];
  }
  if (first) rv = indention + rv;
  return rv;
}

std::string HtmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// jinja2's title filter: words start after runs of [-\s({[<].
std::string JinjaTitle(const std::string& s) {
  std::string out;
  bool word_start = true;
  for (const auto& ch : SplitCodePoints(s)) {
    bool delim = ch.size() == 1 && (std::strchr("-({[<", ch[0]) || ch[0] == ' ' || (ch[0] >= '\t' && ch[0] <= '\r'));
    if (delim) {
      out += ch;
      word_start = true;
    } else {
      out += word_start ? PyUpper(ch) : PyLower(ch);
      word_start = false;
    }
  }
  return out;
}

Result<Value> ParseInt(const Value& v, const Args& a) {
  Value fallback = a.GetOr(0, "default", Value::Int(0));
  if (v.is_int()) return Value::Int(v.as_int());
  if (v.is_float()) {
    double d = v.as_double();
    if (!std::isfinite(d) || std::fabs(d) > 9.2e18) return fallback;
    return Value::Int(static_cast<int64_t>(d));
  }
  if (!v.is_string()) return fallback;
  std::string s = PyStrip(v.str(), nullptr, true, true);
  std::string digits;
  for (char c : s) {
    if (c != '_') digits += c;
  }
  int base = static_cast<int>(a.GetOr(1, "base", Value::Int(10)).as_int());
  if (!digits.empty()) {
    char* end = nullptr;
    errno = 0;
    long long x = std::strtoll(digits.c_str(), &end, base);
    if (end && *end == '\0' && errno == 0) return Value::Int(x);
    double d = std::strtod(digits.c_str(), &end);
    if (end && *end == '\0' && std::isfinite(d) && std::fabs(d) < 9.2e18) return Value::Int(static_cast<int64_t>(d));
  }
  return fallback;
}

Result<Value> ParseFloat(const Value& v, const Args& a) {
  Value fallback = a.GetOr(0, "default", Value::Float(0.0));
  if (v.is_number()) return Value::Float(v.as_double());
  if (!v.is_string()) return fallback;
  std::string s = PyStrip(v.str(), nullptr, true, true);
  if (s.empty()) return fallback;
  char* end = nullptr;
  double d = std::strtod(s.c_str(), &end);
  if (end && *end == '\0') return Value::Float(d);
  return fallback;
}

// select/reject/selectattr/rejectattr.
Result<Value> SelectFilter(Interpreter& in, const std::string& name, const std::vector<Value>& items, const Args& a) {
  bool use_attr = name == "selectattr" || name == "rejectattr";
  bool keep_when = name == "select" || name == "selectattr";
  size_t next = 0;
  Value attribute;
  if (use_attr) {
    if (a.pos.empty()) return Err(name + " needs an attribute");
    attribute = a.pos[next++];
  }
  std::string test;
  if (next < a.pos.size()) test = a.pos[next++].ToStr();
  Args test_args;
  test_args.pos.assign(a.pos.begin() + next, a.pos.end());
  test_args.kw = a.kw;
  std::vector<Value> out;
  for (const auto& item : items) {
    DYN_RETURN_IF_ERROR(in.Step());
    Value subject = item;
    if (use_attr) { DYN_ASSIGN_OR_RETURN(subject, GetPath(in, item, attribute)); }
    bool pass;
    if (test.empty()) {
      pass = subject.Truthy();
    } else {
      DYN_ASSIGN_OR_RETURN(pass, ApplyTest(in, test, subject, test_args));
    }
    if (pass == keep_when) out.push_back(item);
  }
  return Value::List(std::move(out));
}

const char* const kFilters[] = {
    "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e", "escape", "first",
    "float", "forceescape", "indent", "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min",
    "reject", "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum",
    "title", "tojson", "trim", "unique", "upper", "wordcount"};

}  // namespace

bool HasFilter(std::string_view name) {
  for (const char* f : kFilters) {
    if (name == f) return true;
  }
  return false;
}

Result<Value> ApplyFilter(Interpreter& in, const std::string& name, const Value& v, const Args& a) {
  DYN_RETURN_IF_ERROR(in.Step());
  if (name == "default" || name == "d") {
    bool boolean = a.GetOr(1, "boolean", Value::Bool(false)).Truthy();
    if (v.is_undefined() || (boolean && !v.Truthy())) return a.GetOr(0, "default_value", Value::Str(""));
    return v;
  }
  if (name == "safe") return v.is_undefined() ? Value::Str("") : v;
  if (name == "string") return v.is_string() ? v : Value::Str(v.ToStr());
  if (name == "upper") return Value::Str(PyUpper(v.ToStr()));
  if (name == "lower") return Value::Str(PyLower(v.ToStr()));
  if (name == "capitalize") return Value::Str(PyCapitalize(v.ToStr()));
  if (name == "title") return Value::Str(JinjaTitle(v.ToStr()));
  if (name == "trim") return Value::Str(PyStrip(v.ToStr(), a.Get(0, "chars"), true, true));
  if (name == "escape" || name == "e" || name == "forceescape") return Value::Str(HtmlEscape(v.ToStr()));
  if (name == "indent") return Value::Str(Indent(v.ToStr(), a));
  if (name == "tojson") return ToJson(v, a);
  if (name == "int") return ParseInt(v, a);
  if (name == "float") return ParseFloat(v, a);
  if (name == "round") return Round(v, a);
  if (name == "attr") return in.GetAttr(v, a.GetOr(0, "name", Value::Str("")).ToStr());
  if (name == "replace") {
    const Value* old = a.Get(0, "old");
    const Value* repl = a.Get(1, "new");
    if (!old || !repl) return Err("replace expects old and new");
    Value count = a.GetOr(2, "count", Value::None());
    std::string out = PyReplace(v.ToStr(), old->ToStr(), repl->ToStr(), count.is_int() ? count.as_int() : -1);
    DYN_RETURN_IF_ERROR(in.CheckSize(out.size()));
    return Value::Str(std::move(out));
  }
  if (name == "center") {
    std::string s = v.ToStr();
    int64_t width = std::min<int64_t>(a.GetOr(0, "width", Value::Int(80)).as_int(), 1 << 20);
    int64_t len = static_cast<int64_t>(CodePointCount(s));
    if (width <= len) return Value::Str(s);
    int64_t pad = width - len, left = pad / 2 + (pad & width & 1);
    return Value::Str(std::string(left, ' ') + s + std::string(pad - left, ' '));
  }
  if (name == "wordcount") {
    int64_t n = 0;
    bool in_word = false;
    for (unsigned char c : v.ToStr()) {
      bool w = std::isalnum(c) || c == '_' || c >= 0x80;
      n += w && !in_word;
      in_word = w;
    }
    return Value::Int(n);
  }
  if (name == "abs") {
    if (v.is_float()) return Value::Float(std::fabs(v.as_double()));
    if (v.is_int()) return Value::Int(v.as_int() < 0 ? -v.as_int() : v.as_int());
    return Err(std::string("bad operand type for abs(): '") + v.TypeName() + "'");
  }
  if (name == "length" || name == "count") {
    if (v.is_string()) return Value::Int(static_cast<int64_t>(CodePointCount(v.str())));
    if (v.is_list()) return Value::Int(static_cast<int64_t>(v.list().items.size()));
    if (v.is_dict()) return Value::Int(static_cast<int64_t>(v.dict().items.size()));
    if (v.is_undefined()) return Value::Int(0);
    return Err(std::string("object of type '") + v.TypeName() + "' has no len()");
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::List({});
    if (!v.is_dict()) return Err("items filter expects a mapping");
    std::vector<Value> out;
    for (const auto& [k, val] : v.dict().items) out.push_back(Value::List({k, val}, true));
    return Value::List(std::move(out));
  }
  if (name == "dictsort") {
    if (!v.is_dict()) return Err("dictsort expects a mapping");
    bool case_sensitive = a.GetOr(0, "case_sensitive", Value::Bool(false)).Truthy();
    std::string by = a.GetOr(1, "by", Value::Str("key")).ToStr();
    bool reverse = a.GetOr(2, "reverse", Value::Bool(false)).Truthy();
    if (by != "key" && by != "value") return Err("You can only sort by either \"key\" or \"value\"");
    std::vector<std::pair<Value, Value>> keyed;
    for (const auto& [k, val] : v.dict().items) {
      keyed.emplace_back(SortKey(by == "key" ? k : val, case_sensitive), Value::List({k, val}, true));
    }
    DYN_RETURN_IF_ERROR(in.Step(keyed.size() * 4));
    DYN_RETURN_IF_ERROR(StableSort(keyed, reverse));
    std::vector<Value> out;
    for (auto& kv : keyed) out.push_back(std::move(kv.second));
    return Value::List(std::move(out));
  }

  // The remaining filters consume an iterable.
  if (v.is_string() && name == "reverse") {
    std::vector<std::string> cps = SplitCodePoints(v.str());
    std::string out;
    for (auto it = cps.rbegin(); it != cps.rend(); ++it) out += *it;
    return Value::Str(std::move(out));
  }
  if (!HasFilter(name)) return Err("No filter named '" + name + "'.");
  if (name == "first" && v.is_string()) {
    auto cps = SplitCodePoints(v.str());
    return cps.empty() ? Value::Undefined("No first item, sequence was empty.") : Value::Str(cps[0]);
  }
  DYN_ASSIGN_OR_RETURN(std::vector<Value> items, in.Iterate(v));
  DYN_RETURN_IF_ERROR(in.Step(items.size()));
  if (name == "list") return Value::List(std::move(items));
  if (name == "first") return items.empty() ? Value::Undefined("No first item, sequence was empty.") : items.front();
  if (name == "last") {
    if (v.is_undefined()) return Err(v.str().empty() ? "value is undefined" : v.str());
    return items.empty() ? Value::Undefined("No last item, sequence was empty.") : items.back();
  }
  if (name == "reverse") {
    std::reverse(items.begin(), items.end());
    return Value::List(std::move(items));
  }
  if (name == "join") {
    std::string sep = a.GetOr(0, "d", Value::Str("")).ToStr();
    const Value* attribute = a.Get(1, "attribute");
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += sep;
      if (attribute && !attribute->is_none()) {
        DYN_ASSIGN_OR_RETURN(Value x, GetPath(in, items[i], *attribute));
        out += x.ToStr();
      } else {
        out += items[i].ToStr();
      }
      DYN_RETURN_IF_ERROR(in.CheckSize(out.size()));
    }
    return Value::Str(std::move(out));
  }
  if (name == "map") {
    std::vector<Value> out;
    if (a.pos.empty()) {
      const Value* attribute = a.Get(99, "attribute");
      if (!attribute) return Err("map needs a filter name or attribute=");
      Value fallback = a.GetOr(99, "default", Value::Undefined());
      for (const auto& item : items) {
        DYN_ASSIGN_OR_RETURN(Value x, GetPath(in, item, *attribute));
        out.push_back(x.is_undefined() && !fallback.is_undefined() ? fallback : x);
      }
    } else {
      std::string filter = a.pos[0].ToStr();
      Args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (const auto& item : items) {
        DYN_ASSIGN_OR_RETURN(Value x, ApplyFilter(in, filter, item, rest));
        out.push_back(std::move(x));
      }
    }
    return Value::List(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    return SelectFilter(in, name, items, a);
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    bool reverse = name == "sort" && a.GetOr(0, "reverse", Value::Bool(false)).Truthy();
    size_t cs_index = name == "sort" ? 1 : 0;
    bool case_sensitive = a.GetOr(cs_index, "case_sensitive", Value::Bool(false)).Truthy();
    const Value* attribute = a.Get(cs_index + 1, "attribute");
    std::vector<std::pair<Value, Value>> keyed;
    for (const auto& item : items) {
      Value key = item;
      if (attribute && !attribute->is_none()) { DYN_ASSIGN_OR_RETURN(key, GetPath(in, item, *attribute)); }
      keyed.emplace_back(SortKey(key, case_sensitive), item);
    }
    if (name == "unique") {
      std::vector<Value> seen, out;
      for (const auto& entry : keyed) {
        DYN_RETURN_IF_ERROR(in.Step(seen.size() / 16 + 1));
        const Value& key = entry.first;
        if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return s.Equals(key); })) continue;
        seen.push_back(key);
        out.push_back(entry.second);
      }
      return Value::List(std::move(out));
    }
    if (name == "min" || name == "max") {
      if (keyed.empty()) return Value::Undefined("No aggregated item, sequence was empty.");
      size_t best = 0;
      for (size_t i = 1; i < keyed.size(); ++i) {
        DYN_ASSIGN_OR_RETURN(bool better, name == "min" ? Less(keyed[i].first, keyed[best].first)
                                                        : Less(keyed[best].first, keyed[i].first));
        if (better) best = i;
      }
      return keyed[best].second;
    }
    DYN_RETURN_IF_ERROR(in.Step(keyed.size() * 4));
    DYN_RETURN_IF_ERROR(StableSort(keyed, reverse));
    std::vector<Value> out;
    for (auto& kv : keyed) out.push_back(std::move(kv.second));
    return Value::List(std::move(out));
  }
  if (name == "sum") {
    const Value* attribute = a.Get(0, "attribute");
    Value total = a.GetOr(1, "start", Value::Int(0));
    for (const auto& item : items) {
      Value x = item;
      if (attribute && !attribute->is_none()) { DYN_ASSIGN_OR_RETURN(x, GetPath(in, item, *attribute)); }
      if (!x.is_number() || !total.is_number()) return Err("sum: unsupported operand types");
      if (total.is_float() || x.is_float()) total = Value::Float(total.as_double() + x.as_double());
      else total = Value::Int(total.as_int() + x.as_int());
    }
    return total;
  }
  if (name == "batch") {
    int64_t size = a.GetOr(0, "linecount", Value::Int(1)).as_int();
    if (size <= 0) return Err("batch size must be positive");
    const Value* fill = a.Get(1, "fill_with");
    std::vector<Value> out, cur;
    for (auto& item : items) {
      cur.push_back(item);
      if (static_cast<int64_t>(cur.size()) == size) {
        out.push_back(Value::List(std::move(cur)));
        cur.clear();
      }
    }
    if (!cur.empty()) {
      if (fill && !fill->is_none()) while (static_cast<int64_t>(cur.size()) < size) cur.push_back(*fill);
      out.push_back(Value::List(std::move(cur)));
    }
    return Value::List(std::move(out));
  }
  return Err("No filter named '" + name + "'.");
}

}  // namespace dyn::tmpl
