"""Small GSM8K-shaped data, a canned OpenAI-compatible server for the gate tests,
and the engine on the tiny trained checkpoint with HTTP helpers for the server tests.

The data is synthetic: GSM8K itself never enters the repository.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def synth_docs(n: int, offset: int = 0, tag: str = "Test") -> list[dict]:
    docs = []
    for i in range(offset, offset + n):
        a, b = i + 2, 3 * i + 1
        total = a * b * (1000 if i % 5 == 4 else 1)   # some answers need a thousands comma
        shown = f"{total:,}"
        docs.append({"question": f"{tag} {i}: Sam has {a} boxes of {b} pens.  How many pens?",
                     "answer": f"Sam has {a} * {b} = <<{a}*{b}={a*b}>>{a*b} pens.\n#### {shown}"})
    return docs


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def write_gsm8k(root: Path, n_test: int = 6, n_train: int = 12) -> tuple[Path, Path]:
    test = write_jsonl(root / "gsm8k" / "test.jsonl", synth_docs(n_test))
    train = write_jsonl(root / "gsm8k" / "train.jsonl", synth_docs(n_train, 100, "Train"))
    return test, train


def answer_of(question: str, docs: list[dict]) -> str:
    for d in docs:
        if d["question"] == question:
            return d["answer"].split("#### ")[-1]
    raise KeyError(question)


def last_question(prompt: str) -> str:
    return prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]


class CannedServer:
    """``/v1/completions`` answering ``reply(prompt) -> text``; ``/v1/models``
    lists ``model``. ``fail_first`` requests get HTTP ``fail_status``."""

    def __init__(self, reply, model: str = "canned", fail_first: int = 0, fail_status: int = 503):
        self.reply, self.model = reply, model
        self.fail_first, self.fail_status = fail_first, fail_status
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": outer.model}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append(body)
                    failing = len(outer.requests) <= outer.fail_first
                if failing:
                    self._send(outer.fail_status, {"error": "warming up"})
                    return
                if self.path != "/v1/completions":
                    self._send(404, {"error": f"no route {self.path}"})
                    return
                text = outer.reply(body["prompt"])
                self._send(200, {"object": "text_completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def numbers_in(text: str) -> list[str]:
    return re.findall(r"\d+", text)


# --------------------------------------------------------------------------- the engine's server

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gsm8k"
MAX_MODEL_LEN = 384   # short: the engine's CPU step time grows with it


def load_engine(max_num_seqs: int = 8):
    import torch

    from runners.engine import Engine

    # On a CPU shared with other jobs two OpenMP threads spin against each
    # other and a 10-token generate swings from 0.3 s to 10 s; one is steady.
    torch.set_num_threads(1)
    return Engine(CKPT, precision="fp32", max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN)


def post(url, body, path="/v1/completions", timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url, body, path="/v1/completions"):
    """The JSON events of a server-sent-events answer, up to [DONE]."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")
