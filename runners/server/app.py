"""The HTTP layer: OpenAI-compatible routes over an ``EngineLoop``.

Bodies are read here (a size cap and a read timeout: a body cut short and
held open costs a timer, not a worker) and parsed with pydantic models;
every error is OpenAI's ``{"error": {message, type, param, code}}``. A job's
events (runners/engine/serving.py) are written out either as one JSON
response or as server-sent events; a client that goes away has its job
cancelled, which frees the engine's slots at the next step.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from runners.engine.serving import Admitted, Delta, EngineLoop, Failed, Job, ServeError, bad
from runners.server.schemas import ChatRequest, CompletionRequest


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else ("service_unavailable" if status == 503
                                                          else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    if err.status in (408, 413):
        headers = {"Connection": "close"}   # the rest of the body is never read
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status,
                        headers=headers)


class _Gone(Exception):
    """The client closed its connection."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(q: asyncio.Queue, gone: asyncio.Task):
    get = asyncio.ensure_future(q.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise _Gone


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class _Shape:
    """How /v1/completions writes a job's choices."""

    kind = "cmpl"
    full_object = chunk_object = "text_completion"

    def __init__(self, return_ids: bool = False):
        self.return_ids = return_ids

    def choice(self, index, text, reason, logprobs, prompt_ids) -> dict:
        c = {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
        if self.return_ids:
            c["prompt_token_ids"] = prompt_ids
        return c

    def chunk_choice(self, d: Delta, first: bool) -> dict:
        return {"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": d.logprobs}


class _ChatShape(_Shape):
    kind = "chatcmpl"
    full_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def choice(self, index, text, reason, logprobs, prompt_ids) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": reason, "logprobs": _chat_logprobs(logprobs)}

    def chunk_choice(self, d: Delta, first: bool) -> dict:
        delta = {"role": "assistant", "content": d.text} if first else ({"content": d.text} if d.text else {})
        return {"index": d.index, "delta": delta, "finish_reason": d.finish_reason,
                "logprobs": _chat_logprobs(d.logprobs)}


def _chat_logprobs(lp: dict | None) -> dict | None:
    if lp is None:
        return None
    entry = lambda tok, v: {"token": tok, "logprob": v, "bytes": list(tok.encode("utf-8"))}  # noqa: E731
    return {"content": [dict(entry(tok, v), top_logprobs=[entry(t, x) for t, x in (top or {}).items()])
                        for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]}


def _merge_logprobs(into: dict | None, piece: dict | None) -> dict | None:
    if piece is None:
        return into
    if into is None:
        return {k: list(v) for k, v in piece.items()}
    for k, v in piece.items():
        into[k] += v
    return into


def create_app(loop: EngineLoop, model_name: str, *, read_timeout: float = 30.0,
               max_body: int = 32 << 20, max_pending: int = 256, created: int | None = None) -> FastAPI:
    app = FastAPI(title="parity engine server", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"pending": 0}
    created = created or int(time.time())

    def card() -> dict:
        rules = loop.rules
        return {"id": model_name, "object": "model", "created": created, "owned_by": "parity",
                "max_model_len": loop.max_model_len, "add_bos_token": rules.add_bos,
                "chat_template": rules.chat_template is not None}

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse(error_body(exc.status_code, msg, None, code), exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        sys.stderr.write(traceback.format_exc())
        return JSONResponse(error_body(500, f"server error: {type(exc).__name__}: {exc}"), 500)

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body:   # h11 has checked it is a number
            raise ServeError(413, f"the request body of {length} bytes exceeds {max_body} bytes")

        async def read() -> bytes:
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > max_body:
                    raise ServeError(413, f"the request body exceeds {max_body} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), read_timeout)
        except asyncio.TimeoutError:
            raise ServeError(408, f"the request body did not arrive within {read_timeout:g} s") from None
        except ClientDisconnect:   # gone mid-body: an answer nobody reads, and no traceback
            raise ServeError(499, "the client closed the connection") from None
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise bad("the request body is nested too deeply") from None
        except ValueError as exc:
            raise bad(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    def validate(model, body: dict):
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            e = exc.errors()[0]
            param = str(e["loc"][0]) if e["loc"] else None
            msg = e["msg"].removeprefix("Value error, ")
            raise bad(f"{param}: {msg}" if param else msg, param) from None
        except RecursionError:
            raise bad("the request body is nested too deeply") from None
        unsupported = req.unsupported()
        if unsupported:
            raise bad(unsupported[1], unsupported[0], "unsupported_parameter")
        return req

    async def run(request: Request, job: Job, req, shape: _Shape):
        s = job.sampling
        if s.max_tokens > loop.max_model_len - 1:
            raise bad(f"max_tokens must be in 1..{loop.max_model_len - 1}, got {s.max_tokens}", "max_tokens")
        if state["pending"] >= max_pending:
            raise ServeError(503, f"the server is busy: {state['pending']} requests in flight "
                                  f"(--max-concurrency {max_pending}); retry", code="server_busy")
        q: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        job.emit = lambda ev: aloop.call_soon_threadsafe(q.put_nowait, ev)
        loop.submit(job)
        state["pending"] += 1
        finished = set()
        released, handed_off = [], []

        def release():
            if not released:
                released.append(True)
                state["pending"] -= 1
                if len(finished) < total:
                    loop.cancel(job)

        total = 1 << 30
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            first = await _next(q, gone)
            if isinstance(first, Failed):
                release()
                return error_response(first.error)
            admitted: Admitted = first
            total = len(admitted.prompt_token_ids) * s.n
            head = {"id": f"{shape.kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
            if req.stream:
                handed_off.append(True)   # the stream releases the job from here on
                return StreamingResponse(_sse(q, shape, head, admitted, finished, total, release,
                                              req.include_usage),
                                         media_type="text/event-stream", background=_Background(release))
            texts, reasons, lps, tokens = {}, {}, {}, 0
            while len(finished) < total:
                ev = await _next(q, gone)
                if isinstance(ev, Failed):
                    finished.update(range(total))
                    return error_response(ev.error)
                texts[ev.index] = texts.get(ev.index, "") + ev.text
                lps[ev.index] = _merge_logprobs(lps.get(ev.index), ev.logprobs)
                if ev.finish_reason is not None:
                    reasons[ev.index] = ev.finish_reason
                    tokens += ev.completion_tokens
                    finished.add(ev.index)
            ids = admitted.prompt_token_ids
            choices = [shape.choice(i, texts.get(i, ""), reasons[i], lps.get(i), ids[i // s.n])
                       for i in range(total)]
            p = admitted.prompt_tokens
            return JSONResponse({**head, "object": shape.full_object, "choices": choices,
                                 "usage": {"prompt_tokens": p, "completion_tokens": tokens,
                                           "total_tokens": p + tokens}})
        except _Gone:
            return Response(status_code=499)   # nobody reads it
        finally:
            gone.cancel()
            if not handed_off:
                release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(CompletionRequest, await read_json(request))
        job = Job(req.to_sampling(), emit=None, prompts=req.prompt)
        return await run(request, job, req, _Shape(req.return_token_ids))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = validate(ChatRequest, await read_json(request))
        try:
            messages = [m.plain() for m in req.messages]
        except ValueError as exc:
            raise bad(str(exc), "messages") from None
        job = Job(req.to_sampling(), emit=None, messages=messages)
        return await run(request, job, req, _ChatShape())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ServeError(404, f"no model {model_id!r}; this server serves {model_name!r}",
                             "model", "model_not_found")
        return card()

    @app.get("/health")
    async def health():
        ok = loop.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": model_name,
                             "pending": state["pending"], **loop.load()}, 200 if ok else 503)

    return app


class _Background:
    """Starlette runs a response's background task once the stream ends,
    also when the client left mid-stream: the job is released either way."""

    def __init__(self, fn):
        self.fn = fn

    async def __call__(self):
        self.fn()


async def _sse(q, shape, head, admitted, finished, total, release, include_usage):
    def frame(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    started, tokens = set(), 0
    try:
        while len(finished) < total:
            ev = await q.get()
            if isinstance(ev, Failed):
                finished.update(range(total))
                e = error_body(ev.error.status, ev.error.message, ev.error.param, ev.error.code)
                yield frame(e)
                break
            first = ev.index not in started
            started.add(ev.index)
            if ev.finish_reason is not None:
                finished.add(ev.index)
                tokens += ev.completion_tokens
            yield frame({**head, "object": shape.chunk_object, "choices": [shape.chunk_choice(ev, first)]})
        else:
            if include_usage:
                p = admitted.prompt_tokens
                yield frame({**head, "object": shape.chunk_object, "choices": [],
                             "usage": {"prompt_tokens": p, "completion_tokens": tokens,
                                       "total_tokens": p + tokens}})
        yield "data: [DONE]\n\n"
    finally:
        release()
