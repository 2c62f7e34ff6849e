// A small blocking HTTP/1.1 client for the frontend's tests (Beast over a real socket).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/json/value.hpp>

namespace dyn::test {

struct HttpResponse {
  int status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
  boost::json::value Json() const;              // null when the body is not JSON
};

// One keep-alive connection to 127.0.0.1:port.
class HttpClient {
 public:
  explicit HttpClient(int port);
  ~HttpClient();
  HttpResponse Request(const std::string& method, const std::string& target, const std::string& body = "",
                       const std::map<std::string, std::string>& headers = {});
  HttpResponse Post(const std::string& target, const std::string& body) { return Request("POST", target, body); }
  HttpResponse Get(const std::string& target) { return Request("GET", target); }

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Sends raw bytes on a fresh connection and returns everything read until the server closes
// or `max_wait_ms` passes.
std::string RawExchange(int port, const std::string& bytes, int max_wait_ms = 2000);

// Splits an SSE body into its data payloads; "[DONE]" sets *done and is not returned.
std::vector<boost::json::value> ParseSse(const std::string& body, bool* done);

}  // namespace dyn::test
