// dyn worker: an engine behind the request plane, registered in discovery.
//
// Start-up: build the engine, listen on the request plane, grant a discovery lease and put the
// instance record (address + model card) under it. SIGTERM/SIGINT drains: the record is deleted
// first (frontends stop sending new requests), running streams finish (up to --drain-timeout),
// then the process exits. kill -9 leaves the lease to expire after --lease-ttl seconds.
#include <signal.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <climits>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include <boost/json.hpp>

#include "apps/dyn/command_util.h"
#include "apps/dyn/commands.h"
#include "apps/dyn/engine_server.h"
#include "apps/dyn/local_engine.h"
#include "base/flags.h"
#include "base/log.h"
#include "runtime/component.h"
#include "runtime/discovery.h"
#include "runtime/event_plane.h"
#include "runtime/kv_event_codec.h"
#include "runtime/kv_event_publisher.h"
#include "runtime/zmq_kv_source.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {

std::string AbsolutePath(const std::string& path) {
  if (path.empty()) return path;
  char buf[PATH_MAX];
  return realpath(path.c_str(), buf) != nullptr ? std::string(buf) : path;
}

}  // namespace

int WorkerCommand(int argc, char** argv) {
  LocalEngineFlags ef;
  std::string discovery_spec = "etcd:http://127.0.0.1:2379", ns = "dyn", component = "backend";
  std::string host = "0.0.0.0", advertise = "127.0.0.1", event_spec, zmq_endpoint, zmq_topic;
  int64_t port = 0, http_port = -1, lease_ttl = 3, drain_timeout = 30, num_workers = 1, kv_transfer_port = 0;
  std::string role_name = "agg", kv_transport = "tcp";
  double lease_timeout_s = 30, kv_max_mbps = 0;
  FlagSet fs("dyn worker", "Serves a model's engine on the request plane and registers it in discovery.");
  ef.Register(fs);
  fs.String("discovery", &discovery_spec, "discovery backend: etcd:http://HOST:2379 | file:DIR | mem");
  fs.String("namespace", &ns, "namespace the instance registers in");
  fs.String("event-plane", &event_spec, "event plane for load reports: nats://HOST:4222 | mem | '' (off)");
  fs.String("component", &component, "component name");
  fs.String("host", &host, "request plane: address to listen on");
  fs.Int("port", &port, "request plane: TCP port (0: pick a free one)");
  fs.String("advertise-host", &advertise, "request plane: address frontends use to reach this worker");
  fs.Int("http-port", &http_port, "also serve the OpenAI API and /metrics locally on this port (-1: off)");
  fs.Int("lease-ttl", &lease_ttl, "discovery lease TTL in seconds: how long a dead worker stays listed");
  fs.Int("drain-timeout", &drain_timeout, "on SIGTERM, seconds to let running streams finish");
  fs.Int("workers", &num_workers, "instances in this process, each with its own engine, port and lease (mocker fleets)");
  fs.String("kv-events-zmq", &zmq_endpoint,
            "publish the KV events of an external engine (vLLM/SGLang ZMQ PUB: tcp://HOST:PORT, or bind:tcp://*:PORT) "
            "as this instance's, instead of the built-in engine's own");
  fs.String("kv-events-zmq-topic", &zmq_topic, "ZMQ subscription topic prefix ('' = all)");
  fs.String("role", &role_name, "disaggregated serving: agg (prefill and decode here) | prefill | decode");
  fs.String("kv-transport", &kv_transport,
            "prefill role: how decode workers copy the KV: tcp (any host) | shm (same host, shared memory)");
  fs.Int("kv-transfer-port", &kv_transfer_port, "prefill role, tcp: the KV source's port (0: a free one)");
  fs.Double("kv-transfer-max-mbps", &kv_max_mbps,
            "prefill role, tcp: cap on each KV pull's send rate in MB/s, to leave room on a shared link (0: none)");
  fs.Double("kv-lease-timeout", &lease_timeout_s,
            "prefill role: seconds a prompt's KV waits for its decode worker before it is freed");
  fs.Int("kv-staging-mb", &ef.kv_staging_mb,
         "prefill and decode roles with the KV cache on a GPU: host memory (MiB) the KV travels through; "
         "bounds the prompts a prefill worker holds for decode workers at a time");
  if (int rc = ParseCommandFlags(fs, argc, argv, "dyn worker"); rc >= 0) return rc;
  if (int rc = RequireModelPath(fs, &ef.model_path, "dyn worker"); rc >= 0) return rc;
  const sigset_t sigs = BlockTerminationSignals();  // before any thread starts

  if (num_workers < 1 || num_workers > 4096) {
    std::fprintf(stderr, "dyn worker: --workers must be in [1, 4096]\n");
    return 2;
  }
  if (num_workers > 1 && !zmq_endpoint.empty()) {
    std::fprintf(stderr, "dyn worker: --kv-events-zmq needs --workers 1 (one external engine per instance)\n");
    return 2;
  }
  if (num_workers > 1 && port != 0) {
    std::fprintf(stderr, "dyn worker: --port must be 0 (any free port) with --workers > 1\n");
    return 2;
  }

  auto role = ParseWorkerRole(role_name);
  if (!role.ok()) {
    std::fprintf(stderr, "dyn worker: %s\n", role.status().message().c_str());
    return 2;
  }
  if (kv_transport != "tcp" && kv_transport != "shm") {
    std::fprintf(stderr, "dyn worker: --kv-transport must be tcp or shm\n");
    return 2;
  }
  if (*role != WorkerRole::kAggregated && lease_timeout_s <= 0) {
    std::fprintf(stderr, "dyn worker: --kv-lease-timeout must be positive\n");
    return 2;
  }
  if (*role == WorkerRole::kPrefill && kv_transport == "shm") RemoveOrphanedSharedKvMemory();

  // One instance per --workers: its own engine, request-plane port, lease and record. They share
  // the discovery and event-plane clients (many simulated mockers in one process).
  struct Instance {
    std::unique_ptr<EngineServer> es;
    int64_t lease = 0;
    InstanceRecord rec;
    std::string key;
  };
  std::vector<Instance> instances(static_cast<size_t>(num_workers));
  auto shutdown_all = [&] {
    for (Instance& in : instances)
      if (in.es) in.es->Stop();
  };
  ServedModel served;
  for (size_t i = 0; i < instances.size(); ++i) {
    Instance& in = instances[i];
    EngineServerOptions eo;
    eo.server.host = host;
    eo.server.port = static_cast<int>(port);
    eo.advertise_host = advertise;
    eo.transfer.role = *role;
    eo.transfer.backend = kv_transport;
    eo.transfer.listen_host = host;
    eo.transfer.tcp_port = num_workers > 1 ? 0 : static_cast<int>(kv_transfer_port);
    eo.transfer.advertise_host = advertise;
    eo.transfer.tcp_max_bytes_per_second = kv_max_mbps * 1e6;
    eo.transfer.lease_timeout = std::chrono::milliseconds(static_cast<int64_t>(lease_timeout_s * 1000));
    eo.publish_kv_events = zmq_endpoint.empty();
    auto started = EngineServer::Start(ef, eo);
    if (!started.ok()) {
      std::fprintf(stderr, "dyn worker: %s\n", started.status().ToString().c_str());
      shutdown_all();
      return 1;
    }
    in.es = std::move(*started);
    const ServedModel& built = in.es->served();
    if (i == 0) served = built;
    in.rec.ns = ns;
    in.rec.component = component;
    in.rec.endpoint = "generate";
    in.rec.address = in.es->address();
    in.rec.card.name = built.name;
    in.rec.card.source = AbsolutePath(ef.model_path);
    in.rec.card.chat_template_path = AbsolutePath(ef.chat_template);
    in.rec.card.context_length = built.context_length;
    in.rec.card.kv_block_size = in.es->kv_block_size();
    in.rec.card.kv_total_blocks = built.engine->Metrics().kv_blocks_total;
    in.rec.card.max_num_batched_tokens = static_cast<int>(ef.max_batched);
    in.rec.card.role = WorkerRoleCardName(*role);
    in.rec.card.engine = ef.engine_name;
    in.rec.card.eos_token_ids = built.eos_token_ids;
    if (in.es->transfer()) {
      DYN_LOG(INFO) << "KV transfer: " << in.es->transfer()->Describe();
    }
  }

  std::unique_ptr<HttpFrontend> http;  // the first instance's engine, served locally
  if (http_port >= 0) {
    auto registry = std::make_shared<ModelRegistry>();
    if (Status s = registry->Add(served); s.ok()) {
      HttpFrontendOptions ho;
      ho.host = host;
      ho.port = static_cast<int>(http_port);
      auto started = HttpFrontend::Start(ho, registry);
      if (!started.ok()) {
        std::fprintf(stderr, "dyn worker: %s\n", started.status().ToString().c_str());
        shutdown_all();
        return 1;
      }
      http = std::move(*started);
    }
  }

  auto discovery = CreateDiscovery(discovery_spec);
  if (!discovery.ok()) {
    std::fprintf(stderr, "dyn worker: %s\n", discovery.status().ToString().c_str());
    shutdown_all();
    return 1;
  }
  std::unique_ptr<EventPlane> events;
  if (!event_spec.empty()) {
    auto ep = CreateEventPlane(event_spec);
    if (!ep.ok()) {
      std::fprintf(stderr, "dyn worker: %s\n", ep.status().ToString().c_str());
      shutdown_all();
      return 1;
    }
    events = std::move(*ep);
  }
  for (Instance& in : instances) {
    auto lease = (*discovery)->GrantLease(static_cast<int>(lease_ttl));
    if (!lease.ok()) {
      std::fprintf(stderr, "dyn worker: discovery %s: %s\n", discovery_spec.c_str(), lease.status().ToString().c_str());
      shutdown_all();
      return 1;
    }
    in.lease = *lease;
    in.rec.instance_id = static_cast<uint64_t>(*lease);
    in.key = InstanceKey(in.rec);
    in.es->publisher().Start(events.get(), KvEventsSubject(ns), in.rec.instance_id);  // null events: dumps only
    if (Status s = (*discovery)->Put(in.key, EncodeInstance(in.rec), in.lease); !s.ok()) {
      std::fprintf(stderr, "dyn worker: register: %s\n", s.ToString().c_str());
      shutdown_all();
      return 1;
    }
    DYN_LOG(INFO) << "worker " << in.rec.instance_id << " serving '" << in.rec.card.name << "' (" << ef.engine_name
                  << ", " << in.rec.card.role << ") on " << in.rec.address << ", registered in " << (*discovery)->Describe() << " as " << in.key
                  << (http && &in == &instances[0] ? ", http port " + std::to_string(http->port()) : std::string());
  }

  std::unique_ptr<ZmqKvSource> zmq_source;
  if (!zmq_endpoint.empty()) {
    ZmqKvSourceOptions zo;
    zo.endpoint = zmq_endpoint;
    zo.topic = zmq_topic;
    zo.worker_id = instances[0].rec.instance_id;
    KvEventPublisher* publisher = &instances[0].es->publisher();
    auto source = ZmqKvSource::Start(zo, [publisher](std::vector<router::RouterEvent>&& events, bool) {
      publisher->OnExternalEvents(std::move(events));
    });
    if (!source.ok()) {
      std::fprintf(stderr, "dyn worker: %s\n", source.status().ToString().c_str());
      shutdown_all();
      return 1;
    }
    zmq_source = std::move(*source);
    DYN_LOG(INFO) << "KV events of instance " << zo.worker_id << " come from " << zmq_endpoint;
  }

  // Load reports, once a second per instance, for the frontends' least-loaded routing.
  std::mutex stop_mu;
  std::condition_variable stop_cv;
  bool stop = false;
  std::thread reporter([&] {
    std::unique_lock<std::mutex> lock(stop_mu);
    while (events && !stop) {
      for (const Instance& in : instances) {
        const EngineMetrics m = in.es->engine()->Metrics();
        const std::string payload = boost::json::serialize(boost::json::object{
            {"instance_id", std::to_string(in.rec.instance_id)},
            {"model", in.rec.card.name},
            {"load", m.running + m.waiting},
            {"kv_blocks_used", m.kv_blocks_used},
            {"kv_blocks_total", m.kv_blocks_total}});
        (void)events->Publish("dyn." + ns + ".load", payload);
      }
      stop_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stop; });
    }
  });

  const int sig = WaitForTermination(sigs);
  {
    std::lock_guard<std::mutex> lock(stop_mu);
    stop = true;
  }
  stop_cv.notify_all();
  reporter.join();
  int active = 0;
  for (Instance& in : instances) active += in.es->server().active_calls();
  DYN_LOG(INFO) << "signal " << sig << ": deregistering and draining " << active << " streams";
  // Deregister every instance first, so frontends stop sending before anything drains.
  for (Instance& in : instances) {
    if (Status s = (*discovery)->Delete(in.key); !s.ok()) {
      DYN_LOG(WARN) << "deregister: " << s.ToString();
    }
    (void)(*discovery)->RevokeLease(in.lease);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(drain_timeout);
  for (Instance& in : instances) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    in.es->server().Drain(static_cast<int>(std::max<int64_t>(0, left.count())));
    in.es->publisher().Stop();
  }
  if (zmq_source) zmq_source->Stop();
  if (http) http->Stop();
  shutdown_all();
  DYN_LOG(INFO) << "worker stopped";
  return 0;
}

DYN_REGISTER_COMMAND("worker", "serve a model's engine on the request plane, registered in discovery", 30, &WorkerCommand);

}  // namespace dyn
