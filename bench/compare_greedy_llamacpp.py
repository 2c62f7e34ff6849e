#!/usr/bin/env python3
"""Greedy continuations of dyn vs llama.cpp (llama-cpp-python) on the same GGUF file.

For each prompt: llama.cpp tokenizes it; both engines continue the same token ids greedily for
N tokens (dyn over HTTP with a token-id prompt, ignore_eos and top_logprobs; llama.cpp with
logits_all=True). Where the two first differ, the script prints both engines' top-2 logits and
margins there.

Whether a divergence is "within rounding" is judged against a measured scale: at every position
where the engines agree (identical prefix, identical greedy token), take dyn's top-K tokens and
compare each one's logit relative to the greedy token's, dyn vs llama.cpp:
    diff = |(dyn[t] - dyn[top1]) - (llama[t] - llama[top1])|
(relative logits, because dyn reports logprobs = logits - logsumexp: a difference of logprobs
is a difference of logits). The median / p99 / max of diff over all agreeing positions is how
far the two engines' arithmetic (different f32 summation orders over the same quantized dot
products) moves a logit gap. A divergence is within rounding when both engines' top-2 margins
are below the p99 of diff: either engine could have picked either token.

    .venv/bin/python bench/compare_greedy_llamacpp.py --dyn-bin build/apps/dyn/dyn
    .venv/bin/python bench/compare_greedy_llamacpp.py --url http://127.0.0.1:8000   # a running dyn
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dyn(binary, model_path, threads):
    port = free_port()
    log = open(os.path.join(REPO, "build", "greedy-compare-dyn.log"), "w")
    proc = subprocess.Popen([binary, "run", "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
                             "--threads", str(threads)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit("dyn exited: see build/greedy-compare-dyn.log")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("dyn did not come up")


def token_id(key):
    return int(key.split(":")[1])


def llama_greedy(llm, ids, n):
    """llama.cpp greedy: the tokens and the full logits row of every step."""
    llm.reset()
    llm.eval(ids)
    toks, rows = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        t = int(np.argmax(logits))
        toks.append(t)
        rows.append(logits)
        llm.eval([t])
    return toks, rows


def dyn_greedy(url, model, ids, n, top):
    r = httpx.post(url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
        "logprobs": top, "return_tokens_as_token_ids": True})
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    toks = [token_id(t) for t in lp["tokens"]]
    tops = [{token_id(k): v for k, v in d.items()} for d in lp["top_logprobs"]]
    return toks, tops


def top2(d):
    """(best id, best value, second id, second value) of an {id: value} dict."""
    (a, va), (b, vb) = sorted(d.items(), key=lambda kv: -kv[1])[:2]
    return a, va, b, vb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="a running dyn server (else --dyn-bin starts one)")
    ap.add_argument("--dyn-bin", default=os.path.join(REPO, "build", "apps", "dyn", "dyn"))
    ap.add_argument("--model-path", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--top", type=int, default=10, help="tokens per position in the rounding scale (<= 20)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-kv", choices=["f16", "f32"], default="f16",
                    help="llama.cpp's KV cache type (its default f16 rounds K and V; dyn keeps f32)")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "greedy_compare.json"))
    args = ap.parse_args()
    from llama_cpp import Llama
    kv = {"type_k": 0, "type_v": 0} if args.llama_kv == "f32" else {}  # 0 = GGML_TYPE_F32
    llm = Llama(model_path=args.model_path, n_ctx=1024, n_threads=args.threads, verbose=False, logits_all=True, **kv)
    proc, url = (None, args.url) if args.url else start_dyn(args.dyn_bin, args.model_path, args.threads)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        results, diffs = [], []
        for prompt in PROMPTS[: args.prompts]:
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            ref, rows = llama_greedy(llm, ids, args.tokens)
            got, tops = dyn_greedy(url, model, ids, args.tokens, args.top)
            first = next((i for i in range(min(len(got), len(ref))) if got[i] != ref[i]), None)
            # Rounding scale: relative logits of dyn's top-K at the agreeing positions.
            for i in range(len(ref) if first is None else first):
                best = ref[i]
                for t, v in tops[i].items():
                    if t != best:
                        diffs.append(abs((v - tops[i][best]) - (rows[i][t] - rows[i][best])))
            entry = {"prompt": prompt, "n_prompt": len(ids), "equal": first is None, "first_diff": first}
            if first is not None:
                a, va, b, vb = top2(tops[first])
                lrow = rows[first]
                la, lb = (int(x) for x in np.argsort(-lrow)[:2])
                entry.update({
                    "dyn_top2": [[a, va], [b, vb]], "dyn_margin": va - vb,
                    "llamacpp_top2": [[la, float(lrow[la])], [lb, float(lrow[lb])]],
                    "llamacpp_margin": float(lrow[la] - lrow[lb]),
                    # How much the gap between the two engines' choices moved: dyn's lead of its token over
                    # llama.cpp's plus llama.cpp's lead of its token over dyn's.
                    "swing": (va - tops[first].get(ref[first], vb)) + float(lrow[ref[first]] - lrow[got[first]])})
            results.append(entry)
            if first is None:
                status = "identical"
            else:
                status = (f"differs at {first}: dyn {entry['dyn_top2'][0][0]}>{entry['dyn_top2'][1][0]} margin "
                          f"{entry['dyn_margin']:.4f}, llama.cpp {la}>{lb} margin {entry['llamacpp_margin']:.4f}")
            print(f"{prompt[:40]!r:44} {status}", flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=20)
    d = np.array(diffs)
    scale = {"positions_tokens": int(d.size), "median": float(np.median(d)), "p90": float(np.percentile(d, 90)),
             "p99": float(np.percentile(d, 99)), "max": float(d.max())}
    print(f"\nrounding scale: |relative logit dyn - llama.cpp| over {scale['positions_tokens']} (position, token) pairs "
          f"of the agreeing positions (top-{args.top}): median {scale['median']:.4f}, p90 {scale['p90']:.4f}, "
          f"p99 {scale['p99']:.4f}, max {scale['max']:.4f}")
    bad = []
    for e in results:
        if not e["equal"]:
            e["within_rounding"] = e["dyn_margin"] < scale["p99"] and e["llamacpp_margin"] < scale["p99"]
            if not e["within_rounding"]:
                bad.append(e)
    print("\n| # | prompt | result | dyn top-2 (logprob) | dyn margin | llama.cpp top-2 (logit) | llama.cpp margin | swing | within rounding |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, e in enumerate(results, 1):
        p = e["prompt"].replace("\n", "\\n").replace("|", "\\|")
        if e["equal"]:
            print(f"| {n} | `{p}` | identical ({args.tokens} tokens) | | | | | | |")
        else:
            dt, lt = e["dyn_top2"], e["llamacpp_top2"]
            print(f"| {n} | `{p}` | diverged at token {e['first_diff']} | {dt[0][0]}: {dt[0][1]:.4f}, {dt[1][0]}: {dt[1][1]:.4f} | "
                  f"{e['dyn_margin']:.4f} | {lt[0][0]}: {lt[0][1]:.4f}, {lt[1][0]}: {lt[1][1]:.4f} | {e['llamacpp_margin']:.4f} | "
                  f"{e['swing']:.4f} | {'yes' if e['within_rounding'] else 'NO'} |")
    equal = sum(e["equal"] for e in results)
    print(f"\n{equal}/{len(results)} identical over {args.tokens} tokens; {len(results) - equal - len(bad)} of the others "
          f"diverge within rounding (both top-2 margins < p99 {scale['p99']:.4f}); {len(bad)} not")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"scale": scale, "results": results}, f, indent=1)
    sys.exit(0 if not bad else 1)


if __name__ == "__main__":
    main()
