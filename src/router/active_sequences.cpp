#include "router/active_sequences.h"

#include <algorithm>

namespace dyn::router {

ActiveSequences::ActiveSequences(int block_size, RouterClock::duration expiry)
    : block_size_(block_size), expiry_(expiry) {}

Status ActiveSequences::AddRequest(const std::string& request_id, const WorkerKey& worker,
                                   std::span<const uint64_t> block_hashes, int64_t isl,
                                   uint32_t overlap_blocks, RouterClock::time_point now) {
  if (requests_.count(request_id)) return Status::InvalidArgument("request already active: " + request_id);
  Request r;
  r.worker = worker;
  r.blocks.assign(block_hashes.begin(), block_hashes.end());
  // A request's own repeated block (same sequence hash twice cannot happen in one chain, but a
  // caller may pass anything) must not hold two references.
  std::sort(r.blocks.begin(), r.blocks.end());
  r.blocks.erase(std::unique(r.blocks.begin(), r.blocks.end()), r.blocks.end());
  r.prefill_tokens = std::max<int64_t>(0, isl - static_cast<int64_t>(overlap_blocks) * block_size_);
  r.added = now;
  WorkerLoad& load = workers_[worker];
  for (uint64_t h : r.blocks) {
    auto& holders = blocks_[h];
    auto it = std::find_if(holders.begin(), holders.end(), [&](const Holder& x) { return x.worker == worker; });
    if (it != holders.end()) {
      ++it->refs;
    } else {
      holders.push_back(Holder{worker, 1});
      ++load.distinct_blocks;
    }
  }
  load.prefill_tokens += r.prefill_tokens;
  order_.emplace_back(now, request_id);
  requests_.emplace(request_id, std::move(r));
  return Status::Ok();
}

Status ActiveSequences::MarkPrefillCompleted(const std::string& request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return Status::NotFound("unknown request: " + request_id);
  auto wit = workers_.find(it->second.worker);
  if (wit != workers_.end()) wit->second.prefill_tokens -= it->second.prefill_tokens;
  it->second.prefill_tokens = 0;
  return Status::Ok();
}

void ActiveSequences::Release(const Request& r) {
  auto wit = workers_.find(r.worker);
  if (wit == workers_.end()) return;
  WorkerLoad& load = wit->second;
  for (uint64_t h : r.blocks) {
    auto bit = blocks_.find(h);
    if (bit == blocks_.end()) continue;
    auto& holders = bit->second;
    auto it = std::find_if(holders.begin(), holders.end(), [&](const Holder& x) { return x.worker == r.worker; });
    if (it == holders.end() || --it->refs > 0) continue;
    *it = holders.back();
    holders.pop_back();
    --load.distinct_blocks;
    if (holders.empty()) blocks_.erase(bit);
  }
  load.prefill_tokens -= r.prefill_tokens;
  if (load.distinct_blocks == 0 && load.prefill_tokens == 0) workers_.erase(wit);
}

Status ActiveSequences::Free(const std::string& request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return Status::NotFound("unknown request: " + request_id);
  Release(it->second);
  requests_.erase(it);
  return Status::Ok();
}

size_t ActiveSequences::Expire(RouterClock::time_point now) {
  size_t n = 0;
  while (!order_.empty() && order_.front().first + expiry_ <= now) {
    auto it = requests_.find(order_.front().second);
    // Only the entry of this very addition expires it (a freed id may have been re-added later).
    if (it != requests_.end() && it->second.added == order_.front().first) {
      Release(it->second);
      requests_.erase(it);
      ++n;
    }
    order_.pop_front();
  }
  return n;
}

void ActiveSequences::RemoveWorker(const WorkerKey& worker) {
  for (auto it = requests_.begin(); it != requests_.end();) {
    if (it->second.worker == worker) {
      Release(it->second);
      it = requests_.erase(it);
    } else {
      ++it;
    }
  }
  workers_.erase(worker);
}

int64_t ActiveSequences::ActiveBlocks(const WorkerKey& worker) const {
  auto it = workers_.find(worker);
  return it == workers_.end() ? 0 : it->second.distinct_blocks;
}

int64_t ActiveSequences::ActivePrefillTokens(const WorkerKey& worker) const {
  auto it = workers_.find(worker);
  return it == workers_.end() ? 0 : it->second.prefill_tokens;
}

int64_t ActiveSequences::NewBlocks(const WorkerKey& worker, std::span<const uint64_t> block_hashes) const {
  int64_t n = 0;
  for (uint64_t h : block_hashes) {
    auto bit = blocks_.find(h);
    const bool active = bit != blocks_.end() &&
                        std::any_of(bit->second.begin(), bit->second.end(), [&](const Holder& x) { return x.worker == worker; });
    n += active ? 0 : 1;
  }
  return n;
}

std::unordered_map<WorkerKey, int64_t, WorkerKeyHash> ActiveSequences::ActiveOverlap(
    std::span<const uint64_t> block_hashes) const {
  std::unordered_map<WorkerKey, int64_t, WorkerKeyHash> out;
  for (uint64_t h : block_hashes) {
    auto bit = blocks_.find(h);
    if (bit == blocks_.end()) continue;
    for (const Holder& x : bit->second) ++out[x.worker];
  }
  return out;
}

}  // namespace dyn::router
