"""Disaggregated prefill and decode end to end, every part a separate process on a real etcd:
`dyn worker --role prefill` (KV over TCP or shared memory), `dyn worker --role decode`, and
`dyn frontend`. Greedy output must equal aggregated serving (`dyn run`) token for token; failures
(a prefill worker killed while its KV is being copied, a decode worker that never pulls) must
leave no KV blocks held and still answer the client."""
import concurrent.futures
import os
import re
import shutil
import signal
import time

import httpx
import pytest

from cluster import Frontend, Worker, _wait
from dyn_server import SMOLLM2, STORIES, DynServer

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None and not os.path.exists("/usr/bin/etcd"),
                                reason="etcd is not installed (scripts/setup.sh installs it)")

WORDS = ("the little cat saw a big red ball in the garden and ran to get it because she "
         "wanted to play with her friend who lived near the old tree by the river").split()


def make_prompts(n, seed, max_words):
    """n prompts of varied length (1 to max_words words), none a prefix of another."""
    out = []
    for i in range(n):
        length = 1 + (i * 37 + seed * 11) % max_words
        words = [WORDS[(i * 7 + j * (seed + 3)) % len(WORDS)] for j in range(length)]
        out.append(f"Story {seed}-{i}: " + " ".join(words))
    return out


def complete(url, model, prompt, max_tokens):
    r = httpx.post(url + "/v1/completions", timeout=180, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


# Requests in flight at once. Batch composition changes bf16 GPU rounding (a row's matmul depends
# on how many rows share it), so exact equality with a bf16 model on a GPU needs 1: then the
# prefill worker and dyn run see the same shapes.
CONCURRENCY = int(os.environ.get("DYN_TEST_DISAGG_CONCURRENCY", "8"))


def complete_all(url, model, prompts, max_tokens=16, concurrency=CONCURRENCY):
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: complete(url, model, p, max_tokens), prompts))


def texts(bodies):
    return [b["choices"][0]["text"] for b in bodies]


def worker(etcd, procs, model, name, *extra, lease_ttl=2):
    w = Worker(f"etcd:{etcd.url}", "--model", model, "--served-model-name", "m", "--threads", "1", *extra, name=name,
               lease_ttl=lease_ttl)
    procs.append(w)
    return w


def frontend(etcd, procs, *extra, router="kv"):
    f = Frontend(f"etcd:{etcd.url}", "--router", router, *extra)
    procs.append(f)
    return f


def wait_prefill_pool(fe, worker_count_before):
    """Until the frontend's log says a prefill instance joined (worker_count_before seen so far)."""
    _wait(lambda: fe.logs().count("prefill pool") > worker_count_before, 30, "prefill instance on the frontend",
          fe.proc, fe.logs)


def settle(pred, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


MODELS = [pytest.param(STORIES, 200, id="stories260K"), pytest.param(SMOLLM2, 100, id="SmolLM2")]
# Another model directory (e.g. one on a GPU machine); its flags come from DYN_* variables
# (DYN_LOAD_FORMAT=dummy for a config.json-only model).
if os.environ.get("DYN_TEST_EXTRA_MODEL"):
    MODELS.append(pytest.param(os.environ["DYN_TEST_EXTRA_MODEL"], 100, id="extra"))


@pytest.mark.parametrize("model,max_words", MODELS)
def test_disaggregated_greedy_output_equals_aggregated(etcd, procs, model, max_words):
    if not os.path.exists(model):
        pytest.skip(f"{model} is not present")
    prompts = {"tcp": make_prompts(50, 1, max_words), "shm": make_prompts(50, 2, max_words)}
    ref = DynServer("--model", model, "--served-model-name", "m", "--threads", "2")
    try:
        expected = {t: texts(complete_all(ref.url, "m", p)) for t, p in prompts.items()}
    finally:
        ref.stop()

    decode = worker(etcd, procs, model, "decode", "--role", "decode")
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "0")
    fe.wait_model("m")
    for i, transport in enumerate(["tcp", "shm"]):
        prefill = worker(etcd, procs, model, f"prefill-{transport}", "--role", "prefill", "--kv-transport", transport)
        wait_prefill_pool(fe, i)
        before = decode.metrics()
        remote_before = fe.metric("dyn_router_remote_prefills_total") or 0
        bodies = complete_all(fe.url, "m", prompts[transport])
        got = texts(bodies)
        mismatches = [(j, expected[transport][j], got[j]) for j in range(len(got)) if got[j] != expected[transport][j]]
        assert not mismatches, f"{transport}: {len(mismatches)} of {len(got)} differ, first: {mismatches[0]}"
        for b in bodies:
            nv = b["nvext"]["worker_id"]
            assert nv["prefill_worker_id"] != nv["decode_worker_id"], nv
        assert fe.metric("dyn_router_remote_prefills_total") - remote_before == 50
        after = decode.metrics()
        assert after["dyn_engine_kv_transfers_total"] - before.get("dyn_engine_kv_transfers_total", 0) == 50
        assert after["dyn_engine_kv_transfer_failures_total"] == 0
        assert after["dyn_engine_kv_transfer_bytes_total"] > before.get("dyn_engine_kv_transfer_bytes_total", 0)
        # Every lease ended (released by the decode worker) and nothing is held on either side.
        assert settle(lambda: prefill.metrics()["dyn_engine_kv_leased_blocks"] == 0), prefill.metrics()
        assert prefill.metrics()["dyn_engine_kv_leases"] == 0
        assert settle(lambda: decode.metrics()["dyn_engine_kv_blocks_used"] == 0), decode.metrics()
        prefill.stop()
        _wait(lambda: "is gone" in fe.logs(), 30, "prefill worker leaving", fe.proc, fe.logs)


def test_conditional_disaggregation_prefills_short_prompts_locally(etcd, procs):
    worker(etcd, procs, STORIES, "decode", "--role", "decode")
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "40")
    fe.wait_model("m")
    worker(etcd, procs, STORIES, "prefill", "--role", "prefill")
    wait_prefill_pool(fe, 0)
    short = complete(fe.url, "m", "Once upon a time", 4)
    nv = short["nvext"]["worker_id"]
    assert nv["prefill_worker_id"] == nv["decode_worker_id"], nv
    long = complete(fe.url, "m", make_prompts(1, 5, 120)[0] + " and then", 4)
    assert long["usage"]["prompt_tokens"] > 40
    nv = long["nvext"]["worker_id"]
    assert nv["prefill_worker_id"] != nv["decode_worker_id"], nv
    assert fe.metric("dyn_router_local_prefills_total") == 1
    assert fe.metric("dyn_router_remote_prefills_total") == 1


def test_without_prefill_workers_serves_aggregated(etcd, procs):
    worker(etcd, procs, STORIES, "decode", "--role", "decode")
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "0")
    fe.wait_model("m")
    body = complete(fe.url, "m", make_prompts(1, 3, 100)[0], 8)
    assert body["usage"]["completion_tokens"] == 8
    assert fe.metric("dyn_router_local_prefills_total") == 1


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_prefill_worker_killed_before_the_copy_leaks_nothing(etcd, procs, transport):
    """The prefill worker dies holding the lease of a prompt whose decode worker has not copied it
    yet (the decode worker is frozen for that moment, shorter than the frontend's dead-connection
    timeout). The decode worker's copy fails (tcp: the source is gone; shm: the memory is still
    mapped, but nobody can confirm the lease held), the frontend serves the request aggregated on
    the decode worker with the first token appended, and the client gets its whole answer, equal
    to aggregated serving's. No blocks stay held."""
    decode = worker(etcd, procs, STORIES, "decode", "--role", "decode", lease_ttl=30)
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "0")
    fe.wait_model("m")
    prefill = worker(etcd, procs, STORIES, "prefill", "--role", "prefill", "--kv-transport", transport)
    wait_prefill_pool(fe, 0)
    prompt = make_prompts(1, 9, 150)[0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        decode.signal(signal.SIGSTOP)
        try:
            fut = pool.submit(complete, fe.url, "m", prompt, 12)
            _wait(lambda: prefill.metrics().get("dyn_engine_kv_leases", 0) >= 1, 20, "a lease on the prefill worker",
                  prefill.proc, prefill.logs)
            prefill.kill()
        finally:
            decode.signal(signal.SIGCONT)
        body = fut.result(timeout=60)
    assert body["usage"]["completion_tokens"] == 12
    m = decode.metrics()
    assert m["dyn_engine_kv_transfers_total"] == 1 and m["dyn_engine_kv_transfer_failures_total"] == 1, m
    assert fe.metric("dyn_router_disagg_fallbacks_total") == 1
    assert settle(lambda: decode.metrics()["dyn_engine_kv_blocks_used"] == 0), decode.metrics()
    # The same prompt again, now that no prefill worker is left: aggregated, the same text.
    _wait(lambda: "is gone" in fe.logs(), 30, "prefill worker leaving", fe.proc, fe.logs)
    again = complete(fe.url, "m", prompt, 12)
    assert again["choices"][0]["text"] == body["choices"][0]["text"]
    assert fe.metric("dyn_router_local_prefills_total") == 1


def test_prefill_worker_killed_mid_transfer_leaks_nothing(etcd, procs):
    """The prefill worker's KV source is capped at 0.5 MB/s (--kv-transfer-max-mbps), so the copy
    of a ~350 KB prompt takes ~0.7 s; the prefill worker is killed 0.25 s after its lease appears,
    i.e. in the middle of the copy. The decode worker's pull fails with part of the blocks
    written, frees them, and the client gets the aggregated answer."""
    decode = worker(etcd, procs, STORIES, "decode", "--role", "decode")
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "0")
    fe.wait_model("m")
    prefill = worker(etcd, procs, STORIES, "prefill", "--role", "prefill", "--kv-transport", "tcp",
                     "--kv-transfer-max-mbps", "0.5")
    wait_prefill_pool(fe, 0)
    prompt = make_prompts(1, 11, 190)[0] + " and then they all went home"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, fe.url, "m", prompt, 12)
        _wait(lambda: prefill.metrics().get("dyn_engine_kv_leases", 0) >= 1, 20, "a lease on the prefill worker",
              prefill.proc, prefill.logs)
        time.sleep(0.25)
        prefill.kill()
        body = fut.result(timeout=60)
    assert body["usage"]["prompt_tokens"] > 200, body["usage"]
    assert body["usage"]["completion_tokens"] == 12
    m = decode.metrics()
    assert m["dyn_engine_kv_transfers_total"] == 1 and m["dyn_engine_kv_transfer_failures_total"] == 1, m
    assert m["dyn_engine_kv_transfer_bytes_total"] == 0, m  # a failed copy counts no bytes
    # Cut in the middle: some of the bytes arrived, then the source went away.
    cut = re.search(r"KV transfer failed: .* after (\d+) of (\d+) bytes", decode.logs())
    assert cut and 0 < int(cut.group(1)) < int(cut.group(2)), decode.logs()
    assert fe.metric("dyn_router_disagg_fallbacks_total") == 1
    assert settle(lambda: decode.metrics()["dyn_engine_kv_blocks_used"] == 0), decode.metrics()
    _wait(lambda: "is gone" in fe.logs(), 30, "prefill worker leaving", fe.proc, fe.logs)
    again = complete(fe.url, "m", prompt, 12)
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


def test_decode_worker_that_never_pulls_lets_the_lease_expire(etcd, procs):
    """One of two decode workers is frozen (SIGSTOP; its discovery lease outlives the test, so the
    frontend keeps routing to it): it never pulls. The prefill worker's leases on those prompts'
    KV expire (--kv-lease-timeout 2); the frontend declares the frozen worker's connection dead
    and serves those requests on the other decode worker. Round-robin routing sends every other
    request to the frozen one."""
    frozen = worker(etcd, procs, STORIES, "decode-frozen", "--role", "decode", lease_ttl=60)
    healthy = worker(etcd, procs, STORIES, "decode-healthy", "--role", "decode")
    fe = frontend(etcd, procs, "--max-local-prefill-tokens", "0", router="round-robin")
    fe.wait_model("m")
    prefill = worker(etcd, procs, STORIES, "prefill", "--role", "prefill", "--kv-lease-timeout", "2")
    wait_prefill_pool(fe, 0)
    _wait(lambda: fe.logs().count("joined the") >= 3, 30, "all instances on the frontend", fe.proc, fe.logs)
    frozen.signal(signal.SIGSTOP)
    prompts = [p + f" number {i}" for i, p in enumerate(make_prompts(4, 7, 200))]
    bodies = complete_all(fe.url, "m", prompts, max_tokens=6, concurrency=4)
    assert all(b["usage"]["completion_tokens"] == 6 for b in bodies)
    assert all(b["nvext"]["worker_id"]["decode_worker_id"] != b["nvext"]["worker_id"]["prefill_worker_id"]
               for b in bodies)
    assert fe.metric("dyn_engine_migrations_total", "m") >= 1
    assert settle(lambda: prefill.metrics()["dyn_engine_kv_leased_blocks"] == 0, timeout=20), prefill.metrics()
    assert prefill.metrics()["dyn_engine_kv_leases"] == 0
    frozen.signal(signal.SIGCONT)
    assert settle(lambda: frozen.metrics()["dyn_engine_kv_blocks_used"] == 0, timeout=20), frozen.metrics()
    assert settle(lambda: healthy.metrics()["dyn_engine_kv_blocks_used"] == 0), healthy.metrics()


def test_mocker_prefill_and_decode_in_one_process():
    """`dyn run --engine mocker --prefill-workers 1`: simulated transfers ("sim" descriptors), the
    same routing and leases as the native engine."""
    s = DynServer("--model", STORIES, "--served-model-name", "m", "--engine", "mocker", "--workers", "1",
                  "--prefill-workers", "1", "--max-local-prefill-tokens", "0", "--speedup-ratio", "50")
    try:
        bodies = complete_all(s.url, "m", make_prompts(6, 4, 150), max_tokens=5, concurrency=3)
        for b in bodies:
            assert b["usage"]["completion_tokens"] == 5
            nv = b["nvext"]["worker_id"]
            assert nv["prefill_worker_id"] != nv["decode_worker_id"], nv
        r = httpx.get(s.url + "/metrics", timeout=5).text
        assert 'dyn_router_remote_prefills_total{model="m"} 6' in r, r
    finally:
        s.stop()
