#include "llm/template/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include <boost/json.hpp>
#include <utf8proc.h>

namespace dyn::tmpl {

Value Value::List(std::vector<Value> items, bool is_tuple) {
  Value v;
  v.kind_ = Kind::kList;
  auto list = std::make_shared<ListObj>();
  list->items = std::move(items);
  list->is_tuple = is_tuple;
  for (const auto& item : list->items) list->depth = std::max(list->depth, item.Depth() + 1);
  v.ptr_ = std::move(list);
  return v;
}

Value Value::Dict(std::shared_ptr<DictObj> d) {
  Value v;
  v.kind_ = Kind::kDict;
  v.ptr_ = d ? std::move(d) : std::make_shared<DictObj>();
  return v;
}

Value Value::Namespace(std::shared_ptr<DictObj> d) {
  Value v = Dict(std::move(d));
  v.kind_ = Kind::kNamespace;
  return v;
}

Value Value::Func(std::shared_ptr<Callable> fn) {
  Value v;
  v.kind_ = Kind::kCallable;
  v.ptr_ = std::move(fn);
  return v;
}

Value Value::Loop(std::shared_ptr<LoopState> loop) {
  Value v;
  v.kind_ = Kind::kLoop;
  v.ptr_ = std::move(loop);
  return v;
}

const Value* DictObj::Find(const Value& key) const {
  if (key.is_string()) return FindStr(key.str());
  for (const auto& [k, v] : items) {
    if (k.Equals(key)) return &v;
  }
  return nullptr;
}

const Value* DictObj::FindStr(std::string_view key) const {
  for (const auto& [k, v] : items) {
    if (k.is_string() && k.str() == key) return &v;
  }
  return nullptr;
}

uint32_t Value::Depth() const {
  if (kind_ == Kind::kList) return lp()->depth;
  if (kind_ == Kind::kDict || kind_ == Kind::kNamespace) return dp()->depth;
  return 0;
}

void DictObj::Set(Value key, Value value) {
  depth = std::max(depth, std::max(key.Depth(), value.Depth()) + 1);
  if (const Value* existing = Find(key)) {
    const_cast<Value&>(*existing) = std::move(value);
    return;
  }
  items.emplace_back(std::move(key), std::move(value));
}

bool Value::Truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool:
    case Kind::kInt: return i_ != 0;
    case Kind::kFloat: return f_ != 0.0;
    case Kind::kString: return !str().empty();
    case Kind::kList: return !lp()->items.empty();
    case Kind::kDict: return !dp()->items.empty();
    default: return true;
  }
}

bool Value::Equals(const Value& o) const {
  if (is_number() && o.is_number()) {
    if (is_float() || o.is_float()) return as_double() == o.as_double();
    return i_ == o.i_;
  }
  if (kind_ != o.kind_) return false;
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return true;
    case Kind::kString: return ptr_ == o.ptr_ || str() == o.str();
    case Kind::kList: {
      if (ptr_ == o.ptr_) return true;
      if (lp()->is_tuple != o.lp()->is_tuple || lp()->items.size() != o.lp()->items.size()) return false;
      for (size_t i = 0; i < lp()->items.size(); ++i) {
        if (!lp()->items[i].Equals(o.lp()->items[i])) return false;
      }
      return true;
    }
    case Kind::kDict: {
      if (ptr_ == o.ptr_) return true;
      if (dp()->items.size() != o.dp()->items.size()) return false;
      for (const auto& [k, v] : dp()->items) {
        const Value* other = o.dp()->Find(k);
        if (!other || !v.Equals(*other)) return false;
      }
      return true;
    }
    case Kind::kNamespace: return ptr_ == o.ptr_;
    case Kind::kCallable: return ptr_ == o.ptr_;
    case Kind::kLoop: return ptr_ == o.ptr_;
    default: return false;
  }
}

const char* Value::TypeName() const {
  switch (kind_) {
    case Kind::kUndefined: return "Undefined";
    case Kind::kNone: return "NoneType";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "str";
    case Kind::kList: return lp()->is_tuple ? "tuple" : "list";
    case Kind::kDict: return "dict";
    case Kind::kNamespace: return "Namespace";
    case Kind::kCallable: return "function";
    case Kind::kLoop: return "LoopContext";
  }
  return "object";
}

std::string FloatRepr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  // Shortest round-trip digits in scientific form, then laid out by Python's repr rules.
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  bool negative = sci[0] == '-';
  if (negative) sci.erase(0, 1);
  size_t e_pos = sci.find('e');
  int exponent = std::atoi(sci.c_str() + e_pos + 1);
  std::string digits;
  for (size_t i = 0; i < e_pos; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  int decpt = exponent + 1;  // value = 0.DIGITS * 10^decpt
  std::string out = negative ? "-" : "";
  if (decpt <= -4 || decpt > 16) {
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp_buf;
  } else if (decpt <= 0) {
    out += "0." + std::string(-decpt, '0') + digits;
  } else if (static_cast<size_t>(decpt) >= digits.size()) {
    out += digits + std::string(decpt - digits.size(), '0') + ".0";
  } else {
    out += digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return out;
}

namespace {

// Decodes one UTF-8 code point at s[i]; invalid bytes come back as themselves (>= 0x80).
int32_t DecodeUtf8(std::string_view s, size_t& i) {
  utf8proc_int32_t cp = 0;
  auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i), s.size() - i, &cp);
  if (n <= 0) {
    cp = static_cast<unsigned char>(s[i]);
    n = 1;
  }
  i += n;
  return cp;
}

bool IsPrintable(int32_t cp) {
  if (cp == ' ') return true;
  switch (utf8proc_category(cp)) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS: return false;
    default: return true;
  }
}

}  // namespace

std::string StrRepr(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    int32_t cp = DecodeUtf8(s, i);
    char buf[16];
    if (cp == quote || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp < 0x80 ? (cp < 0x20 || cp == 0x7f) : !IsPrintable(cp)) {
      if (cp <= 0xff) std::snprintf(buf, sizeof(buf), "\\x%02x", cp);
      else if (cp <= 0xffff) std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
      else std::snprintf(buf, sizeof(buf), "\\U%08x", cp);
      out += buf;
    } else {
      out.append(s.substr(start, i - start));
    }
  }
  out += quote;
  return out;
}

std::string Value::Repr() const {
  switch (kind_) {
    case Kind::kString: return StrRepr(str());
    case Kind::kList: {
      const auto& items = lp()->items;
      std::string out = lp()->is_tuple ? "(" : "[";
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += ", ";
        out += items[i].Repr();
      }
      if (lp()->is_tuple && items.size() == 1) out += ",";
      out += lp()->is_tuple ? ")" : "]";
      return out;
    }
    case Kind::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : dp()->items) {
        if (!first) out += ", ";
        first = false;
        out += k.Repr() + ": " + v.Repr();
      }
      return out + "}";
    }
    default: return ToStr();
  }
}

std::string Value::ToStr() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kNone: return "None";
    case Kind::kBool: return i_ ? "True" : "False";
    case Kind::kInt: return std::to_string(i_);
    case Kind::kFloat: return FloatRepr(f_);
    case Kind::kString: return str();
    case Kind::kList:
    case Kind::kDict: return Repr();
    case Kind::kNamespace: return "<Namespace>";
    case Kind::kCallable: return fn().type == Callable::Type::kUnsafe ? "" : "<function " + fn().name + ">";
    case Kind::kLoop: return "<LoopContext>";
  }
  return "";
}

Result<bool> Less(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_double() < b.as_double();
    return a.as_int() < b.as_int();
  }
  if (a.is_string() && b.is_string()) return a.str() < b.str();
  if (a.is_list() && b.is_list()) {
    const auto& x = a.list().items;
    const auto& y = b.list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (x[i].Equals(y[i])) continue;
      return Less(x[i], y[i]);
    }
    return x.size() < y.size();
  }
  return Status::InvalidArgument(std::string("'<' not supported between instances of '") + a.TypeName() +
                                 "' and '" + b.TypeName() + "'");
}

namespace {

void JsonString(std::string_view s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    char buf[16];
    if (c == '"') { out += "\\\""; ++i; continue; }
    if (c == '\\') { out += "\\\\"; ++i; continue; }
    if (c == '\n') { out += "\\n"; ++i; continue; }
    if (c == '\r') { out += "\\r"; ++i; continue; }
    if (c == '\t') { out += "\\t"; ++i; continue; }
    if (c == '\b') { out += "\\b"; ++i; continue; }
    if (c == '\f') { out += "\\f"; ++i; continue; }
    if (c < 0x20 || (ensure_ascii && c == 0x7f)) {
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
      ++i;
      continue;
    }
    if (c < 0x80 || !ensure_ascii) { out += static_cast<char>(c); ++i; continue; }
    int32_t cp = DecodeUtf8(s, i);
    if (cp >= 0x10000) {
      cp -= 0x10000;
      std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
    } else {
      std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
    }
    out += buf;
  }
  out += '"';
}

Status JsonDumpsInto(const Value& v, const JsonDumpOptions& o, int depth, int max_depth, std::string& out) {
  if (depth > max_depth) return Status::InvalidArgument("tojson: nesting too deep");
  auto newline = [&](int level) {
    if (!o.has_indent) return;
    out += '\n';
    for (int i = 0; i < level; ++i) out += o.indent;
  };
  switch (v.kind()) {
    case Value::Kind::kNone: out += "null"; return Status::Ok();
    case Value::Kind::kBool: out += v.as_bool() ? "true" : "false"; return Status::Ok();
    case Value::Kind::kInt: out += std::to_string(v.as_int()); return Status::Ok();
    case Value::Kind::kFloat: {
      double d = v.as_double();
      if (std::isnan(d)) out += "NaN";
      else if (std::isinf(d)) out += d < 0 ? "-Infinity" : "Infinity";
      else out += FloatRepr(d);
      return Status::Ok();
    }
    case Value::Kind::kString: JsonString(v.str(), o.ensure_ascii, out); return Status::Ok();
    case Value::Kind::kList: {
      const auto& items = v.list().items;
      if (items.empty()) { out += "[]"; return Status::Ok(); }
      out += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += o.item_separator;
        newline(depth + 1);
        DYN_RETURN_IF_ERROR(JsonDumpsInto(items[i], o, depth + 1, max_depth, out));
      }
      newline(depth);
      out += ']';
      return Status::Ok();
    }
    case Value::Kind::kDict: {
      std::vector<const std::pair<Value, Value>*> entries;
      for (const auto& entry : v.dict().items) entries.push_back(&entry);
      if (entries.empty()) { out += "{}"; return Status::Ok(); }
      std::vector<std::pair<std::string, const Value*>> keyed;
      for (const auto* e : entries) {
        const Value& k = e->first;
        std::string key;
        if (k.is_string()) key = k.str();
        else if (k.is_bool()) key = k.as_bool() ? "true" : "false";
        else if (k.is_none()) key = "null";
        else if (k.is_number()) { std::string tmp; DYN_RETURN_IF_ERROR(JsonDumpsInto(k, o, depth, max_depth, tmp)); key = tmp; }
        else return Status::InvalidArgument(std::string("keys must be str, int, float, bool or None, not ") + k.TypeName());
        keyed.emplace_back(std::move(key), &e->second);
      }
      if (o.sort_keys) {
        std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out += '{';
      for (size_t i = 0; i < keyed.size(); ++i) {
        if (i) out += o.item_separator;
        newline(depth + 1);
        JsonString(keyed[i].first, o.ensure_ascii, out);
        out += o.key_separator;
        DYN_RETURN_IF_ERROR(JsonDumpsInto(*keyed[i].second, o, depth + 1, max_depth, out));
      }
      newline(depth);
      out += '}';
      return Status::Ok();
    }
    default:
      return Status::InvalidArgument(std::string("Object of type ") + v.TypeName() + " is not JSON serializable");
  }
}

}  // namespace

Result<std::string> JsonDumps(const Value& value, const JsonDumpOptions& options, int max_depth) {
  std::string out;
  DYN_RETURN_IF_ERROR(JsonDumpsInto(value, options, 0, max_depth, out));
  return out;
}

namespace {

Value FromJsonAt(const boost::json::value& json, uint32_t depth) {
  if (depth > kMaxValueDepth) return Value::None();  // deeper input is cut off rather than recursed into
  switch (json.kind()) {
    case boost::json::kind::null: return Value::None();
    case boost::json::kind::bool_: return Value::Bool(json.get_bool());
    case boost::json::kind::int64: return Value::Int(json.get_int64());
    case boost::json::kind::uint64: {
      uint64_t u = json.get_uint64();
      return u > static_cast<uint64_t>(INT64_MAX) ? Value::Float(static_cast<double>(u)) : Value::Int(static_cast<int64_t>(u));
    }
    case boost::json::kind::double_: return Value::Float(json.get_double());
    case boost::json::kind::string: return Value::Str(std::string(json.get_string()));
    case boost::json::kind::array: {
      std::vector<Value> items;
      items.reserve(json.get_array().size());
      for (const auto& item : json.get_array()) items.push_back(FromJsonAt(item, depth + 1));
      return Value::List(std::move(items));
    }
    case boost::json::kind::object: {
      auto d = std::make_shared<DictObj>();
      d->items.reserve(json.get_object().size());
      for (const auto& kv : json.get_object()) {
        d->items.emplace_back(Value::Str(std::string(kv.key())), FromJsonAt(kv.value(), depth + 1));
        d->depth = std::max(d->depth, d->items.back().second.Depth() + 1);
      }
      return Value::Dict(std::move(d));
    }
  }
  return Value::None();
}

}  // namespace

Value FromJson(const boost::json::value& json) { return FromJsonAt(json, 1); }

}  // namespace dyn::tmpl
