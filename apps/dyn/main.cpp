// dyn: one binary, subcommands. This file only dispatches; each command lives in its own
// *_command.cpp file and registers itself (commands.h).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

#include "apps/dyn/commands.h"

namespace dyn {
namespace {

std::vector<CommandInfo>& Registry() {
  static std::vector<CommandInfo> commands;
  return commands;
}

}  // namespace

bool RegisterCommand(const CommandInfo& info) {
  Registry().push_back(info);
  return true;
}

std::vector<CommandInfo> RegisteredCommands() {
  std::vector<CommandInfo> out = Registry();
  std::sort(out.begin(), out.end(), [](const CommandInfo& a, const CommandInfo& b) {
    return a.order != b.order ? a.order < b.order : std::strcmp(a.name, b.name) < 0;
  });
  return out;
}

}  // namespace dyn

namespace {

void PrintUsage() {
  std::fputs("usage: dyn <command> [flags]\n\ncommands:\n", stderr);
  for (const dyn::CommandInfo& c : dyn::RegisteredCommands()) std::fprintf(stderr, "  %-12s %s\n", c.name, c.summary);
  std::fputs(
      "\n"
      "Run 'dyn <command> --help' for a command's flags. Every flag is also an environment\n"
      "variable: --max-num-seqs 8 is DYN_MAX_NUM_SEQS=8.\n",
      stderr);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "help")) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  // Drop the subcommand: commands see argv[0] followed by their own flags.
  argv[1] = argv[0];
  for (const dyn::CommandInfo& c : dyn::RegisteredCommands()) {
    if (cmd == c.name) return c.fn(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "dyn: unknown command '%s'\n\n", cmd.c_str());
  PrintUsage();
  return 2;
}
