// Minimal leveled logging to stderr: DYN_LOG(INFO) << "loaded " << n << " tensors";
// The level comes from DYN_LOG_LEVEL (debug|info|warn|error; default info). Thread-safe: each
// statement is written with one write call.
#pragma once

#include <sstream>

namespace dyn::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

Level MinLevel();
void SetMinLevel(Level level);

class Line {
 public:
  Line(Level level, const char* file, int line);
  ~Line();
  std::ostream& stream() { return os_; }

 private:
  Level level_;
  std::ostringstream os_;
};

}  // namespace dyn::log

#define DYN_LOG_LEVEL_DEBUG ::dyn::log::Level::kDebug
#define DYN_LOG_LEVEL_INFO ::dyn::log::Level::kInfo
#define DYN_LOG_LEVEL_WARN ::dyn::log::Level::kWarn
#define DYN_LOG_LEVEL_ERROR ::dyn::log::Level::kError
#define DYN_LOG(severity)                                         \
  if (DYN_LOG_LEVEL_##severity < ::dyn::log::MinLevel()) {        \
  } else                                                          \
    ::dyn::log::Line(DYN_LOG_LEVEL_##severity, __FILE__, __LINE__).stream()
