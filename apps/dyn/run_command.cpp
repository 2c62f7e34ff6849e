// dyn run: frontend + engine in one process, no external services.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>

#include "apps/dyn/command_util.h"
#include "apps/dyn/commands.h"
#include "apps/dyn/local_cluster.h"
#include "apps/dyn/local_engine.h"
#include "apps/dyn/router_flags.h"
#include "base/flags.h"
#include "base/log.h"
#include "frontend/frontend.h"

namespace dyn {

int RunCommand(int argc, char** argv) {
  LocalEngineFlags ef;
  std::string host = "0.0.0.0";
  int64_t port = 8000, max_body_mb = 8, io_threads = 1, workers = 1, prefill_workers = 0;
  std::string kv_transport = "shm";
  double kv_lease_timeout = 30;
  RouterFlags rf;
  FlagSet fs("dyn run", "Serves a model over the OpenAI API from one process (frontend and engine together).");
  ef.Register(fs);
  fs.Int("workers", &workers, "engines in this process; > 1 puts the router (--router-mode) in front of them");
  fs.Int("prefill-workers", &prefill_workers,
         "disaggregated serving: this many prefill workers in front of the --workers decode workers (0: off)");
  fs.String("kv-transport", &kv_transport, "prefill workers' KV transfer backend: shm | tcp");
  fs.Double("kv-lease-timeout", &kv_lease_timeout, "seconds a prefilled prompt's KV waits for its decode worker");
  rf.Register(fs);
  rf.RegisterDisagg(fs);
  fs.String("host", &host, "address to listen on");
  fs.Int("port", &port, "HTTP port (0: pick a free one)");
  fs.Int("max-body-mb", &max_body_mb, "largest request body accepted (MiB)");
  fs.Int("io-threads", &io_threads, "HTTP I/O threads");
  if (int rc = ParseCommandFlags(fs, argc, argv, "dyn run"); rc >= 0) return rc;
  if (int rc = RequireModelPath(fs, &ef.model_path, "dyn run"); rc >= 0) return rc;

  const sigset_t sigs = BlockTerminationSignals();  // before any thread starts

  auto router_options = rf.ToOptions(/*have_events=*/true);
  if (!router_options.ok() || workers < 1) {
    std::fprintf(stderr, "dyn run: %s\n",
                 workers < 1 ? "--workers must be at least 1" : router_options.status().message().c_str());
    return 2;
  }

  auto t0 = std::chrono::steady_clock::now();
  ServedModel served;
  std::unique_ptr<LocalCluster> cluster;
  if (workers > 1 || prefill_workers > 0) {
    LocalClusterOptions co;
    co.workers = static_cast<int>(workers);
    co.prefill_workers = static_cast<int>(prefill_workers);
    co.kv_transport = kv_transport;
    co.kv_lease_timeout_s = kv_lease_timeout;
    co.max_local_prefill_tokens = static_cast<int>(rf.max_local_prefill_tokens);
    co.router = *router_options;
    auto started = LocalCluster::Start(ef, co, &served);
    if (!started.ok()) {
      std::fprintf(stderr, "dyn run: %s\n", started.status().ToString().c_str());
      return 1;
    }
    cluster = std::move(*started);
  } else {
    auto built = BuildLocalModel(ef);
    if (!built.ok()) {
      std::fprintf(stderr, "dyn run: %s\n", built.status().ToString().c_str());
      return built.status().code() == StatusCode::kInvalidArgument && ef.engine_name != "native" && ef.engine_name != "echo" ? 2 : 1;
    }
    served = std::move(*built);
  }
  const std::string engine_name = ef.engine_name;

  auto registry = std::make_shared<ModelRegistry>();
  EnginePtr engine = served.engine;
  std::string name = served.name;
  if (Status s = registry->Add(std::move(served)); !s.ok()) {
    std::fprintf(stderr, "dyn run: %s\n", s.ToString().c_str());
    if (cluster) cluster->Shutdown();
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
    if (cluster) cluster->Shutdown();
    engine->Shutdown();
    return 1;
  }
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  DYN_LOG(INFO) << "serving model '" << name << "' with engine " << engine_name << " on http://" << host << ":"
                << (*frontend)->port() << " (ready in " << load_s << " s)";

  const int sig = WaitForTermination(sigs);
  DYN_LOG(INFO) << "signal " << sig << ": shutting down";
  (*frontend)->Stop();
  if (cluster) cluster->Shutdown();
  engine->Shutdown();
  return 0;
}

DYN_REGISTER_COMMAND("run", "serve a model from one process: OpenAI API + engine (dyn run --model PATH)", 10, &RunCommand);

}  // namespace dyn
