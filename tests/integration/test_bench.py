"""`dyn bench` against a real `dyn run --engine echo` server (SmolLM2's tokenizer): request counts,
token counts equal to max_tokens, JSON/CSV contents, open-loop and trace modes, and error
accounting against a dead URL."""
import csv
import json
import os
import subprocess

import pytest

from dyn_server import SMOLLM2, DynServer, dyn_bin, free_port

if not os.path.exists(dyn_bin()):
    pytest.skip(f"dyn binary not found at {dyn_bin()}", allow_module_level=True)
if not os.path.exists(SMOLLM2):
    pytest.skip(f"model not found at {SMOLLM2}", allow_module_level=True)

MODEL = "bench-echo"


@pytest.fixture(scope="module")
def server():
    s = DynServer("--model", SMOLLM2, "--engine", "echo", "--served-model-name", MODEL)
    yield s
    s.stop()


def bench(url, tmp_path, *args, expect_rc=0):
    out = tmp_path / "bench.json"
    cmd = [dyn_bin(), "bench", "--url", url, "--model", MODEL, "--json", str(out), "--no-progress", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == expect_rc, p.stdout + p.stderr
    return json.loads(out.read_text()), p.stdout


def measured(run):
    return [r for r in run["requests"] if not r["warmup"]]


def test_closed_loop_completions(server, tmp_path):
    csv_path = tmp_path / "bench.csv"
    report, stdout = bench(server.url, tmp_path, "--concurrency", "4", "--num-requests", "20",
                           "--warmup-requests", "3", "--input-tokens", "40", "--output-tokens", "16",
                           "--output-stddev", "4", "--csv", str(csv_path), "--seed", "7")
    assert "time to first token (ms)" in stdout
    (run,) = report["runs"]
    s = run["summary"]
    assert s["requests"] == 20 and s["completed"] == 20 and s["errors"] == 0
    assert len(run["requests"]) == 23
    assert sum(r["warmup"] for r in run["requests"]) == 3
    for r in measured(run):
        assert r["usage_reported"]
        assert r["output_tokens"] == r["max_tokens"]
        assert r["input_tokens"] == 40
        assert 0 <= r["ttft_ms"] <= r["e2e_ms"]
        assert r["chunk_ms"] == sorted(r["chunk_ms"])
    assert s["output_token_throughput"] > 0 and s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["count"] == 20
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 23 and {r["error_kind"] for r in rows} == {""}
    assert len({r["max_tokens"] for r in measured(run)}) > 1
    # Same seed, same workload: the measured requests repeat exactly, whatever the warm-up count.
    again, _ = bench(server.url, tmp_path, "--concurrency", "2", "--num-requests", "20", "--warmup-requests", "0",
                     "--input-tokens", "40", "--output-tokens", "16", "--output-stddev", "4", "--seed", "7")
    assert [r["max_tokens"] for r in measured(again["runs"][0])] == [r["max_tokens"] for r in measured(run)]


def test_open_loop_chat_with_length_distribution(server, tmp_path):
    report, _ = bench(server.url, tmp_path, "--endpoint", "chat", "--tokenizer", SMOLLM2, "--request-rate", "40",
                      "--num-requests", "24", "--input-tokens", "30", "--output-tokens", "12",
                      "--output-stddev", "4", "--seed", "3")
    (run,) = report["runs"]
    s = run["summary"]
    assert s["requests"] == 24 and s["errors"] == 0
    lengths = {r["max_tokens"] for r in run["requests"]}
    assert len(lengths) > 1, "output lengths should vary with --output-stddev"
    for r in run["requests"]:
        assert r["output_tokens"] == r["max_tokens"]
        assert r["input_tokens"] > 0  # from usage (the chat template adds tokens)
    # 24 Poisson arrivals at 40/s take about 0.6 s: the window is not that of a closed loop burst.
    assert 0.15 < s["window_s"] < 5


def test_trace_replay_keeps_prefix_sharing(server, tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [(0, 1100, 8, [1, 2, 3]), (10, 1300, 8, [1, 2, 4]), (20, 600, 8, [1, 5]), (30, 700, 8, [6, 7]),
            (40, 1100, 8, [1, 2, 3])]
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": o, "hash_ids": h}) + "\n"
                             for t, n, o, h in rows))
    report, stdout = bench(server.url, tmp_path, "--trace", str(trace), "--time-scale", "1", "--num-requests", "0")
    cfg = report["config"]
    assert cfg["trace_requests"] == 5
    assert cfg["trace_hit_ratio_prompts"] == pytest.approx(cfg["trace_hit_ratio_hash_ids"])
    assert cfg["trace_hit_ratio_hash_ids"] > 0.3
    (run,) = report["runs"]
    assert run["summary"]["completed"] == 5
    assert [r["input_tokens"] for r in run["requests"]] == [n for _, n, _, _ in rows]
    assert all(r["output_tokens"] == 8 for r in run["requests"])


def test_sweep_writes_one_run_per_concurrency(server, tmp_path):
    report, stdout = bench(server.url, tmp_path, "--sweep-concurrency", "1,2,4", "--num-requests", "8",
                           "--input-tokens", "16", "--output-tokens", "8")
    assert [r["concurrency"] for r in report["runs"]] == [1, 2, 4]
    assert all(r["summary"]["completed"] == 8 for r in report["runs"])
    assert "out tok/s" in stdout


def test_dead_url_counts_connect_errors(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    report, _ = bench(url, tmp_path, "--num-requests", "5", "--concurrency", "2", "--timeout", "5", expect_rc=1)
    s = report["runs"][0]["summary"]
    assert s["requests"] == 5 and s["completed"] == 0 and s["errors"] == 5
    assert s["errors_by_kind"] == {"connect": 5}


def test_unknown_model_is_an_http_4xx(server, tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([dyn_bin(), "bench", "--url", server.url, "--model", "nope", "--num-requests", "3",
                        "--json", str(out), "--no-progress"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    s = json.loads(out.read_text())["runs"][0]["summary"]
    assert s["errors_by_kind"] == {"http_4xx": 3}


def test_extra_body_fields_reach_the_server(server, tmp_path):
    # Sampling fields go into every request: valid ones are served, an out-of-range top_p is
    # refused by the server (so the field was sent), and the report records what was sent.
    sampling = '{"temperature": 0.8, "top_p": 0.9, "seed": 3}'
    report, _ = bench(server.url, tmp_path, "--num-requests", "4", "--input-tokens", "10", "--output-tokens", "4",
                      "--extra-body", sampling)
    assert report["runs"][0]["summary"]["completed"] == 4
    assert json.loads(report["config"]["extra_body"]) == {"temperature": 0.8, "top_p": 0.9, "seed": 3}
    report, _ = bench(server.url, tmp_path, "--num-requests", "3", "--input-tokens", "10", "--output-tokens", "4",
                      "--extra-body", '{"top_p": 5}', expect_rc=1)
    assert report["runs"][0]["summary"]["errors_by_kind"] == {"http_4xx": 3}
    p = subprocess.run([dyn_bin(), "bench", "--url", server.url, "--model", MODEL, "--num-requests", "1",
                        "--no-progress", "--extra-body", "{oops"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "--extra-body must be a JSON object" in p.stderr + p.stdout
