#include "runtime/component.h"

#include <cstdio>

#include <boost/json.hpp>

namespace dyn {
namespace json = boost::json;

std::string InstancesPrefix(std::string_view ns) { return "dyn/instances/" + std::string(ns) + "/"; }

std::string InstanceKey(const InstanceRecord& r) {
  char id[17];
  std::snprintf(id, sizeof(id), "%016llx", static_cast<unsigned long long>(r.instance_id));
  return InstancesPrefix(r.ns) + r.component + "/" + r.endpoint + "/" + id;
}

std::string EncodeInstance(const InstanceRecord& r) {
  json::array eos;
  for (uint32_t t : r.card.eos_token_ids) eos.push_back(t);
  json::object card{{"name", r.card.name},
                    {"source", r.card.source},
                    {"chat_template_path", r.card.chat_template_path},
                    {"context_length", r.card.context_length},
                    {"kv_block_size", r.card.kv_block_size},
                    {"kv_total_blocks", r.card.kv_total_blocks},
                    {"max_num_batched_tokens", r.card.max_num_batched_tokens},
                    {"role", r.card.role},
                    {"engine", r.card.engine},
                    {"eos_token_ids", std::move(eos)}};
  json::object o{{"namespace", r.ns},
                 {"component", r.component},
                 {"endpoint", r.endpoint},
                 // As a string: JSON readers other than ours lose precision on 64-bit integers.
                 {"instance_id", std::to_string(r.instance_id)},
                 {"address", r.address},
                 {"model_card", std::move(card)}};
  return json::serialize(o);
}

namespace {

std::string GetString(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}

int64_t GetInt(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr) return 0;
  if (v->is_int64()) return v->as_int64();
  if (v->is_uint64()) return static_cast<int64_t>(v->as_uint64());
  return 0;
}

}  // namespace

Result<InstanceRecord> DecodeInstance(std::string_view text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) return Status::InvalidArgument("instance record is not a JSON object");
  const json::object& o = v.as_object();
  InstanceRecord r;
  r.ns = GetString(o, "namespace");
  r.component = GetString(o, "component");
  r.endpoint = GetString(o, "endpoint");
  r.address = GetString(o, "address");
  const std::string id = GetString(o, "instance_id");
  char* end = nullptr;
  r.instance_id = std::strtoull(id.c_str(), &end, 10);
  if (id.empty() || end == nullptr || *end != '\0') return Status::InvalidArgument("instance record: bad instance_id");
  const json::value* card = o.if_contains("model_card");
  if (card == nullptr || !card->is_object()) return Status::InvalidArgument("instance record: no model_card");
  const json::object& c = card->as_object();
  r.card.name = GetString(c, "name");
  r.card.source = GetString(c, "source");
  r.card.chat_template_path = GetString(c, "chat_template_path");
  r.card.context_length = static_cast<uint32_t>(GetInt(c, "context_length"));
  r.card.kv_block_size = static_cast<int>(GetInt(c, "kv_block_size"));
  r.card.kv_total_blocks = static_cast<int>(GetInt(c, "kv_total_blocks"));
  r.card.max_num_batched_tokens = static_cast<int>(GetInt(c, "max_num_batched_tokens"));
  r.card.role = GetString(c, "role");
  r.card.engine = GetString(c, "engine");
  if (const json::value* eos = c.if_contains("eos_token_ids"); eos != nullptr && eos->is_array()) {
    for (const json::value& t : eos->as_array())
      if (t.is_int64() && t.as_int64() >= 0) r.card.eos_token_ids.push_back(static_cast<uint32_t>(t.as_int64()));
  }
  if (r.card.name.empty() || r.address.empty()) return Status::InvalidArgument("instance record: missing name or address");
  return r;
}

}  // namespace dyn
