"""The engine's server over real HTTP on loopback, on the tiny trained checkpoint (CPU)."""

import json
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gate_fixtures import CKPT, MAX_MODEL_LEN, get, load_engine, post, stream

pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (CKPT / "config.json").exists(), reason="no tiny-gsm8k checkpoint")

PROMPTS = [
    "Question: Sam has 3 boxes of 4 pens. How many pens?\nAnswer:",
    "Question: A farm has 12 cows and sells 5. How many cows are left?\nAnswer:",
    "Question: Tom reads 6 pages a day for 7 days. How many pages?\nAnswer:",
    "Question: Ann buys 4 apples at $2 each. How much does she pay?\nAnswer:",
]
N_TOK = 10
# Plain concatenation: a chat of one user turn renders to its text.
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def engine():
    return load_engine()


def ids_of(engine, text):
    """The checkpoint's BOS rule: its tokenizer_config.json says add_bos_token false."""
    return engine.tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def expected(engine):
    """Engine.generate's greedy answers on the rule's token ids, one prompt at
    a time, before the server's loop owns the engine."""
    return {p: engine.generate([ids_of(engine, p)], max_new_tokens=N_TOK, greedy=True)[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def server(engine, expected):
    from runners.server.run import Serving

    srv = Serving(engine, read_timeout=1.5).start()
    yield srv
    srv.close()


def text_of(engine, result):
    ids = result.token_ids
    if result.finish_reason == "stop" and ids and ids[-1] in engine.config.eos_token_id:
        ids = ids[:-1]
    return engine.decode(ids)


def greedy(prompt, **more):
    return {"prompt": prompt, "max_tokens": N_TOK, "temperature": 0, **more}


# --------------------------------------------------------------------------- completions

def test_models_and_health(server):
    code, models = get(server.url, "/v1/models")
    card = models["data"][0]
    assert code == 200 and card["id"] == "tiny-gsm8k" and card["max_model_len"] == MAX_MODEL_LEN
    assert card["add_bos_token"] is False and card["chat_template"] is False
    assert get(server.url, "/v1/models/tiny-gsm8k")[1] == card
    code, health = get(server.url, "/health")
    assert code == 200 and health["status"] == "ok" and health["model"] == "tiny-gsm8k"


def test_text_and_token_ids_follow_one_bos_rule(server, engine, expected):
    p = PROMPTS[0]
    code, r = post(server.url, greedy(p, seed=1234, return_token_ids=True))
    assert code == 200, r
    (choice,) = r["choices"]
    ref = expected[p]
    assert choice["text"] == text_of(engine, ref) and choice["finish_reason"] == ref.finish_reason
    assert choice["prompt_token_ids"] == ids_of(engine, p) and choice["prompt_token_ids"][0] != 0
    n = len(ids_of(engine, p))
    assert r["usage"] == {"prompt_tokens": n, "completion_tokens": len(ref.token_ids),
                          "total_tokens": n + len(ref.token_ids)}
    # Token ids in: the same prompt, the same answer; a list of lists is one choice each.
    code, one = post(server.url, greedy(ids_of(engine, p), return_token_ids=True))
    assert one["choices"][0]["text"] == choice["text"]
    assert one["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    code, two = post(server.url, greedy([ids_of(engine, q) for q in PROMPTS[1:3]]))
    code, texts = post(server.url, greedy(PROMPTS[1:3]))
    assert [c["text"] for c in two["choices"]] == [c["text"] for c in texts["choices"]] \
        == [text_of(engine, expected[q]) for q in PROMPTS[1:3]]


def test_n_choices_and_seeds(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7}
    code, a = post(server.url, body)
    code, b = post(server.url, body)
    assert code == 200 and [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert a["choices"] == b["choices"]                       # seeded: reproducible
    assert len({c["text"] for c in a["choices"]}) > 1         # each choice its own seed
    code, big = post(server.url, {**body, "seed": 2 ** 64 - 1})
    assert code == 200


def test_stop_sequences(server, engine, expected):
    p = PROMPTS[0]
    full = text_of(engine, expected[p])
    stop = full.strip()[3:6]
    for stops in (stop, ["never-printed", stop]):
        code, r = post(server.url, greedy(p, stop=stops))
        c = r["choices"][0]
        assert c["text"] == full[:full.find(stop)] and c["finish_reason"] == "stop"
    code, r = post(server.url, {"prompt": p, "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2


def test_concurrent_requests_share_steps(server, engine, expected):
    stats = server.loop.stats
    before, stats.max_batch = stats.steps, 0
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: post(server.url, greedy(p)), PROMPTS))
    assert [r["choices"][0]["text"] for _, r in replies] == [text_of(engine, expected[p]) for p in PROMPTS]
    tokens = sum(r["usage"]["completion_tokens"] for _, r in replies)
    assert stats.max_batch > 1 and stats.steps - before < tokens
    assert not engine.has_unfinished() and not engine.requests


def test_stream_equals_the_plain_answer(server, engine, expected):
    p = PROMPTS[0]
    stop = text_of(engine, expected[p]).strip()[3:6]
    events = stream(server.url, greedy(p, stop=[stop], stream_options={"include_usage": True}))
    *chunks, usage = events
    assert all(e["object"] == "text_completion" for e in events) and usage["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks) == post(server.url, greedy(p, stop=[stop]))[1][
        "choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert usage["usage"]["completion_tokens"] >= 1


def test_logprobs_and_echo(server, engine):
    ids = ids_of(engine, PROMPTS[0])
    code, r = post(server.url, {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    assert code == 200, r
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert r["choices"][0]["text"].startswith(PROMPTS[0])
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    # The generated (greedy) token is the top alternative: lm-eval's is_greedy test.
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    code, g = post(server.url, greedy(PROMPTS[0], logprobs=2))
    glp = g["choices"][0]["logprobs"]
    assert len(glp["tokens"]) == g["usage"]["completion_tokens"] - (g["choices"][0]["finish_reason"] == "stop")
    assert "".join(glp["tokens"]).startswith(g["choices"][0]["text"][:5])


# --------------------------------------------------------------------------- chat

def test_chat_without_a_template_is_a_clear_400(server):
    code, r = post(server.url, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert code == 400 and r["error"]["code"] == "no_chat_template" and "--chat-template" in r["error"]["message"]


def test_chat_with_a_template_and_streaming(server, engine, expected, monkeypatch):
    monkeypatch.setattr(server.loop.rules, "chat_template", TEMPLATE)
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": N_TOK, "temperature": 0}
    code, r = post(server.url, body, "/v1/chat/completions")
    assert code == 200 and r["object"] == "chat.completion", r
    assert r["choices"][0]["message"] == {"role": "assistant", "content": text_of(engine, expected[PROMPTS[0]])}
    events = stream(server.url, body, "/v1/chat/completions")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        r["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- bad input

TOO_LONG = list(range(3, 3 + MAX_MODEL_LEN))


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "x", "temperature": NaN}', None),
    (b"[" * 100000, None),                        # nested beyond any parser's stack
    (json.dumps({"prompt": "x", "user": {"a": [[[[[[[[[[1]]]]]]]]]]}}).encode(), "user"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": TOO_LONG, "max_tokens": 1}, "prompt"),
    ({"prompt": [5, 10 ** 9]}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": 10 ** 30}, "seed"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 1}, "presence_penalty"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_bad_requests_are_400_and_serving_goes_on(server, body, param):
    code, r = post(server.url, body)
    assert code == 400, r
    err = r["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    code, ok = post(server.url, {"prompt": "Question: 1+1?\nAnswer:", "max_tokens": 2, "temperature": 0})
    assert code == 200


def test_context_length_and_routes(server):
    code, r = post(server.url, {"prompt": TOO_LONG[:-10], "max_tokens": 20})
    assert code == 400 and r["error"]["code"] == "context_length_exceeded"
    assert get(server.url, "/nope")[0] == 404
    code, r = get(server.url, "/v1/completions")
    assert code == 405 and r["error"]["code"] == "method_not_allowed"
    code, r = post(server.url, {"prompt": "Question: 2+2?\nAnswer:", "max_tokens": 2, "seed": 1234,
                                "something_new": {"x": 1}, "echo": False, "logprobs": None})
    assert code == 200, r


def raw(server, data: bytes, timeout=10) -> bytes:
    host, port = server.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_malformed_http_gets_an_openai_400(server):
    reply = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_body_cut_short_times_out(server):
    t0 = time.monotonic()
    reply = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within" in reply
    assert time.monotonic() - t0 < 8
    # A head never finished is closed too.
    assert raw(server, b"POST /v1/completions HTTP/1.1\r\nHost:") == b""


@pytest.mark.parametrize("where", ["forward", "step"])
def test_engine_exception_is_500_and_serving_goes_on(server, engine, monkeypatch, where):
    real = getattr(engine, where)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, where, flaky)
    code, r = post(server.url, greedy(PROMPTS[0]))
    assert code == 500 and "injected failure" in r["error"]["message"] and r["error"]["type"] == "server_error"
    assert not engine.requests and len(engine.cache.free_slots) == engine.scheduler.max_num_seqs
    assert post(server.url, greedy(PROMPTS[0]))[0] == 200


def _wait(cond, seconds=20):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("streamed", [False, True])
def test_client_reset_frees_the_slot_without_a_traceback(server, engine, capfd, streamed):
    aborted = server.loop.stats.aborted
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 300, "temperature": 0, "ignore_eos": True,
                       "stream": streamed}).encode()
    s = socket.create_connection(server.sock.getsockname()[:2])
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert _wait(engine.has_unfinished)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST, not FIN
    s.close()
    assert _wait(lambda: server.loop.stats.aborted == aborted + 1)
    assert _wait(lambda: not engine.has_unfinished() and not engine.requests)
    assert len(engine.cache.free_slots) == engine.scheduler.max_num_seqs
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- the gate

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
    assert summary["n"] == 3 and summary["source"]["model"] == "tiny-gsm8k"
    recs = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["generation"] for r in recs) and not any(r["past_stop"] for r in recs)
    # The record keeps the token ids the server made of the text (no BOS, by the checkpoint's rule).
    assert all(r["prompt_token_ids"] and r["prompt_token_ids"][0] != 0 for r in recs)


def test_client_reset_mid_body_without_a_traceback(server, capfd):
    s = socket.create_connection(server.sock.getsockname()[:2])
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.3)
    assert post(server.url, {"prompt": "Question: 1+1?\nAnswer:", "max_tokens": 1})[0] == 200
    assert "Traceback" not in capfd.readouterr().err
