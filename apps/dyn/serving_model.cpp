#include "apps/dyn/serving_model.h"

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/template/chat_template.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string DefaultName(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  auto slash = path.rfind('/');
  std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (EndsWith(base, ".gguf")) base.resize(base.size() - 5);
  return base;
}

}  // namespace

Result<ModelAssets> LoadModelAssets(const std::string& path, const std::string& chat_template_path) {
  ModelAssets a;
  a.path = path;
  a.default_name = DefaultName(path);
  std::unique_ptr<Tokenizer> tok;
  if (IsDirectory(path)) {
    DYN_ASSIGN_OR_RETURN(tok, Tokenizer::FromDirectory(path));
  } else if (EndsWith(path, ".gguf")) {
    DYN_ASSIGN_OR_RETURN(auto gguf, GgufFile::Open(path));
    DYN_ASSIGN_OR_RETURN(tok, Tokenizer::FromGguf(*gguf));
  } else if (!FileExists(path)) {
    return Status::NotFound("model path " + path + " does not exist");
  } else {
    return Status::InvalidArgument("model path " + path +
                                   " is neither a directory (Hugging Face layout) nor a .gguf file");
  }
  std::string source = tok->info().chat_template;
  if (!chat_template_path.empty()) {
    DYN_ASSIGN_OR_RETURN(source, ReadFile(chat_template_path));
  }
  if (!source.empty()) {
    auto tmpl = ChatTemplate::Parse(source);
    if (!tmpl.ok()) return tmpl.status().WithContext("chat template of " + path);
    a.chat_template = std::shared_ptr<const ChatTemplate>(std::move(*tmpl));
  }
  a.tokenizer = std::shared_ptr<const Tokenizer>(std::move(tok));
  return a;
}

}  // namespace dyn
