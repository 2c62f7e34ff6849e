// Loads a Hugging Face tokenizer.json (+ tokenizer_config.json) into Tokenizer::Impl.
#include "base/file.h"
#include "llm/tokenizer/tokenizer_impl.h"

namespace dyn {

namespace {

using tok::JsonBool;
using tok::JsonFind;
using tok::JsonString;

Result<boost::json::value> ParseJsonFile(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(text, ec);
  if (ec) return Status::InvalidArgument(path + ": bad JSON: " + ec.message());
  return v;
}

Status LoadModel(const boost::json::object& m, Tokenizer::Impl& impl) {
  std::string type = JsonString(m, "type", "BPE");
  if (type != "BPE") return Status::Unsupported("unknown model type '" + type + "' (dyn supports BPE)");
  if (const auto* d = JsonFind(m, "dropout"); d && !d->is_null()) {
    if (!(d->is_double() && d->get_double() == 0.0)) return Status::Unsupported("BPE dropout is not supported");
  }
  tok::BpeModel::Options opt;
  if (const auto* u = JsonFind(m, "unk_token"); u && u->is_string()) opt.unk_token = std::string(u->get_string());
  opt.fuse_unk = JsonBool(m, "fuse_unk", false);
  opt.byte_fallback = JsonBool(m, "byte_fallback", false);
  opt.ignore_merges = JsonBool(m, "ignore_merges", false);
  opt.continuing_subword_prefix = JsonString(m, "continuing_subword_prefix");
  opt.end_of_word_suffix = JsonString(m, "end_of_word_suffix");
  const auto* vocab = JsonFind(m, "vocab");
  if (!vocab || !vocab->is_object()) return Status::InvalidArgument("BPE model without a vocab object");
  std::vector<std::pair<std::string, uint32_t>> entries;
  entries.reserve(vocab->get_object().size());
  for (const auto& kv : vocab->get_object()) {
    if (!kv.value().is_number()) return Status::InvalidArgument("vocab id is not a number");
    entries.emplace_back(std::string(kv.key()), static_cast<uint32_t>(kv.value().to_number<int64_t>()));
  }
  DYN_RETURN_IF_ERROR(impl.model.Init(std::move(entries), std::move(opt)));
  if (const auto* merges = JsonFind(m, "merges"); merges && merges->is_array()) {
    for (const auto& mv : merges->get_array()) {
      if (mv.is_string()) {
        std::string_view s = mv.get_string();
        auto sp = s.find(' ');
        if (sp == std::string_view::npos) return Status::InvalidArgument("bad merge '" + std::string(s) + "'");
        impl.model.AddMerge(s.substr(0, sp), s.substr(sp + 1));
      } else if (mv.is_array() && mv.get_array().size() == 2 && mv.get_array()[0].is_string() &&
                 mv.get_array()[1].is_string()) {
        impl.model.AddMerge(std::string_view(mv.get_array()[0].get_string()),
                            std::string_view(mv.get_array()[1].get_string()));
      } else {
        return Status::InvalidArgument("a merge must be \"a b\" or [a, b]");
      }
    }
  }
  return Status::Ok();
}

// Adds the post-processor's ids around the sequence: prefix/suffix in the order they appear.
Status LoadPostProcessor(const boost::json::value& v, Tokenizer::Impl& impl, bool* present) {
  if (v.is_null()) return Status::Ok();
  if (!v.is_object()) return Status::InvalidArgument("post_processor must be an object");
  const auto& o = v.get_object();
  std::string type = JsonString(o, "type");
  *present = true;
  std::vector<uint32_t> prefix, suffix;
  if (type == "ByteLevel") return Status::Ok();
  if (type == "TemplateProcessing") {
    const auto* single = JsonFind(o, "single");
    const auto* specials = JsonFind(o, "special_tokens");
    if (!single || !single->is_array()) return Status::InvalidArgument("TemplateProcessing without 'single'");
    bool seen_sequence = false;
    for (const auto& item : single->get_array()) {
      if (!item.is_object()) continue;
      const auto& io = item.get_object();
      if (JsonFind(io, "Sequence")) {
        seen_sequence = true;
        continue;
      }
      const auto* st = JsonFind(io, "SpecialToken");
      if (!st || !st->is_object()) return Status::InvalidArgument("bad TemplateProcessing item");
      std::string name = JsonString(st->get_object(), "id");
      const boost::json::value* entry = specials && specials->is_object() ? JsonFind(specials->get_object(), name) : nullptr;
      if (!entry || !entry->is_object()) return Status::InvalidArgument("TemplateProcessing: unknown special token " + name);
      const auto* ids = JsonFind(entry->get_object(), "ids");
      if (!ids || !ids->is_array()) return Status::InvalidArgument("TemplateProcessing: no ids for " + name);
      for (const auto& id : ids->get_array()) {
        (seen_sequence ? suffix : prefix).push_back(static_cast<uint32_t>(id.to_number<int64_t>()));
      }
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](std::string_view key) -> Result<uint32_t> {
      const auto* p = JsonFind(o, key);
      if (!p || !p->is_array() || p->get_array().size() != 2) return Status::InvalidArgument(type + " without " + std::string(key));
      return static_cast<uint32_t>(p->get_array()[1].to_number<int64_t>());
    };
    DYN_ASSIGN_OR_RETURN(uint32_t cls, id_of("cls"));
    DYN_ASSIGN_OR_RETURN(uint32_t sep, id_of("sep"));
    prefix.push_back(cls);
    suffix.push_back(sep);
  } else if (type == "Sequence") {
    const auto* list = JsonFind(o, "processors");
    if (list && list->is_array()) {
      for (const auto& p : list->get_array()) DYN_RETURN_IF_ERROR(LoadPostProcessor(p, impl, present));
    }
    return Status::Ok();
  } else {
    return Status::Unsupported("unknown post_processor type '" + type + "'");
  }
  impl.post_prefix.insert(impl.post_prefix.begin(), prefix.begin(), prefix.end());
  impl.post_suffix.insert(impl.post_suffix.end(), suffix.begin(), suffix.end());
  return Status::Ok();
}

std::string TokenName(const boost::json::object& config, std::string_view key) {
  const auto* v = JsonFind(config, key);
  if (!v) return "";
  if (v->is_string()) return std::string(v->get_string());
  if (v->is_object()) return JsonString(v->get_object(), "content");
  return "";
}

void LoadConfig(const boost::json::object& config, TokenizerInfo& info) {
  info.bos_token = TokenName(config, "bos_token");
  info.eos_token = TokenName(config, "eos_token");
  info.pad_token = TokenName(config, "pad_token");
  info.unk_token = TokenName(config, "unk_token");
  if (const auto* t = JsonFind(config, "chat_template")) {
    if (t->is_string()) {
      info.chat_template = std::string(t->get_string());
    } else if (t->is_array()) {
      for (const auto& e : t->get_array()) {
        if (!e.is_object()) continue;
        std::string name = JsonString(e.get_object(), "name");
        std::string body = JsonString(e.get_object(), "template");
        if (name == "default") {
          info.chat_template = body;
        } else {
          info.named_templates.emplace_back(name, body);
        }
      }
    }
  }
}

}  // namespace

Result<std::unique_ptr<Tokenizer::Impl>> LoadTokenizerJson(const std::string& json_path, const std::string& config_path) {
  DYN_ASSIGN_OR_RETURN(boost::json::value root, ParseJsonFile(json_path));
  if (!root.is_object()) return Status::InvalidArgument(json_path + ": not a JSON object");
  const auto& o = root.get_object();
  auto impl = std::make_unique<Tokenizer::Impl>();
  auto with_path = [&](const Status& s) { return s.WithContext(json_path); };

  const auto* model = JsonFind(o, "model");
  if (!model || !model->is_object()) return Status::InvalidArgument(json_path + ": no model");
  if (auto s = LoadModel(model->get_object(), *impl); !s.ok()) return with_path(s);

  static const boost::json::value kNull;
  auto field = [&](std::string_view key) -> const boost::json::value& {
    const auto* v = JsonFind(o, key);
    return v ? *v : kNull;
  };
  auto normalizer = tok::ParseNormalizer(field("normalizer"));
  if (!normalizer.ok()) return with_path(normalizer.status());
  impl->normalizer = std::move(*normalizer);
  auto pre = tok::ParsePreTokenizer(field("pre_tokenizer"));
  if (!pre.ok()) return with_path(pre.status());
  impl->pre_tokenizer = std::move(*pre);
  auto dec = tok::ParseDecoder(field("decoder"));
  if (!dec.ok()) return with_path(dec.status());
  impl->decoder = std::move(*dec);
  bool has_post_processor = false;
  if (auto s = LoadPostProcessor(field("post_processor"), *impl, &has_post_processor); !s.ok()) return with_path(s);

  if (const auto* added = JsonFind(o, "added_tokens"); added && added->is_array()) {
    for (const auto& a : added->get_array()) {
      if (!a.is_object()) continue;
      const auto& ao = a.get_object();
      tok::AddedToken t;
      t.id = static_cast<uint32_t>(tok::JsonInt(ao, "id", 0));
      t.content = JsonString(ao, "content");
      t.special = JsonBool(ao, "special", false);
      t.lstrip = JsonBool(ao, "lstrip", false);
      t.rstrip = JsonBool(ao, "rstrip", false);
      t.normalized = JsonBool(ao, "normalized", !t.special);
      t.single_word = JsonBool(ao, "single_word", false);
      impl->added.push_back(std::move(t));
    }
  }

  bool config_add_bos = false, config_add_eos = false;
  if (!config_path.empty()) {
    DYN_ASSIGN_OR_RETURN(boost::json::value config, ParseJsonFile(config_path));
    if (config.is_object()) {
      LoadConfig(config.get_object(), impl->info);
      config_add_bos = JsonBool(config.get_object(), "add_bos_token", false);
      config_add_eos = JsonBool(config.get_object(), "add_eos_token", false);
    }
    if (impl->info.chat_template.empty()) {
      auto slash = config_path.find_last_of('/');
      std::string jinja = (slash == std::string::npos ? "." : config_path.substr(0, slash)) + "/chat_template.jinja";
      if (FileExists(jinja)) {
        DYN_ASSIGN_OR_RETURN(impl->info.chat_template, ReadFile(jinja));
      }
    }
  }
  DYN_RETURN_IF_ERROR(impl->Finalize());
  // With no post-processor in tokenizer.json, tokenizer_config.json decides (as transformers does).
  if (!has_post_processor) {
    if (config_add_bos && impl->info.bos_id) impl->post_prefix.push_back(*impl->info.bos_id);
    if (config_add_eos && impl->info.eos_id) impl->post_suffix.push_back(*impl->info.eos_id);
  }
  auto contains = [](const std::vector<uint32_t>& v, std::optional<uint32_t> id) {
    return id && std::find(v.begin(), v.end(), *id) != v.end();
  };
  impl->info.add_bos = contains(impl->post_prefix, impl->info.bos_id);
  impl->info.add_eos = contains(impl->post_suffix, impl->info.eos_id);
  return impl;
}

}  // namespace dyn
