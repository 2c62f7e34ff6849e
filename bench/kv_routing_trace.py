#!/usr/bin/env python3
"""KV-aware routing on a real trace, through HTTP, against simulated workers (issue 5 benchmarks 2
and 3): the Mooncake conversation trace replayed by `dyn bench` (token-id prompts: each hash id is a
deterministic 512-token block, so prefix sharing is exact) against 8 mocker workers behind

  dyn-<mode>     `dyn frontend --router <mode>` + `dyn worker --engine mocker --workers 8`
                 (etcd-free: file discovery; KV events and load over a local nats-server)
  dynamo-<mode>  `python -m dynamo.frontend --router-mode <mode>` + `python -m dynamo.mocker
                 --num-workers 8` (file discovery, TCP request plane, ZMQ event plane)

with the same block size, block count, speedup and trace window. The trace's arrival times are
divided by the speedup (and by --rate), so the simulated workers see the trace's real load (times
--rate). Reports prefix hit
rate (cached prompt tokens / prompt tokens, from the responses' usage), TTFT p50/p90/p99, ITL,
throughput, and the frontend process's CPU seconds per request.

    .venv/bin/python bench/kv_routing_trace.py --systems dyn-kv,dyn-round-robin,dyn-random
    .venv/bin/python bench/kv_routing_trace.py --systems dyn-kv,dynamo-kv --minutes 10
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_overhead import Proc, cpu_seconds, free_port  # noqa: E402  (shared bench helpers)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))
TRACE = os.path.join(SHARED, "traces", "mooncake", "conversation_trace.jsonl")
TOKENIZER = os.path.join(SHARED, "tokenizers", "mistral-7b-v0.1")


def make_model_dir(root):
    """A 32k-vocabulary tokenizer (Mistral-7B's: trace token ids are drawn below 32000) with a
    Llama-3.1-8B-like config.json and a long context, read by both systems' mockers."""
    d = os.path.join(root, "model")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(TOKENIZER, "tokenizer_config.json")))
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    cfg["model_max_length"] = 262144
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 262144,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2,
               "torch_dtype": "bfloat16"}, open(os.path.join(d, "config.json"), "w"), indent=1)
    return d


def wait_models(url, procs, want_workers, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited {p.proc.returncode}:\n{p.tail()}")
        try:
            r = httpx.get(url + "/v1/models", timeout=1)
            if r.status_code == 200 and r.json().get("data"):
                time.sleep(3)  # every worker registered and watched (both systems log them)
                return r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready:\n" + "\n".join(p.tail() for p in procs))


def start(system, args, model_dir, work):
    family, mode = system.split("-", 1)
    port = free_port()
    logs = os.path.join(work, "logs", system)
    os.makedirs(logs, exist_ok=True)
    procs = []
    if family == "dyn":
        nats_port = free_port()
        procs.append(Proc("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)], logs))
        time.sleep(0.5)
        nats = f"nats://127.0.0.1:{nats_port}"
        disc = "file:" + os.path.join(work, system + "-discovery")
        procs.append(Proc("dyn-worker", [args.dyn_bin, "worker", "--engine", "mocker", "--model", model_dir,
                                         "--served-model-name", "mock", "--discovery", disc, "--host", "127.0.0.1",
                                         "--workers", str(args.workers), "--block-size", str(args.block_size),
                                         "--num-kv-blocks", str(args.num_blocks), "--speedup-ratio", str(args.speedup),
                                         "--context-length", "262144", "--event-plane", nats], logs))
        procs.append(Proc("dyn-frontend", [args.dyn_bin, "frontend", "--discovery", disc, "--host", "127.0.0.1",
                                           "--port", str(port), "--router", mode, "--event-plane", nats], logs))
        frontend = procs[-1]
    elif family == "dynamo":
        kv = os.path.join(work, system + "-kv")
        os.makedirs(kv, exist_ok=True)
        env = {"DYN_FILE_KV": kv, "DYN_LOG": "warn"}
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        py = args.dynamo_python
        procs.append(Proc("dynamo-mocker", [py, "-m", "dynamo.mocker", "--model-path", model_dir, *common,
                                            "--model-name", "mock", "--num-workers", str(args.workers),
                                            "--block-size", str(args.block_size),
                                            "--num-gpu-blocks-override", str(args.num_blocks),
                                            "--speedup-ratio", str(args.speedup)], logs, env))
        procs.append(Proc("dynamo-frontend", [py, "-m", "dynamo.frontend", *common, "--http-host", "127.0.0.1",
                                              "--http-port", str(port), "--router-mode", mode,
                                              "--kv-cache-block-size", str(args.block_size)], logs, env))
        frontend = procs[-1]
    else:
        raise ValueError(system)
    url = f"http://127.0.0.1:{port}"
    try:
        model = wait_models(url, procs, args.workers)
    except Exception:
        for p in reversed(procs):
            p.stop()
        raise
    return procs, frontend, url, model


def run_one(system, args, model_dir, work):
    procs, frontend, url, model = start(system, args, model_dir, work)
    try:
        out = os.path.join(work, system + ".json")
        cpu0 = cpu_seconds(frontend.proc.pid)
        cmd = [args.dyn_bin, "bench", "--url", url, "--model", model, "--trace", TRACE,
               "--time-scale", str(args.speedup * args.rate), "--num-requests", str(args.requests),
               "--progress=false", "--json", out, "--timeout", "600"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        cpu = cpu_seconds(frontend.proc.pid) - cpu0
    finally:
        for p in reversed(procs):
            p.stop()
    run = json.load(open(out))["runs"][0]
    s = run["summary"]
    reqs = [r for r in run["requests"] if not r.get("warmup")]
    return {"system": system, "requests": len(reqs), "completed": s["completed"], "errors": s["errors"],
            "hit_rate": s["prefix_hit_rate"],  # -1: the server does not report cached tokens
            "ttft_p50": s["ttft_ms"]["p50"], "ttft_p90": s["ttft_ms"]["p90"], "ttft_p99": s["ttft_ms"]["p99"],
            "itl_p50": s["itl_ms"]["p50"], "itl_p99": s["itl_ms"]["p99"],
            "output_tok_s": s["output_token_throughput"], "req_s": s["request_throughput"],
            "frontend_cpu_ms_per_req": 1000.0 * cpu / max(1, len(reqs))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="dyn-kv,dyn-round-robin,dyn-random")
    ap.add_argument("--requests", type=int, default=2000, help="first N requests of the trace")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--speedup", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1.0, help="request rate multiplier over the trace's own")
    ap.add_argument("--dyn-bin", default=os.path.join(REPO, "build", "apps", "dyn", "dyn"))
    ap.add_argument("--dynamo-python", default=os.path.join(REPO, ".venv-dynamo", "bin", "python"))
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dyn-kvtrace-")
    model_dir = make_model_dir(work)
    results = []
    for system in args.systems.split(","):
        print(f"== {system}", file=sys.stderr, flush=True)
        results.append(run_one(system, args, model_dir, work))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    cols = ["system", "completed", "errors", "hit_rate", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p99",
            "output_tok_s", "frontend_cpu_ms_per_req"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = [f"{r[c]:.3f}" if c == "hit_rate" else f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c])
                 for c in cols]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        json.dump({"args": vars(args), "results": results}, open(args.out, "w"), indent=1)
    print(f"logs: {work}/logs", file=sys.stderr)


if __name__ == "__main__":
    main()
