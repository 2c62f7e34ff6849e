// OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}} with an HTTP status.
#pragma once

#include <string>

namespace dyn {

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";  // OpenAI's error types
  std::string param;                           // the offending field ("" = null)
  std::string code;                            // short machine-readable reason ("" = null)

  static ApiError BadRequest(std::string message, std::string param = "", std::string code = "invalid_value") {
    return {400, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
  }
  static ApiError NotFound(std::string message, std::string param = "", std::string code = "not_found") {
    return {404, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
  }
  static ApiError Internal(std::string message) {
    return {500, std::move(message), "server_error", "", "internal_error"};
  }

  std::string ToJson() const;  // the response body
};

// True when `s` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool IsValidUtf8(std::string_view s);

}  // namespace dyn
