#include "router/kv_router.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <unordered_map>

namespace dyn::router {

RequestBlocks HashRequest(std::span<const uint32_t> tokens, int block_size, uint64_t seed) {
  RequestBlocks r;
  ExtendBlockHashes(tokens, block_size, seed, r.local, r.sequence);
  r.isl = static_cast<int64_t>(tokens.size());
  return r;
}

KvRouter::KvRouter(KvRouterConfig config, RadixIndexer& indexer, ActiveSequences& active)
    : config_(config), indexer_(indexer), active_(active), rng_(config.seed) {
  assert(config_.block_size >= 1);
  assert(active_.block_size() == config_.block_size);
}

std::vector<WorkerCost> KvRouter::Costs(const RequestBlocks& request,
                                        std::span<const WorkerCandidate> candidates) const {
  std::vector<WorkerMatch> matches = indexer_.FindMatches(request.sequence);
  std::unordered_map<WorkerKey, uint32_t, WorkerKeyHash> depth;
  depth.reserve(matches.size());
  for (const WorkerMatch& m : matches) depth.emplace(m.worker, m.depth);
  const auto active_overlap = active_.ActiveOverlap(request.sequence);
  const int64_t request_blocks = static_cast<int64_t>(request.sequence.size());
  const double b = config_.block_size;
  std::vector<WorkerCost> costs;
  costs.reserve(candidates.size());
  for (const WorkerCandidate& c : candidates) {
    WorkerCost wc;
    wc.worker = c.worker;
    auto it = depth.find(c.worker);
    wc.overlap_blocks = it == depth.end() ? 0 : it->second;
    const int64_t active_prefill = active_.ActivePrefillTokens(c.worker);
    wc.prefill_tokens =
        active_prefill + std::max<int64_t>(0, request.isl - static_cast<int64_t>(wc.overlap_blocks) * config_.block_size);
    auto ao = active_overlap.find(c.worker);
    wc.decode_blocks = active_.ActiveBlocks(c.worker) + request_blocks - (ao == active_overlap.end() ? 0 : ao->second);
    wc.cost = config_.overlap_weight * static_cast<double>(wc.prefill_tokens) / b + static_cast<double>(wc.decode_blocks);
    wc.tree_size = indexer_.TreeSize(c.worker);
    wc.busy = (config_.busy_kv_usage && c.kv_usage > *config_.busy_kv_usage) ||
              (config_.busy_prefill_tokens && active_prefill > *config_.busy_prefill_tokens);
    costs.push_back(wc);
  }
  return costs;
}

size_t KvRouter::Select(const std::vector<WorkerCost>& costs) {
  std::vector<size_t> ok;
  for (size_t i = 0; i < costs.size(); ++i) {
    if (!costs[i].busy) ok.push_back(i);
  }
  assert(!ok.empty());
  double lo = costs[ok[0]].cost, hi = lo;
  for (size_t i : ok) {
    lo = std::min(lo, costs[i].cost);
    hi = std::max(hi, costs[i].cost);
  }
  // Costs are sums of small integers scaled by w / B: compare with a tolerance so equal costs
  // computed in different orders still tie.
  const double eps = 1e-9 * std::max(1.0, std::abs(hi));
  if (config_.temperature <= 0.0 || hi - lo <= eps) {
    if (config_.temperature > 0.0) {
      // All costs equal: the softmax is uniform over every non-busy candidate.
      return ok[std::uniform_int_distribution<size_t>(0, ok.size() - 1)(rng_)];
    }
    std::vector<size_t> best;
    size_t best_tree = SIZE_MAX;
    for (size_t i : ok) {
      if (costs[i].cost - lo > eps) continue;
      if (costs[i].tree_size < best_tree) {
        best_tree = costs[i].tree_size;
        best.clear();
      }
      if (costs[i].tree_size == best_tree) best.push_back(i);
    }
    if (best.size() == 1) return best[0];
    return best[std::uniform_int_distribution<size_t>(0, best.size() - 1)(rng_)];
  }
  // p ~ exp(-(cost / (max - min)) / T); shifting by min only rescales every term equally and
  // keeps exp() from underflowing.
  std::vector<double> weights;
  weights.reserve(ok.size());
  const double range = hi - lo;
  for (size_t i : ok) weights.push_back(std::exp(-((costs[i].cost - lo) / range) / config_.temperature));
  std::discrete_distribution<size_t> dist(weights.begin(), weights.end());
  return ok[dist(rng_)];
}

Result<RouteDecision> KvRouter::Route(const std::string& request_id, const RequestBlocks& request,
                                      std::span<const WorkerCandidate> candidates, RouterClock::time_point now) {
  if (candidates.empty()) return Status::Unavailable("no workers");
  if (config_.track_active) active_.Expire(now);
  if (config_.approximate) ExpireApproximate(now);
  RouteDecision d;
  d.costs = Costs(request, candidates);
  if (std::all_of(d.costs.begin(), d.costs.end(), [](const WorkerCost& c) { return c.busy; })) {
    ++stats_.rejections;
    return Status::Unavailable("all workers busy");
  }
  const WorkerCost& chosen = d.costs[Select(d.costs)];
  d.worker = chosen.worker;
  d.overlap_blocks = chosen.overlap_blocks;
  d.cost = chosen.cost;
  ++stats_.decisions;
  if (config_.track_active) {
    DYN_RETURN_IF_ERROR(active_.AddRequest(request_id, d.worker, request.sequence, request.isl, d.overlap_blocks, now));
  }
  if (config_.approximate) InsertApproximate(d.worker, request, now);
  return d;
}

void KvRouter::InsertApproximate(const WorkerKey& worker, const RequestBlocks& request, RouterClock::time_point now) {
  if (request.sequence.empty()) return;
  // The router's sequence hash doubles as the engine id: there is no engine id in this mode.
  RouterEvent ev;
  ev.worker = worker;
  StoredData sd;
  for (size_t i = 0; i < request.sequence.size(); ++i) {
    sd.blocks.push_back(StoredBlock{request.sequence[i], request.local[i], {}});
  }
  ev.data = std::move(sd);
  indexer_.ApplyEvent(ev);
  auto& touched = last_touch_[worker];
  // Leaves first: a prune that stops part-way through one request's chain removes its tail and
  // keeps the prefix reachable.
  for (size_t i = request.sequence.size(); i-- > 0;) {
    touched[request.sequence[i]] = now;
    touches_.push_back(Touch{now, worker, request.sequence[i]});
  }
  size_t live = 0;
  for (const auto& [w, m] : last_touch_) live += m.size();
  if (touches_.size() > 2 * live + 1024) {
    // Refreshed blocks leave stale entries behind; drop them so the queue stays O(live blocks).
    std::deque<Touch> kept;
    for (const Touch& t : touches_) {
      auto wit = last_touch_.find(t.worker);
      if (wit == last_touch_.end()) continue;
      auto bit = wit->second.find(t.seq_hash);
      if (bit != wit->second.end() && bit->second == t.at) kept.push_back(t);
    }
    touches_.swap(kept);
  }
  if (indexer_.total_blocks() > config_.approx_max_blocks) {
    const size_t target = static_cast<size_t>(static_cast<double>(config_.approx_max_blocks) * config_.approx_prune_to);
    while (indexer_.total_blocks() > target && !touches_.empty()) {
      Touch t = touches_.front();
      touches_.pop_front();
      auto wit = last_touch_.find(t.worker);
      if (wit == last_touch_.end()) continue;
      auto bit = wit->second.find(t.seq_hash);
      if (bit == wit->second.end() || bit->second != t.at) continue;
      wit->second.erase(bit);
      indexer_.ApplyEvent(RouterEvent{t.worker, 0, StorageTier::kDevice, RemovedData{{t.seq_hash}}});
      ++stats_.approx_pruned;
    }
  }
}

void KvRouter::ExpireApproximate(RouterClock::time_point now) {
  while (!touches_.empty() && touches_.front().at + config_.approx_ttl <= now) {
    Touch t = touches_.front();
    touches_.pop_front();
    auto wit = last_touch_.find(t.worker);
    if (wit == last_touch_.end()) continue;
    auto bit = wit->second.find(t.seq_hash);
    if (bit == wit->second.end() || bit->second != t.at) continue;  // refreshed since
    wit->second.erase(bit);
    if (wit->second.empty()) last_touch_.erase(wit);
    indexer_.ApplyEvent(RouterEvent{t.worker, 0, StorageTier::kDevice, RemovedData{{t.seq_hash}}});
    ++stats_.approx_expired;
  }
}

}  // namespace dyn::router
