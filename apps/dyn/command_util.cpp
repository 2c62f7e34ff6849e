#include "apps/dyn/command_util.h"

#include <pthread.h>

#include <cstdio>

#include "base/flags.h"

namespace dyn {

int ParseCommandFlags(FlagSet& fs, int argc, char** argv, const char* command) {
  if (Status s = fs.Parse(argc, argv); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", command, s.message().c_str());
    return 2;
  }
  if (fs.help_requested()) {
    std::fputs(fs.Usage().c_str(), stdout);
    return 0;
  }
  return -1;
}

int RequireModelPath(const FlagSet& fs, std::string* model_path, const char* command) {
  if (model_path->empty() && !fs.positional().empty()) *model_path = fs.positional()[0];
  if (!model_path->empty()) return -1;
  std::fprintf(stderr, "%s: --model is required\n%s", command, fs.Usage().c_str());
  return 2;
}

sigset_t BlockTerminationSignals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return sigs;
}

int WaitForTermination(const sigset_t& signals) {
  int sig = 0;
  sigwait(&signals, &sig);
  return sig;
}

}  // namespace dyn
