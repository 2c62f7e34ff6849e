// Tests, value methods (str/dict/list) and global functions available to templates.
#include <cmath>
#include <ctime>

#include <utf8proc.h>

#include "llm/template/interpreter.h"

namespace dyn::tmpl {

std::vector<std::string> SplitCodePoints(std::string_view s) {
  std::vector<std::string> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    n = std::min(n, s.size() - i);
    out.emplace_back(s.substr(i, n));
    i += n;
  }
  return out;
}

size_t CodePointCount(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

namespace {

int32_t FirstCodePoint(std::string_view s) {
  utf8proc_int32_t cp = 0;
  auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), s.size(), &cp);
  return n > 0 ? cp : -1;
}

bool IsPySpace(std::string_view ch) {
  if (ch.size() == 1) {
    char c = ch[0];
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f');
  }
  int32_t cp = FirstCodePoint(ch);
  if (cp == 0x85) return true;
  auto cat = utf8proc_category(cp);
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

std::string EncodeCodePoint(int32_t cp) {
  utf8proc_uint8_t buf[8];
  auto n = utf8proc_encode_char(cp, buf);
  return std::string(reinterpret_cast<char*>(buf), n);
}

}  // namespace

std::string PyStrip(std::string_view s, const Value* chars, bool left, bool right) {
  std::vector<std::string> cps = SplitCodePoints(s);
  std::vector<std::string> strip_set;
  bool use_space = !chars || chars->is_none() || chars->is_undefined();
  if (!use_space) strip_set = SplitCodePoints(chars->ToStr());
  auto strip = [&](const std::string& c) {
    if (use_space) return IsPySpace(c);
    for (const auto& x : strip_set) {
      if (x == c) return true;
    }
    return false;
  };
  size_t lo = 0, hi = cps.size();
  if (left) while (lo < hi && strip(cps[lo])) ++lo;
  if (right) while (hi > lo && strip(cps[hi - 1])) --hi;
  std::string out;
  for (size_t i = lo; i < hi; ++i) out += cps[i];
  return out;
}

namespace {

std::string MapCase(std::string_view s, int mode) {  // 0 lower, 1 upper
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    if (c < 0x80) {
      out += static_cast<char>(mode ? std::toupper(c) : std::tolower(c));
      ++i;
      continue;
    }
    utf8proc_int32_t cp = 0;
    auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i), s.size() - i, &cp);
    if (n <= 0) {
      out += s[i++];
      continue;
    }
    out += EncodeCodePoint(mode ? utf8proc_toupper(cp) : utf8proc_tolower(cp));
    i += n;
  }
  return out;
}

bool IsCased(int32_t cp) {
  return utf8proc_tolower(cp) != cp || utf8proc_toupper(cp) != cp || utf8proc_category(cp) == UTF8PROC_CATEGORY_LT;
}

}  // namespace

std::string PyLower(std::string_view s) { return MapCase(s, 0); }
std::string PyUpper(std::string_view s) { return MapCase(s, 1); }

// Python str.title(): a cased character after an uncased one starts a word.
std::string PyTitle(std::string_view s) {
  std::string out;
  bool prev_cased = false;
  for (const auto& ch : SplitCodePoints(s)) {
    int32_t cp = FirstCodePoint(ch);
    if (cp < 0) {
      out += ch;
      prev_cased = false;
      continue;
    }
    bool cased = IsCased(cp);
    out += EncodeCodePoint(prev_cased ? utf8proc_tolower(cp) : utf8proc_totitle(cp));
    prev_cased = cased;
  }
  return out;
}

std::string PyCapitalize(std::string_view s) {
  std::vector<std::string> cps = SplitCodePoints(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) {
    int32_t cp = FirstCodePoint(cps[i]);
    if (cp < 0) out += cps[i];
    else out += EncodeCodePoint(i == 0 ? utf8proc_totitle(cp) : utf8proc_tolower(cp));
  }
  return out;
}

Result<std::vector<std::string>> PySplit(std::string_view s, const Value* sep, int64_t maxsplit) {
  std::vector<std::string> out;
  if (!sep || sep->is_none()) {
    std::vector<std::string> cps = SplitCodePoints(s);
    size_t i = 0;
    while (true) {
      while (i < cps.size() && IsPySpace(cps[i])) ++i;
      if (i >= cps.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        size_t end = cps.size();
        while (end > i && IsPySpace(cps[end - 1])) --end;
        std::string rest;
        for (size_t k = i; k < end; ++k) rest += cps[k];
        out.push_back(rest);
        break;
      }
      std::string word;
      while (i < cps.size() && !IsPySpace(cps[i])) word += cps[i++];
      out.push_back(std::move(word));
    }
    return out;
  }
  if (!sep->is_string()) return Status::InvalidArgument("must be str or None");
  const std::string& d = sep->str();
  if (d.empty()) return Status::InvalidArgument("empty separator");
  size_t start = 0;
  while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
    size_t p = s.find(d, start);
    if (p == std::string_view::npos) break;
    out.emplace_back(s.substr(start, p - start));
    start = p + d.size();
  }
  out.emplace_back(s.substr(start));
  return out;
}

std::string PyReplace(std::string_view s, std::string_view old, std::string_view repl, int64_t count) {
  std::string out;
  if (old.empty()) {
    std::vector<std::string> cps = SplitCodePoints(s);
    int64_t done = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      if (i < cps.size()) out += cps[i];
    }
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t p = s.find(old, start);
    if (p == std::string_view::npos) break;
    out.append(s.substr(start, p - start));
    out.append(repl);
    start = p + old.size();
    ++done;
  }
  out.append(s.substr(start));
  return out;
}

namespace {

Value StrList(std::vector<std::string> parts) {
  std::vector<Value> items;
  items.reserve(parts.size());
  for (auto& p : parts) items.push_back(Value::Str(std::move(p)));
  return Value::List(std::move(items));
}

bool AllCodePoints(std::string_view s, bool (*pred)(int32_t)) {
  if (s.empty()) return false;
  for (const auto& ch : SplitCodePoints(s)) {
    if (!pred(FirstCodePoint(ch))) return false;
  }
  return true;
}

bool IsAlpha(int32_t cp) {
  auto c = utf8proc_category(cp);
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}
bool IsDigit(int32_t cp) { return utf8proc_category(cp) == UTF8PROC_CATEGORY_ND; }
bool IsAlnum(int32_t cp) { return IsAlpha(cp) || IsDigit(cp) || utf8proc_category(cp) == UTF8PROC_CATEGORY_NL || utf8proc_category(cp) == UTF8PROC_CATEGORY_NO; }
bool IsSpaceCp(int32_t cp) { return IsPySpace(EncodeCodePoint(cp)); }

}  // namespace

// Python's islower()/isupper(): at least one cased character, and all cased ones in that case.
bool CaseIs(std::string_view s, bool upper) {
  bool any = false;
  for (const auto& ch : SplitCodePoints(s)) {
    int32_t cp = FirstCodePoint(ch);
    if (cp < 0 || !IsCased(cp)) continue;
    bool is_upper = utf8proc_tolower(cp) != cp && utf8proc_toupper(cp) == cp;
    bool is_lower = utf8proc_toupper(cp) != cp && utf8proc_tolower(cp) == cp;
    if (upper ? !is_upper : !is_lower) return false;
    any = true;
  }
  return any;
}

namespace {

Result<Value> StrMethod(const std::string& s, const std::string& name, const Args& a) {
  const Value* a0 = a.Get(0, "");
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return Value::Str(PyStrip(s, a0, name != "rstrip", name != "lstrip"));
  }
  if (name == "upper") return Value::Str(PyUpper(s));
  if (name == "lower") return Value::Str(PyLower(s));
  if (name == "title") return Value::Str(PyTitle(s));
  if (name == "capitalize") return Value::Str(PyCapitalize(s));
  if (name == "split" || name == "rsplit") {
    Value maxsplit = a.GetOr(1, "maxsplit", Value::Int(-1));
    const Value* sep = a.Get(0, "sep");
    if (name == "rsplit" && maxsplit.as_int() >= 0) {
      // Split from the right: reverse-split on the reversed strings for the plain-separator case.
      if (!sep || !sep->is_string() || sep->str().empty()) return Status::Unsupported("rsplit needs a separator here");
      std::vector<std::string> out;
      std::string_view rest = s;
      while (static_cast<int64_t>(out.size()) < maxsplit.as_int()) {
        size_t p = rest.rfind(sep->str());
        if (p == std::string_view::npos) break;
        out.insert(out.begin(), std::string(rest.substr(p + sep->str().size())));
        rest = rest.substr(0, p);
      }
      out.insert(out.begin(), std::string(rest));
      return StrList(std::move(out));
    }
    DYN_ASSIGN_OR_RETURN(auto parts, PySplit(s, sep, maxsplit.as_int()));
    return StrList(std::move(parts));
  }
  if (name == "splitlines") {
    std::vector<std::string> lines;
    std::string cur;
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
    return StrList(std::move(lines));
  }
  if (name == "startswith" || name == "endswith") {
    if (!a0) return Status::InvalidArgument(name + " takes at least 1 argument");
    std::vector<Value> prefixes;
    if (a0->is_list()) prefixes = a0->list().items;
    else prefixes.push_back(*a0);
    for (const auto& p : prefixes) {
      if (!p.is_string()) return Status::InvalidArgument(name + " first arg must be str or a tuple of str");
      const std::string& x = p.str();
      bool hit = name == "startswith" ? s.compare(0, x.size(), x) == 0
                                      : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
      if (hit) return Value::Bool(true);
    }
    return Value::Bool(false);
  }
  if (name == "replace") {
    if (a.pos.size() < 2 || !a.pos[0].is_string() || !a.pos[1].is_string()) {
      return Status::InvalidArgument("replace expects two strings");
    }
    return Value::Str(PyReplace(s, a.pos[0].str(), a.pos[1].str(), a.GetOr(2, "count", Value::Int(-1)).as_int()));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
    if (!a0 || !a0->is_string()) return Status::InvalidArgument(name + " expects a string");
    const std::string& x = a0->str();
    if (name == "count") {
      if (x.empty()) return Value::Int(static_cast<int64_t>(CodePointCount(s) + 1));
      int64_t n = 0;
      for (size_t p = s.find(x); p != std::string::npos; p = s.find(x, p + x.size())) ++n;
      return Value::Int(n);
    }
    size_t p = name[0] == 'r' ? s.rfind(x) : s.find(x);
    if (p == std::string::npos) {
      if (name == "index" || name == "rindex") return Status::InvalidArgument("substring not found");
      return Value::Int(-1);
    }
    return Value::Int(static_cast<int64_t>(CodePointCount(std::string_view(s).substr(0, p))));
  }
  if (name == "join") {
    if (!a0) return Status::InvalidArgument("join takes exactly one argument");
    std::vector<Value> items;
    if (a0->is_list()) items = a0->list().items;
    else if (a0->is_string()) for (auto& c : SplitCodePoints(a0->str())) items.push_back(Value::Str(c));
    else return Status::InvalidArgument("can only join an iterable");
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].is_string()) return Status::InvalidArgument("sequence item " + std::to_string(i) + ": expected str instance");
      if (i) out += s;
      out += items[i].str();
    }
    return Value::Str(std::move(out));
  }
  if (name == "isdigit") return Value::Bool(AllCodePoints(s, IsDigit));
  if (name == "isalpha") return Value::Bool(AllCodePoints(s, IsAlpha));
  if (name == "isalnum") return Value::Bool(AllCodePoints(s, IsAlnum));
  if (name == "isspace") return Value::Bool(AllCodePoints(s, IsSpaceCp));
  if (name == "islower") return Value::Bool(CaseIs(s, false));
  if (name == "isupper") return Value::Bool(CaseIs(s, true));
  return Status::InvalidArgument("'str' object has no method '" + name + "'");
}

const char* const kStrMethods[] = {"strip", "lstrip", "rstrip", "upper", "lower", "title", "capitalize", "split",
                                   "rsplit", "splitlines", "startswith", "endswith", "replace", "find", "rfind",
                                   "index", "rindex", "count", "join", "isdigit", "isalpha", "isalnum", "isspace",
                                   "islower", "isupper"};
const char* const kDictMethods[] = {"items", "keys", "values", "get"};
const char* const kDictUnsafe[] = {"pop", "popitem", "update", "clear", "setdefault", "copy"};
const char* const kListMethods[] = {"index", "count"};
const char* const kListUnsafe[] = {"append", "extend", "insert", "pop", "remove", "sort", "reverse", "clear", "copy"};

template <size_t N>
bool Contains(const char* const (&names)[N], const std::string& name) {
  for (const char* n : names) {
    if (name == n) return true;
  }
  return false;
}

Value Method(const Value& obj, const std::string& name, Callable::Type type) {
  auto fn = std::make_shared<Callable>();
  fn->type = type;
  fn->name = name;
  fn->receiver = obj;
  return Value::Func(std::move(fn));
}

}  // namespace

Value LookupMethod(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::kString:
      if (Contains(kStrMethods, name)) return Method(obj, name, Callable::Type::kMethod);
      break;
    case Value::Kind::kDict:
      if (Contains(kDictMethods, name)) return Method(obj, name, Callable::Type::kMethod);
      if (Contains(kDictUnsafe, name)) return Method(obj, name, Callable::Type::kUnsafe);
      break;
    case Value::Kind::kList:
      if (Contains(kListMethods, name)) return Method(obj, name, Callable::Type::kMethod);
      if (Contains(kListUnsafe, name)) return Method(obj, name, Callable::Type::kUnsafe);
      break;
    case Value::Kind::kLoop:
      if (name == "cycle" || name == "changed") return Method(obj, name, Callable::Type::kMethod);
      break;
    default: break;
  }
  return Value::Undefined(std::string("'") + obj.TypeName() + " object' has no attribute '" + name + "'");
}

namespace {

Result<Value> Range(const Args& a) {
  int64_t start = 0, stop = 0, step = 1;
  for (const auto& v : a.pos) {
    if (!v.is_int()) return Status::InvalidArgument(std::string("'") + v.TypeName() + "' object cannot be interpreted as an integer");
  }
  if (a.pos.size() == 1) stop = a.pos[0].as_int();
  else if (a.pos.size() >= 2) {
    start = a.pos[0].as_int();
    stop = a.pos[1].as_int();
    if (a.pos.size() >= 3) step = a.pos[2].as_int();
  } else {
    return Status::InvalidArgument("range expected at least 1 argument");
  }
  if (step == 0) return Status::InvalidArgument("range() arg 3 must not be zero");
  // Count without overflow, then apply jinja2's sandbox limit (MAX_RANGE = 100000).
  __int128 span = step > 0 ? static_cast<__int128>(stop) - start : static_cast<__int128>(start) - stop;
  __int128 abs_step = step > 0 ? step : -static_cast<__int128>(step);
  __int128 count = span <= 0 ? 0 : (span + abs_step - 1) / abs_step;
  if (count > 100000) {
    return Status::ResourceExhausted("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
  }
  std::vector<Value> items;
  items.reserve(static_cast<size_t>(count));
  for (__int128 i = 0; i < count; ++i) items.push_back(Value::Int(static_cast<int64_t>(start + i * step)));
  return Value::List(std::move(items));
}

Result<Value> DictFromArgs(Interpreter& in, const Args& a, bool is_namespace) {
  auto d = std::make_shared<DictObj>();
  if (!a.pos.empty()) {
    const Value& src = a.pos[0];
    if (src.is_dict() || src.is_namespace()) {
      d->items = src.dict().items;
      d->depth = src.dict().depth;
    } else if (src.is_list()) {
      for (const auto& pair : src.list().items) {
        if (!pair.is_list() || pair.list().items.size() != 2) return Status::InvalidArgument("dict update sequence element has wrong length");
        d->Set(pair.list().items[0], pair.list().items[1]);
      }
    } else {
      return Status::InvalidArgument(std::string("'") + src.TypeName() + "' object is not iterable");
    }
  }
  for (const auto& [k, v] : a.kw) {
    if (is_namespace && !k.empty() && k[0] == '_') {
      return Status::InvalidArgument("Chat templates cannot store underscore-prefixed attributes on a namespace");
    }
    d->Set(Value::Str(k), v);
  }
  if (!is_namespace) return Value::Dict(std::move(d));
  in.TrackNamespace(d);
  return Value::Namespace(std::move(d));
}

Result<Value> StrftimeNow(Interpreter& in, const Args& a) {
  const Value* fmt = a.Get(0, "format");
  if (!fmt || !fmt->is_string()) return Status::InvalidArgument("strftime_now expects a format string");
  if (fmt->str().size() > 256) return Status::InvalidArgument("strftime_now format too long");
  std::time_t t = std::chrono::system_clock::to_time_t(in.Now());
  std::tm tm{};
  localtime_r(&t, &tm);
  std::string out(1024, '\0');
  size_t n = fmt->str().empty() ? 0 : std::strftime(out.data(), out.size(), fmt->str().c_str(), &tm);
  out.resize(n);
  return Value::Str(std::move(out));
}

}  // namespace

Result<Value> CallBuiltin(Interpreter& in, const Callable& fn, const Args& a) {
  if (fn.type == Callable::Type::kMethod) {
    const Value& self = fn.receiver;
    if (self.is_string()) return StrMethod(self.str(), fn.name, a);
    if (self.is_dict()) {
      if (fn.name == "get") {
        const Value* key = a.Get(0, "key");
        if (!key) return Status::InvalidArgument("get expected at least 1 argument");
        const Value* v = self.dict().Find(*key);
        return v ? *v : a.GetOr(1, "default", Value::None());
      }
      std::vector<Value> out;
      DYN_RETURN_IF_ERROR(in.Step(self.dict().items.size()));
      for (const auto& [k, v] : self.dict().items) {
        if (fn.name == "items") out.push_back(Value::List({k, v}, true));
        else out.push_back(fn.name == "keys" ? k : v);
      }
      return Value::List(std::move(out));
    }
    if (self.is_list()) {
      const Value* x = a.Get(0, "value");
      if (!x) return Status::InvalidArgument(fn.name + " takes exactly one argument");
      int64_t count = 0;
      const auto& items = self.list().items;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!items[i].Equals(*x)) continue;
        if (fn.name == "index") return Value::Int(static_cast<int64_t>(i));
        ++count;
      }
      if (fn.name == "index") return Status::InvalidArgument(x->Repr() + " is not in list");
      return Value::Int(count);
    }
    if (self.is_loop()) {
      LoopState& loop = self.loop();
      if (fn.name == "cycle") {
        if (a.pos.empty()) return Status::InvalidArgument("no items for cycling given");
        return a.pos[loop.index0 % static_cast<int64_t>(a.pos.size())];
      }
      bool changed = !loop.changed_called || loop.changed_last.size() != a.pos.size();
      for (size_t i = 0; !changed && i < a.pos.size(); ++i) changed = !loop.changed_last[i].Equals(a.pos[i]);
      loop.changed_called = true;
      loop.changed_last = a.pos;
      return Value::Bool(changed);
    }
    return Status::InvalidArgument("unknown method " + fn.name);
  }
  const std::string& name = fn.name;
  if (name == "range") return Range(a);
  if (name == "namespace") return DictFromArgs(in, a, true);
  if (name == "dict") return DictFromArgs(in, a, false);
  if (name == "raise_exception") {
    const Value* msg = a.Get(0, "message");
    return Status::InvalidArgument(msg ? msg->ToStr() : std::string());
  }
  if (name == "strftime_now") return StrftimeNow(in, a);
  return Status::InvalidArgument("unknown function " + name);
}

std::shared_ptr<Scope> MakeBuiltinScope() {
  auto scope = std::make_shared<Scope>();
  for (const char* name : {"range", "namespace", "dict", "raise_exception", "strftime_now"}) {
    auto fn = std::make_shared<Callable>();
    fn->type = Callable::Type::kBuiltin;
    fn->name = name;
    scope->vars.emplace_back(name, Value::Func(std::move(fn)));
  }
  return scope;
}

}  // namespace dyn::tmpl
