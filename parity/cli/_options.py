"""Options shared by every table-producing command."""

from __future__ import annotations

import re

import click

from parity.errors import ParityError
from parity.report.tables import FORMATS


def output_options(fn):
    """--format, --out and --filter, in that order in --help."""
    fn = click.option("--filter", "filter_", metavar="PATTERN", default=None,
                      help="Keep rows whose key matches this regular expression.")(fn)
    fn = click.option("--out", metavar="FILE", default=None,
                      help="Write the result to FILE instead of the terminal.")(fn)
    fn = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                      help="Output format.")(fn)
    return fn


def compile_filter(pattern: str | None):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ParityError(f"--filter {pattern!r} is not a valid regular expression: {exc}") from None
