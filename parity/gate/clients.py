"""Where a gate run's answers come from.

- ``EndpointSource``: any OpenAI-compatible ``/v1/completions`` server,
  standard library only (urllib + a thread pool), with retries.
- ``EngineSource`` / ``ReferenceSource``: an engine and a reference run in
  process, by the sources an installed package declares (entry point group
  ``parity.gate_sources``); parity knows no engine of its own.
- ``load_lm_eval``: results (and per-sample logs) that lm-eval already
  computed.

A source only produces raw generations; cutting at stop sequences and
scoring live in ``parity.gate.run`` so every source is treated the same.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from parity.errors import ParityError


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr; on a non-terminal (CI logs) it redraws rarely
    so the log is not flooded with carriage-return frames."""
    from tqdm import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled,
                mininterval=0.5 if tty else 10.0, dynamic_ncols=True, leave=tty)


@dataclass
class Answer:
    text: str
    prompt_token_ids: list[int] | None = None   # what the model saw, where the source tells


class AnswerSource:
    """Produces one greedy generation per prompt, handing each to ``on_done``
    (index, Answer) as soon as it is there, so a run that dies keeps them."""

    kind = "source"

    def describe(self) -> dict:
        return {"kind": self.kind}

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str],
                 on_done: Callable[[int, Answer], None], progress: bool = True) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- endpoint

class _Retryable(Exception):
    pass


def completions_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base or the full completions URL."""
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if not parsed.netloc:
        raise ParityError(f"--endpoint {url!r} is not a URL")
    path = parsed.path.rstrip("/")
    if path.endswith("/completions"):
        pass
    elif path.endswith("/v1"):
        path += "/completions"
    else:
        path += "/v1/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def models_url(completions: str) -> str:
    base = completions[: -len("/completions")]
    return base + "/models"


class EndpointSource(AnswerSource):
    """Greedy completions from an OpenAI-compatible server.

    The request body is the one lm-eval's ``local-completions`` model sends
    for this task (prompt, model, max_tokens, temperature 0, stop, seed), one
    prompt per request so that the server's batching cannot reorder anything
    the gate sees.
    """

    kind = "endpoint"
    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, url: str, model: str | None = None, *, concurrency: int = 8,
                 timeout: float = 300.0, retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, seed: int = 1234, api_key: str | None = None):
        if concurrency < 1:
            raise ParityError(f"--concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ParityError(f"--retries must be >= 0, got {retries}")
        self.url = completions_url(url)
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.seed = seed
        self.api_key = api_key
        # Set when one request has failed for good: requests still queued or
        # retrying give up instead of hammering a dead server.
        self._abort = threading.Event()

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "model": self.model,
                "concurrency": self.concurrency}

    # -- HTTP ------------------------------------------------------------------

    def _request(self, url: str, payload: dict | None) -> dict:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers,
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace").strip()
            if exc.code in self.RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code} {detail}") from None
            raise ParityError(f"{url} answered HTTP {exc.code}: {detail or exc.reason}") from None
        except urllib.error.URLError as exc:
            raise _Retryable(f"{exc.reason}") from None
        except (socket.timeout, TimeoutError):
            raise _Retryable(f"no answer within {self.timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable(str(exc) or type(exc).__name__) from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise ParityError(f"{url} did not answer JSON: {body[:200]!r}") from None

    def _with_retries(self, url: str, payload: dict | None) -> dict:
        t0 = time.monotonic()
        delay = self.backoff
        last = "not attempted"
        for attempt in range(self.retries + 1):
            if self._abort.is_set():
                raise ParityError(f"endpoint {url}: run aborted after an earlier request failed")
            try:
                return self._request(url, payload)
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.retries:
                    break
                self._abort.wait(delay)
                delay = min(delay * 2, self.max_backoff)
        raise ParityError(f"endpoint {url} failed after {self.retries + 1} attempts over "
                          f"{time.monotonic() - t0:.1f} s (last error: {last}); is the server "
                          "running and reachable?")

    def resolve_model(self) -> str:
        """The served model's name, from ``/v1/models`` when not given."""
        if self.model:
            return self.model
        url = models_url(self.url)
        reply = self._with_retries(url, None)
        try:
            self.model = str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ParityError(f"{url} lists no model; pass --model NAME") from None
        return self.model

    def complete(self, prompt: str, max_new_tokens: int, stop: Sequence[str]) -> Answer:
        # return_token_ids (vLLM's extension, ignored by servers without it)
        # brings back the token ids the server made of the text.
        payload = {"model": self.resolve_model(), "prompt": prompt, "max_tokens": max_new_tokens,
                   "temperature": 0.0, "stop": list(stop), "seed": self.seed, "return_token_ids": True}
        reply = self._with_retries(self.url, payload)
        try:
            choices = reply["choices"]
            choice = min(choices, key=lambda c: c.get("index", 0)) if len(choices) > 1 else choices[0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ParityError(f"{self.url} answered without choices[0].text: "
                              f"{json.dumps(reply)[:200]}") from None
        if not isinstance(text, str):
            raise ParityError(f"{self.url} answered a non-string text: {text!r:.100}")
        ids = choice.get("prompt_token_ids")
        ok = isinstance(ids, list) and all(isinstance(t, int) for t in ids)
        return Answer(text, list(ids) if ok else None)

    def generate(self, prompts, *, max_new_tokens, stop, on_done, progress=True):
        if not prompts:
            return
        self._abort.clear()
        self.resolve_model()
        with progress_bar(len(prompts), "gsm8k endpoint", progress) as bar:
            # One request alone first: a server that is down fails once, with
            # one clear message, instead of N times in parallel.
            on_done(0, self.complete(prompts[0], max_new_tokens, stop))
            bar.update(1)
            if len(prompts) == 1:
                return
            pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="gate")
            try:
                futs = {pool.submit(self.complete, p, max_new_tokens, stop): i
                        for i, p in enumerate(prompts) if i > 0}
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    failed = None
                    for f in done:
                        try:
                            on_done(futs[f], f.result())
                        except BaseException as exc:
                            self._abort.set()
                            failed = failed or exc
                            continue
                        bar.update(1)
                    if failed is not None:
                        # Requests already in flight still finish (and are
                        # kept); only the queued ones are dropped.
                        for f in pending:
                            f.cancel()
                        for f in wait(pending).done:
                            if not f.cancelled() and f.exception() is None:
                                on_done(futs[f], f.result())
                        raise failed
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- in-process

# Installed packages declare their in-process sources under this entry point
# group: name -> factory(ckpt, *, precision, device) returning
# run(prompts, *, max_new_tokens, stop) -> [(text, prompt token ids or None)].
# This repository's engine declares "engine" and "reference".
SOURCES_GROUP = "parity.gate_sources"


def _plugin(name: str, flag: str):
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=SOURCES_GROUP)}
    if name not in eps:
        raise ParityError(f"{flag} needs an in-process {name!r} answer source, and no installed package declares "
                          f"one (entry point group {SOURCES_GROUP}); serve the model and give --endpoint instead")
    try:
        return eps[name].load()
    except Exception as exc:  # noqa: BLE001 - the declaring package is broken, not the user's input
        raise ParityError(f"{flag}: the {name!r} answer source ({eps[name].value}) could not load: "
                          f"{type(exc).__name__}: {exc}") from None


def _batched(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield i, seq[i:i + n]


class InProcessSource(AnswerSource):
    """A model run in this process by the source an installed package declares."""

    kind = "engine"
    batch = 16

    def __init__(self, ckpt: str, precision: str | None = None, batch_size: int | None = None,
                 device: str | None = None):
        if not Path(ckpt).exists():
            raise ParityError(f"--{self.kind} {ckpt}: no such checkpoint")
        self.ckpt, self.precision, self.device = ckpt, precision, device
        self.batch_size = max(1, batch_size or self.batch)
        self._run = None

    def describe(self):
        return {"kind": self.kind, "ckpt": str(self.ckpt), "precision": self.precision,
                "device": self.device}

    def generate(self, prompts, *, max_new_tokens, stop, on_done, progress=True):
        if self._run is None:
            factory = _plugin(self.kind, f"--{self.kind}")
            try:
                self._run = factory(self.ckpt, precision=self.precision, device=self.device)
            except ImportError as exc:
                raise ParityError(f"--{self.kind} needs the {self.kind}'s own packages, which cannot be imported "
                                  f"here: {exc}") from None
        with progress_bar(len(prompts), f"gsm8k {self.kind}", progress) as bar:
            for start, chunk in _batched(list(prompts), self.batch_size):
                outs = self._run(list(chunk), max_new_tokens=max_new_tokens, stop=list(stop))
                if len(outs) != len(chunk):
                    raise ParityError(f"the {self.kind} source returned {len(outs)} answers for {len(chunk)} prompts")
                for k, (text, ids) in enumerate(outs):
                    on_done(start + k, Answer(text, list(ids) if ids is not None else None))
                bar.update(len(chunk))


class EngineSource(InProcessSource):
    """The installed engine's source (``--engine``), batched."""

    kind, batch = "engine", 16


class ReferenceSource(InProcessSource):
    """The installed reference's source (``--reference``), one prompt at a time."""

    kind, batch = "reference", 1

    def __init__(self, ckpt: str, precision: str | None = None, device: str | None = None):
        super().__init__(ckpt, precision, None, device)


# --------------------------------------------------------------------------- lm-eval

@dataclass
class LmEvalRun:
    """What an lm-eval run reported for gsm8k."""

    task: str
    accuracy: dict[str, tuple[float, float]]   # filter -> (acc, stderr)
    n: int | None
    num_fewshot: int | None
    lm_eval_version: str | None
    model: dict | None
    samples: list[dict] = field(default_factory=list)  # one per doc, see _parse_samples
    results_path: str | None = None
    samples_path: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise ParityError(f"{what}: {p} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParityError(f"{what}: {p} is not JSON: {exc}") from None


def _pick_task(results: dict, path) -> str:
    if "gsm8k" in results:
        return "gsm8k"
    cands = [k for k, v in results.items()
             if isinstance(v, dict) and "exact_match,strict-match" in v]
    if len(cands) == 1:
        return cands[0]
    raise ParityError(f"--lm-eval-results {path}: no single gsm8k task among "
                      f"{', '.join(sorted(results)) or 'no tasks'}")


def _number(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _first_text(resps):
    # lm-eval logs resps as [[text]] (one list per request, one entry per repeat).
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else ""


def _parse_samples(path: str | Path) -> list[dict]:
    """One entry per document from lm-eval's samples jsonl (which holds one
    line per document and filter)."""
    p = Path(path)
    if not p.is_file():
        raise ParityError(f"lm-eval samples: {p} does not exist")
    docs: dict[int, dict] = {}
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
                doc_id = int(s["doc_id"])
                filt = s["filter"]
                doc = s["doc"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ParityError(f"lm-eval samples: {p}:{lineno} is not an lm-eval sample record "
                                  "(needs doc_id, doc, filter)") from None
            if not isinstance(doc, dict) or "question" not in doc or "answer" not in doc:
                raise ParityError(f"lm-eval samples: {p}:{lineno} is not a gsm8k document")
            e = docs.setdefault(doc_id, {"doc_id": doc_id, "question": doc["question"],
                                         "answer": doc["answer"],
                                         "generation": _first_text(s.get("resps")),
                                         "prompt_hash": s.get("prompt_hash"),
                                         "prompt": None, "lm_eval": {}})
            args = s.get("arguments")
            if isinstance(args, dict) and e["prompt"] is None:
                e["prompt"] = (args.get("gen_args_0") or {}).get("arg_0")
            filtered = s.get("filtered_resps")
            e["lm_eval"][filt] = {"answer": _first_text(filtered) if isinstance(filtered, list) else filtered,
                                  "exact_match": _number(s.get("exact_match"))}
    if not docs:
        raise ParityError(f"lm-eval samples: {p} holds no samples")
    return [docs[k] for k in sorted(docs)]


def find_lm_eval_files(path: str | Path, samples: str | Path | None = None) -> tuple[Path, Path | None, list[str]]:
    """The results file (and the samples file of the same run) that
    ``path`` names: a results_*.json, or an lm-eval --output_path folder,
    searched below for results_<date>.json (the newest when there are
    several; a note says so) and samples_gsm8k_<same date>.jsonl next to it."""
    p = Path(path)
    notes: list[str] = []
    if p.is_dir():
        found = sorted(p.rglob("results_*.json"), key=lambda f: (f.name, str(f)))
        if not found:
            raise ParityError(f"--lm-eval-results {p}: no results_*.json below this folder "
                              "(is it lm-eval's --output_path?)")
        results = found[-1]
        if len(found) > 1:
            notes.append(f"{len(found)} lm-eval runs below {p}; judged the newest, {results}")
    elif p.is_file():
        results = p
    else:
        raise ParityError(f"--lm-eval-results: {p} does not exist")
    if samples is None and p.is_dir():
        stamp = results.stem[len("results_"):]
        match = sorted(results.parent.glob(f"samples_*_{stamp}.jsonl"))
        if len(match) == 1:
            samples = match[0]
        elif not match:
            notes.append(f"no samples_*_{stamp}.jsonl next to {results.name} (run lm-eval with "
                         "--log_samples for per-question records)")
        else:
            raise ParityError(f"--lm-eval-results {p}: several samples files for {results.name}: "
                              f"{', '.join(m.name for m in match)}; pass --lm-eval-samples FILE")
    return results, None if samples is None else Path(samples), notes


def _samples_hash(path: Path) -> str | None:
    """lm-eval's task hash of a samples file (sha256 over doc, prompt and
    target hashes, in file order), or None when a line lacks them."""
    import hashlib

    parts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    rec = json.loads(line)
                    parts.append(rec["doc_hash"] + rec["prompt_hash"] + rec["target_hash"])
                except (ValueError, KeyError, TypeError):
                    return None
    return hashlib.sha256("".join(parts).encode("utf-8")).hexdigest()


def parse_model_args(args) -> dict:
    """lm-eval's ``--model_args`` ("k=v,k=v" or already a dict)."""
    if isinstance(args, dict):
        return {str(k): v for k, v in args.items()}
    out = {}
    for part in str(args or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def tokenization_notes(model: dict | None) -> list[str]:
    """Warnings for lm-eval runs that sent token ids made by another BOS rule
    than the checkpoint's: local-completions tokenizes itself with a
    Hugging Face tokenizer (add_special_tokens = its add_bos_token, False by
    default), whatever the checkpoint's tokenizer_config.json says."""
    if not model or model.get("model") not in ("local-completions", "openai-completions"):
        return []
    args = parse_model_args(model.get("model_args"))
    backend = str(args.get("tokenizer_backend", "huggingface")).lower()
    if backend not in ("huggingface", "auto") or not _truthy(args.get("tokenized_requests", True)):
        return []   # text prompts: the server's rule applies
    theirs = _truthy(args.get("add_bos_token", False))
    name = args.get("tokenizer") or args.get("model") or args.get("pretrained")
    cfg_path = Path(str(name)) / "tokenizer_config.json" if name else None
    if cfg_path is None or not cfg_path.is_file():
        return [f"lm-eval sent token ids it made itself (add_bos_token={theirs}); the checkpoint's "
                f"tokenizer_config.json ({cfg_path or 'no tokenizer named'}) is not here to check "
                "that rule against"]
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{cfg_path} is not readable JSON: lm-eval's BOS rule could not be checked"]
    ours = cfg.get("add_bos_token") if isinstance(cfg, dict) else None
    if not isinstance(ours, bool) or ours == theirs:
        return []
    return [f"lm-eval tokenized the prompts itself with add_bos_token={theirs}, but {cfg_path} says "
            f"add_bos_token={str(ours).lower()}: its token ids {'lack' if ours else 'carry'} the BOS "
            "a text prompt gets. A server that takes token ids as given answered other prompts than "
            f"the text shows; rerun lm-eval with add_bos_token={ours} (or tokenizer_backend=None)"]


def load_lm_eval(results_path: str | Path, samples_path: str | Path | None = None) -> LmEvalRun:
    results_path, samples_path, notes = find_lm_eval_files(results_path, samples_path)
    raw = _read_json(results_path, "--lm-eval-results")
    results = raw.get("results") if isinstance(raw, dict) else None
    if not isinstance(results, dict):
        raise ParityError(f"--lm-eval-results {results_path}: no 'results' object; "
                          "is this lm-eval's results_*.json?")
    task = _pick_task(results, results_path)
    entry = results[task]
    acc = {}
    for filt in ("strict-match", "flexible-extract"):
        key = f"exact_match,{filt}"
        if key in entry:
            acc[filt] = (_number(entry[key]), _number(entry.get(f"exact_match_stderr,{filt}")))
    if not acc:
        raise ParityError(f"--lm-eval-results {results_path}: task {task} has no exact_match "
                          "for strict-match or flexible-extract")
    n = None
    ns = (raw.get("n-samples") or {}).get(task)
    if isinstance(ns, dict) and "effective" in ns:
        n = int(ns["effective"])
    elif "sample_len" in entry:
        n = int(entry["sample_len"])
    shot = (raw.get("n-shot") or {}).get(task)
    cfg = raw.get("config") if isinstance(raw.get("config"), dict) else None
    model = None
    if cfg:
        model = {"model": cfg.get("model"), "model_args": cfg.get("model_args")}
    run = LmEvalRun(task=task, accuracy=acc, n=n,
                    num_fewshot=int(shot) if isinstance(shot, (int, float)) else None,
                    lm_eval_version=raw.get("lm_eval_version"), model=model,
                    results_path=str(results_path))
    run.notes = notes + tokenization_notes(model)
    if samples_path is not None:
        run.samples = _parse_samples(samples_path)
        run.samples_path = str(samples_path)
        want = (raw.get("task_hashes") or {}).get(task)
        got = _samples_hash(Path(samples_path))
        if want and got and want != got:
            raise ParityError(f"--lm-eval-samples {samples_path} is not from the run of {results_path}: "
                              f"its task hash {got[:12]} differs from the {want[:12]} the results record")
        if run.n is not None and len(run.samples) != run.n:
            raise ParityError(f"--lm-eval-samples {samples_path} holds {len(run.samples)} questions, "
                              f"the results of {results_path} count {run.n}: not the same run")
    return run
