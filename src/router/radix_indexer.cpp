#include "router/radix_indexer.h"

#include <algorithm>
#include <cassert>

namespace dyn::router {

const char* ApplyCodeName(ApplyCode code) {
  switch (code) {
    case ApplyCode::kApplied: return "applied";
    case ApplyCode::kGap: return "gap";
    case ApplyCode::kDroppedUnknownParent: return "dropped_unknown_parent";
    case ApplyCode::kDuplicate: return "duplicate";
    case ApplyCode::kIgnoredTier: return "ignored_tier";
  }
  return "?";
}

RadixIndexer::RadixIndexer(Config config) : config_(config) {}

uint32_t RadixIndexer::WorkerIndex(const WorkerKey& key) {
  auto it = worker_index_.find(key);
  if (it != worker_index_.end()) return it->second;
  uint32_t w;
  if (!free_indices_.empty()) {
    w = free_indices_.back();
    free_indices_.pop_back();
  } else {
    w = static_cast<uint32_t>(workers_.size());
    workers_.emplace_back();
  }
  workers_[w] = WorkerState{};
  workers_[w].key = key;
  workers_[w].live = true;
  worker_index_.emplace(key, w);
  return w;
}

const RadixIndexer::WorkerState* RadixIndexer::FindWorker(const WorkerKey& key) const {
  auto it = worker_index_.find(key);
  return it == worker_index_.end() ? nullptr : &workers_[it->second];
}

bool RadixIndexer::Tracks(StorageTier tier) const {
  switch (tier) {
    case StorageTier::kDevice: return config_.track_device;
    case StorageTier::kHost: return config_.track_host;
    case StorageTier::kDisk: return config_.track_disk;
    case StorageTier::kExternal: return config_.track_external;
  }
  return false;
}

ApplyResult RadixIndexer::ApplyEvent(const RouterEvent& event) {
  const uint32_t w = WorkerIndex(event.worker);
  WorkerState& ws = workers_[w];
  ApplyResult result;
  if (event.event_id != 0) {
    const uint64_t expected = ws.last_event_id + 1;
    if (event.event_id < expected) {
      ++stats_.duplicates;
      result.code = ApplyCode::kDuplicate;
      result.message = "duplicate: expected " + std::to_string(expected) + " got " + std::to_string(event.event_id);
      return result;
    }
    if (event.event_id > expected) {
      ++stats_.gaps;
      result.code = ApplyCode::kGap;
      result.message = "gap: expected " + std::to_string(expected) + " got " + std::to_string(event.event_id);
    }
    ws.last_event_id = event.event_id;
  }
  if (!Tracks(event.tier)) {
    ++stats_.ignored_tier;
    if (result.code == ApplyCode::kApplied) result.code = ApplyCode::kIgnoredTier;
    return result;
  }
  if (const auto* stored = std::get_if<StoredData>(&event.data)) {
    if (ApplyStored(w, *stored) == ApplyCode::kDroppedUnknownParent) {
      ++stats_.dropped_unknown_parent;
      // A gap explains the missing parent; report the gap, which is what the caller acts on.
      if (result.code != ApplyCode::kGap) {
        result.code = ApplyCode::kDroppedUnknownParent;
        result.message = "unknown parent " + std::to_string(*stored->parent_hash) + " for worker " +
                         event.worker.ToString();
      }
      return result;
    }
  } else if (const auto* removed = std::get_if<RemovedData>(&event.data)) {
    ApplyRemoved(w, *removed);
  } else {
    ClearWorker(w);
  }
  ++stats_.events_applied;
  return result;
}

void RadixIndexer::AddHolder(uint64_t seq_hash, uint64_t tokens_hash, uint32_t w) {
  Node& node = nodes_[seq_hash];
  node.tokens_hash = tokens_hash;
  auto it = std::lower_bound(node.holders.begin(), node.holders.end(), w,
                             [](const Holder& h, uint32_t v) { return h.worker < v; });
  if (it != node.holders.end() && it->worker == w) {
    ++it->refs;
  } else {
    node.holders.insert(it, Holder{w, 1});
  }
}

void RadixIndexer::DropHolder(uint64_t seq_hash, uint32_t w) {
  auto nit = nodes_.find(seq_hash);
  if (nit == nodes_.end()) return;
  auto& holders = nit->second.holders;
  auto it = std::lower_bound(holders.begin(), holders.end(), w,
                             [](const Holder& h, uint32_t v) { return h.worker < v; });
  if (it == holders.end() || it->worker != w) return;
  if (--it->refs == 0) holders.erase(it);
  // Nodes need no parent links (the sequence hash is the path), so an empty node can go even
  // while descendants remain.
  if (holders.empty()) nodes_.erase(nit);
}

ApplyCode RadixIndexer::ApplyStored(uint32_t w, const StoredData& stored) {
  WorkerState& ws = workers_[w];
  bool has_parent = stored.parent_hash.has_value();
  uint64_t parent_engine = has_parent ? *stored.parent_hash : 0;
  uint64_t parent_seq = 0;
  if (has_parent) {
    auto it = ws.blocks.find(parent_engine);
    if (it == ws.blocks.end()) return ApplyCode::kDroppedUnknownParent;
    parent_seq = it->second.seq_hash;
  }
  for (const StoredBlock& b : stored.blocks) {
    const uint64_t seq = has_parent ? ChainBlockHash(parent_seq, b.tokens_hash, config_.hash_seed) : b.tokens_hash;
    auto [it, inserted] = ws.blocks.try_emplace(b.block_hash);
    if (!inserted) {
      if (it->second.seq_hash != seq) {
        // The engine reused an id for other content: the old block is gone.
        DropHolder(it->second.seq_hash, w);
        AddHolder(seq, b.tokens_hash, w);
      }
    } else {
      AddHolder(seq, b.tokens_hash, w);
      ++total_blocks_;
    }
    it->second = Entry{seq, has_parent, parent_engine};
    has_parent = true;
    parent_engine = b.block_hash;
    parent_seq = seq;
  }
  return ApplyCode::kApplied;
}

void RadixIndexer::ApplyRemoved(uint32_t w, const RemovedData& removed) {
  WorkerState& ws = workers_[w];
  for (uint64_t h : removed.block_hashes) {
    auto it = ws.blocks.find(h);
    if (it == ws.blocks.end()) continue;  // already gone (e.g. evicted before we saw it stored)
    DropHolder(it->second.seq_hash, w);
    ws.blocks.erase(it);
    --total_blocks_;
  }
}

void RadixIndexer::ClearWorker(uint32_t w) {
  WorkerState& ws = workers_[w];
  for (const auto& [engine_hash, entry] : ws.blocks) DropHolder(entry.seq_hash, w);
  total_blocks_ -= ws.blocks.size();
  ws.blocks.clear();
}

void RadixIndexer::RemoveWorker(const WorkerKey& worker) {
  auto it = worker_index_.find(worker);
  if (it == worker_index_.end()) return;
  const uint32_t w = it->second;
  ClearWorker(w);
  workers_[w] = WorkerState{};
  worker_index_.erase(it);
  free_indices_.push_back(w);
}

std::vector<WorkerMatch> RadixIndexer::FindMatches(std::span<const uint64_t> seq) const {
  std::vector<WorkerMatch> out;
  if (seq.empty()) return out;
  auto first = nodes_.find(seq[0]);
  if (first == nodes_.end()) return out;
  // live: workers that matched every block so far (sorted). depth of a worker = the index of the
  // first block it misses.
  std::vector<uint32_t> live;
  live.reserve(first->second.holders.size());
  for (const Holder& h : first->second.holders) live.push_back(h.worker);
  auto finish = [&](uint32_t w, size_t depth) {
    const WorkerState& ws = workers_[w];
    out.push_back(WorkerMatch{ws.key, static_cast<uint32_t>(depth), ws.blocks.size()});
  };
  size_t i = 1;
  for (; i < seq.size() && !live.empty(); ++i) {
    auto nit = nodes_.find(seq[i]);
    if (nit == nodes_.end()) break;
    const auto& holders = nit->second.holders;
    // Merge-intersect the two sorted lists in place; the losers stop at depth i.
    size_t keep = 0, j = 0;
    for (uint32_t w : live) {
      while (j < holders.size() && holders[j].worker < w) ++j;
      if (j < holders.size() && holders[j].worker == w) {
        live[keep++] = w;
      } else {
        finish(w, i);
      }
    }
    live.resize(keep);
  }
  for (uint32_t w : live) finish(w, i);
  return out;
}

std::vector<WorkerMatch> RadixIndexer::FindMatchesLocal(std::span<const uint64_t> local) const {
  std::vector<uint64_t> seq(local.size());
  for (size_t i = 0; i < local.size(); ++i) {
    seq[i] = i == 0 ? local[0] : ChainBlockHash(seq[i - 1], local[i], config_.hash_seed);
  }
  return FindMatches(seq);
}

size_t RadixIndexer::TreeSize(const WorkerKey& worker) const {
  const WorkerState* ws = FindWorker(worker);
  return ws ? ws->blocks.size() : 0;
}

std::vector<WorkerKey> RadixIndexer::Workers() const {
  std::vector<WorkerKey> out;
  for (const auto& [key, w] : worker_index_) out.push_back(key);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<RouterEvent> RadixIndexer::Dump(const WorkerKey& worker) const {
  std::vector<RouterEvent> out;
  const WorkerState* ws = FindWorker(worker);
  if (!ws) return out;
  // state: 1 emitted, 2 orphaned (some ancestor missing, or a parent cycle from reused engine
  // ids), 3 on the current climb.
  std::unordered_map<uint64_t, uint8_t> state;
  state.reserve(ws->blocks.size());
  std::vector<uint64_t> stack;
  for (const auto& [start, unused] : ws->blocks) {
    if (state.count(start)) continue;
    // Climb to the first ancestor already decided (or the root / a missing parent), then emit
    // back down, so parents come first without recursion.
    stack.clear();
    uint64_t h = start;
    uint8_t verdict = 1;
    for (;;) {
      auto sit = state.find(h);
      if (sit != state.end()) {
        verdict = sit->second == 3 ? 2 : sit->second;
        break;
      }
      auto bit = ws->blocks.find(h);
      if (bit == ws->blocks.end()) {
        verdict = 2;
        break;
      }
      stack.push_back(h);
      state[h] = 3;
      if (!bit->second.has_parent) break;
      h = bit->second.parent_engine_hash;
    }
    for (auto it = stack.rbegin(); it != stack.rend(); ++it) {
      state[*it] = verdict;
      if (verdict != 1) continue;
      const Entry& e = ws->blocks.at(*it);
      StoredData sd;
      if (e.has_parent) sd.parent_hash = e.parent_engine_hash;
      sd.blocks.push_back(StoredBlock{*it, nodes_.at(e.seq_hash).tokens_hash, {}});
      out.push_back(RouterEvent{worker, 0, StorageTier::kDevice, std::move(sd)});
    }
  }
  return out;
}

void RadixIndexer::SetLastEventId(const WorkerKey& worker, uint64_t event_id) {
  workers_[WorkerIndex(worker)].last_event_id = event_id;
}

uint64_t RadixIndexer::LastEventId(const WorkerKey& worker) const {
  const WorkerState* ws = FindWorker(worker);
  return ws ? ws->last_event_id : 0;
}

}  // namespace dyn::router
