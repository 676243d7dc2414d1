"""Views of one dump (`parity inspect`) and of two dumps' layouts (`parity schema`).

`inspect` is also the dump's health check: every shard a record names is
opened and every tensor checked against its header (and, with ``verify``,
its hash), so a truncated, empty or missing shard is found without a
comparison."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pandas as pd

from parity.errors import DumpError, ParityError
from parity.store import Dump, open_dump
from parity.store.schema import MANIFEST, RANK_FILE

_COLUMNS = ["key", "layer", "stage", "phase", "step", "call", "rank", "shape", "dtype",
            "absmax", "mean", "std", "nan", "inf"]
# Files a writer leaves in a rank folder besides its shards.
_RANK_FILES = {MANIFEST, RANK_FILE, "writer.lock"}
_SHARD = re.compile(r"^shard-\d+\.safetensors$")


@dataclass
class Inspection:
    table: pd.DataFrame
    totals: dict
    warnings: list[str] = field(default_factory=list)    # NaN/Inf, stray files
    problems: list[str] = field(default_factory=list)    # damage: exit 2
    incomplete: list[str] = field(default_factory=list)  # why the run is not whole


def _as_dump(d, verify: bool) -> Dump:
    return d if isinstance(d, Dump) else open_dump(str(d), verify=verify)


def inspect_dump(path, pattern=None, *, verify: bool = False) -> Inspection:
    """Rows, totals and the dump's health. ``verify``: also re-hash every
    tensor (reads every byte)."""
    dump = _as_dump(path, verify)
    recs = dump.records()
    if not recs:
        raise DumpError(f"{dump.given} holds no records (did the capture run with PARITY_DUMP_DIR set and "
                        "its filters matching?)" + (f"; it is incomplete: {'; '.join(dump.incomplete)}"
                                                    if dump.incomplete else ""))
    if pattern is not None:
        recs = [r for r in recs if pattern.search(r.key)]
        if not recs:
            raise ParityError(f"--filter {pattern.pattern!r} matches no record of {dump.given}")
    df = dump.frame()
    if pattern is not None:
        df = df[df["key"].map(lambda k: bool(pattern.search(k)))]
    df = df.reindex(columns=_COLUMNS).reset_index(drop=True)
    warnings = [f"{r.key} (phase {r.phase}, step {r.step}, call {r.call}, rank {r.rank}): "
                f"{int(r.nan or 0)} NaN, {int(r.inf or 0)} Inf"
                for r in df.itertuples() if (r.nan or 0) > 0 or (r.inf or 0) > 0]
    problems = check_records(dump, recs, verify=verify) + _repeated_seq(dump)
    if pattern is None:
        warnings += _stray_files(dump)
    nbytes = sum(_nbytes(r) for r in recs)
    totals = {"records": len(df), "ranks": len(dump.ranks), "tensor_bytes": nbytes,
              "records_with_nan_or_inf": len(warnings), "model": dump.run.get("model"),
              "impl": dump.run.get("impl"),
              "complete": "yes" if dump.complete else "no: " + "; ".join(dump.incomplete),
              "integrity": (f"{len(problems)} problem(s)" if problems else
                            "shards and headers checked" + (", every hash verified" if verify else
                                                            " (hashes not checked: give --verify)"))}
    return Inspection(df, totals, warnings, problems, dump.incomplete)


def check_records(dump: Dump, recs, *, verify: bool) -> list[str]:
    """One problem per damaged shard (or record): the shard is opened, each
    tensor matched against its header, and with ``verify`` re-hashed. A
    shard's memory map is dropped once its records are done."""
    by_shard: dict[tuple, list] = defaultdict(list)
    for r in recs:
        if r.kind == "tensor":
            by_shard[(r.rank, r.file)].append(r)
    problems = []
    for group in by_shard.values():
        try:
            dump.open_shard(group[0])
        except DumpError as exc:
            problems.append(str(exc))  # the file itself: one message for all its records
            continue
        for rec in group:
            try:
                dump.load(rec, verify=verify)
            except DumpError as exc:
                problems.append(str(exc))
        dump.drop_maps()
    return problems


def _repeated_seq(dump: Dump) -> list[str]:
    """Execution order numbers are unique per rank; a repeat means two runs
    wrote one folder."""
    out = []
    for rank in dump.ranks:
        counts = Counter(r.seq for r in dump.records(rank))
        twice = [s for s, n in counts.items() if n > 1]
        if twice:
            out.append(f"{dump.label(f'rank{rank}/{MANIFEST}')}: {len(twice)} execution order number(s) appear "
                       f"more than once (e.g. seq {min(twice)}): two runs wrote into this folder")
    return out


def _stray_files(dump: Dump) -> list[str]:
    """Shards no manifest line names (a crash between a shard and its
    manifest lines, or another run's), and leftover temporary files."""
    named = {(r.rank, r.file) for r in dump.records() if r.file}
    out = []
    for rank, d in sorted(dump.rank_dirs.items()):
        try:
            names = os.listdir(d)
        except OSError as exc:
            raise DumpError(f"cannot read {d}: {exc.strerror}") from None
        orphans = sorted(n for n in names if _SHARD.match(n) and (rank, n) not in named)
        temps = [n for n in names if n.startswith(".shard-") or n.endswith(".tmp")]
        if orphans:
            out.append(f"{dump.label(f'rank{rank}')}: {len(orphans)} shard file(s) no manifest line names "
                       f"(e.g. {orphans[0]}): left by an interrupted write, or by another run")
        if temps:
            out.append(f"{dump.label(f'rank{rank}')}: {len(temps)} temporary file(s) of an interrupted write "
                       f"(e.g. {temps[0]}), ignored")
    return out


def _nbytes(rec) -> int:
    if rec.kind != "tensor":
        return 0
    n = 1
    for s in rec.shape:
        n *= s
    size = {"float64": 8, "int64": 8, "uint64": 8, "float32": 4, "int32": 4, "uint32": 4,
            "bfloat16": 2, "float16": 2, "int16": 2, "uint16": 2}.get(rec.dtype, 1)
    return n * size


def _signature(dump, mapping=None, side=None) -> tuple[dict, dict]:
    """(canonical key, phase, step, call, rank) -> (shape, dtype), and -> the
    record's own key; records the mapping drops are left out."""
    sig, orig = {}, {}
    for r in dump.records():
        key = mapping.canonical(r.key, side) if mapping is not None else r.key
        if key is None:
            continue
        k = (key, r.phase, r.step, r.call, r.rank)
        sig[k], orig[k] = (tuple(r.shape), r.dtype), r.key
    return sig, orig


def schema_diff(a, b, pattern=None, *, mapping=None, preset: str | None = None) -> pd.DataFrame:
    """Rows for records only in A, only in B, and common records whose shape
    or dtype differ, after the mapping (``mapping``: a rules file or Mapping;
    ``preset``; default: the preset the runs declare, else identity) takes A
    as the reference and B as the target: a preview of how a compare pairs
    them (``key_a``/``key_b``: the records' own keys). Empty frame = same
    schema. A and B: dump dirs or Dumps."""
    from parity.compare.align import resolve_mapping

    da, db = _as_dump(a, False), _as_dump(b, False)
    if mapping is None or isinstance(mapping, str):
        mapping = resolve_mapping(mapping, preset, dumps=(da, db))
    (sa, oa), (sb, ob) = _signature(da, mapping, "ref"), _signature(db, mapping, "target")
    if pattern is not None and not any(pattern.search(k[0]) for k in [*sa, *sb]):
        raise ParityError(f"--filter {pattern.pattern!r} matches no record of {da.given} or {db.given}")
    rows = []
    for k in list(sa) + [k for k in sb if k not in sa]:
        if pattern is not None and not pattern.search(k[0]):
            continue
        key, phase, step, call, rank = k
        base = {"key": key, "phase": phase, "step": step, "call": call, "rank": rank, "key_a": oa.get(k, ""),
                "key_b": ob.get(k, "")}
        if k not in sb:
            rows.append({**base, "status": "only in A", "a": _fmt(sa[k]), "b": ""})
        elif k not in sa:
            rows.append({**base, "status": "only in B", "a": "", "b": _fmt(sb[k])})
        elif sa[k] != sb[k]:
            what = "shape" if sa[k][0] != sb[k][0] else "dtype"
            if sa[k][0] != sb[k][0] and sa[k][1] != sb[k][1]:
                what = "shape+dtype"
            rows.append({**base, "status": f"{what} differs", "a": _fmt(sa[k]), "b": _fmt(sb[k])})
    return pd.DataFrame(rows, columns=["key", "phase", "step", "call", "rank", "status", "a", "b", "key_a", "key_b"])


def _fmt(sig) -> str:
    shape, dtype = sig
    return f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
