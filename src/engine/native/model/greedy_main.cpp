// dyn_model_greedy: loads a model, feeds prompt ids, decodes greedily and prints one JSON line per
// step: {"step": i, "id": greedy id, "top2": [[id, logit], [id, logit]]}. Used to compare with
// independent references (scripts/compare_llamacpp.py, scripts/ref_forward.py).
//
//   dyn_model_greedy --model PATH [--steps N] [--threads T] (--ids 1,2,3 | --ids-file FILE)
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "engine/native/model/model.h"

namespace {

std::vector<uint32_t> ParseIds(const std::string& text) {
  std::vector<uint32_t> ids;
  std::string cur;
  for (char ch : text + ",") {
    if (ch >= '0' && ch <= '9') {
      cur += ch;
    } else if (!cur.empty()) {
      ids.push_back(static_cast<uint32_t>(std::stoul(cur)));
      cur.clear();
    }
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, ids_text;
  int steps = 32, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model") model_path = value;
    else if (flag == "--steps") steps = std::stoi(value);
    else if (flag == "--threads") threads = std::stoi(value);
    else if (flag == "--ids") ids_text = value;
    else if (flag == "--ids-file") {
      auto text = dyn::ReadFile(value);
      if (!text.ok()) {
        std::fprintf(stderr, "%s\n", text.status().ToString().c_str());
        return 1;
      }
      ids_text = *text;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const std::vector<uint32_t> prompt = ParseIds(ids_text);
  if (model_path.empty() || prompt.empty()) {
    std::fprintf(stderr, "usage: %s --model PATH [--steps N] [--threads T] (--ids 1,2,3 | --ids-file FILE)\n", argv[0]);
    return 2;
  }
  dyn::ModelLoadOptions opt;
  opt.num_threads = threads;
  auto loaded = dyn::LoadModel(model_path, opt);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  dyn::Model& model = **loaded;
  std::fprintf(stderr, "%s\n", model.Describe().c_str());
  const int block_size = 16;
  const int total = static_cast<int>(prompt.size()) + steps;
  const int blocks = (total + block_size - 1) / block_size;
  if (auto s = model.InitKvCache(blocks, block_size); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  std::vector<int32_t> table(blocks);
  for (int i = 0; i < blocks; ++i) table[i] = i;
  const int V = model.config().vocab_size;
  std::vector<float> logits(V);
  std::vector<uint32_t> feed = prompt;
  int pos = 0;
  for (int step = 0; step < steps; ++step) {
    dyn::ForwardSeq f;
    f.tokens = feed;
    f.start_pos = pos;
    f.block_table = table;
    if (auto s = model.Forward(std::span<const dyn::ForwardSeq>(&f, 1), logits.data()); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    pos += static_cast<int>(feed.size());
    std::vector<int> order(V);
    for (int i = 0; i < V; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + 2, order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    std::printf("{\"step\": %d, \"id\": %d, \"top2\": [[%d, %.6f], [%d, %.6f]]}\n", step, order[0], order[0], logits[order[0]],
                order[1], logits[order[1]]);
    feed.assign(1, static_cast<uint32_t>(order[0]));
  }
  return 0;
}
