#include "frontend/json_fields.h"

#include <cmath>
#include <limits>

#include <boost/json/serialize.hpp>

namespace dyn {

std::string ApiError::ToJson() const {
  boost::json::object err;
  err["message"] = message;
  err["type"] = type;
  if (param.empty()) err["param"] = nullptr; else err["param"] = param;
  if (code.empty()) err["code"] = nullptr; else err["code"] = code;
  boost::json::object body;
  body["error"] = std::move(err);
  return boost::json::serialize(body);
}

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::optional<int64_t> JsonToInt(const boost::json::value& v) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64()) {
    if (v.get_uint64() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v.get_uint64());
  }
  if (v.is_double()) {
    double d = v.get_double();
    if (std::floor(d) == d && std::fabs(d) < 9e18) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

const boost::json::value* JsonFields::Get(std::string_view key) const {
  const boost::json::value* v = object_.if_contains(key);
  return (v && !v->is_null()) ? v : nullptr;
}

void JsonFields::Fail(ApiError error) {
  if (!error_) error_ = std::move(error);
}

void JsonFields::TypeError(std::string_view key, std::string_view expected) {
  Fail(ApiError::BadRequest(std::string(key) + ": expected " + std::string(expected), std::string(key),
                            "invalid_type"));
}

void JsonFields::CheckRange(std::string_view key, double value, double lo, double hi) {
  if (!Has(key) || (value >= lo && value <= hi)) return;
  std::string lo_s = std::to_string(lo), hi_s = std::to_string(hi);
  auto trim = [](std::string s) {
    while (s.size() > 1 && s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
    return s;
  };
  Fail(ApiError::BadRequest(std::string(key) + ": must be in [" + trim(lo_s) + ", " + trim(hi_s) + "], got " +
                                trim(std::to_string(value)),
                            std::string(key)));
}

bool JsonFields::Bool(std::string_view key, bool* out) {
  const auto* v = Get(key);
  if (!v) return false;
  if (!v->is_bool()) {
    TypeError(key, "a boolean");
    return false;
  }
  *out = v->get_bool();
  return true;
}

bool JsonFields::Number(std::string_view key, double* out) {
  const auto* v = Get(key);
  if (!v) return false;
  if (!v->is_number()) {
    TypeError(key, "a number");
    return false;
  }
  *out = v->to_number<double>();
  return true;
}

bool JsonFields::Int(std::string_view key, int64_t* out) {
  const auto* v = Get(key);
  if (!v) return false;
  auto i = JsonToInt(*v);
  if (!i) {
    TypeError(key, "an integer");
    return false;
  }
  *out = *i;
  return true;
}

bool JsonFields::String(std::string_view key, std::string* out) {
  const auto* v = Get(key);
  if (!v) return false;
  if (!v->is_string()) {
    TypeError(key, "a string");
    return false;
  }
  *out = std::string(v->get_string());
  return true;
}

bool JsonFields::Object(std::string_view key, const boost::json::object** out) {
  const auto* v = Get(key);
  if (!v) return false;
  if (!v->is_object()) {
    TypeError(key, "an object");
    return false;
  }
  *out = &v->get_object();
  return true;
}

bool JsonFields::Array(std::string_view key, const boost::json::array** out) {
  const auto* v = Get(key);
  if (!v) return false;
  if (!v->is_array()) {
    TypeError(key, "an array");
    return false;
  }
  *out = &v->get_array();
  return true;
}

}  // namespace dyn
