#include <algorithm>

#include "frontend/frontend.h"

namespace dyn {

Status ModelRegistry::Add(ServedModel model) {
  if (model.name.empty()) return Status::InvalidArgument("served model: empty name");
  if (!model.tokenizer) return Status::InvalidArgument("served model '" + model.name + "': no tokenizer");
  if (!model.engine) return Status::InvalidArgument("served model '" + model.name + "': no engine");
  if (model.context_length < 2) return Status::InvalidArgument("served model '" + model.name + "': context_length < 2");
  std::lock_guard lock(mu_);
  std::string name = model.name;
  auto [it, inserted] = models_.try_emplace(name, nullptr);
  if (!inserted) return Status::InvalidArgument("served model '" + name + "': a model of that name is already served");
  it->second = std::make_shared<const ServedModel>(std::move(model));
  return Status::Ok();
}

bool ModelRegistry::Remove(std::string_view name) {
  std::lock_guard lock(mu_);
  return models_.erase(std::string(name)) > 0;
}

std::shared_ptr<const ServedModel> ModelRegistry::Find(std::string_view name) const {
  std::lock_guard lock(mu_);
  auto it = models_.find(std::string(name));
  return it == models_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<const ServedModel>> ModelRegistry::List() const {
  std::vector<std::shared_ptr<const ServedModel>> out;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, model] : models_) out.push_back(model);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a->name < b->name; });
  return out;
}

}  // namespace dyn
