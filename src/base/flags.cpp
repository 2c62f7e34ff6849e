#include "base/flags.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>

namespace dyn {

FlagSet::FlagSet(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::String(const std::string& name, std::string* target, const std::string& help) {
  flags_.push_back({name, help, *target, Kind::kString, target});
}
void FlagSet::Int(const std::string& name, int64_t* target, const std::string& help) {
  flags_.push_back({name, help, std::to_string(*target), Kind::kInt, target});
}
void FlagSet::Double(const std::string& name, double* target, const std::string& help) {
  std::string d = std::to_string(*target);
  while (d.size() > 1 && d.back() == '0' && d[d.size() - 2] != '.') d.pop_back();
  flags_.push_back({name, help, d, Kind::kDouble, target});
}
void FlagSet::Bool(const std::string& name, bool* target, const std::string& help) {
  flags_.push_back({name, help, *target ? "true" : "false", Kind::kBool, target});
}

std::string FlagSet::EnvName(const std::string& flag) {
  std::string env = "DYN_";
  for (char c : flag) env += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return env;
}

const FlagSet::Flag* FlagSet::Find(const std::string& name) const {
  for (const Flag& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

bool FlagSet::IsSet(const std::string& name) const {
  return std::find(set_.begin(), set_.end(), name) != set_.end();
}

Status FlagSet::Set(const Flag& f, const std::string& value, const std::string& source) {
  if (!IsSet(f.name)) set_.push_back(f.name);
  auto bad = [&](const char* what) {
    return Status::InvalidArgument(source + ": expected " + what + ", got '" + value + "'");
  };
  switch (f.kind) {
    case Kind::kString:
      *static_cast<std::string*>(f.target) = value;
      return Status::Ok();
    case Kind::kInt: {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end || errno) return bad("an integer");
      *static_cast<int64_t*>(f.target) = v;
      return Status::Ok();
    }
    case Kind::kDouble: {
      errno = 0;
      char* end = nullptr;
      double v = std::strtod(value.c_str(), &end);
      if (value.empty() || *end || errno) return bad("a number");
      *static_cast<double*>(f.target) = v;
      return Status::Ok();
    }
    case Kind::kBool:
      if (value == "1" || value == "true") *static_cast<bool*>(f.target) = true;
      else if (value == "0" || value == "false") *static_cast<bool*>(f.target) = false;
      else return bad("true or false");
      return Status::Ok();
  }
  return Status::Internal("bad flag kind");
}

Status FlagSet::Parse(int argc, char** argv) {
  // Environment first, so the command line overrides it.
  for (const Flag& f : flags_) {
    std::string env = EnvName(f.name);
    if (const char* v = std::getenv(env.c_str())) DYN_RETURN_IF_ERROR(Set(f, v, env));
  }
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      help_ = true;
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* f = Find(name);
    if (!f && !has_value && name.compare(0, 3, "no-") == 0) {
      const Flag* neg = Find(name.substr(3));
      if (neg && neg->kind == Kind::kBool) {
        *static_cast<bool*>(neg->target) = false;
        continue;
      }
    }
    if (!f) return Status::InvalidArgument("unknown flag --" + name + " for '" + command_ + "' (see --help)");
    if (!has_value) {
      if (f->kind == Kind::kBool) {
        *static_cast<bool*>(f->target) = true;
        continue;
      }
      if (i + 1 >= argc) return Status::InvalidArgument("flag --" + name + " needs a value");
      value = argv[++i];
    }
    DYN_RETURN_IF_ERROR(Set(*f, value, "--" + name));
  }
  return Status::Ok();
}

std::string FlagSet::Usage() const {
  std::string out = "usage: " + command_ + " [flags]\n" + summary_ + "\n\nflags (each also settable as DYN_<FLAG>):\n";
  for (const Flag& f : flags_) {
    std::string left = "  --" + f.name + (f.kind == Kind::kBool ? "" : " VALUE");
    if (left.size() < 34) left.resize(34, ' ');
    out += left + " " + f.help;
    if (!f.default_text.empty()) out += " (default: " + f.default_text + ")";
    out += "\n";
  }
  return out;
}

}  // namespace dyn
