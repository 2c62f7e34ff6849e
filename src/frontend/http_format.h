// HTTP/1.1 response framing as bytes: whole responses and chunked (SSE) streams.
#pragma once

#include <string>
#include <string_view>

namespace dyn {

const char* HttpReason(int status);

// A complete response with Content-Length. `extra_headers` is "Name: value\r\n" lines.
std::string FormatHttpResponse(int status, std::string_view content_type, std::string_view body,
                               std::string_view request_id, bool keep_alive, std::string_view extra_headers = "");
// The head of a chunked text/event-stream response.
std::string FormatSseHead(std::string_view request_id, bool keep_alive, std::string_view extra_headers = "");
// One chunk of a chunked body; an empty `data` is skipped (it would end the body).
void AppendChunk(std::string* out, std::string_view data);
// The terminating chunk.
inline constexpr std::string_view kLastChunk = "0\r\n\r\n";

}  // namespace dyn
