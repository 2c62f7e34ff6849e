#include "llm/tokenizer/tokenize_cli.h"

#include <boost/json.hpp>

#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {

namespace {

Result<std::unique_ptr<Tokenizer>> LoadAny(const std::string& path) {
  if (IsDirectory(path)) return Tokenizer::FromDirectory(path);
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".gguf") == 0) {
    DYN_ASSIGN_OR_RETURN(auto gguf, GgufFile::Open(path));
    return Tokenizer::FromGguf(*gguf);
  }
  return Tokenizer::FromJsonFile(path);
}

int Usage(bool detokenize) {
  if (detokenize) {
    std::cerr << "usage: dyn detokenize --model PATH [--ids 1,2,3 | --jsonl] [--skip-special]\n";
  } else {
    std::cerr << "usage: dyn tokenize --model PATH [--text TEXT | --jsonl] [--no-special]\n";
  }
  return 2;
}

Result<std::vector<uint32_t>> ParseIdList(std::string_view s) {
  std::vector<uint32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string_view::npos) j = s.size();
    std::string part(s.substr(i, j - i));
    char* end = nullptr;
    unsigned long v = std::strtoul(part.c_str(), &end, 10);
    if (part.empty() || *end != '\0') return Status::InvalidArgument("bad id '" + part + "'");
    ids.push_back(static_cast<uint32_t>(v));
    i = j + 1;
  }
  return ids;
}

Result<std::vector<uint32_t>> ParseIdArray(const std::string& line) {
  boost::system::error_code ec;
  auto v = boost::json::parse(line, ec);
  if (ec || !v.is_array()) return Status::InvalidArgument("expected a JSON array of ids: " + line);
  std::vector<uint32_t> ids;
  for (const auto& x : v.get_array()) {
    if (!x.is_int64() && !x.is_uint64()) return Status::InvalidArgument("id is not an integer: " + line);
    ids.push_back(static_cast<uint32_t>(x.to_number<int64_t>()));
  }
  return ids;
}

void PrintIds(const std::vector<uint32_t>& ids) {
  boost::json::array a;
  for (uint32_t id : ids) a.push_back(id);
  std::cout << boost::json::serialize(a) << "\n";
}

}  // namespace

int RunTokenizeCli(int argc, char** argv, bool detokenize) {
  std::string model, text, ids_arg;
  bool have_text = false, have_ids = false, jsonl = false, no_special = false, skip_special = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) return false;
      out = argv[++i];
      return true;
    };
    if (a == "--model") {
      if (!value(model)) return Usage(detokenize);
    } else if (a == "--text" && !detokenize) {
      if (!value(text)) return Usage(detokenize);
      have_text = true;
    } else if (a == "--ids" && detokenize) {
      if (!value(ids_arg)) return Usage(detokenize);
      have_ids = true;
    } else if (a == "--jsonl") {
      jsonl = true;
    } else if (a == "--no-special") {
      no_special = true;
    } else if (a == "--skip-special") {
      skip_special = true;
    } else {
      return Usage(detokenize);
    }
  }
  if (model.empty()) return Usage(detokenize);
  auto tok = LoadAny(model);
  if (!tok.ok()) {
    std::cerr << "error: " << tok.status().ToString() << "\n";
    return 1;
  }
  const Tokenizer& t = **tok;
  if (detokenize) {
    bool skip = skip_special || no_special;
    auto print = [&](const std::vector<uint32_t>& ids) {
      std::cout << boost::json::serialize(boost::json::value(t.Decode(ids, skip))) << "\n";
    };
    if (have_ids) {
      auto ids = ParseIdList(ids_arg);
      if (!ids.ok()) {
        std::cerr << "error: " << ids.status().ToString() << "\n";
        return 2;
      }
      print(*ids);
      return 0;
    }
    if (!jsonl) return Usage(detokenize);
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      auto ids = ParseIdArray(line);
      if (!ids.ok()) {
        std::cerr << "error: " << ids.status().ToString() << "\n";
        return 1;
      }
      print(*ids);
    }
    return 0;
  }
  if (have_text) {
    PrintIds(t.Encode(text, !no_special));
    return 0;
  }
  if (jsonl) {
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      boost::system::error_code ec;
      auto v = boost::json::parse(line, ec);
      if (ec || !v.is_string()) {
        std::cerr << "error: expected a JSON string per line: " << line << "\n";
        return 1;
      }
      PrintIds(t.Encode(std::string_view(v.get_string()), !no_special));
    }
    return 0;
  }
  std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  PrintIds(t.Encode(all, !no_special));
  return 0;
}

}  // namespace dyn
