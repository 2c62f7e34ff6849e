// dyn: one binary, subcommands. This file only dispatches; each command lives in its own file.
#include <cstdio>
#include <cstring>
#include <string>

#include "apps/dyn/commands.h"

namespace {

void PrintUsage() {
  std::fputs(
      "usage: dyn <command> [flags]\n"
      "\n"
      "commands:\n"
      "  run          serve a model from one process: OpenAI API + engine (dyn run --model PATH)\n"
      "  frontend     OpenAI API for the workers registered in discovery (etcd, file)\n"
      "  worker       serve a model's engine on the request plane, registered in discovery\n"
      "  tokenize     text -> token ids with a model's tokenizer\n"
      "  detokenize   token ids -> text\n"
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
  int sub_argc = argc - 1;
  char** sub_argv = argv + 1;
  if (cmd == "run") return dyn::RunCommand(sub_argc, sub_argv);
  if (cmd == "worker") return dyn::WorkerCommand(sub_argc, sub_argv);
  if (cmd == "frontend") return dyn::FrontendCommand(sub_argc, sub_argv);
  if (cmd == "tokenize") return dyn::TokenizeCommand(sub_argc, sub_argv, /*detokenize=*/false);
  if (cmd == "detokenize") return dyn::TokenizeCommand(sub_argc, sub_argv, /*detokenize=*/true);
  std::fprintf(stderr, "dyn: unknown command '%s'\n\n", cmd.c_str());
  PrintUsage();
  return 2;
}
