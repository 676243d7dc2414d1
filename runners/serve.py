"""OpenAI-compatible completions server on this project's engine.

    python -m runners.serve --ckpt DIR [--host 127.0.0.1] [--port P]
        [--precision fp32|bf16|fp8] [--device cpu] [--max-num-seqs N]
        [--max-model-len N] [--model-name NAME] [--shutdown-grace S] [--threads N] [--quiet]

Endpoints: ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Standard library only: a ``ThreadingHTTPServer`` whose handler threads hand
their requests to one engine-loop thread. That thread owns the engine (the
engine and its tokenizer are not thread-safe) and calls ``step()`` on
whatever is running, so concurrent requests share forwards (continuous
batching): a request that arrives mid-generation joins at the next step.

``make_server(engine, host, port)`` builds a server for an engine already
loaded (tests run it in a thread); ``serve_forever(server)`` blocks until
SIGINT/SIGTERM and shuts down gracefully. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp8")
MAX_BODY_BYTES = 32 << 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields that change what is generated and that the engine cannot honour:
# accepted only at the value that means "off", refused otherwise, so a
# client never silently gets something other than what it asked for.
_OFF_VALUES = {
    "echo": (False,),
    "stream": (False,),
    "logprobs": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "top_k": (None, -1, 0),
    "min_tokens": (None, 0),
}
_OFF_HINTS = {
    "logprobs": "logprobs are not supported: this server returns generated text only "
                "(lm-eval loglikelihood tasks need them; generate_until tasks such as gsm8k do not)",
    "echo": "echo is not supported (it only serves logprob scoring, which this server does not do)",
    "stream": "streaming is not supported; send stream=false",
}


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error the client gets as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else
                              "service_unavailable" if status == 503 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# --------------------------------------------------------------------------- request parsing

@dataclass
class CompletionRequest:
    prompts: list  # each a str or a list of token ids; one choice each
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    ignore_eos: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_off(value, allowed) -> bool:
    for a in allowed:
        if a is None or isinstance(a, bool):
            if value is a:
                return True
        elif isinstance(a, (int, float)):
            if _is_number(value) and value == a:
                return True
        elif type(value) is type(a) and value == a:
            return True
    return False


def _parse_prompt(p) -> list:
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_int(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return [list(x) for x in p]
    if isinstance(p, list) and not p:
        raise _bad("prompt is an empty list", "prompt")
    raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of "
               "token-id lists", "prompt")


def parse_completion(body, max_model_len: int | None = None) -> CompletionRequest:
    """Validate a /v1/completions body; unknown fields are ignored."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("prompt") is None:
        raise _bad("prompt is required", "prompt", "missing_required_parameter")
    prompts = _parse_prompt(body["prompt"])

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")

    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad(f"only n=1 is supported, got {n!r}", "n")

    for name, allowed in _OFF_VALUES.items():
        if name in body and not _is_off(body[name], allowed):
            hint = _OFF_HINTS.get(name, f"{name}={body[name]!r} is not supported "
                                        f"(accepted: {', '.join(repr(a) for a in allowed)})")
            raise _bad(hint, name, "unsupported_parameter")

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens):
        raise _bad(f"max_tokens must be an integer, got {max_tokens!r}", "max_tokens")
    upper = max_model_len - 1 if max_model_len else None
    if max_tokens < 1 or (upper is not None and max_tokens > upper):
        rng = f"1..{upper}" if upper is not None else ">= 1"
        raise _bad(f"max_tokens must be in {rng}, got {max_tokens}", "max_tokens")

    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or temperature < 0:
        raise _bad(f"temperature must be a number >= 0, got {temperature!r}", "temperature")

    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop must be a string or a list of strings", "stop")
    if any(s == "" for s in stop):
        raise _bad("stop sequences must not be empty strings", "stop")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"seed must be an integer, got {seed!r}", "seed")

    # vLLM's extension: fixed-length generations, for benchmarks.
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")

    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")

    return CompletionRequest(prompts, max_tokens, float(temperature), float(top_p), list(stop),
                             seed, ignore_eos)


# --------------------------------------------------------------------------- engine loop

@dataclass
class Submission:
    """One HTTP request: one engine request per prompt, answered together."""

    req: CompletionRequest
    done: threading.Event = field(default_factory=threading.Event)
    choices: list = field(default_factory=list)      # dicts, index order
    prompt_tokens: list = field(default_factory=list)
    completion_tokens: list = field(default_factory=list)
    error: ApiError | None = None
    request_ids: list = field(default_factory=list)
    remaining: int = 0


@dataclass
class LoopStats:
    steps: int = 0
    max_batch: int = 0       # most sequences in one forward
    max_running: int = 0     # most engine requests in flight at once
    served: int = 0          # choices completed
    aborted: int = 0         # engine requests dropped (client gone, shutdown, errors)
    engine_errors: int = 0


_STOP = object()


class EngineLoop:
    """The one thread that touches the engine."""

    def __init__(self, engine, log=None):
        self.engine = engine
        self.stats = LoopStats()
        self._log = log or (lambda msg: None)
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[int, tuple[Submission, int]] = {}
        self._accepting = True
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.max_model_len = getattr(getattr(engine, "cache", None), "max_model_len", None)
        cfg = getattr(engine, "config", None)
        self.vocab_size = getattr(cfg, "vocab_size", None)
        eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)

    # -- called from handler threads --------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, sub: Submission) -> None:
        if not self._accepting or not self.alive:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        self._inbox.put(("add", sub))

    def cancel(self, sub: Submission) -> None:
        self._inbox.put(("cancel", sub))

    def load(self) -> dict:
        """Snapshot for /health (read without a lock: counters only)."""
        sched = getattr(self.engine, "scheduler", None)
        return {"running": len(getattr(sched, "running", ())), "waiting": len(getattr(sched, "waiting", ())),
                **self.stats.__dict__}

    def stop(self, grace: float = 0.0, hurry: threading.Event | None = None) -> None:
        """Refuse new work, let in-flight requests finish for up to ``grace``
        seconds (or until ``hurry`` is set), then fail what is left with 503."""
        self._accepting = False
        deadline = time.monotonic() + grace
        with self._idle:
            while self._live or not self._inbox.empty():
                left = deadline - time.monotonic()
                if left <= 0 or (hurry is not None and hurry.is_set()) or not self.alive:
                    break
                self._idle.wait(min(left, 0.2))
        self._inbox.put(_STOP)
        self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                busy = self.engine.has_unfinished()
                if not busy:
                    with self._idle:
                        self._idle.notify_all()
                try:
                    msg = self._inbox.get(block=not busy)
                except queue.Empty:
                    msg = None
                # Everything that arrived since the last step joins the next one.
                while msg is not None:
                    if msg is _STOP:
                        self._fail_all(ApiError(503, "the server is shutting down", code="shutting_down"),
                                       queued=True)
                        return
                    kind, sub = msg
                    if kind == "add":
                        self._admit(sub)
                    else:
                        self._drop(sub)
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if self.engine.has_unfinished():
                    self._step()
            except Exception as exc:  # the loop must outlive any one request
                self.stats.engine_errors += 1
                self._log("engine loop error:\n" + traceback.format_exc())
                self._fail_all(ApiError(500, f"engine error: {type(exc).__name__}: {exc}",
                                        code="engine_error"))

    def _admit(self, sub: Submission) -> None:
        from runners.engine.errors import ParityError
        from runners.engine.sampling import SamplingParams

        r = sub.req
        try:
            ids_list = [self.engine.encode(p) for p in r.prompts]
        except ParityError as exc:
            return self._finish_error(sub, _bad(str(exc), "prompt"))
        except Exception as exc:
            return self._finish_error(sub, ApiError(500, f"tokenizer error: {exc}", "prompt"))
        for i, ids in enumerate(ids_list):
            where = "prompt" if len(ids_list) == 1 else f"prompt[{i}]"
            if not ids:
                return self._finish_error(sub, _bad(f"{where} tokenizes to nothing", "prompt"))
            if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in ids):
                return self._finish_error(sub, _bad(f"{where} holds token ids outside "
                                                    f"[0, {self.vocab_size})", "prompt"))
            if self.max_model_len is not None and len(ids) + r.max_tokens > self.max_model_len:
                return self._finish_error(sub, _bad(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"you requested {len(ids) + r.max_tokens} tokens ({len(ids)} in {where}, "
                    f"{r.max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                    "prompt", "context_length_exceeded"))
        greedy = r.temperature == 0
        sub.choices = [None] * len(ids_list)
        sub.completion_tokens = [0] * len(ids_list)
        sub.prompt_tokens = [len(ids) for ids in ids_list]
        for i, ids in enumerate(ids_list):
            params = SamplingParams(max_new_tokens=r.max_tokens, greedy=greedy,
                                    temperature=r.temperature if not greedy else 1.0, top_p=r.top_p,
                                    stop=list(r.stop), ignore_eos=r.ignore_eos, seed=r.seed)
            try:
                rid = self.engine.add_request(ids, params)
            except ParityError as exc:
                return self._finish_error(sub, _bad(str(exc), "prompt"))
            except Exception as exc:
                self._log("add_request failed:\n" + traceback.format_exc())
                return self._finish_error(sub, ApiError(500, f"engine error: {type(exc).__name__}: {exc}",
                                                        code="engine_error"))
            sub.request_ids.append(rid)
            self._live[rid] = (sub, i)
        sub.remaining = len(ids_list)
        self.stats.max_running = max(self.stats.max_running, len(self._live))

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as exc:
            self.stats.engine_errors += 1
            self._log("engine step failed:\n" + traceback.format_exc())
            err = ApiError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")
            # The requests of the failed forward stay "running" in the
            # scheduler; retrying them would likely fail the same way, so
            # they are failed and freed, and the waiting ones carry on.
            running = [getattr(q, "request_id", None) for q in getattr(self.engine.scheduler, "running", [])]
            subs = {id(self._live[rid][0]): self._live[rid][0] for rid in running if rid in self._live}
            if not subs:  # nothing to blame: fail everything rather than loop on the error
                subs = {id(s): s for s, _ in self._live.values()}
            for sub in subs.values():
                self._finish_error(sub, err)
            return
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(outs))
        for out in outs:
            if out.finished:
                self._complete(out.request_id)

    def _release(self, rid: int):
        release = getattr(self.engine, "release", None)
        if release is not None:
            return release(rid)
        return self.engine.requests.pop(rid)

    def _abort(self, rid: int) -> None:
        try:
            self._abort_in_engine(rid)
        except Exception:  # an engine left inconsistent by an error: say so, keep going
            self._log(f"abort of request {rid} failed:\n" + traceback.format_exc())
            getattr(self.engine, "requests", {}).pop(rid, None)
        self.stats.aborted += 1

    def _abort_in_engine(self, rid: int) -> None:
        abort = getattr(self.engine, "abort_request", None)
        if abort is not None:
            abort(rid)
        else:  # engines without abort_request: take it out of the scheduler by hand
            req = self.engine.requests.get(rid)
            sched = self.engine.scheduler
            if req is not None and not req.finished:
                if req in sched.waiting:
                    sched.waiting.remove(req)
                    req.finished, req.finish_reason = True, "abort"
                elif req in sched.running:
                    sched.finish(req, "abort")
        if rid in getattr(self.engine, "requests", {}):
            self._release(rid)

    def _complete(self, rid: int) -> None:
        req = self._release(rid)
        entry = self._live.pop(rid, None)
        if entry is None:
            return
        sub, i = entry
        text, reason = self._text(req)
        sub.choices[i] = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        sub.completion_tokens[i] = len(req.output_ids)
        self.stats.served += 1
        sub.remaining -= 1
        if sub.remaining == 0:
            sub.done.set()

    def _text(self, req) -> tuple[str, str]:
        ids = list(req.output_ids)
        reason = req.finish_reason if req.finish_reason in ("stop", "length") else "stop"
        stop_ids = self.eos_ids if req.params.stop_token_ids is None else set(req.params.stop_token_ids)
        # The stop token ends the text; it is not part of it (OpenAI's rule).
        if reason == "stop" and ids and ids[-1] in stop_ids and not req.params.ignore_eos:
            ids = ids[:-1]
        text = self.engine.decode(ids)
        # Cut at the earliest stop sequence, whichever of the list it is
        # (the engine checks the list in order, which can cut later).
        cuts = [at for at in (text.find(s) for s in req.params.stop) if at >= 0]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        return text, reason

    def _finish_error(self, sub: Submission, err: ApiError) -> None:
        for rid in sub.request_ids:
            if self._live.pop(rid, None) is not None:
                self._abort(rid)
        sub.error = err
        sub.done.set()

    def _drop(self, sub: Submission) -> None:
        if not sub.done.is_set():
            self._finish_error(sub, ApiError(499, "client closed the connection", code="client_closed"))

    def _fail_all(self, err: ApiError, queued: bool = False) -> None:
        subs = {id(s): s for s, _ in self._live.values()}
        for sub in subs.values():
            self._finish_error(sub, err)
        # At shutdown, also the submissions that never reached the engine.
        while queued:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg is not _STOP and msg[0] == "add":
                self._finish_error(msg[1], err)
        with self._idle:
            self._idle.notify_all()


# --------------------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: lm-eval and the gate reuse connections
    server: "CompletionServer"

    # -- plumbing ----------------------------------------------------------------------
    def log_message(self, fmt, *args):
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: ApiError) -> None:
        self._send(err.status, err.body())

    def _route(self) -> str:
        path = urllib.parse.urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required (chunked bodies are not supported)")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise _bad(f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body of {n} bytes exceeds {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}") from None

    def _client_gone(self) -> bool:
        # A closed connection reads as EOF; a pipelined next request reads as
        # data, which is left in place for the next handle() round.
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- endpoints ----------------------------------------------------------------------
    def do_GET(self):
        route = self._route()
        if route == "/health":
            loop = self.server.loop
            ok = loop.alive and loop._accepting
            self._send(200 if ok else 503, {"status": "ok" if ok else "unavailable",
                                            "model": self.server.model_name, **loop.load()})
        elif route == "/v1/models":
            self._send(200, {"object": "list", "data": [self.server.model_card()]})
        elif route == f"/v1/models/{self.server.model_name}":
            self._send(200, self.server.model_card())
        elif route == "/v1/completions":
            self._error(ApiError(405, "use POST for /v1/completions", code="method_not_allowed"))
        else:
            self._error(ApiError(404, f"no route {route}", code="not_found"))

    def do_POST(self):
        route = self._route()
        try:
            if route != "/v1/completions":
                # The body is drained so the kept-alive connection stays in step.
                self._discard_body()
                code = 405 if route in ("/health", "/v1/models") else 404
                raise ApiError(code, f"no POST route {route}", code="not_found" if code == 404 else
                               "method_not_allowed")
            body = self._read_json()
            req = parse_completion(body, self.server.loop.max_model_len)
            self._complete(req)
        except ApiError as err:
            self._error(err)
        except Exception as exc:  # a bug here must not kill the connection silently
            sys.stderr.write(traceback.format_exc())
            self._error(ApiError(500, f"server error: {type(exc).__name__}: {exc}"))

    def _discard_body(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if 0 < n <= MAX_BODY_BYTES:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _complete(self, req: CompletionRequest) -> None:
        loop = self.server.loop
        sub = Submission(req)
        loop.submit(sub)
        while not sub.done.wait(0.1):
            if not loop.alive:
                raise ApiError(503, "the engine loop is not running", code="engine_down")
            if self._client_gone():
                # Nobody will read the answer: free the engine's slot now.
                loop.cancel(sub)
                self.close_connection = True
                return
        if sub.error is not None:
            if sub.error.status == 499:
                self.close_connection = True
                return
            raise sub.error
        p, c = sum(sub.prompt_tokens), sum(sub.completion_tokens)
        self._send(200, {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.model_name,
            "choices": sub.choices,
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        })


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, engine, host: str, port: int, model_name: str, log_requests: bool = False,
                 log=None):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.engine = engine
        self.model_name = model_name
        self.log_requests = log_requests
        self.created = int(time.time())
        self._serving = threading.Event()
        self._closed = False
        super().__init__((host, port), _Handler)
        self.loop = EngineLoop(engine, log=log).start()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for
        # seconds where DNS is unreachable; nothing here uses that name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def model_card(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "parity"}
        if self.loop.max_model_len:
            card["max_model_len"] = self.loop.max_model_len
        return card

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving.set()
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving.clear()

    def close(self, grace: float = 0.0, hurry: threading.Event | None = None) -> None:
        """Stop accepting, give in-flight requests ``grace`` seconds, then stop."""
        if self._closed:
            return
        self._closed = True
        if self._serving.is_set():
            self.shutdown()
        self.loop.stop(grace, hurry)
        self.server_close()

    def __exit__(self, *exc):
        self.close()


def make_server(engine, host: str = "127.0.0.1", port: int = 0, *, model_name: str | None = None,
                log_requests: bool = False, log=None) -> CompletionServer:
    """A server bound to (host, port) (port 0: a free one, see ``.url``) with
    its engine loop already running; call ``serve_forever()`` to answer."""
    name = model_name or Path(getattr(engine, "ckpt_dir", "model")).name or "model"
    return CompletionServer(engine, host, port, name, log_requests=log_requests,
                            log=log or (lambda msg: sys.stderr.write(msg + "\n")))


def serve_forever(server: CompletionServer, grace: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; then finish in-flight requests (up to
    ``grace`` seconds; a second signal cuts that short) and close."""
    hurry = threading.Event()
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            hurry.set()
            return
        stopping.set()
        sys.stderr.write(f"{signal.Signals(signum).name}: finishing in-flight requests "
                         f"(up to {grace:g} s; signal again to stop now)\n")
        # shutdown() waits for serve_forever to return, which runs in this
        # (main) thread: it must be called from another one.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.serve_forever()
    finally:
        server.close(grace, hurry)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runners.serve",
                                 description="OpenAI-compatible completions server on the engine.")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config, safetensors, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="sequences batched in one step")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + completion tokens per sequence (default: the engine's)")
    ap.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder)")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is steadier on a shared CPU")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        from runners.engine.errors import ParityError
    except Exception:  # pragma: no cover - the engine package itself is broken
        ParityError = ValueError  # noqa: N806
    try:
        if not Path(args.ckpt).is_dir():
            raise ParityError(f"--ckpt {args.ckpt}: no such directory")
        if args.max_num_seqs < 1:
            raise ParityError("--max-num-seqs must be >= 1")
        if args.max_model_len is not None and args.max_model_len < 2:
            raise ParityError("--max-model-len must be >= 2")
        if not 0 <= args.port <= 65535:
            raise ParityError(f"--port must be in 0..65535, got {args.port}")
        if args.threads is not None and args.threads < 1:
            raise ParityError("--threads must be >= 1")
        from runners.engine import Engine

        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)

        kwargs = {"precision": args.precision, "device": args.device, "max_num_seqs": args.max_num_seqs}
        if args.max_model_len is not None:
            kwargs["max_model_len"] = args.max_model_len
        t0 = time.monotonic()
        engine = Engine(args.ckpt, **kwargs)
        if getattr(engine, "tokenizer", None) is None:
            sys.stderr.write(f"note: {args.ckpt} has no tokenizer.json: only token-id prompts work "
                             "and texts come back empty\n")
        sys.stderr.write(f"loaded {args.ckpt} ({args.precision}, {args.device}) in "
                         f"{time.monotonic() - t0:.1f} s\n")
        try:
            server = make_server(engine, args.host, args.port, model_name=args.model_name,
                                 log_requests=not args.quiet)
        except OSError as exc:
            raise ParityError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except ParityError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"serving {server.model_name} at {server.url}", flush=True)
    serve_forever(server, grace=args.shutdown_grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
