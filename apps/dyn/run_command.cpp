// dyn run: frontend + engine in one process, no external services.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>

#include "apps/dyn/commands.h"
#include "apps/dyn/serving_model.h"
#include "base/flags.h"
#include "base/log.h"
#include "engine/echo/echo_engine.h"
#include "engine/native/model/model.h"
#include "engine/native/sched/native_engine.h"
#include "frontend/frontend.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {

int RunCommand(int argc, char** argv) {
  std::string model_path, served_name, engine_name = "native", host = "0.0.0.0", chat_template;
  int64_t port = 8000, threads = 0, block_size = 16, kv_cache_mb = 512, num_kv_blocks = 0;
  int64_t max_num_seqs = 64, max_batched = 2048, context_length = 0, max_body_mb = 8, io_threads = 1;
  double echo_delay_ms = 0;
  bool prefix_caching = true;
  FlagSet fs("dyn run", "Serves a model over the OpenAI API from one process (frontend and engine together).");
  fs.String("model", &model_path, "Hugging Face model directory or .gguf file (required)");
  fs.String("served-model-name", &served_name, "name clients use in 'model' (default: from the path)");
  fs.String("engine", &engine_name, "native | echo");
  fs.String("host", &host, "address to listen on");
  fs.Int("port", &port, "HTTP port (0: pick a free one)");
  fs.Int("threads", &threads, "CPU threads for the native engine (0: all cores)");
  fs.Int("block-size", &block_size, "KV cache block size in tokens");
  fs.Int("kv-cache-mb", &kv_cache_mb, "KV cache size in MiB (when --num-kv-blocks is 0)");
  fs.Int("num-kv-blocks", &num_kv_blocks, "KV cache size in blocks (0: from --kv-cache-mb)");
  fs.Int("max-num-seqs", &max_num_seqs, "most requests in one batch");
  fs.Int("max-num-batched-tokens", &max_batched, "most tokens in one step (chunked prefill budget)");
  fs.Bool("prefix-caching", &prefix_caching, "reuse cached KV blocks of shared prompt prefixes");
  fs.Int("context-length", &context_length, "limit the context below the model's (0: the model's)");
  fs.String("chat-template", &chat_template, "file with a Jinja chat template that overrides the model's");
  fs.Int("max-body-mb", &max_body_mb, "largest request body accepted (MiB)");
  fs.Int("io-threads", &io_threads, "HTTP I/O threads");
  fs.Double("echo-delay-ms", &echo_delay_ms, "echo engine: delay between tokens");
  if (Status s = fs.Parse(argc, argv); !s.ok()) {
    std::fprintf(stderr, "dyn run: %s\n", s.message().c_str());
    return 2;
  }
  if (fs.help_requested()) {
    std::fputs(fs.Usage().c_str(), stdout);
    return 0;
  }
  if (model_path.empty() && !fs.positional().empty()) model_path = fs.positional()[0];
  if (model_path.empty()) {
    std::fprintf(stderr, "dyn run: --model is required\n%s", fs.Usage().c_str());
    return 2;
  }

  // Block the signals before any thread starts so that only sigwait below receives them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto t0 = std::chrono::steady_clock::now();
  auto assets = LoadModelAssets(model_path, chat_template);
  if (!assets.ok()) {
    std::fprintf(stderr, "dyn run: %s\n", assets.status().ToString().c_str());
    return 1;
  }
  ServedModel served;
  served.name = served_name.empty() ? assets->default_name : served_name;
  served.tokenizer = assets->tokenizer;
  served.chat_template = assets->chat_template;
  served.created_unix = static_cast<int64_t>(std::time(nullptr));

  if (engine_name == "native") {
    ModelLoadOptions lo;
    lo.num_threads = static_cast<int>(threads);
    auto model = LoadModel(model_path, lo);
    if (!model.ok()) {
      std::fprintf(stderr, "dyn run: %s\n", model.status().ToString().c_str());
      return 1;
    }
    const ModelConfig& cfg = (*model)->config();
    DYN_LOG(INFO) << "model: " << (*model)->Describe();
    served.context_length = static_cast<uint32_t>(cfg.max_position_embeddings);
    served.eos_token_ids = cfg.eos_token_ids;
    NativeEngineOptions eo;
    eo.block_size = static_cast<int>(block_size);
    eo.num_kv_blocks = static_cast<int>(num_kv_blocks);
    eo.kv_cache_bytes = static_cast<size_t>(kv_cache_mb) << 20;
    eo.max_num_seqs = static_cast<int>(max_num_seqs);
    eo.max_num_batched_tokens = static_cast<int>(max_batched);
    eo.enable_prefix_caching = prefix_caching;
    auto engine = CreateNativeEngine(std::move(*model), eo);
    if (!engine.ok()) {
      std::fprintf(stderr, "dyn run: %s\n", engine.status().ToString().c_str());
      return 1;
    }
    served.engine = *engine;
  } else if (engine_name == "echo") {
    EchoEngineOptions eo;
    eo.token_delay_ms = echo_delay_ms;
    served.engine = CreateEchoEngine(eo);
    // The echo engine has no context of its own; a bounded one keeps the default max_tokens
    // (the rest of the context) finite.
    served.context_length = 8192;
  } else {
    std::fprintf(stderr, "dyn run: unknown --engine '%s' (native | echo)\n", engine_name.c_str());
    return 2;
  }
  if (served.eos_token_ids.empty() && served.tokenizer->info().eos_id)
    served.eos_token_ids.push_back(*served.tokenizer->info().eos_id);
  if (context_length > 0) served.context_length = std::min<uint32_t>(served.context_length, static_cast<uint32_t>(context_length));

  auto registry = std::make_shared<ModelRegistry>();
  EnginePtr engine = served.engine;
  std::string name = served.name;
  if (Status s = registry->Add(std::move(served)); !s.ok()) {
    std::fprintf(stderr, "dyn run: %s\n", s.ToString().c_str());
    engine->Shutdown();
    return 1;
  }
  HttpFrontendOptions ho;
  ho.host = host;
  ho.port = static_cast<int>(port);
  ho.io_threads = static_cast<int>(io_threads);
  ho.max_body_bytes = static_cast<size_t>(max_body_mb) << 20;
  auto frontend = HttpFrontend::Start(ho, registry);
  if (!frontend.ok()) {
    std::fprintf(stderr, "dyn run: %s\n", frontend.status().ToString().c_str());
    engine->Shutdown();
    return 1;
  }
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  DYN_LOG(INFO) << "serving model '" << name << "' with engine " << engine_name << " on http://" << host << ":"
                << (*frontend)->port() << " (ready in " << load_s << " s)";

  int sig = 0;
  sigwait(&sigs, &sig);
  DYN_LOG(INFO) << "signal " << sig << ": shutting down";
  (*frontend)->Stop();
  engine->Shutdown();
  return 0;
}

}  // namespace dyn
