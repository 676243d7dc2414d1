"""Render a pandas DataFrame as a terminal table, csv, json or markdown.

On an interactive terminal a table is cut to the screen; when it is, the
rows that matter most (the caller says which, usually the worst) are kept and
the rest are summarised in one line, so a divergence is never scrolled away.
Files and pipes always get every row.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Iterable

import pandas as pd

from parity.errors import ParityError

FORMATS = ("table", "csv", "json", "markdown")


def _fmt_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3e}"
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(list(v))
    return str(v)


def _jsonable(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)):
        try:
            return _jsonable(v.item())
        except (ValueError, AttributeError):
            pass
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_text(df: pd.DataFrame, max_rows: int | None = None, keep: Iterable[int] | None = None,
            max_width: int | None = None) -> str:
    """A plain fixed-width table. ``keep`` lists row positions that must stay
    visible when the table is cut to ``max_rows``."""
    if df.empty:
        return "(no rows)"
    rows = list(range(len(df)))
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        must = [r for r in (keep or []) if 0 <= r < len(df)][:max_rows]
        rest = [r for r in rows if r not in set(must)]
        chosen = sorted(set(must) | set(rest[: max(0, max_rows - len(must))]))
        hidden = len(rows) - len(chosen)
        rows = chosen
    cols = [str(c) for c in df.columns]
    body = [[_fmt_cell(df.iat[r, j]) for j in range(len(cols))] for r in rows]
    widths = [max([len(c)] + [len(b[j]) for b in body]) for j, c in enumerate(cols)]
    if max_width:
        # Drop trailing columns rather than wrap: wrapped tables are unreadable.
        total, keep_cols = 0, 0
        for w in widths:
            if total + w + 2 > max_width and keep_cols > 0:
                break
            total += w + 2
            keep_cols += 1
        cols, widths = cols[:keep_cols], widths[:keep_cols]
        body = [b[:keep_cols] for b in body]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])]
    prev = None
    for r, b in zip(rows, body):
        if prev is not None and r != prev + 1:
            out.append(f"... ({r - prev - 1} rows not shown)")
        out.append(line(b))
        prev = r
    if prev is not None and prev != len(df) - 1:
        out.append(f"... ({len(df) - 1 - prev} rows not shown)")
    if hidden:
        out.append(f"({len(df)} rows, {hidden} hidden; use --format csv or --out for all)")
    return "\n".join(out)


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)"
    cols = [str(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in range(len(df)):
        out.append("| " + " | ".join(_fmt_cell(df.iat[r, j]).replace("|", "\\|") for j in range(len(cols))) + " |")
    return "\n".join(out)


def to_json(df: pd.DataFrame, extra: dict | None = None) -> str:
    records = [{str(k): _jsonable(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    payload = {"rows": records}
    if extra:
        payload.update({k: _jsonable(v) for k, v in extra.items()})
    return json.dumps(payload, indent=1, default=str)


def _stdout_is_tty() -> bool:
    import sys

    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def interactive(out: str | None = None) -> bool:
    """Whether text goes to a terminal someone reads: only there are tables
    cut to the screen. Files and pipes get every row."""
    return out is None and _stdout_is_tty()


def render(df: pd.DataFrame, fmt: str = "table", *, keep: Iterable[int] | None = None,
           summary: dict | None = None, max_rows: int | None = None, cut: bool | None = None) -> str:
    """Render ``df`` in one of FORMATS. ``summary`` is extra key/values: shown
    after the table in text formats, merged into the JSON object. ``cut``:
    fit a table to the terminal (default: when stdout is one); ``max_rows``
    bounds it whatever the destination."""
    if fmt not in FORMATS:
        raise ParityError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return to_json(df, summary)
    if fmt == "markdown":
        text = to_markdown(df)
        if summary:
            text += "\n\n" + "\n".join(f"- **{k}**: {_fmt_cell(v)}" for k, v in summary.items())
        return text
    width = None
    if interactive() if cut is None else cut:
        size = shutil.get_terminal_size((160, 40))
        max_rows = max_rows if max_rows is not None else max(10, size.lines - 8)
        width = max(80, size.columns)
    text = to_text(df, max_rows=max_rows, keep=keep, max_width=width)
    if summary:
        text += "\n" + "\n".join(f"{k}: {_fmt_cell(v)}" for k, v in summary.items())
    return text


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out: str | None, *, force: bool = False, protect: Iterable[str] = (), label: str = "--out") -> None:
    """Refuse a destination that would clobber something: an existing file
    (unless ``force``), a folder, or anything inside the inputs being read
    (``protect``: dump folders and input files; refused even with ``force``).
    Called before the work starts, and again when writing."""
    if out is None:
        return
    for p in protect:
        if p and (inside(out, p) if os.path.isdir(p) else os.path.realpath(out) == os.path.realpath(p)):
            raise ParityError(f"{label} {out} is inside the input {p}: parity never writes into what it reads; "
                              "choose a path outside it")
    if os.path.isdir(out):
        raise ParityError(f"{label} {out} is a folder; give a file name")
    if os.path.lexists(out) and not force:
        raise ParityError(f"{label} {out} already exists; give --force to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ParityError(f"cannot write {out}: folder {parent} does not exist")


def write_output(text: str, out: str | None, *, force: bool = False, protect: Iterable[str] = ()) -> None:
    """Print ``text`` or write it to ``out`` atomically. Without ``force``
    the file is created only if absent (a hard link of the finished
    temporary file: no window where a file that appeared meanwhile is
    replaced)."""
    import click

    if out is None:
        click.echo(text)
        return
    protect = list(protect)
    check_out(out, force=force, protect=protect)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        if force:
            os.replace(tmp, out)
        else:
            _link_new(tmp, out)
    except OSError as exc:
        raise ParityError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _link_new(tmp: str, out: str) -> None:
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ParityError(f"--out {out} already exists; give --force to replace it") from None
    except OSError:
        # A filesystem without hard links: exclusive create, then the text.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
            dst.write(src.read())
