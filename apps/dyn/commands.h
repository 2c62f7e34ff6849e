// The dyn subcommands. Each returns the process exit code.
#pragma once

namespace dyn {

int RunCommand(int argc, char** argv);
int TokenizeCommand(int argc, char** argv, bool detokenize);
int WorkerCommand(int argc, char** argv);
int FrontendCommand(int argc, char** argv);

}  // namespace dyn
