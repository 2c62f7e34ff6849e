#include "apps/dyn/local_engine.h"

#include <algorithm>
#include <ctime>

#include "base/flags.h"
#include "base/log.h"
#include "engine/echo/echo_engine.h"
#include "engine/mocker/mocker_engine.h"
#include "engine/native/backend/backend.h"
#include "engine/native/model/model.h"
#include "engine/native/sched/native_engine.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {

bool LocalEngineFlags::Given(const char* flag) const { return flag_set != nullptr && flag_set->IsSet(flag); }

void LocalEngineFlags::Register(FlagSet& fs) {
  flag_set = &fs;
  fs.String("model", &model_path, "Hugging Face model directory or .gguf file (required)");
  fs.String("served-model-name", &served_name, "name clients use in 'model' (default: from the path)");
  fs.String("engine", &engine_name, "native | echo | mocker (simulated: the model path is only for the tokenizer)");
  fs.String("device", &device, "native engine compute backend: cpu | cuda | auto (cuda when a GPU is visible)");
  fs.String("load-format", &load_format,
            "native engine: auto (the weight files) | dummy (only config.json; random bf16 weights, for speed runs)");
  fs.Int("threads", &threads, "CPU threads for the native engine (0: all cores)");
  fs.Int("block-size", &block_size, "KV cache block size in tokens");
  fs.Int("kv-cache-mb", &kv_cache_mb, "KV cache size in MiB (when --num-kv-blocks is 0)");
  fs.Int("num-kv-blocks", &num_kv_blocks, "KV cache size in blocks (0: from --kv-cache-mb)");
  fs.Double("gpu-memory-utilization", &gpu_memory_utilization,
            "native engine on a GPU, unless --num-kv-blocks or --kv-cache-mb is given: the fraction of GPU "
            "memory to use; the KV cache gets what the weights and the forward pass leave of it");
  fs.Int("max-num-seqs", &max_num_seqs, "most requests in one batch");
  fs.Int("max-num-batched-tokens", &max_batched, "most tokens in one step (chunked prefill budget)");
  fs.Bool("prefix-caching", &prefix_caching, "reuse cached KV blocks of shared prompt prefixes");
  fs.Bool("pipelined-decode", &pipelined_decode,
          "native engine on a GPU: launch each decode step before the previous step's tokens reach the host");
  fs.Int("context-length", &context_length, "limit the context below the model's (0: the model's)");
  fs.String("chat-template", &chat_template, "file with a Jinja chat template that overrides the model's");
  fs.Double("echo-delay-ms", &echo_delay_ms, "echo engine: delay between tokens");
  fs.Double("speedup-ratio", &speedup_ratio, "mocker engine: simulated time / real time (1e9: no sleeping)");
  fs.Int("kv-bytes-per-token", &kv_bytes_per_token, "mocker engine: KV bytes per token, for simulated KV transfers");
  fs.Double("kv-transfer-gbps", &kv_transfer_gbps, "mocker engine: simulated KV transfer bandwidth, GB/s");
}

namespace {

// The mocker takes Dynamo's mocker defaults (mocker_core.h) for the sizing flags not given.
Result<EnginePtr> BuildMocker(const LocalEngineFlags& f, ServedModel& served, int* kv_block_size) {
  MockerEngineOptions o;
  if (f.Given("block-size")) o.core.block_size = static_cast<int>(f.block_size);
  if (f.Given("num-kv-blocks") && f.num_kv_blocks > 0) o.core.num_blocks = static_cast<int>(f.num_kv_blocks);
  if (f.Given("max-num-seqs")) o.core.max_num_seqs = static_cast<int>(f.max_num_seqs);
  if (f.Given("max-num-batched-tokens")) o.core.max_num_batched_tokens = static_cast<int>(f.max_batched);
  o.core.enable_prefix_caching = f.prefix_caching;
  o.core.vocab_size = std::max<uint32_t>(1, served.tokenizer->vocab_size());
  o.speedup_ratio = f.speedup_ratio;
  o.kv_event_sink = f.kv_event_sink;
  o.core.kv_bytes_per_token = f.kv_bytes_per_token;
  o.core.kv_transfer_gbps = f.kv_transfer_gbps;
  o.kv_transfer = f.kv_transfer;
  if (kv_block_size) *kv_block_size = o.core.block_size;
  // No model config to read: like echo, a bounded default context keeps the default max_tokens
  // (the rest of the context) finite; --context-length sets it, within the KV pool's capacity.
  const int64_t capacity = static_cast<int64_t>(o.core.num_blocks) * o.core.block_size;
  served.context_length = static_cast<uint32_t>(std::min<int64_t>(f.context_length > 0 ? f.context_length : 8192, capacity));
  return CreateMockerEngine(o);
}

}  // namespace

Result<ServedModel> BuildLocalModel(const LocalEngineFlags& f, int* kv_block_size) {
  if (kv_block_size) *kv_block_size = 0;
  DYN_ASSIGN_OR_RETURN(ModelAssets assets, LoadModelAssets(f.model_path, f.chat_template));
  ServedModel served;
  served.name = f.served_name.empty() ? assets.default_name : f.served_name;
  served.tokenizer = assets.tokenizer;
  served.chat_template = assets.chat_template;
  served.created_unix = static_cast<int64_t>(std::time(nullptr));

  if (f.engine_name == "native") {
    if (!(f.gpu_memory_utilization > 0.0 && f.gpu_memory_utilization <= 1.0)) {
      return Status::InvalidArgument("--gpu-memory-utilization must be in (0, 1], got " + std::to_string(f.gpu_memory_utilization));
    }
    ModelLoadOptions lo;
    lo.device = f.device == "auto" ? DefaultDevice() : f.device;
    lo.num_threads = static_cast<int>(f.threads);
    lo.load_format = f.load_format;
    DYN_ASSIGN_OR_RETURN(auto model, LoadModel(f.model_path, lo));
    const ModelConfig& cfg = model->config();
    DYN_LOG(INFO) << "model: " << model->Describe();
    served.context_length = static_cast<uint32_t>(cfg.max_position_embeddings);
    served.eos_token_ids = cfg.eos_token_ids;
    NativeEngineOptions eo;
    eo.block_size = static_cast<int>(f.block_size);
    eo.num_kv_blocks = static_cast<int>(f.num_kv_blocks);
    eo.kv_cache_bytes = static_cast<size_t>(f.kv_cache_mb) << 20;
    size_t free_bytes = 0, total_bytes = 0;
    if (!f.Given("num-kv-blocks") && !f.Given("kv-cache-mb") && model->DeviceMemory(&free_bytes, &total_bytes)) {
      // A GPU: the KV cache takes what --gpu-memory-utilization leaves after the weights and the
      // forward pass's workspace.
      const size_t reserve = ForwardWorkspaceBytes(cfg, static_cast<int>(f.max_batched), static_cast<int>(f.max_num_seqs));
      eo.kv_cache_bytes = KvCacheBytesForDevice(total_bytes, free_bytes, f.gpu_memory_utilization, reserve);
      DYN_LOG(INFO) << "KV cache: " << (eo.kv_cache_bytes >> 20) << " MiB of " << (total_bytes >> 20)
                    << " MiB device memory (" << ((total_bytes - free_bytes) >> 20) << " MiB in use after loading, "
                    << (reserve >> 20) << " MiB kept for the forward pass, --gpu-memory-utilization "
                    << f.gpu_memory_utilization << ")";
      if (eo.kv_cache_bytes == 0) {
        return Status::ResourceExhausted("no device memory left for the KV cache at --gpu-memory-utilization " +
                                         std::to_string(f.gpu_memory_utilization));
      }
    }
    eo.max_num_seqs = static_cast<int>(f.max_num_seqs);
    eo.max_num_batched_tokens = static_cast<int>(f.max_batched);
    eo.enable_prefix_caching = f.prefix_caching;
    eo.pipelined_decode = f.pipelined_decode;
    eo.kv_event_sink = f.kv_event_sink;
    eo.kv_transfer = f.kv_transfer;
    eo.kv_staging_bytes = static_cast<size_t>(std::max<int64_t>(f.kv_staging_mb, 1)) << 20;
    if (kv_block_size) *kv_block_size = eo.block_size;
    DYN_ASSIGN_OR_RETURN(served.engine, CreateNativeEngine(std::move(model), eo));
  } else if (f.engine_name == "echo") {
    EchoEngineOptions eo;
    eo.token_delay_ms = f.echo_delay_ms;
    served.engine = CreateEchoEngine(eo);
    // The echo engine has no context of its own; a bounded one keeps the default max_tokens
    // (the rest of the context) finite.
    served.context_length = 8192;
  } else if (f.engine_name == "mocker") {
    DYN_ASSIGN_OR_RETURN(served.engine, BuildMocker(f, served, kv_block_size));
  } else {
    return Status::InvalidArgument("unknown --engine '" + f.engine_name + "' (native | echo | mocker)");
  }
  if (served.eos_token_ids.empty() && served.tokenizer->info().eos_id)
    served.eos_token_ids.push_back(*served.tokenizer->info().eos_id);
  if (f.context_length > 0)
    served.context_length = std::min<uint32_t>(served.context_length, static_cast<uint32_t>(f.context_length));
  return served;
}

}  // namespace dyn
