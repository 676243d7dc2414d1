"""Slot (batch) invariance: does a sequence get the same bits whatever else
shares its batch?

Each record of a batched run is cut per sequence with its layout metadata
(ragged ``cu_seqlens`` of unequal lengths included) and compared with the same
record of a solo run of that prompt, or with slot 0 when the batch holds N
copies of one prompt. Invariance is bitwise: a slot that is merely close is
not invariant, and its error is reported so the size of the leak is visible.

Bitwise equality is checked first on integer views of the bits
(``torch.equal`` stops at the first difference and never converts); float
metrics are computed only for slots that differ. Memory maps are dropped as
soon as their records are done, so the resident set stays near one record.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch

from parity.compare.api import frame
from parity.compare.align import (ShardReleaser, _cut, as_dump, position_label, prompt_lens, split_key,
                                  squeeze_leading, take, token_ids)
from parity.errors import ParityError
from parity.store.reader import Dump
from parity.store.schema import Record

# float64 work in pieces of 2^20 elements: few enough ops that a busy machine
# (threads descheduled at each parallel region) does not multiply the cost.
_BLOCK = 1 << 20
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
COLUMNS = ["key", "layer", "stage", "phase", "step", "rank", "slot", "seq", "tokens", "frac_equal", "cos",
           "rel_l2", "max_abs", "invariant", "verdict", "reason"]
Mode = Literal["auto", "bitwise", "rounding"]


@dataclass(frozen=True)
class SlotJudge:
    """The rule every (record, slot) pair is judged by. ``noise`` is a
    NoiseModel keyed by canonical keys; ``canonical`` maps this run's record
    keys onto them (the mapping a ref-vs-target of this implementation uses)."""

    mode: Literal["bitwise", "rounding"]
    precision: str | None = None
    noise: object = None
    canonical: object = None

    @property
    def rule(self) -> str:
        if self.mode == "bitwise":
            return "bitwise: a slot must equal its baseline bit for bit"
        if self.noise is not None:
            return f"rounding: each pair against its record's envelope (noise model, {len(self.noise)} members)"
        from parity.compare.verdict import thresholds_for

        return f"rounding: each pair against the {thresholds_for(None, precision=self.precision).label} fixed limits"

    def judge(self, key: str, phase, rank, dtype, m: dict):
        """Verdict of a pair whose bits differ, from its metrics ``m``."""
        from parity.compare.verdict import Verdict, flip_verdict, noise_flip_verdict, noise_verdict, verdict_for

        if self.mode == "bitwise":
            return Verdict("fail", m["reason"])
        nkey = None
        if self.noise is not None:
            c = self.canonical(key) if self.canonical is not None else key
            nkey = None if c is None else (c, phase, None, None, rank)
        if m.get("rel_l2") is None:  # an integer decision: the share of elements it changed
            frac = 1.0 - m["frac_equal"]
            env = self.noise.flip_envelope(nkey) if nkey is not None else None
            return flip_verdict(frac) if env is None else noise_flip_verdict(frac, env, len(self.noise))
        env = self.noise.envelope(nkey) if nkey is not None else None
        if env is not None:
            return noise_verdict(m["rel_l2"], env, dtype, len(self.noise))
        return verdict_for({"rel_l2": m["rel_l2"], "cos": m["cos"], "dtype_a": dtype, "dtype_b": dtype},
                           precision=self.precision)


@dataclass
class SlotResult:
    table: pd.DataFrame             # one row per (record, slot) in execution order
    first: pd.DataFrame             # per (slot, phase, step): first failing layer and stage
    judge: SlotJudge = SlotJudge("bitwise")
    notes: list[str] = field(default_factory=list)

    @property
    def invariant(self) -> bool:
        """Bitwise invariant, whatever rule judged."""
        return bool(len(self.table)) and bool(self.table["invariant"].all())

    @property
    def status(self) -> str:
        """pass (bitwise, or within rounding), warn (suspect pairs), fail."""
        v = self.table["verdict"]
        return "fail" if not len(self.table) or (v == "fail").any() else "warn" if (v == "warn").any() else "pass"

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "fail" else 0

    @property
    def message(self) -> str:
        t = self.table
        n = len(t)
        if self.invariant:
            return f"bitwise invariant: all {n} (record, slot) pairs equal their baselines"
        differ = int((~t["invariant"]).sum())
        if self.status == "fail":
            f = self.first.iloc[0]
            where = f["phase"] + (f" step {f['step']}" if f["phase"] == "decode" else "")
            slots = ", ".join(str(s) for s in sorted(set(self.first["slot"])))
            beyond = "differs from its baseline" if self.judge.mode == "bitwise" else \
                "computes something else (beyond rounding)"
            return (f"slot {f['slot']} (seq {f['seq']}) {beyond}: first at layer {f['layer']} {f['stage']} "
                    f"({where}; {f['reason']}); slots affected: {slots}")
        suspect = int((t["verdict"] == "warn").sum())
        floats = t[~t["invariant"] & t["rel_l2"].notna()]
        worst = f"; worst rel_l2 {float(floats['rel_l2'].max()):.1e}" if len(floats) else ""
        text = f"not bitwise, within rounding: {differ} of {n} (record, slot) pairs differ{worst}"
        if suspect:
            text += f"; {suspect} suspect pair(s) (above the pass limit, below the fail limit)"
        return text


def _libc_memcmp():
    try:
        libc = ctypes.CDLL(None)
        fn = libc.memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


# memcmp runs at memory bandwidth and releases the GIL; torch.equal compares
# element by element and is about ten times slower on page-cached dumps.
_memcmp = _libc_memcmp()


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if _memcmp is not None and a.device.type == "cpu" and b.device.type == "cpu" \
            and a.is_contiguous() and b.is_contiguous():
        n = a.numel() * a.element_size()
        return n == 0 or _memcmp(a.data_ptr(), b.data_ptr(), n) == 0
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    # Integer views: NaN payloads and signed zeros count, and no conversion runs.
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def _same_topk_rows(key: str | None, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Indexer top-k rows (the tap, or the indexer module's output) of
    different widths: an engine may pad each row to the widest sequence of
    its batch, so the width is layout and the entries padded with -1 are the
    decision, as ref-vs-target reads them."""
    from parity.decisions import decision_kind

    topk = key is not None and (decision_kind(key) == "topk" or key.split(":", 1)[0].endswith(".indexer"))
    return (topk and not a.is_floating_point()
            and not b.is_floating_point() and a.dim() == b.dim() >= 1 and a.shape[:-1] == b.shape[:-1])


def _compare(a: torch.Tensor, b: torch.Tensor, key: str | None = None) -> dict:
    """Metrics of slot ``a`` against its baseline ``b``; floats only when the bits differ."""
    a, b = squeeze_leading(a), squeeze_leading(b)
    if a.shape != b.shape and _same_topk_rows(key, a, b):
        from parity.decisions import pad_width

        lead = a.shape[:-1]
        a, b = (t.reshape(*lead, t.shape[-1]) for t in pad_width(a, b))
    if a.shape != b.shape:
        return {"invariant": False, "reason": f"shape {list(a.shape)} vs baseline {list(b.shape)}"}
    if a.dtype != b.dtype:
        return {"invariant": False, "reason": f"dtype {a.dtype} vs baseline {b.dtype}"}
    if bitwise_equal(a, b):
        return {"frac_equal": 1.0, "cos": 1.0 if a.is_floating_point() else None,
                "rel_l2": 0.0 if a.is_floating_point() else None, "max_abs": 0.0, "invariant": True, "reason": ""}
    with _one_thread():
        m = _diff_metrics(a, b)
    reason = f"bits differ in {_percent(1 - m['frac_equal'])} of elements"
    if m.pop("nonfinite"):
        reason += "; NaN/Inf positions differ"
    return {**m, "invariant": False, "reason": reason}


def _percent(frac: float) -> str:
    """A share as a percentage that never rounds a real difference to 0%
    or a partial one to 100%."""
    if frac >= 1.0:
        return "100%"
    text = f"{frac * 100:.3g}%"
    return "> 99.9%" if text == "100%" else text


@contextlib.contextmanager
def _one_thread():
    """Run the float path on one intra-op thread. Its blocks are memory-bound
    and small; with more threads every op is a parallel region, and on a busy
    machine each region waits for a descheduled thread: measured 3 s with one
    thread against 6-16 s with two on the 2-core benchmark under load."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _diff_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Bitwise-equal fraction, float64 cosine, rel_l2 (to the baseline ``b``)
    and max abs difference of two same-dtype tensors, a bounded block at a
    time. Only these: slots
    that differ are compared many times over, and the full pair metrics
    (ULP histograms and all) cost ten times as much."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    bits = _BITS.get(a.element_size()) if a.dtype != torch.bool else None
    floating = a.is_floating_point()
    n_eq, dot, aa, bb, dd, mx, nonfinite = 0, 0.0, 0.0, 0.0, 0.0, 0.0, False
    buf = torch.empty(2, min(n, _BLOCK), dtype=torch.float64)
    for s in range(0, n, _BLOCK):
        ca, cb = fa[s:s + _BLOCK], fb[s:s + _BLOCK]
        ne = (ca.view(bits) != cb.view(bits)) if bits is not None else (ca != cb)
        n_eq += ca.numel() - int(torch.count_nonzero(ne))
        x = buf[:, :ca.numel()]
        x[0].copy_(ca)
        x[1].copy_(cb)
        if floating and not bool(torch.isfinite(x).all()):
            ok = torch.isfinite(x[0]) & torch.isfinite(x[1])
            nonfinite = nonfinite or bool(((~ok) & ne).any())
            x = x[:, ok]
        # One Gram product reads both rows once for a.b, a.a and b.b.
        g = (x @ x.T).tolist()
        dot, aa, bb = dot + g[0][1], aa + g[0][0], bb + g[1][1]
        if x.shape[1]:
            # the difference itself, not aa + bb - 2ab: last-bit differences
            # cancel below float64's resolution of the norms
            d = (x[0] - x[1]).abs_()
            mx = max(mx, float(d.max()))
            dd += float(d @ d)
    cos = rel = None
    if floating:
        cos = 1.0 if aa == 0.0 and bb == 0.0 else (0.0 if aa == 0.0 or bb == 0.0 else
                                                   max(-1.0, min(1.0, dot / math.sqrt(aa * bb))))
        rel = math.sqrt(dd / bb) if bb > 0 else (0.0 if dd == 0 else math.inf)
    return {"frac_equal": n_eq / n if n else 1.0, "cos": cos, "rel_l2": rel, "max_abs": mx,
            "nonfinite": nonfinite}


def _solo_index(batched: Dump, solos: list[Dump]) -> tuple[dict[int, Dump], list[str]]:
    """seq_id of the batched run -> the solo dump of that prompt: by run.json
    token ids when both runs have them, else by the solo records' seq_ids."""
    notes = []
    prompts = token_ids(batched)
    out: dict[int, Dump] = {}
    for s in solos:
        ids = token_ids(s)
        if ids is not None and prompts is not None:
            if len(ids) != 1:
                raise ParityError(f"{s.path} is not a solo run: its run.json lists {len(ids)} sequences")
            hits = [i for i, p in enumerate(prompts) if p == ids[0]]
            if not hits:
                raise ParityError(f"{s.path}: its prompt is not one of the batched run's prompts (run.json token_ids)")
        else:
            first = next((r for r in s.records() if r.seq_ids), None)
            if first is None:
                raise ParityError(f"{s.path}: neither run.json token_ids nor record seq_ids say which prompt it ran")
            if len(first.seq_ids) != 1:
                raise ParityError(f"{s.path} is not a solo run: its records cover sequences {first.seq_ids}")
            hits = first.seq_ids
            notes.append(f"{s.path} matched to sequence {hits[0]} by seq_ids (no token ids to check)")
        for i in hits:
            out.setdefault(i, s)
    return out, notes


def _judge(mode: Mode, dumps: list[Dump], precision, noise, mapping, preset) -> SlotJudge:
    from parity.compare.api import run_precision

    if mode not in ("auto", "bitwise", "rounding"):
        raise ParityError(f"unknown slot-invariance mode {mode!r}; choose auto, bitwise or rounding")
    if mode == "bitwise" and noise is not None:
        raise ParityError("a noise model judges the rounding mode; --bitwise takes none")
    if mode == "auto":
        promised = all(isinstance(d.run, dict) and d.run.get("batch_invariant") is True for d in dumps)
        mode = "bitwise" if promised else "rounding"
        if promised:
            noise = None  # a promise of invariance is held to the bit, whatever the ensemble allows
    canonical = None
    if noise is not None:
        from parity.compare.align import resolve_mapping

        m = mapping if mapping is not None and not isinstance(mapping, str) else resolve_mapping(mapping, preset)
        canonical = lambda key: m.canonical(key, "target")  # the ensemble is of the reference
    return SlotJudge(mode, precision if precision is not None else run_precision(*dumps), noise, canonical)


def _judged(row: dict, dtype: str | None, judge: SlotJudge) -> dict:
    """The row's verdict: bitwise equal passes; a layout or shape problem, or
    NaN/Inf in other places, fails under any rule; the rest is the judge's."""
    if row.get("invariant"):
        row.update(verdict="pass")
    elif row.get("frac_equal") is None or "NaN/Inf" in row.get("reason", ""):
        row.update(verdict="fail")
    else:
        v = judge.judge(row["key"], row["phase"], row["rank"], dtype, row)
        row.update(verdict=v.status, reason=row["reason"] + ("" if judge.mode == "bitwise" else f"; {v.reason}"))
    return row


def slot_invariance(batched, solo=None, *, same_prompt: bool = False, filter=None, mode: Mode = "auto",
                    noise=None, mapping=None, preset: str | None = None, precision: str | None = None) -> SlotResult:
    """Compare every sequence of the ``batched`` run with its solo run
    (``solo``: dump dirs or Dumps, matched by prompt) or, with
    ``same_prompt``, with slot 0 of the same batch.

    ``mode``: bitwise, rounding, or auto (bitwise when every run declares
    ``batch_invariant: true``). ``noise``: a NoiseModel for the rounding mode,
    with the ``mapping``/``preset`` that takes this run's keys onto its keys;
    ``precision``: the run precision the fixed limits are picked for (default:
    what the runs declare)."""
    bdump = as_dump(batched)
    solos = [as_dump(s) for s in (solo or [])]
    if not solos and not same_prompt:
        raise ParityError("give the solo runs (--solo DIR ...) or say the batch repeats one prompt (--same-prompt)")
    if solos and same_prompt:
        raise ParityError("--solo and --same-prompt exclude each other")
    judge = _judge(mode, [bdump, *solos], precision, noise, mapping, preset)
    pat = re.compile(filter) if isinstance(filter, str) else filter
    recs = [r for r in bdump.records() if r.kind == "tensor" and (pat is None or pat.search(r.key))]
    if not recs:
        raise ParityError(f"{bdump.path}: no tensor records to compare" + (" (after --filter)" if pat else "")
                          + bdump.stats_only_hint())
    notes: list[str] = []
    solo_of: dict[int, Dump] = {}
    solo_recs: dict[int, dict[tuple, Record]] = {}
    rel_solo: dict[int, ShardReleaser] = {}
    if solos:
        solo_of, notes = _solo_index(bdump, solos)
        for s in solos:
            idx, lens = {}, prompt_lens(s)
            for r in s.records():
                if r.kind == "tensor":
                    # by position: a solo prompt's chunks and steps meet the
                    # batched run's rows of the same positions
                    ph, stp, start = position_label(r, (r.seq_ids or [None])[0], lens)
                    idx[(r.key, ph, stp, r.call, r.rank, start)] = r
            solo_recs[id(s)] = idx
            rel_solo[id(s)] = ShardReleaser(s, idx.values())
    rel = ShardReleaser(bdump, recs)
    rows = []
    unsplit = 0
    blens = prompt_lens(bdump)
    for rec in sorted(recs, key=lambda r: (r.rank, r.seq)):
        cuts = _cut(rec)
        layer, stage = split_key(rec.key, rec.layer)
        base = dict(key=rec.key, layer=layer, stage=stage, phase=rec.phase, step=rec.step, rank=rec.rank)
        if cuts[0][0] is None or (same_prompt and len(cuts) < 2):
            unsplit += 1
            rel.done([rec])
            continue
        t = bdump.load(rec)
        piece = lambda c: take(t, c[1], c[2])
        if same_prompt:
            ref_cut = cuts[0]
            for slot, c in enumerate(cuts[1:], start=1):
                row = dict(base, slot=slot, seq=c[0])
                if c[3] or ref_cut[3]:
                    row.update(invariant=False, reason=c[3] or ref_cut[3])
                else:
                    a, b = piece(c), piece(ref_cut)
                    row["tokens"] = a.shape[0] if c[2] is not None else None
                    if c[2] is not None and a.shape[0] != b.shape[0]:
                        row.update(invariant=False, reason=f"{a.shape[0]} tokens vs {b.shape[0]} in slot 0: "
                                                           "--same-prompt needs copies of one prompt")
                    else:
                        row.update(_compare(a, b, rec.key))
                rows.append(_judged(row, rec.dtype, judge))
        else:
            for slot, c in enumerate(cuts):
                s = solo_of.get(c[0])
                if s is None:
                    continue
                ph, stp, start = position_label(rec, c[0], blens)
                row = dict(base, slot=slot, seq=c[0], phase=ph, step=stp)
                srec = solo_recs[id(s)].get((rec.key, ph, stp, rec.call, rec.rank, start))
                if c[3]:
                    row.update(invariant=False, reason=c[3])
                elif srec is None:
                    row.update(invariant=False, reason=f"no such record in the solo run {s.path}")
                else:
                    a = piece(c)
                    row["tokens"] = a.shape[0] if c[2] is not None else None
                    sc = _cut(srec)
                    if len(sc) != 1 or sc[0][3]:
                        row.update(invariant=False, reason=sc[0][3] or f"solo record covers {len(sc)} sequences")
                    else:
                        st = solo_dump_piece(s, srec, sc[0])
                        row.update(_compare(a, st, rec.key))
                        del st
                    rel_solo[id(s)].done([srec])
                rows.append(_judged(row, rec.dtype, judge))
        del t, piece
        rel.done([rec])
    if unsplit:
        notes.append(f"{unsplit} record(s) without per-sequence layout were skipped")
    if solos:
        all_seqs = {i for r in recs for i in (r.seq_ids or [])}
        if all_seqs - set(solo_of):
            notes.append(f"no solo run for sequence(s) {sorted(all_seqs - set(solo_of))}: not compared")
    table = frame(rows, COLUMNS)
    table["invariant"] = table["invariant"].astype(bool)
    return SlotResult(table, _first(table), judge, notes)


def solo_dump_piece(dump: Dump, rec: Record, cut) -> torch.Tensor:
    return take(dump.load(rec), cut[1], cut[2])


def _first(table: pd.DataFrame) -> pd.DataFrame:
    """Per (slot, phase, step, rank): the first failing pair, in execution order."""
    cols = ["slot", "seq", "phase", "step", "rank", "layer", "stage", "key", "frac_equal", "rel_l2", "max_abs",
            "reason"]
    out = []
    seen = defaultdict(bool)
    for r in table.itertuples(index=False):
        k = (r.slot, r.phase, r.step, r.rank)
        if r.verdict == "fail" and not seen[k]:
            seen[k] = True
            out.append({c: getattr(r, c) for c in cols})
    return frame(out, cols)
