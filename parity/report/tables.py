"""Render a pandas DataFrame as a terminal table, csv, json or markdown.

Terminal tables are cut to a row budget; when a table is cut, the rows that
matter most (the caller says which, usually the worst) are kept and the rest
are summarised in one line, so a divergence is never scrolled away.
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


def render(df: pd.DataFrame, fmt: str = "table", *, keep: Iterable[int] | None = None,
           summary: dict | None = None, max_rows: int | None = None) -> str:
    """Render ``df`` in one of FORMATS. ``summary`` is extra key/values: shown
    after the table in text formats, merged into the JSON object."""
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
    size = shutil.get_terminal_size((160, 40))
    if max_rows is None:
        max_rows = max(10, size.lines - 8)
    text = to_text(df, max_rows=max_rows, keep=keep, max_width=max(80, size.columns))
    if summary:
        text += "\n" + "\n".join(f"{k}: {_fmt_cell(v)}" for k, v in summary.items())
    return text


def write_output(text: str, out: str | None, *, overwrite: bool = True) -> None:
    """Print ``text`` or write it to ``out`` atomically."""
    import click

    if out is None:
        click.echo(text)
        return
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ParityError(f"cannot write {out}: folder {parent} does not exist")
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, out)
