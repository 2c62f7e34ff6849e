// The component model: how workers name themselves and what they publish in discovery.
//
// An endpoint is `namespace/component/endpoint` ("dyn/backend/generate"); each worker process
// serving it is an instance with a 64-bit id (its discovery lease id). A worker puts one record
// per endpoint under its lease:
//
//   key   dyn/instances/<namespace>/<component>/<endpoint>/<instance id, 16 hex digits>
//   value JSON InstanceRecord: the request-plane address and the model card
//
// When the worker dies its lease expires and the record vanishes; frontends watch
// dyn/instances/<namespace>/ and build or drop a model's pipeline as its instances come and go.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace dyn {

// What a frontend needs to serve a model whose engine runs elsewhere.
struct ModelCard {
  std::string name;                // served model name (what clients pass as "model")
  std::string source;              // HF directory or .gguf file holding tokenizer and chat template
  std::string chat_template_path;  // optional override of the model's own template
  uint32_t context_length = 0;
  int kv_block_size = 0;
  int kv_total_blocks = 0;
  int max_num_batched_tokens = 0;
  std::string role = "both";  // "both", "prefill" or "decode"
  std::string engine;         // "native", "echo", "mocker": for logs and metrics only
  std::vector<uint32_t> eos_token_ids;
};

struct InstanceRecord {
  std::string ns = "dyn";
  std::string component = "backend";
  std::string endpoint = "generate";
  uint64_t instance_id = 0;
  std::string address;  // request plane "host:port"
  ModelCard card;
};

std::string InstancesPrefix(std::string_view ns);  // "dyn/instances/<ns>/"
std::string InstanceKey(const InstanceRecord& record);
std::string EncodeInstance(const InstanceRecord& record);
// InvalidArgument on malformed JSON or missing required fields (name, address, instance id).
Result<InstanceRecord> DecodeInstance(std::string_view json);

}  // namespace dyn
