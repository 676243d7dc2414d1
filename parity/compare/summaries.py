"""Screen two dumps by their summary statistics alone.

Every record carries a summary (absmax, mean, std, l2, NaN/Inf counts), so
this works on `stats`-mode dumps, which cost almost nothing to capture at
full model scale, as well as on full ones. A summary cannot give the error
of the difference, only bounds on it: by the triangle inequality
``| ||t|| - ||r|| | <= ||t - r||``, so the relative gap of the two l2 norms is
a lower bound on rel_l2 of the difference (the same holds for absmax and the
max abs difference). A gap beyond the dtype's fail threshold therefore
proves a divergence; a small gap proves nothing, and the verdict says
"consistent", not "equal". New NaN or Inf values are a divergence too.

Summaries of two records compare only when they cover the same elements:
both sides must hold the same number of elements (capture them with the
same batch layout, e.g. two builds of one engine, or GPU vs CPU).
"""

from __future__ import annotations

import math
import re

import pandas as pd

from parity.compare.align import as_dump, resolve_mapping, split_key
from parity.compare.result import TableResult
from parity.compare.verdict import thresholds_for
from parity.errors import ParityError

_RANK = {"fail": 3, "warn": 2, "skip": 1, "consistent": 0}


class SummaryDiff(TableResult):
    @property
    def exit_code(self) -> int:
        # A reference record the target lacks fails too: a run cut short must not pass.
        return 1 if self.failed or self.only_ref else 0

    def first_divergence(self) -> dict | None:
        """The first failing row in the reference's execution order."""
        bad = self.table[self.table["verdict"] == "fail"]
        return None if bad.empty else bad.iloc[0].to_dict()

    def worst(self, n: int = 10) -> list[int]:
        t = self.table
        if not len(t):
            return []
        rank = t["verdict"].map(_RANK)
        gap = pd.to_numeric(t["l2_gap"], errors="coerce").fillna(0.0)
        order = sorted(range(len(t)), key=lambda i: (-rank.iat[i], -gap.iat[i]))
        return [i for i in order[:n] if rank.iat[i] > 0]

    def summary(self) -> dict:
        t = self.table
        out = {"pairs": len(t)}
        for s in ("consistent", "warn", "fail", "skip"):
            out[s] = int((t["verdict"] == s).sum()) if len(t) else 0
        out["only_in_reference"] = len(self.only_ref)
        out["only_in_target"] = len(self.only_target)
        if self.only_ref:
            from parity.compare.api import missing_message

            out["missing_in_target"] = missing_message(len(self.only_ref))
        first = self.first_divergence()
        if first is not None:
            layer, step = _int_or_none(first["layer"]), _int_or_none(first["step"])
            where = f"layer {layer}, " if layer is not None else ""
            when = " ".join(w for w in (first["phase"], None if step is None else f"step {step}") if w)
            out["first_divergence"] = f"{where}{first['key']}{f' ({when})' if when else ''}: {first['reason']}"
        else:
            out["first_divergence"] = "none: no summary proves a difference (summaries cannot prove agreement)"
        return out


def summary_diff(ref, target, *, mapping=None, preset: str | None = None, filter=None) -> SummaryDiff:
    """Pair the records of two dumps on (canonical key, phase, step, call,
    seq_ids, rank) and judge each pair by its summaries."""
    rd, td = as_dump(ref), as_dump(target)
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(rd, td))
    pat = re.compile(filter) if isinstance(filter, str) else filter
    notes: list[str] = []
    sides = []
    for dump, name, side in ((rd, "reference", "ref"), (td, "target", "target")):
        index, dup = {}, 0
        for rec in dump.records():
            key = mapping.canonical(rec.key, side)
            if key is None or not rec.stats or (pat is not None and not pat.search(key)):
                continue
            k = (key, rec.phase, rec.step, rec.call, tuple(rec.seq_ids or ()), rec.rank)
            if k in index:
                dup += 1
                continue
            index[k] = rec
        if not index:
            raise ParityError(f"{name} dump {dump.given}: no record with a summary"
                              + (f" matches --filter {pat.pattern!r}" if pat is not None else ""))
        if dup:
            notes.append(f"{dup} {name} records repeat an earlier (key, phase, step, call, seq, rank); "
                         "the first of each is used")
        sides.append(index)
    ri, ti = sides
    from parity.compare.api import run_precision

    precision = run_precision(rd, td)
    rows = [_row(k, ri[k], ti[k], precision) for k in ri if k in ti]
    if not rows:
        common = {k[0] for k in ri} & {k[0] for k in ti}
        if common:
            # same names, other batches: a summary covers a whole record, so
            # records of differently batched runs cannot meet
            key = sorted(common)[0]
            a = next(k for k in ri if k[0] == key)
            b = next(k for k in ti if k[0] == key)
            raise ParityError(f"the records share names but not batches (e.g. {key}: reference {a[1]} step {a[2]} "
                              f"sequences {list(a[4])}, target {b[1]} step {b[2]} sequences {list(b[4])}); a summary "
                              "covers a whole record, so summary-diff needs runs that batch the same sequences "
                              "together: compare the tensors with ref-vs-target instead")
        a, b = next(iter(ri))[0], next(iter(ti))[0]
        raise ParityError("no record of the reference meets one of the target: the names differ "
                          f"(e.g. reference {a!r}, target {b!r}); give --map FILE or --preset NAME")
    return SummaryDiff(pd.DataFrame(rows), [k[0] for k in ri if k not in ti], [k[0] for k in ti if k not in ri],
                       notes)


def _row(k: tuple, r, t, precision) -> dict:
    key, phase, step, call, seq, rank = k
    layer, _ = split_key(key, r.layer)
    rs, ts = r.stats, t.stats
    row = {"key": key, "layer": layer, "phase": phase, "step": step, "call": call,
           "seq": ",".join(map(str, seq)) if seq else None, "rank": rank, "shape": r.shape, "dtype": r.dtype,
           "l2_ref": rs.get("l2"), "l2_target": ts.get("l2"), "l2_gap": None,
           "absmax_ref": rs.get("absmax"), "absmax_target": ts.get("absmax"),
           "mean_ref": rs.get("mean"), "mean_target": ts.get("mean"),
           "nonfinite_ref": _nonfinite(rs), "nonfinite_target": _nonfinite(ts)}
    n_ref, n_tgt = math.prod(r.shape), math.prod(t.shape)
    if n_ref != n_tgt:
        return {**row, "verdict": "skip",
                "reason": f"not comparable: {n_ref} vs {n_tgt} elements (capture both with the same batch layout)"}
    if row["nonfinite_ref"] != row["nonfinite_target"]:
        return {**row, "verdict": "fail",
                "reason": f"NaN/Inf count {row['nonfinite_ref']} vs {row['nonfinite_target']}"}
    l2r, l2t = row["l2_ref"], row["l2_target"]
    if l2r is None or l2t is None:
        return {**row, "verdict": "skip", "reason": "summary without l2"}
    gap = abs(l2t - l2r) / l2r if l2r > 0 else (0.0 if l2t == 0 else math.inf)
    row["l2_gap"] = gap
    th = thresholds_for(r.dtype, t.dtype, precision=precision)
    if gap > th.rel_l2_fail:
        return {**row, "verdict": "fail",
                "reason": f"l2 differs by {gap:.2e}, so rel_l2 of the difference >= that > {th.rel_l2_fail:.1e} "
                          f"({th.label} fail)"}
    if gap > th.rel_l2_warn:
        return {**row, "verdict": "warn", "reason": f"l2 differs by {gap:.2e} > {th.rel_l2_warn:.1e} ({th.label} warn)"}
    return {**row, "verdict": "consistent", "reason": ""}


def _int_or_none(v) -> int | None:
    # pandas turns a column of ints with gaps into floats with NaN
    return None if v is None or v != v else int(v)


def _nonfinite(stats: dict) -> int:
    return int(stats.get("nan") or 0) + int(stats.get("inf") or 0)
