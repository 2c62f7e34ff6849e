#include "llm/tokenizer/bpe_model.h"

#include <algorithm>
#include <atomic>
#include <cstdio>

#include "llm/tokenizer/text_util.h"

namespace dyn::tok {

void PairMap::Reserve(size_t n) {
  size_t cap = 16;
  shift_ = 60;
  while (cap < n * 2) {
    cap <<= 1;
    --shift_;
  }
  slots_.assign(cap, Entry{});
  mask_ = cap - 1;
  size_ = 0;
}

void PairMap::Insert(uint32_t a, uint32_t b, uint32_t rank, uint32_t new_id) {
  if ((size_ + 1) * 2 > slots_.size()) {
    std::vector<Entry> old = std::move(slots_);
    Reserve(std::max<size_t>(16, size_ * 2 + 2));
    for (const auto& e : old) {
      if (e.key != kEmpty) Insert(static_cast<uint32_t>(e.key >> 32), static_cast<uint32_t>(e.key), e.rank, e.new_id);
    }
  }
  uint64_t key = Key(a, b);
  size_t i = Hash(key);
  while (slots_[i].key != kEmpty) {
    if (slots_[i].key == key) return;
    i = (i + 1) & mask_;
  }
  slots_[i] = Entry{key, rank, new_id};
  ++size_;
}

namespace {

std::atomic<uint64_t> g_next_cache_owner{1};
constexpr std::string_view kMetaspace = "\xE2\x96\x81";

// Word -> ids, per thread, for the most recently used model. Bounded: cleared when full.
struct WordCache {
  uint64_t owner = 0;
  StringMap<std::vector<uint32_t>> map;
};
constexpr size_t kCacheMaxEntries = 1 << 17;
constexpr size_t kCacheMaxWordBytes = 128;

WordCache& ThreadCache() {
  thread_local WordCache cache;
  return cache;
}

}  // namespace

BpeModel::BpeModel() : cache_owner_(g_next_cache_owner.fetch_add(1)) {
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
}

Status BpeModel::Init(std::vector<std::pair<std::string, uint32_t>> vocab, Options options) {
  opt_ = std::move(options);
  uint32_t bound = 0;
  for (const auto& [tok, id] : vocab) bound = std::max(bound, id + 1);
  id_to_token_.assign(bound, std::string());
  id_known_.assign(bound, 0);
  vocab_.reserve(vocab.size());
  char_ids_.assign(0x10000, -1);
  for (auto& [tok, id] : vocab) {
    id_to_token_[id] = tok;
    id_known_[id] = 1;
    if (tok.size() == 6 && tok.compare(0, 3, "<0x") == 0 && tok[5] == '>') {
      unsigned v = 0;
      if (std::sscanf(tok.c_str() + 3, "%2X", &v) == 1) byte_ids_[v & 0xFF] = id;
    }
    size_t i = 0;
    if (!tok.empty()) {
      uint32_t cp = DecodeUtf8(tok, i);
      if (i == tok.size() && cp < 0x10000) char_ids_[cp] = static_cast<int32_t>(id);
    }
    vocab_.emplace(std::move(tok), id);
  }
  split_at_metaspace_ = opt_.continuing_subword_prefix.empty() && opt_.end_of_word_suffix.empty() &&
                        !opt_.ignore_merges && vocab_.count(std::string_view(kMetaspace)) > 0;
  for (const auto& [tok, id] : vocab_) {
    if (!split_at_metaspace_) break;
    for (size_t pos = tok.find(kMetaspace, 1); pos != std::string::npos; pos = tok.find(kMetaspace, pos + 1)) {
      if (pos < kMetaspace.size() || tok.compare(pos - kMetaspace.size(), kMetaspace.size(), kMetaspace) != 0) {
        split_at_metaspace_ = false;
        break;
      }
    }
  }
  if (opt_.unk_token) {
    auto it = vocab_.find(*opt_.unk_token);
    if (it == vocab_.end()) return Status::InvalidArgument("unk_token '" + *opt_.unk_token + "' is not in the vocabulary");
    unk_id_ = it->second;
  }
  return Status::Ok();
}

void BpeModel::AddMerge(std::string_view left, std::string_view right) {
  uint32_t rank = next_rank_++;
  auto l = vocab_.find(left);
  auto r = vocab_.find(right);
  if (l == vocab_.end() || r == vocab_.end()) return;
  std::string merged(left);
  std::string_view rest = right;
  const auto& prefix = opt_.continuing_subword_prefix;
  if (!prefix.empty() && rest.substr(0, prefix.size()) == prefix) rest.remove_prefix(prefix.size());
  merged.append(rest);
  auto m = vocab_.find(merged);
  if (m == vocab_.end()) return;
  merges_.Insert(l->second, r->second, rank, m->second);
}

std::optional<uint32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(uint32_t id) const {
  if (id >= id_to_token_.size() || !id_known_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::Tokenize(std::string_view word, std::vector<uint32_t>& out) const {
  if (word.empty()) return;
  if (opt_.ignore_merges) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (split_at_metaspace_) {
    size_t begin = 0, pos = 0;
    while ((pos = word.find(kMetaspace, pos + 1)) != std::string_view::npos) {
      if (pos >= kMetaspace.size() && word.compare(pos - kMetaspace.size(), kMetaspace.size(), kMetaspace) == 0) {
        continue;
      }
      TokenizeCached(word.substr(begin, pos - begin), out);
      begin = pos;
    }
    TokenizeCached(word.substr(begin), out);
    return;
  }
  TokenizeCached(word, out);
}

void BpeModel::TokenizeCached(std::string_view word, std::vector<uint32_t>& out) const {
  if (word.size() > kCacheMaxWordBytes) {
    TokenizeUncached(word, out);
    return;
  }
  WordCache& cache = ThreadCache();
  if (cache.owner != cache_owner_) {
    cache.map.clear();
    cache.owner = cache_owner_;
  }
  auto it = cache.map.find(word);
  if (it != cache.map.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  size_t mark = out.size();
  TokenizeUncached(word, out);
  if (cache.map.size() >= kCacheMaxEntries) cache.map.clear();
  cache.map.emplace(std::string(word), std::vector<uint32_t>(out.begin() + static_cast<ptrdiff_t>(mark), out.end()));
}

void BpeModel::TokenizeUncached(std::string_view word, std::vector<uint32_t>& out) const {
  std::vector<uint32_t> ids;
  ids.reserve(word.size());
  int64_t pending_unk = -1;
  const bool affixes = !opt_.continuing_subword_prefix.empty() || !opt_.end_of_word_suffix.empty();
  std::string scratch;
  size_t i = 0;
  while (i < word.size()) {
    size_t b = i;
    uint32_t cp = DecodeUtf8(word, i);
    int64_t id = -1;
    if (!affixes && cp < 0x10000) {
      id = char_ids_[cp];
    } else {
      scratch.clear();
      if (b > 0) scratch.append(opt_.continuing_subword_prefix);
      scratch.append(word.substr(b, i - b));
      if (i == word.size()) scratch.append(opt_.end_of_word_suffix);
      auto it = vocab_.find(scratch);
      if (it != vocab_.end()) id = it->second;
    }
    if (id >= 0) {
      if (pending_unk >= 0) ids.push_back(static_cast<uint32_t>(pending_unk)), pending_unk = -1;
      ids.push_back(static_cast<uint32_t>(id));
      continue;
    }
    if (opt_.byte_fallback) {
      bool all = true;
      for (size_t k = b; k < i; ++k) all = all && byte_ids_[static_cast<unsigned char>(word[k])] >= 0;
      if (all) {
        if (pending_unk >= 0) ids.push_back(static_cast<uint32_t>(pending_unk)), pending_unk = -1;
        for (size_t k = b; k < i; ++k) ids.push_back(static_cast<uint32_t>(byte_ids_[static_cast<unsigned char>(word[k])]));
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !opt_.fuse_unk) ids.push_back(static_cast<uint32_t>(pending_unk));
      pending_unk = *unk_id_;
    }
  }
  if (pending_unk >= 0) ids.push_back(static_cast<uint32_t>(pending_unk));
  MergeSymbols(ids);
  out.insert(out.end(), ids.begin(), ids.end());
}

// Applies merges lowest rank first (leftmost on ties), as HF's Word::merge_all.
void BpeModel::MergeSymbols(std::vector<uint32_t>& ids) const {
  const size_t n = ids.size();
  if (n < 2) return;
  struct Cand {
    uint32_t rank, pos, new_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<int32_t> prev(n), next(n);
  std::vector<uint8_t> alive(n, 1);
  for (size_t k = 0; k < n; ++k) {
    prev[k] = static_cast<int32_t>(k) - 1;
    next[k] = k + 1 < n ? static_cast<int32_t>(k + 1) : -1;
  }
  std::vector<Cand> heap;
  heap.reserve(n);
  auto push = [&](uint32_t pos, const PairMap::Entry* e) {
    heap.push_back(Cand{e->rank, pos, e->new_id});
    std::push_heap(heap.begin(), heap.end(), std::greater<Cand>());
  };
  for (size_t k = 0; k + 1 < n; ++k) {
    if (const auto* e = merges_.Find(ids[k], ids[k + 1])) push(static_cast<uint32_t>(k), e);
  }
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<Cand>());
    Cand top = heap.back();
    heap.pop_back();
    uint32_t p = top.pos;
    if (!alive[p] || next[p] < 0) continue;
    uint32_t r = static_cast<uint32_t>(next[p]);
    const auto* cur = merges_.Find(ids[p], ids[r]);
    if (cur == nullptr || cur->new_id != top.new_id) continue;  // a stale entry
    ids[p] = top.new_id;
    alive[r] = 0;
    next[p] = next[r];
    if (next[r] >= 0) prev[static_cast<size_t>(next[r])] = static_cast<int32_t>(p);
    if (prev[p] >= 0) {
      uint32_t q = static_cast<uint32_t>(prev[p]);
      if (const auto* e = merges_.Find(ids[q], ids[p])) push(q, e);
    }
    if (next[p] >= 0) {
      if (const auto* e = merges_.Find(ids[p], ids[static_cast<size_t>(next[p])])) push(p, e);
    }
  }
  size_t w = 0;
  for (size_t k = 0; k < n; ++k) {
    if (alive[k]) ids[w++] = ids[k];
  }
  ids.resize(w);
}

}  // namespace dyn::tok
