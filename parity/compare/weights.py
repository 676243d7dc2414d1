"""``parity weights``: compare two weight dumps (records with stage ``weight``).

Quantized weights are compared through their dequantized values: an FP8
``x.weight`` with its UE8M0 (or float) block scale ``x.weight_scale_inv`` /
``x.scale``, or an FP4 e2m1 weight packed two codes per uint8 byte with one
scale per 32 inputs. Block sizes are read off the shapes. A quantized weight
whose scale is missing is compared through its raw codes, so the missing
scale shows as a gross error rather than being skipped.
"""

from __future__ import annotations

import math
import re

import pandas as pd
import torch

from parity.compare.align import (ShapeMismatch, align, as_dump, comparable, cut_dump, resolve_mapping, shard_blame,
                                  split_key)
from parity.compare.api import frame
from parity.compare.result import TableResult
from parity.errors import ParityError

_SCALE_SUFFIXES = ("_scale_inv", "_scale", ".scale", ".scales", ".weight_scale_inv", ".weight_scale")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
COLUMNS = ["key", "layer", "stage", "rank", "shape", "dtype_ref", "dtype_target", "rel_l2", "cos", "max_abs",
           "frac_equal", "worst_expert", "worst_expert_rel_l2", "verdict", "reason"]


def _is_scale(name: str) -> bool:
    return any(name.endswith(s) for s in _SCALE_SUFFIXES)


def _scale_candidates(name: str) -> list[str]:
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return [name + "_scale_inv", name + "_scale", base + ".scale", base + ".scales", base + ".weight_scale_inv",
            base + ".weight_scale"]


def _pow2_block(size: int, n_scales: int) -> int:
    b = math.ceil(size / max(n_scales, 1))
    return 1 << max(0, (b - 1).bit_length())


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, k: int | None = None) -> tuple[torch.Tensor, str | None]:
    """(float32 values, note) of a stored weight. ``k``: the unpacked input
    size of an FP4 weight when known from the other side."""
    from parity import quant

    if w.dtype in _FP8:
        if scale is None:
            return w.float(), "FP8 weight without a scale: compared unscaled codes"
        if scale.dim() == w.dim() and w.dim() >= 2 and scale.shape[:-2] == w.shape[:-2]:
            bn = _pow2_block(w.shape[-2], scale.shape[-2])
            bk = _pow2_block(w.shape[-1], scale.shape[-1])
            return quant.dequantize_fp8_weight(w, scale, (bn, bk)), f"FP8 {bn}x{bk} blocks dequantized"
        if scale.shape[:-1] == w.shape[:-1]:
            bk = _pow2_block(w.shape[-1], scale.shape[-1])
            s = quant.ue8m0_decode(scale) if scale.dtype == torch.uint8 else scale.float()
            s = s.repeat_interleave(bk, dim=-1)[..., : w.shape[-1]]
            return w.float() * s, f"FP8 1x{bk} blocks dequantized"
        if scale.numel() == 1:
            s = quant.ue8m0_decode(scale) if scale.dtype == torch.uint8 else scale.float()
            return w.float() * s.reshape(()), "FP8 per-tensor scale"
        raise ShapeMismatch(f"scale {list(scale.shape)} does not tile FP8 weight {list(w.shape)}")
    if w.dtype in (torch.uint8, torch.int8) and (scale is not None or k is not None):
        packed = w.view(torch.uint8)
        kk = k or packed.shape[-1] * 2
        if scale is None:
            return quant.fp4_decode(quant.unpack_fp4(packed, kk)), "FP4 weight without a scale: compared unscaled codes"
        if scale.shape[:-1] != packed.shape[:-1]:
            raise ShapeMismatch(f"scale {list(scale.shape)} does not tile FP4 weight {list(w.shape)}")
        block = _pow2_block(kk, scale.shape[-1])
        return quant.dequantize_fp4_weight(packed, scale, kk, block), f"FP4 per-{block} dequantized"
    return w, None


_RANK = {"pass": 0, "warn": 1, "fail": 2}


def _stacked_experts(key: str, t: torch.Tensor) -> bool:
    """Expert weights stored as one tensor, experts along dim 0 ([E, out, in])."""
    return t.dim() >= 3 and t.shape[0] > 1 and "experts" in key.split(":", 1)[0]


def _worst_expert(a: torch.Tensor, b: torch.Tensor) -> tuple[int, dict]:
    """The expert (dim 0 slice) with the largest rel_l2, and its metrics."""
    from parity.compare.metrics import pair_metrics

    num = (a.double() - b.double()).flatten(1).norm(dim=1)
    den = b.double().flatten(1).norm(dim=1).clamp_min(1e-300)
    e = int((num / den).nan_to_num(nan=float("inf")).argmax())
    return e, pair_metrics(a[e], b[e])


class WeightsResult(TableResult):
    @property
    def exit_code(self) -> int:
        # A weight the reference has and the target lacks fails too.
        return 1 if self.failed or self.only_ref else 0


def _quantized(t: torch.Tensor) -> bool:
    return t.dtype in _FP8 or t.dtype in (torch.uint8, torch.int8)


def _side_values(dump, piece, scales: dict, k: int | None, transpose: bool = False):
    parts, notes = [], []
    for rec in piece.recs:
        w = dump.load(rec)
        s_rec = next((scales.get((rec.rank, c)) for c in _scale_candidates(rec.module)
                      if (rec.rank, c) in scales), None)
        v, note = dequantize(w, dump.load(s_rec) if s_rec is not None else None, k)
        parts.append(v)
        if note:
            notes.append(note)
    v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.shard_dim)
    if transpose:
        v = v.transpose(-1, -2)
        notes.append("transposed by the mapping")
    return v, (notes[0] if notes else None), dump.load(piece.rec).dtype


def compare_weights(ref, target, *, mapping=None, preset: str | None = None, filter=None) -> WeightsResult:
    """One row per weight present in both dumps, quantized ones dequantized first."""
    from parity.compare.metrics import pair_metrics
    from parity.compare.verdict import THRESHOLDS, verdict_for

    rd, td = as_dump(ref), as_dump(target)
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(rd, td))
    pat = re.compile(filter) if isinstance(filter, str) else filter
    sides, scales = [], []
    for d, side in ((rd, "ref"), (td, "target")):
        recs = [r for r in d.records() if r.stage == "weight" and r.kind == "tensor"]
        if not recs:
            raise ParityError(f"{d.path} holds no weight records (stage 'weight'): write them with "
                              "parity.capture.dump_weights or PARITY_WEIGHT_DUMP_DIR")
        scales.append({(r.rank, r.module): r for r in recs if _is_scale(r.module)})
        keep = lambda k: not _is_scale(k.split(":", 1)[0]) and (pat is None or pat.search(k) is not None)
        sides.append(cut_dump(d, mapping, keep=keep, stages={"weight"}, side=side))
    if pat is not None and not (sides[0].pieces or sides[1].pieces):
        raise ParityError(f"--filter {pat.pattern!r} matches no weight of {rd.given} or {td.given}")
    al = align(*sides)
    rows = []
    for p in al.pairs:
        layer, stage = split_key(p.ref.key, p.ref.rec.layer)
        row = {"key": p.ref.key, "layer": layer, "stage": stage, "rank": p.rank, "verdict": "fail"}
        try:
            raw_r, raw_t = rd.load(p.ref.rec), td.load(p.target.rec)
            # An FP4 side's unpacked width comes from the other side's shape.
            k_t = raw_r.shape[-1] if raw_r.dim() and not _quantized(raw_r) else None
            k_r = raw_t.shape[-1] if raw_t.dim() and not _quantized(raw_t) else None
            b, note_r, dt_r = _side_values(rd, p.ref, scales[0], k_r, mapping.transposed(p.ref.rec.key, "ref"))
            a, note_t, dt_t = _side_values(td, p.target, scales[1], k_t, mapping.transposed(p.target.rec.key, "target"))
            row.update(dtype_ref=str(dt_r).removeprefix("torch."), dtype_target=str(dt_t).removeprefix("torch."))
            a, b, how = comparable(a, b)
        except ShapeMismatch as exc:
            row["reason"] = str(exc)
            rows.append(row)
            continue
        m = pair_metrics(a, b)
        quantized = _quantized(raw_r) or _quantized(raw_t)
        limits = THRESHOLDS["float8"] if quantized else None
        v = verdict_for(m, thresholds=limits)
        if _stacked_experts(p.ref.key, b):
            e, em = _worst_expert(a, b)
            row.update(worst_expert=e, worst_expert_rel_l2=em.get("rel_l2"))
            ev = verdict_for(em, thresholds=limits)
            if _RANK[ev.status] > _RANK[v.status]:
                # one broken expert among many is diluted in the whole tensor's rel_l2
                v = type(ev)(ev.status, f"expert {e} of {b.shape[0]}: {ev.reason}")
        blame = None
        if v.status == "fail" and not how:
            blame = shard_blame(p.target, a, b, lambda x, y: verdict_for(pair_metrics(x, y),
                                                                          thresholds=limits).status == "fail")
            if blame and len(blame[0]) == 1:
                row["rank"] = blame[0][0]
        notes = [n for n in (v.reason, note_t and f"target: {note_t}", note_r and f"reference: {note_r}", how,
                             p.note, blame and blame[1]) if n]
        row.update(shape=list(b.shape), rel_l2=m.get("rel_l2"), cos=m.get("cos"), max_abs=m.get("max_abs"),
                   frac_equal=m.get("frac_equal"), verdict=v.status, reason="; ".join(notes))
        rows.append(row)
    notes = list(al.notes)
    n_scales = [len(s) for s in scales]
    if any(n_scales):
        notes.append(f"scale tensors folded into their weights: {n_scales[0]} in the reference, "
                     f"{n_scales[1]} in the target")
    return WeightsResult(frame(rows, COLUMNS), sorted({p.key for p in al.only_ref}),
                         sorted({p.key for p in al.only_target}), notes)
