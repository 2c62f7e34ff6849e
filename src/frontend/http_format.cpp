#include "frontend/http_format.h"

#include <cstdio>

namespace dyn {

const char* HttpReason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

namespace {
void AppendCommonHeaders(std::string* out, int status, std::string_view request_id, bool keep_alive) {
  out->append("HTTP/1.1 ").append(std::to_string(status)).append(" ").append(HttpReason(status)).append("\r\n");
  out->append("Server: dyn\r\n");
  if (!request_id.empty()) out->append("x-request-id: ").append(request_id).append("\r\n");
  out->append(keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
}
}  // namespace

std::string FormatHttpResponse(int status, std::string_view content_type, std::string_view body,
                               std::string_view request_id, bool keep_alive, std::string_view extra_headers) {
  std::string out;
  out.reserve(body.size() + 200);
  AppendCommonHeaders(&out, status, request_id, keep_alive);
  out.append("Content-Type: ").append(content_type).append("\r\n");
  out.append("Content-Length: ").append(std::to_string(body.size())).append("\r\n");
  out.append(extra_headers);
  out.append("\r\n");
  out.append(body);
  return out;
}

std::string FormatSseHead(std::string_view request_id, bool keep_alive, std::string_view extra_headers) {
  std::string out;
  AppendCommonHeaders(&out, 200, request_id, keep_alive);
  out.append("Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n");
  out.append(extra_headers);
  out.append("\r\n");
  return out;
}

void AppendChunk(std::string* out, std::string_view data) {
  if (data.empty()) return;
  char size[24];
  std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  out->append(size).append(data).append("\r\n");
}

}  // namespace dyn
