"""A gate run's --out-dir while the run is under way.

Each finished question is appended to samples.jsonl (and flushed) as it
arrives, and summary.json says how far the run got: ``status`` is
``running`` while it goes, ``incomplete`` when it died (with the error and
``done`` of ``n``), ``complete`` at the end, when samples.jsonl is
rewritten in doc order. A run that is killed outright leaves ``running``
and every line written so far. ``--resume`` reads them back and asks only
for the questions that are missing, after checking that the folder holds
this run: the same prompts (by hash, per doc id), the same generation
settings and the same kind of source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from parity.errors import ParityError

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
# What must match for a folder's answers to belong to this run.
RUN_KEYS = ("num_fewshot", "fewshot_seed", "until", "max_gen_toks")


def jsonable(v):
    import math

    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_summary(d: Path) -> dict | None:
    p = d / SUMMARY_FILE
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ParityError(f"{p} is not readable JSON: not a gate --out-dir") from None
    return s if isinstance(s, dict) else None


class OutDir:
    def __init__(self, path: str | Path, *, resume: bool = False, force: bool = False):
        self.path, self.resume, self.force = Path(path), resume, force
        self._fh = None

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_FILE

    def check(self, protect=()) -> None:
        """Before any work: not inside an input, and no unfinished run to lose."""
        from parity.report.tables import inside

        for p in protect:
            if p and (inside(str(self.path), str(p)) or inside(str(p), str(self.path))):
                raise ParityError(f"--out-dir {self.path} overlaps the input {p}: parity never writes "
                                  "into what it reads; choose another folder")
        if self.path.exists() and not self.path.is_dir():
            raise ParityError(f"--out-dir {self.path} exists and is not a folder")
        prev = read_summary(self.path) if self.path.is_dir() else None
        if self.resume:
            if prev is None or not self.samples.is_file():
                raise ParityError(f"--resume: {self.path} holds no gate run to resume "
                                  f"(no {SUMMARY_FILE} and {SAMPLES_FILE})")
        elif prev is not None and prev.get("status") in ("running", "incomplete") and not self.force:
            raise ParityError(f"--out-dir {self.path} holds an unfinished run ({prev.get('done', '?')} of "
                              f"{prev.get('n', '?')} questions): pass --resume to go on from it, or "
                              "--force to start over")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ParityError(f"cannot create --out-dir {self.path}: {exc.strerror or exc}") from None

    def previous(self, hashes: list[str], meta: dict) -> tuple[dict[int, dict], list[str]]:
        """doc id -> record of the run being resumed, checked to be this run's."""
        prev = read_summary(self.path) or {}
        differ = [f"{k} {prev.get(k)!r} there, {meta.get(k)!r} here" for k in RUN_KEYS
                  if k in prev and prev.get(k) != jsonable(meta.get(k))]
        kind_then = (prev.get("source") or {}).get("kind")
        if kind_then and kind_then != meta["source"]["kind"]:
            differ.append(f"source {kind_then} there, {meta['source']['kind']} here")
        if differ:
            raise ParityError(f"--resume: {self.path} holds another run ({'; '.join(differ)})")
        records, notes = {}, []
        lines = self.samples.read_text(encoding="utf-8").splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                i = int(rec["doc_id"])
            except (ValueError, KeyError, TypeError):
                if lineno == len(lines):   # the line being written when the run died
                    notes.append(f"the last line of {self.samples} was cut short and is asked again")
                    continue
                raise ParityError(f"--resume: {self.samples}:{lineno} is not a gate record") from None
            if i >= len(hashes):
                continue   # a run with a larger --limit: beyond this one
            if rec.get("prompt_hash") != hashes[i]:
                raise ParityError(f"--resume: {self.path} holds another run's samples (the prompt of "
                                  f"doc {i} differs: other data, fewshot count or seed)")
            records[i] = rec
        return records, notes

    def begin(self, meta: dict, n: int, kept: list[dict]) -> None:
        self.status(meta, "running", len(kept), n)
        atomic_write(self.samples, "".join(json.dumps(jsonable(r), ensure_ascii=False) + "\n" for r in kept))
        self._fh = open(self.samples, "a", encoding="utf-8")

    def add(self, record: dict) -> None:
        self._fh.write(json.dumps(jsonable(record), ensure_ascii=False) + "\n")
        self._fh.flush()

    def status(self, meta: dict, status: str, done: int, n: int, error: str | None = None) -> None:
        doc = {"task": "gsm8k", "status": status, "done": done, **jsonable(meta), "n": n}
        if error:
            doc["error"] = error
        atomic_write(self.path / SUMMARY_FILE, json.dumps(doc, indent=1) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
