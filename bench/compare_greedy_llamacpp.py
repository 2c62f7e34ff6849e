#!/usr/bin/env python3
"""Greedy continuations of dyn vs llama.cpp (llama-cpp-python) on the same GGUF file.

For each prompt: llama.cpp tokenizes it; both engines continue the same token ids greedily for
N tokens (dyn over HTTP with a token-id prompt and ignore_eos). Where the two first differ,
the script prints the top-2 logit margin each engine saw at that step (dyn's from its top-2
logprobs: a logprob difference is a logit difference). A divergence is "a near tie" when both
margins are within --tie-margin: rounding of the quantized matmuls decides it.

    .venv/bin/python bench/compare_greedy_llamacpp.py --url http://127.0.0.1:8000
"""
import argparse
import json
import os
import sys

import httpx
import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PROMPTS = [
    "The capital of France is", "Here is a recipe for pancakes:", "def fibonacci(n):",
    "The three laws of thermodynamics are", "Once upon a time in a small village,",
    "In machine learning, overfitting means", "The quick brown fox", "List of prime numbers: 2, 3, 5,",
    "Q: What is the boiling point of water?\nA:", "Dear hiring manager,", "The history of the Roman Empire",
    "import numpy as np\n", "To be or not to be,", "The best way to learn a new language is",
    "Photosynthesis is the process", "1. Preheat the oven", "My favourite book is",
    "The weather today is", "SELECT name FROM users WHERE", "Water is made of",
    "The largest planet in the solar system is", "Translate to French: Good morning",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model-path", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tie-margin", type=float, default=0.05)
    ap.add_argument("--out", default=os.path.join(REPO, "build", "greedy_compare.json"))
    args = ap.parse_args()
    from llama_cpp import Llama
    llm = Llama(model_path=args.model_path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False, logits_all=True)
    model = httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    results = []
    for prompt in PROMPTS[: args.prompts]:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        # llama.cpp greedy, keeping the top-2 margin of every step.
        llm.reset()
        llm.eval(ids)
        ref, ref_margin = [], []
        for _ in range(args.tokens):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top2 = np.argsort(-logits)[:2]
            ref.append(int(top2[0]))
            ref_margin.append(float(logits[top2[0]] - logits[top2[1]]))
            llm.eval([int(top2[0])])
        r = httpx.post(args.url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": ids, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "return_tokens_as_token_ids": True})
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        got = [int(t.split(":")[1]) for t in lp["tokens"]]
        margins = []
        for top in lp["top_logprobs"]:
            v = sorted(top.values(), reverse=True)
            margins.append(v[0] - v[1] if len(v) > 1 else float("inf"))
        first = next((i for i in range(min(len(got), len(ref))) if got[i] != ref[i]), None)
        entry = {"prompt": prompt, "n_prompt": len(ids), "equal": got == ref, "first_diff": first}
        if first is not None:
            entry.update({"dyn_margin": margins[first], "llamacpp_margin": ref_margin[first],
                          "near_tie": margins[first] <= args.tie_margin or ref_margin[first] <= args.tie_margin,
                          "dyn_token": got[first], "llamacpp_token": ref[first]})
        results.append(entry)
        status = "equal" if first is None else f"differs at {first} (top-2 margins dyn {entry['dyn_margin']:.4f}, llama.cpp {entry['llamacpp_margin']:.4f})"
        print(f"{prompt[:40]!r:44} {status}")
    equal = sum(e["equal"] for e in results)
    ties = sum(1 for e in results if not e["equal"] and e["near_tie"])
    print(f"\n{equal}/{len(results)} identical over {args.tokens} tokens; {ties} of the others diverge at a near tie "
          f"(top-2 margin <= {args.tie_margin})")
    json.dump(results, open(args.out, "w"), indent=1)
    sys.exit(0 if equal + ties == len(results) else 1)


if __name__ == "__main__":
    main()
