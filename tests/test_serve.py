"""The completions server over real HTTP, on the tiny trained checkpoint (CPU)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runners.serve import make_server, parse_completion

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gsm8k"
MAX_MODEL_LEN = 384   # short: the engine's CPU step time grows with it

pytestmark = pytest.mark.skipif(not (CKPT / "config.json").exists(), reason="no tiny-gsm8k checkpoint")

PROMPTS = [
    "Question: Sam has 3 boxes of 4 pens. How many pens?\nAnswer:",
    "Question: A farm has 12 cows and sells 5. How many cows are left?\nAnswer:",
    "Question: Tom reads 6 pages a day for 7 days. How many pages?\nAnswer:",
    "Question: Ann buys 4 apples at $2 each. How much does she pay?\nAnswer:",
]
N_TOK = 10


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def engine():
    import torch

    from runners.engine import Engine

    # On a CPU shared with other jobs, two OpenMP threads spin against each
    # other and a 10-token generate swings from 0.3 s to 10 s; one thread
    # keeps this module's time steady. Reference and server both run under it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Engine(CKPT, precision="fp32", max_num_seqs=8, max_model_len=MAX_MODEL_LEN)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected(engine):
    """Engine.generate's greedy answers, computed before the server's loop
    owns the engine: one prompt at a time, so batching cannot shape them."""
    out = {}
    for p in PROMPTS:
        out[p] = engine.generate([p], max_new_tokens=N_TOK, greedy=True)[0]
    return out


@pytest.fixture(scope="module")
def server(engine, expected):
    srv = make_server(engine, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.close()
    t.join(timeout=10)


def post(srv, body, path="/v1/completions", timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(srv, path):
    try:
        with urllib.request.urlopen(srv.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def text_of(engine, result):
    """What the server returns for an Engine.generate result: the text
    without the stop token."""
    ids = result.token_ids
    if result.finish_reason == "stop" and ids and ids[-1] in engine.config.eos_token_id:
        ids = ids[:-1]
    return engine.decode(ids)


# --------------------------------------------------------------------------- tests

def test_models_and_health(server):
    code, models = get(server, "/v1/models")
    assert code == 200 and models["object"] == "list"
    assert models["data"][0]["id"] == "tiny-gsm8k" and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    code, health = get(server, "/health")
    assert code == 200 and health["status"] == "ok" and health["model"] == "tiny-gsm8k"


def test_string_prompt_equals_generate(server, engine, expected):
    p = PROMPTS[0]
    code, r = post(server, {"model": "tiny-gsm8k", "prompt": p, "max_tokens": N_TOK, "temperature": 0,
                            "seed": 1234})
    assert code == 200, r
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == "tiny-gsm8k"
    assert isinstance(r["created"], int)
    (choice,) = r["choices"]
    ref = expected[p]
    assert choice == {"index": 0, "text": text_of(engine, ref), "finish_reason": ref.finish_reason,
                      "logprobs": None}
    n_prompt = len(engine.encode(p))
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(ref.token_ids),
                          "total_tokens": n_prompt + len(ref.token_ids)}


def test_list_of_strings_and_token_ids(server, engine, expected):
    ps = PROMPTS[1:3]
    code, r = post(server, {"prompt": ps, "max_tokens": N_TOK, "temperature": 0.0})
    assert code == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["text"] for c in r["choices"]] == [text_of(engine, expected[p]) for p in ps]
    assert r["usage"]["prompt_tokens"] == sum(len(engine.encode(p)) for p in ps)
    assert r["usage"]["completion_tokens"] == sum(len(expected[p].token_ids) for p in ps)
    # Token ids in, the same text out; a list of id lists is one choice each.
    ids = [engine.encode(p) for p in ps]
    code, one = post(server, {"prompt": ids[0], "max_tokens": N_TOK, "temperature": 0})
    assert code == 200 and one["choices"][0]["text"] == r["choices"][0]["text"]
    code, two = post(server, {"prompt": ids, "max_tokens": N_TOK, "temperature": 0})
    assert code == 200 and [c["text"] for c in two["choices"]] == [c["text"] for c in r["choices"]]


def test_stop_sequences(server, engine, expected):
    p = PROMPTS[0]
    full = text_of(engine, expected[p])
    stop = full.strip()[3:6]           # a piece the greedy answer is sure to print
    assert len(stop) == 3 and stop in full
    for stops in (stop, ["never-printed", stop]):
        code, r = post(server, {"prompt": p, "max_tokens": N_TOK, "temperature": 0, "stop": stops})
        assert code == 200, r
        c = r["choices"][0]
        assert c["text"] == full[:full.find(stop)] and c["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] < len(expected[p].token_ids)
    # max_tokens reached first: "length"
    code, r = post(server, {"prompt": p, "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2


def test_concurrent_requests_share_steps(server, engine, expected):
    loop = server.loop
    before = loop.stats.steps
    loop.stats.max_batch = 0
    loop.stats.max_running = 0
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: post(server, {"prompt": p, "max_tokens": N_TOK,
                                                        "temperature": 0}), PROMPTS))
    assert all(code == 200 for code, _ in replies), replies
    # Batched with each other, each answer is still what it was alone.
    assert [r["choices"][0]["text"] for _, r in replies] == [text_of(engine, expected[p]) for p in PROMPTS]
    steps = loop.stats.steps - before
    tokens = sum(r["usage"]["completion_tokens"] for _, r in replies)
    assert loop.stats.max_batch > 1 and loop.stats.max_running > 1, loop.stats
    assert steps < tokens, (steps, tokens)   # one by one would take a step per token
    assert not engine.has_unfinished() and not engine.requests


TOO_LONG = list(range(3, 3 + MAX_MODEL_LEN))


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "x", "temperature": NaN}', None),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": TOO_LONG, "max_tokens": 1}, "prompt"),
    ({"prompt": "x" * 4000, "max_tokens": 1}, "prompt"),
    ({"prompt": [5, 10 ** 9]}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, "echo"),
    ({"prompt": "x", "logprobs": 5}, "logprobs"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_bad_requests_are_400_and_serving_goes_on(server, body, param):
    code, r = post(server, body)
    assert code == 400, r
    err = r["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    code, ok = post(server, {"prompt": "Question: 1+1?\nAnswer:", "max_tokens": 2, "temperature": 0})
    assert code == 200 and len(ok["choices"]) == 1


def test_context_length_message(server):
    code, r = post(server, {"prompt": TOO_LONG[:-10], "max_tokens": 20})
    assert code == 400 and r["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN}" in r["error"]["message"]


def test_unknown_fields_ignored_and_routes(server):
    # Fields lm-eval passes through from a task's gen_kwargs, and common extras.
    code, r = post(server, {"prompt": "Question: 2+2?\nAnswer:", "max_tokens": 2, "temperature": 0,
                            "seed": 1234, "user": "ci", "something_new": {"x": 1}, "echo": False,
                            "logprobs": None, "presence_penalty": 0})
    assert code == 200, r
    assert get(server, "/nope")[0] == 404
    assert get(server, "/v1/completions")[0] == 405
    code, r = post(server, {"prompt": "x"}, path="/v1/chat/completions")
    assert code == 404 and r["error"]["message"]


@pytest.mark.parametrize("where", ["forward", "step"])
def test_engine_exception_is_500_and_serving_goes_on(server, engine, monkeypatch, where):
    # "forward" fails after the scheduler admitted the request (it is
    # running and holds a slot); "step" fails before (it is still waiting).
    real = getattr(engine, where)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, where, flaky)
    code, r = post(server, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert code == 500 and "injected failure" in r["error"]["message"]
    assert r["error"]["type"] == "server_error"
    assert not engine.requests and not engine.has_unfinished()   # freed, slot included
    assert len(engine.cache.free_slots) == engine.scheduler.max_num_seqs
    code, r = post(server, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert code == 200 and r["usage"]["completion_tokens"] >= 1


def test_client_that_leaves_is_aborted(server, engine):
    aborted = server.loop.stats.aborted
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 300, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(server.server_address[:2]) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while not engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 20
    while server.loop.stats.aborted == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.loop.stats.aborted == aborted + 1
    assert not engine.has_unfinished()


def test_parse_completion_defaults():
    r = parse_completion({"prompt": "hi"})
    assert (r.max_tokens, r.temperature, r.top_p, r.stop, r.seed) == (16, 1.0, 1.0, [], None)
    assert parse_completion({"prompt": "hi", "stop": "Q:"}).stop == ["Q:"]


def test_parity_gate_against_the_server(server, tmp_path):
    from click.testing import CliRunner

    from gate_fixtures import write_gsm8k
    from parity.cli import cli

    test, _ = write_gsm8k(tmp_path, n_test=3, n_train=4)
    res = CliRunner().invoke(cli, ["gate", "gsm8k", "--endpoint", server.url, "--data", str(test),
                                   "--num-fewshot", "1", "--max-new-tokens", "24", "--no-progress",
                                   "--concurrency", "3", "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["source"]["kind"] == "endpoint"
    assert summary["source"]["model"] == "tiny-gsm8k"
    recs = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["generation"] for r in recs)
    assert not any(r["past_stop"] for r in recs)   # the server honoured the stop sequences


def test_lm_eval_local_completions(server, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    ps = PROMPTS[:3]
    for args in ({}, {"num_concurrent": 3}):   # the plain and the async (aiohttp) paths
        lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny",
                                 tokenizer_backend=None, max_gen_toks=N_TOK, **args)
        reqs = [Instance("generate_until", {}, (p, {"until": ["Question:"], "do_sample": False,
                                                    "temperature": 0.0}), i)
                for i, p in enumerate(ps)]
        out = lm.generate_until(reqs, disable_tqdm=True)
        assert len(out) == 3 and all(isinstance(o, str) and o for o in out)
        code, r = post(server, {"prompt": ps, "max_tokens": N_TOK, "temperature": 0,
                                "stop": ["Question:"]})
        assert out == [c["text"] for c in r["choices"]]


def test_text_drops_the_stop_token_and_cuts_at_the_earliest_stop(engine):
    from runners.engine.sampling import SamplingParams
    from runners.engine.scheduler import Request
    from runners.serve import EngineLoop

    loop = EngineLoop(engine)   # never started: _text only decodes
    ids = engine.tokenizer("x ab cd ef", add_special_tokens=False).input_ids
    eos = engine.config.eos_token_id[0]
    done = Request(0, [0], SamplingParams(), output_ids=ids + [eos], finished=True, finish_reason="stop")
    assert loop._text(done) == (engine.decode(ids), "stop")
    # Listed first but printed later: "ef" does not decide where the text ends.
    cut = Request(1, [0], SamplingParams(stop=["ef", "cd"]), output_ids=ids, finished=True,
                  finish_reason="length")
    text, reason = loop._text(cut)
    assert reason == "stop" and text == engine.decode(ids).split("cd")[0]
    kept = Request(2, [0], SamplingParams(ignore_eos=True), output_ids=ids + [eos], finished=True,
                   finish_reason="length")
    assert loop._text(kept) == (engine.decode(ids + [eos]), "length")
