// The frontend's answers to bad input and to clients that go away, over real sockets.
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include "frontend/frontend_test_fixture.h"

namespace dyn::test {
namespace {
namespace json = boost::json;

struct BadCase {
  const char* name;
  const char* method;
  const char* path;
  std::string body;
  int status;
  const char* param;  // "" = not checked
};

TEST_F(FrontendTest, BadInputGetsOpenAiErrorsAndServerKeepsServing) {
  const std::string long_prompt = [] {
    std::string s;
    for (int i = 0; i < 400; ++i) s += "the cat sat on the mat ";
    return s;
  }();
  const std::vector<BadCase> cases = {
      {"malformed json", "POST", "/v1/completions", R"({"model":"stories",)", 400, ""},
      {"not an object", "POST", "/v1/completions", R"([1,2])", 400, ""},
      {"max_tokens wrong type", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":"ten"})", 400, "max_tokens"},
      {"stream wrong type", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","stream":"yes"})", 400, "stream"},
      {"stop wrong type", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","stop":5})", 400, "stop"},
      {"prompt wrong type", "POST", "/v1/completions", R"({"model":"stories","prompt":{"a":1}})", 400, "prompt"},
      {"token id out of vocab", "POST", "/v1/completions", R"({"model":"stories","prompt":[1,99999]})", 400, "prompt"},
      {"missing prompt", "POST", "/v1/completions", R"({"model":"stories"})", 400, "prompt"},
      {"missing model", "POST", "/v1/completions", R"({"prompt":"a"})", 400, "model"},
      {"missing messages", "POST", "/v1/chat/completions", R"({"model":"stories"})", 400, "messages"},
      {"messages wrong type", "POST", "/v1/chat/completions", R"({"model":"stories","messages":"hi"})", 400, "messages"},
      {"message without role", "POST", "/v1/chat/completions", R"({"model":"stories","messages":[{"content":"hi"}]})", 400, "messages"},
      {"unknown model", "POST", "/v1/completions", R"({"model":"gpt-9","prompt":"a"})", 404, "model"},
      {"max_tokens zero", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":0})", 400, "max_tokens"},
      {"max_tokens negative", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":-3})", 400, "max_tokens"},
      {"max_completion_tokens zero", "POST", "/v1/chat/completions",
       R"({"model":"stories","messages":[{"role":"user","content":"a"}],"max_completion_tokens":0})", 400, "max_completion_tokens"},
      {"max_tokens past context", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":600})", 400, "max_tokens"},
      {"prompt past context", "POST", "/v1/completions", R"({"model":"stories","prompt":")" + long_prompt + R"("})", 400, "prompt"},
      {"n zero", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","n":0})", 400, "n"},
      {"n too large", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","n":100000})", 400, "n"},
      {"temperature too high", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","temperature":3.5})", 400, "temperature"},
      {"temperature negative", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","temperature":-1})", 400, "temperature"},
      {"top_p zero", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","top_p":0})", 400, "top_p"},
      {"top_logprobs without logprobs", "POST", "/v1/chat/completions",
       R"({"model":"stories","messages":[{"role":"user","content":"a"}],"top_logprobs":3})", 400, "top_logprobs"},
      {"logprobs too many", "POST", "/v1/completions", R"({"model":"stories","prompt":"a","logprobs":50})", 400, "logprobs"},
      {"no chat template", "POST", "/v1/chat/completions", R"({"model":"no-template","messages":[{"role":"user","content":"a"}]})", 400, "messages"},
      {"image content", "POST", "/v1/chat/completions",
       R"({"model":"stories","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]})", 400, "messages"},
      {"response_format json", "POST", "/v1/completions",
       R"({"model":"stories","prompt":"a","response_format":{"type":"json_object"}})", 400, "response_format"},
      {"invalid utf-8", "POST", "/v1/completions", "{\"model\":\"stories\",\"prompt\":\"a\xff\xfe\"}", 400, ""},
      {"overlong utf-8", "POST", "/v1/completions", "{\"model\":\"stories\",\"prompt\":\"\xc0\xaf\"}", 400, ""},
      {"body too large", "POST", "/v1/completions", R"({"model":"stories","prompt":")" + std::string(100 * 1024, 'a') + R"("})", 413, ""},
      {"unknown path", "GET", "/v2/whatever", "", 404, ""},
      {"wrong method", "GET", "/v1/completions", "", 405, ""},
      {"wrong method post", "POST", "/health", "{}", 405, ""},
      {"engine error", "POST", "/v1/completions", R"({"model":"failing","prompt":"a","max_tokens":2})", 500, ""},
      {"tokenize unknown model", "POST", "/tokenize", R"({"model":"nope","prompt":"a"})", 404, "model"},
      {"detokenize bad tokens", "POST", "/detokenize", R"({"model":"stories","tokens":["a"]})", 400, "tokens"},
  };
  for (const auto& c : cases) {
    HttpClient client(frontend_->port());
    auto r = client.Request(c.method, c.path, c.body);
    EXPECT_EQ(r.status, c.status) << c.name << ": " << r.body;
    auto body = r.Json();
    ASSERT_TRUE(body.is_object()) << c.name << ": " << r.body;
    const auto& err = body.at("error");
    EXPECT_TRUE(err.at("message").is_string()) << c.name;
    EXPECT_FALSE(err.at("message").as_string().empty()) << c.name;
    EXPECT_TRUE(err.at("type").is_string()) << c.name;
    EXPECT_TRUE(err.as_object().contains("param")) << c.name;
    EXPECT_TRUE(err.as_object().contains("code")) << c.name;
    if (*c.param) {
      ASSERT_TRUE(err.at("param").is_string()) << c.name << ": " << r.body;
      EXPECT_EQ(err.at("param").as_string(), c.param) << c.name;
    }
    if (c.status == 405) {
      EXPECT_FALSE(r.headers["allow"].empty()) << c.name;
    }
    // The server keeps serving (on a fresh connection where the error closed this one).
    HttpClient after(frontend_->port());
    EXPECT_EQ(after.Get("/health").status, 200) << c.name;
  }
  auto ok = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":2})");
  EXPECT_EQ(ok.status, 200);
}

TEST_F(FrontendTest, ContextErrorsSayTheLengths) {
  auto r = client_->Post("/v1/completions", R"({"model":"stories","prompt":"a","max_tokens":600})");
  const std::string msg(r.Json().at("error").at("message").as_string());
  EXPECT_NE(msg.find("512"), std::string::npos) << msg;
  EXPECT_NE(msg.find("600"), std::string::npos) << msg;
  EXPECT_EQ(r.Json().at("error").at("code").as_string(), "context_length_exceeded");
}

// A stream's head goes out with its first delta, so an engine that fails before producing a token
// still gets its real status and an OpenAI error body, streaming or not.
TEST_F(FrontendTest, EngineErrorBeforeAnyTokenGetsItsStatusEvenWhenStreaming) {
  auto r = client_->Post("/v1/completions", R"({"model":"failing","prompt":"a","stream":true,"max_tokens":2})");
  EXPECT_EQ(r.status, 500);
  boost::system::error_code ec;
  auto v = boost::json::parse(r.body, ec);
  ASSERT_FALSE(ec) << r.body;
  EXPECT_NE(std::string(v.at("error").at("message").as_string()).find("GPU caught fire"), std::string::npos);
}

TEST_F(FrontendTest, MalformedHttpGets400) {
  std::string reply = RawExchange(frontend_->port(), "THIS IS NOT HTTP\r\n\r\n");
  EXPECT_EQ(reply.rfind("HTTP/1.1 400", 0), 0u) << reply;
}

std::string RawPost(const std::string& body) {
  return "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

TEST_F(FrontendTest, DisconnectMidStreamCancelsEngineRequest) {
  namespace asio = boost::asio;
  asio::io_context ioc;
  asio::ip::tcp::socket socket(ioc);
  socket.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(frontend_->port())});
  asio::write(socket, asio::buffer(RawPost(R"({"model":"slow","prompt":"once upon a time","max_tokens":500,"stream":true})")));
  char buf[512];
  size_t n = socket.read_some(asio::buffer(buf));  // the stream has started
  EXPECT_GT(n, 0u);
  socket.close();
  EXPECT_TRUE(slow_->WaitCancelled(1)) << "the engine never saw the cancel";
  EXPECT_EQ(client_->Get("/health").status, 200);
}

TEST_F(FrontendTest, DisconnectWhileWaitingForNonStreamingCancels) {
  namespace asio = boost::asio;
  asio::io_context ioc;
  asio::ip::tcp::socket socket(ioc);
  socket.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(frontend_->port())});
  asio::write(socket, asio::buffer(RawPost(R"({"model":"slow","prompt":"once upon a time","max_tokens":500,"n":2})")));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // generating; nothing written yet
  socket.close();
  EXPECT_TRUE(slow_->WaitCancelled(2)) << "the engine never saw the cancels";
  auto m = client_->Get("/metrics");
  EXPECT_NE(m.body.find("status=\"499\""), std::string::npos);
}

TEST_F(FrontendTest, StopWhileStreamingCancelsAndIsIdempotent) {
  std::thread client([port = frontend_->port()] {
    RawExchange(port, RawPost(R"({"model":"slow","prompt":"once upon a time","max_tokens":500,"stream":true})"), 3000);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  frontend_->Stop();
  frontend_->Stop();
  EXPECT_TRUE(slow_->WaitCancelled(1));
  client.join();
}

TEST_F(FrontendTest, PipelinedRequestsAreAnsweredInOrder) {
  const std::string a = RawPost(R"({"model":"stories","prompt":"a","max_tokens":2})");
  const std::string h = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  std::string reply = RawExchange(frontend_->port(), a + a + h);
  size_t first = reply.find("HTTP/1.1 200");
  size_t second = reply.find("HTTP/1.1 200", first + 1);
  size_t third = reply.find("HTTP/1.1 200", second + 1);
  EXPECT_NE(third, std::string::npos) << reply;
  EXPECT_NE(reply.find("healthy", third), std::string::npos);
}

}  // namespace
}  // namespace dyn::test

namespace dyn::test {
namespace {

TEST_F(FrontendTest, ExpectContinueIsAnswered) {
  const std::string body = R"({"model":"stories","prompt":"a","max_tokens":2})";
  std::string reply = RawExchange(frontend_->port(),
                                  "POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                                  "Content-Type: application/json\r\nContent-Length: " +
                                      std::to_string(body.size()) + "\r\n\r\n" + body);
  EXPECT_EQ(reply.rfind("HTTP/1.1 100 Continue\r\n\r\n", 0), 0u) << reply;
  EXPECT_NE(reply.find("HTTP/1.1 200 OK"), std::string::npos) << reply;
}

TEST_F(FrontendTest, OversizedContentLengthIsRefusedBeforeTheBody) {
  std::string reply = RawExchange(frontend_->port(),
                                  "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  "Content-Length: 999999999\r\n\r\n{\"model\":");
  EXPECT_EQ(reply.rfind("HTTP/1.1 413", 0), 0u) << reply;
}

}  // namespace
}  // namespace dyn::test

namespace dyn::test {
namespace {

TEST_F(FrontendTest, StartFailsOnAPortInUseAndOnABadHost) {
  HttpFrontendOptions options;
  options.host = "127.0.0.1";
  options.port = frontend_->port();
  auto second = HttpFrontend::Start(options, registry_);
  EXPECT_FALSE(second.ok());
  options.host = "not-an-address";
  options.port = 0;
  auto bad = HttpFrontend::Start(options, registry_);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dyn::test
