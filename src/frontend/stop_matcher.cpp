#include "frontend/stop_matcher.h"

#include <algorithm>

namespace dyn {

StopMatcher::StopMatcher(std::vector<std::string> stops, bool include_stop_str)
    : include_stop_str_(include_stop_str) {
  for (size_t i = 0; i < stops.size(); ++i) {
    if (stops[i].empty()) continue;
    stops_.push_back(std::move(stops[i]));
    original_index_.push_back(static_cast<int>(i));
  }
}

StopMatcher::Step StopMatcher::Push(std::string_view text) {
  Step step;
  if (stopped_) {
    step.stopped = true;
    return step;
  }
  if (stops_.empty()) {
    step.text.assign(text);
    return step;
  }
  held_.append(text);
  // The earliest match wins; among matches at the same position, the longest.
  size_t best_pos = std::string::npos;
  int best = -1;
  for (size_t i = 0; i < stops_.size(); ++i) {
    size_t pos = held_.find(stops_[i]);
    if (pos == std::string::npos) continue;
    if (pos < best_pos || (pos == best_pos && stops_[i].size() > stops_[best].size())) {
      best_pos = pos;
      best = static_cast<int>(i);
    }
  }
  if (best >= 0) {
    size_t end = include_stop_str_ ? best_pos + stops_[best].size() : best_pos;
    step.text = held_.substr(0, end);
    step.stopped = true;
    step.stop_index = original_index_[best];
    stopped_ = true;
    held_.clear();
    return step;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string. Such a suffix
  // starts where a stop string starts, so it never splits a UTF-8 sequence.
  size_t keep = 0;
  for (const auto& stop : stops_) {
    size_t max_len = std::min(stop.size() - 1, held_.size());
    for (size_t len = max_len; len > keep; --len) {
      if (std::string_view(held_).substr(held_.size() - len) == std::string_view(stop).substr(0, len)) {
        keep = len;
        break;
      }
    }
  }
  step.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return step;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return out;
}

}  // namespace dyn
