"""A gate run: prompts -> generations -> per-question records -> verdict.

Every run keeps one record per question (doc id, prompt hash, generation,
the answer each filter extracted, the target, correctness), so a failing
gate can be read question by question and diffed against another run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from parity.errors import ParityError
from parity.gate import stats
from parity.gate.extract import FILTERS, SHORT, normalize, score, target_answer, truncate_at_stop
from parity.gate.task import LM_EVAL_VERSION_CHECKED, TASK_NAME, TASK_VERSION, UNTIL, GateTask, iter_jsonl, prompt_hash

from parity.gate.outdir import SAMPLES_FILE, SUMMARY_FILE, OutDir, atomic_write, jsonable

RECORD_COLUMNS = ["doc_id", "prompt_hash", "question", "target", "generation", "past_stop",
                  "answer_strict", "answer_flexible", "correct_strict", "correct_flexible",
                  "prompt_token_ids"]


def answer_col(filter_name: str) -> str:
    return f"answer_{SHORT[filter_name]}"


def correct_col(filter_name: str) -> str:
    return f"correct_{SHORT[filter_name]}"


@dataclass
class GateConfig:
    """Which filter decides, and the pass rules (None = rule not used)."""

    score: str = "strict-match"
    min_accuracy: float | None = None
    baseline: float | None = None
    tolerance_stderr: float = 2.0
    baseline_samples: str | None = None
    min_agreement: float | None = None
    alpha: float = 0.05

    def validate(self):
        if self.score not in FILTERS:
            raise ParityError(f"unknown score filter {self.score!r}; choose one of {', '.join(FILTERS)}")
        for name in ("min_accuracy", "baseline", "min_agreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ParityError(f"--{name.replace('_', '-')} must be within [0, 1], got {v}")
        if self.tolerance_stderr < 0:
            raise ParityError(f"--tolerance-stderr must be >= 0, got {self.tolerance_stderr}")
        if not 0.0 < self.alpha < 1.0:
            raise ParityError(f"--alpha must be within (0, 1), got {self.alpha}")
        if self.min_agreement is not None and self.baseline_samples is None:
            raise ParityError("--min-agreement compares against a baseline run: "
                              "give --baseline-samples FILE")


@dataclass
class GateResult:
    records: pd.DataFrame
    accuracy: dict[str, stats.Accuracy]
    checks: list[stats.Check]
    config: GateConfig
    meta: dict
    paired: stats.Paired | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> dict:
        return {
            "task": TASK_NAME,
            "status": "complete",
            "passed": self.passed,
            "score_filter": self.config.score,
            "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()},
            "checks": [c.to_dict() for c in self.checks],
            "paired": None if self.paired is None else self.paired.to_dict(),
            "rules": {k: getattr(self.config, k) for k in (
                "min_accuracy", "baseline", "tolerance_stderr", "baseline_samples",
                "min_agreement", "alpha")},
            "notes": list(self.notes),
            **self.meta,
        }

    def markdown(self) -> str:
        return render_markdown(self)


# --------------------------------------------------------------------------- records

def record_of(task: GateTask, i: int, raw, prompt_token_ids=None) -> dict:
    """Question i's record from a raw generation (and the token ids the
    source saw, where it tells)."""
    doc = task.docs[i]
    raw = raw if isinstance(raw, str) else ""
    # Cut at the stop sequences as lm-eval does after local generation,
    # so a server that ignores `stop` scores like one that honours it;
    # past_stop keeps the evidence that it did not.
    gen = truncate_at_stop(raw, task.until)
    return {"doc_id": i, "prompt_hash": task.hashes[i], "question": doc["question"],
            "target": target_answer(doc["answer"]), "generation": gen, "past_stop": gen != raw,
            **score(gen, doc["answer"]), "prompt_token_ids": prompt_token_ids}


def records_from_generations(task: GateTask, generations: Sequence[str]) -> pd.DataFrame:
    if len(generations) != len(task):
        raise ParityError(f"got {len(generations)} generations for {len(task)} prompts")
    return pd.DataFrame([record_of(task, i, g) for i, g in enumerate(generations)], columns=RECORD_COLUMNS)


def _past_stop(text: str, until=UNTIL) -> bool:
    return any(term and term in text for term in until)


def records_from_lm_eval(samples: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Re-score lm-eval's logged generations with our filters; a note lists
    any document where lm-eval's own extraction or score disagrees."""
    rows, differ = [], []
    for s in samples:
        rec = {"doc_id": s["doc_id"],
               "prompt_hash": s["prompt_hash"] or (prompt_hash(s["prompt"]) if s["prompt"] else None),
               "question": s["question"], "target": target_answer(s["answer"]),
               "generation": s["generation"], "past_stop": _past_stop(s["generation"]),
               # Scored as logged, uncut: lm-eval's API models score the
               # server's text as returned, and this must reproduce its numbers.
               **score(s["generation"], s["answer"]), "prompt_token_ids": None}
        for filt, theirs in s["lm_eval"].items():
            if filt not in FILTERS:
                continue
            em = theirs.get("exact_match")
            if theirs.get("answer") != rec[answer_col(filt)] or (
                    em is not None and not math.isnan(em) and bool(em) != rec[correct_col(filt)]):
                differ.append(f"{s['doc_id']}:{filt}")
        rows.append(rec)
    notes = []
    if differ:
        notes.append(f"our extraction differs from lm-eval's logged one on {len(differ)} "
                     f"(doc, filter) pairs: {', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''}")
    return pd.DataFrame(rows, columns=RECORD_COLUMNS), notes


def accuracy_of(records: pd.DataFrame) -> dict[str, stats.Accuracy]:
    return {f: stats.accuracy(records[correct_col(f)].tolist()) for f in FILTERS}


# --------------------------------------------------------------------------- samples files

def _samples_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() and not (p / SAMPLES_FILE).is_file() and any(p.rglob("results_*.json")):
        from parity.gate.clients import find_lm_eval_files

        _, samples, _ = find_lm_eval_files(p)
        if samples is None:
            raise ParityError(f"no lm-eval samples file in {p} (run lm-eval with --log_samples)")
        return samples
    if p.is_dir():
        p = p / SAMPLES_FILE
    if not p.is_file():
        raise ParityError(f"no samples file at {p} (expected a samples .jsonl or a gate --out-dir)")
    return p


def load_samples(path: str | Path) -> pd.DataFrame:
    """Per-question records from a gate out dir, a gate samples.jsonl, or an
    lm-eval samples_*.jsonl (re-scored with our filters)."""
    p = _samples_path(path)
    lines = list(iter_jsonl(p))
    if not lines:
        raise ParityError(f"{p} holds no records")
    first = lines[0][1]
    if isinstance(first, dict) and "filter" in first and "doc" in first:
        from parity.gate.clients import _parse_samples

        df, _ = records_from_lm_eval(_parse_samples(p))
        return df
    rows = []
    for lineno, r in lines:
        if not isinstance(r, dict):
            raise ParityError(f"{p}:{lineno} is not a gate record (not a JSON object)")
        # A published baseline may leave the GSM8K text out (target and
        # question); its stored correctness is then what it claims.
        needed = ("doc_id", "generation") if {"correct_strict", "correct_flexible"} <= r.keys() \
            else ("doc_id", "generation", "target")
        missing = [c for c in needed if c not in r]
        if missing:
            raise ParityError(f"{p}:{lineno} is not a gate record (missing {', '.join(missing)})")
        rows.append(r)
    df = pd.DataFrame(rows)
    for c in RECORD_COLUMNS:
        if c not in df.columns:
            df[c] = None
    # Re-extract rather than trust stored answers: a record written by an
    # older extraction must be compared under today's rules.
    for i, r in df.iterrows():
        gen = r["generation"] if isinstance(r["generation"], str) else ""
        if r["target"] is None or (isinstance(r["target"], float) and pd.isna(r["target"])):
            s = {k: v for k, v in score(gen, "#### ").items() if k.startswith("answer_")}
        else:
            s = score(gen, "#### " + str(r["target"]))
        for k, v in s.items():
            df.at[i, k] = v
    df["doc_id"] = df["doc_id"].astype(int)
    return df[RECORD_COLUMNS + [c for c in df.columns if c not in RECORD_COLUMNS]]


def write_outputs(result: GateResult, out_dir: str | Path) -> None:
    """The finished run: summary.json, and samples.jsonl in doc order."""
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParityError(f"cannot create --out-dir {d}: {exc}") from None
    atomic_write(d / SUMMARY_FILE, json.dumps(jsonable(result.summary()), indent=1) + "\n")
    lines = [json.dumps(jsonable(rec), ensure_ascii=False) for rec in result.records.to_dict(orient="records")]
    atomic_write(d / SAMPLES_FILE, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- verdict

def pair_with_baseline(records: pd.DataFrame, baseline: pd.DataFrame, filt: str) -> stats.Paired:
    """Align two runs by doc id and compare them on the questions both hold."""
    if records.empty:
        raise ParityError("paired mode needs per-question records of this run "
                          "(for lm-eval results, also give --lm-eval-samples)")
    a = records.set_index("doc_id")
    b = baseline.drop_duplicates("doc_id").set_index("doc_id")
    common = [i for i in a.index if i in b.index]
    if not common:
        raise ParityError("the baseline samples share no doc id with this run")
    ac, bc = a.loc[common], b.loc[common]
    col, ok = answer_col(filt), correct_col(filt)
    p = stats.paired(ac[ok].tolist(), bc[ok].tolist(),
                     [normalize(str(x)) for x in ac[col]], [normalize(str(x)) for x in bc[col]])
    p.filter = filt
    p.missing = len(a.index) - len(common)
    ha, hb = ac["prompt_hash"], bc["prompt_hash"]
    p.prompt_mismatch = int(sum(1 for x, y in zip(ha, hb) if x and y and x != y))
    tokens, note = token_mismatches(ac, bc)
    p.token_mismatch = tokens
    if note:
        p.notes.append(note)
    if p.missing:
        p.notes.append(f"{p.missing} questions of this run are not in the baseline; "
                       f"compared on the {len(common)} in common")
    if p.prompt_mismatch:
        p.notes.append(f"{p.prompt_mismatch} of {len(common)} prompts differ from the baseline's "
                       "(other fewshot count, seed or data?): the pairing may be meaningless")
    return p


def _ids(v):
    return v if isinstance(v, list) and v else None


def token_mismatches(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, str | None]:
    """Questions (aligned rows) whose prompts reached the model as other
    token ids, and a note that names a leading-token difference (a BOS one
    side adds and the other does not): equal prompt hashes do not show it."""
    ta = a["prompt_token_ids"] if "prompt_token_ids" in a else [None] * len(a)
    tb = b["prompt_token_ids"] if "prompt_token_ids" in b else [None] * len(b)
    differ = lead = 0
    for x, y in zip(ta, tb):
        x, y = _ids(x), _ids(y)
        if x is None or y is None or x == y:
            continue
        differ += 1
        lead += x[1:] == y or y[1:] == x
    if not differ:
        return 0, None
    note = f"{differ} prompts reached the model as other token ids than in the baseline"
    if lead == differ:
        note += (" (one side has one more leading token: a BOS added on one side only; "
                 "docs/serve.md has the BOS rule)")
    return differ, note


def evaluate(records: pd.DataFrame, accuracy: dict[str, stats.Accuracy], config: GateConfig,
             meta: dict, notes: Sequence[str] = (), baseline: pd.DataFrame | None = None) -> GateResult:
    config.validate()
    acc = accuracy[config.score] if config.score in accuracy else None
    if acc is None:
        raise ParityError(f"no {config.score} accuracy in this run")
    checks: list[stats.Check] = []
    if config.min_accuracy is not None:
        checks.append(stats.check_min_accuracy(acc, config.min_accuracy))
    if config.baseline is not None:
        checks.append(stats.check_baseline(acc, config.baseline, config.tolerance_stderr))
    paired = None
    if config.baseline_samples is not None:
        base = load_samples(config.baseline_samples) if baseline is None else baseline
        paired = pair_with_baseline(records, base, config.score)
        checks.append(stats.check_mcnemar(paired, config.alpha))
        if config.min_agreement is not None:
            checks.append(stats.check_agreement(paired, config.min_agreement))
    notes = list(notes)
    if not checks:
        notes.append("no pass rule given (--min-accuracy, --baseline, --baseline-samples): "
                     "reporting only")
    return GateResult(records=records, accuracy=accuracy, checks=checks, config=config,
                      meta=meta, paired=paired, notes=notes)


def task_meta(task: GateTask) -> dict:
    return {"n": len(task), "num_fewshot": task.num_fewshot, "limit": task.limit,
            "fewshot_seed": task.seed, "data": task.data_path, "fewshot_data": task.fewshot_path,
            "until": list(task.until), "max_gen_toks": task.max_gen_toks,
            "conventions": f"lm-eval {LM_EVAL_VERSION_CHECKED} gsm8k v{TASK_VERSION}"}


def run_gate(source, task: GateTask, config: GateConfig, *, progress: bool = True,
             max_new_tokens: int | None = None, out: OutDir | None = None,
             baseline: pd.DataFrame | None = None) -> GateResult:
    """Generate with ``source`` on ``task``'s prompts, score, and judge.
    With ``out``, every finished question is on disk as soon as it is
    done, and a run that fails says how far it got (outdir.py)."""
    config.validate()
    t0 = time.monotonic()
    meta = {"source": source.describe(), **task_meta(task)}
    if max_new_tokens:
        meta["max_gen_toks"] = max_new_tokens
    notes: list[str] = []
    done: dict[int, dict] = {}
    if out is not None and out.resume:
        done, notes = out.previous(task.hashes, meta)
        notes.append(f"resumed: {len(done)} of {len(task)} questions from the earlier run in {out.path}")
    if out is not None:
        out.begin(meta, len(task), [done[i] for i in sorted(done)])
    todo = [i for i in range(len(task)) if i not in done]

    def on_done(k: int, answer) -> None:
        rec = record_of(task, todo[k], answer.text, answer.prompt_token_ids)
        done[todo[k]] = rec
        if out is not None:
            out.add(rec)

    try:
        source.generate([task.prompts[i] for i in todo], max_new_tokens=meta["max_gen_toks"],
                        stop=list(task.until), on_done=on_done, progress=progress)
    except (ParityError, KeyboardInterrupt) as exc:
        why = str(exc) if isinstance(exc, ParityError) else "interrupted"
        where = "lost (no --out-dir)"
        if out is not None:
            out.close()
            out.status(meta, "incomplete", len(done), len(task), why)
            where = f"kept in {out.samples}; rerun with --resume to ask only for the rest"
        if isinstance(exc, KeyboardInterrupt):
            raise ParityError(f"interrupted after {len(done)} of {len(task)} questions, {where}") from None
        raise ParityError(f"{why} -- {len(done)} of {len(task)} questions were answered, {where}") from None
    finally:
        if out is not None:
            out.close()
    records = pd.DataFrame([done[i] for i in range(len(task))], columns=RECORD_COLUMNS)
    meta["source"] = source.describe()   # now with what the source learnt (the served model)
    meta["elapsed_s"] = round(time.monotonic() - t0, 3)
    k = int(records["past_stop"].sum())
    if k:
        notes.append(f"{k} generations ran on past a stop sequence (the source ignored `stop`); "
                     "they were cut there before scoring")
    return evaluate(records, accuracy_of(records), config, meta, notes, baseline=baseline)


def gate_lm_eval(run, config: GateConfig, baseline: pd.DataFrame | None = None) -> GateResult:
    """Judge results lm-eval computed (``clients.load_lm_eval``)."""
    config.validate()
    notes: list[str] = list(getattr(run, "notes", []))
    meta = {"source": {"kind": "lm-eval", "results": run.results_path, "samples": run.samples_path,
                       "task": run.task, "lm_eval_version": run.lm_eval_version,
                       "model": run.model},
            "n": run.n, "num_fewshot": run.num_fewshot,
            "conventions": f"lm-eval {run.lm_eval_version or '?'} (as logged)"}
    if run.samples:
        records, more = records_from_lm_eval(run.samples)
        notes += more
        acc = accuracy_of(records)
        k = int(records["past_stop"].sum())
        if k:
            notes.append(f"{k} logged generations run on past a stop sequence (the server ignored "
                         "`stop`); lm-eval scored them uncut, and so does this report")
        meta["n"] = len(records)
        for filt, (theirs, _) in run.accuracy.items():
            if not math.isnan(theirs) and abs(theirs - acc[filt].acc) > 1e-9:
                notes.append(f"{filt}: lm-eval reported {theirs:.4f}, its samples score "
                             f"{acc[filt].acc:.4f} here")
    else:
        records = pd.DataFrame(columns=RECORD_COLUMNS)
        acc = {}
        for filt, (a, se) in run.accuracy.items():
            n = run.n or 0
            acc[filt] = stats.Accuracy(n=n, correct=int(round(a * n)) if n else 0, acc=a, stderr=se)
        notes.append("no --lm-eval-samples: aggregate accuracy only, no per-question records")
    return evaluate(records, acc, config, meta, notes, baseline=baseline)


# --------------------------------------------------------------------------- rendering

def _describe_source(src: dict) -> str:
    kind = src.get("kind")
    if kind == "endpoint":
        return f"endpoint {src.get('url')} (model {src.get('model')})"
    if kind in ("engine", "reference"):
        prec = f", {src['precision']}" if src.get("precision") else ""
        return f"{kind} {src.get('ckpt')}{prec}"
    if kind == "lm-eval":
        return f"lm-eval results {src.get('results')}"
    return str(kind)


def _f4(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def render_markdown(result: GateResult) -> str:
    from parity.report.tables import to_markdown

    m = result.meta
    verdict = "PASS" if result.passed else "FAIL"
    out = [f"## GSM8K gate: {verdict}", ""]
    shots = m.get("num_fewshot")
    out.append(f"{_describe_source(m.get('source', {}))}; {m.get('n')} questions, "
               f"{'?' if shots is None else shots}-shot; the pass rules read "
               f"**{result.config.score}**")
    out.append("")
    acc_df = pd.DataFrame([{"filter": f, "correct": f"{a.correct}/{a.n}", "accuracy": _f4(a.acc),
                            "stderr": _f4(a.stderr)} for f, a in result.accuracy.items()])
    out.append(to_markdown(acc_df))
    if result.paired is not None:
        p = result.paired
        out += ["", f"Paired against {result.config.baseline_samples} ({p.filter}):", ""]
        out.append(to_markdown(pd.DataFrame([{
            "questions": p.n, "both correct": p.both_correct, "only this run": p.only_run,
            "only baseline": p.only_baseline, "neither": p.neither,
            "McNemar p": f"{p.p_value:.4g}", "same answer": f"{p.agree}/{p.n}"}])))
    if result.checks:
        out += ["", to_markdown(pd.DataFrame([{"rule": c.rule, "result": "pass" if c.passed else "FAIL",
                                               "detail": c.detail} for c in result.checks]))]
    notes = list(result.notes) + (list(result.paired.notes) if result.paired else [])
    if notes:
        out += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(out)


# --------------------------------------------------------------------------- diff

def diff_samples(a: pd.DataFrame, b: pd.DataFrame, filt: str = "strict-match",
                 text: bool = False) -> tuple[pd.DataFrame, dict]:
    """Questions whose correctness or extracted answer differs between two
    runs (matched by doc id), and the counts. With ``text``, questions whose
    generations differ while the answer is the same are listed too: two
    implementations of one model under greedy decoding should agree on the
    text, not only on the number."""
    if filt not in FILTERS:
        raise ParityError(f"unknown filter {filt!r}; choose one of {', '.join(FILTERS)}")
    col, ok = answer_col(filt), correct_col(filt)
    ia = a.drop_duplicates("doc_id").set_index("doc_id")
    ib = b.drop_duplicates("doc_id").set_index("doc_id")
    common = sorted(set(ia.index) & set(ib.index))
    rows = []
    lost = gained = changed = prompt_mismatch = text_only = 0
    token_mismatch, _ = token_mismatches(ia.loc[common], ib.loc[common])
    for d in common:
        ra, rb = ia.loc[d], ib.loc[d]
        if ra["prompt_hash"] and rb["prompt_hash"] and ra["prompt_hash"] != rb["prompt_hash"]:
            prompt_mismatch += 1
        ca, cb = bool(ra[ok]), bool(rb[ok])
        na, nb = normalize(str(ra[col])), normalize(str(rb[col]))
        if ca == cb and na == nb:
            if ra["generation"] == rb["generation"]:
                continue
            text_only += 1
            if not text:
                continue
            change = "text only"
        elif ca and not cb:
            change, lost = "lost", lost + 1
        elif cb and not ca:
            change, gained = "gained", gained + 1
        else:
            change, changed = "answer changed", changed + 1
        q = str(ra["question"] or rb["question"] or "")
        rows.append({"doc_id": int(d), "change": change, "target": ra["target"],
                     "answer_a": ra[col], "answer_b": rb[col], "correct_a": ca, "correct_b": cb,
                     "question": q if len(q) <= 70 else q[:67] + "..."})
    df = pd.DataFrame(rows, columns=["doc_id", "change", "target", "answer_a", "answer_b",
                                     "correct_a", "correct_b", "question"])
    counts = {
        "filter": filt,
        "common questions": len(common),
        "only in A": len(set(ia.index) - set(ib.index)),
        "only in B": len(set(ib.index) - set(ia.index)),
        "correct in A": int(sum(bool(ia.loc[d, ok]) for d in common)),
        "correct in B": int(sum(bool(ib.loc[d, ok]) for d in common)),
        "correct in A only (lost in B)": lost,
        "correct in B only (gained in B)": gained,
        "same correctness, other answer": changed,
        "same answer, other generation": text_only,
        "differing questions": len(rows),
        "prompt hash mismatches": prompt_mismatch,
        # Equal text can still reach the model as other tokens (a BOS added
        # on one side only): counted where both runs recorded the ids.
        "prompt token mismatches": token_mismatch,
    }
    return df, counts
