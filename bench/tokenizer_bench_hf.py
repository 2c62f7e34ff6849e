#!/usr/bin/env python3
"""HF `tokenizers` single-thread encode throughput on the ShareGPT prompts: the baseline for
bench/tokenizer_bench.cpp. One prompt per encode call, add_special_tokens=True,
TOKENIZERS_PARALLELISM=false. Reports the first pass and the best of the later passes.

  TOKENIZERS_PARALLELISM=false .venv/bin/python bench/tokenizer_bench_hf.py [--passes N]
"""
import argparse
import json
import os
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer  # noqa: E402

SHAREGPT = "/work/shared/traces/sharegpt/ShareGPT_V3_filtered_1000.json"


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("names", nargs="*", default=["qwen3", "mistral-nemo", "gpt2", "mistral-7b-v0.1"])
    args = ap.parse_args()
    data = json.load(open(SHAREGPT))
    prompts = [next(c["value"] for c in conv["conversations"] if c["from"] == "human") for conv in data]
    nbytes = sum(len(p.encode()) for p in prompts)
    print(f"{len(prompts)} prompts, {nbytes / 1e6:.2f} MB; {args.passes} passes (first pass = cold cache)")
    print(f"{'tokenizer':16s} {'load_ms':>9s} {'rss_MiB':>9s} {'cold_tok/s':>12s} {'cold_MB/s':>9s} "
          f"{'warm_tok/s':>12s} {'warm_MB/s':>9s}")
    keep = []  # kept loaded so each RSS delta is its own
    for name in args.names:
        rss0 = rss_mib()
        t0 = time.perf_counter()
        tok = Tokenizer.from_file(f"/work/shared/tokenizers/{name}/tokenizer.json")
        load = time.perf_counter() - t0
        rss1 = rss_mib()
        times = []
        ntok = 0
        keep.append(tok)
        for _ in range(args.passes):
            a = time.perf_counter()
            n = 0
            for p in prompts:
                n += len(tok.encode(p, add_special_tokens=True).ids)
            times.append(time.perf_counter() - a)
            ntok = n
        cold = times[0]
        warm = min(times[1:]) if len(times) > 1 else cold
        print(f"{name:16s} {load * 1e3:9.1f} {rss1 - rss0:9.1f} {ntok / cold:12.0f} {nbytes / cold / 1e6:9.2f} "
              f"{ntok / warm:12.0f} {nbytes / warm / 1e6:9.2f}")


if __name__ == "__main__":
    main()
