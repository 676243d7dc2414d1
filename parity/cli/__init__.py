"""The ``parity`` command line: a thin layer over the library.

Each command module parses options, calls one library function and renders
what it returns. Exit codes everywhere: 0 agreement, 1 divergence found
(or agreement cannot be claimed: reference records missing from the target,
an incomplete input), 2 bad input or usage (one message naming the file and
the problem, no traceback).
"""

from __future__ import annotations

import importlib
import json
import sys

import click

from parity import __version__
from parity.errors import ParityError

# Command modules register themselves on ``cli``; listed here so that
# `parity --help` shows every command without importing torch eagerly.
_COMMAND_MODULES = [
    "parity.cli.dumps",     # inspect, schema, env
    "parity.cli.compare",   # ref-vs-target, layer-bisect, slot-invariance, weights, topk
    "parity.cli.gate",      # gate gsm8k, gate diff
]
# Commands an installed engine brings (e.g. this repository's `demo`): click
# commands declared under this entry point group in the engine's package.
COMMANDS_GROUP = "parity.commands"


# Packages only some commands need, and the extra that installs them.
_OPTIONAL = {"transformers": "reference", "tokenizers": "reference", "triton": "gpu"}


def _message(exc: BaseException) -> str | None:
    """One line for an error that is the input's fault, not parity's; None
    for anything else (a bug, which keeps its traceback)."""
    if isinstance(exc, ParityError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name in _OPTIONAL:
        extra = _OPTIONAL[exc.name]
        return (f"this command needs {exc.name}, which is not installed; install parity's '{extra}' extra "
                f"(in a checkout: pip install -e '.[{extra}]')")
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else "a file"
        return f"cannot use {name}: {exc.strerror or exc}"
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"an input file is not valid JSON: {exc}"
    if type(exc).__name__ == "SafetensorError":
        return f"a safetensors file is malformed: {exc}"
    return None


class _Group(click.Group):
    """Turns every error caused by the input into one message and exit 2
    (exit 1 is reserved for "divergence found")."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            msg = _message(exc)
            if msg is None:
                raise
            click.echo(f"parity: error: {msg}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="parity")
def cli():
    """Find where two implementations of one network stop agreeing.

    Capture dumps with PARITY_DUMP_DIR set (see `parity env`), then compare
    them. Exit codes: 0 agreement, 1 divergence found (or records missing,
    an input incomplete), 2 bad input.
    """


for _name in _COMMAND_MODULES:
    importlib.import_module(_name)


def _plugins() -> None:
    """Add the commands installed packages declare. One that fails to load
    is named on stderr and left out: it must not take the others down."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP):
        if ep.name in cli.commands:
            click.echo(f"parity: warning: {ep.value} declares command {ep.name!r}, which parity has; ignored",
                       err=True)
            continue
        try:
            cmd = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not raised
            click.echo(f"parity: warning: command {ep.name!r} ({ep.value}) could not load: "
                       f"{type(exc).__name__}: {exc}", err=True)
            continue
        if not isinstance(cmd, click.Command):
            click.echo(f"parity: warning: {ep.value} is not a click command; ignored", err=True)
            continue
        cli.add_command(cmd, ep.name)


_plugins()


def main(argv=None):
    return cli.main(args=argv, prog_name="parity")


if __name__ == "__main__":
    sys.exit(main())
