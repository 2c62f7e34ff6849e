// CreateEventPlane and the subject rules shared by the backends.
#include "runtime/event_plane.h"

#include <cctype>

#include "runtime/event_plane_internal.h"

namespace dyn {
namespace event_plane_internal {
namespace {

// Splits off the token before the next '.'; `rest` keeps what follows it.
std::string_view NextToken(std::string_view& rest, bool& more) {
  size_t dot = rest.find('.');
  if (dot == std::string_view::npos) {
    std::string_view token = rest;
    rest = {};
    more = false;
    return token;
  }
  std::string_view token = rest.substr(0, dot);
  rest.remove_prefix(dot + 1);
  more = true;
  return token;
}

}  // namespace

Status ValidateSubject(std::string_view subject, bool allow_wildcards) {
  if (subject.empty()) return Status::InvalidArgument("empty subject");
  std::string_view rest = subject;
  bool more = true;
  while (more) {
    std::string_view token = NextToken(rest, more);
    if (token.empty()) return Status::InvalidArgument("empty token in subject '" + std::string(subject) + "'");
    for (char c : token) {
      // The NATS protocol separates fields by whitespace, so a subject cannot contain any.
      if (std::isspace(static_cast<unsigned char>(c)) || c == '\0') {
        return Status::InvalidArgument("whitespace in subject '" + std::string(subject) + "'");
      }
    }
    bool wildcard = token == "*" || token == ">";
    if (wildcard && !allow_wildcards) {
      return Status::InvalidArgument("wildcard in publish subject '" + std::string(subject) + "'");
    }
    if (token == ">" && more) {
      return Status::InvalidArgument("'>' must be the last token of '" + std::string(subject) + "'");
    }
  }
  return Status::Ok();
}

bool SubjectMatches(std::string_view pattern, std::string_view subject) {
  bool pattern_more = true;
  bool subject_more = true;
  while (pattern_more) {
    std::string_view p = NextToken(pattern, pattern_more);
    if (!subject_more) return false;  // the pattern has tokens left, the subject none
    if (p == ">") return true;        // ">" takes one or more tokens; at least one is left
    std::string_view s = NextToken(subject, subject_more);
    if (p != "*" && p != s) return false;
  }
  return !subject_more;
}

}  // namespace event_plane_internal

Result<std::unique_ptr<EventPlane>> CreateEventPlane(const std::string& spec) {
  if (spec == "mem") return event_plane_internal::CreateMemEventPlane();
  if (spec.rfind("nats://", 0) == 0) return event_plane_internal::CreateNatsEventPlane(spec);
  return Status::InvalidArgument("unknown event plane '" + spec + "' (want \"mem\" or \"nats://host:port\")");
}

}  // namespace dyn
