#include "runtime/kv_event_publisher.h"

#include "runtime/event_plane.h"
#include "runtime/kv_event_codec.h"
#include "runtime/request_plane.h"

namespace dyn {
namespace {
// The mirror indexes the worker under one fixed key; dumps are re-keyed to the instance id.
constexpr router::WorkerKey kSelf{0, 0};
}  // namespace

KvEventPublisher::KvEventPublisher() = default;
KvEventPublisher::~KvEventPublisher() = default;

void KvEventPublisher::Start(EventPlane* events, std::string subject, uint64_t instance_id) {
  std::lock_guard<std::mutex> lock(mu_);
  events_ = events;
  subject_ = std::move(subject);
  instance_id_ = instance_id;
}

void KvEventPublisher::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  events_ = nullptr;
}

void KvEventPublisher::OnKvEvent(const KvEvent& event) {
  // One lock around mirror and publish: a dump taken between two events reflects exactly the
  // events published before it.
  std::lock_guard<std::mutex> lock(mu_);
  router::RouterEvent re = ToRouterEvent(instance_id_, event);
  ApplyAndPublishLocked(re);
}

void KvEventPublisher::OnExternalEvents(std::vector<router::RouterEvent>&& events) {
  std::lock_guard<std::mutex> lock(mu_);
  for (router::RouterEvent& e : events) {
    e.event_id = last_event_id_ + 1;
    ApplyAndPublishLocked(e);
  }
}

void KvEventPublisher::ApplyAndPublishLocked(router::RouterEvent& re) {
  const router::WorkerKey published{instance_id_, re.worker.dp_rank};
  re.worker = kSelf;
  (void)mirror_.ApplyEvent(re);
  last_event_id_ = re.event_id;
  if (events_ != nullptr) {
    re.worker = published;
    (void)events_->Publish(subject_, EncodeRouterEvent(re));
  }
}

std::string KvEventPublisher::DumpPayload() const {
  std::lock_guard<std::mutex> lock(mu_);
  KvDump dump;
  dump.worker_id = instance_id_;
  dump.last_event_id = last_event_id_;
  dump.events = mirror_.Dump(kSelf);
  for (router::RouterEvent& e : dump.events) e.worker = router::WorkerKey{instance_id_, 0};
  return EncodeKvDump(dump);
}

void KvEventPublisher::ServeDumps(RequestServer& server) {
  server.AddEndpoint("kv_dump", [this](std::string, std::shared_ptr<ServerCall> call) {
    call->Send(DumpPayload());
    call->Finish(Status::Ok());
  });
}

uint64_t KvEventPublisher::last_event_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_event_id_;
}

}  // namespace dyn
