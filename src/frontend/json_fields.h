// Typed access to the fields of a JSON request body. The first type error is kept as an
// ApiError naming the field; absent and null fields leave the output unchanged.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "frontend/api_error.h"

namespace dyn {

class JsonFields {
 public:
  explicit JsonFields(const boost::json::object& object) : object_(object) {}

  // The field, or nullptr when absent or null.
  const boost::json::value* Get(std::string_view key) const;
  bool Has(std::string_view key) const { return Get(key) != nullptr; }

  // Each returns true when the field was present with the right type (and sets *out).
  bool Bool(std::string_view key, bool* out);
  bool Number(std::string_view key, double* out);
  bool Int(std::string_view key, int64_t* out);  // integers, or doubles with no fraction
  bool String(std::string_view key, std::string* out);
  bool Object(std::string_view key, const boost::json::object** out);
  bool Array(std::string_view key, const boost::json::array** out);

  // Records an error unless one is already recorded.
  void Fail(ApiError error);
  void TypeError(std::string_view key, std::string_view expected);
  // Records "key: must be in [lo, hi]" when present and out of range.
  void CheckRange(std::string_view key, double value, double lo, double hi);

  const std::optional<ApiError>& error() const { return error_; }

 private:
  const boost::json::object& object_;
  std::optional<ApiError> error_;
};

// Converts a JSON number (int64, uint64 or integral double) to int64.
std::optional<int64_t> JsonToInt(const boost::json::value& v);

}  // namespace dyn
