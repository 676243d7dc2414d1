"""The server under load and at shutdown, over real HTTP on loopback: a
64-request burst, the concurrency limit, draining (in-flight requests
finish, /health and new requests get 503), the command line under SIGTERM."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gate_fixtures import CKPT, get, load_engine, post

pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (CKPT / "config.json").exists(), reason="no tiny-gsm8k checkpoint")

PROMPT = "Question: Sam has 3 boxes of 4 pens. How many pens?\nAnswer:"


@pytest.fixture(scope="module")
def engine():
    return load_engine()


def serving(engine, **kwargs):
    from runners.server.run import Serving

    return Serving(engine, **kwargs).start()


def one(srv, body, barrier=None):
    """(status, body) of one request on its own connection; the exception's
    name where the connection failed."""
    host, port = srv.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        if barrier is not None:
            barrier.wait()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    except OSError as exc:
        return type(exc).__name__, None
    finally:
        conn.close()


def test_a_burst_of_64_has_no_connection_resets(engine):
    srv = serving(engine)
    try:
        n = 64
        barrier = threading.Barrier(n)
        body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        t0 = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda i: one(srv, body, barrier), range(n)))
        assert [code for code, _ in replies] == [200] * n
        assert len({r["choices"][0]["text"] for _, r in replies}) == 1      # greedy: one answer
        assert srv.loop.stats.max_batch == engine.scheduler.max_num_seqs    # batched to the limit
        assert time.monotonic() - t0 < 120
    finally:
        srv.close()


def test_over_the_concurrency_limit_is_503_at_once(engine):
    srv = serving(engine, max_concurrency=2)
    try:
        long = {"prompt": PROMPT, "max_tokens": 25, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(one, srv, long) for _ in range(2)]
            deadline = time.monotonic() + 20
            while get(srv.url, "/health")[1]["pending"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            code, r = post(srv.url, {"prompt": PROMPT, "max_tokens": 1})
            assert code == 503 and r["error"]["code"] == "server_busy"
            assert [f.result()[0] for f in busy] == [200, 200]
    finally:
        srv.close()


def test_draining_answers_health_503_and_lets_requests_finish(engine):
    srv = serving(engine, grace=30)
    with ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(one, srv, {"prompt": PROMPT, "max_tokens": 25, "temperature": 0,
                                          "ignore_eos": True})
        deadline = time.monotonic() + 20
        while not engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.server.drain()                      # what SIGTERM does
        code, health = get(srv.url, "/health")  # the socket still listens
        assert code == 503 and health["status"] == "unavailable"
        code, r = post(srv.url, {"prompt": PROMPT, "max_tokens": 1})
        assert code == 503 and r["error"]["code"] == "shutting_down"
        code, r = inflight.result()
        assert code == 200 and r["usage"]["completion_tokens"] == 25
    srv._thread.join(timeout=30)
    assert not srv._thread.is_alive()


def test_command_line_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "runners.serve", "--ckpt", str(CKPT), "--port", "0",
                             "--max-model-len", "384", "--threads", "1", "--quiet", "--shutdown-grace", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=CKPT.parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny-gsm8k at http://127.0.0.1:"), line
        url = line.split()[-1]

        def long():
            return post(url, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True})

        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(long)
            deadline = time.monotonic() + 20
            while get(url, "/health")[1]["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while get(url, "/health")[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert get(url, "/health")[0] == 503
            code, r = inflight.result()
        assert code == 200 and r["usage"]["completion_tokens"] == 20
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "SIGTERM: finishing in-flight requests" in err and "Traceback" not in err
        assert proc.stdout.read() == ""   # the URL line is all stdout carries
    finally:
        if proc.poll() is None:
            proc.kill()


def test_command_line_bad_input_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runners.serve", "--ckpt", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=CKPT.parents[1])
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
