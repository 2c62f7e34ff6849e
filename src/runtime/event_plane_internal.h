// Pieces of the event plane shared by its backends and tests; not part of the public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "runtime/event_plane.h"

namespace dyn::event_plane_internal {

// NATS subject rules: non-empty dot-separated tokens without whitespace. With `allow_wildcards`,
// a token may be "*" (exactly one token) and the last token may be ">" (one or more tokens).
Status ValidateSubject(std::string_view subject, bool allow_wildcards);

// Whether the (valid) subscription `pattern` matches the (valid, wildcard-free) `subject`.
bool SubjectMatches(std::string_view pattern, std::string_view subject);

// Limits of one "mem" subscription's queue. When either is exceeded the oldest queued message
// is dropped: a stuck subscriber costs messages, never unbounded memory.
struct MemQueueLimits {
  size_t max_messages = 65536;
  size_t max_bytes = 64u << 20;
};

// The largest payload either backend accepts by default (NATS server's default max_payload), so
// code tested against "mem" does not fail only in production.
inline constexpr size_t kMaxPayloadBytes = 1u << 20;

// A client of the process-wide bus; subscriptions it creates use `limits`.
std::unique_ptr<EventPlane> CreateMemEventPlane(MemQueueLimits limits = {});

// Messages dropped by every "mem" subscription of the process so far (full queues).
uint64_t MemDroppedMessages();

// `urls`: comma-separated NATS server URLs ("nats://h:4222,nats://h2:4222"; the scheme may be
// left off after the first).
Result<std::unique_ptr<EventPlane>> CreateNatsEventPlane(const std::string& urls);

}  // namespace dyn::event_plane_internal
