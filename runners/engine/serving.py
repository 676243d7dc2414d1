"""The engine loop a server runs: one thread that owns the engine.

The engine and its tokenizer are not thread-safe, so one thread tokenizes,
admits, steps and detokenizes; HTTP handlers only submit jobs and read the
events a job emits. Before every step the loop takes in whatever arrived
since the previous one, so a request that comes in mid-generation joins
the next forward (continuous batching; the engine's scheduler decides
admission, chunked prefill and the token budget).

A job's events, in order: ``Admitted`` (or ``Failed``), then ``Delta``s per
choice (text that can no longer change, logprobs), the last of each choice
carrying its ``finish_reason``. Streaming and plain responses are two ways
of writing out the same events.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from runners.engine import metadata
from runners.engine.errors import ParityError
from runners.engine.prompts import PromptRules
from runners.engine.sampling import SamplingParams

MAX_LOGPROBS = 20
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed takes


class ServeError(Exception):
    """An error a client gets; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    return ServeError(400, message, param, code)


SHUTTING_DOWN = ServeError(503, "the server is shutting down", code="shutting_down")


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None      # top alternatives per token; None: no logprobs
    echo: bool = False


@dataclass
class Job:
    """One HTTP request. ``prompts`` are strings or token-id lists; a chat
    request gives ``messages`` instead, rendered by the checkpoint's template."""

    sampling: Sampling
    emit: Callable[[object], None]
    prompts: list = field(default_factory=list)
    messages: list[dict] | None = None


@dataclass
class Admitted:
    prompt_tokens: int
    prompt_token_ids: list[list[int]]


@dataclass
class Delta:
    index: int
    text: str
    logprobs: dict | None = None     # OpenAI's completions shape, for this piece
    finish_reason: str | None = None
    completion_tokens: int = 0       # set on the last delta of a choice


@dataclass
class Failed:
    error: ServeError


@dataclass
class LoopStats:
    steps: int = 0
    max_batch: int = 0       # most sequences in one forward
    max_running: int = 0     # most choices in flight at once
    served: int = 0          # choices completed
    aborted: int = 0         # choices dropped (client gone, shutdown, errors)
    engine_errors: int = 0


@dataclass
class _Choice:
    job: Job
    index: int
    rid: int
    echo_text: str = ""
    echo_logprobs: dict | None = None
    sent: int = 0                    # characters of the completion already emitted
    n_lp: int = 0                    # generated tokens whose logprobs were emitted
    lp: dict = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                              "text_offset": []})
    started: bool = False


def _empty_lp() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


_STOP = object()


class EngineLoop:
    def __init__(self, engine, rules: PromptRules | None = None, log=None):
        self.engine = engine
        self.rules = rules or PromptRules.for_checkpoint(engine.ckpt_dir, engine.tokenizer)
        self.stats = LoopStats()
        self.max_model_len = engine.cache.max_model_len
        self.vocab_size = engine.config.vocab_size
        eos = engine.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos)
        self._log = log or (lambda msg: None)
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[int, _Choice] = {}
        self._jobs: dict[int, list[_Choice]] = {}     # id(job) -> its choices
        self._deferred: list[Job] = []                # echo+logprobs jobs waiting for a free slot
        self._accepting = True
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- any thread -------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise SHUTTING_DOWN
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def load(self) -> dict:
        """A snapshot for /health (counters only, read without a lock)."""
        sched = self.engine.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting), **self.stats.__dict__}

    def drain(self) -> None:
        """Refuse new jobs; those in flight go on."""
        self._accepting = False

    def wait_idle(self, timeout: float, hurry: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._jobs or self._deferred or not self._inbox.empty():
                left = deadline - time.monotonic()
                if left <= 0 or (hurry is not None and hurry.is_set()) or not self.alive:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        """Fail whatever is left with 503 and end the thread."""
        self._accepting = False
        if self.alive:
            self._inbox.put(_STOP)
            self._thread.join(timeout=30)

    # -- the loop thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                busy = self.engine.has_unfinished() or bool(self._deferred)
                if not busy:
                    with self._idle:
                        self._idle.notify_all()
                try:
                    if self.engine.has_unfinished():
                        msg = self._inbox.get_nowait()
                    else:  # deferred jobs wait for a slot that only a finished request frees
                        msg = self._inbox.get(timeout=0.05 if self._deferred else None)
                except queue.Empty:
                    msg = None
                while msg is not None:
                    if msg is _STOP:
                        self._fail_all(SHUTTING_DOWN, queued=True)
                        return
                    kind, job = msg
                    if kind == "add":
                        self._admit(job)
                    else:
                        self._drop(job)
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if self._deferred:
                    waiting, self._deferred = self._deferred, []
                    for job in waiting:
                        self._admit(job)
                if self.engine.has_unfinished():
                    self._step()
            except Exception as exc:  # the loop must outlive any one request
                self.stats.engine_errors += 1
                self._log("engine loop error:\n" + traceback.format_exc())
                self._fail_all(ServeError(500, f"engine error: {type(exc).__name__}: {exc}",
                                          code="engine_error"))

    def _emit(self, job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiving side is gone (its event loop closed)
            pass

    # -- admission ------------------------------------------------------------------
    def _tokenize(self, job: Job) -> list[list[int]]:
        prompts = job.prompts
        if job.messages is not None:
            try:
                prompts = [self.rules.render_chat(job.messages)]
            except ParityError as exc:
                raise bad(str(exc), "messages", "no_chat_template") from None
            except Exception as exc:  # a template that raises on these messages
                raise bad(f"the chat template cannot render these messages: {exc}", "messages") from None
        try:
            ids_list = [self.rules.encode(p) for p in prompts]
        except ParityError as exc:
            raise bad(str(exc), "prompt") from None
        s = job.sampling
        for i, ids in enumerate(ids_list):
            where = "prompt" if len(ids_list) == 1 else f"prompt[{i}]"
            if not ids:
                raise bad(f"{where} is empty (it tokenizes to no tokens)", "prompt")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise bad(f"{where} holds token ids outside [0, {self.vocab_size})", "prompt")
            if len(ids) + s.max_tokens > self.max_model_len:
                raise bad(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                          f"you requested {len(ids) + s.max_tokens} tokens ({len(ids)} in {where}, "
                          f"{s.max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                          "prompt", "context_length_exceeded")
        return ids_list

    def _admit(self, job: Job) -> None:
        s = job.sampling
        try:
            ids_list = self._tokenize(job)
        except ServeError as err:
            return self._emit(job, Failed(err))
        scored = None
        if s.echo and s.logprobs is not None:
            # Prompt logprobs need a forward of their own, in a free slot.
            if not all(self.engine.cache.can_admit(len(ids)) for ids in ids_list):
                self._deferred.append(job)
                return
            scored = [self._prompt_logprobs(ids, s.logprobs) for ids in ids_list]
        choices = []
        try:
            for i, ids in enumerate(ids_list):
                for j in range(s.n):
                    seed = None if s.seed is None else s.seed + j
                    if seed is not None and seed > SEED_RANGE[1]:
                        seed -= 2 ** 64
                    params = SamplingParams(max_new_tokens=s.max_tokens, greedy=s.temperature == 0,
                                            temperature=s.temperature or 1.0, top_p=s.top_p,
                                            stop=list(s.stop), ignore_eos=s.ignore_eos, seed=seed)
                    rid = self.engine.add_request(ids, params)
                    c = _Choice(job, i * s.n + j, rid)
                    if s.echo:
                        p = job.prompts[i]
                        c.echo_text = p if isinstance(p, str) else self.engine.decode(ids)
                        c.echo_logprobs = scored[i] if scored else None
                    choices.append(c)
                    self._live[rid] = c
        except Exception as exc:
            for c in choices:
                self._abort(c)
            err = bad(str(exc), "prompt") if isinstance(exc, ParityError) else \
                ServeError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")
            return self._emit(job, Failed(err))
        self._jobs[id(job)] = choices
        self.stats.max_running = max(self.stats.max_running, len(self._live))
        self._emit(job, Admitted(sum(len(ids) for ids in ids_list), ids_list))

    def _prompt_logprobs(self, ids: list[int], k: int) -> dict:
        """Logprobs of every prompt token given the ones before it (the first
        has none), from one forward in a slot taken and given back here."""
        eng, cm = self.engine, self.engine.cache
        sid = eng.scheduler.next_id()
        cm.allocate(sid)
        try:
            cm.ensure(sid, len(ids))
            chunk = metadata.SeqChunk(sid, cm.slot_of[sid], 0, list(ids), cm.blocks_of[sid])
            logp = torch.log_softmax(eng.forward([chunk], phase="prefill", step=0, all_logits=True), -1)
        finally:
            cm.free(sid)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for t, tok in enumerate(ids):
            piece = self.engine.decode([tok])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if t == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(float(logp[t - 1, tok]))
                out["top_logprobs"].append(self._top(logp[t - 1], k))
        return out

    def _top(self, logp: torch.Tensor, k: int) -> dict:
        if k <= 0:
            return {}
        vals, idx = logp.topk(min(k, logp.numel()))
        return {self.engine.decode([int(i)]): float(v) for v, i in zip(vals, idx)}

    # -- stepping ---------------------------------------------------------------------
    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as exc:
            self.stats.engine_errors += 1
            self._log("engine step failed:\n" + traceback.format_exc())
            err = ServeError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")
            # The requests of the failed forward stay "running"; retrying them
            # would likely fail the same way, so their jobs fail and the
            # waiting ones carry on.
            running = [q.request_id for q in self.engine.scheduler.running]
            jobs = {id(self._live[r].job): self._live[r].job for r in running if r in self._live}
            if not jobs:  # nothing to blame: fail everything rather than loop on the error
                jobs = {id(c.job): c.job for c in self._live.values()}
            for job in jobs.values():
                self._finish_error(job, err)
            return
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(outs))
        logits = getattr(self.engine, "last_logits", None)
        for row, out in enumerate(outs):
            c = self._live.get(out.request_id)
            if c is None or out.new_token is None:
                continue
            if c.job.sampling.logprobs is not None and logits is not None:
                logp = torch.log_softmax(logits[row].float(), -1)
                c.lp["tokens"].append(self.engine.decode([out.new_token]))
                c.lp["token_logprobs"].append(float(logp[out.new_token]))
                c.lp["top_logprobs"].append(self._top(logp, c.job.sampling.logprobs))
            self._advance(c, self.engine.get_request(out.request_id))

    def _advance(self, c: _Choice, req) -> None:
        """Emit what of the choice's text can no longer change."""
        s = c.job.sampling
        ids = list(req.output_ids)
        reason = None
        if req.finished:
            reason = req.finish_reason if req.finish_reason in ("stop", "length") else "stop"
            stop_ids = self.eos_ids if req.params.stop_token_ids is None else set(req.params.stop_token_ids)
            # The stop token ends the text; it is not part of it (OpenAI's rule).
            if reason == "stop" and ids and ids[-1] in stop_ids and not s.ignore_eos:
                ids = ids[:-1]
                if c.lp["tokens"]:
                    for v in c.lp.values():
                        v.pop()
        text = self.engine.decode(ids)
        # The earliest stop sequence ends the text, whichever of the list it
        # is (the engine checks the list in order, which can cut later).
        cuts = [at for at in (text.find(x) for x in s.stop) if at >= 0]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        if reason is None:
            # Held back: the start of a stop sequence, and a character whose
            # bytes have not all arrived.
            hold = max((len(x) for x in s.stop), default=1) - 1
            text = text[:len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        piece = text[c.sent:] if len(text) > c.sent else ""
        lp = None
        if s.logprobs is not None:
            lp = _empty_lp()
            if not c.started and c.echo_logprobs is not None:
                for k in lp:
                    lp[k] += c.echo_logprobs[k]
            base = len(c.echo_text)
            for k in ("tokens", "token_logprobs", "top_logprobs"):
                lp[k] += c.lp[k]
            offsets, at = [], base + len(self.engine.decode(req.output_ids[:c.n_lp]))
            c.n_lp += len(c.lp["tokens"])
            for tok in c.lp["tokens"]:
                offsets.append(at)
                at += len(tok)
            lp["text_offset"] += offsets
            c.lp = _empty_lp()
        if not c.started and c.echo_text:
            piece = c.echo_text + piece
        if reason is not None:   # freed before the client hears of it
            self._retire(c, served=True)
        if piece or reason is not None or (lp and lp["tokens"]):
            c.started = True
            c.sent = max(c.sent, len(text))
            self._emit(c.job, Delta(c.index, piece, lp, reason, len(req.output_ids) if reason else 0))

    def _retire(self, c: _Choice, served: bool) -> None:
        self._live.pop(c.rid, None)
        if c.rid in self.engine.requests:
            self.engine.release(c.rid)
        choices = self._jobs.get(id(c.job))
        if choices is not None:
            choices.remove(c)
            if not choices:
                del self._jobs[id(c.job)]
        if served:
            self.stats.served += 1

    def _abort(self, c: _Choice) -> None:
        try:
            self.engine.abort_request(c.rid)
        except Exception:  # an engine left inconsistent by an error: say so, keep going
            self._log(f"abort of request {c.rid} failed:\n" + traceback.format_exc())
        self.stats.aborted += 1
        self._retire(c, served=False)

    def _finish_error(self, job: Job, err: ServeError) -> None:
        for c in list(self._jobs.get(id(job), ())):
            self._abort(c)
        self._emit(job, Failed(err))

    def _drop(self, job: Job) -> None:
        if job in self._deferred:
            self._deferred.remove(job)
        for c in list(self._jobs.get(id(job), ())):
            self._abort(c)

    def _fail_all(self, err: ServeError, queued: bool = False) -> None:
        for job in {id(c.job): c.job for c in self._live.values()}.values():
            self._finish_error(job, err)
        for job in self._deferred:
            self._emit(job, Failed(err))
        self._deferred = []
        # At shutdown, also the jobs that never reached the engine.
        while queued:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg is not _STOP and msg[0] == "add":
                self._emit(msg[1], Failed(err))
        with self._idle:
            self._idle.notify_all()
