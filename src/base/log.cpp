#include "base/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace dyn::log {
namespace {

Level LevelFromEnv() {
  const char* v = std::getenv("DYN_LOG_LEVEL");
  if (!v) return Level::kInfo;
  if (!std::strcmp(v, "debug")) return Level::kDebug;
  if (!std::strcmp(v, "warn")) return Level::kWarn;
  if (!std::strcmp(v, "error")) return Level::kError;
  return Level::kInfo;
}

std::atomic<Level>& Min() {
  static std::atomic<Level> level{LevelFromEnv()};
  return level;
}

}  // namespace

Level MinLevel() { return Min().load(std::memory_order_relaxed); }
void SetMinLevel(Level level) { Min().store(level); }

Line::Line(Level level, const char* file, int line) : level_(level) {
  static const char* kNames[] = {"DEBUG", "INFO", "WARN", "ERROR"};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  const char* base = std::strrchr(file, '/');
  os_ << buf << '.' << (ms < 100 ? (ms < 10 ? "00" : "0") : "") << ms << "Z " << kNames[static_cast<int>(level)]
      << ' ' << (base ? base + 1 : file) << ':' << line << "] ";
}

Line::~Line() {
  os_ << '\n';
  std::string s = os_.str();
  ssize_t rc = ::write(2, s.data(), s.size());
  (void)rc;
}

}  // namespace dyn::log
