"""Accuracy, its standard error, and paired comparison of two runs.

The standard error is lm-eval's ``mean_stderr`` for a 0/1 metric: the sample
standard deviation over sqrt(n), which is sqrt(p(1-p)/(n-1)). With n = 100 a
run at 0.80 has a stderr of 0.04, so an unpaired comparison of two runs can
only see drops of ~10 points. Pairing by question does much better: two
runs of one model that agree on 98 of 100 questions have at most two
discordant questions, and McNemar's exact test judges only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Accuracy:
    n: int
    correct: int
    acc: float
    stderr: float

    def to_dict(self) -> dict:
        return {"n": self.n, "correct": self.correct, "acc": self.acc, "stderr": self.stderr}


def accuracy(correct: Sequence[bool]) -> Accuracy:
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    if n == 0:
        return Accuracy(0, 0, math.nan, math.nan)
    p = k / n
    se = math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else math.nan
    return Accuracy(n, k, p, se)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null hypothesis each discordant question is equally likely to
    go either way, so min(b, c) is Binomial(b + c, 1/2) in the lower tail;
    the two-sided p-value doubles that tail (capped at 1).
    """
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Integer arithmetic keeps the tail exact for any n before one division.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass
class Paired:
    """Per-question comparison of a run against a baseline run."""

    n: int
    both_correct: int
    only_run: int          # run correct, baseline wrong
    only_baseline: int     # baseline correct, run wrong
    neither: int
    p_value: float
    agreement: float       # same (normalised) extracted answer
    agree: int
    prompt_mismatch: int = 0
    token_mismatch: int = 0   # same question, other token ids (where both runs recorded them)
    missing: int = 0       # run questions the baseline lacks
    filter: str = "strict-match"
    notes: list[str] = field(default_factory=list)

    @property
    def discordant(self) -> int:
        return self.only_run + self.only_baseline

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "filter", "n", "both_correct", "only_run", "only_baseline", "neither", "discordant",
            "p_value", "agree", "agreement", "prompt_mismatch", "token_mismatch", "missing")}
        d["notes"] = list(self.notes)
        return d


def paired(run_correct: Sequence[bool], base_correct: Sequence[bool],
           run_answers: Sequence[str], base_answers: Sequence[str]) -> Paired:
    """Compare two runs question by question (sequences aligned by question)."""
    if not (len(run_correct) == len(base_correct) == len(run_answers) == len(base_answers)):
        raise ValueError("paired sequences must have one entry per question")
    n = len(run_correct)
    both = only_run = only_base = neither = agree = 0
    for rc, bc, ra, ba in zip(run_correct, base_correct, run_answers, base_answers):
        rc, bc = bool(rc), bool(bc)
        if rc and bc:
            both += 1
        elif rc:
            only_run += 1
        elif bc:
            only_base += 1
        else:
            neither += 1
        agree += ra == ba
    return Paired(n=n, both_correct=both, only_run=only_run, only_baseline=only_base,
                  neither=neither, p_value=mcnemar_exact(only_run, only_base),
                  agreement=(agree / n) if n else math.nan, agree=agree)


@dataclass
class Check:
    """One pass rule and how the run fared against it."""

    rule: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "passed": self.passed, "detail": self.detail}


def check_min_accuracy(acc: Accuracy, minimum: float) -> Check:
    ok = acc.acc >= minimum
    return Check("min-accuracy", ok, f"accuracy {acc.acc:.4f} {'>=' if ok else '<'} {minimum:.4f}")


def check_baseline(acc: Accuracy, baseline: float, k: float) -> Check:
    """Fail only when the run is more than ``k`` of its own standard errors
    below the baseline accuracy."""
    se = acc.stderr if not math.isnan(acc.stderr) else 0.0
    floor = baseline - k * se
    ok = acc.acc >= floor
    return Check("baseline", ok, f"accuracy {acc.acc:.4f} {'>=' if ok else '<'} "
                 f"baseline {baseline:.4f} - {k:g} x stderr {se:.4f} = {floor:.4f}")


def check_mcnemar(p: Paired, alpha: float) -> Check:
    """Fail on a significant loss against the baseline. A significant gain
    passes: it is reported, but a gate exists to catch regressions."""
    worse = p.only_baseline > p.only_run
    significant = p.p_value < alpha
    ok = not (worse and significant)
    if not significant:
        verdict = "no significant difference"
    else:
        verdict = "significantly worse" if worse else "significantly better"
    return Check("mcnemar", ok, f"vs baseline: {p.only_run} questions gained, {p.only_baseline} "
                 f"lost; exact McNemar p = {p.p_value:.4g} "
                 f"({'<' if significant else '>='} alpha {alpha:g}): {verdict}")


def check_agreement(p: Paired, minimum: float) -> Check:
    ok = p.agreement >= minimum
    return Check("min-agreement", ok, f"same extracted answer on {p.agree}/{p.n} questions "
                 f"({p.agreement:.4f} {'>=' if ok else '<'} {minimum:.4f})")
