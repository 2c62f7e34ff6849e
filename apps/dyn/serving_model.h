// Loading what a served model needs from a path (HF directory or .gguf file): tokenizer, chat
// template and, for the native engine, the model itself. Shared by the commands that serve.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"

namespace dyn {

class Tokenizer;
class ChatTemplate;

struct ModelAssets {
  std::string path;
  std::string default_name;  // file or directory name without ".gguf"
  std::shared_ptr<const Tokenizer> tokenizer;
  std::shared_ptr<const ChatTemplate> chat_template;  // null when the model has none
};

// `chat_template_path` (optional) overrides the model's own template.
Result<ModelAssets> LoadModelAssets(const std::string& path, const std::string& chat_template_path);

}  // namespace dyn
