// Command-line flags where every flag is also an environment variable: --max-num-seqs 8 can be
// given as DYN_MAX_NUM_SEQS=8. Precedence: command line > environment > default.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace dyn {

class FlagSet {
 public:
  // `command` is used in usage text ("dyn run").
  FlagSet(std::string command, std::string summary);

  // Registers flags. `name` is without dashes, words joined by '-'. Targets keep their value as
  // the default. Pointers must outlive Parse().
  void String(const std::string& name, std::string* target, const std::string& help);
  void Int(const std::string& name, int64_t* target, const std::string& help);
  void Double(const std::string& name, double* target, const std::string& help);
  // A bool flag: "--name", "--name=true|false", "--no-name"; env value 1/0/true/false.
  void Bool(const std::string& name, bool* target, const std::string& help);

  // Parses argv (argv[0] is the program; the subcommand must already be removed). Unknown flags,
  // missing values and malformed numbers are errors that name the flag. "-h"/"--help" sets
  // help_requested(). Non-flag arguments are collected in positional().
  Status Parse(int argc, char** argv);
  bool help_requested() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  // Whether the flag was given (command line or environment), as opposed to left at its default:
  // for flags whose default depends on other flags (the mocker's sizes, say).
  bool IsSet(const std::string& name) const;
  std::string Usage() const;

  // "max-num-seqs" -> "DYN_MAX_NUM_SEQS".
  static std::string EnvName(const std::string& flag);

 private:
  enum class Kind { kString, kInt, kDouble, kBool };
  struct Flag {
    std::string name, help, default_text;
    Kind kind;
    void* target;
  };
  Status Set(const Flag& f, const std::string& value, const std::string& source);
  const Flag* Find(const std::string& name) const;

  std::string command_, summary_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
  std::vector<std::string> set_;
  bool help_ = false;
};

}  // namespace dyn
