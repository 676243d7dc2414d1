"""`parity inspect`, `parity schema`, `parity env`."""

from __future__ import annotations

import click
import pandas as pd

from parity.cli import cli
from parity.cli._options import compile_filter, output_options
from parity.report.tables import render, write_output


@cli.command("inspect")
@click.argument("dump_dir", metavar="DIR")
@output_options
def inspect_cmd(dump_dir, fmt, out, filter_):
    """One row per record of the dump in DIR, with totals and NaN/Inf warnings."""
    from parity.inspect import inspect_dump

    res = inspect_dump(dump_dir, compile_filter(filter_))
    keep = [i for i, (n, f) in enumerate(zip(res.table["nan"].fillna(0), res.table["inf"].fillna(0))) if n or f]
    write_output(render(res.table, fmt, keep=keep, summary=res.totals), out)
    for w in res.warnings[:20]:
        click.echo(f"warning: {w}", err=True)
    if len(res.warnings) > 20:
        click.echo(f"warning: ... and {len(res.warnings) - 20} more records with NaN/Inf", err=True)


@cli.command("schema")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@output_options
def schema_cmd(a, b, fmt, out, filter_):
    """Records only in dump A, only in dump B, and common records whose shape
    or dtype differ. Exit 1 when there is any such record."""
    from parity.inspect import schema_diff

    diff = schema_diff(a, b, compile_filter(filter_))
    summary = {"differences": len(diff)}
    write_output(render(diff, fmt, summary=summary) if len(diff) or fmt != "table"
                 else "schemas match", out)
    raise SystemExit(1 if len(diff) else 0)


@cli.command("env")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown", "csv"]), default="table",
              show_default=True, help="Output format.")
def env_cmd(fmt):
    """The capture configuration the PARITY_* variables give right now."""
    import os

    from parity.config import VARIABLES, CaptureConfig

    cfg = CaptureConfig.from_env()
    rows = [{"variable": name, "value": os.environ.get(name.split(" ")[0], ""), "meaning": meaning}
            for name, meaning in VARIABLES]
    summary = {"capture": "on" if cfg.enabled else "off",
               "weight_dump": "on" if cfg.weight_dump_dir else "off"}
    if fmt in ("table", "markdown"):
        summary.update({k: ",".join(map(str, v)) if isinstance(v, list) else v
                        for k, v in cfg.describe().items()})
    write_output(render(pd.DataFrame(rows), fmt, summary=summary, max_rows=100), None)
