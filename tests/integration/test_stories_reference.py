"""stories260K through HTTP: greedy output equals the golden reference (checked against HF
transformers), streaming and not, alone and under continuous batching; prefix caching."""
import concurrent.futures
import json
import os

import httpx
import pytest

from dyn_server import STORIES, DynServer

REFERENCE = json.load(open(os.path.join(STORIES, "..", "reference.json")))
MODEL = "stories"


@pytest.fixture(scope="module")
def server():
    s = DynServer("--model", STORIES, "--served-model-name", MODEL)
    yield s
    assert s.alive(), "server died during the tests"
    assert s.stop() == 0


def complete(server, prompt, max_tokens, **extra):
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def complete_stream(server, prompt, max_tokens):
    text, finish, usage = "", None, None
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk["choices"]:
            text += c.get("text") or ""
            finish = c.get("finish_reason") or finish
    return text, finish, usage


def detokenize(server, ids):
    r = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_greedy_from_bos_equals_reference(server):
    # Token-id prompt [BOS]: the 40 greedy tokens must be the reference ids.
    out = complete(server, [1], 40, logprobs=1, return_tokens_as_token_ids=True)
    ids = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
    assert ids == REFERENCE["cases"][0]["greedy_ids_40"]
    expected = detokenize(server, REFERENCE["cases"][0]["greedy_ids_40"])
    assert out["usage"]["completion_tokens"] == 40
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == expected


@pytest.mark.parametrize("case", [1, 2])
def test_continuation_equals_reference_text(server, case):
    c = REFERENCE["cases"][case]
    n = 65 - len(c["prompt_ids_with_bos"])
    out = complete(server, c["prompt"], n)
    assert out["usage"]["prompt_tokens"] == len(c["prompt_ids_with_bos"])
    assert c["prompt"] + out["choices"][0]["text"] == c["text_first_65_tokens"]
    text, finish, usage = complete_stream(server, c["prompt"], n)
    assert c["prompt"] + text == c["text_first_65_tokens"]
    assert finish == "length"
    assert usage["completion_tokens"] == n


def test_concurrent_requests_match_solo_output(server):
    words = ["Tom", "Lily", "The cat", "A big dog", "Once", "Sam and", "The sun", "Mom said",
             "The bird", "Ben had", "One day", "The little", "Sue saw", "Max", "The boat", "Anna"]
    solo = [complete(server, w, 48)["choices"][0]["text"] for w in words]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda w: complete(server, w, 48)["choices"][0]["text"], words))
    assert together == solo
    assert len(set(solo)) > 8  # different prompts really gave different outputs


def test_logprobs_requests_batched_with_plain_ones_match_solo(server):
    # Requests with logprobs need the host sampler; plain greedy ones can be sampled on a device.
    # Batched together (a step mixes both kinds), every text equals the request's solo text.
    words = ["Tom", "Lily", "The cat", "A big dog", "Once", "Sam and", "The sun", "Mom said"]
    extra = lambda i: {"logprobs": 2} if i % 2 else {}
    solo = [complete(server, w, 32, **extra(i))["choices"][0]["text"] for i, w in enumerate(words)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda iw: complete(server, iw[1], 32, **extra(iw[0]))["choices"][0]["text"],
                                 enumerate(words)))
    assert together == solo
    with_lp = complete(server, words[1], 4, logprobs=2)["choices"][0]["logprobs"]
    assert len(with_lp["tokens"]) == 4 and len(with_lp["top_logprobs"][0]) == 2


def test_shared_prefix_is_served_from_cache(server):
    prefix = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 3
    first = complete(server, prefix + "One day", 8)
    second = complete(server, prefix + "The next day", 8)
    prompt_tokens = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] > 64
    assert cached >= 64, second["usage"]
    assert cached % 16 == 0 and cached < prompt_tokens
    metrics = httpx.get(server.url + "/metrics").text
    assert "cached" in metrics
