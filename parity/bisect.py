"""First divergence: the layer where an error enters, then the stage inside it.

An error *enters* at a layer whose verdict fails while its input passes,
or while its input only warns and the layer grows the error more than
ENTRY_GROWTH times; inside that layer, the first stage where it enters is
shown with its input and output errors side by side, so "the error enters
here" and "the error was already there" read apart. The per-layer error
curve (err L / err L-1) shows amplification; nothing assumes that error
grows monotonically, so every layer where an error enters is listed.

Judged by fixed thresholds alone (no noise model, no floor), the error
profile is evidence too: a layer whose error grows PROFILE_JUMP times more
than the layers typically grow it, to at least a warn, is where an error
enters, even when no pair fails.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pandas as pd

from parity.compare.api import CompareResult, compare_dumps
from parity.decisions import decision_kind

_RANK = {"pass": 0, "warn": 1, "fail": 2}
_STATUS = {v: k for k, v in _RANK.items()}
# A warn input whose error the stage at most doubles is carried, not entered:
# rounding through one layer grows an error 1.0-1.3x (docs/calibration.md).
ENTRY_GROWTH = 2.0
# An error-profile entry: a layer that grows the error at least this many
# times the median growth of the layers (and at least this many times in
# absolute terms), to a warn or worse. Clean runs grow it 1.0-1.3x per layer
# and up to 2.2x at the first layer, from the rounded embedding; why 2:
# docs/calibration.md.
PROFILE_JUMP = 2.0


@dataclass
class BisectResult:
    layer: int | None               # first layer where an error enters (None: no layer does)
    stage: str | None               # first failing stage inside it
    key: str | None
    message: str
    stages: pd.DataFrame            # every stage of that layer: input/output error, status, what it means
    curve: pd.DataFrame             # per layer: error, growth over the previous layer, status
    entries: list[int] = field(default_factory=list)   # every layer where an error enters
    compare: CompareResult | None = None
    by_profile: bool = False        # the entry was found by the error profile, no pair failing

    @property
    def exit_code(self) -> int:
        if self.by_profile:
            return 1
        return self.compare.exit_code if self.compare is not None else (1 if self.key else 0)


def _per_key(table: pd.DataFrame) -> list[dict]:
    """One entry per canonical key (all sequences, phases, ranks pooled):
    worst status, largest rel_l2, and where the worst row is."""
    out: dict[str, dict] = {}
    for i in range(len(table)):
        r = table.iloc[i]
        e = out.get(r["key"])
        rel = r["rel_l2"]
        rel = float(rel) if rel is not None and not (isinstance(rel, float) and math.isnan(rel)) else None
        st = _RANK.get(r["verdict"], 2)
        if e is None:
            e = out[r["key"]] = {"key": r["key"], "layer": r["layer"], "stage": r["stage"], "status": st,
                                 "err": rel, "where": "", "reason": r["reason"], "flip": r.get("flip_upstream", ""),
                                 "decision": decision_kind(r["key"]) is not None, "order": i}
            e["where"] = _where(r)
            continue
        worse = st > e["status"] or (st == e["status"] and rel is not None and (e["err"] is None or rel > e["err"]))
        if rel is not None and (e["err"] is None or rel > e["err"]):
            e["err"] = rel
        if worse:
            e["status"], e["where"], e["reason"] = st, _where(r), r["reason"]
            e["flip"] = r.get("flip_upstream", "") or e["flip"]
    return sorted(out.values(), key=lambda e: e["order"])


def _where(r) -> str:
    s = f"{r['phase']}" + (f" step {r['step']}" if r["phase"] == "decode" else "")
    if r["seq"] is not None:
        s += f" seq {r['seq']}"
    if r.get("rank") is not None:
        s += f" rank {r['rank']}"
    return s


def _is_layer_own(e, prefix: str) -> bool:
    # The decoder layer's own record: nothing between the layer and the stage.
    return ":" not in e["stage"] and e["stage"].startswith(prefix)


def _layer_view(keys: list[dict]):
    """layers in order of first appearance -> (entries, output entry, input entry or None)."""
    layers: dict[int, list[dict]] = {}
    for e in keys:
        if isinstance(e["layer"], int):
            layers.setdefault(e["layer"], []).append(e)
    view = {}
    for L, es in layers.items():
        own_out = [e for e in es if _is_layer_own(e, "output")]
        own_in = [e for e in es if _is_layer_own(e, "input")]
        body = [e for e in es if not e["decision"]] or es
        view[L] = (es, own_out[0] if own_out else body[-1], own_in[0] if own_in else None)
    return view


def _stage_input(e: dict, layer: list[dict], by_key: dict) -> dict | None:
    """The record that feeds stage ``e``: its own captured input when there
    is one; else the last record before ``e``'s first sub-module record that
    is neither inside ``e``'s module nor a decision (children's hooks fire
    before their parent's output hook)."""
    mod = e["key"].split(":", 1)[0]
    own = next((x for k, x in by_key.items() if k.startswith(mod + ":input") and k != e["key"]), None)
    if own is not None:
        return own
    inside = lambda x: x["key"].split(":", 1)[0].startswith(mod + ".") or x is e
    first = next((x["order"] for x in layer if inside(x)), e["order"])
    prev = [x for x in layer if x["order"] < first and not inside(x) and not x["decision"]
            and not x["key"].split(":", 1)[0] == mod]
    return prev[-1] if prev else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _carried(e: dict, inp: dict | None) -> bool:
    """``e`` carries an error its (warning) input already had."""
    return (inp is not None and inp["status"] >= 1 and inp["err"] is not None and e["err"] is not None
            and e["err"] <= ENTRY_GROWTH * inp["err"])


def _growth(out_err, in_err) -> float | None:
    if out_err is None or in_err is None:
        return None
    return out_err / in_err if in_err > 0 else (math.inf if out_err > 0 else None)


def _profile_entries(curve: pd.DataFrame) -> tuple[list[int], float | None]:
    """Layers whose error jumps beyond how the layers typically grow it, and
    that typical (median) growth."""
    g = [(int(r.layer), _growth(r.err, r.input_err), r.verdict) for r in curve.itertuples(index=False)]
    finite = [x for _, x, _ in g if x is not None and math.isfinite(x)]
    if not finite:
        return [], None
    typical = statistics.median(finite)
    limit = PROFILE_JUMP * max(1.0, typical)
    return [L for L, x, v in g if x is not None and x >= limit and v != "pass"], typical


def bisect_table(res: CompareResult) -> BisectResult:
    keys = _per_key(res.table)
    view = _layer_view(keys)
    curve_rows, entries = [], []
    prev_out = None
    first_layer_order = min((es[0]["order"] for es, _, _ in view.values()), default=None)
    before = [e for e in keys if not isinstance(e["layer"], int) and first_layer_order is not None
              and e["order"] < first_layer_order and not e["decision"]]
    upstream = before[-1] if before else None
    layer_input: dict[int, dict | None] = {}
    for L, (es, out, own_in) in view.items():
        inp = own_in or prev_out or upstream
        layer_input[L] = inp
        status = max(e["status"] for e in es if not e["decision"]) if any(not e["decision"] for e in es) else \
            max(e["status"] for e in es)
        in_status = inp["status"] if inp is not None else 0
        growth = None
        if prev_out is not None and prev_out["err"] and out["err"] is not None:
            growth = out["err"] / prev_out["err"]
        enters = status == 2 and in_status < 2 and not _carried(out, inp)
        if enters:
            entries.append(L)
        flips = [e for e in es if decision_kind(e["key"]) in ("ids", "topk") and e["status"] > 0]
        curve_rows.append({"layer": L, "err": out["err"], "growth": growth, "input_err": inp["err"] if inp else None,
                           "verdict": _STATUS[status], "input_verdict": _STATUS[in_status],
                           "enters": enters, "decision_flip": ", ".join(e["stage"] for e in flips)})
        prev_out = out
    curve = pd.DataFrame(curve_rows, columns=["layer", "err", "growth", "input_err", "verdict", "input_verdict",
                                              "enters", "decision_flip"])
    stage_cols = ["stage", "key", "input", "input_err", "output_err", "growth", "verdict", "meaning", "where", "reason"]
    empty = pd.DataFrame(columns=stage_cols)
    level, profile_note = 2, ""
    if not res.failed:
        fixed = "noise_env" not in res.table and not res.floor
        jumps, typical = _profile_entries(curve) if fixed else ([], None)
        if jumps:
            entries, level = jumps, 1
            others = [x for x in (_growth(r.err, r.input_err) for r in curve.itertuples(index=False)
                                  if int(r.layer) not in jumps) if x is not None and math.isfinite(x)]
            spread = f"x{min(others):.2g}-x{max(others):.2g}" if others else "n/a"
            g = _growth(curve.loc[curve["layer"] == jumps[0], "err"].iloc[0],
                        curve.loc[curve["layer"] == jumps[0], "input_err"].iloc[0])
            grown = "from an exact input" if g is not None and math.isinf(g) else f"x{g:.3g}"
            profile_note = (f" (by the error profile, no pair failing: the error grows {grown} here, the other "
                            f"layers {spread}, median x{typical:.2g})")
        else:
            warn = res.table[res.table["verdict"] == "warn"] if len(res.table) else res.table
            if len(warn):  # a suspect pair is a finding, not a pass
                r = warn.iloc[0]
                msg = (f"no divergence proven; {len(warn)} suspect pair(s), the first {r['key']} ({_where(r)}): "
                       f"{r['reason']}")
            else:
                msg = "no divergence: every pair passes"
            return BisectResult(None, None, None, msg, empty, curve, [], res)
    if not entries:
        first = next(e for e in keys if e["status"] == 2)
        where = f"layer {first['layer']}" if isinstance(first["layer"], int) else "outside the decoder layers"
        msg = (f"the first failing record is {first['key']} ({where}, {first['where']}); no layer has a failing "
               f"output with a passing input, so the error is present before the first compared layer or at "
               f"a record with no layer: {first['reason']}")
        return BisectResult(first["layer"] if isinstance(first["layer"], int) else None, first["stage"],
                            first["key"], msg, empty, curve, [], res)
    L = entries[0]
    es, out, own_in = view[L]
    l_in = layer_input[L]
    stage_rows, first_bad, first_entry = [], None, None
    by_key = {e["key"]: e for e in keys}
    for e in es:
        s_in = _stage_input(e, es, by_key) or l_in
        in_err = s_in["err"] if s_in else None
        growth = e["err"] / in_err if in_err and e["err"] is not None else None
        if e["status"] < level:
            meaning = "agrees" if e["status"] == 0 else "close (warn)"
            if e["decision"] and e["status"] > 0:
                meaning = "decision flipped"
        elif first_entry is not None and e is out:
            meaning = f"carries the error of {first_entry['stage']}"
        elif s_in is not None and (s_in["status"] >= level or _carried(e, s_in)):
            meaning = "error was already there" + (
                "" if growth is None else f" and grew x{growth:.3g}" if growth > 1 else f" (x{growth:.3g} of its input's)")
        else:
            meaning = "error enters here"
            first_entry = first_entry or e
        if e["status"] >= level and first_bad is None:
            first_bad = (e, in_err, meaning)
        stage_rows.append({"stage": e["stage"], "key": e["key"], "input": s_in["key"] if s_in else None,
                           "input_err": in_err, "output_err": e["err"],
                           "growth": growth, "verdict": _STATUS[e["status"]], "meaning": meaning,
                           "where": e["where"], "reason": e["reason"]})
    stages = pd.DataFrame(stage_rows, columns=stage_cols)
    if first_entry is not None:
        row = next(r for r in stage_rows if r["key"] == first_entry["key"])
        e, in_err, meaning = first_entry, row["input_err"], row["meaning"]
    else:
        e, in_err, meaning = first_bad
    msg = (f"error enters at layer {L}, stage {e['stage']} ({e['key']}): input error {_fmt(in_err)}, "
           f"output error {_fmt(e['err'])} ({e['where']}); {meaning}{profile_note}")
    flip = [x for x in keys if decision_kind(x["key"]) in ("ids", "topk") and x["status"] > 0 and isinstance(x["layer"], int)
            and x["layer"] <= L and x["order"] < e["order"]]
    if flip:
        t = res.table
        changed = t.loc[t["key"] == flip[0]["key"], "flip_changed"].dropna() if "flip_changed" in t else []
        if len(changed) and float(changed.max()) == 0.0:
            msg += (f". Near-ties flipped upstream ({flip[0]['key']}: {flip[0]['reason']}): the divergence may be "
                    "rounding amplified by a discrete decision rather than an arithmetic bug")
        elif len(changed):
            msg += (f". A decision changed upstream beyond its margins' rounding ({flip[0]['key']}: "
                    f"{flip[0]['reason']}): look there first")
        else:
            msg += (f". A discrete decision flipped upstream ({flip[0]['key']}: {flip[0]['reason']}); with no margin "
                    "tap it may be a near-tie amplified by the decision or a changed choice")
    if len(entries) > 1:
        msg += f". Errors also enter at layer(s) {', '.join(map(str, entries[1:]))}"
    return BisectResult(L, e["stage"], e["key"], msg, stages, curve, entries, res, by_profile=level == 1)


def layer_bisect(ref, target, *, mapping=None, preset=None, floor=None, filter=None, m=None, atol=None,
                 noise=None, compare: CompareResult | None = None) -> BisectResult:
    """Find the first layer and stage where ``target`` stops agreeing with
    ``ref``. Arguments as for ``compare_dumps``; pass ``compare`` to reuse a
    finished comparison."""
    res = compare if compare is not None else compare_dumps(ref, target, mapping=mapping, preset=preset,
                                                            floor=floor, filter=filter, m=m, atol=atol,
                                                            noise=noise)
    return bisect_table(res)
