#include "runtime/kv_event_codec.h"

#include <cstdlib>

#include <boost/json.hpp>

namespace dyn {
namespace json = boost::json;

std::string KvEventsSubject(std::string_view ns) { return "dyn." + std::string(ns) + ".kv_events"; }

router::RouterEvent ToRouterEvent(uint64_t worker_id, const KvEvent& e) {
  router::RouterEvent r;
  r.worker = router::WorkerKey{worker_id, 0};
  r.event_id = e.event_id;
  switch (e.type) {
    case KvEvent::Type::kStored: {
      router::StoredData d;
      d.parent_hash = e.parent_hash;
      for (const KvStoredBlock& b : e.blocks) d.blocks.push_back({b.block_hash, b.tokens_hash, b.token_ids});
      router::FillTokensHashes(d);
      r.data = std::move(d);
      break;
    }
    case KvEvent::Type::kRemoved: r.data = router::RemovedData{e.removed}; break;
    case KvEvent::Type::kCleared: r.data = router::ClearedData{}; break;
  }
  return r;
}

namespace {

const char* TierName(router::StorageTier t) {
  switch (t) {
    case router::StorageTier::kDevice: return "device";
    case router::StorageTier::kHost: return "host";
    case router::StorageTier::kDisk: return "disk";
    case router::StorageTier::kExternal: return "external";
  }
  return "device";
}

json::object RouterEventJson(const router::RouterEvent& e, bool with_token_ids) {
  json::object o{{"worker_id", std::to_string(e.worker.worker_id)},
                 {"dp_rank", e.worker.dp_rank},
                 {"event_id", e.event_id},
                 {"tier", TierName(e.tier)}};
  if (const auto* st = std::get_if<router::StoredData>(&e.data)) {
    o["type"] = "stored";
    o["parent_hash"] = st->parent_hash ? json::value(std::to_string(*st->parent_hash)) : json::value(nullptr);
    json::array blocks;
    for (const router::StoredBlock& b : st->blocks) {
      json::object bo{{"block_hash", std::to_string(b.block_hash)}, {"tokens_hash", std::to_string(b.tokens_hash)}};
      if (with_token_ids && !b.token_ids.empty()) {
        json::array ids;
        for (uint32_t t : b.token_ids) ids.push_back(t);
        bo["token_ids"] = std::move(ids);
      }
      blocks.push_back(std::move(bo));
    }
    o["blocks"] = std::move(blocks);
  } else if (const auto* rm = std::get_if<router::RemovedData>(&e.data)) {
    o["type"] = "removed";
    json::array hashes;
    for (uint64_t h : rm->block_hashes) hashes.push_back(json::value(std::to_string(h)));
    o["block_hashes"] = std::move(hashes);
  } else {
    o["type"] = "cleared";
  }
  return o;
}

}  // namespace

std::string EncodeRouterEvent(const router::RouterEvent& event, bool with_token_ids) {
  return json::serialize(RouterEventJson(event, with_token_ids));
}

std::string EncodeKvEvent(uint64_t worker_id, const KvEvent& e) { return EncodeRouterEvent(ToRouterEvent(worker_id, e)); }

namespace {

bool ParseU64(const json::value* v, uint64_t* out) {
  if (v == nullptr) return false;
  if (v->is_string()) {
    const std::string s(v->as_string());
    char* end = nullptr;
    *out = std::strtoull(s.c_str(), &end, 10);
    return !s.empty() && end != nullptr && *end == '\0';
  }
  if (v->is_uint64()) {
    *out = v->as_uint64();
    return true;
  }
  if (v->is_int64() && v->as_int64() >= 0) {
    *out = static_cast<uint64_t>(v->as_int64());
    return true;
  }
  return false;
}

}  // namespace

namespace {

Result<router::RouterEvent> DecodeRouterEventJson(const json::value& v) {
  if (!v.is_object()) return Status::InvalidArgument("kv event is not a JSON object");
  const json::object& o = v.as_object();
  router::RouterEvent e;
  uint64_t dp = 0;
  if (!ParseU64(o.if_contains("worker_id"), &e.worker.worker_id)) return Status::InvalidArgument("kv event: bad worker_id");
  if (ParseU64(o.if_contains("dp_rank"), &dp)) e.worker.dp_rank = static_cast<uint32_t>(dp);
  if (!ParseU64(o.if_contains("event_id"), &e.event_id)) return Status::InvalidArgument("kv event: bad event_id");
  const json::value* tier = o.if_contains("tier");
  if (tier != nullptr && tier->is_string()) {
    const std::string_view t = tier->as_string();
    e.tier = t == "host" ? router::StorageTier::kHost
             : t == "disk" ? router::StorageTier::kDisk
             : t == "external" ? router::StorageTier::kExternal
                               : router::StorageTier::kDevice;
  }
  const json::value* type = o.if_contains("type");
  if (type == nullptr || !type->is_string()) return Status::InvalidArgument("kv event: no type");
  const std::string_view t = type->as_string();
  if (t == "stored") {
    router::StoredData d;
    uint64_t parent = 0;
    if (ParseU64(o.if_contains("parent_hash"), &parent)) d.parent_hash = parent;
    const json::value* blocks = o.if_contains("blocks");
    if (blocks == nullptr || !blocks->is_array()) return Status::InvalidArgument("kv event: stored without blocks");
    for (const json::value& bv : blocks->as_array()) {
      if (!bv.is_object()) return Status::InvalidArgument("kv event: bad block");
      const json::object& bo = bv.as_object();
      router::StoredBlock b;
      if (!ParseU64(bo.if_contains("block_hash"), &b.block_hash)) return Status::InvalidArgument("kv event: bad block_hash");
      (void)ParseU64(bo.if_contains("tokens_hash"), &b.tokens_hash);
      if (const json::value* ids = bo.if_contains("token_ids"); ids != nullptr && ids->is_array()) {
        for (const json::value& id : ids->as_array()) {
          uint64_t x = 0;
          if (!ParseU64(&id, &x) || x > UINT32_MAX) return Status::InvalidArgument("kv event: bad token id");
          b.token_ids.push_back(static_cast<uint32_t>(x));
        }
      }
      d.blocks.push_back(std::move(b));
    }
    router::FillTokensHashes(d);
    e.data = std::move(d);
  } else if (t == "removed") {
    router::RemovedData d;
    const json::value* hashes = o.if_contains("block_hashes");
    if (hashes == nullptr || !hashes->is_array()) return Status::InvalidArgument("kv event: removed without hashes");
    for (const json::value& h : hashes->as_array()) {
      uint64_t x = 0;
      if (!ParseU64(&h, &x)) return Status::InvalidArgument("kv event: bad block hash");
      d.block_hashes.push_back(x);
    }
    e.data = std::move(d);
  } else if (t == "cleared") {
    e.data = router::ClearedData{};
  } else {
    return Status::InvalidArgument("kv event: unknown type '" + std::string(t) + "'");
  }
  return e;
}

}  // namespace

Result<router::RouterEvent> DecodeKvEvent(std::string_view text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec) return Status::InvalidArgument("kv event is not a JSON object");
  return DecodeRouterEventJson(v);
}

std::string EncodeKvDump(const KvDump& dump) {
  json::array events;
  for (const router::RouterEvent& e : dump.events) events.push_back(RouterEventJson(e, /*with_token_ids=*/false));
  return json::serialize(json::object{{"worker_id", std::to_string(dump.worker_id)},
                                      {"last_event_id", dump.last_event_id},
                                      {"events", std::move(events)}});
}

Result<KvDump> DecodeKvDump(std::string_view text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) return Status::InvalidArgument("kv dump is not a JSON object");
  const json::object& o = v.as_object();
  KvDump d;
  if (!ParseU64(o.if_contains("worker_id"), &d.worker_id)) return Status::InvalidArgument("kv dump: bad worker_id");
  if (!ParseU64(o.if_contains("last_event_id"), &d.last_event_id))
    return Status::InvalidArgument("kv dump: bad last_event_id");
  const json::value* events = o.if_contains("events");
  if (events == nullptr || !events->is_array()) return Status::InvalidArgument("kv dump: no events");
  for (const json::value& ev : events->as_array()) {
    DYN_ASSIGN_OR_RETURN(router::RouterEvent e, DecodeRouterEventJson(ev));
    if (e.worker.worker_id != d.worker_id) return Status::InvalidArgument("kv dump: event of another worker");
    e.event_id = 0;  // unsequenced: a dump is a state, not part of the event stream
    d.events.push_back(std::move(e));
  }
  return d;
}

}  // namespace dyn
