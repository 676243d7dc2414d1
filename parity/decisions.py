"""Discrete decisions: top-k index sets (sparse-attention indexer) and MoE
routing (expert ids and weights).

A decision that flips is not an arithmetic error by itself: a near-tie
flips under any rounding. What matters is whether a failing tensor sits
downstream of a flip (then the divergence may be noise amplified by a
discrete choice) or not (then something computed differently). Sets are
compared, not positions: the order of the top-k is not part of the decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from parity.compare.align import Alignment, Pair, as_dump, align, cut_dump, resolve_mapping, split_key

# (suffix of the module part of a canonical key, kind)
DECISION_TAPS = ((".indexer.topk", "topk"), (".topk_ids", "ids"), (".topk_weights", "weights"),
                 (".topk_margin", "margin"))
# An implementation may tap, next to a decision, the margin each token's
# choice was made by: the k-th largest selection score minus the (k+1)-th
# (``topk_margin``). A flip is a near-tie only when that margin is within
# NEAR_TIE times the margin difference the two runs show at nine in ten of
# the tokens where they agree (flip_scale): the scores' own rounding,
# measured on the pair, pooled over the record's steps and sequences.
MARGIN_OF = {".topk_ids": ".topk_margin", ".indexer.topk": ".indexer.topk_margin"}
NEAR_TIE = 4.0
# Margins that differ, where decisions agree, by this share of a typical
# margin mean the scores themselves differ: no flip is then a near-tie.
SCORES_OFF = 0.1
_ROWS = 1 << 14  # tokens per block when scattering weights to a dense [tokens, experts]


def margin_key(key: str) -> str | None:
    """The canonical key of the margin tap that goes with decision ``key``."""
    module, _, stage = key.partition(":")
    for suffix, margin in MARGIN_OF.items():
        if module.endswith(suffix):
            return module[: -len(suffix)] + margin + ":" + stage
    return None


def topk_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores`` [..., n]: the k-th largest minus the (k+1)-th,
    in float32 (what an implementation taps as ``topk_margin``). Rows with
    no candidate left out get +inf: no rounding can flip them."""
    s = scores.float()
    if s.shape[-1] <= k:
        return torch.full(s.shape[:-1], float("inf"), device=s.device)
    top = s.topk(k + 1, dim=-1).values
    return top[..., k - 1] - top[..., k]


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).double()


def flip_scale(members) -> tuple[float, str | None]:
    """The yardstick of one decision record: the margin difference the two
    runs show at nine in ten of the tokens where they decide alike, over
    ``members`` (a_ids, b_ids, margin_a, margin_b) of that record. Second: a
    reason when that difference is a sizeable share (SCORES_OFF) of the
    margins themselves (the scores differ beyond rounding), else None."""
    diffs, margins = [], []
    for a_ids, b_ids, m_a, m_b in members:
        if _rows(a_ids).shape[0] != _rows(b_ids).shape[0]:
            continue  # a layout problem, reported by the decision row itself
        a, b = pad_width(a_ids, b_ids)
        same = set_overlap(a, b) >= 1.0
        ma, mb = _rows_of(m_a), _rows_of(m_b)
        if ma.numel() != same.numel() or mb.numel() != same.numel():
            continue
        ok = torch.isfinite(ma) & torch.isfinite(mb)
        diffs.append((ma - mb).abs()[ok & same])
        margins.append(mb[torch.isfinite(mb)].abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    m = torch.cat(margins) if margins else torch.zeros(0, dtype=torch.float64)
    # The 90th percentile, not the maximum: a bug that moves the scores of a
    # few tokens must not widen the yardstick for all of them.
    scale = float(d.quantile(0.9)) if d.numel() else 0.0
    # Margins equal to the bit where decisions agree still round somewhere:
    # one unit of the margins' own size is the least a flip may cross.
    typical = float(m.median()) if m.numel() else 0.0
    scale = max(scale, typical * torch.finfo(torch.float32).eps)
    if typical > 0 and scale > SCORES_OFF * typical:
        return scale, (f"the margins differ by {scale:.1e} where the decisions agree, {scale / typical:.2g} of a "
                       "typical margin: the scores differ beyond rounding")
    return scale, None


def size_flips(a_ids, b_ids, m_a, m_b, *, scale: float) -> dict:
    """Flipped tokens of a decision pair (target a, reference b): ``near_tie``
    where the reference's margin is within NEAR_TIE x ``scale``, ``changed``
    beyond it."""
    if _rows(a_ids).shape[0] != _rows(b_ids).shape[0]:
        return {"error": f"{_rows(a_ids).shape[0]} vs {_rows(b_ids).shape[0]} decision rows"}
    a, b = pad_width(a_ids, b_ids)
    flipped = set_overlap(a, b) < 1.0
    mb = _rows_of(m_b)
    if mb.numel() != flipped.numel() or _rows_of(m_a).numel() != flipped.numel():
        return {"error": f"margin rows {mb.numel()} vs {flipped.numel()} decision rows"}
    tie = mb.abs() <= NEAR_TIE * scale
    n_flip = int(flipped.sum())
    near = int((flipped & tie).sum())
    return {"tokens": int(flipped.numel()), "flipped": n_flip, "near_tie": near, "changed": n_flip - near}


def decision_kind(key: str) -> str | None:
    module = key.split(":", 1)[0]
    for suffix, kind in DECISION_TAPS:
        if module.endswith(suffix) or module == suffix.lstrip("."):
            return kind
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)
    return t if t.dim() == 2 else t.reshape(-1, 1)


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row (token): |A & B| / max(|A|, |B|) of the index sets, ignoring
    negative entries (no selection). 1.0 when both sets are empty."""
    a, b = _rows(a).to(torch.int64), _rows(b).to(torch.int64)
    n_a, n_b = (a >= 0).sum(-1), (b >= 0).sum(-1)
    # Each side holds distinct indices, so equal neighbours in the merged,
    # sorted row are exactly the common ones.
    s = torch.cat([a, b], -1).sort(-1).values
    common = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).sum(-1)
    denom = torch.maximum(n_a, n_b)
    return torch.where(denom > 0, common.double() / denom.clamp(min=1).double(), torch.ones_like(common, dtype=torch.float64))


def weight_error(ids_a, w_a, ids_b, w_b) -> torch.Tensor:
    """Per token: sum |w_a(e) - w_b(e)| over the union of chosen experts,
    divided by sum |w_b(e)|; expert ids align the weights, not positions."""
    ids_a, ids_b = _rows(ids_a).to(torch.int64), _rows(ids_b).to(torch.int64)
    w_a, w_b = _rows(w_a), _rows(w_b)
    n_exp = int(max(ids_a.max(), ids_b.max(), 0)) + 1
    out = []
    for s in range(0, ids_a.shape[0], _ROWS):
        sl = slice(s, s + _ROWS)
        da = torch.zeros(ids_a[sl].shape[0], n_exp, dtype=torch.float64)
        db = torch.zeros_like(da)
        ia, ib = ids_a[sl].clamp(min=0), ids_b[sl].clamp(min=0)
        da.scatter_add_(1, ia, w_a[sl].double() * (ids_a[sl] >= 0))
        db.scatter_add_(1, ib, w_b[sl].double() * (ids_b[sl] >= 0))
        num = (da - db).abs().sum(-1)
        den = db.abs().sum(-1)
        out.append(torch.where(den > 0, num / den.clamp(min=1e-300), num))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class DecisionResult:
    table: pd.DataFrame             # per (layer, decision): overlap, flips, weight error
    notes: list[str] = field(default_factory=list)
    missing: str | None = None      # why the reference's decision taps missing from the target fail it

    @property
    def exit_code(self) -> int:
        if not len(self.table):
            return 0
        return 1 if (self.table["frac_tokens_differ"].fillna(0) > 0).any() else 0


def pad_width(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows of two widths padded with -1 to the wider one: the sets
    are what matter, and one side may keep only valid entries
    (``[T, 2]``) where the other pads to ``index_topk`` (``[T, 8]``)."""
    a, b = _rows(a), _rows(b)
    w = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t.to(torch.int64), (0, w - t.shape[1]), value=-1) if t.shape[1] < w else t
    return pad(a), pad(b)


def ids_row(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Row metrics for one aligned pair of index taps (target a, reference b)."""
    if _rows(a).shape[0] != _rows(b).shape[0]:
        return {"error": f"shape mismatch: target {list(a.shape)} vs reference {list(b.shape)} "
                         f"({_rows(a).shape[0]} vs {_rows(b).shape[0]} token rows)"}
    a, b = pad_width(a, b)
    ov = set_overlap(a, b)
    n = ov.numel()
    differ = int((ov < 1.0).sum())
    return {"tokens": n, "overlap_sum": float(ov.sum()), "overlap_min": float(ov.min()) if n else 1.0,
            "differ": differ}


def _agg(rows: list[dict]) -> dict:
    n = sum(r["tokens"] for r in rows)
    return {"tokens": n, "mean_overlap": sum(r["overlap_sum"] for r in rows) / n if n else 1.0,
            "min_overlap": min((r["overlap_min"] for r in rows), default=1.0),
            "frac_tokens_differ": sum(r["differ"] for r in rows) / n if n else 0.0}


def decisions_from_alignment(al: Alignment, ref_dump, target_dump) -> DecisionResult:
    """One row per (layer, decision) from the decision taps among ``al``'s pairs."""
    per: dict[tuple, dict] = {}
    weights: dict[tuple, list[Pair]] = {}
    ids_pairs: dict[tuple, Pair] = {}
    notes = []
    for p in al.pairs:
        kind = decision_kind(p.ref.key)
        if kind is None:
            continue
        layer, stage = split_key(p.ref.key, p.target.rec.layer)
        if kind == "weights":
            weights.setdefault((layer, p.ref.key), []).append(p)
            continue
        ent = per.setdefault((layer, stage), {"layer": layer, "decision": stage, "key": p.ref.key, "rows": []})
        a, b = p.target.load(target_dump), p.ref.load(ref_dump)
        r = ids_row(a, b)
        if "error" in r:
            notes.append(f"{p.ref.key} seq {p.ref.seq}: {r['error']}")
            continue
        ent["rows"].append(r)
        if kind == "ids":
            ids_pairs[(p.ref.key.replace(".topk_ids", ".topk_weights"),) + p.ref.match[1:] + (p.rank,)] = p
    out = []
    for (layer, stage), ent in per.items():
        if not ent["rows"]:
            continue
        row = {"layer": layer, "decision": stage, **_agg(ent["rows"]), "weight_err_mean": None,
               "weight_err_max": None}
        out.append(row)
        if decision_kind(ent["key"]) != "ids":
            continue
        errs = []
        wkey = ent["key"].replace(".topk_ids", ".topk_weights")
        for wp in weights.get((layer, wkey), []):
            ip = ids_pairs.get((wkey,) + wp.ref.match[1:] + (wp.rank,))
            if ip is None:
                continue
            wa, wb = wp.target.load(target_dump), wp.ref.load(ref_dump)
            ia, ib = ip.target.load(target_dump), ip.ref.load(ref_dump)
            if _rows(wa).shape == _rows(ia).shape and _rows(wb).shape == _rows(ib).shape:
                errs.append(weight_error(ia, wa, ib, wb))
        if errs:
            e = torch.cat(errs)
            row["weight_err_mean"] = float(e.mean()) if e.numel() else 0.0
            row["weight_err_max"] = float(e.max()) if e.numel() else 0.0
    cols = ["layer", "decision", "tokens", "mean_overlap", "min_overlap", "frac_tokens_differ",
            "weight_err_mean", "weight_err_max"]
    table = pd.DataFrame(out, columns=cols)
    if len(table):
        table = table.sort_values(["layer", "decision"], na_position="first", kind="stable").reset_index(drop=True)
    return DecisionResult(table, notes)


def compare_decisions(ref, target, *, mapping=None, preset: str | None = None, filter=None) -> DecisionResult:
    """Per layer: mean and min top-k set overlap, fraction of tokens whose
    decision differs, and the routing-weight error (aligned by expert id).
    ``mapping``: a rules file, a Mapping or None; ``preset``: a preset name."""
    import re

    rd, td = as_dump(ref), as_dump(target)
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(rd, td))
    pat = re.compile(filter) if isinstance(filter, str) else filter
    keep = lambda k: decision_kind(k) is not None and (pat is None or pat.search(k) is not None)
    al = align(cut_dump(rd, mapping, keep=keep, side="ref"), cut_dump(td, mapping, keep=keep, side="target"))
    res = decisions_from_alignment(al, rd, td)
    if al.only_ref:
        from parity.compare.api import missing_message

        res.missing = missing_message(len(al.only_ref), len({p.key for p in al.only_ref}))
    if not al.pairs:
        res.notes.append("no decision taps (indexer.topk, topk_ids, topk_weights) found on both sides")
    return res
