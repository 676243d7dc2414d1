"""pass / warn / fail for one pair of records, from its metrics.

Two modes:
- fixed thresholds per dtype (``verdict_for``), picked from the less precise
  dtype of the pair;
- noise floor (``floor_verdict``): the target may be at most ``m`` times as
  far from a higher-precision run as the reference is, plus ``atol``.

Why these numbers: docs/metrics.md (measured on a small residual MLP stack,
the same experiment as tests/test_verdict.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Mapping

import torch

from parity.errors import ParityError

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class Thresholds:
    """Limits for one precision. A metric beyond ``*_fail`` fails, beyond
    ``*_warn`` warns. The cos limits are the angle equivalent of the rel_l2
    ones (rel_l2 >= sin(angle)), so by default they agree; set rel_l2 to inf
    to judge direction only."""

    label: str
    rel_l2_warn: float
    rel_l2_fail: float
    cos_warn: float
    cos_fail: float
    floor_m: float          # noise-floor multiplier
    floor_atol: float       # noise-floor absolute slack (unit roundoff)


def _cos_for(rel: float) -> float:
    # Below ~1e-7 the angle is lost in float64 rounding of the cosine
    # itself (1 - rel^2/2 rounds to 1): -1 switches the check off.
    return math.sqrt(1.0 - rel * rel) if rel > 1e-7 else -1.0


def _row(label, warn, fail, m, atol) -> Thresholds:
    return Thresholds(label, warn, fail, _cos_for(warn), _cos_for(fail), m, atol)


# Keyed by the less precise dtype of a pair. bf16/fp16 sit at a few roundings
# (one bf16 rounding of a tensor is ~2e-3 rel_l2); fp32 at ~100-1000 eps
# because fp32 kernels differ by reduction order over K ~ 7k terms and by
# transcendental approximations, not by the last rounding.
THRESHOLDS: dict[str, Thresholds] = {
    "float8": _row("fp8", 1.5e-1, 3.0e-1, 3.0, 6.25e-2),
    "bfloat16": _row("bf16", 1.0e-2, 2.0e-2, 3.0, 2.0 ** -8),
    "float16": _row("fp16", 1.5e-3, 3.0e-3, 3.0, 2.0 ** -11),
    # fp32 floor slack: 16 unit roundoffs. Measured on the tiny DeepSeek-V4
    # (engine vs reference, fp64 floor) both sides sit at 1e-7..6e-7 from the
    # floor, independently, so one roundoff of slack failed rows at 4e-7.
    "float32": _row("fp32", 1.0e-5, 1.0e-4, 2.0, 2.0 ** -20),
    "float64": _row("fp64", 1.0e-13, 1.0e-12, 2.0, 2.0 ** -53),
}

# Integer records (top-k ids, expert ids): a near-tie may flip under rounding,
# so any difference warns and only a larger share fails; decisions.py judges
# flips against their score margins.
IDS_FAIL_FRAC = 0.05


def _dtype(d) -> torch.dtype | None:
    if isinstance(d, torch.dtype):
        return d
    dt = getattr(torch, str(d).removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def _key_for(dt: torch.dtype) -> str:
    eps = torch.finfo(dt).eps
    if eps >= 2.0 ** -4:
        return "float8"
    if eps >= 2.0 ** -8:
        return "bfloat16"
    if eps >= 2.0 ** -11:
        return "float16"
    if eps >= 2.0 ** -24:
        return "float32"
    return "float64"


# A run's declared precision (run.json "precision") names a THRESHOLDS row.
_PRECISIONS = {"fp8": "float8", "float8": "float8", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16", "half": "float16", "fp32": "float32",
               "float32": "float32", "fp64": "float64", "float64": "float64", "double": "float64"}
_ORDER = ["float64", "float32", "float16", "bfloat16", "float8"]  # finer to coarser


def precision_key(name) -> str | None:
    """The THRESHOLDS key of a run precision name ("bf16", "fp8", ...); None if unknown."""
    return _PRECISIONS.get(str(name).strip().lower()) if name is not None else None


def coarsest(*precisions) -> str | None:
    """The coarsest of several run precision names (unknown or None ignored), as a THRESHOLDS key."""
    keys = [k for k in map(precision_key, precisions) if k is not None]
    return max(keys, key=_ORDER.index) if keys else None


def thresholds_for(dtype_a, dtype_b=None, table: Mapping[str, Thresholds] | None = None,
                   precision: str | None = None) -> Thresholds:
    """The row for the less precise of the pair's float dtypes (names or
    torch dtypes) and the run's precision (a name such as "bf16"): an fp32
    record of a bf16 run carries bf16 rounding from upstream. An integer side
    is ignored; nothing at all -> float32. Rows missing from `table` come
    from THRESHOLDS."""
    floats = [dt for dt in map(_dtype, (dtype_a, dtype_b)) if dt is not None and dt.is_floating_point]
    own = max((_key_for(dt) for dt in floats), key=_ORDER.index) if floats else None
    run = precision_key(precision)
    key = max((k for k in (own, run) if k), key=_ORDER.index, default="float32")
    row = (table or {}).get(key) or THRESHOLDS[key]
    # say so when the run's precision, not the record's dtype, picked the row
    return replace(row, label=f"{row.label} run") if own is not None and key != own else row


def _e(x: float) -> str:
    return f"{x:.1e}"


def _nonfinite_reason(m: dict) -> str:
    na, ia, nb, ib = m.get("nan_a", 0), m.get("inf_a", 0), m.get("nan_b", 0), m.get("inf_b", 0)
    n = m["nonfinite_mismatch"]
    if nb == ib == 0:
        return f"target has NaN/Inf, reference none ({na} NaN, {ia} Inf; {n} positions differ)"
    if na == ia == 0:
        return f"reference has NaN/Inf, target none ({nb} NaN, {ib} Inf; {n} positions differ)"
    return (f"NaN/Inf differ at {n} positions (target {na} NaN {ia} Inf, "
            f"reference {nb} NaN {ib} Inf)")


def flip_verdict(frac: float, where: str = "") -> Verdict:
    """An integer record whose share ``frac`` of elements changed, without a
    noise model: any change warns, more than IDS_FAIL_FRAC fails."""
    if frac == 0.0:
        return Verdict("pass", "identical")
    return Verdict("fail" if frac > IDS_FAIL_FRAC else "warn", f"{frac:.1%} of positions differ{where}")


def _ids_verdict(m: dict) -> Verdict:
    return flip_verdict(1.0 - m["frac_equal"], f" (max |diff| {m['max_abs']:g} at {m['max_abs_index']})")


def verdict_for(metrics: dict, *, thresholds: Thresholds | Mapping[str, Thresholds] | None = None,
                precision: str | None = None) -> Verdict:
    """Verdict from pair_metrics() output. `thresholds`: one row to use as
    is, or a table keyed like THRESHOLDS, default THRESHOLDS; `precision`:
    the run's precision, when it is coarser than the record's dtype."""
    m = metrics
    if m.get("shape_mismatch"):
        return Verdict("fail", f"shape {m['shape_a']} vs reference {m['shape_b']}")
    if m.get("nonfinite_mismatch", 0):
        return Verdict("fail", _nonfinite_reason(m))
    if m.get("rel_l2") is None:
        return _ids_verdict(m)
    t = thresholds if isinstance(thresholds, Thresholds) else thresholds_for(
        m["dtype_a"], m["dtype_b"], thresholds, precision)
    rel, cos = m["rel_l2"], m["cos"]
    if math.isnan(rel) or math.isnan(cos):
        return Verdict("fail", "metrics are NaN (values overflow float64?)")
    for status, rl, cl in (("fail", t.rel_l2_fail, t.cos_fail), ("warn", t.rel_l2_warn, t.cos_warn)):
        if rel > rl:
            return Verdict(status, f"rel_l2 {_e(rel)} > {_e(rl)} ({t.label} {status})")
        if cos < cl:
            return Verdict(status, f"cos {cos:.6f} < {cl:.6f} ({t.label} {status})")
    n_nonfinite = m.get("nan_a", 0) + m.get("inf_a", 0)
    if n_nonfinite:
        return Verdict("warn", f"NaN/Inf at the same {n_nonfinite} positions on both sides")
    if m.get("frac_equal") == 1.0:
        return Verdict("pass", "identical")
    return Verdict("pass", f"rel_l2 {_e(rel)} <= {_e(t.rel_l2_warn)} ({t.label})")


def floor_verdict(err_target_floor: float, err_ref_floor: float, dtype,
                  m: float | None = None, atol: float | None = None) -> Verdict:
    """Noise-floor verdict. The errors are rel_l2 of the target and of the
    reference, both against the same higher-precision run (the floor).
    Fail when err_target_floor > m * err_ref_floor + atol; defaults per
    dtype from THRESHOLDS (m 3 for bf16/fp16, 2 for fp32; atol = unit
    roundoff). The record's own dtype, not the run's precision: the
    reference's distance to the floor already carries what the run's
    precision brought from upstream; atol is the record's last rounding."""
    dt = _dtype(dtype)
    if dt is None or not dt.is_floating_point:
        raise ParityError(f"floor_verdict: a float dtype is needed, got {dtype!r}")
    t = THRESHOLDS[_key_for(dt)]
    m = t.floor_m if m is None else m
    atol = t.floor_atol if atol is None else atol
    if not (math.isfinite(err_target_floor) and math.isfinite(err_ref_floor)):
        return Verdict("fail", f"non-finite error to floor (target {err_target_floor}, "
                               f"reference {err_ref_floor})")
    limit = m * err_ref_floor + atol
    status = "fail" if err_target_floor > limit else "pass"
    op = ">" if status == "fail" else "<="
    return Verdict(status, f"rel_l2 to floor {_e(err_target_floor)} {op} {m:g} x {_e(err_ref_floor)}"
                           f" + {_e(atol)} ({t.label} floor)")


# Noise-model verdicts. A pair is judged against its record's envelope env:
# the largest rel_l2 any member of a perturbed-reference ensemble showed.
# Within env (plus the record's own last rounding) it passes; up to
# NOISE_FAIL x env it is suspect (warn); beyond, it fails. Decision records
# fail when their share of changed tokens exceeds NOISE_FAIL x the ensemble's
# plus IDS_FAIL_FRAC. Why these numbers: docs/calibration.md.
NOISE_FAIL = 2.0


def noise_verdict(rel_l2: float, envelope: float, dtype, members: int, fail: float | None = None,
                  token: float | None = None, token_envelope: float | None = None) -> Verdict:
    """``token``/``token_envelope``: the median over tokens of the per-token
    error, of this pair and of the ensemble. A record whose error is large in
    a few tokens only (a flipped routing choice) has a wide envelope; an error
    that every token carries shows in the median, against a narrow one."""
    dt = _dtype(dtype)
    if dt is None or not dt.is_floating_point:
        raise ParityError(f"noise_verdict: a float dtype is needed, got {dtype!r}")
    c = NOISE_FAIL if fail is None else fail
    atol = THRESHOLDS[_key_for(dt)].floor_atol
    if not math.isfinite(rel_l2):
        return Verdict("fail", f"rel_l2 {rel_l2} is not finite")
    tag = f"noise, {members} members"
    if token is not None and token_envelope is not None and token > c * token_envelope + atol:
        return Verdict("fail", f"median per-token error {_e(token)} > {c:g} x the envelope's {_e(token_envelope)} "
                               f"+ {_e(atol)} (rel_l2 {_e(rel_l2)}; {tag})")
    if rel_l2 <= envelope + atol:
        return Verdict("pass", f"rel_l2 {_e(rel_l2)} within the envelope {_e(envelope)} + {_e(atol)} ({tag})")
    score = (rel_l2 - atol) / envelope if envelope > 0 else math.inf
    if rel_l2 <= c * envelope + atol:
        return Verdict("warn", f"suspect: rel_l2 {_e(rel_l2)} is {score:.2g} x the envelope {_e(envelope)} ({tag})")
    return Verdict("fail", f"rel_l2 {_e(rel_l2)} > {c:g} x the envelope {_e(envelope)} + {_e(atol)} ({tag})")


def noise_flip_verdict(frac: float, envelope: float, members: int, fail: float | None = None) -> Verdict:
    c = NOISE_FAIL if fail is None else fail
    tag = f"noise, {members} members"
    if frac <= envelope:
        return Verdict("pass" if frac == 0 else "warn",
                       "same decisions" if frac == 0 else
                       f"decision differs for {frac:.1%} of tokens, as often as in the ensemble ({envelope:.1%}; {tag})")
    if frac <= c * envelope + IDS_FAIL_FRAC:
        return Verdict("warn", f"suspect: decision differs for {frac:.1%} of tokens, the ensemble at most "
                               f"{envelope:.1%} ({tag})")
    return Verdict("fail", f"decision differs for {frac:.1%} of tokens > {c:g} x the ensemble's {envelope:.1%} + "
                           f"{IDS_FAIL_FRAC:.0%} ({tag})")
