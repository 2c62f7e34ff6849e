// The dyn subcommands. Each command file registers itself with DYN_REGISTER_COMMAND, so adding a
// command is adding one *_command.cpp file (apps/dyn/CMakeLists.txt globs them); main.cpp only
// dispatches. A command receives argv[0] followed by its own flags and returns the exit code.
#pragma once

#include <vector>

namespace dyn {

using CommandFn = int (*)(int argc, char** argv);

struct CommandInfo {
  const char* name;
  const char* summary;  // one line for `dyn --help`
  int order;            // position in the help listing (smaller first)
  CommandFn fn;
};

// Called from static initialisers; returns true so it can initialise a variable.
bool RegisterCommand(const CommandInfo& info);
// Every registered command, sorted by order then name.
std::vector<CommandInfo> RegisteredCommands();

}  // namespace dyn

#define DYN_REGISTER_COMMAND_CAT2(a, b) a##b
#define DYN_REGISTER_COMMAND_CAT(a, b) DYN_REGISTER_COMMAND_CAT2(a, b)
// DYN_REGISTER_COMMAND("replay", "replay a trace through the router", 50, &ReplayCommand);
#define DYN_REGISTER_COMMAND(name, summary, order, fn)                                    \
  [[maybe_unused]] static const bool DYN_REGISTER_COMMAND_CAT(dyn_command_registered_, __LINE__) = \
      ::dyn::RegisterCommand(::dyn::CommandInfo{name, summary, order, fn})
