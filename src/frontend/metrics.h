// The frontend's Prometheus metrics (text exposition format 0.0.4). Thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

namespace dyn {

class ModelRegistry;

class FrontendMetrics {
 public:
  void RequestStarted();
  // One per HTTP request, when its response is complete (or the client went away).
  void RequestFinished(std::string_view endpoint, int status);
  void ErrorReturned(std::string_view code);
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds, uint64_t tokens);
  void AddTokens(uint64_t prompt, uint64_t cached_prompt, uint64_t generated);

  // Frontend metrics plus each served model's EngineMetrics.
  std::string Render(const ModelRegistry& registry) const;

 private:
  struct Histogram {
    static constexpr std::array<double, 16> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                                       0.25,  0.5,    1,     2.5,  5,     10,   30,    60};
    std::array<uint64_t, kBounds.size()> buckets{};
    uint64_t count = 0;
    double sum = 0;
    void Observe(double v, uint64_t times);
    void Render(std::string* out, std::string_view name, std::string_view help) const;
  };

  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, uint64_t> errors_;
  int64_t inflight_ = 0;
  Histogram ttft_, itl_;
  uint64_t prompt_tokens_ = 0, cached_tokens_ = 0, generated_tokens_ = 0;
};

}  // namespace dyn
