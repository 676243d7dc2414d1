"""Running the app under uvicorn: the socket, the limits, and shutdown.

Shutdown drains rather than closes: on SIGINT/SIGTERM the socket keeps
listening, ``/health`` answers 503 and new requests get 503, in-flight
ones have ``grace`` seconds to finish, then what is left is answered 503
and the process exits. (uvicorn's own shutdown closes the socket first,
so a load balancer probing ``/health`` would see refused connections.)
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from runners.engine.prompts import PromptRules
from runners.engine.serving import EngineLoop
from runners.server.app import create_app, error_body

DEFAULTS = {"backlog": 2048, "max_concurrency": 256, "read_timeout": 30.0, "grace": 30.0}


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with two changes: malformed HTTP (a negative
    Content-Length, say) gets an OpenAI-style body, and a connection that
    has not sent a whole request head within the read timeout is closed."""

    read_timeout = DEFAULTS["read_timeout"]

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_timeout)

    def _head_timeout(self):
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc):
        self._head_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps(error_body(400, f"malformed HTTP request: {msg}", None, "bad_http")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:   # a response was already under way
            pass
        self.transport.close()


class EngineServer(uvicorn.Server):
    """A uvicorn server whose engine loop drains before the socket closes."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop, grace: float, announce=None):
        super().__init__(config)
        self.engine_loop, self.grace, self.announce = loop, grace, announce
        self._hurry = threading.Event()
        self._draining = False

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.announce is not None:
            self.announce()

    def handle_exit(self, sig, frame):   # signal handler: SIGINT/SIGTERM
        if self._draining:
            self._hurry.set()
            return
        sys.stderr.write(f"{signal.Signals(sig).name}: finishing in-flight requests (up to "
                         f"{self.grace:g} s; signal again to stop now)\n")
        self.drain()

    def drain(self, grace: float | None = None) -> None:
        """Stop taking work, let in-flight requests finish, then exit."""
        if self._draining:
            return
        self._draining = True
        self.engine_loop.drain()
        grace = self.grace if grace is None else grace

        def wait_then_exit():
            self.engine_loop.wait_idle(grace, self._hurry)
            self.engine_loop.stop()          # what is left is answered 503
            self.should_exit = True

        threading.Thread(target=wait_then_exit, name="drain", daemon=True).start()


def bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_config() -> dict:
    """uvicorn's logging, all of it on stderr: stdout carries only the URL line."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    for handler in cfg["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return cfg


class Serving:
    """An engine served on (host, port): ``run()`` blocks (the command line),
    ``start()`` serves from a thread (tests, notebooks); ``url`` is known
    once bound, port 0 picking a free one."""

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 0, *, model_name: str | None = None,
                 chat_template: str | None = None, backlog: int = DEFAULTS["backlog"],
                 max_concurrency: int = DEFAULTS["max_concurrency"],
                 read_timeout: float = DEFAULTS["read_timeout"], grace: float = DEFAULTS["grace"],
                 log_requests: bool = False, log=None):
        self.engine = engine
        self.model_name = model_name or Path(engine.ckpt_dir).name or "model"
        rules = PromptRules.for_checkpoint(engine.ckpt_dir, engine.tokenizer, chat_template,
                                           "--chat-template" if chat_template else None)
        self.loop = EngineLoop(engine, rules, log=log or (lambda msg: sys.stderr.write(msg + "\n")))
        self.sock = bind(host, port, backlog)
        self.url = url_of(self.sock)
        app = create_app(self.loop, self.model_name, read_timeout=read_timeout, max_pending=max_concurrency)
        protocol = type("Protocol", (_Protocol,), {"read_timeout": read_timeout})
        # Connections beyond this get uvicorn's 503 at once; the slack over
        # max_concurrency keeps /health reachable when requests fill the limit.
        config = uvicorn.Config(app, http=protocol, lifespan="off", access_log=log_requests, backlog=backlog,
                                log_config=_log_config(),
                                log_level="info" if log_requests else "warning",
                                limit_concurrency=max_concurrency + 32, timeout_keep_alive=max(5, int(read_timeout)),
                                timeout_graceful_shutdown=5)
        self.server = EngineServer(config, self.loop, grace)
        self._thread: threading.Thread | None = None

    def run(self, announce=None) -> None:
        self.server.announce = announce
        self.loop.start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.loop.stop()
            self.sock.close()

    def start(self) -> "Serving":
        self.loop.start()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                        name="uvicorn", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.01)
        return self

    def close(self, grace: float = 0.0, wait: bool = True) -> None:
        """Drain (``grace`` seconds for in-flight requests) and stop."""
        self.server.drain(grace)
        if wait and self._thread is not None:
            self._thread.join(timeout=grace + 30)
            self.sock.close()
