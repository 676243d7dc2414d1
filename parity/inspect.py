"""Views of one dump (`parity inspect`) and of two dumps' layouts (`parity schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from parity.errors import DumpError
from parity.store import open_dump

_COLUMNS = ["key", "layer", "stage", "phase", "step", "call", "rank", "shape", "dtype",
            "absmax", "mean", "std", "nan", "inf"]


@dataclass
class Inspection:
    table: pd.DataFrame
    totals: dict
    warnings: list[str] = field(default_factory=list)


def inspect_dump(path: str, pattern=None) -> Inspection:
    dump = open_dump(path)
    df = dump.frame()
    if df.empty:
        raise DumpError(f"{path} holds no records (did the capture run with PARITY_DUMP_DIR set and its filters matching?)")
    if pattern is not None:
        df = df[df["key"].map(lambda k: bool(pattern.search(k)))]
    df = df.reindex(columns=_COLUMNS).reset_index(drop=True)
    warnings = [f"{r.key} (phase {r.phase}, step {r.step}, call {r.call}, rank {r.rank}): "
                f"{int(r.nan or 0)} NaN, {int(r.inf or 0)} Inf"
                for r in df.itertuples() if (r.nan or 0) > 0 or (r.inf or 0) > 0]
    nbytes = sum(_nbytes(r) for r in dump.records())
    totals = {"records": len(df), "ranks": len(dump.ranks), "tensor_bytes": nbytes,
              "records_with_nan_or_inf": len(warnings), "model": dump.run.get("model"),
              "impl": dump.run.get("impl")}
    return Inspection(df, totals, warnings)


def _nbytes(rec) -> int:
    if rec.kind != "tensor":
        return 0
    n = 1
    for s in rec.shape:
        n *= s
    size = {"float64": 8, "int64": 8, "uint64": 8, "float32": 4, "int32": 4, "uint32": 4,
            "bfloat16": 2, "float16": 2, "int16": 2, "uint16": 2}.get(rec.dtype, 1)
    return n * size


def _signature(dump) -> dict:
    """(key, phase, step, call, rank) -> (shape, dtype)."""
    return {(r.key, r.phase, r.step, r.call, r.rank): (tuple(r.shape), r.dtype) for r in dump.records()}


def schema_diff(a: str, b: str, pattern=None) -> pd.DataFrame:
    """Rows for records only in A, only in B, and common records whose shape
    or dtype differ. Empty frame = same schema."""
    sa, sb = _signature(open_dump(a)), _signature(open_dump(b))
    rows = []
    for k in list(sa) + [k for k in sb if k not in sa]:
        if pattern is not None and not pattern.search(k[0]):
            continue
        key, phase, step, call, rank = k
        base = {"key": key, "phase": phase, "step": step, "call": call, "rank": rank}
        if k not in sb:
            rows.append({**base, "status": "only in A", "a": _fmt(sa[k]), "b": ""})
        elif k not in sa:
            rows.append({**base, "status": "only in B", "a": "", "b": _fmt(sb[k])})
        elif sa[k] != sb[k]:
            what = "shape" if sa[k][0] != sb[k][0] else "dtype"
            if sa[k][0] != sb[k][0] and sa[k][1] != sb[k][1]:
                what = "shape+dtype"
            rows.append({**base, "status": f"{what} differs", "a": _fmt(sa[k]), "b": _fmt(sb[k])})
    return pd.DataFrame(rows, columns=["key", "phase", "step", "call", "rank", "status", "a", "b"])


def _fmt(sig) -> str:
    shape, dtype = sig
    return f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
