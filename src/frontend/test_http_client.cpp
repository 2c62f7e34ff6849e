#include "frontend/test_http_client.h"

#include <chrono>
#include <thread>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json/parse.hpp>

namespace dyn::test {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

boost::json::value HttpResponse::Json() const {
  boost::system::error_code ec;
  auto v = boost::json::parse(body, ec);
  return ec ? boost::json::value() : v;
}

struct HttpClient::Impl {
  asio::io_context ioc;
  tcp::socket socket{ioc};
  beast::flat_buffer buffer;
  int port;
  void Connect() {
    socket = tcp::socket(ioc);
    socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
    buffer.clear();
  }
};

HttpClient::HttpClient(int port) : impl_(std::make_unique<Impl>()) {
  impl_->port = port;
  impl_->Connect();
}
HttpClient::~HttpClient() = default;

HttpResponse HttpClient::Request(const std::string& method, const std::string& target, const std::string& body,
                                 const std::map<std::string, std::string>& headers) {
  http::request<http::string_body> req(http::string_to_verb(method), target, 11);
  req.set(http::field::host, "127.0.0.1");
  if (!body.empty() || method == "POST") {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  for (const auto& [k, v] : headers) req.set(k, v);
  beast::error_code ec;
  http::write(impl_->socket, req, ec);
  HttpResponse out;
  if (ec) return out;
  http::response_parser<http::string_body> parser;
  parser.body_limit(1u << 30);
  http::read(impl_->socket, impl_->buffer, parser, ec);
  if (ec) return out;
  auto res = parser.release();
  out.status = static_cast<int>(res.result_int());
  out.body = res.body();
  for (const auto& field : res) {
    std::string name(field.name_string());
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    out.headers[name] = std::string(field.value());
  }
  if (!res.keep_alive()) impl_->Connect();
  return out;
}

std::string RawExchange(int port, const std::string& bytes, int max_wait_ms) {
  asio::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
  asio::write(socket, asio::buffer(bytes));
  std::string out;
  char buf[4096];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(max_wait_ms);
  socket.non_blocking(true);
  while (std::chrono::steady_clock::now() < deadline) {
    beast::error_code ec;
    size_t n = socket.read_some(asio::buffer(buf), ec);
    if (ec == asio::error::would_block) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      continue;
    }
    if (ec) break;
    out.append(buf, n);
  }
  return out;
}

std::vector<boost::json::value> ParseSse(const std::string& body, bool* done) {
  std::vector<boost::json::value> out;
  *done = false;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) break;
    std::string event = body.substr(pos, end - pos);
    pos = end + 2;
    if (event.rfind("data: ", 0) != 0) continue;
    std::string data = event.substr(6);
    if (data == "[DONE]") {
      *done = true;
      continue;
    }
    boost::system::error_code ec;
    auto v = boost::json::parse(data, ec);
    out.push_back(ec ? boost::json::value("<bad json>") : v);
  }
  return out;
}

}  // namespace dyn::test
