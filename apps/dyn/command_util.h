// What every serving command does the same way: parse flags, require a model path, and turn
// SIGINT/SIGTERM into an orderly shutdown.
#pragma once

#include <signal.h>

#include <string>

namespace dyn {

class FlagSet;

// Parses argv into `fs`. Returns -1 to go on, or the exit code to return: 0 after printing
// --help, 2 after printing a bad flag's error.
int ParseCommandFlags(FlagSet& fs, int argc, char** argv, const char* command);
// Takes the first positional argument when --model is empty. Returns -1 to go on, or 2 (with the
// usage printed) when there is no model path.
int RequireModelPath(const FlagSet& fs, std::string* model_path, const char* command);
// Blocks SIGINT and SIGTERM in the calling thread (call it before starting any thread, so that only
// WaitForTermination receives them) and ignores SIGPIPE (a peer that went away is an error return,
// not a crash).
sigset_t BlockTerminationSignals();
// Waits for SIGINT or SIGTERM; returns which.
int WaitForTermination(const sigset_t& signals);

}  // namespace dyn
