// A test-only Model whose logits are a deterministic function of the whole token history, read
// back through its "KV cache" (which stores token ids in block slots). A wrong block table, a
// skipped or stale chunk, or a prefix-cache hit on the wrong blocks changes the history it reads
// and so the output. It counts the tokens it computes.
#pragma once

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "engine/native/model/model.h"

namespace dyn::testing {

class FakeModel : public Model {
 public:
  static constexpr uint32_t kEmptySlot = 0xffffffffu;

  explicit FakeModel(int vocab_size = 64, int max_position_embeddings = 4096, std::vector<uint32_t> eos = {}) {
    config_.architecture = "fake";
    config_.vocab_size = vocab_size;
    config_.max_position_embeddings = max_position_embeddings;
    config_.eos_token_ids = std::move(eos);
  }

  const ModelConfig& config() const override { return config_; }
  size_t KvBytesPerToken() const override { return 1024; }
  Status InitKvCache(int num_blocks, int block_size) override {
    block_size_ = block_size;
    slots_.assign(static_cast<size_t>(num_blocks) * block_size, kEmptySlot);
    return Status::Ok();
  }

  Status Forward(std::span<const ForwardSeq> batch, float* logits) override {
    if (step_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(step_delay_us.load()));
    ++forward_calls;
    int max_batch = max_batch_seqs.load();
    if (static_cast<int>(batch.size()) > max_batch) max_batch_seqs = static_cast<int>(batch.size());
    size_t row = 0;
    std::vector<uint32_t> history;
    for (const ForwardSeq& s : batch) {
      const size_t end = s.start_pos + s.tokens.size();
      if (s.block_table.size() * block_size_ < end) return Status::Internal("block table too short");
      for (size_t i = 0; i < s.tokens.size(); ++i) Slot(s.block_table, s.start_pos + i) = s.tokens[i];
      computed_tokens += s.tokens.size();
      if (!s.want_logits) continue;
      history.clear();
      for (size_t p = 0; p < end; ++p) {
        const uint32_t t = Slot(s.block_table, p);
        if (t == kEmptySlot) return Status::Internal("read an unwritten KV slot at position " + std::to_string(p));
        history.push_back(t);
      }
      LogitsFor(history, logits + row * config_.vocab_size);
      ++row;
    }
    return Status::Ok();
  }

  std::string Describe() const override { return "fake model, vocab " + std::to_string(config_.vocab_size); }

  // With device_cache the model acts as one whose KV cache is in device memory (a GPU's):
  // DeviceMemory() is true and disaggregated serving moves its blocks through host staging blocks
  // with CopyKvBlocks (a block's slots in the first block_size x 4 bytes of its host block).
  bool device_cache = false;
  bool DeviceMemory(size_t* free_bytes, size_t* total_bytes) const override {
    if (!device_cache) return false;
    *free_bytes = *total_bytes = size_t{1} << 30;
    return true;
  }
  Status CopyKvBlocks(std::span<const int32_t> blocks, std::span<std::byte* const> host, bool to_host) override {
    if (!device_cache) return Model::CopyKvBlocks(blocks, host, to_host);
    for (size_t i = 0; i < blocks.size(); ++i) {
      uint32_t* slots = slots_.data() + static_cast<size_t>(blocks[i]) * block_size_;
      if (to_host) std::memcpy(host[i], slots, block_size_ * sizeof(uint32_t));
      else std::memcpy(slots, host[i], block_size_ * sizeof(uint32_t));
    }
    kv_blocks_copied += blocks.size();
    return Status::Ok();
  }
  // From the engine's transfer thread while Forward runs on its step thread (different blocks).
  bool concurrent_kv_writes = true;
  Status WriteKvBlocksConcurrently(std::span<const int32_t> blocks, std::span<std::byte* const> host) override {
    if (!device_cache || !concurrent_kv_writes) return Model::WriteKvBlocksConcurrently(blocks, host);
    for (size_t i = 0; i < blocks.size(); ++i) {
      std::memcpy(slots_.data() + static_cast<size_t>(blocks[i]) * block_size_, host[i], block_size_ * sizeof(uint32_t));
    }
    kv_blocks_written_concurrently += blocks.size();
    return Status::Ok();
  }
  std::atomic<uint64_t> kv_blocks_copied{0}, kv_blocks_written_concurrently{0};

  // A block's slots, for tests that move KV between two models (disaggregated serving).
  std::vector<uint32_t> ReadBlock(int32_t block) const {
    return {slots_.begin() + static_cast<size_t>(block) * block_size_,
            slots_.begin() + static_cast<size_t>(block + 1) * block_size_};
  }
  void WriteBlock(int32_t block, std::span<const uint32_t> slots) {
    std::copy(slots.begin(), slots.end(), slots_.begin() + static_cast<size_t>(block) * block_size_);
  }

  // The logits the model produces after `history`: uniform in [0, 8) from a hash of the history.
  void LogitsFor(std::span<const uint32_t> history, float* out) const {
    const uint64_t h = XXH3_64bits(history.data(), history.size() * sizeof(uint32_t));
    for (int v = 0; v < config_.vocab_size; ++v) {
      uint64_t x = h ^ (0x9e3779b97f4a7c15ull * (v + 1));
      x ^= x >> 31;
      x *= 0xbf58476d1ce4e5b9ull;
      x ^= x >> 29;
      out[v] = static_cast<float>(x >> 40) * (8.0f / 16777216.0f);
    }
  }

  // "Device" sampling of `logits` ([rows][vocab]): the argmax (lowest id on ties) of each row the
  // device samples; the rows marked on_host are copied to host_logits instead, in order.
  Status ArgmaxOrCopy(std::span<const float> logits, std::span<const DeviceSampling> sampling, uint32_t* tokens,
                      float* host_logits) const {
    const int vocab = config_.vocab_size;
    size_t host = 0;
    for (size_t r = 0; r < sampling.size(); ++r) {
      const float* l = logits.data() + r * vocab;
      if (sampling[r].on_host) {
        if (host_logits == nullptr) return Status::InvalidArgument("rows on the host need host_logits");
        std::copy(l, l + vocab, host_logits + host++ * vocab);
        continue;
      }
      tokens[r] = static_cast<uint32_t>(std::max_element(l, l + vocab) - l);
    }
    return Status::Ok();
  }

  // Greedy continuation computed directly (no cache): the reference output.
  std::vector<uint32_t> Greedy(std::vector<uint32_t> history, int n) const {
    std::vector<float> l(config_.vocab_size);
    std::vector<uint32_t> out;
    for (int i = 0; i < n; ++i) {
      LogitsFor(history, l.data());
      uint32_t best = 0;
      for (int v = 1; v < config_.vocab_size; ++v) {
        if (l[v] > l[best]) best = v;
      }
      out.push_back(best);
      history.push_back(best);
    }
    return out;
  }

  std::atomic<uint64_t> computed_tokens{0};
  std::atomic<uint64_t> forward_calls{0};
  std::atomic<int> max_batch_seqs{0};
  std::atomic<int> step_delay_us{0};

 private:
  uint32_t& Slot(std::span<const int32_t> table, size_t pos) {
    return slots_[static_cast<size_t>(table[pos / block_size_]) * block_size_ + pos % block_size_];
  }

  ModelConfig config_;
  int block_size_ = 16;
  std::vector<uint32_t> slots_;
};

// A FakeModel that samples "on the device", greedily (argmax, lowest id on ties), and pipelines:
// LaunchSample resolves each ForwardSeq::sampled_row from its own last sample, as the device does,
// and queues the ids for TakeSample. It counts the steps of each kind.
class PipelinedFakeModel : public FakeModel {
 public:
  using FakeModel::FakeModel;
  bool samples_on_device() const override { return true; }
  bool samples_truncated_on_device() const override { return true; }
  bool samples_pipelined() const override { return true; }
  Status ForwardSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling, uint32_t* tokens,
                       float* host_logits) override {
    if (!queued_.empty()) return Status::Internal("ForwardSample with a pipelined step not taken");
    ++sync_steps;
    return Sample(batch, sampling, tokens, host_logits);
  }
  Status LaunchSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling) override {
    if (queued_.size() > 1) return Status::Internal("more than two pipelined steps in flight");
    std::vector<uint32_t> ids(sampling.size());
    DYN_RETURN_IF_ERROR(Sample(batch, sampling, ids.data(), nullptr));
    queued_.push_back(std::move(ids));
    ++pipelined_steps;
    if (queued_.size() == 2) ++overlapped_steps;  // launched while the previous step was not taken
    return Status::Ok();
  }
  Status TakeSample(uint32_t* tokens) override {
    if (queued_.empty()) return Status::InvalidArgument("nothing to take");
    std::copy(queued_.front().begin(), queued_.front().end(), tokens);
    queued_.erase(queued_.begin());
    return Status::Ok();
  }
  std::atomic<int> sync_steps{0}, pipelined_steps{0}, overlapped_steps{0};

 private:
  Status Sample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling, uint32_t* tokens, float* host_logits) {
    std::vector<ForwardSeq> resolved(batch.begin(), batch.end());
    std::vector<uint32_t> fed(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].sampled_row < 0) continue;
      if (batch[i].sampled_row >= static_cast<int>(last_.size())) return Status::InvalidArgument("sampled_row out of range");
      fed[i] = last_[batch[i].sampled_row];
      resolved[i].tokens = std::span<const uint32_t>(&fed[i], 1);
    }
    std::vector<float> logits(sampling.size() * config().vocab_size);
    DYN_RETURN_IF_ERROR(Forward(resolved, logits.data()));
    DYN_RETURN_IF_ERROR(ArgmaxOrCopy(logits, sampling, tokens, host_logits));
    last_.assign(tokens, tokens + sampling.size());
    return Status::Ok();
  }
  std::vector<std::vector<uint32_t>> queued_;
  std::vector<uint32_t> last_;  // the last sample ("on the device")
};

}  // namespace dyn::testing
