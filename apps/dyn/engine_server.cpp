#include "apps/dyn/engine_server.h"

namespace dyn {

Result<std::unique_ptr<EngineServer>> EngineServer::Start(LocalEngineFlags flags, const EngineServerOptions& options) {
  std::unique_ptr<EngineServer> s(new EngineServer());
  s->publisher_ = std::make_unique<KvEventPublisher>();
  s->role_ = options.transfer.role;
  WorkerKvTransferOptions to = options.transfer;
  // The mocker has no KV memory: its transfers are simulated ("sim" descriptors).
  if (flags.engine_name == "mocker") to.backend = "sim";
  if (to.role != WorkerRole::kAggregated) {
    if (flags.engine_name != "native" && flags.engine_name != "mocker") {
      return Status::InvalidArgument("--role " + std::string(WorkerRoleCardName(to.role)) +
                                     " needs the native or the mocker engine, not " + flags.engine_name);
    }
    DYN_ASSIGN_OR_RETURN(s->transfer_, WorkerKvTransfer::Create(to));
    flags.kv_transfer = s->transfer_->hooks();
  }
  flags.kv_event_sink = options.publish_kv_events ? s->publisher_.get() : nullptr;
  DYN_ASSIGN_OR_RETURN(s->served_, BuildLocalModel(flags, &s->kv_block_size_));
  auto server = RequestServer::Start(options.server);
  if (!server.ok()) {
    s->Stop();
    return server.status();
  }
  s->server_ = std::move(*server);
  s->address_ = options.advertise_host + ":" + std::to_string(s->server_->port());
  s->server_->AddEngineEndpoint("generate", s->served_.engine);
  s->publisher_->ServeDumps(*s->server_);
  if (s->transfer_) s->transfer_->ServeReleases(*s->server_, s->address_, s->served_.engine);
  return s;
}

EngineServer::~EngineServer() { Stop(); }

void EngineServer::Stop() {
  if (server_) server_->Stop();
  if (served_.engine) served_.engine->Shutdown();
  if (transfer_) transfer_->Stop();
  if (publisher_) publisher_->Stop();
}

}  // namespace dyn
