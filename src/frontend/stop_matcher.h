// Stop strings over a stream of text pieces (pure logic, no I/O).
//
// Text that could be the beginning of a stop string is held back until it is resolved, so a
// streaming client never sees text that later turns out to be part of a stop string, even when a
// stop string spans several tokens. Once a stop string matches, the stream is over: the text
// before it (plus the stop string itself with include_stop_str) is released and further input is
// ignored. Not thread-safe; one per stream.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dyn {

class StopMatcher {
 public:
  // Empty strings in `stops` are ignored.
  StopMatcher(std::vector<std::string> stops, bool include_stop_str);

  struct Step {
    std::string text;      // safe to emit now
    bool stopped = false;  // a stop string matched; `text` is the last of the stream
    int stop_index = -1;   // which stop string (index into the constructor's list)
  };
  // Adds newly decoded text.
  Step Push(std::string_view text);
  // End of stream without a stop: releases whatever is held back.
  std::string Flush();

  bool stopped() const { return stopped_; }
  bool empty() const { return stops_.empty(); }

 private:
  std::vector<std::string> stops_;
  std::vector<int> original_index_;
  bool include_stop_str_;
  bool stopped_ = false;
  std::string held_;
};

}  // namespace dyn
