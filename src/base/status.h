// Status and Result<T>: the one error style of dyn.
//
// Everything that can fail at run time (bad input, I/O, peers) returns a Status or a Result<T> by
// value. Programmer errors are asserts, not Statuses. No exceptions cross module boundaries.
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace dyn {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // the caller's input is wrong (HTTP 400)
  kNotFound,           // a named thing does not exist (HTTP 404)
  kUnsupported,        // valid but not supported by dyn (e.g. an unknown tensor type)
  kResourceExhausted,  // out of memory, KV blocks, queue space (HTTP 429/503)
  kTooLarge,           // input exceeds a size limit (HTTP 413)
  kCancelled,          // the request was cancelled
  kUnavailable,        // a peer or service is down (HTTP 503)
  kDeadlineExceeded,   // a timeout fired
  kIoError,            // the OS said no
  kInternal,           // a bug or an invariant broken by data
};

const char* StatusCodeName(StatusCode code);

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status Unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status TooLarge(std::string m) { return {StatusCode::kTooLarge, std::move(m)}; }
  static Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status DeadlineExceeded(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
  static Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "InvalidArgument: message", or "OK".
  std::string ToString() const;
  // Returns a copy with "context: " prepended to the message.
  Status WithContext(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Either a T or a non-OK Status.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) { assert(!std::get<Status>(v_).ok()); }  // NOLINT

  bool ok() const { return v_.index() == 0; }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<1>(v_);
  }
  T& value() & { assert(ok()); return std::get<0>(v_); }
  const T& value() const& { assert(ok()); return std::get<0>(v_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace dyn

#define DYN_CONCAT_INNER_(a, b) a##b
#define DYN_CONCAT_(a, b) DYN_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function if it is not OK.
#define DYN_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::dyn::Status dyn_status_ = (expr);        \
    if (!dyn_status_.ok()) return dyn_status_; \
  } while (0)

// `lhs = *expr;` or returns its Status. lhs may be a declaration: DYN_ASSIGN_OR_RETURN(auto x, F());
#define DYN_ASSIGN_OR_RETURN(lhs, expr) DYN_ASSIGN_OR_RETURN_IMPL_(DYN_CONCAT_(dyn_result_, __LINE__), lhs, expr)
#define DYN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
