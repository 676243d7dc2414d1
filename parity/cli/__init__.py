"""The ``parity`` command line: a thin layer over the library.

Each command module parses options, calls one library function and renders
what it returns. Exit codes everywhere: 0 agreement, 1 divergence found,
2 bad input or usage (one message, no traceback).
"""

from __future__ import annotations

import importlib
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
    "parity.cli.demo",      # demo
]


# Packages only some commands need, and the extra that installs them.
_OPTIONAL = {"transformers": "reference", "tokenizers": "reference", "triton": "gpu"}


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ParityError as exc:
            click.echo(f"parity: error: {exc}", err=True)
            ctx.exit(2)
        except ModuleNotFoundError as exc:
            if exc.name not in _OPTIONAL:
                raise
            click.echo(f"parity: error: this command needs {exc.name}, which is not installed; install "
                       f"parity's '{_OPTIONAL[exc.name]}' extra (in a checkout: pip install -e "
                       f"'.[{_OPTIONAL[exc.name]}]')", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="parity")
def cli():
    """Find where two implementations of one network stop agreeing.

    Capture dumps with PARITY_DUMP_DIR set (see `parity env`), then compare
    them. Exit codes: 0 agreement, 1 divergence found, 2 bad input.
    """


def _register():
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A command module still being written must not break the rest.
            if exc.name != name:
                raise


_register()


def main(argv=None):
    return cli.main(args=argv, prog_name="parity")


if __name__ == "__main__":
    sys.exit(main())
