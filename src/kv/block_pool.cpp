#include "kv/block_pool.h"

#include <cassert>

namespace dyn {

BlockPool::BlockPool(int num_blocks, int block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching), blocks_(num_blocks) {
  assert(num_blocks >= 1 && block_size >= 1);
  for (int32_t i = 0; i < num_blocks; ++i) PushBack(i);
  cached_.reserve(static_cast<size_t>(num_blocks));
}

void BlockPool::PushFront(int32_t id) {
  Block& b = blocks_[id];
  assert(!b.in_free_queue);
  b.prev = -1;
  b.next = head_;
  if (head_ >= 0) blocks_[head_].prev = id; else tail_ = id;
  head_ = id;
  b.in_free_queue = true;
  ++num_free_;
  if (b.registered) ++num_cached_free_;
}

void BlockPool::PushBack(int32_t id) {
  Block& b = blocks_[id];
  assert(!b.in_free_queue);
  b.next = -1;
  b.prev = tail_;
  if (tail_ >= 0) blocks_[tail_].next = id; else head_ = id;
  tail_ = id;
  b.in_free_queue = true;
  ++num_free_;
  if (b.registered) ++num_cached_free_;
}

void BlockPool::Unlink(int32_t id) {
  Block& b = blocks_[id];
  assert(b.in_free_queue);
  if (b.prev >= 0) blocks_[b.prev].next = b.next; else head_ = b.next;
  if (b.next >= 0) blocks_[b.next].prev = b.prev; else tail_ = b.prev;
  b.prev = b.next = -1;
  b.in_free_queue = false;
  --num_free_;
  if (b.registered) --num_cached_free_;
}

void BlockPool::Emit(KvEvent event) {
  event.event_id = next_event_id_++;
  if (sink_) sink_->OnKvEvent(event);
}

std::vector<int32_t> BlockPool::MatchPrefix(std::span<const uint64_t> sequence_hashes, size_t max_blocks) const {
  std::vector<int32_t> ids;
  if (!prefix_caching_) return ids;
  for (size_t i = 0; i < sequence_hashes.size() && i < max_blocks; ++i) {
    auto it = cached_.find(sequence_hashes[i]);
    if (it == cached_.end()) break;
    ids.push_back(it->second);
  }
  return ids;
}

int BlockPool::CountUnreferenced(std::span<const int32_t> ids) const {
  int n = 0;
  for (int32_t id : ids) n += blocks_[id].ref == 0 ? 1 : 0;
  return n;
}

void BlockPool::Acquire(std::span<const int32_t> ids) {
  for (int32_t id : ids) {
    Block& b = blocks_[id];
    if (b.ref++ == 0) Unlink(id);
  }
}

bool BlockPool::Allocate(int n, std::vector<int32_t>& out) {
  if (n > num_free_) return false;
  KvEvent removed;
  removed.type = KvEvent::Type::kRemoved;
  for (int i = 0; i < n; ++i) {
    const int32_t id = head_;
    Unlink(id);
    Block& b = blocks_[id];
    if (b.registered) {
      cached_.erase(b.hash);
      b.registered = false;
      removed.removed.push_back(b.hash);
    }
    b.ref = 1;
    out.push_back(id);
  }
  if (!removed.removed.empty()) Emit(std::move(removed));
  return true;
}

void BlockPool::Release(std::span<const int32_t> block_table) {
  for (size_t i = block_table.size(); i-- > 0;) {
    const int32_t id = block_table[i];
    Block& b = blocks_[id];
    assert(b.ref > 0);
    if (--b.ref > 0) continue;
    if (b.registered) PushBack(id); else PushFront(id);
  }
}

void BlockPool::RegisterBlocks(std::span<const int32_t> ids, std::span<const uint64_t> sequence_hashes,
                               std::span<const uint64_t> local_hashes, std::optional<uint64_t> parent_hash,
                               std::span<const uint32_t> tokens) {
  assert(ids.size() == sequence_hashes.size() && ids.size() == local_hashes.size());
  assert(tokens.size() == ids.size() * static_cast<size_t>(block_size_));
  if (!prefix_caching_) return;
  KvEvent run;
  auto flush = [&] {
    if (run.blocks.empty()) return;
    run.type = KvEvent::Type::kStored;
    Emit(std::move(run));
    run = KvEvent();
  };
  for (size_t i = 0; i < ids.size(); ++i) {
    Block& b = blocks_[ids[i]];
    assert(b.ref > 0);
    const uint64_t h = sequence_hashes[i];
    const bool fresh = !b.registered && cached_.emplace(h, ids[i]).second;
    if (!fresh) {
      flush();
      continue;
    }
    b.registered = true;
    b.hash = h;
    if (run.blocks.empty()) run.parent_hash = i == 0 ? parent_hash : std::optional<uint64_t>(sequence_hashes[i - 1]);
    auto block_tokens = tokens.subspan(i * block_size_, block_size_);
    run.blocks.push_back({h, local_hashes[i], {block_tokens.begin(), block_tokens.end()}});
  }
  flush();
}

void BlockPool::ClearCache() {
  for (auto& [hash, id] : cached_) {
    Block& b = blocks_[id];
    if (b.in_free_queue) --num_cached_free_;
    b.registered = false;
  }
  cached_.clear();
  KvEvent cleared;
  cleared.type = KvEvent::Type::kCleared;
  Emit(std::move(cleared));
}

}  // namespace dyn
