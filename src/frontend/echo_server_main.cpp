// frontend_echo_server: the HTTP frontend over the echo engine, with the command line of
// `dyn run` (the subset it needs), so the frontend can be tested and benchmarked alone:
//   frontend_echo_server run --model <hf dir> [--host H] [--port N] [--served-model-name S]
//       [--chat-template FILE] [--echo-delay-ms D] [--io-threads T] [--context-length C]
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

#include "base/file.h"
#include "base/log.h"
#include "engine/echo/echo_engine.h"
#include "frontend/frontend.h"
#include "llm/template/chat_template.h"
#include "llm/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  using namespace dyn;
  std::string model_path, name, host = "0.0.0.0", template_path;
  int port = 8000, io_threads = 1;
  double delay_ms = 0;
  uint32_t context = 1u << 20;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "run" || a == "--engine") {
      if (a == "--engine") next();
    } else if (a == "--model") model_path = next();
    else if (a == "--host") host = next();
    else if (a == "--port") port = std::atoi(next().c_str());
    else if (a == "--served-model-name") name = next();
    else if (a == "--chat-template") template_path = next();
    else if (a == "--echo-delay-ms") delay_ms = std::atof(next().c_str());
    else if (a == "--io-threads") io_threads = std::atoi(next().c_str());
    else if (a == "--context-length") context = static_cast<uint32_t>(std::atol(next().c_str()));
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (model_path.empty()) {
    std::fprintf(stderr, "--model is required\n");
    return 2;
  }
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto tok = Tokenizer::FromDirectory(model_path);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
    return 1;
  }
  ServedModel m;
  m.name = name.empty() ? "echo" : name;
  std::string source = (*tok)->info().chat_template;
  if (!template_path.empty()) {
    auto text = ReadFile(template_path);
    if (!text.ok()) {
      std::fprintf(stderr, "%s\n", text.status().ToString().c_str());
      return 1;
    }
    source = *text;
  }
  if (!source.empty()) {
    auto t = ChatTemplate::Parse(source);
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
      return 1;
    }
    m.chat_template = std::shared_ptr<const ChatTemplate>(std::move(*t));
  }
  if ((*tok)->info().eos_id) m.eos_token_ids.push_back(*(*tok)->info().eos_id);
  m.tokenizer = std::shared_ptr<const Tokenizer>(std::move(*tok));
  m.engine = CreateEchoEngine({.token_delay_ms = delay_ms});
  m.context_length = context;
  m.created_unix = static_cast<int64_t>(std::time(nullptr));
  EnginePtr engine = m.engine;
  auto registry = std::make_shared<ModelRegistry>();
  if (Status s = registry->Add(std::move(m)); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  auto frontend = HttpFrontend::Start({.host = host, .port = port, .io_threads = io_threads}, registry);
  if (!frontend.ok()) {
    std::fprintf(stderr, "%s\n", frontend.status().ToString().c_str());
    return 1;
  }
  DYN_LOG(INFO) << "echo frontend on http://" << host << ":" << (*frontend)->port();
  int sig = 0;
  sigwait(&sigs, &sig);
  (*frontend)->Stop();
  engine->Shutdown();
  return 0;
}
