"""`parity inspect`, `parity schema`, `parity env`."""

from __future__ import annotations

import click
import pandas as pd

from parity.cli import cli
from parity.cli._options import compile_filter, open_inputs, output_options
from parity.errors import DumpError
from parity.report.tables import interactive, render, write_output


@cli.command("inspect")
@click.argument("dump_dir", metavar="DIR")
@click.option("--verify", is_flag=True, help="Also re-hash every tensor against its manifest hash (reads every byte).")
@click.option("--allow-incomplete", is_flag=True,
              help="Exit 0 for a run that did not close cleanly when nothing in it is damaged.")
@output_options
def inspect_cmd(dump_dir, verify, allow_incomplete, fmt, out, force, filter_):
    """One row per record of the dump in DIR, with totals and NaN/Inf warnings.

    Also the dump's health check: every shard is opened and every tensor
    checked against its header (with --verify, its hash too). Exit 2 when
    a shard is missing, truncated or corrupt, or the run is incomplete.
    """
    from parity.inspect import inspect_dump

    inputs = open_inputs({"inspected": dump_dir}, verify=verify, out=out, force=force, warn=False)
    res = inspect_dump(inputs["inspected"], compile_filter(filter_), verify=verify)
    keep = [i for i, (n, f) in enumerate(zip(res.table["nan"].fillna(0), res.table["inf"].fillna(0))) if n or f]
    text = render(res.table, fmt, keep=keep, summary={**res.totals, "problems": res.problems} if fmt == "json"
                  else res.totals, cut=interactive(out))
    write_output(text, out, force=force, protect=inputs.paths)
    for w in res.warnings[:20]:
        click.echo(f"warning: {w}", err=True)
    if len(res.warnings) > 20:
        click.echo(f"warning: ... and {len(res.warnings) - 20} more", err=True)
    _fail_if_damaged(dump_dir, res, allow_incomplete)


def _fail_if_damaged(dump_dir, res, allow_incomplete) -> None:
    if res.problems:
        more = f" (and {len(res.problems) - 5} more)" if len(res.problems) > 5 else ""
        raise DumpError(f"{dump_dir} is damaged: {len(res.problems)} problem(s): "
                        + "; ".join(res.problems[:5]) + more)
    if res.incomplete and not allow_incomplete:
        raise DumpError(f"{dump_dir} is incomplete: {'; '.join(res.incomplete)} "
                        "(--allow-incomplete accepts it)")


@cli.command("schema")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--allow-incomplete", is_flag=True, help="Do not fail because A or B did not close cleanly.")
@click.option("--map", "map_file", metavar="FILE", default=None,
              help="Mapping rules file: preview the pairing a compare makes (A as reference, B as target).")
@click.option("--preset", metavar="NAME", default=None, help="Mapping preset (default: the one the runs declare).")
@click.option("--map-ref", metavar="FILE", default=None, help="Rules for A's keys only.")
@click.option("--map-target", metavar="FILE", default=None, help="Rules for B's keys only.")
@output_options
def schema_cmd(a, b, allow_incomplete, map_file, preset, map_ref, map_target, fmt, out, force, filter_):
    """Records only in dump A, only in dump B, and common records whose shape
    or dtype differ, after the mapping a compare would use (A as reference,
    B as target). Exit 1 when there is any such record, or A or B is
    incomplete."""
    from parity.compare.align import resolve_mapping
    from parity.inspect import schema_diff

    inputs = open_inputs({"A": a, "B": b}, allow_incomplete=allow_incomplete, out=out, force=force)
    mapping = resolve_mapping(map_file, preset, map_ref=map_ref, map_target=map_target,
                              dumps=(inputs["A"], inputs["B"]))
    diff = schema_diff(inputs["A"], inputs["B"], compile_filter(filter_), mapping=mapping)
    summary = {"differences": len(diff), **inputs.summary()}
    text = (render(diff, fmt, summary=summary, cut=interactive(out)) if len(diff) or fmt != "table"
            else "\n".join(["schemas match"] + [f"{k}: {v}" for k, v in inputs.summary().items()]))
    write_output(text, out, force=force, protect=inputs.paths)
    raise SystemExit(inputs.exit_code(1 if len(diff) else 0))


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
