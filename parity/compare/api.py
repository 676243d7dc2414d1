"""``parity.compare_dumps``: every aligned pair of two dumps, with metrics
and a verdict, in the target's execution order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
import torch

from parity.compare.align import (Alignment, Pair, Piece, ShapeMismatch, ShardReleaser, align, as_dump,
                                  check_token_ids, comparable, cut_dump, resolve_mapping, shard_blame, split_key)
from parity.errors import ParityError

COLUMNS = ["key", "layer", "stage", "phase", "step", "seq", "rank", "shape", "dtype", "rel_l2", "cos", "max_abs",
           "frac_equal", "worst_token", "verdict", "reason"]
_RANK = {"pass": 0, "warn": 1, "fail": 2}


@dataclass
class CompareResult:
    table: pd.DataFrame             # one row per aligned pair (COLUMNS, plus err_ref_floor in floor mode)
    only_ref: pd.DataFrame          # records with no partner: key, phase, step, call, seq, rank
    only_target: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    decisions: object | None = None  # DecisionResult when decision taps were aligned
    floor: bool = False

    @property
    def failed(self) -> bool:
        return bool((self.table["verdict"] == "fail").any()) if len(self.table) else False

    @property
    def missing(self) -> int:
        """Pieces of the reference with no partner in the target (within the
        filter): records the target should hold and does not."""
        return len(self.only_ref)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.missing else 0

    def worst(self, n: int = 10) -> list[int]:
        """Row positions of the first failing row and the ``n`` worst rows."""
        if not len(self.table):
            return []
        status = self.table["verdict"].map(_RANK).fillna(0)
        err = pd.to_numeric(self.table["rel_l2"], errors="coerce").fillna(0.0)
        order = sorted(range(len(self.table)), key=lambda i: (-status.iat[i], -err.iat[i]))
        first = [i for i in range(len(self.table)) if self.table["verdict"].iat[i] == "fail"][:1]
        return first + [i for i in order[:n] if status.iat[i] > 0 and i not in first]

    def summary(self) -> dict:
        t = self.table
        out = {"pairs": len(t)}
        for s in ("pass", "warn", "fail"):
            out[s] = int((t["verdict"] == s).sum()) if len(t) else 0
        out["only_in_reference"] = len(self.only_ref)
        out["only_in_target"] = len(self.only_target)
        if self.missing:
            out["missing_in_target"] = missing_message(self.missing, len(set(self.only_ref["key"])))
        if self.failed:
            r = t[t["verdict"] == "fail"].iloc[0]
            out["first_failure"] = f"{r['key']} ({r['phase']} step {r['step']} seq {r['seq']}): {r['reason']}"
        return out


def missing_message(pieces: int, records: int | None = None) -> str:
    """Why a comparison fails when the target lacks what the reference has.
    ``records`` None: the pieces are whole records (weights, summaries)."""
    what = f"{pieces} piece(s) of {records} reference record(s)" if records is not None else \
        f"{pieces} reference record(s)"
    return (f"{what} are missing from the target (a run cut short, or a narrower capture): the "
            "comparison fails unless a filter leaves them out")


def run_precision(*dumps) -> str | None:
    """The coarsest precision the runs declare in run.json ("precision"), as a
    THRESHOLDS key; None when none declares one."""
    from parity.compare.verdict import coarsest

    return coarsest(*(d.run.get("precision") for d in dumps if isinstance(d.run, dict)))


def _load(piece: Piece, dump) -> torch.Tensor:
    if piece.error:
        raise ShapeMismatch(f"layout: {piece.error}")
    return piece.load(dump)


def _metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    from parity.compare.metrics import pair_metrics

    return pair_metrics(a, b)


_TOKEN_BLOCK = 1 << 20  # elements per float64 block of the per-token error


def token_median_error(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Median over tokens (the first dim) of ||a_t - b_t|| / ||b_t||: an
    error that every token carries moves it, one that a few tokens carry
    (a flipped routing choice, say) does not. None below two dims."""
    return _median(per_token_error(a, b))


def _median(e: torch.Tensor | None) -> float | None:
    return float(e.nanmedian()) if e is not None and e.numel() else None


def per_token_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """||a_t - b_t|| / ||b_t|| per token (the first dim), float64; None below two dims."""
    if a.dim() < 2 or a.shape != b.shape or a.shape[0] == 0 or not a.is_floating_point():
        return None
    n = a.shape[0]
    per = max(1, a[0].numel())
    errs = []
    step = max(1, _TOKEN_BLOCK // per)
    for s in range(0, n, step):
        x, y = a[s:s + step].reshape(-1, per).double(), b[s:s + step].reshape(-1, per).double()
        errs.append((x - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-300))
    return torch.cat(errs)


def _where_in_record(e: torch.Tensor | None, limit: float) -> tuple[int | None, str]:
    """For a failing pair, from its per-token errors ``e``: the token with the
    largest error and how many tokens exceed ``limit``, so that an error a
    few tokens carry reads apart from one in every token."""
    if e is None or e.numel() < 2:
        return None, ""
    e_inf = e.nan_to_num(nan=float("inf"))
    worst = int(e_inf.argmax())
    over = int((e_inf > limit).sum())
    return worst, f"{over} of {e.numel()} tokens beyond the limit, worst token {worst} ({float(e[worst]):.1e})"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _ids_row(row: dict, a: torch.Tensor, b: torch.Tensor, noise=None) -> dict:
    """A decision tap, judged on sets per token. A flipped decision warns and
    never fails by itself: a near-tie flips under any rounding. The tensors
    downstream say whether it mattered, and carry a note pointing back here."""
    from parity.decisions import ids_row

    d = ids_row(a, b)
    row["shape"], row["dtype"] = list(b.shape), _dtype_name(b)
    if "error" in d:
        row["reason"] = d["error"]
        return row
    frac = d["differ"] / d["tokens"] if d["tokens"] else 0.0
    row["frac_equal"] = 1.0 - frac
    row["verdict"] = "pass" if frac == 0 else "warn"
    row["reason"] = "same sets" if frac == 0 else (
        f"decision differs for {frac:.1%} of tokens (mean set overlap {d['overlap_sum'] / d['tokens']:.3f})")
    v = _flip_verdict(row, frac, noise) if noise is not None else None
    if v is not None:
        row["verdict"], row["reason"] = v.status, v.reason
    if a.shape[-1] != b.shape[-1]:
        row["reason"] += f"; widths {a.shape[-1]} vs {b.shape[-1]} compared as sets (-1 = none)"
    return row


def row_key(row) -> tuple:
    """(canonical key, phase, step, seq, rank): what names a compared pair."""
    return (row["key"], row["phase"], row["step"], row["seq"], row["rank"])


def _flip_verdict(row, frac: float, noise):
    """An integer record against the ensemble's share of changed elements; None without one."""
    from parity.compare.verdict import noise_flip_verdict

    env = noise.flip_envelope(row_key(row))
    row["noise_env"] = env
    return None if env is None else noise_flip_verdict(frac, env, len(noise))


def _row(pair: Pair, rdump, tdump, floor_piece, fdump, m_floor, atol, precision, noise=None,
         token_errors: bool = False) -> dict:
    from parity.compare.verdict import Verdict, floor_verdict, noise_verdict, thresholds_for, verdict_for
    from parity.decisions import decision_kind

    r, t = pair.ref, pair.target
    layer, stage = split_key(r.key, t.rec.layer if t.rec.layer is not None else r.rec.layer)
    row = {"key": r.key, "layer": layer, "stage": stage, "phase": t.phase, "step": t.step, "seq": t.seq,
           "rank": pair.rank, "shape": None, "dtype": None, "rel_l2": None, "cos": None, "max_abs": None,
           "frac_equal": None, "verdict": "fail", "reason": ""}
    notes = [n for n in (pair.note,) if n]
    kind = decision_kind(r.key)
    try:
        a, b = _load(t, tdump), _load(r, rdump)
        if kind in ("ids", "topk") and not a.is_floating_point() and not b.is_floating_point():
            return _ids_row(row, a, b, noise)
        own = a
        a, b, how = comparable(a, b)
    except ShapeMismatch as exc:
        row["reason"] = str(exc)
        return row
    if how:
        notes.append(how)
    row["shape"] = list(b.shape)
    row["dtype"] = _dtype_name(a) if a.dtype == b.dtype else f"{_dtype_name(a)}/{_dtype_name(b)}"
    m = _metrics(a, b)
    floats = a.is_floating_point() and b.is_floating_point()
    coarser = (a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype) if floats else None
    row.update(rel_l2=m.get("rel_l2"), cos=m.get("cos"), max_abs=m.get("max_abs"), frac_equal=m.get("frac_equal"))
    per_token = None  # computed once, for the token median and a failure's worst token
    if token_errors and m.get("rel_l2") is not None:
        per_token = per_token_error(a, b)
        row["token_median"] = _median(per_token)
    v = verdict_for(m, precision=precision)
    if fdump is not None and m.get("rel_l2") is not None and floats:
        if floor_piece is None:
            notes.append("no floor record; fixed thresholds")
        else:
            try:
                f = _load(floor_piece, fdump)
                f, _, _ = comparable(f, b)
                mt, mr = _metrics(a, f), _metrics(b, f)
                row["err_target_floor"], row["err_ref_floor"] = mt.get("rel_l2"), mr.get("rel_l2")
                fv = floor_verdict(mt["rel_l2"], mr["rel_l2"], coarser, m_floor, atol)
                # NaN/Inf disagreement and shape problems stay failures whatever the floor says.
                v = v if (m.get("nonfinite_mismatch") or m.get("shape_mismatch")) else fv
            except ShapeMismatch as exc:
                notes.append(f"floor: {exc}; fixed thresholds")
    if noise is not None and not (m.get("nonfinite_mismatch") or m.get("shape_mismatch")):
        if m.get("rel_l2") is not None:
            env = row["noise_env"] = noise.envelope(row_key(row))
            nv = None if env is None else noise_verdict(
                m["rel_l2"], env, coarser, len(noise), token=row.get("token_median"),
                token_envelope=noise.token_envelope(row_key(row)))
        else:  # an integer record: judged by its share of changed elements
            nv = _flip_verdict(row, 1.0 - m["frac_equal"], noise)
        if nv is None:
            notes.append("no noise record; fixed thresholds")
        else:
            v = nv
    if kind == "margin" and not (m.get("nonfinite_mismatch") or m.get("shape_mismatch")):
        # a difference of two close scores has no relative accuracy of its own
        # (one token's margin of 1e-4 carries a 1e-7 score error as 1e-3):
        # it sizes the flips of its decision and is judged with it
        v = Verdict("pass", "a decision's margin: judged with the decision, not by its own rel_l2")
    if v.status == "fail" and floats and not m.get("shape_mismatch"):
        t_lim = thresholds_for(a.dtype, b.dtype, precision=precision).rel_l2_fail
        if per_token is None:
            per_token = per_token_error(a, b)
        row["worst_token"], where = _where_in_record(per_token, t_lim)
        if where:
            notes.append(where)
        blame = shard_blame(t, own, b, lambda x, y: (_metrics(x, y).get("rel_l2") or 0.0) > t_lim)
        if blame:
            if len(blame[0]) == 1:
                row["rank"] = blame[0][0]  # the one rank whose shard is wrong
            notes.append(blame[1])
    row["verdict"], row["reason"] = v.status, "; ".join([v.reason] + notes)
    return row


def frame(rows: list[dict], cols: list[str]) -> pd.DataFrame:
    """A DataFrame whose integer columns with gaps stay ints and None
    (pandas would turn them into floats and NaN)."""
    df = pd.DataFrame(rows, columns=cols)
    for c in ("layer", "step", "seq", "rank", "call", "slot", "tokens", "worst_token"):
        if c in df:
            df[c] = pd.Series([r.get(c) for r in rows], dtype=object, index=df.index)
    return df


def _only_frame(pieces: list[Piece]) -> pd.DataFrame:
    cols = ["key", "phase", "step", "call", "seq", "rank"]
    return frame([{c: getattr(p, c) for c in cols} for p in pieces], cols)


def _size_flips(table: pd.DataFrame, pairs: list[Pair], rdump, tdump) -> None:
    """Decision rows that flipped, sized by their margin taps (decisions.py),
    with one yardstick per decision record and phase (a decode step holds a
    token or two per sequence): near-ties warn; a share of changed decisions
    beyond IDS_FAIL_FRAC fails."""
    from parity.compare.verdict import IDS_FAIL_FRAC
    from parity.decisions import NEAR_TIE, decision_kind, flip_scale, margin_key, size_flips

    at = {row_key(table.iloc[i]): i for i in range(len(table))}
    table["flip_near_tie"] = None
    table["flip_changed"] = None
    groups: dict[tuple, list] = {}
    for i, p in enumerate(pairs):
        row = table.iloc[i]
        if decision_kind(p.ref.key) not in ("ids", "topk") or row["frac_equal"] is None:
            continue
        mk = margin_key(p.ref.key)
        j = at.get((mk,) + row_key(row)[1:]) if mk else None
        if j is None:
            if row["frac_equal"] < 1.0:
                table.at[i, "reason"] = row["reason"] + "; no margin tap, so a near-tie cannot be told from a changed decision"
            continue
        try:
            tensors = (p.target.load(tdump), p.ref.load(rdump), pairs[j].target.load(tdump), pairs[j].ref.load(rdump))
        except ShapeMismatch as exc:
            table.at[i, "reason"] = row["reason"] + f"; margins not usable: {exc}"
            continue
        groups.setdefault((p.ref.key, row["phase"], row["rank"]), []).append((i, tensors))
    times = f"{NEAR_TIE:g}x"
    for members in groups.values():
        scale, off = flip_scale([t for _, t in members])
        for i, tensors in members:
            row = table.iloc[i]
            if row["frac_equal"] >= 1.0:
                continue
            d = size_flips(*tensors, scale=scale)
            if "error" in d:
                table.at[i, "reason"] = row["reason"] + f"; margins not usable: {d['error']}"
                continue
            if off:  # the scores that decide differ beyond rounding: no flip is a near-tie
                d["changed"], d["near_tie"] = d["flipped"], 0
            n = d["tokens"] or 1
            near, changed = d["near_tie"] / n, d["changed"] / n
            table.at[i, "flip_near_tie"], table.at[i, "flip_changed"] = near, changed
            if changed == 0:
                what = f"all near-ties (margins within {times} the scores' rounding, {scale:.1e})"
            else:
                what = f"decision changed for {changed:.1%} of tokens, near-tie for {near:.1%} " + (
                    f"({off})" if off else f"(margins beyond {times} the scores' rounding, {scale:.1e})")
            table.at[i, "reason"] = row["reason"] + "; " + what
            if changed > IDS_FAIL_FRAC:
                table.at[i, "verdict"] = "fail"


def _annotate_flips(table: pd.DataFrame, pairs: list[Pair]) -> None:
    """Mark failing rows that sit downstream (same sequence, earlier in
    execution) of a discrete decision that flipped."""
    from parity.decisions import decision_kind

    seen: dict = {}
    flips = []
    for i, p in enumerate(pairs):
        row = table.iloc[i]
        kind = decision_kind(p.ref.key)
        if kind in ("ids", "topk") and row["verdict"] != "pass" and row["frac_equal"] is not None \
                and row["frac_equal"] < 1.0:
            seen.setdefault(p.target.seq, f"L{row['layer']} {row['stage']} "
                                          f"({1 - row['frac_equal']:.1%} of tokens)")
        flip = seen.get(p.target.seq) or (seen.get(None) if p.target.seq is not None else None)
        flips.append(flip if (row["verdict"] == "fail" and flip and kind not in ("ids", "topk")) else "")
    table["flip_upstream"] = flips
    mask = table["flip_upstream"] != ""
    table.loc[mask, "reason"] = table.loc[mask, "reason"] + "; a decision flipped upstream: " + \
        table.loc[mask, "flip_upstream"]


def compare_dumps(ref, target, *, mapping=None, preset: str | None = None, floor=None, filter=None,
                  m: float | None = None, atol: float | None = None, check_tokens: bool = True,
                  decisions: bool = True, noise=None, token_errors: bool = False) -> CompareResult:
    """Align the records of ``ref`` and ``target`` (dump dirs or Dumps) and
    compare every pair. ``mapping``: a mapping file, a Mapping, or None
    (identity); ``preset``: a preset name. ``floor``: the reference run at
    higher precision, for noise-floor verdicts (``m``, ``atol`` override the
    per-dtype defaults). ``noise``: a NoiseModel, or member dump dirs of one
    (perturbed reference runs): each pair is judged against its record's
    envelope, and that takes precedence over the floor and fixed thresholds.
    ``token_errors``: also the median over tokens of the per-token error
    (column token_median; always with ``noise``). ``filter``: regular
    expression on canonical keys."""
    if noise is not None and not hasattr(noise, "envelope"):
        from parity.noise import noise_model

        noise = noise_model(ref, list(noise), mapping=mapping, preset=preset, filter=filter,
                            check_tokens=check_tokens)
    rd, td = as_dump(ref), as_dump(target)
    fd = as_dump(floor) if floor is not None else None
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(rd, td))
    notes = []
    if check_tokens:
        n = check_token_ids(rd, td)
        if n:
            notes.append(n)
    pat = re.compile(filter) if isinstance(filter, str) else filter
    keep = (lambda k: pat.search(k) is not None) if pat is not None else None
    rs, ts = cut_dump(rd, mapping, keep=keep, side="ref"), cut_dump(td, mapping, keep=keep, side="target")
    for side, name in ((rs, "reference"), (ts, "target")):
        if not side.pieces:
            what = f"--filter {pat.pattern!r} matches no tensor record" if pat else "no tensor records"
            raise ParityError(f"{name} dump {side.dump.given}: {what}"
                              + (f" ({side.unmapped} records were not covered by the mapping)" if side.unmapped else "")
                              + side.dump.stats_only_hint())
        if side.unmapped:
            notes.append(f"{side.unmapped} {name} records are not covered by the mapping and were skipped")
    al: Alignment = align(rs, ts)
    notes += al.notes
    if not al.pairs:
        raise ParityError("no record of the reference meets one of the target: the names differ "
                          f"(e.g. reference {rs.pieces[0].key!r}, target {ts.pieces[0].key!r}); "
                          "give --map FILE or --preset NAME")
    floor_idx = {}
    if fd is not None:
        for p in cut_dump(fd, mapping, keep=keep, side="ref").pieces:
            floor_idx.setdefault(p.match, []).append(p)
    precision = run_precision(rd, td)
    rows = []
    rel_r = ShardReleaser(rd, [r for p in al.pairs for r in p.ref.recs])
    rel_t = ShardReleaser(td, [r for p in al.pairs for r in p.target.recs])
    for pair in al.pairs:
        fp = None
        if fd is not None:
            cands = floor_idx.get(pair.ref.match, [])
            fp = next((c for c in cands if c.rank == pair.ref.rank), None) or next(
                (c for c in cands if c.rank is None), None)
        rows.append(_row(pair, rd, td, fp, fd, m, atol, precision, noise, token_errors or noise is not None))
        rel_r.done(pair.ref.recs)
        rel_t.done(pair.target.recs)
    cols = COLUMNS + (["err_target_floor", "err_ref_floor"] if fd is not None else []) + \
        (["token_median"] if token_errors or noise is not None else []) + (["noise_env"] if noise is not None else [])
    table = frame(rows, cols)
    dec = None
    if decisions:
        from parity.decisions import decision_kind, decisions_from_alignment

        if any(decision_kind(p.ref.key) for p in al.pairs):
            _size_flips(table, al.pairs, rd, td)
            _annotate_flips(table, al.pairs)
            dec = decisions_from_alignment(al, rd, td)
    if "flip_upstream" not in table:
        table["flip_upstream"] = ""
    if noise is not None:
        notes.append(f"verdicts against a noise model of {len(noise)} perturbed reference runs")
    return CompareResult(table, _only_frame(al.only_ref), _only_frame(al.only_target), notes, dec, fd is not None)
